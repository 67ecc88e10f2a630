"""The adapter files people share, and one neutral form between them.

- diffusers/PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`, the peft configs (rank, alpha,
  per-module patterns) as JSON under `lora_adapter_metadata`. `pipe.load_lora_weights()` reads it.
- kohya (AUTOMATIC1111, ComfyUI, Forge): `lora_unet_<module with _>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, `lora_te_…` for the text encoder, kohya's `ss_*` training metadata
  and ModelSpec's `modelspec.*` keys, rebuilt by one rule wherever a kohya file is written.

Both describe, per module, ΔW = (alpha / rank) · up @ down. `Adapter` holds exactly that; DoRA
adds a magnitude per output row (peft, LyCORIS) or per input column (A1111's and OneTrainer's
files), and LoHa/LoKr modules (lycoris.py) take the place of `Module`. Which tool computes which
file right: docs/adapter-types.md, measured by tools/check_loaders.py.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import __version__, atomic, families, flux_layout, ldm, lycoris
from .errors import LoraBoothError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = (*families.denoisers(), *families.text_parts())
# each family's kohya names (lora_unet_, lora_te_ / lora_te1_, lora_te2_) → the part they name
KOHYA_READ_PREFIXES = families.kohya_read_prefixes()
# a UNet named in the original layout (kohya's SDXL names) starts with one of these blocks
LDM_UNET_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")


class AdapterError(LoraBoothError):
    """A file that is not a LoRA adapter lora-booth can read, or one that does not fit a model."""


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
        # the UNet's cross-attention input is the family's whole text width (SDXL: both encoders,
        # 2048); a text encoder's own width (SDXL's first: 768) is only the fallback
        for wanted in (("unet", "attn2.to_k"), ("text_encoder", "q_proj")):
            for (part, path), module in self.modules.items():
                if part == wanted[0] and path.endswith(wanted[1]):
                    known = families.for_adapter(parts, module.update_shape()[1])
                    if known:
                        return known.name
        known = families.for_adapter(parts, None)
        if known:
            return known.name
        return self.metadata.get("lora_booth.family", "unknown")


# ---------------------------------------------------------------------------------------- names


def canonical_path(part: str, path: str) -> str:
    """Text-encoder paths keep CLIP's `text_model.` level, which transformers ≥ 5.6 flattened
    away: files written with it load everywhere, and kohya's names include it."""
    if part.startswith("text_encoder") and not path.startswith("text_model."):
        return "text_model." + path
    return path


# Segments of module names that contain "_" themselves: kohya's flat names erase the dots, so
# reading them back needs to know which underscores belong to a name.
_COMPOUND = ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "input_blocks", "output_blocks",
             "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "to_q", "to_k", "to_v", "to_out",
             "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "text_model",
             "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "time_embedding", "add_embedding",
             "linear_1", "linear_2", "add_k_proj", "add_v_proj", "final_layer_norm", "layer_norm1", "layer_norm2",
             "token_embedding", "position_embedding", "text_projection", "conv_norm_out"]
_COMPOUND_PATTERN = re.compile("|".join(sorted(map(re.escape, _COMPOUND), key=len, reverse=True)))


def kohya_name(part: str, path: str, family: str = "sd1") -> str:
    """kohya's flat module name, as kohya sd-scripts writes it for the family: its prefixes
    (SDXL: lora_te1_/lora_te2_) and, where kohya keeps them, the UNet's original block names
    (SDXL: input_blocks.4.1…). A family lora-booth does not know is named like SD 1.x."""
    kind = families.get(family) or families.SD1
    if part == kind.denoiser and kind.kohya_unet_layout is not None:
        path = ldm.unet_module_name(path, kind.kohya_unet_layout)
    return kind.kohya_prefix(part) + canonical_path(part, path).replace(".", "_")


def parse_kohya_name(name: str) -> tuple[str, str]:
    """lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q →
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"); SDXL's
    lora_unet_input_blocks_4_1_… → ("unet", "down_blocks.1.attentions.0…")."""
    for prefix, part in sorted(KOHYA_READ_PREFIXES.items(), key=lambda item: -len(item[0])):
        if name.startswith(prefix):
            flat = name[len(prefix):]
            break
    else:
        raise AdapterError(f"{name}: not a kohya LoRA module name (expected lora_unet_… or lora_te_…)")
    protected = _COMPOUND_PATTERN.sub(lambda m: m.group(0).replace("_", "\0"), flat)
    path = protected.replace("_", ".").replace("\0", "_")
    if part == "unet" and path.startswith(LDM_UNET_BLOCKS):
        try:
            path = ldm.diffusers_unet_module_name(path)
        except (KeyError, ValueError, IndexError):
            raise AdapterError(f"{name}: not a UNet module name lora-booth knows") from None
    return part, path


# ---------------------------------------------------------------------------------------- reading


def locate(path: str | Path) -> Path:
    """The adapter file a path names: the file itself, or in a run folder or checkpoint folder
    (`out/`, `out/checkpoints/step-750`) its diffusers file, else its one kohya file."""
    from . import checkpoint

    path = checkpoint.named(Path(path).expanduser())
    in_checkpoint = (path.parent if path.is_file() else path) / "state.json"
    if path.is_file() and path.name in checkpoint.RESUME_FILES and in_checkpoint.is_file():
        beside = sorted(p.name for p in path.parent.glob("*.safetensors") if p.name not in checkpoint.RESUME_FILES)
        raise AdapterError(f"{path}: is a checkpoint's training state, for resume=, not a LoRA. "
                           + (f"The adapter of that step is beside it: {', '.join(beside)} (or give the folder)."
                              if beside else "This checkpoint is older than the ones that hold their adapter: resume "
                              "from it (train resume=...) to write one."))
    if not path.is_dir():
        return path
    if (path / DIFFUSERS_WEIGHT_NAME).is_file():
        return path / DIFFUSERS_WEIGHT_NAME
    skip = set(checkpoint.RESUME_FILES) | {"embeddings.safetensors"}
    files = sorted(p for p in path.glob("*.safetensors") if p.name not in skip and not p.name.startswith("."))
    if len(files) == 1:
        return files[0]
    if in_checkpoint.is_file() and not files:
        raise AdapterError(f"{path}: this checkpoint is older than the ones that hold their adapter files. Resume "
                           "from it (train resume=...) to write them, or use the run's final adapter.")
    found = f"it holds {len(files)} adapter files ({', '.join(p.name for p in files[:4])}): name one" if files \
        else f"it holds no {DIFFUSERS_WEIGHT_NAME} and no other .safetensors adapter"
    raise AdapterError(f"{path}: {found}. Give the adapter file, or a run or checkpoint folder.")


def read(path: str | Path, allow_pickle: bool = False) -> Adapter:
    """Any LoRA file lora-booth understands: diffusers/PEFT (with or without metadata, old
    `.lora.down` keys too) or kohya (per-module alpha), or a folder that holds one (`locate`)."""
    path = locate(path)
    check_adapter_file(path)
    if path.suffix.lower() != ".safetensors":
        if not allow_pickle:
            raise AdapterError(f"{path}: not a .safetensors file. Pickle files can run code when loaded; "
                               "convert it, or pass allow_pickle=true if you trust its source.")
        tensors, metadata = dict(torch.load(path, map_location="cpu", weights_only=True)), {}
    else:
        tensors, metadata = _read_safetensors(path)
    try:
        if flux_layout.layout(tensors) in ("kohya", "comfyui"):  # FLUX.1 in BFL's names (sd-scripts, ComfyUI)
            return validated(_from_flux_kohya(tensors, metadata, path), path)
        if any(k.startswith(tuple(KOHYA_READ_PREFIXES)) for k in tensors):
            return validated(_from_kohya(tensors, metadata, path), path)
        return validated(_from_diffusers(tensors, metadata, path), path)
    except AdapterError as exc:
        if str(path) in str(exc):
            raise
        raise AdapterError(f"{path}: {exc}") from None


def validated(adapter: Adapter, path: Path) -> Adapter:
    """An adapter file is untrusted input: every module must have finite tensors, a positive rank
    that its halves agree on, matrix (or conv) shapes and a finite scalar alpha, before any verb
    merges it into a model (a NaN module makes black images with exit status 0)."""
    for (part, module_path), module in adapter.modules.items():
        where = f"{path}: module {part}.{module_path}"
        tensors = {name: value for name, value in vars(module).items() if isinstance(value, torch.Tensor)}
        tensors.update({f"factors.{k}": v for k, v in (getattr(module, "factors", None) or {}).items()})
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{where}: {name} holds NaN or infinite values; the file is damaged. Retrain or "
                                   "download it again")
        alpha = module.alpha
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterError(f"{where}: alpha {alpha!r} is not a finite number")
        if isinstance(module, Module):
            if module.down.ndim not in (2, 4) or module.up.ndim not in (2, 4):
                raise AdapterError(f"{where}: down {tuple(module.down.shape)} and up {tuple(module.up.shape)} are not "
                                   "matrices or convolution kernels")
            if module.down.shape[0] < 1 or module.up.shape[1] != module.down.shape[0]:
                raise AdapterError(f"{where}: the rank of down {tuple(module.down.shape)} and up "
                                   f"{tuple(module.up.shape)} disagree (or is 0)")
            if module.magnitude is not None:
                axis_size = module.up.shape[0] if module.magnitude_axis == "out" else module.down.shape[1]
                if module.magnitude.numel() != axis_size:
                    raise AdapterError(f"{where}: its DoRA magnitude has {module.magnitude.numel()} values for "
                                       f"{axis_size} {'outputs' if module.magnitude_axis == 'out' else 'inputs'}")
        check_alpha(alpha, module, where)  # after the shapes: the ratio needs a rank
    return adapter


# alpha / rank is the strength each module is applied with (LyCORIS's full LoKr ignores alpha).
# Real files stay within 1/64 … 16; beyond these bounds a file is damaged or hostile, and merging it
# would write weights scaled by millions.
MAX_ALPHA_RATIO = 256.0
MIN_ALPHA_RATIO = 1e-4


def check_alpha(alpha: float, module, where: str) -> None:
    """One rule for every family and file layout: alpha must be positive. kohya's trainer reads an
    alpha of 0 as alpha = rank while ComfyUI and diffusers apply it as strength 0, so a file with
    alpha 0 means two different things; lora-booth refuses it rather than guess."""
    if alpha == 0:
        raise AdapterError(f"{where}: alpha is 0, which kohya's trainer reads as alpha = rank and ComfyUI and "
                           "diffusers as strength 0 (no effect). lora-booth does not guess: re-save the file with "
                           "the alpha it was trained with (kohya: network_alpha, usually the rank)")
    if alpha < 0:
        raise AdapterError(f"{where}: alpha is {alpha:g}; a negative alpha inverts the update. Re-save the file "
                           "with a positive alpha, and use a negative strength (lora=FILE:-0.5) to subtract it")
    ratio = module.scale
    if not MIN_ALPHA_RATIO <= ratio <= MAX_ALPHA_RATIO:
        raise AdapterError(f"{where}: alpha {alpha:g} at rank {module.rank} scales the update by {ratio:g}, outside "
                           f"{MIN_ALPHA_RATIO:g} … {MAX_ALPHA_RATIO:g} (trained files use 1/64 … 16). The file is "
                           "damaged or mislabelled: fix its alpha tensors or metadata")


def _scalar(value: torch.Tensor, where: str) -> float:
    """An `.alpha` tensor: one finite number."""
    if value.numel() != 1:
        raise AdapterError(f"{where}: alpha has shape {tuple(value.shape)}; it must be one number")
    number = float(value.float().item())
    if not math.isfinite(number):
        raise AdapterError(f"{where}: alpha is {number}; it must be a finite number")
    return number


def check_adapter_file(path: Path) -> None:
    """An adapter is opened only when it is a regular file: opening a pipe would block forever."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file") from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot be read ({exc.strerror}). Check the path and its permissions.") from None
    if not stat.S_ISREG(mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket or device" if not stat.S_ISDIR(mode) else \
            "a folder without an adapter"
        raise AdapterError(f"{path}: is {kind}, not an adapter file. Give the .safetensors file itself (a pipe or "
                           "device is never opened), or a run or checkpoint folder")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    check_adapter_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # truncated, header-bombed, not safetensors at all
        raise AdapterError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}). "
                           "Download or write it again.") from None


def _from_kohya(tensors: dict, metadata: dict, path: Path) -> Adapter:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        groups.setdefault(name, {})[kind] = value
    modules = {}
    for name, parts in groups.items():
        part, module_path = parse_kohya_name(name)
        modules[(part, canonical_path(part, module_path))] = _kohya_module(name, parts, path)
    return Adapter(modules, metadata, "kohya", _family_of_kohya_names(groups))


def _from_flux_kohya(tensors: dict, metadata: dict, path: Path) -> Adapter:
    """A FLUX.1 LoRA in kohya's (BFL's) names: q, k, v (and a single block's MLP input) split
    back out of their fused modules, exactly (flux_layout)."""
    try:
        split, alphas = flux_layout.from_kohya(tensors)
    except flux_layout.FluxLayoutError as exc:
        raise AdapterError(f"{path}: {exc}") from None
    modules = {}
    for module_key, alpha in alphas.items():
        part, _, module_path = module_key.partition(".")
        modules[(part, canonical_path(part, module_path))] = Module(
            split[f"{module_key}.lora_A.weight"], split[f"{module_key}.lora_B.weight"], float(alpha))
    if not modules:
        raise AdapterError(f"{path}: holds no LoRA weights")
    return Adapter(modules, metadata, "kohya", families.FLUX.name)


def _family_of_kohya_names(names) -> str:
    """The family a kohya file's own names give away (a text prefix only it writes, or the
    original UNet layout it is written in), or "" when the names fit several."""
    for family in families.DETECTION_ORDER:
        own = {prefix for _, prefix in family.kohya_text_prefixes} - \
            {prefix for other in families.FAMILIES.values() if other is not family for _, prefix in other.kohya_text_prefixes}
        if family.kohya_unet_layout is not None:
            own |= {f"lora_unet_{block[:-1]}_" for block in LDM_UNET_BLOCKS}
        if own and any(name.startswith(tuple(own)) for name in names):
            return family.name
    return ""


def _kohya_module(name: str, parts: dict[str, torch.Tensor], path: Path):
    """One module of a kohya/LyCORIS file: LoRA (+ DoRA's dora_scale), LoHa or LoKr."""
    alpha = _scalar(parts["alpha"], f"{path}: module {name}") if "alpha" in parts else None
    if "lora_down.weight" in parts and "lora_up.weight" in parts:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        magnitude, axis = parts.get("dora_scale"), "out"
        if magnitude is not None:
            axis = _dora_axis(magnitude, up.shape[0], down.shape[1], f"{path}: module {name}")
            magnitude = magnitude.flatten()
        return Module(down, up, float(down.shape[0]) if alpha is None else alpha, magnitude, axis)
    if any(k in parts for k in (*lycoris.LOHA_KEYS, *lycoris.LOKR_KEYS)):
        try:
            return lycoris.from_tensors({k: v for k, v in parts.items() if k != "alpha"}, alpha, f"{path}: {name}")
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
    raise AdapterError(f"{path}: module {name} has {sorted(parts)}; lora-booth reads LoRA (lora_down/lora_up, "
                       "optional dora_scale), LoHa (hada_w*) and LoKr (lokr_w*) modules")


def _dora_axis(scale: torch.Tensor, outputs: int, inputs: int, where: str) -> str:
    """Which axis a kohya file's dora_scale normalises: (out, 1…) per output row (LyCORIS's
    default, peft's), (1, in…) per input column (A1111's reader, OneTrainer). A flat vector is
    read as ComfyUI reads it: per output when its length is the output count."""
    shape = tuple(scale.shape)
    if scale.ndim >= 2 and shape[0] == outputs and scale.numel() == outputs:
        return "out"
    if scale.ndim >= 2 and shape[0] == 1 and shape[1] == inputs and scale.numel() == inputs:
        return "in"
    if scale.ndim == 1 and shape[0] in (outputs, inputs):
        return "out" if shape[0] == outputs else "in"
    raise AdapterError(f"{where} has a dora_scale of shape {shape}, which fits neither its {outputs} outputs "
                       f"({outputs}, 1) nor its {inputs} inputs (1, {inputs})")


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


def _mapping(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"the adapter's metadata has {key} of type {type(value).__name__}; it must be a mapping")
    return value


def _number(value, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AdapterError(f"the adapter's metadata has {key} {str(value)[:60]!r}, not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise AdapterError(f"the adapter's metadata has {key} {number}; it must be a positive number")
    return number


def _rank(value, key: str) -> int:
    number = _number(value, key)
    if not number.is_integer():
        raise AdapterError(f"the adapter's metadata has {key} {number}; a rank is a whole number")
    return int(number)


# ---------------------------------------------------------------------------------------- writing


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (tensor if dtype is None else tensor.to(dtype)).detach().cpu().contiguous()


# The diffusers file's metadata key that says each module's alpha/rank was multiplied into its first
# factor (fold_scale), with the trained alphas per part, so lora-booth reads the trained adapter back.
FOLDED_KEY = "lora_booth.alpha_folded"
FOLDED_NOTE = ("each module's alpha/rank is multiplied into lora_B (LoHa: hada_w1_a; LoKr: lokr_w1 or lokr_w1_a) "
               "and lora_alpha = r, so diffusers (lora_adapter_metadata) and loaders that take the strength from "
               ".alpha tensors or else 1 (ComfyUI, Forge) apply the trained update; 'trained' holds the alphas trained")


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


def adapter_kind(modules) -> str:
    """lora, dora, loha or lokr: the one kind of every module (a file holds one kind)."""
    kinds = {m.kind for m in modules}
    if len(kinds) > 1:
        raise AdapterError(f"the adapter mixes module kinds {sorted(kinds)}; one file holds one kind")
    return next(iter(kinds), "lora")


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


def write_kohya(adapter: Adapter, path: Path, metadata: dict[str, str] | None = None,
                dtype: torch.dtype | None = None, family: str = "") -> Path:
    """kohya's layout, which AUTOMATIC1111, ComfyUI and Forge load; `sshs_model_hash` is computed
    the way kohya and A1111's additional-networks do (SHA-256 of the tensor data after the header)."""
    tensors = {}
    family = family or adapter.family()
    own = families.get(family)
    layout = own.kohya_tensors(adapter.modules) if own is not None else None  # FLUX.1: BFL's fused modules
    for name, tensor in (layout or {}).items():
        tensors[name] = tensor.float() if name.endswith(".alpha") else _cast(tensor, dtype)
    for (part, module_path), module in ({} if layout is not None else adapter.modules).items():
        name = kohya_name(part, module_path, family)
        if isinstance(module, Module):
            tensors[f"{name}.lora_down.weight"] = _cast(module.down, dtype)
            tensors[f"{name}.lora_up.weight"] = _cast(module.up, dtype)
            if module.magnitude is not None:  # LyCORIS's layout: one scale per output row, as trained
                tensors[f"{name}.dora_scale"] = _cast(module.magnitude.reshape(module.dora_scale_shape()), dtype)
        else:
            for suffix, tensor in module.tensors().items():
                tensors[f"{name}.{suffix}"] = _cast(tensor, dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    metadata = dict(metadata or {})
    metadata.update(weight_hashes(tensors, metadata))
    if "modelspec.sai_model_spec" in metadata:  # ModelSpec's hash: all tensor bytes after the header
        metadata["modelspec.hash_sha256"] = "0x" + metadata["sshs_model_hash"]
    atomic.save_safetensors(path, tensors, metadata)
    return path


def weight_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    from safetensors.torch import save

    # only the training (ss_*) metadata enters the hash, so user edits of other fields keep it stable
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    body = data[8 + header_length:]
    legacy = io.BytesIO(data)
    legacy.seek(0x100000)
    return {"sshs_model_hash": hashlib.sha256(body).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(legacy.read(0x10000)).hexdigest()[:8]}


# keys no rewritten file may carry over: peft's own header (rewritten), and hashes of the old file's bytes
STALE_KEYS = ("format", "lora_adapter_metadata", "modelspec.hash_sha256", FOLDED_KEY)


def carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata a rewritten adapter keeps from its source: everything but peft's header and
    the hashes of the source file's bytes."""
    return {k: v for k, v in metadata.items() if k not in STALE_KEYS and not k.startswith("sshs_")}


def names_folder(out: str | Path) -> bool:
    """out= names a folder (an existing one, or a name ending in /) for the file's usual name."""
    return str(out).endswith(("/", os.sep)) or Path(out).expanduser().is_dir()


def file_stem(name: str) -> str:
    """A name safe as a file name and as A1111's <lora:NAME:1>."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "lora"


def convert(source: str | Path, to: str, out: str | Path, allow_pickle: bool = False,
            overwrite: bool = False) -> Path:
    """Rewrite an adapter in the other layout; metadata other than peft's travels along. `out`
    may be a folder (an existing one, or a name ending in /): the file gets its usual name there."""
    if to not in ("diffusers", "kohya"):
        raise AdapterError(f"to={to}: choose diffusers or kohya")
    as_folder = names_folder(out)
    out = Path(out).expanduser()
    adapter = read(source, allow_pickle)
    if as_folder:
        out = out / (DIFFUSERS_WEIGHT_NAME if to == "diffusers" else f"{kohya_file_stem(adapter, locate(source))}.safetensors")
    if out.exists() and not overwrite:
        raise AdapterError(f"out={out} already exists. Choose another name, or pass overwrite=true.")
    atomic.make_dirs(out.parent)
    if to == "kohya":  # the ss_* and ModelSpec keys A1111/Forge sort a LoRA by, rebuilt as train writes them
        return write_kohya(adapter, out, kohya_file_metadata(adapter, adapter.metadata, title=out.stem))
    return write_diffusers(adapter, out, carried_metadata(adapter.metadata))


def kohya_file_stem(adapter: Adapter, path: Path) -> str:
    """A kohya file's name for a converted adapter: the name it was trained under, else its own;
    from a checkpoint folder with its step too (sks_dog-000750), as the checkpoint names its own."""
    name = adapter.metadata.get("ss_output_name") or adapter.metadata.get("lora_booth.name") or \
        (path.parent.name if path.name == DIFFUSERS_WEIGHT_NAME else path.stem)
    name = file_stem(name)
    step = adapter.metadata.get("lora_booth.steps", "")
    if (path.parent / "state.json").is_file() and step.isdigit() and not name.endswith(f"-{int(step):06d}"):
        name = f"{name}-{int(step):06d}"
    return name


def trained_config(path: str | Path) -> dict:
    """The training config an adapter file carries in its metadata (lora_booth.config), or {}
    for files made elsewhere. Only the header is read."""
    from safetensors import safe_open

    file = locate(path)
    try:
        check_adapter_file(file)
        with safe_open(str(file), framework="pt") as handle:
            return _config_json(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - metadata is a convenience: an unreadable one is as good as none
        return {}


# ---------------------------------------------------------------------------------------- training


def from_model(base) -> Adapter:
    """The trained adapters of a model, as the neutral form (fp32, on the CPU)."""
    from peft.utils import get_peft_model_state_dict

    from .lora import adapted_parts

    modules = {}
    for part, model in adapted_parts(base).items():
        config = model.peft_config["default"]
        patterns = {"lora_alpha": getattr(config, "lora_alpha", getattr(config, "alpha", None)),
                    "alpha_pattern": dict(config.alpha_pattern or {}), "r": config.r,
                    "rank_pattern": dict(config.rank_pattern or {})}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in get_peft_model_state_dict(model).items():
            module_path, _, leaf = key.removesuffix(".weight").rpartition(".")
            grouped.setdefault(module_path, {})[leaf] = value.detach().float().cpu()
        for module_path, tensors in grouped.items():
            rank = _rank_from_config(patterns, module_path)
            alpha = _alpha_from_config(patterns, module_path, rank)
            if "lora_A" in tensors:
                module = Module(tensors["lora_A"], tensors["lora_B"], alpha, tensors.get("lora_magnitude_vector"))
            else:
                module = lycoris.from_peft(tensors, rank, alpha, f"{part}.{module_path}")
            modules[(part, canonical_path(part, module_path))] = module
    return Adapter(modules, {}, "model")


def _pivotal_prompt(cfg) -> str:
    """The instance prompt as the adapter must be prompted: with pivotal tuning, the new tokens."""
    from .pivotal import rewrite

    return rewrite(cfg.data.instance_prompt, cfg.pivotal)


def run_metadata(cfg, base, step: int, counts: tuple[int, int] | None = None, started: float | None = None,
                 finished: float | None = None) -> dict[str, str]:
    """What a user (or `merge`, or a later `convert to=kohya`) needs to know about the adapter
    without its config file: every kohya ss_* key and ModelSpec key is rebuilt from these."""
    metadata = {
        "lora_booth.version": __version__,
        "lora_booth.name": output_name(cfg),
        "lora_booth.base_model": cfg.model.source,
        "lora_booth.family": base.family,
        **({"lora_booth.variant": base.variant} if getattr(base, "variant", "") else {}),  # FLUX.1: dev or schnell
        "lora_booth.prediction_type": base.prediction_type,
        "lora_booth.trigger_prompt": _pivotal_prompt(cfg),
        "lora_booth.trigger_phrase": trigger_phrase(cfg),
        "lora_booth.class_prompt": cfg.prior.class_prompt,
        "lora_booth.type": cfg.lora.type,
        "lora_booth.rank": str(cfg.lora.rank),
        "lora_booth.alpha": str(cfg.lora.rank if cfg.lora.alpha is None else cfg.lora.alpha),
        "lora_booth.steps": str(step),
        "lora_booth.resolution": str(cfg.data.resolution),
        "lora_booth.config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if counts is not None:
        metadata["lora_booth.instance_images"], metadata["lora_booth.class_images"] = map(str, counts)
        metadata["lora_booth.dataset"] = json.dumps(dataset_summary(cfg, counts[1]), sort_keys=True)
    if started is not None:
        metadata["lora_booth.started"] = str(started)
    if finished is not None:
        metadata["lora_booth.finished"] = str(finished)
    legacy = legacy_model_hash(cfg.model.source)
    if legacy:
        metadata["lora_booth.base_model_hash"] = legacy
    return metadata


def subject_words(cfg) -> list[str]:
    """The words that name the subject: the trigger words and the class prompt's last word
    (["sks", "dog"] of "a photo of sks dog" / "a photo of dog")."""
    from .trigger import candidates

    words = [w.strip(",.;:()") for w in candidates(cfg)]
    class_word = cfg.prior.class_prompt.split()[-1].strip(",.;:()") if cfg.prior.class_prompt.split() else ""
    return [w for w in [*words, class_word] if w]


def trigger_phrase(cfg) -> str:
    """The words that call up the subject (trigger + class word, "sks dog"), for ModelSpec's
    trigger_phrase, which front-ends may add to a prompt; with pivotal tuning, its new tokens."""
    phrase = " ".join(subject_words(cfg)) or cfg.data.instance_prompt
    if cfg.pivotal.enabled:
        from .pivotal import rewrite
        return rewrite(phrase, cfg.pivotal)
    return phrase


def dataset_summary(cfg, class_images: int) -> dict:
    """What kohya records of the photos: per folder its repeats and image count (ss_dataset_dirs,
    keyed by folder name as kohya keys them), how often each comma-separated tag of the captions
    occurs, once per image (ss_tag_frequency; an image without a caption file counts its prompt),
    and the rows of one epoch with repeats (ss_num_train_images). Read off the folder: captions only."""
    from . import data

    try:
        folder = data.resolve_dir(cfg.data.instance_dir)
        sources = data.image_sources(folder, "data.instance_dir", cfg.data.caption_ext, cfg.data.instance_prompt,
                                     cfg.data.repeats)
        dirs: dict[str, dict[str, int]] = {}
        tags: dict[str, dict[str, int]] = {}
        for path, prompt, repeats in sources:
            entry = dirs.setdefault(path.parent.name, {"n_repeats": repeats, "img_count": 0})
            entry["img_count"] += 1
            caption = data.caption_for(path, cfg.data.caption_ext)
            counted = tags.setdefault(path.parent.name, {})
            for tag in (data.read_caption(caption) if caption else prompt).split(","):
                if tag.strip():
                    counted[tag.strip()] = counted.get(tag.strip(), 0) + 1
    except (LoraBoothError, OSError):  # the photos moved since training: the summary is a convenience
        return {}
    class_dir = Path(cfg.prior.class_dir).name if cfg.prior.class_dir else "class_images"
    return {"dirs": dirs, "tags": tags, "rows": sum(n for _, _, n in sources),
            "reg_dirs": {class_dir: {"n_repeats": 1, "img_count": class_images}} if class_images else {}}


def legacy_model_hash(source: str) -> str:
    """kohya's ss_sd_model_hash, A1111's old model hash: SHA-256 of the 64 KiB at 1 MiB of a
    single-file checkpoint, 8 hex digits (cheap). Folders and hub ids have none, as in kohya."""
    path = Path(source).expanduser()
    if not path.is_file():
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    except OSError:
        return ""


# kohya's ss_base_model_version and ModelSpec's architecture ids (sd-scripts library/model_util.py,
# sdxl_model_util.py, sai_model_spec.py). Every adapter kind gets "/lora": sd-scripts writes that for
# LyCORIS networks too, and Forge matches "stable-diffusion-xl-v1-base/lora" exactly.
MODELSPEC_VERSION = "1.0.1"
# keys an older lora-booth wrote that kohya never writes: the first two say what ss_base_model_version
# and ss_text_encoder_lr already say, the third was written empty
NOT_KOHYA_KEYS = ("ss_v_parameterization", "ss_network_train_unet_only", "ss_new_sd_model_hash")


def kohya_file_metadata(adapter: Adapter, source: dict[str, str], family: str = "", title: str = "",
                        now: float | None = None) -> dict[str, str]:
    """The whole metadata of a kohya file written from `adapter` (train, convert, resize, combine):
    `source`'s keys carried (not peft's, not the old hashes); the ss_* training keys rebuilt from
    lora-booth's own keys when the source has them (lora_booth.*, the config JSON), else the
    source's ss_* keys kept; the network keys (module, dim, alpha, args) from the adapter itself,
    so a resized or combined adapter states its own rank; base model version and ModelSpec from
    the family. A1111 and Forge sort a LoRA under SD 1/SD 2/SDXL by these keys."""
    metadata = {k: v for k, v in carried_metadata(source).items() if k not in NOT_KOHYA_KEYS}
    family = family or source.get("lora_booth.family") or adapter.family()
    v_prediction = source.get("lora_booth.prediction_type") == "v_prediction" or \
        str(source.get("ss_base_model_version", "")).endswith("_v") or source.get("ss_v_parameterization") == "True"
    config = _config_json(source)
    if config:
        try:
            metadata.update(_training_keys(config, source, family))
        except (TypeError, ValueError, OverflowError, OSError, KeyError, AttributeError):
            config = {}  # the file's config JSON is not what lora-booth writes: keep its own ss_* keys instead
    metadata.pop("ss_network_args", None)
    metadata.update(_network_keys(adapter, config, source))
    kind = families.get(family)
    if kind is None:  # a test-sized model of no known family: no family keys
        return metadata
    metadata["ss_base_model_version"] = kind.base_model_version(v_prediction)
    metadata["ss_v2"] = str(kind.base_model_version(False).startswith("sd_v2"))
    timestamp = _timestamp(source.get("lora_booth.finished") or source.get("ss_training_finished_at"),
                           now if now is not None else time.time())
    resolution = _resolution(config, source) or kind.default_resolution
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": kind.modelspec_architecture(v_prediction, source.get("lora_booth.variant", "")),
        "modelspec.implementation": kind.modelspec_implementation,
        "modelspec.title": source.get("modelspec.title") or source.get("lora_booth.name")
                           or source.get("ss_output_name") or title or "LoRA",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": source.get("modelspec.date") or datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if source.get("lora_booth.trigger_phrase"):
        spec["modelspec.trigger_phrase"] = source["lora_booth.trigger_phrase"]
    metadata.update(spec)
    return metadata


def _config_json(source: dict[str, str]) -> dict:
    """The lora_booth.config JSON of a file's metadata when it has a config's shape (sections of
    keys), else {}."""
    try:
        config = json.loads(source.get("lora_booth.config") or "{}")
    except (ValueError, RecursionError):  # not JSON, or nested deep enough to exhaust the parser
        return {}
    return config if isinstance(config, dict) and all(isinstance(v, dict) for v in config.values()) else {}


def _number_or(value, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


LATEST_TIMESTAMP = 4e9  # a file's dates are untrusted: anything past 2096 (or before 1970) is not a date


def _timestamp(value, default: float) -> float:
    number = _number_or(value, default)
    return number if 0 <= number < LATEST_TIMESTAMP else default


def _resolution(config: dict, source: dict[str, str]) -> int | None:
    if isinstance(config.get("data", {}).get("resolution"), int):
        return config["data"]["resolution"]
    found = re.findall(r"\d+", str(source.get("ss_resolution", "")))
    return int(found[0]) if found else None


def _training_keys(config: dict, source: dict[str, str], family: str) -> dict[str, str]:
    """kohya train_network.py's ss_* keys, from a lora-booth run's config and metadata. Keys kohya
    writes only for things lora-booth does not do (a separate VAE, a dataset .toml's ss_datasets,
    aspect-bucket statistics) are left out rather than filled with made-up values."""
    section = lambda name: config.get(name) or {}  # noqa: E731
    lora, data, prior, optim, train = (section(n) for n in ("lora", "data", "prior", "optim", "train"))
    model, objective, launch = section("model"), section("objective"), section("launch")
    dataset = _json_or(source.get("lora_booth.dataset"), {})
    per_step = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1)) * int(launch.get("processes", 1))
    rows = int(dataset.get("rows") or _number_or(source.get("lora_booth.instance_images"), 0) * data.get("repeats", 1))
    steps = int(_number_or(source.get("lora_booth.steps"), 0))
    lr = optim.get("lr")
    te_lr = optim.get("text_encoder_lr") if optim.get("text_encoder_lr") is not None else lr
    source_name = str(model.get("source", ""))
    keys = {
        "ss_network_dropout": str(lora.get("dropout", 0.0)),
        "ss_sd_model_name": Path(source_name).name if Path(source_name).expanduser().exists() else source_name,
        "ss_resolution": f"({data.get('resolution')}, {data.get('resolution')})",
        "ss_max_train_steps": str(train.get("max_steps")),
        "ss_steps": str(steps),
        "ss_num_train_images": str(rows),
        "ss_num_reg_images": str(source.get("lora_booth.class_images", 0)),
        "ss_prior_loss_weight": str(prior.get("weight")),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(te_lr if lora.get("text_encoder") else 0.0),
        "ss_lr_scheduler": str(optim.get("schedule")),
        "ss_lr_warmup_steps": str(optim.get("warmup_steps")),
        "ss_optimizer": str(optim.get("optimizer")),
        "ss_max_grad_norm": str(optim.get("max_grad_norm")),
        "ss_mixed_precision": str(train.get("mixed_precision")),
        "ss_gradient_checkpointing": str(bool(train.get("gradient_checkpointing"))),
        "ss_gradient_accumulation_steps": str(train.get("grad_accum")),
        "ss_batch_size_per_device": str(train.get("batch_size")),
        "ss_total_batch_size": str(per_step),
        "ss_min_snr_gamma": str(objective.get("min_snr_gamma")),
        "ss_noise_offset": str(objective.get("noise_offset")),
        "ss_seed": str(train.get("seed")),
        "ss_cache_latents": str(bool(data.get("cache_latents"))),
        "ss_enable_bucket": str(bool(data.get("buckets"))),
        "ss_flip_aug": str(bool(data.get("flip"))),
        "ss_random_crop": str(data.get("crop") == "random"),
        # SD 1.x/2.x condition on the text encoder's last layer (diffusers' SD 2 encoder is OpenCLIP's
        # penultimate already); SDXL's penultimate layer is fixed, and kohya writes None for it
        "ss_clip_skip": (families.get(family) or families.SD1).clip_skip,
        "ss_output_name": source.get("lora_booth.name") or str(source.get("ss_output_name", "")),
        "ss_training_comment": f"trigger: {source.get('lora_booth.trigger_prompt', data.get('instance_prompt', ''))}"
                               + (f"; class: {prior.get('class_prompt')}" if float(prior.get("weight") or 0) > 0 else ""),
    }
    if rows:
        batches = math.ceil(rows / max(1, int(train.get("batch_size", 1)) * int(launch.get("processes", 1))))
        keys["ss_num_batches_per_epoch"] = str(batches)
        keys["ss_num_epochs"] = str(math.ceil(int(train.get("max_steps") or 0) * per_step / rows))
        keys["ss_epoch"] = str(math.ceil(steps * per_step / rows))
    if dataset.get("dirs"):
        keys["ss_dataset_dirs"] = json.dumps(dataset["dirs"])
        keys["ss_reg_dataset_dirs"] = json.dumps(dataset.get("reg_dirs", {}))
        keys["ss_tag_frequency"] = json.dumps(dataset.get("tags", {}))
    for ours, theirs in (("lora_booth.started", "ss_training_started_at"),
                         ("lora_booth.finished", "ss_training_finished_at")):
        if source.get(ours):
            keys[theirs] = source[ours]
    if source.get("lora_booth.started"):  # kohya: one random id per training launch; here, per run start
        name = f"{source.get('lora_booth.name')}|{source['lora_booth.started']}"
        keys["ss_session_id"] = str(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if source.get("lora_booth.base_model_hash"):
        keys["ss_sd_model_hash"] = source["lora_booth.base_model_hash"]
    return keys


def _json_or(text, default):
    try:
        value = json.loads(text) if text else default
    except (ValueError, RecursionError):
        return default
    return value if isinstance(value, type(default)) else default


def _network_keys(adapter: Adapter, config: dict, source: dict[str, str]) -> dict[str, str]:
    """ss_network_module/dim/alpha/args of `adapter`: networks.lora for LoRA (conv_dim/conv_alpha
    when it adapts 3×3 convolutions, kohya's LoCon), LyCORIS's module and algo otherwise, as
    LyCORIS's kohya plugin records them; other arguments of the source's own network (same module
    and algo) stay. dim/alpha: the denoiser's (UNet's, transformer's) most common rank and alpha."""
    from collections import Counter

    kind = adapter_kind(adapter.modules.values())
    lora = config.get("lora") or {}
    if kind in ("loha", "lokr") and lora.get("rank"):  # the rank trained; a LoKr factor's size says little
        rank, alpha = int(lora["rank"]), float(lora.get("alpha") or lora["rank"])
    else:
        pairs = [(int(m.rank), float(m.alpha)) for (part, _), m in adapter.modules.items()
                 if part in families.denoisers()] or \
                [(int(m.rank), float(m.alpha)) for m in adapter.modules.values()]
        rank, alpha = Counter(pairs).most_common(1)[0][0] if pairs else (0, 0.0)
    spatial = [m for m in adapter.modules.values()
               if isinstance(m, Module) and m.down.ndim == 4 and tuple(m.down.shape[2:]) != (1, 1)]
    conv = {"conv_dim": str(spatial[0].rank), "conv_alpha": str(float(spatial[0].alpha))} if spatial else {}
    module = "networks.lora" if kind == "lora" else "lycoris.kohya"
    if kind == "lora":
        args = conv
    elif kind == "dora":
        axis = next(m.magnitude_axis for m in adapter.modules.values())
        args = {"algo": "lora", "dora_wd": "True", "wd_on_output": str(axis == "out"), **conv}
    else:
        args = {"algo": kind, **conv}
    before = _json_or(source.get("ss_network_args"), {})
    if source.get("ss_network_module") == module and before.get("algo") == args.get("algo"):
        args = {**before, **args}
    keys = {"ss_network_module": module, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    return {**keys, "ss_network_args": json.dumps(args)} if args else keys


LOADERS = {
    "lora": "diffusers load_lora_weights (both files), A1111/Forge/ComfyUI (kohya file)",
    "dora": "diffusers load_lora_weights reads the diffusers file exactly; the kohya file (LyCORIS's dora_scale, "
            "per output row as trained) is exact in LyCORIS and lora-booth, but ComfyUI and Forge divide by the base "
            "weight's norm instead of the adapted one's and A1111 reads only per-input-column DoRA, so no DoRA file "
            "loads at the trained weights there (docs/adapter-types.md). For those tools: `lora-booth convert in=OUT "
            "to=kohya dora=bake rank=N out=NAME-lora.safetensors` (a plain LoRA, its error printed) or `lora-booth merge`",
    "loha": "diffusers' load_lora_weights cannot load LoHa for SD 1.x/2.x/SDXL; use the kohya (LyCORIS) file "
            "in A1111/Forge/ComfyUI, or lora-booth generate/merge",
    "lokr": "diffusers' load_lora_weights cannot load LoKr for SD 1.x/2.x/SDXL; use the kohya (LyCORIS) file "
            "in A1111/Forge/ComfyUI, or lora-booth generate/merge",
}


def dora_warning(cfg, out_dir: Path, kohya_stem: str | None = None) -> str | None:
    """The line the end of a DoRA run prints: which tools read its kohya file wrong, and the exact
    command for a plain-LoRA file they all load (None for other kinds, or without a kohya file)."""
    if cfg.lora.type != "dora" or "kohya" not in cfg.save.formats:
        return None
    name = kohya_stem or output_name(cfg)
    return (f"warning: ComfyUI, Forge and A1111 do not load the DoRA file {name}.safetensors at the trained weights "
            "(no DoRA file can satisfy all three; LyCORIS and lora-booth read it exactly). For them, bake it into a "
            f"plain LoRA: lora-booth convert in={out_dir} to=kohya dora=bake rank={2 * cfg.lora.rank} "
            f"out={Path(out_dir) / (name + '-lora.safetensors')} (prints the approximation error; a higher rank is closer)")


def kohya_gap_warning(kohya_file: Path, diffusers_written: bool) -> str | None:
    """The line the end of a FLUX.1 run prints when its kohya file adapts modules that diffusers'
    kohya reader drops silently (flux_layout.dropped_by_diffusers): which file to give diffusers."""
    # the tensor names from the header lora-booth just wrote (safetensors' own reader refuses a path
    # that is not UTF-8, which a user's folder may be)
    with open(kohya_file, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    dropped = flux_layout.dropped_by_diffusers(name for name in header if name != "__metadata__")
    if not dropped:
        return None
    fix = (f"give diffusers {DIFFUSERS_WEIGHT_NAME}, which it loads whole" if diffusers_written else
           f"for diffusers, convert it: lora-booth convert in={kohya_file} to=diffusers out={kohya_file.parent}/")
    return (f"note: {kohya_file.name} adapts {', '.join(dropped)}, which diffusers' load_lora_weights drops from a "
            f"kohya-layout FLUX.1 file without a warning (ComfyUI and Forge read them): {fix}")


def output_name(cfg) -> str:
    """The kohya file's name, which A1111 shows as <lora:NAME:1>: save.name, else the subject the
    prompts name (trigger + class word: "sks_dog"), else the output folder's name."""
    subject = "_".join(subject_words(cfg))
    return file_stem(cfg.save.name or subject or Path(cfg.save.output_dir).expanduser().resolve().name or "lora")


def save_trained(base, out_dir: Path, cfg, step: int, counts: tuple[int, int], started: float,
                 finished: float, kohya_stem: str | None = None) -> list[Path]:
    """Write the formats in save.formats: diffusers (pytorch_lora_weights.safetensors) and/or kohya
    (<name>.safetensors, or `kohya_stem`.safetensors), with the run's metadata in each."""
    adapter = from_model(base)
    dtype = SAVE_DTYPES[cfg.save.dtype]
    metadata = run_metadata(cfg, base, step, counts, started, finished)
    written = []
    if "diffusers" in cfg.save.formats:
        written.append(write_diffusers(adapter, out_dir / DIFFUSERS_WEIGHT_NAME, metadata, dtype))
    if "kohya" in cfg.save.formats:  # the same rule as `convert to=kohya` of the diffusers file
        written.append(write_kohya(adapter, out_dir / f"{kohya_stem or output_name(cfg)}.safetensors",
                                   kohya_file_metadata(adapter, metadata, base.family), dtype, base.family))
    return written
