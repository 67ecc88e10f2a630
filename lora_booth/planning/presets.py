"""Presets chosen by card: preset=auto picks the best-quality preset whose planned peak fits the
GPU, and a plan that does not fit is told which memory savers would make it fit."""
from __future__ import annotations

import re

import torch

from .. import families
from ..config import loading
from ..config.loading import PRESET_ALIASES, preset_names
from ..model import loading as models
from ..io.errors import ConfigError
from . import savers
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
    """The shortest prefix of SAVERS (skipping those already on) that makes the plan fit; else all
    of them with the first of the big-base savers (savers.COMBINATIONS: fp8/int8/nf4 weights, block
    offload) that fits; [] when none does."""
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
        report(f"  with {' '.join(f'{k}={v}' for k, v, _ in chosen)}: {total / GiB:.2f} GiB "
               f"({'fits' if total <= budget else 'does not fit'})")
        if total <= budget:
            return chosen
    more = savers.combination(pairs + [(k, v) for k, v, _ in chosen], budget, report)
    return chosen + more if more else []


def gpu_budget(gpu_memory: str) -> int | None:
    """train.gpu_memory when given, else the detected GPU's memory, else None (no GPU)."""
    return budget_bytes(gpu_memory) if gpu_memory else detected_gpu_memory()


def detected_gpu_memory() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    return None


def family_preset(pairs: list[tuple[str, str]], report=print) -> list[tuple[str, str]]:
    """A card preset of another family than the model's (preset=24gb, an SD preset, on FLUX.1) plans
    nothing that run could use: the model family's preset for the same card (or the nearest below)
    takes its place, and the output says so."""
    named = [value for key, value in pairs if key == "preset"]
    model = dict(pairs).get("model", dict(pairs).get("model.source", ""))
    if len(named) != 1 or not model or named[0] == "auto":
        return pairs
    name = PRESET_ALIASES.get(named[0], named[0])
    written_for = families.for_preset(name)
    if written_for is None or name not in preset_names():
        return pairs
    family = families.family(models.detect_folder_family(config_folder(model)))
    if family.preset_prefix == written_for.preset_prefix:
        return pairs
    card = int(re.search(r"(\d+)gb$", name).group(1))
    own = sorted((int(m.group(1)), n) for n in preset_names() if families.for_preset(n) is not None
                 and families.for_preset(n).preset_prefix == family.preset_prefix and (m := re.search(r"(\d+)gb$", n)))
    fitting = [n for size, n in own if size <= card] or [n for _, n in own[:1]]  # else the smallest card's
    if not fitting:  # a preset of another family would set what this one cannot use (SD's fp16 on a 20 B model)
        raise ConfigError("preset", f"is {name}, written for {written_for.title}, but {model} is {family.title}, "
                          "which has no preset yet", "leave preset unset and set the memory keys yourself; "
                          f"`lora-booth plan model={model} key=value` prices each choice")
    chosen = fitting[-1]
    report(f"preset={name} is written for {written_for.title}, but {model} is {family.title}: planning "
           f"preset={chosen}, {family.title}'s preset for {card} GB cards, instead")
    return [(key, chosen if key == "preset" else value) for key, value in pairs]


def choose_preset(pairs: list[tuple[str, str]], budget: int, report=print) -> str:
    """preset=auto: the highest-quality preset whose plan fits `budget` with 10 % headroom."""
    model = dict(pairs).get("model", dict(pairs).get("model.source", "tiny"))
    prefix = families.family(models.detect_folder_family(config_folder(model))).preset_prefix  # its family's presets
    names = tuple(f"{prefix}{size}gb" for size in (24, 16, 12, 8, 6) if f"{prefix}{size}gb" in preset_names())
    if not names:
        raise ConfigError("preset", f"is auto, but {model} has no preset yet",
                          f"name the keys yourself; `lora-booth plan model={model} key=value` prices each choice")
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


def resolve(args: dict[str, str] | list[tuple[str, str]], check_paths: bool = False):
    """config.resolve, with preset=auto first replaced by the preset the planner picks for the GPU."""
    pairs = list(args.items()) if isinstance(args, dict) else list(args)
    if any(key == "preset" and value == "auto" for key, value in pairs):
        pairs = [(k, v) for k, v in pairs if not (k == "preset" and v == "auto")]
        pairs.insert(0, ("preset", auto_preset(pairs)))
    return loading.resolve(pairs, check_paths=check_paths)
