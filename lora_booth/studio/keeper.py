"""Runs one `lora-booth train` command and ties it to the studio server's life: when the server
dies, even of SIGKILL, the train process gets exactly one SIGTERM, which it answers by saving a
checkpoint at the next step boundary and exiting (the next server start resumes the run). It
relays SIGUSR1 and SIGUSR2 (save now, sample now) as they come.

The kernel's parent-death signal (Linux PR_SET_PDEATHSIG) fires once per thread of the dying
parent that the child is handed to on the way, so a child of the many-threaded server can get
several; train reads a second SIGTERM as "abort now, without a checkpoint". This keeper is that
child instead, single-threaded, and forwards one. It runs as a script with the standard library
only (`python -I keeper.py train …`), so it starts in milliseconds."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def main(words: list[str]) -> int:
    server = os.getppid()
    state = {"child": None, "asked": False, "sent": False}

    def forward(signum, frame) -> None:
        state["asked"] = True
        if state["child"] is not None and not state["sent"]:
            state["sent"] = True
            state["child"].send_signal(signal.SIGTERM)

    def relay(signum, frame) -> None:  # "save now" (SIGUSR1), "sample now" (SIGUSR2): train goes on
        if state["child"] is not None:
            with contextlib.suppress(ProcessLookupError):
                state["child"].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    with contextlib.suppress(Exception):  # elsewhere than Linux: the next server start waits for the run instead
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # ignored until train's loop answers them (the disposition passes to the child): a click before
    # the first step or during the final save must not end the run
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    state["child"] = subprocess.Popen([sys.executable, "-m", "lora_booth", *words])
    signal.signal(signal.SIGUSR1, relay)
    signal.signal(signal.SIGUSR2, relay)
    if state["asked"] or os.getppid() != server:  # asked to stop, or the server died, before train started
        forward(signal.SIGTERM, None)
    code = state["child"].wait()
    if code < 0:  # the same death for the worker to read (SIGKILL: the out-of-memory killer, most often)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
