"""Where a photo lands in a training image: the crop or bucket placement, drawn reproducibly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Placement:
    """Where a training crop comes from: the upright image resized (LANCZOS) to `resized` so it
    covers `size` = (width, height), the crop's top-left corner, and whether it is mirrored. The
    photo and its loss mask (data.masks) go through the same `apply`, so every mask pixel stays on
    its photo pixel through resizing, crops, flips and buckets."""
    original: tuple[int, int]   # (width, height) of the upright image
    resized: tuple[int, int]
    left: int
    top: int
    size: tuple[int, int]
    flip: bool

    def apply(self, image: Image.Image) -> Image.Image:
        if self.resized != image.size:
            image = image.resize(self.resized, Image.LANCZOS)
        image = image.crop((self.left, self.top, self.left + self.size[0], self.top + self.size[1]))
        return image.transpose(Image.FLIP_LEFT_RIGHT) if self.flip else image

    @property
    def conditioning(self) -> tuple[int, ...]:
        """SDXL's size conditioning: (original height, original width, crop top, crop left, target
        height, target width), the crop measured in the image as the model sees it (mirrored when
        flipped)."""
        left = self.resized[0] - self.size[0] - self.left if self.flip else self.left
        return (self.original[1], self.original[0], self.top, left, self.size[1], self.size[0])


def place(image_size: tuple[int, int], size: tuple[int, int], crop: str, generator: torch.Generator | None,
          flip: bool) -> Placement:
    """The Placement of an image of `image_size` cut to `size`: centred, or (crop=random, with a
    generator) at a corner drawn from it, left then top."""
    target_w, target_h = size
    width, height = image_size
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    spare_x, spare_y = resized[0] - target_w, resized[1] - target_h
    if crop == "random" and generator is not None:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    else:
        left, top = spare_x // 2, spare_y // 2
    return Placement(tuple(image_size), resized, left, top, tuple(size), flip)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) pixels in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def fit_crop(image: Image.Image, size: tuple[int, int], crop: str, generator: torch.Generator | None,
             flip: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Resize (LANCZOS) so the image covers `size` = (width, height), cut that out, optionally
    mirror (place). Returns (3, H, W) pixels in [-1, 1] and SDXL's size conditioning."""
    placement = place(image.size, size, crop, generator, flip)
    return to_pixels(placement.apply(image)), placement.conditioning
