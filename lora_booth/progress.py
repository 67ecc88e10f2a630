"""Progress of a long phase (class images, latents, training steps) with a smoothed ETA.

On a terminal: one line redrawn in place (`\\r`) at most every `refresh` seconds. Anywhere else (a
log file, a pipe, a job scheduler): a plain line each `every_percent` % and never a `\\r`, so a
redirected log stays readable instead of one line of tens of kilobytes of frames.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    if not math.isfinite(seconds):
        return "?"
    whole = int(round(max(0.0, seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class SmoothedRate:
    """Seconds per unit as an exponential moving average over the units done, not over updates:
    the ETA follows a lasting change of speed (a machine that got busy) within about `window`
    units, while one slow step (a sample grid, a checkpoint) moves it only a little."""

    def __init__(self, window: float = 20.0) -> None:
        self.window = window
        self.seconds_per_unit: float | None = None

    def add(self, units: float, seconds: float) -> None:
        if units <= 0:
            return
        current = seconds / units
        if self.seconds_per_unit is None:
            self.seconds_per_unit = current
            return
        weight = 1.0 - math.exp(-units / self.window)  # the same smoothing for 1 unit at a time or 10
        self.seconds_per_unit += weight * (current - self.seconds_per_unit)

    def eta(self, units_left: float) -> float:
        return math.nan if self.seconds_per_unit is None else units_left * self.seconds_per_unit


class Progress:
    """Counts `done` toward `total` `unit`s; `advance_to` takes fractions (an image half drawn)."""

    def __init__(self, total: float, desc: str, unit: str, *, initial: float = 0, enabled: bool = True,
                 stream: TextIO | None = None, every_percent: int = 10, refresh: float = 0.5,
                 window: float = 20.0) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_percent, self.refresh = every_percent, refresh
        self.done = self.first = initial
        self.rate = SmoothedRate(window)
        self.postfix = ""
        self.started = self.last_time = self.last_drawn = time.perf_counter()
        self.last_done = initial
        self.next_percent = (int(100 * initial / total) // every_percent + 1) * every_percent if total else 100
        self.width = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, units: float = 1) -> None:
        self.advance_to(self.done + units)

    def advance_to(self, done: float) -> None:
        now = time.perf_counter()
        self.rate.add(done - self.last_done, now - self.last_time)
        self.last_done, self.last_time, self.done = done, now, done
        if not self.enabled:
            return
        if self.terminal:
            if now - self.last_drawn >= self.refresh or done >= self.total:
                self._draw(now)
        else:
            percent = 100 * done / self.total if self.total else 100
            if percent >= self.next_percent:
                self._line(now)
                while self.next_percent <= percent:
                    self.next_percent += self.every_percent

    def set_postfix(self, **values: str) -> None:
        self.postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def text(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        percent = 100 * self.done / self.total if self.total else 100.0
        speed = self.rate.seconds_per_unit
        pace = "" if speed is None else (f", {speed:.2f} s/{self.unit}" if speed >= 1 or speed == 0
                                         else f", {1 / speed:.1f} {self.unit}/s")
        count = f"{self.done:g}" if float(self.done).is_integer() else f"{self.done:.1f}"
        return (f"{self.desc}: {percent:3.0f}% ({count}/{self.total:g} {self.unit}{pace}, "
                f"elapsed {clock(now - self.started)}, ETA {clock(self.rate.eta(self.total - self.done))})"
                + (f" {self.postfix}" if self.postfix else ""))

    def _draw(self, now: float) -> None:
        line = self.text(now)
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.stream.flush()
        self.width, self.last_drawn = len(line), now

    def _line(self, now: float) -> None:
        self.stream.write(self.text(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.terminal and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False
