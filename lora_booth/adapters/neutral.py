"""The neutral adapter: per module, ΔW = (alpha / rank) · up @ down, whatever file it came from.
DoRA adds a magnitude per output row (peft, LyCORIS) or per input column (A1111's and OneTrainer's
files); LoHa/LoKr modules (model/lycoris.py) take the place of `Module`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .. import families
from ..io.errors import AdapterError
from ..model import lycoris


DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = (*families.denoisers(), *families.text_parts())


@dataclass
class Module:
    down: torch.Tensor    # (rank, in_features) — peft's lora_A, kohya's lora_down; convolutions (rank, in, kh, kw)
    up: torch.Tensor      # (out_features, rank) — peft's lora_B, kohya's lora_up; convolutions (out, rank, 1, 1)
    alpha: float
    magnitude: torch.Tensor | None = None   # DoRA: one per output row (peft's lora_magnitude_vector), or per input
    magnitude_axis: str = "out"             # "out" (peft, LyCORIS) or "in" (A1111's and OneTrainer's DoRA files)

    @property
    def kind(self) -> str:
        return "lora" if self.magnitude is None else "dora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def update_shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.flatten(1).shape[1]

    def numel(self) -> int:
        return self.down.numel() + self.up.numel() + (0 if self.magnitude is None else self.magnitude.numel())

    def delta(self) -> torch.Tensor:
        """ΔW = (alpha / rank) · up @ down, in fp32. For DoRA only the direction's update: the
        weight's change also depends on the base weight (see `apply`)."""
        return self.scale * (self.up.float().flatten(1) @ self.down.float().flatten(1))

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The adapted weight (fp32). DoRA (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output
        row, as peft merges it (per input column for an input-axis file, as A1111 reads one); a
        strength s ≠ 1 moves s of the way from W to W', as ComfyUI and A1111 apply a multiplier
        to a DoRA file."""
        delta = self.delta().reshape(weight.shape)
        if self.magnitude is None:
            return weight + strength * delta
        directed = weight.float() + delta
        if self.magnitude_axis == "out":
            norm = directed.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        else:
            norm = directed.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        full = self.magnitude.float().reshape(norm.shape) / norm * directed
        return weight + strength * (full - weight)

    def rescaled(self, factor: float, alpha: float) -> "Module":
        """The same ΔW with `factor` multiplied into up and `alpha` in place of the old one (fold_scale)."""
        return replace(self, up=lycoris.scaled(self.up, factor), alpha=alpha)

    def dora_scale_shape(self) -> tuple[int, ...]:
        """dora_scale as LyCORIS writes it: (out, 1) for a linear layer, (out, 1, 1, 1) for a
        convolution, or (1, in[, 1, 1]) on the input axis. A (out, 1) scale on a 4-D weight
        broadcasts to (out, out, 1, 1) in ComfyUI and Forge without an error."""
        ones = [1] * (self.down.ndim - 2)
        if self.magnitude_axis == "out":
            return (self.magnitude.numel(), 1, *ones)
        return (1, self.magnitude.numel(), *ones)


@dataclass
class Adapter:
    """Adapters by (part, module path in diffusers/transformers dotted naming)."""
    modules: dict[tuple[str, str], Module]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = ""
    family_hint: str = ""  # "sdxl" when the file's own names say so (kohya's lora_te1_/input_blocks names)

    def parts(self) -> list[str]:
        return sorted({part for part, _ in self.modules})

    def family(self) -> str:
        """The family the adapter fits (families.for_adapter): the parts it adapts, and the width
        its UNet's cross-attention input (attn2.to_k) or first text encoder takes, which is the
        family's text width (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL). Other widths (the
        toy world, test models): what the trainer recorded, if anything. A family the file's own
        kohya names prove (family_hint) comes first."""
        if self.family_hint:
            return self.family_hint
        parts = set(self.parts())
        owner = families.for_adapter_modules([path for part, path in self.modules if part != "unet"])
        if owner is not None:  # names only one family has (FLUX.2's single blocks)
            return owner.name
        recorded = families.get(self.metadata.get("lora_booth.family", ""))
        if recorded is not None and recorded.denoiser != "unet" and recorded.denoiser in parts:
            return recorded.name  # several families adapt a `transformer`: the one the trainer recorded
        paths, named = [path for _, path in self.modules], self.metadata.get("lora_booth.family", "")
        # the UNet's cross-attention input is the family's whole text width (SDXL: both encoders,
        # 2048); a text encoder's own width (SDXL's first: 768) is only the fallback
        for wanted in (("unet", "attn2.to_k"), ("text_encoder", "q_proj")):
            for (part, path), module in self.modules.items():
                if part == wanted[0] and path.endswith(wanted[1]):
                    known = families.for_adapter(parts, module.update_shape()[1], paths, named)
                    if known:
                        return known.name
        known = families.for_adapter(parts, None, paths, named)
        if known:
            return known.name
        return self.metadata.get("lora_booth.family", "unknown")


def canonical_path(part: str, path: str) -> str:
    """Text-encoder paths keep CLIP's `text_model.` level, which transformers ≥ 5.6 flattened
    away: files written with it load everywhere, and kohya's names include it."""
    if part.startswith("text_encoder") and not path.startswith("text_model."):
        return "text_model." + path
    return path


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (tensor if dtype is None else tensor.to(dtype)).detach().cpu().contiguous()


def adapter_kind(modules) -> str:
    """lora, dora, loha or lokr: the one kind of every module (a file holds one kind)."""
    kinds = {m.kind for m in modules}
    if len(kinds) > 1:
        raise AdapterError(f"the adapter mixes module kinds {sorted(kinds)}; one file holds one kind")
    return next(iter(kinds), "lora")
