"""Datasets: folders of photos (with captions and masks beside them) under workspace/datasets/.
An upload is untrusted: its name is reduced to a plain file name, only photos, captions and masks
are taken, sizes and counts are capped, and each file is checked with the rules `train` applies
(decoded, aspect bounded, captions UTF-8) under a temporary name before it is renamed into place,
so a refused or interrupted upload leaves nothing behind."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from ..config.sections import IMAGE_SUFFIXES
from ..data import files, masks
from ..io import atomic
from ..io.errors import DataError
from .workspace import Workspace, checked_name

MAX_FILE_BYTES = 20 * 2**20
MAX_FILES_PER_DATASET = 500
MAX_FILES_PER_UPLOAD = 100
MAX_UPLOAD_BYTES = MAX_FILES_PER_UPLOAD * 2**20 + 16 * 2**20   # a whole request, checked before it is read
CAPTION_SUFFIXES = files.CAPTION_SUFFIXES
THUMBNAIL_PX = 192


def kind_of(name: str) -> str:
    """photo, mask or caption; anything else is refused."""
    lower = name.lower()
    if masks.is_mask_name(Path(lower)):
        return "mask"
    if masks.looks_like_mask(Path(lower)):
        raise DataError(f"{name}: a mask is read from a PNG only: save it as {name[:-len(Path(name).suffix)]}.png")
    suffix = Path(lower).suffix
    if suffix in IMAGE_SUFFIXES:
        return "photo"
    if suffix in CAPTION_SUFFIXES:
        return "caption"
    raise DataError(f"{name}: not a photo ({', '.join(IMAGE_SUFFIXES)}), a caption ({', '.join(CAPTION_SUFFIXES)}) "
                    f"nor a mask (photo{masks.MASK_SUFFIX}); only those are stored")


def upload_name(raw: str) -> str:
    """A browser's file name reduced to its last part, then held to the plain-name rule."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    return checked_name(base, "file")


def names(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.datasets.iterdir() if p.is_dir() and not p.is_symlink()
                  and not p.name.startswith("."))


def create(ws: Workspace, name: str) -> Path:
    folder = ws.dataset_dir(name)
    folder.mkdir(exist_ok=True)
    return folder


def existing(ws: Workspace, name: str) -> Path:
    folder = ws.dataset_dir(name)
    if not folder.is_dir() or folder.is_symlink():
        raise DataError(f"no dataset called {name!r}: create it first")
    return folder


def photos(ws: Workspace, name: str) -> list[dict]:
    """Each photo with its caption text and whether a mask lies beside it."""
    folder = existing(ws, name)
    listed = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.is_symlink():
            continue
        try:
            if kind_of(path.name) != "photo":
                continue
        except DataError:
            continue
        caption = files.caption_for(path, ".txt")
        text = ""
        if caption is not None:
            try:
                text = files.read_caption(caption)
            except DataError:
                text = ""
        listed.append({"name": path.name, "caption": text, "mask": masks.mask_file(path).is_file()})
    return listed


def store(ws: Workspace, dataset: str, raw_name: str, data: bytes) -> str:
    """One uploaded file, checked and stored whole, or a DataError naming the file and the reason."""
    folder = existing(ws, dataset)
    name = upload_name(raw_name)
    kind = kind_of(name)
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{name}: {len(data):,} bytes, over the {MAX_FILE_BYTES // 2**20} MiB a file may have")
    present = sum(1 for p in folder.iterdir() if not p.name.startswith("."))
    if present >= MAX_FILES_PER_DATASET and not (folder / name).exists():
        raise DataError(f"{name}: the dataset holds {present} files already, the most it may")
    final = folder / name
    if final.is_symlink() or (final.exists() and not final.is_file()):
        raise DataError(f"{name}: a file of that name exists and is not a plain file")
    with atomic.atomic_path(final, len(data)) as temporary:
        temporary.write_bytes(data)
        try:
            if kind == "caption":
                files.read_caption(temporary)
            else:
                files.load_rgb(temporary)
        except DataError as error:
            raise DataError(str(error).replace(str(temporary), name)) from None
    return name


def set_caption(ws: Workspace, dataset: str, photo: str, text: str) -> None:
    """The caption beside a photo (photo.txt); an empty text removes it, so instance_prompt applies."""
    folder = existing(ws, dataset)
    photo = checked_name(photo, "photo")
    if kind_of(photo) != "photo" or not (folder / photo).is_file():
        raise DataError(f"{photo}: no such photo in {dataset}")
    caption = (folder / photo).with_suffix(".txt")
    if caption.is_symlink():
        raise DataError(f"{caption.name}: a link, not a caption file")
    if len(text.encode()) > files.MAX_CAPTION_BYTES:
        raise DataError(f"the caption is {len(text.encode()):,} bytes; at most {files.MAX_CAPTION_BYTES:,}")
    if text.strip():
        atomic.write_text(caption, text.strip() + "\n")
    else:
        caption.unlink(missing_ok=True)


def thumbnail(ws: Workspace, dataset: str, photo: str) -> bytes:
    """A small PNG of a photo or mask, decoded with train's rules."""
    folder = existing(ws, dataset)
    path = folder / checked_name(photo, "photo")
    if kind_of(path.name) == "caption" or path.is_symlink():
        raise DataError(f"{photo}: not an image")
    image = files.load_rgb(path)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
