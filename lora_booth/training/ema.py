"""Exponential moving average of the trained tensors (adapters, and pivotal embeddings when they
train), through diffusers' EMAModel. Its decay warms up as (1 + n) / (10 + n) up to train.ema,
so early steps are not dominated by the initial weights. The average is what gets saved."""
from __future__ import annotations

import contextlib

import torch

SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def make(decay: float, parameters: list[torch.nn.Parameter]):
    """An EMAModel over `parameters`, or None when decay is 0 (off)."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay)


def state(average) -> tuple[dict[str, torch.Tensor], dict]:
    """Shadow tensors (for safetensors) and the counters (for JSON): what an exact resume needs."""
    values = average.state_dict()
    tensors = {f"shadow.{index:05d}": t.detach().cpu().contiguous() for index, t in enumerate(values["shadow_params"])}
    return tensors, {name: values[name] for name in SCALARS}


def restore(average, tensors: dict[str, torch.Tensor], scalars: dict, device: torch.device) -> None:
    shadow = [tensors[name] for name in sorted(tensors)]
    if len(shadow) != len(average.shadow_params) or any(a.shape != b.shape for a, b in zip(shadow, average.shadow_params)):
        raise ValueError(f"the checkpoint's EMA holds {len(shadow)} tensors, this run trains {len(average.shadow_params)}")
    average.load_state_dict({**scalars, "shadow_params": [t.to(device) for t in shadow]})


@contextlib.contextmanager
def averaged(average, parameters: list[torch.nn.Parameter]):
    """The trained tensors hold their average inside the block and their own values after it:
    what a checkpoint's shareable adapter is written from while training goes on. No-op when off."""
    if average is None:
        yield
        return
    average.store(parameters)
    average.copy_to(parameters)
    try:
        yield
    finally:
        average.restore(parameters)


def copy_to(average, parameters: list[torch.nn.Parameter]) -> None:
    """Replace the trained tensors by their average (the final adapter is the EMA one)."""
    average.copy_to(parameters)
