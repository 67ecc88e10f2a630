"""Diffusers → original (LDM/CompVis) parameter names of an SD 1.x pipeline: the layout of the
single-file checkpoints that AUTOMATIC1111, ComfyUI and Forge load. The names are derived from
the UNet and VAE configs, so any SD 1.x-shaped model (the tiny test ones included) converts;
diffusers' own single-file loader is the check that reads them back (tests/test_models.py)."""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    # SDXL: the pooled text embedding and size numbers enter through the "label" embedding
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_TOP_LEVEL = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_name(name: str, config) -> str:
    """LDM name of a UNet module (no `.weight`), e.g. down_blocks.1.attentions.0.proj_in →
    input_blocks.4.1.proj_in. Each LDM input/output block holds one resnet (+ attention)."""
    per_block = config["layers_per_block"]
    for diffusers_name, ldm_name in UNET_TOP_LEVEL.items():
        if name == diffusers_name or name.startswith(diffusers_name + "."):
            return ldm_name + name[len(diffusers_name):]
    parts = name.split(".")
    if parts[0] == "down_blocks":
        block = int(parts[1])
        if parts[2] == "downsamplers":  # the block's last input slot: input_blocks.N.0.op
            index = 1 + block * (per_block + 1) + per_block
            return f"input_blocks.{index}.0.op" + _tail(parts, 5)
        layer = int(parts[3])
        index = 1 + block * (per_block + 1) + layer
        return _resnet_or_attention(f"input_blocks.{index}", parts[2], parts[4:])
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return "middle_block.1" + _tail(parts, 3)
        slot = 0 if parts[2] == "0" else 2
        return f"middle_block.{slot}." + UNET_RESNET.get(parts[3], parts[3]) + _tail(parts, 4)
    if parts[0] == "up_blocks":
        block = int(parts[1])
        if parts[2] == "upsamplers":  # after the resnet (and attention, when the block has one)
            index = block * (per_block + 1) + per_block
            has_attention = "CrossAttn" in config["up_block_types"][block]
            return f"output_blocks.{index}.{2 if has_attention else 1}.conv" + _tail(parts, 5)
        layer = int(parts[3])
        index = block * (per_block + 1) + layer
        return _resnet_or_attention(f"output_blocks.{index}", parts[2], parts[4:])
    raise KeyError(f"no LDM name for UNet module {name}")


# SDXL's UNet as kohya sd-scripts names it: the original (SGM) block numbering, two resnets per level
SDXL_UNET_LAYOUT = {"layers_per_block": 2,
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
_RESNET_FROM_LDM = {v: k for k, v in UNET_RESNET.items()}


def diffusers_unet_module_name(name: str, per_block: int = 2) -> str:
    """The inverse of unet_module_name for the UNet's blocks: input_blocks.4.1.proj_in →
    down_blocks.1.attentions.0.proj_in. `per_block` is the resnets per level (SDXL: 2)."""
    for diffusers_name, ldm_name in UNET_TOP_LEVEL.items():
        if name == ldm_name or name.startswith(ldm_name + "."):
            return diffusers_name + name[len(ldm_name):]
    parts = name.split(".")
    if parts[0] == "input_blocks":
        block, layer = divmod(int(parts[1]) - 1, per_block + 1)
        if layer == per_block:
            return f"down_blocks.{block}.downsamplers.0.conv" + _tail(parts, 4)
        return f"down_blocks.{block}." + _resnet_or_attention_from_ldm(parts[2], layer, parts[3:])
    if parts[0] == "middle_block":
        if parts[1] == "1":
            return "mid_block.attentions.0" + _tail(parts, 2)
        return f"mid_block.resnets.{0 if parts[1] == '0' else 1}." + _resnet_from_ldm(parts[2:])
    if parts[0] == "output_blocks":
        block, layer = divmod(int(parts[1]), per_block + 1)
        if parts[2] != "0" and parts[3] == "conv":  # the upsampler: after the resnet (and attention)
            return f"up_blocks.{block}.upsamplers.0.conv" + _tail(parts, 4)
        return f"up_blocks.{block}." + _resnet_or_attention_from_ldm(parts[2], layer, parts[3:])
    raise KeyError(f"no diffusers name for UNet module {name}")


def _resnet_or_attention_from_ldm(slot: str, layer: int, rest: list[str]) -> str:
    if slot == "1":
        return f"attentions.{layer}" + _tail(rest, 0)
    return f"resnets.{layer}." + _resnet_from_ldm(rest)


def _resnet_from_ldm(rest: list[str]) -> str:
    """in_layers.2.weight → conv1.weight: LDM resnet names have one or two segments."""
    two = ".".join(rest[:2])
    if two in _RESNET_FROM_LDM:
        return _RESNET_FROM_LDM[two] + _tail(rest, 2)
    return _RESNET_FROM_LDM.get(rest[0], rest[0]) + _tail(rest, 1)


def _tail(parts: list[str], start: int) -> str:
    return "".join("." + p for p in parts[start:])


def _resnet_or_attention(slot: str, kind: str, rest: list[str]) -> str:
    """Inside an LDM input/output block, position 0 is the resnet and 1 the attention."""
    if kind == "attentions":
        return f"{slot}.1" + _tail(rest, 0)
    return f"{slot}.0." + UNET_RESNET.get(rest[0], rest[0]) + _tail(rest, 1)


def vae_name(key: str, config) -> str:
    for diffusers_name, ldm_name in VAE_TOP_LEVEL.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name):]
    parts = key.split(".")
    coder, rest = parts[0], parts[1:]
    if rest[0] == "down_blocks":
        if rest[2] == "downsamplers":
            return f"{coder}.down.{rest[1]}.downsample.conv" + _tail(rest, 5)
        return f"{coder}.down.{rest[1]}.block.{rest[3]}." + _vae_resnet(rest[4:])
    if rest[0] == "up_blocks":
        ldm_block = len(config["up_block_types"]) - 1 - int(rest[1])  # LDM counts decoder blocks upwards
        if rest[2] == "upsamplers":
            return f"{coder}.up.{ldm_block}.upsample.conv" + _tail(rest, 5)
        return f"{coder}.up.{ldm_block}.block.{rest[3]}." + _vae_resnet(rest[4:])
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{coder}.mid.block_{int(rest[2]) + 1}." + _vae_resnet(rest[3:])
        inner = ".".join(rest[3:])
        for diffusers_name, ldm_name in VAE_ATTENTION.items():
            if inner.startswith(diffusers_name + "."):
                inner = ldm_name + inner[len(diffusers_name):]
                break
        return f"{coder}.mid.attn_1.{inner}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_resnet(rest: list[str]) -> str:
    return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])


def sd1_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three models of an SD 1.x pipeline as one LDM-layout state dict."""
    tensors = {}
    for key, value in unet.state_dict().items():
        module, _, leaf = key.rpartition(".")
        tensors[f"{UNET_PREFIX}{unet_module_name(module, unet.config)}.{leaf}"] = value
    for key, value in vae.state_dict().items():
        name = vae_name(key, vae.config)
        if ".mid.attn_1." in name and value.ndim == 2:  # LDM's VAE attention uses 1×1 convolutions
            value = value[:, :, None, None]
        tensors[VAE_PREFIX + name] = value
    for key, value in text_encoder.state_dict().items():
        # transformers ≥ 5.6 flattened CLIPTextModel; the file layout keeps CLIP's `text_model.` level
        tensors[CLIP_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return tensors
