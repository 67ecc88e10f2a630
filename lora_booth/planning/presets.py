"""Presets chosen by card: preset=auto picks the best-quality preset whose planned peak fits the
GPU, and a plan that does not fit is told which memory savers would make it fit."""
from __future__ import annotations

import torch

from .. import families
from ..config import loading
from ..config.loading import preset_names
from ..model import loading as models
from ..io.errors import ConfigError
from .plan import GiB, config_folder, estimate


def budget_bytes(text: str) -> int:
    """'8GiB', '8GB', '8' (GiB) or '7.5g' → bytes. GPUs sold as 8 GB have 8 GiB."""
    cleaned = text.strip().lower().replace("ib", "").replace("b", "")
    scale = GiB
    if cleaned.endswith("g"):
        cleaned = cleaned[:-1]
    elif cleaned.endswith("m"):
        cleaned, scale = cleaned[:-1], 2**20
    try:
        return int(float(cleaned) * scale)
    except ValueError:
        raise ConfigError("gpu_memory", f"{text!r} is not a memory size", "write it like 8GiB or 12") from None


# Savers in the order they cost least quality or speed; each is tried on top of the previous ones.
SAVERS = [("train.gradient_checkpointing", "true", "recompute activations: −60 % activations, +33 % FLOPs"),
          ("optim.optimizer", "adamw8bit", "8-bit optimizer state"),
          ("lora.text_encoder", "false", "train the UNet only; prompt embeddings cached"),
          ("train.cache_text_embeddings", "true", "text encoder off the GPU"),
          ("data.cache_latents", "true", "VAE off the GPU"),
          ("train.batch_size", "1", "one instance image per step (raise grad_accum to compensate)")]


def advice(pairs: list[tuple[str, str]], budget: int, report=print) -> list[tuple[str, str, str]]:
    """The shortest prefix of SAVERS (skipping those already on) that makes the plan fit, or []
    when even all of them do not."""
    chosen: list[tuple[str, str, str]] = []
    for key, value, why in SAVERS:
        current, _ = loading.resolve(pairs + [(k, v) for k, v, _ in chosen])
        section, name = key.split(".")
        if str(getattr(getattr(current, section), name)).lower() == value:
            continue
        if key == "optim.optimizer" and current.optim.optimizer != "adamw":  # adafactor is smaller still;
            continue                                # prodigy's lr=1.0 would be a disaster for AdamW
        chosen.append((key, value, why))
        cfg, _ = loading.resolve(pairs + [(k, v) for k, v, _ in chosen])
        total = estimate(cfg, flops=False).total
        report(f"  with {' '.join(f'{k}={v}' for k, v, _ in chosen)}: {total / GiB:.2f} GiB")
        if total <= budget:
            return chosen
    return []


def gpu_budget(gpu_memory: str) -> int | None:
    """train.gpu_memory when given, else the detected GPU's memory, else None (no GPU)."""
    return budget_bytes(gpu_memory) if gpu_memory else detected_gpu_memory()


def detected_gpu_memory() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    return None


def choose_preset(pairs: list[tuple[str, str]], budget: int, report=print) -> str:
    """preset=auto: the highest-quality preset whose plan fits `budget` with 10 % headroom."""
    model = dict(pairs).get("model", dict(pairs).get("model.source", "tiny"))
    prefix = families.family(models.detect_folder_family(config_folder(model))).preset_prefix  # its family's presets
    names = tuple(f"{prefix}{size}gb" for size in (24, 16, 12, 8, 6) if f"{prefix}{size}gb" in preset_names())
    for name in names:
        try:
            cfg, _ = loading.resolve([("preset", name), *pairs])
        except ConfigError as error:
            if "no preset called" in str(error):
                continue
            raise
        total = estimate(cfg, flops=False).total
        report(f"preset {name}: planned peak {total / GiB:.2f} GiB")
        if total <= budget * 0.9:
            return name
    raise ConfigError("preset", f"is auto, but no preset fits {budget / GiB:.1f} GiB",
                      "lower resolution, or train on a larger GPU")


def auto_preset(pairs: list[tuple[str, str]]) -> str:
    """preset=auto: the best-quality preset whose memory plan fits the GPU (given or detected)."""
    budget = gpu_budget(dict(pairs).get("train.gpu_memory", ""))
    if budget is None:
        raise ConfigError("preset", "is auto, but no CUDA GPU is detected",
                          "pass train.gpu_memory=8GiB to plan for a GPU, or name a preset")
    name = choose_preset(pairs, budget)
    print(f"preset=auto → {name} (fits {budget / 2**30:.1f} GiB with 10 % headroom)")
    return name


def resolve(args: dict[str, str] | list[tuple[str, str]]):
    """config.resolve, with preset=auto first replaced by the preset the planner picks for the GPU."""
    pairs = list(args.items()) if isinstance(args, dict) else list(args)
    if any(key == "preset" and value == "auto" for key, value in pairs):
        pairs = [(k, v) for k, v in pairs if not (k == "preset" and v == "auto")]
        pairs.insert(0, ("preset", auto_preset(pairs)))
    return loading.resolve(pairs)
