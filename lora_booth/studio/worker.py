"""Workers: one per GPU (one on a CPU-only machine). Each takes the next queued run and starts it as
its own `lora-booth train` process, so a crash or an out-of-memory kill ends that process only and
the run is marked failed with the last lines of its log, never left showing as running.

The train process lives as long as the server: when the server dies, even of SIGKILL, its keeper
(keeper.py) passes it one SIGTERM, which train answers by saving a checkpoint at the next step
boundary. The next server start finds the run marked running, waits for that process to be gone,
and queues the run again with resume=latest."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .progress import log_tail
from .run_request import arguments_for, command
from .store import Run, RunStore
from .workspace import Workspace

KEEPER = Path(__file__).with_name("keeper.py")
# how long a start waits for the train process of a previous server to save its checkpoint and exit
ADOPT_WAIT_S = 600.0


def is_train_of(pid: int, run_dir: Path) -> bool:
    """Whether pid is still the train process of this run (not a recycled pid)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        if sys.platform.startswith("linux"):
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # without /proc the pid alone decides
    return f"output_dir={run_dir}".encode() in words


def slots() -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: one per GPU, or one worker without a GPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(index) for index in range(count)] or [None]


class Workers:
    def __init__(self, workspace: Workspace, store: RunStore, devices: list[str | None] | None = None,
                 poll_s: float = 0.3) -> None:
        self.workspace, self.store, self.poll_s = workspace, store, poll_s
        self.devices = devices if devices is not None else slots()
        self.stopping = threading.Event()
        self.processes: dict[int, subprocess.Popen] = {}
        self.threads: list[threading.Thread] = []

    def recover(self) -> list[int]:
        """Runs a previous server left running go back to the queue, to resume where they stopped."""
        found = []
        for run in self.store.interrupted():
            self.store.requeue_interrupted(run.id)
            found.append(run.id)
        return found

    def start(self) -> None:
        self.recover()
        for slot, device in enumerate(self.devices):
            thread = threading.Thread(target=self._loop, args=(slot, device), name=f"studio-worker-{slot}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def shutdown(self, wait_s: float = 120.0) -> None:
        """Server shutdown: each run saves a checkpoint and goes back to the queue for the next start."""
        self.stopping.set()
        for process in list(self.processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for thread in self.threads:
            thread.join(wait_s)

    def stop(self, run_id: int) -> None:
        """The user's stop: SIGTERM, which train answers with a checkpoint and a clean exit."""
        process = self.processes.get(run_id)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def ask(self, run_id: int, signum: int) -> bool:
        """Save now (SIGUSR1) or sample now (SIGUSR2): train answers at its next step boundary and
        goes on. False when the run has no live process here."""
        process = self.processes.get(run_id)
        if process is None or process.poll() is not None:
            return False
        process.send_signal(signum)
        return True

    def _loop(self, slot: int, device: str | None) -> None:
        while not self.stopping.is_set():
            run = self.store.claim(slot)
            if run is None:
                self.stopping.wait(self.poll_s)
                continue
            try:
                self._run(run, device)
            except Exception as error:  # noqa: BLE001 - a worker must outlive any one run's failure
                self.store.finish(run.id, "failed", None, f"the studio could not start the run: {error}")

    def _wait_for_previous(self, run: Run) -> None:
        """A train process of this run that an earlier server started may still be saving its checkpoint."""
        if not run.pid:
            return
        deadline = time.monotonic() + ADOPT_WAIT_S
        while is_train_of(run.pid, self.workspace.run_dir(run.id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if is_train_of(run.pid, self.workspace.run_dir(run.id)):  # the keeper leads the group: train goes with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pid, signal.SIGKILL)

    def launch_words(self, run: Run) -> list[str]:
        """`lora-booth train …` under its keeper; the keys are checked again (the workspace may have changed)."""
        arguments = arguments_for(self.workspace, run.request)
        return [sys.executable, "-I", str(KEEPER), *command(self.workspace, run.id, arguments, run.resume)]

    def _run(self, run: Run, device: str | None) -> None:
        self._wait_for_previous(run)
        words = self.launch_words(run)
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        log = self.workspace.log_file(run.id)
        with open(log, "ab") as handle:
            handle.write(f"$ lora-booth {shlex.join(words[3:])}\n".encode())
            handle.flush()
            # a session of its own: a Ctrl-C meant for the server reaches the run through the server
            process = subprocess.Popen(words, cwd=self.workspace.root, env=env, stdin=subprocess.DEVNULL,
                                       stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[run.id] = process
        self.store.set_pid(run.id, process.pid)
        try:
            while process.poll() is None:
                if self.store.get(run.id).stop_requested:
                    process.send_signal(signal.SIGTERM)
                    process.wait()
                    break
                time.sleep(self.poll_s)
        finally:
            self.processes.pop(run.id, None)
        self._record_end(run.id, process.returncode)

    def _record_end(self, run_id: int, code: int) -> None:
        run = self.store.get(run_id)
        if code == 0:  # finished, even when a stop came in as it wrote its last files
            self.store.finish(run_id, "done", code)
        elif run.stop_requested:
            self.store.finish(run_id, "stopped", code)
        elif self.stopping.is_set():  # the server is shutting down: it stopped the run, the next start resumes it
            self.store.finish(run_id, "queued", code)
        else:
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if code == -signal.SIGKILL:
                why += " (often the system's out-of-memory killer)"
            tail = "\n".join(log_tail(self.workspace.log_file(run_id), 20))
            self.store.finish(run_id, "failed", code, f"{why}\n{tail}")
