"""The diffusers/PEFT layout: `unet.<module>.lora_A.weight` / `lora_B.weight`, with the peft configs
(rank, alpha, per-module patterns) as JSON under `lora_adapter_metadata`; `pipe.load_lora_weights()`
reads it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..io import atomic
from ..io.errors import AdapterError
from ..model import lycoris
from .file_metadata import FOLDED_KEY, FOLDED_NOTE, _json_or
from .neutral import PARTS, Adapter, Module, _cast, adapter_kind, canonical_path
from .untrusted import _mapping, _number, _rank, _scalar


_DIFFUSERS_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                       "lora.up.weight": "up", "lora_A.default.weight": "down", "lora_B.default.weight": "up"}


def _from_diffusers(tensors: dict, metadata: dict, path: Path) -> Adapter:
    configs = _peft_configs(metadata)
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    lyco: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part not in PARTS:
            raise AdapterError(f"{path}: key {key} is neither a diffusers LoRA key (unet./text_encoder.…) nor a "
                               "kohya one (lora_unet_…). Is this a LoRA file?")
        if rest.endswith(".alpha"):
            alphas[(part, canonical_path(part, rest[:-len(".alpha")]))] = _scalar(value, f"{path}: {key}")
            continue
        module_path, _, leaf = rest.rpartition(".")
        if leaf in (*lycoris.LOHA_KEYS, *lycoris.LOKR_KEYS, *lycoris.TUCKER_KEYS):
            lyco.setdefault((part, canonical_path(part, module_path)), {})[leaf] = value
            continue
        if leaf == "lora_magnitude_vector" or rest.endswith(".lora_magnitude_vector.weight"):
            module_path = rest[:rest.index(".lora_magnitude_vector")]
            halves.setdefault((part, canonical_path(part, module_path)), {})["magnitude"] = value
            continue
        for suffix, half in _DIFFUSERS_SUFFIXES.items():
            if rest.endswith("." + suffix):
                module_path = canonical_path(part, rest[:-len(suffix) - 1])
                halves.setdefault((part, module_path), {})[half] = value
                break
        else:
            raise AdapterError(f"{path}: key {key} is not a LoRA weight (lora_A/lora_B). Is this a LoRA file?")
    modules = {}
    for (part, module_path), pair in halves.items():
        if not {"down", "up"} <= set(pair):
            raise AdapterError(f"{path}: module {part}.{module_path} lacks its {'up' if 'down' in pair else 'down'} "
                               "matrix; the file is incomplete")
        alpha = alphas.get((part, module_path))
        if alpha is None:
            alpha = _alpha_from_config(configs.get(part), module_path, pair["down"].shape[0])
        modules[(part, module_path)] = Module(pair["down"], pair["up"], alpha, pair.get("magnitude"))
    for (part, module_path), suffixes in lyco.items():
        config = configs.get(part) or {}
        rank = _rank_from_config(config, module_path)
        alpha = alphas.get((part, module_path))
        if alpha is None and rank is not None:
            alpha = _alpha_from_config(config, module_path, rank)
        where = f"{path}: {part}.{module_path}"
        try:
            modules[(part, module_path)] = lycoris.from_peft(suffixes, rank, alpha, where) if rank is not None \
                else lycoris.from_tensors(suffixes, alpha, where)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
    if not modules:
        raise AdapterError(f"{path}: holds no LoRA weights")
    return Adapter(_unfolded(modules, metadata), metadata, "diffusers")


def _unfolded(modules: dict, metadata: dict[str, str]) -> dict:
    """The trained modules of a file write_diffusers folded (FOLDED_KEY): each one's trained alpha
    back, its scale divided out of the factor it was multiplied into (bit for bit when alpha/r is a
    power of two). Modules at scale ≠ 1 already (a file edited since) stay as they are."""
    trained = _json_or(metadata.get(FOLDED_KEY), {}).get("trained")
    if not isinstance(trained, dict):
        return modules
    out = {}
    for (part, module_path), module in modules.items():
        config = trained.get(part)
        if isinstance(config, dict) and module.scale == 1 and not (isinstance(module, lycoris.LoKr) and
                                                                  not module.decomposed):
            alpha = _alpha_from_config({**config, "r": module.rank}, module_path, module.rank)
            if alpha != module.rank:
                module = module.rescaled(module.rank / alpha, alpha)
        out[(part, module_path)] = module
    return out


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(flat, dict):
        raise AdapterError(f"the adapter's metadata lora_adapter_metadata is a {type(flat).__name__}; it must be a "
                           "mapping of peft settings")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    return configs


def _alpha_from_config(config: dict | None, module_path: str, rank: int) -> float:
    """peft's rule: alpha_pattern by module-name suffix, else lora_alpha; no metadata: alpha = rank
    (what diffusers assumes for a file without it)."""
    if not config:
        return float(rank)
    for pattern, alpha in _mapping(config, "alpha_pattern").items():
        if _names_module(pattern, module_path):
            return _number(alpha, "alpha_pattern")
    return _number(config.get("lora_alpha", config.get("alpha", rank)), "lora_alpha")  # LoHa/LoKr: alpha


def _rank_from_config(config: dict, module_path: str) -> int | None:
    """peft's r for one module (rank_pattern by suffix, else r); None without a config."""
    if "r" not in config:
        return None
    for pattern, rank in _mapping(config, "rank_pattern").items():
        if _names_module(pattern, module_path):
            return _rank(rank, "rank_pattern")
    return _rank(config["r"], "r")


def _names_module(pattern: str, module_path: str) -> bool:
    """peft's pattern rule for the patterns that name modules, matched literally: the pattern is a
    dotted suffix of the module path (with or without text_model.). Metadata is data: a regular
    expression from a file is never compiled (a pattern such as `(a+)+!` backtracks for hours)."""
    literal = re.sub(r"\\(.)", r"\1", str(pattern))  # undo re.escape, as lora-booth and peft write names
    bare = module_path[len("text_model."):] if module_path.startswith("text_model.") else module_path
    return any(name == literal or name.endswith("." + literal) for name in (bare, module_path))


def fold_scale(module):
    """`module` with its scale alpha/r multiplied into its first factor and alpha = r: the same ΔW
    (to one rounding; exactly when alpha/r is a power of two), read at scale 1. A diffusers file
    keeps alpha only in its peft metadata, which ComfyUI and Forge never read: they apply a module
    without an `.alpha` tensor at scale 1, and diffusers refuses a file with both (issue 34)."""
    if module.scale == 1:
        return module
    return module.rescaled(module.scale, float(module.rank))


def write_diffusers(adapter: Adapter, path: Path, metadata: dict[str, str] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """The diffusers/PEFT layout, with per-part peft configs; modules whose rank or alpha differ
    from their part's most common value go into rank_pattern/alpha_pattern. Each module's scale is
    folded into its factors (fold_scale), the trained alphas kept under FOLDED_KEY."""
    tensors, configs, trained = {}, {}, {}
    for part in adapter.parts():
        entries = {p: m for (q, p), m in adapter.modules.items() if q == part}
        if any(m.scale != 1 for m in entries.values()):
            config = _peft_config_for(entries)
            trained[part] = {"alpha": config.get("lora_alpha", config.get("alpha")),
                             "alpha_pattern": config["alpha_pattern"]}
            entries = {p: fold_scale(m) for p, m in entries.items()}
        for module_path, module in entries.items():
            if isinstance(module, Module):
                tensors[f"{part}.{module_path}.lora_A.weight"] = _cast(module.down, dtype)
                tensors[f"{part}.{module_path}.lora_B.weight"] = _cast(module.up, dtype)
                if module.magnitude is not None:
                    if module.magnitude_axis != "out":
                        raise AdapterError(f"module {part}.{module_path}: its DoRA magnitude is per input column "
                                           "(A1111's layout); peft's DoRA is per output row, so the diffusers layout "
                                           "cannot hold it. Keep the kohya file, or convert with dora=bake rank=N.")
                    # with `.weight`: transformers' load_adapter drops a bare lora_magnitude_vector
                    tensors[f"{part}.{module_path}.lora_magnitude_vector.weight"] = _cast(module.magnitude, dtype)
            else:
                for suffix, tensor in module.tensors().items():
                    tensors[f"{part}.{module_path}.{suffix}"] = _cast(tensor, dtype)
        configs[part] = _peft_config_for(entries)
    packed = {f"{part}.{key}": value for part, config in configs.items() for key, value in config.items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    header.update({k: v for k, v in (metadata or {}).items() if k != FOLDED_KEY})
    if trained:
        header[FOLDED_KEY] = json.dumps({"note": FOLDED_NOTE, "trained": trained}, sort_keys=True)
    atomic.save_safetensors(path, tensors, header)
    return path


def _peft_config_for(entries: dict) -> dict:
    """The peft config (LoraConfig, LoHaConfig or LoKrConfig keyword arguments) that rebuilds `entries`."""
    from collections import Counter

    kind = adapter_kind(entries.values())
    ranks_alphas = {p: lycoris.peft_rank_alpha(m) if kind in ("loha", "lokr") else (m.rank, m.alpha)
                    for p, m in entries.items()}
    rank = Counter(r for r, _ in ranks_alphas.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks_alphas.values()).most_common(1)[0][0]
    targets = sorted({_target_name(path) for path in entries})
    # peft matches a pattern against the end of each module name. The path without CLIP's
    # `text_model.` level matches both nested and flattened text encoders.
    rank_pattern = {_pattern(p): r for p, (r, _) in ranks_alphas.items() if r != rank}
    alpha_pattern = {_pattern(p): a for p, (_, a) in ranks_alphas.items() if a != alpha}
    common = {"r": rank, "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if kind == "loha":
        return {**common, "alpha": alpha, "init_weights": True}
    if kind == "lokr":
        decompose_both = any("lokr_w1_a" in m.factors for m in entries.values())
        return {**common, "alpha": alpha, "init_weights": True, "decompose_both": decompose_both,
                "decompose_factor": -1}
    return {**common, "lora_alpha": alpha, "init_lora_weights": "gaussian", "lora_dropout": 0.0,
            "use_dora": kind == "dora", "bias": "none"}


def _target_name(path: str) -> str:
    """The name peft targets: the last segment, or the last two for indexed ones (to_out.0)."""
    segments = path.split(".")
    return ".".join(segments[-2:]) if segments[-1].isdigit() else segments[-1]


def _pattern(path: str) -> str:
    return re.escape(path[len("text_model."):] if path.startswith("text_model.") else path)
