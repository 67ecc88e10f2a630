"""Z-Image's names outside diffusers: the transformer's original layout (Tongyi-MAI's checkpoints,
ComfyUI's single files) and the LoRA layout ComfyUI and diffusers both read.

Original layout → ZImageTransformer2DModel (the inverse of diffusers' convert_z_image_transformer_
checkpoint_to_diffusers, at any width w = dim):

    <block>.attention.qkv      = [to_q; to_k; to_v]      rows w, w, w
    <block>.attention.out      = <block>.attention.to_out.0
    <block>.attention.q_norm   = <block>.attention.norm_q   (k_norm: norm_k)
    x_embedder                 = all_x_embedder.2-1          (2×2 patches, one frame)
    final_layer                = all_final_layer.2-1
    everything else (feed_forward.w1/w2/w3, adaLN_modulation, the refiners, t_embedder,
    cap_embedder, the pad tokens) keeps its name.

LoRA files for ComfyUI: `diffusion_model.<diffusers module>.lora_down.weight` / `.lora_up.weight`
/ `.alpha`. ComfyUI's Z-Image key map (comfy/lora.py, Lumina2 branch, built by comfy/utils.py
z_image_to_diffusers) names each diffusers module under `diffusion_model.` and `transformer.` and
puts to_q, to_k, to_v into row slices of the original qkv; it takes alpha from `.alpha` tensors
only. diffusers' ZImageLoraLoaderMixin reads the same file (prefix dropped, alpha folded in).
Files in the original names (`…attention.qkv`, `…attention.out`, as kohya-style trainers write
them) are read back too: a fused qkv LoRA splits exactly into three with the whole down matrix.
"""
from __future__ import annotations

import re

import torch

# where a Z-Image transformer's modules live; no other family's denoiser has these roots
ADAPTER_ROOTS = ("layers.", "noise_refiner.", "context_refiner.", "all_x_embedder.", "all_final_layer.",
                 "t_embedder.", "cap_embedder.")
COMFYUI_PREFIX = "diffusion_model."
_RENAMED = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
            (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."))
_QKV = re.compile(r"(.+\.attention\.)to_([qkv])\.(weight|bias)")
_SUFFIXES = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight",
             ".lora_A.weight": ".lora_A.weight", ".lora_B.weight": ".lora_B.weight"}
MAX_WIDTH = 1 << 16  # Z-Image's widest Linear (the MLP's) has 10240 features


def single_file_prefix(keys: set[str]) -> str | None:
    """The key prefix of a Z-Image transformer file in the original layout ("" as Tongyi-MAI ships
    it, "model.diffusion_model." as ComfyUI saves it), or None for any other file. A ControlNet's
    own blocks (control_…) are claimed too, so that it is refused by name."""
    for prefix in ("", "model.diffusion_model."):
        if f"{prefix}layers.0.adaLN_modulation.0.weight" in keys and f"{prefix}cap_embedder.1.weight" in keys:
            return prefix
        if f"{prefix}control_all_x_embedder.2-1.weight" in keys:
            return prefix
    return None


def original_tensor_name(name: str, width: int) -> tuple[str, tuple[int, int] | None]:
    """A ZImageTransformer2DModel state-dict name → (its key in the original layout, its rows there
    when q, k and v are stacked into qkv)."""
    match = _QKV.fullmatch(name)
    if match:
        slot = "qkv".index(match.group(2))
        return f"{match.group(1)}qkv.{match.group(3)}", (slot * width, (slot + 1) * width)
    for diffusers_name, original in _RENAMED:
        if diffusers_name in name or name.startswith(diffusers_name):
            return name.replace(diffusers_name, original, 1), None
    return name, None


# ---------------------------------------------------------------------------------------- LoRA files


def comfyui_tensors(modules: dict) -> dict[str, torch.Tensor]:
    """The neutral adapter's transformer modules in the ComfyUI layout (module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for (part, path), module in modules.items():
        if part != "transformer" or not path.startswith(ADAPTER_ROOTS):
            raise ValueError(f"{part}.{path}: not a module of the Z-Image transformer, the only part its files hold")
        name = COMFYUI_PREFIX + path
        if hasattr(module, "up"):
            tensors[f"{name}.lora_down.weight"] = module.down
            tensors[f"{name}.lora_up.weight"] = module.up
            if module.magnitude is not None:
                tensors[f"{name}.dora_scale"] = module.magnitude.reshape(module.dora_scale_shape())
        else:  # LoHa/LoKr: LyCORIS's tensor names, which ComfyUI reads for any module it maps
            for suffix, tensor in module.tensors().items():
                tensors[f"{name}.{suffix}"] = tensor
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


def is_comfyui_layout(tensors) -> bool:
    return any(k.startswith(COMFYUI_PREFIX) and k[len(COMFYUI_PREFIX):].startswith(ADAPTER_ROOTS) for k in tensors)


def from_comfyui(tensors: dict) -> dict[str, torch.Tensor]:
    """A Z-Image LoRA in the ComfyUI layout (or its original names) → diffusers' spelling,
    `transformer.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha`, exactly. A fused qkv
    module becomes to_q, to_k, to_v, each with the whole down matrix and its rows of up."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(COMFYUI_PREFIX):
            raise ValueError(f"{key}: a Z-Image file in the ComfyUI layout names every tensor diffusion_model.…")
        rest = key[len(COMFYUI_PREFIX):]
        module, suffix = _split_suffix(rest, key)
        module = _diffusers_module(module)
        if module.endswith(".attention.qkv"):
            out.update(_split_qkv(module[:-len("qkv")], suffix, tensor, key))
        else:
            out[f"transformer.{module}{suffix}"] = tensor
    return out


def _split_suffix(rest: str, key: str) -> tuple[str, str]:
    for suffix, spelled in _SUFFIXES.items():
        if rest.endswith(suffix):
            return rest[:-len(suffix)], spelled
    if rest.endswith(".dora_scale"):
        return rest[:-len(".dora_scale")], ".lora_magnitude_vector"
    module, _, leaf = rest.rpartition(".")
    if not module:
        raise ValueError(f"{key}: not a LoRA tensor name")
    return module, "." + leaf  # .alpha, LyCORIS's hada_*/lokr_* tensors


def _diffusers_module(module: str) -> str:
    """An original-layout module name → diffusers' (names already in diffusers' spelling stay)."""
    if module.endswith(".attention.out"):
        return module[:-len("out")] + "to_out.0"
    if module == "x_embedder":
        return "all_x_embedder.2-1"
    if module.startswith("final_layer."):
        return "all_final_layer.2-1." + module[len("final_layer."):]
    return module


def _split_qkv(block: str, suffix: str, tensor: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """One fused qkv tensor → q's, k's and v's: down and alpha shared, up by thirds of its rows."""
    names = [f"transformer.{block}to_{p}{suffix}" for p in "qkv"]
    if suffix == ".lora_B.weight":
        if tensor.dim() != 2 or tensor.shape[0] % 3 or tensor.shape[0] > 3 * MAX_WIDTH:
            raise ValueError(f"{key}: a fused qkv up matrix needs 3·w rows, got shape {tuple(tensor.shape)}")
        return dict(zip(names, (part.clone() for part in tensor.chunk(3, dim=0))))
    if suffix in (".lora_A.weight", ".alpha"):
        return {name: tensor.clone() for name in names}
    raise ValueError(f"{key}: only plain LoRA (lora_down/lora_up/alpha) can be split out of a fused qkv module")
