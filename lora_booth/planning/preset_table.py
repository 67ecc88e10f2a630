"""`lora-booth presets`: one row per preset (family, card, resolution, memory savers, read from its
file), then each preset's opening comment and settings."""
from __future__ import annotations

import re

from .. import families
from ..config.loading import preset_names, presets_dir, read_preset


def _preset_order(name: str) -> tuple:
    """demo first, then each family's presets (SD 1.x/2.x, SDXL, FLUX.1) from the smallest card to the largest."""
    memory = re.search(r"(\d+)gb$", name)
    prefixes = list(dict.fromkeys(f.preset_prefix for f in families.FAMILIES.values()))
    family = max((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), default=0)
    return (family, int(memory.group(1)) if memory else 0, name)


def _preset_summary(text: str) -> str:
    """The preset file's opening comment, up to its indented example command, as whole sentences."""
    opening = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        opening.append(line[1:].strip())
    return " ".join(opening)


# what `presets` lists as a preset's memory savers: key, value that turns it on, short name
SAVER_NAMES = (("train.mixed_precision", "fp16", "fp16"), ("train.mixed_precision", "bf16", "bf16"),
               ("train.gradient_checkpointing", True, "checkpointing"), ("optim.optimizer", "adamw8bit", "8-bit Adam"),
               ("train.fp8_base", True, "fp8 weights"), ("train.base_weights", "fp8", "fp8 weights"),
               ("train.base_weights", "int8", "int8 weights"), ("train.base_weights", "nf4", "nf4 weights"),
               ("train.split_prior", True, "split prior"),
               ("prior.mode", "prediction", "prior by prediction"))


def _preset_row(name: str) -> list[str]:
    """name, family, card, resolution and memory savers of one preset, from its file."""
    values = read_preset(name)
    family = families.for_preset(name)
    card = re.search(r"(\d+)gb$", name)
    if family is None and values.get("model.source") == "toyworld":
        family_text, card_text = "toy world (SD 1.x)", "CPU"
    else:
        family_text = "SD 1.x/2.x" if family is not None and not family.preset_prefix else getattr(family, "title", "any")
        card_text = f"{card.group(1)} GB" if card else "any"
    resolution = values.get("data.resolution")
    savers = list(dict.fromkeys(short for key, value, short in SAVER_NAMES
                                if str(values.get(key, "")).lower() == str(value).lower()))
    offloaded = str(values.get("train.offload_blocks", "0"))
    if offloaded not in ("0", ""):
        savers.append(f"{offloaded} blocks offloaded")
    return [name, family_text, card_text, f"{resolution} px" if resolution else "the base's own",
            ", ".join(savers) or "none"]


def presets_table() -> list[str]:
    """The overview `presets` opens with: one row per preset, `auto` first."""
    rows = [["auto", "the model's", "your GPU's", "the chosen preset's",
             "the chosen preset's: the best-quality one whose plan fits the GPU"]]
    rows += [_preset_row(name) for name in sorted(preset_names(), key=_preset_order)]
    header = ["name", "family", "VRAM", "resolution", "memory savers"]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows),
            "", "lora-booth train preset=NAME ... (preset=auto: lora-booth plan shows what it picks)", ""]


def presets_text() -> str:
    lines = presets_table()
    for name in sorted(preset_names(), key=_preset_order):
        text = (presets_dir() / f"{name}.yaml").read_text(encoding="utf-8")
        settings = [line.split("#")[0].rstrip() for line in text.splitlines()
                    if line.strip() and not line.startswith("#") and line.split("#")[0].strip()]
        lines.append(f"{name}: {_preset_summary(text)}")
        lines.extend(f"    {setting}" for setting in settings)
        lines.append("")
    lines.append(f"Each file, with the reasons for its choices: {presets_dir()}")
    return "\n".join(lines)
