"""The DreamBooth objective: denoising loss on instance rows + λ · the same on class rows
(Ruiz et al. 2023, §3.3), with the ε or v target the base model was trained for."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Losses(NamedTuple):
    total: Tensor      # what is back-propagated
    instance: Tensor   # detached, for logging
    prior: Tensor      # detached, for logging; 0 without prior preservation


def sample_noise(latents: Tensor, num_train_timesteps: int, generators: list[torch.Generator],
                 noise_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Gaussian noise like `latents` and one uniform timestep per row, row i drawn from
    generators[i] on the CPU: reproducible across devices, batch layouts and processes, so a
    resumed or distributed run draws exactly what a single uninterrupted one would."""
    noises, timesteps = [], []
    for row, generator in zip(latents, generators):  # row: (4, H/8, W/8)
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32)
        if noise_offset:
            # offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness
            noise = noise + noise_offset * torch.randn((row.shape[0], 1, 1), generator=generator)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_train_timesteps, (), generator=generator))
    return torch.stack(noises).to(latents.device, latents.dtype), torch.stack(timesteps).to(latents.device)


def denoising_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """ε for ε-prediction models (SD 1.x, SD 2.x-base), v = α·ε − σ·x₀ for v-prediction (SD 2.x 768).
    Training a v model on an ε target runs without error and silently ruins it."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


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


def dreambooth_loss(pred: Tensor, target: Tensor, is_prior: Tensor, prior_weight: float,
                    weights: Tensor | None = None) -> Losses:
    """mean‖ŷ − y‖² on instance rows + λ · the same on class rows (Ruiz et al. 2023, §3.3).
    One UNet call serves both kinds of row. `is_prior` (B,) marks the class rows, so the
    result never depends on the order the rows were stacked in."""
    # in fp16 the squares of small residuals underflow to zero: upcast before squaring
    per_row = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
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
