"""One lora-booth process per output: an exclusive advisory lock (flock) on a lock file
beside what it writes. The kernel drops the lock when the process dies, SIGKILL included, so a
crashed run never leaves a stale lock behind; a second process is refused at once, told who holds it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import LoraBoothError

LOCK_NAME = ".lora-booth.lock"


class LockedError(LoraBoothError):
    """Another lora-booth process is writing the same output."""


def lock_path_for(output: Path) -> Path:
    """The lock file sits beside the output (a run folder or a file), so nothing appears inside
    an output that does not exist yet, and removing it leaves nothing behind."""
    output = Path(os.path.abspath(Path(output).expanduser()))
    return output.parent / f".{output.name}{LOCK_NAME}"


@contextlib.contextmanager
def exclusive(output: str | os.PathLike, verb: str) -> Iterator[None]:
    """Hold the lock of `output` for the block. The lock file is removed on release; a process
    that opened it meanwhile notices the file was replaced and locks the new one instead."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then the user's to keep
        yield
        return
    path = lock_path_for(Path(output))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(f"{output}: another lora-booth process ({holder}) is writing there. Wait for it to "
                              "finish, or choose another output.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the one that is there now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, lora-booth {verb}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "process unknown"
