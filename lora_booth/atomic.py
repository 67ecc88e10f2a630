"""Every file lora-booth writes appears whole or not at all: write a temporary name in the same
folder, flush it to disk, then rename over the final name (atomic on POSIX and Windows).

Temporaries carry a prefix only lora-booth uses and the writer's process id
(`.lora-booth-tmp-<pid>-<name>-<random>`), so a sweep removes what a killed lora-booth process
left and never a user's own `.tmp` files, nor a live process's work in progress. Files and folders
get the modes the user's umask gives (tempfile's 0600/0700 would hide a shared LoRA from a
ComfyUI container or a second user). A failed write (disk full, permission, read-only) is a
WriteError that names the path and the space needed, and leaves the previous file intact."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from . import manifest
from .errors import WriteError

TEMP_PREFIX = ".lora-booth-tmp-"
REASONS = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only", errno.EDQUOT: "the disk quota is exceeded"}


def write_error(path: Path, exc: BaseException, needed: int | None = None) -> WriteError:
    """One message for every failed write: what, where, why, how much room, what to do."""
    code = getattr(exc, "errno", None)
    reason = REASONS.get(code) or getattr(exc, "strerror", None) or str(exc)[:200]
    if code is None and _reports_full_disk(exc):
        reason = REASONS[errno.ENOSPC]
    message = f"{path}: cannot write it ({reason})."
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(_existing_ancestor(Path(path))).free
        message += f" {_size(free)} free on that disk" + (f", about {_size(needed)} needed" if needed else "") + "."
    error = WriteError(message + " Any previous version of the file is intact; free space or fix the permissions "
                       "(or choose another folder) and run the command again.")
    error.fact = message  # what happened, without the advice: for a caller that gives advice of its own
    return error


def _reports_full_disk(exc: BaseException) -> bool:
    """safetensors reports ENOSPC in its own words, not as an OSError."""
    return "StorageFull" in str(exc) or "No space" in str(exc)


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(folder: Path) -> None:
    """mkdir -p, noting each folder created in the active run's manifest (and only those)."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    for created in reversed(missing):  # recorded first: a process killed right after the mkdir still owns it
        manifest.note(created)
    folder.mkdir(parents=True, exist_ok=True)


def _temporary_prefix(final: Path) -> str:
    """`.lora-booth-tmp-<pid>-<name>-`: ours, whose writer sweep_stale can ask after."""
    return f"{TEMP_PREFIX}{os.getpid()}-{final.name}-"


def temporary_file(final: Path) -> Path:
    """An empty file beside `final` under a lora-booth temporary name, mode per the umask."""
    make_dirs(final.parent)
    handle, name = tempfile.mkstemp(prefix=_temporary_prefix(final), dir=final.parent)
    os.fchmod(handle, 0o666 & ~_umask())
    os.close(handle)
    return Path(name)


def temporary_dir(final: Path) -> Path:
    """An empty staging folder beside `final` under a lora-booth temporary name, mode per the umask."""
    make_dirs(final.parent)
    folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), dir=final.parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `final`; on success it becomes `final`, on error it vanishes.
    `needed` (bytes) goes into the message when the disk is full."""
    final = Path(final)
    manifest.claim(final)  # never replaces a file of the user's that happens to carry this name
    try:
        temporary = temporary_file(final)
    except OSError as exc:
        raise write_error(final, exc, needed) from None
    try:
        try:
            yield temporary
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
                os.fchmod(written.fileno(), 0o666 & ~_umask())  # writers that recreate the file pick their own mode
            os.replace(temporary, final)
        except OSError as exc:
            raise write_error(final, exc, needed) from None
        manifest.note(final)
        _fsync_dir(final.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(final: str | os.PathLike, text: str) -> None:
    with atomic_path(final, len(text.encode())) as temporary:
        temporary.write_text(text, encoding="utf-8")


def save_safetensors(final: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(final, needed) as temporary:
        try:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
        except OSError:
            raise  # atomic_path turns it into a WriteError
        except Exception as exc:  # safetensors' own error type wraps the I/O failure
            if "Io" in str(exc) or _reports_full_disk(exc):
                raise write_error(Path(final), exc, needed) from None
            raise


def publish_folder(staging: Path, final: Path) -> None:
    """Rename a finished staging folder to `final`, recording it and its files as the run's."""
    manifest.claim(final)
    try:
        os.replace(staging, final)
    except OSError as exc:
        raise write_error(final, exc) from None
    manifest.note(final)
    for path in final.rglob("*"):
        manifest.note(path)
    _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove what a killed lora-booth process left under a temporary name in `folder` (files or
    staging folders). Only names with lora-booth's prefix whose writer is gone are touched."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for stale in Path(folder).glob(f"{TEMP_PREFIX}*"):
        pid_text = stale.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
