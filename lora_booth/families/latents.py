"""Between a family's VAE and the latents training sees: how pixels are encoded, and how the
VAE's latent distribution is normalised into the space the denoiser was trained in. Each family
builds one from its VAE (Family.latent_codec); the data pipeline and the sampler use it without
knowing the family. It keeps only the VAE's constants, so it outlives a VAE freed after caching."""
from __future__ import annotations

import torch


class LatentCodec:
    """The Stable Diffusion and FLUX.1 way: (z − shift_factor) · scaling_factor, or, for VAEs that
    state per-channel statistics (latents_mean/latents_std), (z − mean) / std · scaling_factor."""

    def __init__(self, vae_config) -> None:
        get = vae_config.get if hasattr(vae_config, "get") else lambda key, default=None: getattr(vae_config, key, default)
        self.channels = int(get("latent_channels", 4))
        self.scaling_factor = float(get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(get("shift_factor", None) or 0.0)
        mean, std = get("latents_mean", None), get("latents_std", None)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def distribution(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution of (B, 3, H, W) pixels in [−1, 1]: (mean, std), (B, C, h, w)."""
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        return dist.mean, dist.std

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """A sample of the VAE's distribution → the denoiser's latent space."""
        if self.mean is not None:
            return (latents - self.mean.to(latents)) / self.std.to(latents) * self.scaling_factor
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: what the VAE decodes."""
        if self.mean is not None:
            return latents / self.scaling_factor * self.std.to(latents) + self.mean.to(latents)
        return latents / self.scaling_factor + self.shift_factor

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space latents (B, C, h, w) → pixels (B, 3, H, W) in [−1, 1], in the latents' own
        dtype (the sampler decodes an fp16-unsafe VAE's in fp32)."""
        return vae.decode(self.denormalize(latents)).sample
