"""One lora-booth process per output: an exclusive advisory lock (flock) on a lock file
beside what it writes. The kernel drops the lock when the process dies, SIGKILL included, so a
crashed run never leaves a stale lock behind; a second process is refused at once, told who holds it."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from .errors import LoraBoothError

LOCK_NAME = ".lora-booth.lock"


class LockedError(LoraBoothError):
    """Another lora-booth process is writing the same output."""


def lock_path_for(output: Path) -> Path:
    """The lock file sits beside the output (a run folder or a file), so nothing appears inside
    an output that does not exist yet, and removing it leaves nothing behind. It is keyed by where
    the output really is (symlinks resolved): the same folder reached by another path takes the
    same lock."""
    output = Path(os.path.abspath(Path(output).expanduser()))
    # a folder is written into through any symlink to it: its real place is the key. A file is
    # replaced where it is named (a symlink there is replaced, not followed): its folder's real place
    real = Path(os.path.realpath(output)) if output.is_dir() else Path(os.path.realpath(output.parent)) / output.name
    return real.parent / f".{real.name}{LOCK_NAME}"


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
    folder = _lock_folder(Path(output), fcntl)  # the output folder itself, by inode: any path to it
    while True:
        try:  # never through a symlink planted under the lock's name: truncating it would hit its target
            fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666)
        except OSError as exc:
            _release_folder(folder)
            raise LockedError(f"{path}: cannot open lora-booth's lock file there ({exc.strerror or exc}); a "
                              "symlink or folder under that name is not lora-booth's: remove it, or choose "
                              "another output.") from None
        if not _is_regular(fd):
            os.close(fd)
            _release_folder(folder)
            raise LockedError(f"{path}: is not a lock file of lora-booth's (not a regular file). Remove it, or "
                              "choose another output.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            _release_folder(folder)
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
        _release_folder(folder)


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def _lock_folder(output: Path, fcntl) -> int | None:
    """An output that is an existing folder is locked by its own inode too, so the same folder
    reached through a bind mount or another mount path (where the lock files beside it differ)
    is refused as busy as well. None for a file output or a folder not made yet."""
    try:
        fd = os.open(output.expanduser(), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system that cannot lock folders
            return None                                          # (NFS): the lock file beside it still holds
        holder = _read_holder_beside(output)
        raise LockedError(f"{output}: another lora-booth process ({holder}) is writing there (the same folder, "
                          "reached by another path). Wait for it to finish, or choose another output.") from None
    return fd


def _release_folder(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


def _read_holder_beside(output: Path) -> str:
    """Who holds a folder: the lock file its holder wrote beside that folder, if it can be read."""
    try:
        fd = os.open(lock_path_for(output), os.O_RDONLY | NOFOLLOW)
    except OSError:
        return "process unknown"
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "process unknown"
