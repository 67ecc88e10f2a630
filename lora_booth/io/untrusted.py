"""Reading a file lora-booth did not just write (a run folder handed to `report`, a checkpoint's
state.json on resume, a grid's PNG): it may be a pipe, huge, cut short, not UTF-8, or hold JSON of
any shape. Everything here opens only regular files, reads at most a cap, and turns every way the
content can be wrong into an error that names the file."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import DataError

MiB = 2**20
MAX_STEP = 10**12  # optimizer steps: more than any run makes, small enough for every float and int64


class UntrustedFileError(DataError):
    """A file read back that is not what lora-booth wrote there."""


def shown_path(path: Path | str) -> str:
    """A path as text that prints and encodes anywhere: bytes that are not UTF-8 (kept by Python as
    surrogate escapes) are written as \\xNN instead of failing the write of a page or a message."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8") \
        if _has_surrogates(os.fsdecode(path)) else os.fsdecode(path)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= character <= "\udcff" for character in text)


def clean_text(text: str) -> str:
    """`text` with any surrogate escapes (undecodable bytes of a file name) spelled \\xNN."""
    if not _has_surrogates(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_regular(path: Path, cap: int, fix: str = "") -> os.stat_result:
    """stat (never open) `path`: a regular file of at most `cap` bytes, else a named error. A pipe is
    refused before it is opened, since opening one blocks until someone writes to it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UntrustedFileError(f"{shown_path(path)}: no such file{'. ' + fix if fix else ''}") from None
    except OSError as exc:
        raise UntrustedFileError(f"{shown_path(path)}: cannot be read ({exc.strerror}). Check the path and its "
                                 "permissions.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else \
            "a socket or device"
        raise UntrustedFileError(f"{shown_path(path)}: is {kind}, not a regular file. "
                                 f"{fix or 'Replace it with the file lora-booth expects there, or remove it.'}")
    if info.st_size > cap:
        raise UntrustedFileError(f"{shown_path(path)}: is {info.st_size:,} bytes; lora-booth reads at most {cap:,} "
                                 f"here. {fix or 'It is not a file lora-booth wrote: remove or replace it.'}")
    return info


def read_bytes(path: Path, cap: int) -> bytes:
    """At most `cap` bytes of a regular file. O_NONBLOCK: should the file be swapped for a pipe
    between the stat and the open, the open does not hang; fstat then refuses it."""
    check_regular(path, cap)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UntrustedFileError(f"{shown_path(path)}: cannot be read ({exc.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UntrustedFileError(f"{shown_path(path)}: is not a regular file")
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise UntrustedFileError(f"{shown_path(path)}: grew past {cap:,} bytes while being read")
    return data


def read_text(path: Path, cap: int) -> str:
    data = read_bytes(path, cap)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(f"{shown_path(path)}: is not UTF-8 text (byte {exc.start}). It is not a file "
                                 "lora-booth wrote: remove or replace it.") from None


def parse_json(text: str, where: str) -> Any:
    """JSON from a file, with its failures (bad syntax, nesting deep enough to exhaust the stack)
    as named errors."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UntrustedFileError(f"{where}: nests deeper than any file lora-booth writes") from None
    except ValueError as exc:
        raise UntrustedFileError(f"{where}: not valid JSON ({exc}). Delete it or write it again.") from None


def read_json(path: Path, cap: int, kind: type = dict) -> Any:
    """A JSON file whose top level must be a `kind` (a mapping unless told)."""
    value = parse_json(read_text(path, cap), shown_path(path))
    if not isinstance(value, kind):
        raise UntrustedFileError(f"{shown_path(path)}: holds a JSON {type(value).__name__}, not the "
                                 f"{'mapping' if kind is dict else kind.__name__} lora-booth writes there")
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_fields(record: dict, fields: dict[str, tuple[type, ...]], where: str) -> None:
    """Each listed key, when present, has one of its types (numbers are int or float, never bool)."""
    for key, kinds in fields.items():
        if key not in record or record[key] is None:
            continue
        value = record[key]
        fits = is_number(value) if kinds == (float,) else \
            isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not fits:
            wanted = "a number" if kinds == (float,) else " or ".join(k.__name__ for k in kinds)
            raise UntrustedFileError(f"{where}: {key} is {str(value)[:60]!r}, not {wanted}. It is not what "
                                     "lora-booth wrote: delete the file or write it again.")
