"""The DreamBooth subject of the toy world: a four-pointed star that pretraining never shows.

Every world image is one plain shape from {circle, square, triangle, star}, and its stars always
have five points. The subject is *an orange four-pointed star* (a "sparkle": four thin arms, inner
radius 0.4 of the outer). No image of the world has that outline, so the base model can only draw
it by chance, and a model that draws it on "a photo of a sks star" has learnt it from the instance
photos.

Why not a two-colour star? The toy VAE was trained on single-colour shapes only; it decodes a
blue star with a yellow centre (or a half/half star, or a hollow star) into a washed-out blob, so
no UNet could ever produce such a subject through it. A new single-colour outline it reconstructs
faithfully (mean abs. error 6.6/255 on the shipped photos' kind of image), so the subject is
learnable by the UNet adapters alone, as DreamBooth-LoRA intends.

``generate_subject`` draws instance photos deterministically from a seed (random position, size,
rotation and background, like world images); ``is_subject`` checks an image with the detector's
machinery (background from the border, soft coverage, analysis-by-synthesis), with the four-pointed
star added to the candidate shapes: the subject is the best-matching shape and its colour is orange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import detector, world

SHAPE = "star4"  # the subject's outline, beside world.SHAPES
COLOUR = "orange"
CLASS_SHAPE = "star"  # its class in the world
DESCRIPTION = f"an {COLOUR} four-pointed star"
POINTS = 4
INNER = 0.4  # inner/outer radius ratio: thin arms, far from a square's or a 5-point star's outline
SCALE = 1.15  # like world stars: drawn a little bigger than its circumradius

# Backgrounds of the shipped instance photos (DreamBooth photos show the subject in varied settings).
SAMPLE_BACKGROUNDS = ("white", "gray", "pink", "black")
SAMPLE_SEED = 2024


@dataclass(frozen=True)
class SubjectScene:
    background: str
    cx: float
    cy: float
    radius: float
    angle: float
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]


def unit_outline(angle: float = 0.0) -> np.ndarray:
    """Vertices (8, 2) of the four-pointed star at circumradius 1 (times ``SCALE``), rotated."""
    thetas = np.deg2rad(-90.0 + 180.0 / POINTS * np.arange(2 * POINTS) + angle)
    radii = np.where(np.arange(2 * POINTS) % 2 == 0, 1.0, INNER)
    return np.stack([radii * np.cos(thetas), radii * np.sin(thetas)], axis=1) * SCALE


def subject_mask(cx: float, cy: float, radius: float, angle: float, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage (size, size) of the subject's outline, drawn like ``world.shape_mask``."""
    big = size * world._SUPERSAMPLE
    points = unit_outline(angle) * radius * big + np.array([cx * big, cy * big])
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def sample_subject_scene(rng: np.random.Generator, background: str | None = None) -> SubjectScene:
    """A random placement of the subject, drawn like world scenes (large, fully inside the frame)."""
    if background is None:
        background = list(world.BACKGROUNDS)[rng.integers(len(world.BACKGROUNDS))]
    cx, cy, radius, angle = world.placement(rng, (0.32, 0.38), SCALE)
    return SubjectScene(
        background=background,
        cx=cx,
        cy=cy,
        radius=radius,
        angle=angle,
        colour_rgb=world._jitter(world.COLOURS[COLOUR], rng, 12),
        background_rgb=world._jitter(world.BACKGROUNDS[background], rng, 12),
    )


def render_subject(scene: SubjectScene, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """The subject as an RGB uint8 array (size, size, 3)."""
    coverage = subject_mask(scene.cx, scene.cy, scene.radius, scene.angle, size)[..., None]
    image = coverage * np.array(scene.colour_rgb, np.float32) + (1.0 - coverage) * np.array(scene.background_rgb, np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_subject(n: int, seed: int = SAMPLE_SEED, backgrounds: tuple[str, ...] | None = None,
                     size: int = world.IMAGE_SIZE) -> np.ndarray:
    """``n`` subject images (n, size, size, 3) uint8, deterministic in ``seed``; backgrounds cycle
    through ``backgrounds`` when given, else are random."""
    rng = np.random.default_rng(seed)
    scenes = [sample_subject_scene(rng, backgrounds[i % len(backgrounds)] if backgrounds else None) for i in range(n)]
    return np.stack([render_subject(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)


def sample_images() -> np.ndarray:
    """The 4 instance photos shipped in ``lora_booth/samples/toystar/`` (see samples/toystar.md)."""
    return generate_subject(len(SAMPLE_BACKGROUNDS), SAMPLE_SEED, SAMPLE_BACKGROUNDS)


def write_samples(folder) -> list:
    """Write ``sample_images()`` as toystar-0.png ... into ``folder``; returns the paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(sample_images()):
        path = folder / f"toystar-{i}.png"
        Image.fromarray(image, mode="RGB").save(path, optimize=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

_UNIT_AREA = world.polygon_area(unit_outline())
_PERIOD = 360.0 / POINTS


@dataclass(frozen=True)
class SubjectCheck:
    is_subject: bool
    shape: str | None  # best-matching outline among world.SHAPES and "star4"; None: no object
    colour: str | None
    score: float  # soft IoU of the best outline
    star4_score: float  # soft IoU of the best four-pointed-star rendering

    def __bool__(self) -> bool:
        return self.is_subject


def _star4_score(coverage: np.ndarray) -> float:
    """Best soft IoU of a four-pointed star re-rendered at the coverage's centroid (rotations and
    radii searched like the detector does for world shapes)."""
    size = coverage.shape[0]
    area = float(coverage.sum()) / (size * size)
    ys, xs = np.mgrid[0:size, 0:size]
    cx = float((coverage * (xs + 0.5)).sum() / coverage.sum()) / size
    cy = float((coverage * (ys + 0.5)).sum() / coverage.sum()) / size
    radius = math.sqrt(area / _UNIT_AREA)
    best = 0.0
    for factor in detector._RADIUS_FACTORS:
        for step in range(detector._ANGLE_STEPS):
            template = subject_mask(cx, cy, radius * factor, _PERIOD * step / detector._ANGLE_STEPS, size)
            best = max(best, detector._soft_iou(coverage, template))
    return best


def check_subject(image) -> SubjectCheck:
    """Analyse one image for the subject (see ``is_subject``), with the numbers behind the verdict."""
    array = detector._as_float_rgb(image)
    found = detector.detect(array)
    if found.shape is None:
        return SubjectCheck(False, None, None, 0.0, 0.0)
    coverage, _, _ = detector._coverage(array)
    star4 = _star4_score(coverage)
    shape, score = (SHAPE, star4) if star4 > found.shape_score else (found.shape, found.shape_score)
    return SubjectCheck(shape == SHAPE and found.colour == COLOUR, shape, found.colour, score, star4)


def is_subject(image) -> bool:
    """Whether ``image`` (PIL image or (H, W, 3) array) shows the subject: of the world's shapes and
    the four-pointed star, the four-pointed star matches the object's outline best, and it is orange."""
    return check_subject(image).is_subject


def subject_accuracy(n: int = 200, seed: int = 77) -> dict[str, float]:
    """The check's hit rate on ``n`` fresh subject images, on ``n`` ordinary world images, and on
    the hardest world images: orange shapes (stars and squares above all)."""
    subjects = generate_subject(n, seed)
    images, _, scenes = world.generate(n, seed)
    more, _, more_scenes = world.generate(4 * n, seed + 1)
    orange = [image for image, scene in zip(more, more_scenes) if scene.colour == COLOUR]
    return {
        "subject": float(np.mean([is_subject(i) for i in subjects])),
        "world": float(np.mean([is_subject(i) for i in images])),
        "orange_world": float(np.mean([is_subject(i) for i in orange])) if orange else 0.0,
        "n": n,
        "n_orange_world": len(orange),
    }
