"""Optimizer and learning-rate schedule. The learning rate is a pure function of the step, so a
resumed run needs no scheduler state to continue on the same curve."""
from __future__ import annotations

import logging
import math

import torch

from .config import OptimConfig
from .errors import ConfigError


def build_optimizer(params: dict[str, list[torch.nn.Parameter]], cfg: OptimConfig,
                    effective_batch: int = 1) -> torch.optim.Optimizer:
    scale = effective_batch if cfg.scale_lr else 1  # opt-in only: never rescaled behind the user's back
    groups = [{"params": params["unet"], "lr": cfg.lr * scale, "initial_lr": cfg.lr * scale, "name": "unet"}]
    for part in ("text_encoder", "text_encoder_2"):  # SDXL has two
        if part in params:
            lr = (cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr) * scale
            groups.append({"params": params[part], "lr": lr, "initial_lr": lr, "name": part})
    kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        return adamw8bit_class()(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def adamw8bit_class():
    # bitsandbytes logs a warning about GPU kernels at import on CPU-only machines; its 8-bit
    # Adam runs there anyway, so the warning would only alarm users
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError("optim.optimizer", f"is adamw8bit, but bitsandbytes cannot be imported ({exc})",
                          "pip install bitsandbytes, or set optim.optimizer=adamw") from None
    return bitsandbytes.optim.AdamW8bit


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step that follows `step` steps done."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
