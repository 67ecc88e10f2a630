"""The adapter files people share. diffusers/PEFT: `pytorch_lora_weights.safetensors`, which
`pipe.load_lora_weights(out_dir)` reads at the trained strength."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import __version__, atomic, lora
from .config import Config

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_metadata(cfg: Config, base, step: int) -> dict[str, str]:
    """What a user (or `merge`) needs to know about the adapter without its config file."""
    return {
        "lora_booth.version": __version__,
        "lora_booth.base_model": cfg.model.source,
        "lora_booth.family": base.family,
        "lora_booth.prediction_type": base.prediction_type,
        "lora_booth.trigger_prompt": cfg.data.instance_prompt,
        "lora_booth.class_prompt": cfg.prior.class_prompt,
        "lora_booth.rank": str(cfg.lora.rank),
        "lora_booth.alpha": str(cfg.lora.rank if cfg.lora.alpha is None else cfg.lora.alpha),
        "lora_booth.steps": str(step),
        "lora_booth.resolution": str(cfg.data.resolution),
        "lora_booth.config": json.dumps(cfg.to_dict(), sort_keys=True),
    }


def save_diffusers(base, out_dir: Path, cfg: Config, step: int) -> Path:
    """Write the adapters in diffusers' layout, with the peft configs diffusers reads back
    (rank, alpha, targets) under `lora_adapter_metadata`, plus lora-booth's own run metadata."""
    tensors = lora.diffusers_state_dict(base, SAVE_DTYPES[cfg.save.dtype])
    metadata = {"format": "pt",
                "lora_adapter_metadata": json.dumps(lora.adapter_metadata(base), indent=2, sort_keys=True),
                **run_metadata(cfg, base, step)}
    path = out_dir / DIFFUSERS_WEIGHT_NAME
    atomic.save_safetensors(path, tensors, metadata)
    return path
