"""What the rectified-flow families share (FLUX.1, FLUX.2 klein, Z-Image, Qwen-Image): the
straight line from image to noise, σ ∈ (0, 1) as time, and FlowMatchEulerDiscreteScheduler for
training's schedule and for sampling. How each samples σ (its shift) and calls its transformer
stays in its own module."""
from __future__ import annotations

import torch

from .base import Family


class RectifiedFlowFamily(Family):
    def training_scheduler(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def sampler(self, noise_scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def noisy_and_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, time: torch.Tensor):
        """Rectified flow (Liu et al. 2022; Esser et al. 2024): x_σ = (1 − σ)·x₀ + σ·ε on the straight
        line from the image to the noise, and the velocity along it, dx/dσ = ε − x₀, as target."""
        sigma = time.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def planned_time(self, scheduler, rows: int) -> torch.Tensor:
        return torch.rand(rows)

    def timestep_index(self, scheduler, time: torch.Tensor) -> torch.Tensor:
        return time * scheduler.config.num_train_timesteps
