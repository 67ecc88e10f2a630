"""The workspace folder: datasets/, runs/, logs/ and the queue's database. Every path the studio
reads or serves is resolved here and must lie inside it (symlinks followed first), so neither a
`..`, an absolute path nor a link leads a request outside."""
from __future__ import annotations

import re
from pathlib import Path

from ..io.errors import DataError

# a dataset's or an uploaded file's name: letters, digits, '.', '_', '-', ' ', not starting with '.'
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ -]{0,99}")


class OutsideWorkspace(DataError):
    """A path that would leave the workspace (or one that is not a plain name)."""


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        for folder in (self.datasets, self.runs, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def database(self) -> Path:
        return self.root / "studio.db"

    def run_dir(self, run_id: int) -> Path:
        return self.runs / f"run-{run_id}"

    def log_file(self, run_id: int) -> Path:
        # beside the run folder, not in it: train refuses an output folder holding files it did not write
        return self.logs / f"run-{run_id}.log"

    def dataset_dir(self, name: str) -> Path:
        return inside(self.datasets, checked_name(name, "dataset"))

    def user_path(self, value: str, key: str) -> Path:
        """A path a user typed for a train key: relative to the workspace, and inside it."""
        if value.startswith("~") or Path(value).is_absolute():
            raise OutsideWorkspace(f"{key}={value}: the studio reads only inside its workspace {self.root}. "
                                   "Give a path relative to it, e.g. datasets/dog")
        return inside(self.root, value, key)


def checked_name(name: str, what: str) -> str:
    """A plain file or folder name: no separators, no leading dot, no control characters."""
    if not SAFE_NAME.fullmatch(name or "") or name.strip() != name or ".." in name:
        raise DataError(f"{name[:60]!r} is not a usable {what} name: use letters, digits, '.', '_', '-' and "
                               "spaces (up to 100, not starting with '.')")
    return name


def inside(root: Path, relative: str, what: str = "path") -> Path:
    """root/relative with every link resolved, refused unless it stays inside root."""
    if "\x00" in relative:
        raise OutsideWorkspace(f"{what}: a path with a NUL byte")
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise OutsideWorkspace(f"{what} {relative[:120]!r} leads outside {root}")
    return candidate
