"""The DreamBooth objective: denoising loss on instance rows + λ · the same on class rows
(Ruiz et al. 2023, §3.3), with the ε or v target the base model was trained for, the timestep
distribution and the per-element loss (MSE or the scheduled pseudo-Huber of Khrapov et al. 2024)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ObjectiveConfig


class Losses(NamedTuple):
    total: Tensor      # what is back-propagated
    instance: Tensor   # detached, for logging
    prior: Tensor      # detached, for logging; 0 without prior preservation


def sample_noise(latents: Tensor, num_train_timesteps: int, generators: list[torch.Generator],
                 cfg: ObjectiveConfig | None = None) -> tuple[Tensor, Tensor]:
    """Gaussian noise like `latents` and one timestep per row (objective.timesteps), row i drawn
    from generators[i] on the CPU: reproducible across devices, batch layouts and processes, so a
    resumed or distributed run draws exactly what a single uninterrupted one would. The noise is
    drawn before the timestep, so every distribution sees the same noise."""
    cfg = cfg or ObjectiveConfig()
    return _noise_then_time(latents, generators, cfg, lambda g: draw_timestep(g, num_train_timesteps, cfg))


def _noise_then_time(latents: Tensor, generators: list[torch.Generator], cfg: ObjectiveConfig,
                     draw_time) -> tuple[Tensor, Tensor]:
    """Each row's Gaussian noise (+ noise offset), then its time by `draw_time(generator)`, from the
    row's own generator; stacked onto the latents' device."""
    noises, times = [], []
    for row, generator in zip(latents, generators):  # row: (C, h, w)
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32)
        if cfg.noise_offset:
            # offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness
            noise = noise + cfg.noise_offset * torch.randn((row.shape[0], 1, 1), generator=generator)
        noises.append(noise)
        times.append(draw_time(generator))
    return torch.stack(noises).to(latents.device, latents.dtype), torch.stack(times).to(latents.device)


def draw_timestep(generator: torch.Generator, num_train_timesteps: int, cfg: ObjectiveConfig) -> Tensor:
    """One timestep t ∈ {0, …, T−1} (T = num_train_timesteps; larger t, more noise):
    uniform       t ~ U{0, …, T−1}, torch.randint's draw (the numbers of every run before the
                  other two existed)
    logit_normal  t = ⌊sigmoid(m + s·z)·T⌋, z ~ N(0, 1) (Esser et al. 2024, §3.1): the middle
                  timesteps more often than either end; m > 0 leans noisier
    shifted       t = ⌊T · shift·u / (1 + (shift − 1)·u)⌋, u ~ U[0, 1): SD3's time shift of a
                  uniform draw; shift > 1 moves draws toward more noise, shift = 1 is uniform
    The real-valued draws are float64, and t is clamped to T−1 where u rounds to 1."""
    if cfg.timesteps in ("uniform", "auto"):  # auto: the DDPM families' own, uniform
        return torch.randint(0, num_train_timesteps, (), generator=generator)
    if cfg.timesteps == "logit_normal":
        z = torch.randn((), generator=generator, dtype=torch.float64)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    elif cfg.timesteps == "shifted":
        u = torch.rand((), generator=generator, dtype=torch.float64)
        u = cfg.timestep_shift * u / (1 + (cfg.timestep_shift - 1) * u)
    else:
        raise ValueError(f"unknown timestep distribution {cfg.timesteps!r}")
    return torch.floor(u * num_train_timesteps).clamp(max=num_train_timesteps - 1).long()


def sample_flow_noise(latents: Tensor, generators: list[torch.Generator], cfg: ObjectiveConfig,
                      resolution_shift: float) -> tuple[Tensor, Tensor]:
    """Flow matching's counterpart of sample_noise: each row's Gaussian noise (and noise offset)
    and then its σ ∈ [0, 1] (flow_sigma), from the row's own CPU generator."""
    return _noise_then_time(latents, generators, cfg, lambda g: flow_sigma(g, cfg, resolution_shift))


def flow_sigma(generator: torch.Generator, cfg: ObjectiveConfig, resolution_shift: float) -> Tensor:
    """One noise level σ of rectified flow (0: the image, 1: pure noise), float32:
    auto          σ = shift(sigmoid(m + s·z)), z ~ N(0, 1), shift(u) = k·u/(1 + (k − 1)·u) with k the
                  base's time shift (FLUX.1-dev's exp(μ): e^0.5 = 1.65 at 256 px, e^1.15 = 3.16 at
                  1024 px; schnell's fixed 1.0 at every size), sd-scripts' flux_shift sampling
    logit_normal  σ = sigmoid(m + s·z) (Esser et al. 2024, §3.1), unshifted
    uniform       σ = u ~ U[0, 1)
    shifted       σ = shift(u) with k = objective.timestep_shift, u ~ U[0, 1)
    m, s = objective.logit_mean, logit_std. Draws are float64 and clamped below 1."""
    if cfg.timesteps in ("auto", "logit_normal"):
        z = torch.randn((), generator=generator, dtype=torch.float64)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    elif cfg.timesteps in ("uniform", "shifted"):
        u = torch.rand((), generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep distribution {cfg.timesteps!r}")
    k = {"auto": resolution_shift, "shifted": cfg.timestep_shift}.get(cfg.timesteps, 1.0)
    return (k * u / (1 + (k - 1) * u)).clamp(max=1 - 1e-6).float()


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
