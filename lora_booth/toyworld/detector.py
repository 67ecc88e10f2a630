"""A classical (training-free) detector for the toy world: which shape, which colour.

Method, in three steps, chosen to survive the blur and colour shifts of a tiny diffusion model:

1. Background colour = median of the border pixels (objects never cover most of the border).
2. Object colour = mean of the pixels farthest from the background; every pixel then gets a soft
   "coverage" by projecting it on the background->object colour line (this handles anti-aliasing
   and blur without a hard threshold). The colour label is the nearest palette colour.
3. Shape by analysis-by-synthesis: for each shape, re-render it at the coverage's centroid with
   the radius implied by the coverage's area, over a grid of rotations, and keep the shape whose
   best rendering overlaps the coverage most (soft IoU). No learned weights, so no training set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import world

# Rotational symmetry period (degrees) per shape: searching one period is enough.
_PERIOD = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0}
_ANGLE_STEPS = 12
# Relative radius refinements around the area-implied radius (blur inflates or shrinks the area).
_RADIUS_FACTORS = (0.9, 1.0, 1.1)

# Area of each shape at unit circumradius (including the per-shape drawing scale).
_UNIT_AREA = {shape: world.polygon_area(world.unit_polygon(shape)) for shape in world.SHAPES}


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None when no object stands out from the background
    colour: str | None
    shape_score: float  # soft IoU of the best re-rendered shape (0..1)
    object_rgb: tuple[float, float, float]
    background_rgb: tuple[float, float, float]


def _as_float_rgb(image) -> np.ndarray:
    """Accept a PIL image or an (H, W, 3) uint8/float array; return float32 in 0..255."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    array = array.astype(np.float32)
    if array.max() <= 1.0 + 1e-6:  # float images in 0..1
        array = array * 255.0
    return array[..., :3]


def _border(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def _coverage(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft object coverage (H, W) in [0, 1], object colour and background colour."""
    background = np.median(_border(array), axis=0)
    distance = np.linalg.norm(array - background, axis=-1)
    # The object colour is the mean of the 10 % of pixels farthest from the background: always
    # inside a large object, and robust to a few stray pixels.
    far = distance >= np.quantile(distance, 0.9)
    obj = array[far].mean(axis=0)
    axis = obj - background
    length2 = float(np.dot(axis, axis))
    if length2 < 1e-6:
        return np.zeros(array.shape[:2], np.float32), obj, background
    coverage = np.clip(((array - background) @ axis) / length2, 0.0, 1.0).astype(np.float32)
    # Refine the object colour from the pixels that are clearly object (interior, not the edge).
    interior = coverage > 0.7
    if interior.sum() >= 4:
        obj = array[interior].mean(axis=0)
    return coverage, obj, background


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(world.COLOURS)
    palette = np.array([world.COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _best_shape(coverage: np.ndarray) -> tuple[str, float]:
    """The shape whose re-rendering best overlaps ``coverage`` and its soft IoU."""
    size = coverage.shape[0]
    area = float(coverage.sum()) / (size * size)  # in fractions of the image, like world geometry
    ys, xs = np.mgrid[0:size, 0:size]
    cx = float((coverage * (xs + 0.5)).sum() / coverage.sum()) / size
    cy = float((coverage * (ys + 0.5)).sum() / coverage.sum()) / size
    best_shape, best_score = world.SHAPES[0], -1.0
    for shape in world.SHAPES:
        radius = math.sqrt(area / _UNIT_AREA[shape])
        for factor in _RADIUS_FACTORS:
            for step in range(_ANGLE_STEPS):
                angle = _PERIOD[shape] * step / _ANGLE_STEPS
                template = world.shape_mask(shape, cx, cy, radius * factor, angle, size)
                score = _soft_iou(coverage, template)
                if score > best_score:
                    best_shape, best_score = shape, score
    return best_shape, best_score


def detect(image) -> Detection:
    """Detect the (shape, colour) of one toy-world image (PIL image or (H, W, 3) array)."""
    array = _as_float_rgb(image)
    coverage, obj, background = _coverage(array)
    # An object must differ clearly from the background and cover a sensible part of the image;
    # otherwise (blank or pure-noise samples) report nothing rather than a guess.
    contrast = float(np.linalg.norm(obj - background))
    fraction = float(coverage.mean())
    if contrast < 40.0 or not 0.03 <= fraction <= 0.8:
        return Detection(None, None, 0.0, tuple(obj.tolist()), tuple(background.tolist()))
    shape, score = _best_shape(coverage)
    return Detection(shape, nearest_colour(obj), score, tuple(obj.tolist()), tuple(background.tolist()))


def accuracy(images, shapes, colours) -> dict[str, float]:
    """Fraction of ``images`` whose detected shape / colour / both match the given labels."""
    detections = [detect(image) for image in images]
    n = max(len(detections), 1)
    shape_ok = [d.shape == s for d, s in zip(detections, shapes)]
    colour_ok = [d.colour == c for d, c in zip(detections, colours)]
    return {
        "shape": sum(shape_ok) / n,
        "colour": sum(colour_ok) / n,
        "both": sum(a and b for a, b in zip(shape_ok, colour_ok)) / n,
        "n": len(detections),
    }


def clean_accuracy(n: int = 200, seed: int = 1234) -> dict[str, float]:
    """The detector's own accuracy on ``n`` clean world images (its ceiling for model samples)."""
    images, _, scenes = world.generate(n, seed)
    return accuracy(images, [s.shape for s in scenes], [s.colour for s in scenes])
