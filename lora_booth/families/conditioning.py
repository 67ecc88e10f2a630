"""What the denoiser is conditioned on, as every family fills it in (families/*.py: encode)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    hidden: torch.Tensor                # (B, L, D): the text states the denoiser attends to
    pooled: torch.Tensor | None = None  # (B, P): a pooled text embedding, for families that use one
    # (B, L) bool: which of the L text states are the prompt's, for families whose denoiser or
    # pipeline drops the padding (Qwen3/Qwen2.5-VL encoders); None where every state is read
    mask: torch.Tensor | None = None

    def to(self, device, dtype) -> "Conditioning":
        return Conditioning(self.hidden.to(device, dtype),
                            None if self.pooled is None else self.pooled.to(device, dtype),
                            None if self.mask is None else self.mask.to(device))
