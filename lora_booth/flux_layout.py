"""FLUX.1 LoRA files in the two layouts other tools read, and exact conversion between them.

- diffusers/peft (`FluxPipeline.load_lora_weights`, ai-toolkit's default, SimpleTuner):
  `transformer.<module>.lora_A.weight` (rank × in) / `.lora_B.weight` (out × rank) on
  `FluxTransformer2DModel`'s modules, q, k and v separate; `text_encoder.<module>…` for CLIP-L.
- kohya sd-scripts (`networks/lora_flux.py`, also ai-toolkit in some modes): Black Forest Labs'
  original module names, `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te1_…` for CLIP-L. BFL fuses q, k, v into one Linear
  (`img_attn.qkv`, `txt_attn.qkv`) and, in a single-stream block, q, k, v and the MLP's input
  projection into `linear1`.

Both mean ΔW = (alpha / rank) · up @ down per module. Where BFL fuses, the fused ΔW is the
diffusers parts' ΔW stacked by rows, in this order (diffusers' `convert_flux_transformer_checkpoint_
to_diffusers`, ComfyUI's `flux_to_diffusers` offsets, BFL's `SingleStreamBlock.forward`):

    img_attn.qkv  = [to_q; to_k; to_v]                  rows w, w, w
    txt_attn.qkv  = [add_q_proj; add_k_proj; add_v_proj]
    linear1       = [to_q; to_k; to_v; proj_mlp]        rows w, w, w, 4·w   (w = heads · head_dim)
    final_layer.adaLN_modulation.1 = norm_out.linear with its (scale, shift) halves swapped

Writing a fused module (`to_kohya`): when every part that has an adapter has the same rank r and
scale alpha/r, each part gets a block of rank r, zeros for a part without an adapter:
down = [A_q; A_k; A_v] (n·r × in), up = block-diagonal (Σ widths × n·r), alpha = (alpha/r)·n·r,
so alpha / rank of the file is each part's own scale. That is the layout sd-scripts' split_qkv
writes, and diffusers' and sd-scripts' readers split it back into the same rank-r parts. Parts of
different ranks or scales get blocks of their own rank with their scale folded into up, and
alpha = rank (scale 1). Either way up @ down · alpha / rank is the stacked ΔW exactly.

Reading one (`from_kohya`): a block-diagonal up (n equal blocks, all else exactly 0) splits into
n parts of rank R/n with alpha/n; any other up splits by rows, every part keeping the whole down
(rank R) and alpha. A part whose rows of up are all zero has ΔW = 0 and is left out. Both exact.

Who reads which (diffusers 0.42.1; ComfyUI's comfy/lora.py model_lora_keys_unet, Flux branch; Forge's
copy of it in packages_3rdparty/comfyui_lora_collection): ComfyUI and Forge map both layouts at any
width (q, k, v as row slices of BFL's weights) but take alpha only from `.alpha` keys, never from a
diffusers file's peft metadata. diffusers' kohya reader splits linear1 at FLUX.1's fixed rows
(3 × 3072 + 12288: a narrower model's file fails its assert), and returns img_in, txt_in, time_in,
vector_in, guidance_in and final_layer adapters without the `transformer.` prefix, so
`load_lora_weights` drops them without a word; the file still holds them for ComfyUI and Forge.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .errors import LoraBoothError

MLP_RATIO = 4  # FluxSingleTransformerBlock's default; FluxTransformer2DModel never passes another
MAX_BLOCK = 1000  # FLUX.1 has 19 double and 38 single blocks: an index past this is a broken name
MAX_WIDTH = 1 << 16  # no FLUX.1 Linear is wider than 21504

# BFL's module inside a block → the diffusers modules whose weights it stacks, in row order
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
          "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
          "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation.lin": ("norm.linear",)}
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
SWAPPED = "final_layer.adaLN_modulation.1"  # BFL's rows are (shift, scale), diffusers' (scale, shift)
# diffusers' kohya reader drops the alpha of final_layer_* (it reads them at scale 1): fold it into up
UNSCALED = ("final_layer.linear", "final_layer.adaLN_modulation.1")
CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2")
TRANSFORMER_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", *OUTSIDE.values())

_FLAT = {name.replace(".", "_"): name for name in (*DOUBLE, *SINGLE, *OUTSIDE, *CLIP_MODULES)}
_KOHYA_BLOCK = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_(\w+)")
_KOHYA_CLIP = re.compile(r"lora_te1?_text_model_encoder_layers_(\d+)_(\w+)")
_DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
# transformers ≥ 5.6 dropped CLIPTextModel's `text_model.` level; kohya's names keep it
_DIFFUSERS_CLIP = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class FluxLayoutError(LoraBoothError, ValueError):
    """A FLUX.1 LoRA file or state dict that cannot be converted: the message names the key."""


# ---------------------------------------------------------------------------------------- names


def original_name(module: str) -> tuple[str, int]:
    """A diffusers module of FluxTransformer2DModel ("transformer_blocks.0.attn.to_k") → BFL's
    module that holds its weight ("double_blocks.0.img_attn.qkv") and its slot among the stacked
    parts (1: k's rows follow q's)."""
    match = _DIFFUSERS_BLOCK.fullmatch(module)
    if match:
        kind, index, rest = match.groups()
        table, block = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        for name, parts in table.items():
            if rest in parts:
                return f"{block}.{index}.{name}", parts.index(rest)
    for name, path in OUTSIDE.items():
        if module == path:
            return name, 0
    raise FluxLayoutError(f"{module}: not a FluxTransformer2DModel module that kohya's FLUX.1 layout names")


def kohya_name(part: str, module: str) -> str:
    """kohya sd-scripts' name of the module (fused: the name of the module holding its rows):
    `lora_unet_double_blocks_0_img_attn_qkv`, `lora_te1_text_model_encoder_layers_0_mlp_fc1`
    (CLIP's `text_model.` level optional in `module`)."""
    if part == "text_encoder":
        match = _DIFFUSERS_CLIP.fullmatch(module)
        if not match or match.group(2) not in CLIP_MODULES:
            raise FluxLayoutError(f"text_encoder.{module}: not a CLIP-L module kohya's FLUX.1 layout names")
        return f"lora_te1_text_model_encoder_layers_{match.group(1)}_{match.group(2).replace('.', '_')}"
    if part != "transformer":
        raise FluxLayoutError(f"{part}.{module}: FLUX.1 files name the transformer and CLIP-L (text_encoder) only")
    return "lora_unet_" + original_name(module)[0].replace(".", "_")


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


def layout(keys: Iterable[str]) -> str | None:
    """Which layout a FLUX.1 LoRA file's keys are in, for a reader to dispatch on:
    "kohya" (sd-scripts' lora_unet_double_blocks_N_… / lora_unet_single_blocks_N_…),
    "comfyui" (the same BFL names as `diffusion_model.double_blocks.N….lora_up.weight`),
    "diffusers" (`transformer.<module>.lora_A.weight`, or peft's names without the prefix),
    "onetrainer" (`lora_transformer_<diffusers module with _>`), "xlabs" (`double_blocks.N.
    processor.qkv_lora1.down.weight`), or None when the names are none of these (an SD file).
    Names only: a diffusers file of SD3's MMDiT blocks also reads "diffusers"."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_final_layer_"))
           for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")) for k in keys):
        return "comfyui"
    if any(k.startswith("lora_transformer_") for k in keys):
        return "onetrainer"
    if any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys):
        return "xlabs"
    if any(".lora_A." in k or ".lora_B." in k for k in keys) and \
            any(k.removeprefix("transformer.").startswith(TRANSFORMER_ROOTS) for k in keys):
        return "diffusers"
    return None


# ------------------------------------------------------------------------- diffusers → kohya


def to_kohya(tensors: Mapping[str, Tensor], alphas: Mapping[str, float] | float | None = None) -> dict[str, Tensor]:
    """A diffusers/peft FLUX.1 LoRA → kohya sd-scripts' layout, exactly (see the module docstring
    for the fused modules' alpha). `tensors`: `transformer.<module>.lora_A.weight` / `.lora_B.weight`
    (peft's names without `transformer.` too) and `text_encoder.<module>…`. `alphas`: per module
    name (the key without `.lora_A.weight`), one value for all, or None for alpha = rank (scale 1,
    what diffusers assumes of a file without peft metadata). Returns kohya's keys; alphas are 0-d
    float32 tensors."""
    modules = _diffusers_modules(tensors)
    groups: dict[tuple[str, str], dict[int, tuple[Tensor, Tensor, float]]] = {}
    for (prefix, part, module), (down, up) in modules.items():
        alpha = _alpha_for(alphas, prefix + module, down.shape[0])
        if part == "text_encoder":
            target, slot = module if module.startswith("text_model.") else "text_model." + module, 0
        else:
            target, slot = original_name(module)
        if slot in groups.get((part, target), {}):
            raise FluxLayoutError(f"{prefix}{module}: named twice (with and without CLIP's text_model. level)")
        groups.setdefault((part, target), {})[slot] = (down, up, alpha / down.shape[0])
    out: dict[str, Tensor] = {}
    for (part, target), parts in sorted(groups.items()):
        name = kohya_name(part, target) if part == "text_encoder" else "lora_unet_" + target.replace(".", "_")
        down, up, alpha = _fuse(target, parts, name) if part == "transformer" else _single(parts[0])
        if target in UNSCALED:
            up, alpha = (up.float() * (alpha / down.shape[0])).to(up.dtype), float(down.shape[0])
        if target == SWAPPED:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _diffusers_modules(tensors: Mapping[str, Tensor]) -> dict[tuple[str, str, str], tuple[Tensor, Tensor]]:
    """(key prefix as given, part, module path) → (A, B), checked."""
    halves: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                path = key[:-len(suffix)]
                break
        else:
            raise FluxLayoutError(f"{key}: not a LoRA tensor of a diffusers file (….lora_A.weight / "
                                  "….lora_B.weight); DoRA magnitudes and peft's adapter-named keys cannot be "
                                  "converted")
        if path.startswith("text_encoder."):
            prefix, part = "text_encoder.", "text_encoder"
        elif path.startswith("transformer."):
            prefix, part = "transformer.", "transformer"
        elif path.startswith(TRANSFORMER_ROOTS):
            prefix, part = "", "transformer"
        else:
            raise FluxLayoutError(f"{key}: neither the transformer's (transformer.…) nor CLIP-L's (text_encoder.…)")
        halves.setdefault((prefix, part, path[len(prefix):]), {})[suffix[1:7]] = tensor
    modules = {}
    for (prefix, part, module), pair in halves.items():
        key = prefix + module
        if set(pair) != {"lora_A", "lora_B"}:
            raise FluxLayoutError(f"{key}: has {next(iter(pair))} without its partner")
        down, up = pair["lora_A"], pair["lora_B"]
        _check_pair(down, up, key + ".lora_A.weight / .lora_B.weight")
        if part == "text_encoder":
            kohya_name(part, module)
        else:
            original_name(module)
        modules[(prefix, part, module)] = (down, up)
    return modules


def _alpha_for(alphas, module: str, rank: int) -> float:
    value = rank if alphas is None else alphas if isinstance(alphas, (int, float)) else alphas.get(module, rank)
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise FluxLayoutError(f"{module}: alpha {value} is not a positive number")
    return value


def _single(part: tuple[Tensor, Tensor, float]) -> tuple[Tensor, Tensor, float]:
    down, up, scale = part
    return down, up, scale * down.shape[0]


def _fuse(target: str, parts: dict[int, tuple[Tensor, Tensor, float]], name: str) -> tuple[Tensor, Tensor, float]:
    """One BFL module from the diffusers modules stacked in it (absent parts: zeros)."""
    slots = len(_parts_of(target))
    if slots == 1:
        return _single(parts[0])
    widths = {down.shape[1] for down, _, _ in parts.values()}
    if len(widths) != 1:
        raise FluxLayoutError(f"{name}: its parts take inputs of different widths {sorted(widths)}")
    width = widths.pop()
    dims = _fused_rows(target, width)
    for slot, (down, up, _) in parts.items():
        if up.shape[0] != dims[slot]:
            raise FluxLayoutError(f"{name}: part {_parts_of(target)[slot]} has {up.shape[0]} outputs, FLUX.1's "
                                  f"layout {dims[slot]} (for a {width}-wide block)")
    like = next(iter(parts.values()))[0]
    if len({(down.shape[0], scale) for down, _, scale in parts.values()}) == 1:  # one rank, one scale
        rank, scale = like.shape[0], next(iter(parts.values()))[2]
        blocks = [(parts[s][0], parts[s][1]) if s in parts else
                  (like.new_zeros(rank, width), like.new_zeros(dims[s], rank)) for s in range(slots)]
        return torch.cat([d for d, _ in blocks]), torch.block_diag(*[u for _, u in blocks]), scale * rank * slots
    downs, ups = [], []
    for s in range(slots):
        if s in parts:
            down, up, scale = parts[s]
            downs.append(down)
            ups.append((up.float() * scale).to(up.dtype))
        else:
            ups.append(like.new_zeros(dims[s], 0))
    up = torch.block_diag(*ups)
    return torch.cat(downs), up, float(up.shape[1])


def _parts_of(target: str) -> tuple[str, ...]:
    if target.startswith("double_blocks."):
        return DOUBLE[target.split(".", 2)[2]]
    if target.startswith("single_blocks."):
        return SINGLE[target.split(".", 2)[2]]
    return (OUTSIDE[target],)


def _fused_rows(target: str, width: int) -> list[int]:
    parts = _parts_of(target)
    return [MLP_RATIO * width if part == "proj_mlp" else width for part in parts]


# ------------------------------------------------------------------------- kohya → diffusers


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


def dropped_by_diffusers(keys: Iterable[str]) -> list[str]:
    """The modules of a kohya-layout FLUX.1 file that diffusers 0.42's `load_lora_weights` drops without
    a warning ("<diffusers module> (<kohya name>)"): its kohya converter returns the modules outside
    the blocks (proj_out, x_embedder, context_embedder, the time/text/guidance embedders, norm_out)
    without the `transformer.` prefix, and the loader keeps only keys with it. ComfyUI and Forge read
    them."""
    names = {k.split(".", 1)[0] for k in keys}
    return [f"{path} (lora_unet_{name.replace('.', '_')})" for name, path in OUTSIDE.items()
            if f"lora_unet_{name.replace('.', '_')}" in names]


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


def _check_pair(down: Tensor, up: Tensor, key: str) -> None:
    if not (isinstance(down, Tensor) and isinstance(up, Tensor)):
        raise FluxLayoutError(f"{key}: not tensors")
    if down.dim() != 2 or up.dim() != 2:
        raise FluxLayoutError(f"{key}: a Linear's LoRA is down (rank × in) and up (out × rank), got shapes "
                              f"{tuple(down.shape)} and {tuple(up.shape)}")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise FluxLayoutError(f"{key}: {down.dtype} / {up.dtype} weights; a LoRA's are floating point")
    if up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise FluxLayoutError(f"{key}: down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank")
    if max(down.shape[1], up.shape[0]) > MAX_WIDTH:
        raise FluxLayoutError(f"{key}: {max(down.shape[1], up.shape[0])} features, wider than any FLUX.1 Linear")


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


def weight_rows(module: str, width: int) -> tuple[str, tuple[int, int] | None, bool]:
    """Where a diffusers module's weight lives in BFL's layout (a single-file FLUX.1 transformer):
    (BFL module, (first row, end row) within it when fused with others or None when it is the
    whole weight, whether its two halves are swapped (norm_out.linear)). `width`: the blocks'
    width (heads · head_dim)."""
    target, slot = original_name(module)
    rows = _fused_rows(target, width)
    if len(rows) == 1:
        return target, None, target == SWAPPED
    start = sum(rows[:slot])
    return target, (start, start + rows[slot]), False


# RMSNorm scales of the attention, BFL's name within a block (single blocks have no img_/txt_ level)
NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
         "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def original_tensor_name(name: str, width: int) -> tuple[str, tuple[int, int] | None, bool]:
    """A FluxTransformer2DModel state-dict name → (BFL key, its rows when fused, halves swapped).
    Inverse of convert_flux_transformer_checkpoint_to_diffusers, for any width."""
    module, _, leaf = name.rpartition(".")
    block = _DIFFUSERS_BLOCK.fullmatch(module)
    if block and block.group(3) in NORMS and leaf == "weight":
        kind = "double_blocks" if block.group(1) == "transformer_blocks" else "single_blocks"
        norm = NORMS[block.group(3)] if kind == "double_blocks" else NORMS[block.group(3)].split(".", 1)[1]
        return f"{kind}.{block.group(2)}.{norm}.scale", None, False
    target, rows, swapped = weight_rows(module, width)
    return f"{target}.{leaf}", rows, swapped
