"""Adapters through peft — LoRA (Hu et al. 2021), DoRA, LoHa, LoKr: the only tensors the optimizer
ever sees."""
from __future__ import annotations

import contextlib

import torch

from .. import families
from ..config.sections import LoraConfig, LoraConfig as Defaults
from ..io.errors import ConfigError

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PARTS = (*families.denoisers(), *families.text_parts())  # every part any family can carry adapters on


TYPES = ("lora", "dora", "loha", "lokr")


def peft_config(rank: int, alpha: float | None, dropout: float, targets: tuple, kind: str = "lora"):
    """The peft config of one adapter kind. Each starts as an exact no-op (one factor zero), so the
    adapted model begins at the base model."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    alpha = rank if alpha is None else alpha
    if kind in ("lora", "dora"):
        # gaussian init of A, zeros for B; DoRA's magnitude starts at ‖W‖ per output row (Liu et al. 2024)
        return PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                              target_modules=list(targets), use_dora=kind == "dora")
    if kind == "loha":  # ΔW = (alpha/r)·(W1a·W1b) ⊙ (W2a·W2b), W2b zero at init (Yeh et al. 2024, LyCORIS)
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    if kind == "lokr":  # ΔW = (alpha/r)·W1 ⊗ W2, W1 zero at init; W2 low-rank when r is small enough
        return LoKrConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    raise ConfigError("lora.type", f"{kind!r} is not an adapter type", f"choose one of {', '.join(TYPES)}")


def adapter_type(model) -> str:
    """lora, dora, loha or lokr: what peft put on `model`."""
    config = model.peft_config["default"]
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    return "dora" if kind == "lora" and getattr(config, "use_dora", False) else kind


def add_adapters(base, cfg: LoraConfig, seed: int) -> dict[str, list[torch.nn.Parameter]]:
    """Adapters on the UNet's attention projections (and the text encoder's, if asked), their
    random init drawn from the run's seed. Returns the trainable parameters per part, in fp32
    whatever the base precision."""
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator
        torch.manual_seed(seed)
        return _add_adapters(base, cfg)


def _add_adapters(base, cfg: LoraConfig) -> dict[str, list[torch.nn.Parameter]]:
    kind = base.kind
    targets = targets_for(cfg, kind)
    try:
        base.unet.add_adapter(peft_config(cfg.rank, cfg.alpha, cfg.dropout, targets, cfg.type))
    except ValueError as exc:
        raise ConfigError("lora.targets", f"{list(targets)} do not name {kind.title} {kind.denoiser} modules ({exc})",
                          f"use attention projections such as {','.join(kind.default_targets)}") from None
    parts = {kind.denoiser: base.unet}
    if cfg.text_encoder:  # every text encoder of the family that takes adapters (FLUX.1: CLIP-L, not T5)
        for part in kind.trainable_text_parts():
            encoder = getattr(base, part, None)
            if encoder is not None:
                encoder.add_adapter(peft_config(cfg.text_encoder_rank or cfg.rank, cfg.alpha, cfg.dropout,
                                                TEXT_ENCODER_TARGETS, cfg.type))
                parts[part] = encoder
    params = {}
    for name, module in parts.items():
        trainable = [p for p in module.parameters() if p.requires_grad]
        for p in trainable:  # adapters train in fp32 even on a half-precision base: updates are tiny
            p.data = p.data.float()
        params[name] = trainable
    return params


def targets_for(cfg: LoraConfig, kind) -> tuple:
    """lora.targets, where its default stands for the family's own attention projections (FLUX.1:
    both block kinds, image and text streams)."""
    return kind.default_targets if tuple(cfg.targets) == Defaults.targets else tuple(cfg.targets)


def adapted_parts(base) -> dict[str, torch.nn.Module]:
    """The modules carrying adapters by part name: the denoiser under its family's name (unet,
    transformer), then the text encoders."""
    kind = base.kind
    modules = {kind.denoiser: base.unet, **{part: getattr(base, part, None) for part in kind.text_parts}}
    return {name: module for name, module in modules.items() if getattr(module, "peft_config", None)}


def trainable_state(base) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its module path: what a checkpoint must hold to resume exactly."""
    return {f"{part}.{name}": p.detach() for part, module in adapted_parts(base).items()
            for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(base, tensors: dict[str, torch.Tensor]) -> None:
    own = {f"{part}.{name}": p for part, module in adapted_parts(base).items()
           for name, p in module.named_parameters() if p.requires_grad}
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f"adapter tensors do not match: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(tensors[name])


def count(params: dict[str, list[torch.nn.Parameter]]) -> dict[str, int]:
    return {part: sum(p.numel() for p in tensors) for part, tensors in params.items()}


def up_matrices(base) -> frozenset[int]:
    """ids of the adapters' B (up) matrices, which LoRA+ trains at a higher rate."""
    return frozenset(id(p) for module in adapted_parts(base).values()
                     for name, p in module.named_parameters() if p.requires_grad and ".lora_B." in name)


@contextlib.contextmanager
def adapters_disabled(base):
    """The frozen base model: every adapter off. peft's enable_adapters sets requires_grad on each
    adapter tensor afterwards, so the flags are put back exactly as they were."""
    parts = list(adapted_parts(base).values())
    flags = [(p, p.requires_grad) for part in parts for p in part.parameters()]
    for part in parts:
        part.disable_adapters()
    try:
        yield
    finally:
        for part in parts:
            part.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)
