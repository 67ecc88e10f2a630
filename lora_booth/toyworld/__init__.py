"""The toy world: synthetic captioned shape images, a classical detector for them, and the tiny
Stable-Diffusion-architecture pipeline pretrained on them (see tools/pretrain_toyworld.py)."""

import os
from pathlib import Path

from .detector import Detection, accuracy, clean_accuracy, detect
from .world import COLOURS, SHAPES, BACKGROUNDS, TRIGGER_WORDS, Scene, caption, eval_prompts, generate, render

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "Detection",
    "SHAPES",
    "Scene",
    "TRIGGER_WORDS",
    "accuracy",
    "caption",
    "clean_accuracy",
    "detect",
    "eval_prompts",
    "generate",
    "render",
    "toy_base_dir",
]


def toy_base_dir() -> Path:
    """The pretrained toy base pipeline shipped in the package (``toyworld/base/``).
    ``LORA_BOOTH_TOY_BASE`` points it elsewhere (e.g. a snapshot of a running pretraining)."""
    override = os.environ.get("LORA_BOOTH_TOY_BASE")
    return Path(override) if override else Path(__file__).parent / "base"
