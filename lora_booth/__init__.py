"""lora-booth: DreamBooth (Ruiz et al. 2023) with LoRA adapters for Stable Diffusion."""
from __future__ import annotations

from .io.version import __version__

from .config.sections import Config  # noqa: E402
from .io.errors import ConfigError, DataError, LoraBoothError, ModelError  # noqa: E402


def _quiet() -> None:
    """bitsandbytes logs at import that optional GPU/CPU kernels are missing; lora-booth needs none."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def resolve(args, check_paths: bool = False):
    """The Config from `key=value` pairs, in order (a dict or a list of pairs), and where each
    non-default value came from; preset=auto picks the preset whose plan fits the GPU."""
    from .planning.presets import resolve as _resolve
    return _resolve(args, check_paths)


def train(cfg: Config, report=print):
    """Train a DreamBooth LoRA; returns the path of the saved diffusers adapter."""
    _quiet()
    from .training.recipe import train as _train
    return _train(cfg, report=report)


def convert(source, to: str, out, allow_pickle: bool = False, overwrite: bool = False):
    """Rewrite an adapter file as diffusers or kohya; returns the written path."""
    _quiet()
    from .adapters.formats import convert as _convert
    return _convert(source, to, out, allow_pickle, overwrite)


def merge(loras, out, base=None, rank=None, dtype: str = "same", overwrite: bool = False, report=print):
    """Fuse adapters — paths ("out/", "a.safetensors:0.8") or (path, scale) pairs — into `base`
    (a diffusers folder, single file, hub id or "toyworld"), or, without a base, combine them into
    one adapter (exactly, or by SVD to `rank`)."""
    from pathlib import Path

    from .adapters import low_rank, merging as _merge
    _quiet()
    loras = [_merge.parse_weighted(str(item)) if isinstance(item, (str, Path)) else (Path(item[0]), float(item[1]))
             for item in loras]
    if base is not None:
        return _merge.fuse(_merge.base_path(str(base)), loras, Path(out), dtype, overwrite, report=report)
    return low_rank.combine(loras, Path(out), rank, overwrite, report=report)


__all__ = ["convert", "merge", "Config", "ConfigError", "DataError", "LoraBoothError", "ModelError", "resolve", "train", "__version__"]
