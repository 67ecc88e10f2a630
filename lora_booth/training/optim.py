"""Optimizer and learning-rate schedule. The learning rate is a pure function of the step, so a
resumed run needs no scheduler state to continue on the same curve. Every optimizer comes from a
maintained library (torch, bitsandbytes, prodigyopt, transformers); this module only builds the
parameter groups and passes the settings through."""
from __future__ import annotations

import logging
import math

import torch

from .. import families
from ..config.sections import OptimConfig
from ..io.errors import ConfigError


def build_optimizer(params: dict[str, list[torch.nn.Parameter]], cfg: OptimConfig, effective_batch: int = 1,
                    up: frozenset[int] = frozenset(), part_lrs: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """One group per part (the denoiser, text encoders, pivotal embeddings ...), each adapter part split in two under LoRA+
    (`up` holds the ids of the lora_B matrices). `part_lrs` gives a part its own peak rate."""
    groups = parameter_groups(params, cfg, effective_batch, up, part_lrs or {})
    if cfg.optimizer == "prodigy":
        return _prodigy(groups, cfg)
    if cfg.optimizer == "adafactor":
        return _adafactor(groups, cfg)
    kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        return adamw8bit_class()(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def parameter_groups(params: dict[str, list[torch.nn.Parameter]], cfg: OptimConfig, effective_batch: int,
                     up: frozenset[int], part_lrs: dict[str, float]) -> list[dict]:
    """The peak rate of each group lives in "initial_lr": set_learning_rate multiplies it by the
    schedule's factor every step, so LoRA+'s ratio between the A and B groups survives the schedule."""
    scale = effective_batch if cfg.scale_lr else 1  # opt-in only: never rescaled behind the user's back
    text_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr
    rates = {**{part: cfg.lr for part in families.denoisers()}, **{part: text_lr for part in families.text_parts()}}
    rates.update(part_lrs)
    groups = []
    for part, tensors in params.items():
        lr = rates.get(part, cfg.lr) * scale
        if cfg.loraplus_ratio and part in adapter_parts():  # adapters, not embeddings
            # LoRA+ (Hayou et al. 2024): B (the up projection, initialised at zero) learns ratio × faster
            ups = [p for p in tensors if id(p) in up]
            rest = [p for p in tensors if id(p) not in up]
            if not ups:
                raise ConfigError("optim.loraplus_ratio", f"is {cfg.loraplus_ratio:g}, but the {part} adapters have "
                                  "no lora_B matrices", "LoRA+ needs LoRA adapters; set optim.loraplus_ratio=0")
            groups.append({"params": rest, "lr": lr, "initial_lr": lr, "name": part})
            up_lr = lr * cfg.loraplus_ratio
            groups.append({"params": ups, "lr": up_lr, "initial_lr": up_lr, "name": f"{part}.lora_B"})
        else:
            groups.append({"params": tensors, "lr": lr, "initial_lr": lr, "name": part})
    return groups


def adapter_parts() -> tuple[str, ...]:
    """The parts that carry adapters in any family: each denoiser by its own name (unet,
    transformer) and every text encoder. A rule written for "unet" alone silently skips FLUX.1."""
    return (*families.denoisers(), *families.text_parts())


def _prodigy(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    rates = {group["lr"] for group in groups}
    if len(rates) > 1:  # prodigyopt raises in step() otherwise; say so before any model loads
        raise ConfigError("optim.optimizer", "is prodigy, which estimates one step size for all parameters and "
                          "accepts only one lr for every group (" + ", ".join(
                              f"{g['name']} {g['lr']:g}" for g in groups) + ")",
                          "leave optim.text_encoder_lr and pivotal.lr empty and optim.loraplus_ratio=0 with prodigy")
    return Prodigy(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                   d_coef=cfg.prodigy_d_coef, safeguard_warmup=cfg.prodigy_safeguard_warmup,
                   use_bias_correction=cfg.prodigy_use_bias_correction)


def _adafactor(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # relative_step=False + an explicit lr: lora-booth's warmup and schedule (and LoRA+'s group ratios)
    # drive the rate, as with every other optimizer, instead of Adafactor's own 1/sqrt(step) rule.
    # scale_parameter=False: the rate is not multiplied by each tensor's RMS, whose near-zero value
    # for the zero-initialised lora_B would freeze it.
    return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                     weight_decay=cfg.weight_decay)


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
