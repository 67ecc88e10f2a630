"""A deterministic synthetic world of captioned images: one coloured shape on a coloured background.

The world is small on purpose: 4 shapes x 6 object colours x 6 background colours, one large object
per image. Large objects matter because a tiny VAE (8x8 latents for 32 px images) blurs small ones
into blobs that neither the diffusion model nor the detector can tell apart.

Everything is driven by a ``numpy.random.Generator`` so that the same seed always yields the same
images and captions (the pretraining and the tests depend on that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Object colours: saturated and far apart in RGB so that a blurry sample is still classifiable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}

# Background colours are disjoint from the object colours, so "the colour of the object" is never
# ambiguous with "the colour of the background" (neither in captions nor for the detector).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (250, 180, 200),
    "cyan": (100, 220, 230),
    "brown": (120, 75, 40),
}

# Rare words that never occur in captions but are whole tokens of the tokenizer, so that
# DreamBooth can bind a subject to them ("a photo of sks star").
TRIGGER_WORDS: tuple[str, ...] = ("sks", "xqz", "zwx", "ohwx", "bnha")

# Extra plain words a user of the toy model is likely to type (subject descriptions, prompts).
EXTRA_WORDS: tuple[str, ...] = ("with", "and", "the", "striped", "dotted", "stripes", "dots", "pattern")

# How often each caption template is used; "class" captions ("a photo of a star") are what
# DreamBooth's prior preservation prompts look like, so they must be well represented.
CAPTION_KINDS: dict[str, float] = {
    "full": 0.45,  # a photo of a red star on a blue background
    "object": 0.25,  # a photo of a red star
    "class": 0.15,  # a photo of a star
    "class_background": 0.05,  # a photo of a star on a blue background
    "colour": 0.10,  # a photo of a red shape
}

# Size of a shape relative to its circumradius: triangles and stars cover less area than a circle
# of the same circumradius, so they are drawn a little bigger to look about equally large.
_SHAPE_SCALE = {"circle": 1.0, "square": 1.05, "triangle": 1.2, "star": 1.15}

# Star inner/outer radius ratio: fat enough that the arms survive 32 px and a small VAE.
_STAR_INNER = 0.5

# Drawing at 4x and downsampling gives anti-aliased edges, like a real (blurry) photo.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image; geometry is in fractions of the image size."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float  # circumradius before the per-shape scale
    angle: float  # degrees
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]


def unit_polygon(shape: str, angle: float = 0.0) -> np.ndarray:
    """Vertices (k, 2) of ``shape`` with circumradius 1 around the origin, rotated by ``angle`` degrees."""
    if shape == "circle":
        thetas = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        radii = np.ones_like(thetas)
    elif shape == "square":
        thetas = np.deg2rad(45.0 + 90.0 * np.arange(4))
        radii = np.ones_like(thetas)
    elif shape == "triangle":
        thetas = np.deg2rad(-90.0 + 120.0 * np.arange(3))
        radii = np.ones_like(thetas)
    elif shape == "star":
        thetas = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    thetas = thetas + math.radians(angle)
    return np.stack([radii * np.cos(thetas), radii * np.sin(thetas)], axis=1) * _SHAPE_SCALE[shape]


def polygon_area(vertices: np.ndarray) -> float:
    """Shoelace area of a simple polygon."""
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage (size, size) in [0, 1] of a shape; shared by the renderer and the detector."""
    big = size * _SUPERSAMPLE
    points = unit_polygon(shape, angle) * radius * big + np.array([cx * big, cy * big])
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def placement(rng: np.random.Generator, radius_range: tuple[float, float], scale: float) -> tuple[float, ...]:
    """Centre, radius and rotation of a large object. The whole object (with its shape's scale) stays
    inside the frame plus a small margin, so the border stays background for the detector and
    nothing is cut off. Returns (cx, cy, radius, angle)."""
    radius = float(rng.uniform(*radius_range))
    reach = radius * scale + 0.03
    cx, cy = (float(v) for v in rng.uniform(reach, 1.0 - reach, size=2))
    angle = float(rng.uniform(0.0, 360.0))
    return cx, cy, radius, angle


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    """Small per-image colour noise so the model sees a colour region, not a single RGB value."""
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: uniform shape/colour/background, large object fully inside the frame."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    cx, cy, radius, angle = placement(rng, (0.28, 0.38), _SHAPE_SCALE[shape])
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        cx=cx,
        cy=cy,
        radius=radius,
        angle=angle,
        colour_rgb=_jitter(COLOURS[colour], rng, 12),
        background_rgb=_jitter(BACKGROUNDS[background], rng, 12),
    )


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an RGB uint8 array (size, size, 3)."""
    coverage = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius, scene.angle, size)[..., None]
    image = coverage * np.array(scene.colour_rgb, np.float32) + (1.0 - coverage) * np.array(scene.background_rgb, np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, kind: str = "full") -> str:
    """The caption of ``kind`` (see ``CAPTION_KINDS``) describing ``scene``."""
    background = f" on {_article(scene.background)} {scene.background} background"
    if kind == "full":
        return f"a photo of {_article(scene.colour)} {scene.colour} {scene.shape}{background}"
    if kind == "object":
        return f"a photo of {_article(scene.colour)} {scene.colour} {scene.shape}"
    if kind == "class":
        return f"a photo of a {scene.shape}"
    if kind == "class_background":
        return f"a photo of a {scene.shape}{background}"
    if kind == "colour":
        return f"a photo of {_article(scene.colour)} {scene.colour} shape"
    raise ValueError(f"unknown caption kind {kind!r}; expected one of {tuple(CAPTION_KINDS)}")


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for ``scene`` with a template drawn from ``CAPTION_KINDS``."""
    kinds = list(CAPTION_KINDS)
    weights = np.array([CAPTION_KINDS[k] for k in kinds])
    return caption(scene, kinds[rng.choice(len(kinds), p=weights / weights.sum())])


def all_captions(scene: Scene) -> dict[str, str]:
    """Every caption kind for a scene (the training loop picks one per step)."""
    return {kind: caption(scene, kind) for kind in CAPTION_KINDS}


def generate(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` images (n, size, size, 3) uint8 with one sampled caption each, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    captions = [sample_caption(s, rng) for s in scenes]
    return images, captions, scenes


def vocabulary() -> list[str]:
    """Every word the tokenizer must know as a single token."""
    words = {"a", "an", "photo", "of", "on", "background", "shape"}
    words.update(SHAPES, COLOURS, BACKGROUNDS, TRIGGER_WORDS, EXTRA_WORDS)
    return sorted(words)


def eval_prompts() -> list[tuple[str, str, str]]:
    """The 24 prompt-following prompts (every shape x colour) as (prompt, shape, colour)."""
    return [
        (f"a photo of {_article(colour)} {colour} {shape}", shape, colour)
        for shape in SHAPES
        for colour in COLOURS
    ]


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, mode="RGB")
