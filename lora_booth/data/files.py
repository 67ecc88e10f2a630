"""The files of a data folder: built-in sample sets, photo and caption listing, and the checks
that read untrusted photos and captions safely (regular files, size and aspect bounds)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import masks
from ..config import kohya_dataset as kohya_data
from ..config.sections import IMAGE_SUFFIXES
from ..io.errors import DataError
from ..io.reading import regular_file


CAPTION_SUFFIXES = (".txt", ".caption")  # kohya's two; data.caption_ext is looked for first
BUILTIN_PREFIX = "builtin:"


def resolve_dir(name: str) -> Path:
    if name.startswith(BUILTIN_PREFIX):
        folder = Path(str(resources.files("lora_booth") / "samples" / name[len(BUILTIN_PREFIX):]))
        if not folder.is_dir():
            raise DataError(f"{name}: no such built-in sample set (lora-booth ships builtin:dog).")
        return folder
    return Path(name).expanduser()


def list_images(folder: Path, key: str, caption_ext: str = ".txt") -> list[Path]:
    """The images of a folder, sorted. Caption files and hidden files are expected; anything
    else is a mistake worth stopping for (a HEIC from a phone, a zip, a stray document)."""
    if not folder.exists():
        raise DataError(f"{key}={folder}: no such folder. Check the path.")
    if not folder.is_dir():
        raise DataError(f"{key}={folder}: not a folder. Point it at a folder of images.")
    images = []
    captions = {caption_ext.lower(), *CAPTION_SUFFIXES}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or masks.is_mask_name(path):  # photo.mask.png: a mask
            continue
        if masks.looks_like_mask(path):
            raise DataError(f"{path}: a mask is read from a PNG only (lossless): save it as "
                            f"{path.name[:-len(path.suffix)]}.png, or rename it if it is a photo.")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or suffix in captions:
            regular_file(path)
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        elif suffix not in captions:
            raise DataError(f"{path}: not an image lora-booth reads ({', '.join(IMAGE_SUFFIXES)}) nor a caption "
                            f"({', '.join(sorted(captions))}). Convert it to JPEG or PNG, or move it out of the folder.")
    return images


def caption_for(image: Path, caption_ext: str) -> Path | None:
    """photo.jpg's caption file: photo<caption_ext>, else photo.txt or photo.caption."""
    for suffix in dict.fromkeys([caption_ext, *CAPTION_SUFFIXES]):
        if image.with_suffix(suffix).exists():
            return image.with_suffix(suffix)
    return None


def image_paths(folder: Path, key: str, caption_ext: str = ".txt") -> list[Path]:
    """The images of a folder and of its kohya `N_words/` subfolders, without their prompts."""
    return [path for path, _, _ in image_sources(folder, key, caption_ext, "", 1)]


def image_sources(folder: Path, key: str, caption_ext: str, prompt: str, repeats: int) -> list[tuple[Path, str, int]]:
    """(image, prompt without a caption, repeats) for the images of a folder and of kohya's
    `N_words/` subfolders inside it (N repeats, "words" the prompt)."""
    sources = [(path, prompt, repeats) for path in list_images(folder, key, caption_ext)]
    for sub, times, words in kohya_data.repeat_folders(folder):
        if times * repeats > kohya_data.MAX_REPEATS:  # the rows of one epoch are a list: keep it bounded
            raise DataError(f"{sub}: {times} repeats × data.repeats={repeats} is over {kohya_data.MAX_REPEATS:,} "
                            "repeats of each photo. Lower one of them.")
        sources += [(path, words, times * repeats) for path in list_images(sub, key, caption_ext)]
    return sources


# a crop of the training square out of anything narrower wastes nearly all of it, and covering the
# square first would upscale the long side without bound (1×20000 px at 512 px: 7 GB)
MAX_ASPECT = 10.0
MAX_CAPTION_BYTES = 64 * 1024


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, of a sensible size, named in every error."""
    regular_file(path)
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes is not a caption (the text encoder reads 77 tokens). "
                        "Shorten it, or remove it to use instance_prompt.")
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}). Save the caption as UTF-8.") from None


def load_rgb(path: Path) -> Image.Image:
    """Decode any common image as 8-bit RGB, upright as the camera meant it. Its size and aspect
    ratio are checked from the header, before a pixel is decoded."""
    regular_file(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT:
                raise DataError(f"{path}: {width}×{height} pixels, an aspect ratio over {MAX_ASPECT:g}:1, cannot be "
                                "cropped to a training image sensibly. Crop it to the subject, or remove it.")
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise DataError(f"{path}: larger than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels (a possible "
                        "decompression bomb). Downscale it first; training uses only a few hundred pixels a side.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode this image ({exc}). Re-save it as JPEG or PNG, or remove it.") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, don't clip
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent → white, not black
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")
