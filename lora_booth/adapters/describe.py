"""`lora-booth inspect`: what an adapter file is, for whom, and how it was made."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import formats
from . import neutral


def describe(path: str | Path, allow_pickle: bool = False) -> str:
    path = Path(path)
    adapter = formats.read(path, allow_pickle)
    file = formats.locate(path)
    metadata = adapter.metadata
    lines = [f"file         {file} ({file.stat().st_size:,} bytes)",
             f"format       {adapter.source_format}",
             f"type         {neutral.adapter_kind(adapter.modules.values())}",
             f"family       {adapter.family()}"]
    parameters = sum(m.numel() for m in adapter.modules.values())
    for part in adapter.parts():
        modules = {p: m for (q, p), m in adapter.modules.items() if q == part}
        ranks = Counter(m.rank for m in modules.values())
        alphas = Counter(m.alpha for m in modules.values())
        lines.append(f"{part:<12} {len(modules)} modules; rank " + _spread(ranks) + "; alpha " + _spread(alphas))
        if len(ranks) > 1 or len(alphas) > 1:
            for module_path, module in sorted(modules.items()):
                lines.append(f"    {module_path}: rank {module.rank}, alpha {module.alpha:g}")
    lines.append(f"parameters   {parameters:,}")
    trigger = metadata.get("lora_booth.trigger_prompt") or metadata.get("ss_training_comment")
    if trigger:
        lines.append(f"trigger      {trigger}")
    shown = {k: v for k, v in metadata.items() if k not in ("lora_adapter_metadata", "lora_booth.config")}
    if shown:
        lines.append("metadata")
        lines.extend(f"    {k} = {v[:120]}" for k, v in sorted(shown.items()))
    return "\n".join(lines)


def _spread(counts: Counter) -> str:
    if len(counts) == 1:
        return f"{next(iter(counts)):g}"
    return ", ".join(f"{value:g} ×{n}" for value, n in sorted(counts.items()))
