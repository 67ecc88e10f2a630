"""The record of what a run wrote into its output folder, so that lora-booth removes only its own
files: `overwrite=true` deletes the entries listed here and nothing else, whatever else the user
keeps in that folder (issue #22). One relative path per line, appended as each file lands."""
from __future__ import annotations

import os
from pathlib import Path

NAME = ".lora-booth-files"
MAX_BYTES = 16 * 2**20   # a run writes some thousands of files at most; a bigger list is not ours


class Manifest:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / NAME
        self.known = set(self.entries())

    def entries(self) -> list[str]:
        """Relative paths, as recorded; entries that would leave the folder are dropped (the file is
        data a user could have edited, so never trusted to point elsewhere)."""
        try:
            if not self.path.is_file() or self.path.stat().st_size > MAX_BYTES:
                return []
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if line and _inside(line)]

    def record(self, path: Path) -> None:
        """Note `path` (a file or a folder lora-booth created) as this run's."""
        try:
            relative = Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return
        if relative in self.known or relative == NAME:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(relative + "\n")
        self.known.add(relative)

    def remove_recorded(self) -> list[Path]:
        """Delete every recorded file, then every recorded folder left empty, then the record itself.
        Files lora-booth did not write stay, and so do the folders that hold them."""
        removed = []
        paths = sorted({self.root / entry for entry in self.entries()}, key=lambda p: len(p.parts), reverse=True)
        for path in paths:
            try:
                if path.is_symlink() or path.is_file():
                    path.unlink()
                    removed.append(path)
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                    removed.append(path)
            except OSError:
                continue
        self.path.unlink(missing_ok=True)
        self.known = set()
        return removed


def _inside(relative: str) -> bool:
    """A recorded path that stays inside the run folder."""
    candidate = Path(relative)
    return not candidate.is_absolute() and ".." not in candidate.parts


_active: list[Manifest] = []


def activate(root: Path) -> Manifest:
    """From now on every file lora-booth writes under `root` is recorded (atomic.py asks `note`)."""
    manifest = Manifest(root)
    _active.append(manifest)
    return manifest


def deactivate(root: Path) -> None:
    """Stop recording for the run folder `root` (the run ended, well or not)."""
    resolved = Path(root).resolve()
    _active[:] = [m for m in _active if m.root != resolved]


def note(path: Path) -> None:
    """Record `path` in the manifest of the active run folder that holds it, if any."""
    absolute = Path(os.path.abspath(path))
    for manifest in _active:
        if absolute == manifest.root or manifest.root in absolute.parents:
            manifest.record(absolute)
