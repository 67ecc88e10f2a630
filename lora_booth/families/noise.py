"""What a denoiser is trained on at one step: each row's noise and time, drawn from its own
generator, and the target the family's base model predicts (ε or v for DDPM; rectified flow's σ).
The families ask for these; the loss that compares prediction and target is model/objective.py."""
from __future__ import annotations

import torch
from torch import Tensor

from ..config.sections import ObjectiveConfig


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
