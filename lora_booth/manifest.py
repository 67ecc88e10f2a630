"""The record of what a run wrote into its output folder, so that lora-booth removes only its own
files: `overwrite=true` deletes the entries listed here and nothing else, whatever else the user
keeps in that folder (issue #22). One relative path per line, appended as each file lands."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import WriteError

NAME = ".lora-booth-files"
MAX_BYTES = 16 * 2**20   # a run writes some thousands of files at most; a bigger list is not ours


class Manifest:
    def __init__(self, root: Path) -> None:
        self.root_as_given = Path(root)
        self.root = Path(root).resolve()
        self.path = self.root / NAME
        self.known = set(self.entries())

    def entries(self) -> list[str]:
        """Relative paths, as recorded; entries that would leave the folder are dropped (the file is
        data a user could have edited, so never trusted to point elsewhere)."""
        try:
            status = os.lstat(self.path)  # a symlink in its place is not a record lora-booth wrote
            if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_BYTES:
                return []
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if line and _inside(line)]

    def record(self, path: Path) -> None:
        """Note `path` (a file or a folder lora-booth created) as this run's."""
        relative = self.relative(path)
        if relative is None or relative in self.known or relative == NAME:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666)
        with open(fd, "a", encoding="utf-8") as handle:
            handle.write(relative + "\n")
        self.known.add(relative)

    def relative(self, path: Path) -> str | None:
        """`path` relative to the run folder, judged where it really lies (its folder's symlinks
        resolved, the name itself not followed); None when that is outside the run folder."""
        located = real_location(path)
        if located == self.root:
            return "."
        try:
            return located.relative_to(self.root).as_posix()
        except ValueError:
            return None

    def owns(self, path: Path) -> bool:
        return self.relative(path) in self.known

    def remove_recorded(self) -> list[Path]:
        """Delete every recorded file, then every recorded folder left empty, then the record itself.
        Files lora-booth did not write stay, and so do the folders that hold them."""
        removed = []
        paths = sorted({self.root / entry for entry in self.entries()}, key=lambda p: len(p.parts), reverse=True)
        for path in paths:
            if self.relative(path) in (None, "."):  # through a symlinked folder to elsewhere: never
                continue
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode):
                    if not any(path.iterdir()):
                        path.rmdir()
                        removed.append(path)
                else:  # a file, or a symlink (the link goes, never what it points to)
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
        self.path.unlink(missing_ok=True)
        self.known = set()
        return removed


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def real_location(path: Path) -> Path:
    """Where `path` really lies: its folder with every symlink resolved, then its own name (which
    is never followed, so a symlink planted there is judged as the link it is)."""
    absolute = Path(os.path.abspath(path))
    return Path(os.path.realpath(absolute.parent)) / absolute.name


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


def ours(path: Path) -> bool:
    """Whether `path` is listed in the record of the run folder it lies in (active or on disk)."""
    located = real_location(path)
    if any(m.owns(located) for m in _active):
        return True
    return any(Manifest(folder).owns(located) for folder in (located.parent, *located.parent.parents)
               if (folder / NAME).is_file() and not (folder / NAME).is_symlink())


def note(path: Path) -> None:
    """Record `path` in the manifest of the active run folder that holds it, if any."""
    for manifest in _active:
        if manifest.relative(path) is not None:
            manifest.record(path)


def claim(path: Path) -> None:
    """Before lora-booth writes `path` inside an active run folder: refuse when something it did
    not write is there (a user's README.md or config.yaml that happens to carry one of lora-booth's
    names, a planted symlink), else record it as the run's, before the write, so a process killed
    right after the rename still knows the file as its own."""
    located = real_location(path)
    for manifest in _active:
        if manifest.relative(located) is None:
            continue
        if os.path.lexists(located) and not manifest.owns(located):
            raise WriteError(f"{path}: exists and lora-booth did not write it (it is not listed in "
                             f"{manifest.path}), so it is left as it is. Move it out of the folder, or choose "
                             "another output folder.")
        manifest.record(located)
    if not _active:
        return
    absolute = Path(os.path.abspath(path))
    for manifest in _active:  # spelled inside a run folder but lying elsewhere (a symlinked folder)
        spelled = Path(os.path.abspath(manifest.root_as_given)) if manifest.root_as_given else None
        if spelled and spelled in absolute.parents and manifest.relative(located) is None:
            raise WriteError(f"{path}: its folder is a symlink to {located.parent}, outside the run folder "
                             f"{manifest.root}; lora-booth writes only inside the run folder. Remove the link.")


def check_replaceable(path: Path, what: str = "it", head_mark: bytes | None = None) -> None:
    """For a verb that writes a fixed name into a folder it did not make (`report` → report.html,
    `eval` → eval.json): a file already there is replaced only when lora-booth's record lists it,
    or (in a folder without a record) when it is a regular file that begins as lora-booth's do:
    `head_mark` within its first 4 KiB."""
    if not os.path.lexists(path) or ours(path):
        return
    if head_mark is not None and not os.path.islink(path) and os.path.isfile(path):
        try:
            with open(path, "rb") as handle:
                if head_mark in handle.read(4096):
                    return
        except OSError:
            pass
    raise WriteError(f"{path}: exists and lora-booth did not write it (no record of lora-booth's lists it), so "
                     f"it is left as it is. Move it away, then write {what} again.")


def note_on_disk(path: Path) -> None:
    """Record `path` in the record of the run folder it was written into, when that folder has one
    (so the next `report`/`eval` may replace it, and overwrite=true removes it)."""
    folder = real_location(path).parent
    record = folder / NAME
    if record.is_file() and not record.is_symlink():
        Manifest(folder).record(path)
