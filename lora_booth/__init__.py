"""lora-booth: DreamBooth (Ruiz et al. 2023) with LoRA adapters for Stable Diffusion."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, resolve  # noqa: E402
from .errors import ConfigError, DataError, LoraBoothError, ModelError  # noqa: E402


def train(cfg: Config, report=print):
    """Train a DreamBooth LoRA; returns the path of the saved diffusers adapter."""
    from .recipe import train as _train
    return _train(cfg, report=report)


__all__ = ["Config", "ConfigError", "DataError", "LoraBoothError", "ModelError", "resolve", "train", "__version__"]
