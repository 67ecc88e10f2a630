"""The DreamBooth objective: denoising loss on instance rows + λ · the same on class rows
(Ruiz et al. 2023, §3.3), with the ε or v target the base model was trained for, the timestep
distribution and the per-element loss (MSE or the scheduled pseudo-Huber of Khrapov et al. 2024)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.sections import ObjectiveConfig


class Losses(NamedTuple):
    total: Tensor      # what is back-propagated
    instance: Tensor   # detached, for logging
    prior: Tensor      # detached, for logging; 0 without prior preservation


def snr_weights(scheduler, timesteps: Tensor, gamma: float) -> Tensor | None:
    """Min-SNR-γ weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v.
    None when γ = 0 (plain mean of squares)."""
    if not gamma:
        return None
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def huber_c(scheduler, timesteps: Tensor, cfg: ObjectiveConfig) -> Tensor | None:
    """The pseudo-Huber c_t of each row (B,) for loss=huber/smooth_l1, None for mse. With
    c = objective.huber_c, T = num_train_timesteps and ᾱ_t the scheduler's cumulative alphas, as
    Khrapov et al. 2024 schedule it and sd-scripts and diffusers' scripts compute it:
    constant     c_t = c
    exponential  c_t = exp(−t · ln(1/c) / T) = c^(t/T): 1 at t = 0, c at t = T
    snr          c_t = (1 − c)/(1 + σ_t)² + c, σ_t = √((1 − ᾱ_t)/ᾱ_t): 1 at σ = 0, → c as σ grows
    Both schedules keep the nearly clean timesteps quadratic (fine detail) and give the noisy
    ones, where an odd photo pulls the composition, the robust linear tail."""
    if cfg.loss == "mse":
        return None
    if cfg.huber_schedule == "constant":
        return torch.full(timesteps.shape, cfg.huber_c, device=timesteps.device)
    if cfg.huber_schedule == "exponential":
        rate = math.log(1 / cfg.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float())
    if cfg.huber_schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        return (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c
    raise ValueError(f"unknown huber schedule {cfg.huber_schedule!r}")


def elementwise_loss(pred: Tensor, target: Tensor, kind: str = "mse", c: Tensor | None = None) -> Tensor:
    """ρ(r) of each residual r = ŷ − y, in fp32:
    mse        r²
    huber      2c(√(r² + c²) − c)   pseudo-Huber: ≈ r² for |r| ≪ c, ≈ 2c|r| for |r| ≫ c
    smooth_l1  2(√(r² + c²) − c)    the same divided by c: ≈ r²/c near 0, ≈ 2|r| far out
    with c (B,) one value per row (huber_c). √(r² + c²) − c is computed as r²/(√(r² + c²) + c),
    the same number without the cancellation that loses small residuals in fp32."""
    # in fp16 the squares of small residuals underflow to zero: upcast before squaring
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float(), reduction="none")
    if kind not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss {kind!r}")
    squared = (pred.float() - target.float()) ** 2
    c = c.float().view(-1, *[1] * (pred.ndim - 1))
    robust = 2 * squared / (torch.sqrt(squared + c ** 2) + c)   # 2(√(r² + c²) − c)
    return c * robust if kind == "huber" else robust


def dreambooth_loss(pred: Tensor, target: Tensor, is_prior: Tensor, prior_weight: float,
                    weights: Tensor | None = None, loss: str = "mse", c: Tensor | None = None,
                    mask: Tensor | None = None) -> Losses:
    """mean ρ(ŷ − y) on instance rows + λ · the same on class rows (Ruiz et al. 2023, §3.3), ρ the
    square unless objective.loss says otherwise (elementwise_loss). One UNet call serves both
    kinds of row. `is_prior` (B,) marks the class rows, so the result never depends on the order
    the rows were stacked in. `weights` (B,) are min-SNR weights, `c` (B,) huber_c's. `mask`
    (B, 1, h, w), the masked loss's element weights w (mask_weights; data.masks), turns each
    row's mean into Σ w·ρ / Σ w: normalised by the weights' sum, so a row's loss does not
    shrink with the subject's area; class rows are never masked."""
    elements = elementwise_loss(pred, target, loss, c)
    if mask is None:
        per_row = elements.mean(dim=tuple(range(1, pred.ndim)))
    else:
        per_row = masked_mean(elements, torch.where(is_prior.view(-1, *[1] * (mask.ndim - 1)), 1.0, mask.float()))
    if weights is not None:
        per_row = per_row * weights
    # masked means rather than boolean indexing: no data-dependent shapes, so no GPU→CPU sync,
    # and the planner can trace the same function on fake tensors
    prior_rows = is_prior.to(per_row.dtype)
    instance_rows = 1 - prior_rows
    # each term is 0 when its rows are absent: a batch of class rows alone (train.split_prior) has no instance term
    instance = (per_row * instance_rows).sum() / instance_rows.sum().clamp(min=1)
    prior = (per_row * prior_rows).sum() / prior_rows.sum().clamp(min=1)
    return Losses(instance + prior_weight * prior, instance.detach(), prior.detach())


def mask_weights(masks: Tensor | None, unmasked_weight: float, device=None) -> Tensor | None:
    """The masked loss's element weights w = mask + unmasked_weight · (1 − mask), from masks
    (B, 1, h, w) in [0, 1] (1: the subject; data.masks), on `device`. None without masks."""
    if masks is None:
        return None
    masks = masks.to(device) if device is not None else masks
    return masks + unmasked_weight * (1 - masks)


def masked_mean(elements: Tensor, weights: Tensor) -> Tensor:
    """Σ w·ρ / Σ w per row, w (B, 1, h, w) shared by the channels. A crop that holds no subject
    and no background weight has Σ w = 0 and a loss of 0, not 0/0."""
    weights = weights.expand_as(elements)
    dims = tuple(range(1, elements.ndim))
    return (elements * weights).sum(dim=dims) / weights.sum(dim=dims).clamp(min=torch.finfo(torch.float32).tiny)


def add(parts: list[Losses]) -> Losses:
    """The step's losses from passes over disjoint rows (instance rows, then class rows)."""
    if len(parts) == 1:
        return parts[0]
    return Losses(*(sum(value.detach() for value in values) for values in zip(*parts)))


def mean(steps: list[Losses]) -> Losses:
    """An optimizer step's losses: the mean over its micro-batches (gradient accumulation), which
    is what the accumulated gradient is the gradient of."""
    if len(steps) == 1:
        return steps[0]
    return Losses(*(torch.stack([value.detach() for value in values]).mean() for values in zip(*steps)))
