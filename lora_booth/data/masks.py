"""Loss masks of the instance photos (data.masks, issue #18): a grayscale `photo.mask.png` beside
`photo.jpg`, or the photo's own alpha channel; white (opaque) is the subject. data.py cuts a mask
exactly as its photo (the same Placement) and averages it down to the latent grid; the loss
weights each element by it (objective.mask_weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..io.errors import DataError
from ..io.reading import regular_file

MASK_SUFFIX = ".mask.png"   # photo.jpg → photo.mask.png


def is_mask_name(path: Path) -> bool:
    """`photo.mask.png`: a mask, never an instance photo itself."""
    return path.name.lower().endswith(MASK_SUFFIX)


def looks_like_mask(path: Path) -> bool:
    """`photo.mask.jpg` and the like: a mask in a format lora-booth does not read masks from."""
    return Path(path.stem).suffix.lower() == ".mask" and not is_mask_name(path)


def mask_file(photo: Path) -> Path:
    """The mask file of a photo: photo.jpg → photo.mask.png, beside it."""
    return photo.with_name(f"{photo.stem}{MASK_SUFFIX}")


def check_files(kind: str, photos: list[Path], warn) -> None:
    """data.masks=files needs a mask beside every photo: the missing ones are listed together.
    Mask files beside the photos while data.masks=none are worth a word: they are not used."""
    missing = [photo for photo in photos if not mask_file(photo).exists()]
    if kind == "files" and missing:
        named = ", ".join(photo.name for photo in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"data.masks=files, but {len(missing)} of {len(photos)} photos have no mask beside them "
                        f"({named}). Draw each as {mask_file(missing[0])} and so on (grayscale, white = subject, "
                        "the photo's size), remove those photos, or set data.masks=none.")
    found = len(photos) - len(missing)
    if kind == "none" and found:
        warn(f"warning: {found} photos have a {MASK_SUFFIX} beside them, which is not used while "
             "data.masks=none; set data.masks=files to weight the loss by them")


def _open(path: Path, what: str) -> Image.Image:
    regular_file(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise DataError(f"{path}: larger than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels. "
                        f"Downscale {what} first.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode this {what} ({exc}). Re-save it as a PNG, or remove it.") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def load(photo: Path, kind: str, photo_size: tuple[int, int]) -> Image.Image:
    """The mask of `photo` as an 8-bit grayscale image of the photo's upright size (`photo_size`,
    width × height): kind "files" reads photo.mask.png (a transparent pixel counts as black),
    "alpha" the photo's alpha channel. Each problem is a DataError naming the file."""
    if kind == "alpha":
        image = _open(photo, "photo")
        if not has_alpha(image):
            raise DataError(f"{photo}: has no alpha channel (data.masks=alpha reads the subject from it). Save it "
                            f"as a PNG with the background transparent, or draw {mask_file(photo).name} beside it "
                            "and set data.masks=files.")
        mask = image.convert("RGBA").getchannel("A")
        source = photo
    else:
        source = mask_file(photo)
        if not source.exists():
            raise DataError(f"{photo}: no mask {source.name} beside it (data.masks=files). Draw one (grayscale, "
                            "white = subject), or set data.masks=none.")
        image = _open(source, "mask")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if has_alpha(image):  # painted on a transparent layer: what is not painted is background
            image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
        mask = image.convert("L")
        if mask.size != photo_size:
            raise DataError(f"{source}: {mask.size[0]}×{mask.size[1]} pixels, but its photo {photo.name} is "
                            f"{photo_size[0]}×{photo_size[1]} (upright). A mask must have its photo's size: "
                            "draw it on the photo itself, or resize it to match.")
    if mask.getextrema()[1] == 0:
        raise DataError(f"{source}: the mask is black (or transparent) everywhere, so nothing of {photo.name} "
                        "would train. White marks the subject: fix or invert the mask, or remove the photo.")
    return mask


def to_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1]: 255 (white) is 1."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32)).unsqueeze(0) / 255.0


def to_latent_grid(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) → (1, h, w): each latent element gets the mean of the pixels it covers (the VAE
    downsamples by whole factors, so each cell is an exact block)."""
    return F.adaptive_avg_pool2d(mask.unsqueeze(0), latent_size)[0]
