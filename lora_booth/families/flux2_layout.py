"""FLUX.2's two namings of one transformer: diffusers' Flux2Transformer2DModel and Black Forest
Labs' original modules (what BFL ships, what ComfyUI holds as a single file, and what ComfyUI
maps a `lora_unet_<BFL name>` LoRA onto). BFL fuses a double block's q, k and v into one Linear
(`img_attn.qkv`, `txt_attn.qkv`, rows [q; k; v]); everything else is one module each, a single
block's fused `linear1`/`linear2` included (diffusers keeps them fused too: to_qkv_mlp_proj,
to_out). Checked against diffusers' convert_flux2_transformer_checkpoint_to_diffusers
(tests/test_flux2.py)."""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..io.errors import AdapterError
from .flux_layout import _fuse, _single

# BFL's module inside a block → the diffusers modules whose weights it stacks, in row order
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
          "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
           "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
           "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
           "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
           "single_stream_modulation.lin": "single_stream_modulation.linear",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
SWAPPED = "final_layer.adaLN_modulation.1"  # BFL's rows are (shift, scale), diffusers' (scale, shift)
# RMSNorm scales of the attention (BFL: `.scale`, diffusers: `.weight`); single blocks have no img_/txt_ level
NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
         "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
# a tensor every FLUX.2 transformer file has and no FLUX.1 file has
MARKER = "single_stream_modulation.lin.weight"


def original_name(module: str) -> tuple[str, int, int]:
    """A diffusers module ("transformer_blocks.0.attn.to_k") → (BFL module holding its weight
    "double_blocks.0.img_attn.qkv", its slot among the stacked parts, how many parts are stacked)."""
    block = _BLOCK.fullmatch(module)
    if block:
        kind, index, rest = block.groups()
        table, name = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        for bfl, parts in table.items():
            if rest in parts:
                return f"{name}.{index}.{bfl}", parts.index(rest), len(parts)
    for bfl, path in OUTSIDE.items():
        if module == path:
            return bfl, 0, 1
    raise AdapterError(f"{module}: not a Flux2Transformer2DModel module that BFL's FLUX.2 layout names")


def original_tensor_name(name: str) -> tuple[str, int, int, bool]:
    """A Flux2Transformer2DModel state-dict name → (BFL key, slot, parts stacked, halves swapped):
    the weight is the slot-th of `parts` equal row blocks of the BFL tensor."""
    module, _, leaf = name.rpartition(".")
    block = _BLOCK.fullmatch(module)
    if block and block.group(3) in NORMS and leaf == "weight":
        kind = "double_blocks" if block.group(1) == "transformer_blocks" else "single_blocks"
        norm = NORMS[block.group(3)] if kind == "double_blocks" else NORMS[block.group(3)].split(".", 1)[1]
        return f"{kind}.{block.group(2)}.{norm}.scale", 0, 1, False
    target, slot, parts = original_name(module)
    return f"{target}.{leaf}", slot, parts, target == SWAPPED


def single_file_prefix(keys) -> str | None:
    """"" (BFL's own files) or "model.diffusion_model." (ComfyUI's saves) for a FLUX.2 transformer
    file, None for any other file."""
    for prefix in ("", "model.diffusion_model."):
        if prefix + MARKER in keys:
            return prefix
    return None


def to_kohya(modules: dict) -> dict[str, Tensor]:
    """Plain LoRA modules ((part, path) → module with down, up, alpha) → `lora_unet_<BFL name>`
    tensors (musubi-tuner's FLUX.2 layout, which ComfyUI maps onto its BFL-named model). q, k and
    v of a double block stack into the fused qkv exactly (flux_layout._fuse: block-diagonal up)."""
    groups: dict[str, dict[int, tuple[Tensor, Tensor, float]]] = {}
    counts: dict[str, int] = {}
    for (part, path), module in modules.items():
        if getattr(module, "magnitude", None) is not None or not hasattr(module, "up"):
            raise AdapterError(f"{part}.{path}: FLUX.2's BFL layout holds plain LoRA modules only (q, k and v are "
                               "fused); keep the diffusers file for DoRA, LoHa and LoKr, or save.formats=diffusers")
        if part != "transformer":
            raise AdapterError(f"{part}.{path}: FLUX.2 adapters live on the transformer only")
        target, slot, count = original_name(path)
        groups.setdefault(target, {})[slot] = (module.down, module.up, float(module.alpha) / module.down.shape[0])
        counts[target] = count
    out: dict[str, Tensor] = {}
    for target, parts in sorted(groups.items()):
        name = "lora_unet_" + target.replace(".", "_")
        # _fuse knows FLUX.1's tables; a FLUX.2 qkv stacks the same three equal parts
        down, up, alpha = _fuse(target, parts, name) if counts[target] == 3 else _single(parts[0])
        if target == SWAPPED:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


# ------------------------------------------------------------------------- reading BFL-named files

_FLAT = {name.replace(".", "_"): name for name in (*DOUBLE, *SINGLE, *OUTSIDE)}
_KOHYA = re.compile(r"lora_unet_(double|single)_blocks_(\d{1,3})_(\w+)")
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
MAX_WIDTH = 1 << 16  # no FLUX.2 Linear is wider than 36864 (FLUX.2 [dev]'s linear1)


def is_flux2_kohya(tensors, metadata: dict) -> bool:
    """A kohya-layout file in BFL's names that is FLUX.2's, not FLUX.1's (the names are shared): its
    metadata says so, or a single block's linear1 has 9 outputs per input (q, k, v and SwiGLU's two
    MLP halves of 3 × the width; FLUX.1's has 7: q, k, v and a 4× GELU MLP)."""
    if not any(isinstance(key, str) and key.startswith("lora_unet_") for key in tensors):
        return False  # a diffusers-layout file, whatever its metadata carried over
    if str(metadata.get("ss_base_model_version", "")).startswith("flux2") or \
            str(metadata.get("modelspec.architecture", "")).startswith("flux-2"):
        return True
    for key, tensor in tensors.items():
        if isinstance(key, str) and key.endswith("_linear1.lora_up.weight") and isinstance(tensor, Tensor):
            down = tensors.get(key.replace(".lora_up.", ".lora_down."))
            if isinstance(down, Tensor) and down.ndim == 2 and tensor.ndim == 2 and tensor.shape[0] == 9 * down.shape[1]:
                return True
    return False


def from_kohya(tensors) -> tuple[dict[str, Tensor], dict[str, float]]:
    """A `lora_unet_<BFL name>` FLUX.2 LoRA → (diffusers tensors `transformer.<module>.lora_A.weight`
    / `.lora_B.weight`, alphas per `transformer.<module>`), exactly: a fused qkv whose up is
    block-diagonal splits into three parts of a third of its rank (alpha / 3), any other qkv by rows
    (every part keeping the whole down and alpha). The file is untrusted: every key must be a LoRA
    tensor of a FLUX.2 module with consistent shapes, else AdapterError naming the key."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in SUFFIXES if isinstance(key, str) and key.endswith(s)), None)
        if suffix is None or not isinstance(tensor, Tensor):
            raise AdapterError(f"{key}: not a LoRA tensor of the FLUX.2 kohya layout (.lora_down.weight, .lora_up.weight, "
                               ".alpha); LoHa, LoKr and DoRA files cannot be read in this layout")
        groups.setdefault(key[:-len(suffix)], {})[suffix] = tensor
    out: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    for name, parts in sorted(groups.items()):
        down, up = parts.get(".lora_down.weight"), parts.get(".lora_up.weight")
        if down is None or up is None:
            raise AdapterError(f"{name}: has no {'lora_down' if down is None else 'lora_up'} weight")
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or not down.is_floating_point() or \
                not up.is_floating_point() or max(down.shape[1], up.shape[0]) > MAX_WIDTH:
            raise AdapterError(f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} are not one Linear's LoRA")
        alpha = float(parts[".alpha"]) if ".alpha" in parts and parts[".alpha"].numel() == 1 else float(down.shape[0])
        if not math.isfinite(alpha) or alpha <= 0:
            raise AdapterError(f"{name}.alpha: {alpha} is not a positive number")
        for module, a, b, module_alpha in _split(name, down, up, alpha):
            out[f"transformer.{module}.lora_A.weight"] = a.contiguous().clone()
            out[f"transformer.{module}.lora_B.weight"] = b.contiguous().clone()
            alphas[f"transformer.{module}"] = module_alpha
    return out, alphas


def _split(name: str, down: Tensor, up: Tensor, alpha: float) -> list[tuple[str, Tensor, Tensor, float]]:
    block = _KOHYA.fullmatch(name)
    if block:
        kind, index, flat = block.groups()
        table, prefix = (DOUBLE, "transformer_blocks") if kind == "double" else (SINGLE, "single_transformer_blocks")
        if _FLAT.get(flat) not in table:
            raise AdapterError(f"{name}: not a module of FLUX.2's {kind} blocks ({', '.join(table)})")
        target, parts = _FLAT[flat], [f"{prefix}.{int(index)}.{p}" for p in table[_FLAT[flat]]]
    elif name.startswith("lora_unet_") and _FLAT.get(name[len("lora_unet_"):]) in OUTSIDE:
        target = _FLAT[name[len("lora_unet_"):]]
        parts = [OUTSIDE[target]]
    else:
        raise AdapterError(f"{name}: not a module of the FLUX.2 kohya layout (lora_unet_double_blocks_N_…, "
                           "lora_unet_single_blocks_N_…, lora_unet_img_in …)")
    if target == SWAPPED:
        up = torch.cat(up.chunk(2, dim=0)[::-1])
    if len(parts) == 1:
        return [(parts[0], down, up, alpha)]
    if up.shape[0] % 3:
        raise AdapterError(f"{name}: {up.shape[0]} outputs do not split into q, k and v")
    rows, rank = up.chunk(3, dim=0), down.shape[0]
    r = rank // 3
    if rank % 3 == 0 and all(not block[:, :s * r].any() and not block[:, (s + 1) * r:].any()
                             for s, block in enumerate(rows)):
        pieces = [(p, down[s * r:(s + 1) * r], rows[s][:, s * r:(s + 1) * r], alpha / 3) for s, p in enumerate(parts)]
    else:
        pieces = [(p, down, rows[s], alpha) for s, p in enumerate(parts)]
    return [piece for piece in pieces if bool(piece[2].any())]  # a part without an update was not trained
