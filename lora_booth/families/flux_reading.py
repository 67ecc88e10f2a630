"""Reading a FLUX.1 file in Black Forest Labs' names back (sd-scripts' kohya layout, ComfyUI's): its
tensors grouped by module, checked (a file from elsewhere is untrusted: names, blocks, widths, ranks),
and each fused module split exactly into diffusers' parts (flux_layout.py says how)."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .flux_layout import (_FLAT, _KOHYA_BLOCK, _KOHYA_CLIP, _KOHYA_SUFFIXES, CLIP_MODULES, DOUBLE, MAX_BLOCK,
                          MLP_RATIO, OUTSIDE, SINGLE, SWAPPED, FluxLayoutError, _check_pair, _fused_rows, _parts_of)


def _parse_kohya(name: str, key: str) -> tuple[str, str, int | None]:
    """kohya module name → (part, BFL or CLIP module path, block index or None)."""
    match = _KOHYA_BLOCK.fullmatch(name)
    if match:
        kind, index, flat = match.groups()
        if flat in _FLAT and _FLAT[flat] in (DOUBLE if kind == "double" else SINGLE):
            return "transformer", f"{kind}_blocks.{_index(index, key)}.{_FLAT[flat]}", int(index)
    elif name.startswith("lora_unet_") and _FLAT.get(name[len("lora_unet_"):]) in OUTSIDE:
        return "transformer", _FLAT[name[len("lora_unet_"):]], None
    match = _KOHYA_CLIP.fullmatch(name)
    if match and _FLAT.get(match.group(2)) in CLIP_MODULES:
        return "text_encoder", f"text_model.encoder.layers.{_index(match.group(1), key)}.{_FLAT[match.group(2)]}", None
    if name.startswith(("lora_te2_", "lora_te3_")):
        raise FluxLayoutError(f"{key}: a T5-XXL adapter ({name[:9]}…); lora-booth reads FLUX.1 files for the "
                              "transformer and CLIP-L (lora_te1_) only")
    raise FluxLayoutError(f"{key}: not a module of kohya's FLUX.1 layout (lora_unet_double_blocks_N_…, "
                          "lora_unet_single_blocks_N_…, lora_unet_img_in …, lora_te1_text_model_…)")


def _index(text: str, key: str) -> int:
    if len(text) > 4 or int(text) >= MAX_BLOCK or (len(text) > 1 and text[0] == "0"):
        raise FluxLayoutError(f"{key}: block index {text} is not one a FLUX.1 model has")
    return int(text)


def from_kohya(tensors: Mapping[str, Tensor], config: Mapping | None = None
               ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """A kohya-layout FLUX.1 LoRA (sd-scripts, ai-toolkit; ComfyUI's `diffusion_model.` spelling of
    the same names too) → (diffusers tensors `transformer.<module>.lora_A.weight` / `.lora_B.weight`,
    `text_encoder.…`; alphas per module `transformer.<module>`), exactly. The file is untrusted:
    every key must be a LoRA tensor of a known module, shapes must fit FLUX.1's layout (widths
    from the file itself, or from `config`, a FluxTransformer2DModel config, which also bounds the
    block indices), else FluxLayoutError naming the key. A missing alpha means alpha = rank."""
    groups = _kohya_groups(tensors)
    width = _width(groups, config)
    out: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    for name, (key, part, target, index, down, up, alpha) in sorted(groups.items()):
        _check_block(key, target, index, config)
        _check_widths(key, target, down, up, width)
        pieces = _split(target, down, up, alpha) if part == "transformer" else [(target, down, up, alpha)]
        for module, a, b, module_alpha in pieces:
            if target == SWAPPED:
                b = torch.cat(b.chunk(2, dim=0)[::-1])
            path = f"{part}.{module}"
            out[f"{path}.lora_A.weight"] = a.contiguous().clone()
            out[f"{path}.lora_B.weight"] = b.contiguous().clone()
            alphas[path] = module_alpha
    return out, alphas


def _kohya_groups(tensors: Mapping[str, Tensor]) -> dict:
    """kohya module name → (a key of it, part, module path, block index, down, up, alpha), checked."""
    named: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, Tensor):
            raise FluxLayoutError(f"{key!r}: not a named tensor")
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise FluxLayoutError(f"{key}: not a LoRA tensor of kohya's layout (.lora_down.weight, .lora_up.weight, "
                                  ".alpha); LoHa, LoKr, DoRA and diff keys cannot be converted to a diffusers LoRA")
        name = _kohya_spelling(key[:-len(suffix)])
        if suffix in named.get(name, {}):
            raise FluxLayoutError(f"{key}: module {name} appears twice (kohya's and ComfyUI's spelling)")
        named.setdefault(name, {})[suffix] = (key, tensor)
    groups = {}
    for name, entries in named.items():
        key = next(iter(entries.values()))[0]
        part, target, index = _parse_kohya(name, key)
        if _KOHYA_SUFFIXES[0] not in entries or _KOHYA_SUFFIXES[1] not in entries:
            raise FluxLayoutError(f"{key}: module {name} lacks its lora_down or lora_up weight")
        down, up = entries[_KOHYA_SUFFIXES[0]][1], entries[_KOHYA_SUFFIXES[1]][1]
        _check_pair(down, up, key)
        if not down.shape[0] <= max(down.shape[1], up.shape[0]):
            raise FluxLayoutError(f"{key}: rank {down.shape[0]} exceeds both the module's inputs ({down.shape[1]}) "
                                  f"and outputs ({up.shape[0]})")
        alpha = float(down.shape[0])
        if _KOHYA_SUFFIXES[2] in entries:
            alpha_key, value = entries[_KOHYA_SUFFIXES[2]]
            if value.numel() != 1 or value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                         torch.int32, torch.int64):
                raise FluxLayoutError(f"{alpha_key}: alpha must be one number, got a {value.dtype} tensor of shape "
                                      f"{tuple(value.shape)}")
            alpha = float(value.reshape(()).item())
            if not math.isfinite(alpha) or alpha <= 0:
                raise FluxLayoutError(f"{alpha_key}: alpha {alpha} (sd-scripts reads 0 as alpha = rank, ComfyUI as "
                                      "scale 0); a FLUX.1 file needs a positive alpha")
        groups[name] = (key, part, target, index, down, up, alpha)
    return groups


def _kohya_spelling(name: str) -> str:
    """ComfyUI's `diffusion_model.double_blocks.0.img_attn.qkv` → `lora_unet_double_blocks_0_img_attn_qkv`."""
    if name.startswith("diffusion_model."):
        return "lora_unet_" + name[len("diffusion_model."):].replace(".", "_")
    if name.startswith("text_encoders.clip_l.transformer."):
        return "lora_te1_" + name[len("text_encoders.clip_l.transformer."):].replace(".", "_")
    return name


def _width(groups: dict, config: Mapping | None) -> int | None:
    """The blocks' width w: from the config, else the input width of every block module that takes
    the hidden state (they must agree)."""
    if config is not None:
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    widths = {(down.shape[1], key) for key, part, target, _, down, _, _ in groups.values()
              if part == "transformer" and target.split(".", 2)[-1] in
              ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "txt_mlp.0",
               "img_mod.lin", "txt_mod.lin", "linear1", "modulation.lin")}
    if len({w for w, _ in widths}) > 1:
        (w1, k1), (w2, k2) = sorted(widths)[0], sorted(widths)[-1]
        raise FluxLayoutError(f"{k2}: a block {w2} wide, while {k1} is {w1} wide")
    return next(iter(widths))[0] if widths else None


def _check_block(key: str, target: str, index: int | None, config: Mapping | None) -> None:
    if index is None or config is None:
        return
    limit = config["num_layers"] if target.startswith("double_blocks.") else config["num_single_layers"]
    if index >= int(limit):
        raise FluxLayoutError(f"{key}: block {index}, while the model has {limit} of that kind")


def _check_widths(key: str, target: str, down: Tensor, up: Tensor, width: int | None) -> None:
    """(in, out) of the module in FLUX.1's layout, where the width fixes them."""
    if width is None or target.startswith("text_model."):
        return
    mlp = MLP_RATIO * width
    name = target.split(".", 2)[-1] if "blocks." in target else target
    expected = {"img_attn.qkv": (width, 3 * width), "txt_attn.qkv": (width, 3 * width),
                "img_attn.proj": (width, width), "txt_attn.proj": (width, width),
                "img_mlp.0": (width, mlp), "txt_mlp.0": (width, mlp), "img_mlp.2": (mlp, width),
                "txt_mlp.2": (mlp, width), "img_mod.lin": (width, 6 * width), "txt_mod.lin": (width, 6 * width),
                "linear1": (width, 3 * width + mlp), "linear2": (width + mlp, width),
                "modulation.lin": (width, 3 * width), "final_layer.adaLN_modulation.1": (width, 2 * width),
                "img_in": (None, width), "txt_in": (None, width), "time_in.in_layer": (None, width),
                "time_in.out_layer": (width, width), "vector_in.in_layer": (None, width),
                "vector_in.out_layer": (width, width), "guidance_in.in_layer": (None, width),
                "guidance_in.out_layer": (width, width), "final_layer.linear": (width, None)}[name]
    got = (down.shape[1], up.shape[0])
    if any(e is not None and e != g for e, g in zip(expected, got)):
        shown = tuple("any" if e is None else e for e in expected)
        raise FluxLayoutError(f"{key}: (in, out) = {got}, while FLUX.1's {name} of a {width}-wide model is {shown}")


def _split(target: str, down: Tensor, up: Tensor, alpha: float) -> list[tuple[str, Tensor, Tensor, float]]:
    """A BFL module's LoRA → one per diffusers module it stacks (prefix `…blocks.N.` restored)."""
    parts = _parts_of(target)
    block = "" if len(parts) == 1 and target in OUTSIDE else \
        ("transformer_blocks." if target.startswith("double_blocks.") else "single_transformer_blocks.") + \
        target.split(".", 2)[1] + "."
    if len(parts) == 1:
        return [(block + parts[0], down, up, alpha)]
    dims = _fused_rows(target, down.shape[1])
    rank, slots = down.shape[0], len(parts)
    rows = up.split(dims, dim=0)
    if rank % slots == 0 and _block_diagonal(rows, rank // slots):
        r = rank // slots
        pieces = [(block + p, down[s * r:(s + 1) * r], rows[s][:, s * r:(s + 1) * r], alpha / slots)
                  for s, p in enumerate(parts)]
    else:
        pieces = [(block + p, down, rows[s], alpha) for s, p in enumerate(parts)]
    return [piece for piece in pieces if bool(piece[2].any())]


def _block_diagonal(rows: tuple[Tensor, ...], r: int) -> bool:
    """Each row group's columns outside its own rank-r block are exactly zero."""
    for s, block in enumerate(rows):
        if block[:, :s * r].any() or block[:, (s + 1) * r:].any():
            return False
    return True
