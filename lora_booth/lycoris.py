"""LoHa and LoKr adapters (the LyCORIS family, trained through peft) in lora-booth's neutral form,
and their tensor names in the two layouts people share:

- peft/diffusers: `<part>.<module path>.hada_w1_a` … / `.lokr_w1` …, the peft config as metadata.
- LyCORIS/kohya (AUTOMATIC1111, Forge, ComfyUI): `lora_unet_<module with _>.hada_w1_a` …, `.alpha`.

Both layouts hold the same matrices in the same orientation (peft copied LyCORIS's). Scaling:
- LoHa: ΔW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), r = w1_b.shape[0], in peft and LyCORIS alike.
- LoKr: ΔW = s · w1 ⊗ w2 with w1 = w1_a @ w1_b and w2 = w2_a @ w2_b where decomposed. peft always
  uses s = alpha / r; LyCORIS readers (ComfyUI, A1111, diffusers' converter) use s = alpha / r only
  when a factor is decomposed and s = 1 when both are full. `LoKr` keeps LyCORIS's rule, so a file
  written from it loads at the trained strength everywhere; `from_peft` bakes peft's scale into w2
  for the full-full case.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_KEYS = ("hada_t1", "hada_t2", "lokr_t2")


@dataclass
class LoHa:
    """Hadamard product of two rank-r pairs (FedPara, Hyeon-Woo et al. 2022; LyCORIS)."""
    w1_a: torch.Tensor    # (out_features, rank)
    w1_b: torch.Tensor    # (rank, in_features)
    w2_a: torch.Tensor    # (out_features, rank)
    w2_b: torch.Tensor    # (rank, in_features)
    alpha: float
    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def update_shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(LOHA_KEYS, (self.w1_a, self.w1_b, self.w2_a, self.w2_b)))

    def delta(self) -> torch.Tensor:
        """ΔW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), in fp32."""
        f = [t.float() for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)]
        return self.scale * ((f[0] @ f[1]) * (f[2] @ f[3]))

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        return weight + strength * self.delta().reshape(weight.shape)

    def rescaled(self, factor: float, alpha: float) -> "LoHa":
        """The same ΔW with `factor` multiplied into w1_a and `alpha` in place of the old one
        (formats.fold_scale)."""
        return replace(self, w1_a=scaled(self.w1_a, factor), alpha=alpha)


@dataclass
class LoKr:
    """Kronecker product of two factors, either of which may itself be low rank (LyCORIS)."""
    factors: dict[str, torch.Tensor]   # lokr_w1 or lokr_w1_a/_b; lokr_w2 or lokr_w2_a/_b
    alpha: float
    rank: int
    kind = "lokr"

    @property
    def decomposed(self) -> bool:
        return "lokr_w1_a" in self.factors or "lokr_w2_a" in self.factors

    @property
    def scale(self) -> float:
        # LyCORIS's rule, which every reader of the file format applies
        return self.alpha / self.rank if self.decomposed else 1.0

    def _w(self, which: str) -> torch.Tensor:
        if which in self.factors:
            return self.factors[which].float()
        return self.factors[which + "_a"].float() @ self.factors[which + "_b"].float()

    def update_shape(self) -> tuple[int, int]:
        w1, w2 = self._w("lokr_w1"), self._w("lokr_w2")
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.flatten(1).shape[1]

    def numel(self) -> int:
        return sum(t.numel() for t in self.factors.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.factors)

    def delta(self) -> torch.Tensor:
        """ΔW = s · w1 ⊗ w2, in fp32, as a matrix (out, in·kh·kw). A convolution's w2 is 4-D
        (o, i, kh, kw); LyCORIS, ComfyUI and A1111 give w1 two trailing unit dims before the
        product, which equals the product with w2 flattened to (o, i·kh·kw). Multiplied with
        the 4-D w2 as it stands, torch.kron pads w1 in front instead: a wrong update (issue 16)."""
        return self.scale * torch.kron(self._w("lokr_w1"), self._w("lokr_w2").flatten(1))

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        return weight + strength * self.delta().reshape(weight.shape)

    def rescaled(self, factor: float, alpha: float) -> "LoKr":
        """The same ΔW with `factor` multiplied into w1 (or w1_a) and `alpha` in place of the old one
        (formats.fold_scale)."""
        which = "lokr_w1" if "lokr_w1" in self.factors else "lokr_w1_a"
        return LoKr({**self.factors, which: scaled(self.factors[which], factor)}, alpha, self.rank)


def scaled(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """tensor · factor, rounded once to the tensor's dtype (exact when factor is a power of two)."""
    return (tensor.double() * factor).to(tensor.dtype)


def from_tensors(suffixes: dict[str, torch.Tensor], alpha: float | None, where: str):
    """A LoHa or LoKr module from its tensors by suffix (hada_w1_a …, lokr_w1 …) and the file's
    alpha (None: absent). Raises ValueError naming what is missing or unsupported."""
    tucker = sorted(set(suffixes) & set(TUCKER_KEYS))
    if tucker:
        raise ValueError(f"{where}: has {tucker}: Tucker-decomposed convolution adapters are not read")
    if any(k in suffixes for k in LOHA_KEYS):
        missing = [k for k in LOHA_KEYS if k not in suffixes]
        if missing:
            raise ValueError(f"{where}: a LoHa module lacks {missing}")
        rank = suffixes["hada_w1_b"].shape[0]
        return LoHa(*(suffixes[k] for k in LOHA_KEYS), alpha=float(rank if alpha is None else alpha))
    factors = {k: v for k, v in suffixes.items() if k in LOKR_KEYS}
    for which in ("lokr_w1", "lokr_w2"):
        if which not in factors and not (which + "_a" in factors and which + "_b" in factors):
            raise ValueError(f"{where}: a LoKr module needs {which} or both {which}_a and {which}_b")
    if "lokr_w2_b" in factors:
        rank = factors["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in factors:
        rank = factors["lokr_w1_b"].shape[0]
    else:  # both full: no rank in the file and no scaling (alpha is ignored by LyCORIS readers)
        rank = max(factors["lokr_w2"].shape)
        alpha = None
    return LoKr(factors, float(rank if alpha is None else alpha), rank)


def from_peft(suffixes: dict[str, torch.Tensor], rank: int, alpha: float, where: str):
    """A module from a peft state dict's tensors (adapter name removed) and peft's r and alpha."""
    module = from_tensors(suffixes, alpha, where)
    if isinstance(module, LoKr) and not module.decomposed:
        # peft scales by alpha/r even when both factors are full; LyCORIS readers scale by 1 there
        factors = dict(module.factors)
        factors["lokr_w2"] = factors["lokr_w2"] * (alpha / rank) if alpha != rank else factors["lokr_w2"]
        return LoKr(factors, float(module.rank), module.rank)
    return module


def peft_rank_alpha(module) -> tuple[int, float]:
    """The r and alpha a peft config needs to rebuild `module` with the same scale."""
    if isinstance(module, LoKr) and not module.decomposed:
        return module.rank, float(module.rank)   # scale 1, w2 already carries the scale
    return module.rank, module.alpha
