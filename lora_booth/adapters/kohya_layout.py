"""kohya's layout (AUTOMATIC1111, ComfyUI, Forge): `lora_unet_<module with _>.lora_down.weight`,
`.lora_up.weight`, `.alpha`, `lora_te_…` for the text encoder (SDXL: `lora_te1_`/`lora_te2_`, the UNet
in its original block names), FLUX.1 in Black Forest Labs' names."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import families
from ..families import flux_layout, ldm
from ..families import flux_reading
from ..io import atomic
from ..io.errors import AdapterError
from ..model import lycoris
from .file_metadata import weight_hashes
from .neutral import Adapter, Module, _cast, canonical_path
from .untrusted import _scalar


# each family's kohya names (lora_unet_, lora_te_ / lora_te1_, lora_te2_) → the part they name
KOHYA_READ_PREFIXES = families.kohya_read_prefixes()


# a UNet named in the original layout (kohya's SDXL names) starts with one of these blocks
LDM_UNET_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")


# Segments of module names that contain "_" themselves: kohya's flat names erase the dots, so
# reading them back needs to know which underscores belong to a name.
_COMPOUND = ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "input_blocks", "output_blocks",
             "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "to_q", "to_k", "to_v", "to_out",
             "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "text_model",
             "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "time_embedding", "add_embedding",
             "linear_1", "linear_2", "add_k_proj", "add_v_proj", "final_layer_norm", "layer_norm1", "layer_norm2",
             "token_embedding", "position_embedding", "text_projection", "conv_norm_out",
             *(word for family in families.FAMILIES.values() for word in family.kohya_compounds)]


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


def _from_kohya(tensors: dict, metadata: dict, path: Path) -> Adapter:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        groups.setdefault(name, {})[kind] = value
    modules = {}
    hint = _family_of_kohya_names(groups)
    # kohya names every denoiser lora_unet_: the part is the denoiser of the family the file names
    known = families.get(hint or metadata.get("lora_booth.family", ""))
    denoiser = known.denoiser if known is not None else "unet"
    for name, parts in groups.items():
        part, module_path = parse_kohya_name(name)
        part = denoiser if part == "unet" else part
        modules[(part, canonical_path(part, module_path))] = _kohya_module(name, parts, path)
    return Adapter(modules, metadata, "kohya", hint)


def _from_family_kohya(family, split: dict, alphas: dict, metadata: dict, path: Path) -> Adapter:
    """A file in a family's own kohya layout, already split into diffusers modules by the family."""
    modules = {}
    for module_key, alpha in alphas.items():
        part, _, module_path = module_key.partition(".")
        modules[(part, canonical_path(part, module_path))] = Module(
            split[f"{module_key}.lora_A.weight"], split[f"{module_key}.lora_B.weight"], float(alpha))
    if not modules:
        raise AdapterError(f"{path}: holds no LoRA weights")
    return Adapter(modules, metadata, "kohya", family.name)


def _from_flux_kohya(tensors: dict, metadata: dict, path: Path) -> Adapter:
    """A FLUX.1 LoRA in kohya's (BFL's) names: q, k, v (and a single block's MLP input) split
    back out of their fused modules, exactly (flux_layout)."""
    try:
        split, alphas = flux_reading.from_kohya(tensors)
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
