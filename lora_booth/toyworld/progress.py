"""The toy world's DreamBooth scores read off a run's own sample grids, step by step: how often the
trigger prompt's row shows the subject, and how often the class prompt's row still shows the
class's shape (and how often the subject instead: drift). The report plots them over training,
with the base model's grid (samples/base.png) as the start, so a user sees when prior
preservation starts to matter. The grids hold a few seeds per prompt (sample.num), so these are
coarse rates; `lora-booth eval` and tools/eval_toyworld.py measure with 32 seeds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import rates, world


@dataclass
class Point:
    step: int            # 0: the base model (samples/base.png)
    subject: float | None      # trigger row: fraction showing the subject
    class_shape: float | None  # class row: fraction the detector reads as the class's shape
    drift: float | None        # class row: fraction showing the subject


def rows_of(sheet: Path, prompts: list[str], columns: int) -> dict[str, np.ndarray]:
    """prompt → its row's images (n, h, w, 3) uint8, cut from the grid PNG."""
    from PIL import Image

    with Image.open(sheet) as image:
        array = np.asarray(image.convert("RGB"))
    height, width = array.shape[0] // len(prompts), array.shape[1] // columns
    return {prompt: np.stack([array[r * height:(r + 1) * height, c * width:(c + 1) * width] for c in range(columns)])
            for r, prompt in enumerate(prompts)}


def score(sheet: Path, prompts: list[str], columns: int, step: int, trigger_prompt: str, class_prompt: str,
          class_shape: str = rates.CLASS_SHAPE) -> Point:
    rows = rows_of(sheet, prompts, columns)
    subject = rates.subject_hit_rate(rows[trigger_prompt]) if trigger_prompt in rows else None
    stats = rates.class_stats(rows[class_prompt], class_shape) if class_prompt in rows else None
    return Point(step, subject, stats["shape"] if stats else None, stats["drift"] if stats else None)


def class_shape_of(class_prompt: str) -> str | None:
    """The toy world's shape a class prompt names ("a photo of a star" → star), or None."""
    words = class_prompt.lower().replace(",", " ").split()
    return next((shape for shape in world.SHAPES if shape in words), None)
