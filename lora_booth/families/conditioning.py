"""What the denoiser is conditioned on, as every family fills it in (families/*.py: encode)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    hidden: torch.Tensor                # (B, 77, D): cross-attention context
    pooled: torch.Tensor | None = None  # (B, P): a pooled text embedding, for families that use one

    def to(self, device, dtype) -> "Conditioning":
        return Conditioning(self.hidden.to(device, dtype),
                            None if self.pooled is None else self.pooled.to(device, dtype))
