"""Adapter files are untrusted input: bounded reading, and the checks every module passes before
any verb merges it into a model (finite tensors, ranks that agree, numbers where numbers belong)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io.errors import AdapterError
from .neutral import Adapter, Module


def validated(adapter: Adapter, path: Path) -> Adapter:
    """An adapter file is untrusted input: every module must have finite tensors, a positive rank
    that its halves agree on, matrix (or conv) shapes and a finite scalar alpha, before any verb
    merges it into a model (a NaN module makes black images with exit status 0)."""
    for (part, module_path), module in adapter.modules.items():
        where = f"{path}: module {part}.{module_path}"
        tensors = {name: value for name, value in vars(module).items() if isinstance(value, torch.Tensor)}
        tensors.update({f"factors.{k}": v for k, v in (getattr(module, "factors", None) or {}).items()})
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{where}: {name} holds NaN or infinite values; the file is damaged. Retrain or "
                                   "download it again")
        alpha = module.alpha
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterError(f"{where}: alpha {alpha!r} is not a finite number")
        if isinstance(module, Module):
            if module.down.ndim not in (2, 4) or module.up.ndim not in (2, 4):
                raise AdapterError(f"{where}: down {tuple(module.down.shape)} and up {tuple(module.up.shape)} are not "
                                   "matrices or convolution kernels")
            if module.down.shape[0] < 1 or module.up.shape[1] != module.down.shape[0]:
                raise AdapterError(f"{where}: the rank of down {tuple(module.down.shape)} and up "
                                   f"{tuple(module.up.shape)} disagree (or is 0)")
            if module.magnitude is not None:
                axis_size = module.up.shape[0] if module.magnitude_axis == "out" else module.down.shape[1]
                if module.magnitude.numel() != axis_size:
                    raise AdapterError(f"{where}: its DoRA magnitude has {module.magnitude.numel()} values for "
                                       f"{axis_size} {'outputs' if module.magnitude_axis == 'out' else 'inputs'}")
        check_alpha(alpha, module, where)  # after the shapes: the ratio needs a rank
    return adapter


# alpha / rank is the strength each module is applied with (LyCORIS's full LoKr ignores alpha).
# Real files stay within 1/64 … 16; beyond these bounds a file is damaged or hostile, and merging it
# would write weights scaled by millions.
MAX_ALPHA_RATIO = 256.0


MIN_ALPHA_RATIO = 1e-4


def check_alpha(alpha: float, module, where: str) -> None:
    """One rule for every family and file layout: alpha must be positive. kohya's trainer reads an
    alpha of 0 as alpha = rank while ComfyUI and diffusers apply it as strength 0, so a file with
    alpha 0 means two different things; lora-booth refuses it rather than guess."""
    if alpha == 0:
        raise AdapterError(f"{where}: alpha is 0, which kohya's trainer reads as alpha = rank and ComfyUI and "
                           "diffusers as strength 0 (no effect). lora-booth does not guess: re-save the file with "
                           "the alpha it was trained with (kohya: network_alpha, usually the rank)")
    if alpha < 0:
        raise AdapterError(f"{where}: alpha is {alpha:g}; a negative alpha inverts the update. Re-save the file "
                           "with a positive alpha, and use a negative strength (lora=FILE:-0.5) to subtract it")
    ratio = module.scale
    if not MIN_ALPHA_RATIO <= ratio <= MAX_ALPHA_RATIO:
        raise AdapterError(f"{where}: alpha {alpha:g} at rank {module.rank} scales the update by {ratio:g}, outside "
                           f"{MIN_ALPHA_RATIO:g} … {MAX_ALPHA_RATIO:g} (trained files use 1/64 … 16). The file is "
                           "damaged or mislabelled: fix its alpha tensors or metadata")


def _scalar(value: torch.Tensor, where: str) -> float:
    """An `.alpha` tensor: one finite number."""
    if value.numel() != 1:
        raise AdapterError(f"{where}: alpha has shape {tuple(value.shape)}; it must be one number")
    number = float(value.float().item())
    if not math.isfinite(number):
        raise AdapterError(f"{where}: alpha is {number}; it must be a finite number")
    return number


def check_adapter_file(path: Path) -> None:
    """An adapter is opened only when it is a regular file: opening a pipe would block forever."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file") from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot be read ({exc.strerror}). Check the path and its permissions.") from None
    if not stat.S_ISREG(mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket or device" if not stat.S_ISDIR(mode) else \
            "a folder without an adapter"
        raise AdapterError(f"{path}: is {kind}, not an adapter file. Give the .safetensors file itself (a pipe or "
                           "device is never opened), or a run or checkpoint folder")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    check_adapter_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # truncated, header-bombed, not safetensors at all
        raise AdapterError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}). "
                           "Download or write it again.") from None


def _mapping(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"the adapter's metadata has {key} of type {type(value).__name__}; it must be a mapping")
    return value


def _number(value, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AdapterError(f"the adapter's metadata has {key} {str(value)[:60]!r}, not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise AdapterError(f"the adapter's metadata has {key} {number}; it must be a positive number")
    return number


def _rank(value, key: str) -> int:
    number = _number(value, key)
    if not number.is_integer():
        raise AdapterError(f"the adapter's metadata has {key} {number}; a rank is a whole number")
    return int(number)
