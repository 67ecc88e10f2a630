"""Reading files from elsewhere: what must hold before anything opens one."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DataError


def regular_file(path: Path) -> None:
    """Refuse pipes, sockets and devices before anything opens them (a FIFO blocks a reader for ever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror}). Check the file and its permissions.") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a pipe, socket or device); lora-booth reads only image and "
                        "caption files. Move it out of the folder.")
