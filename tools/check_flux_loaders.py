"""Run Forge's FLUX.1 LoRA loader on the files lora_booth.flux_layout writes, and compare what it
computes with the diffusers file's ΔW (the FLUX.1 counterpart of tools/check_loaders.py):

    OMP_NUM_THREADS=2 python tools/check_flux_loaders.py --forge ~/src/stable-diffusion-webui-forge

Forge keeps a copy of ComfyUI's key mapping and LoRA arithmetic in packages_3rdparty/
comfyui_lora_collection (model_lora_keys_unet/_clip with the Flux branch, utils.flux_to_diffusers,
load_lora) and merges with backend/patcher/lora.py's merge_lora_to_weight; only those run, on a
stand-in model that holds the tiny FLUX.1 transformer's weights (tests/test_flux_layout.py's, one
block of each kind, 2 heads × 16) under BFL's names (`diffusion_model.double_blocks.0.img_attn.
qkv.weight` …) and CLIP-L's under `clip_l.transformer.text_model…`. Stubbed: backend.memory_
management (cast_to_device), backend.utils, backend.operations. Both files go through it: the
kohya file (sd-scripts' names, fused qkv / linear1) and the diffusers file (q, k, v patched into
row slices of the fused weights by flux_to_diffusers' offsets). The reference is W + (alpha/r)·B·A
of every diffusers module, stacked into BFL's modules by lora_booth.flux_layout's table; the
diffusers file's row checks that table against ComfyUI's own. A diffusers file keeps alpha only in
its peft metadata (JSON), which ComfyUI and Forge do not read: they apply it at alpha = rank, so its
row is compared with that reference (alpha ≠ rank here: the kohya file is the one they read right).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from check_loaders import load_forge  # noqa: E402
from lora_booth.families import flux_layout  # noqa: E402

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
           "x_embedder", "context_embedder", "linear_1", "linear_2", "norm_out.linear"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def bfl_weights(transformer: nn.Module, clip: nn.Module, deltas: dict | None = None) -> dict[str, torch.Tensor]:
    """The models' Linear weights (+ ΔW where given) under ComfyUI's/Forge's names: BFL's modules
    for the transformer, their rows stacked from the diffusers parts (zeros never: every part exists)."""
    deltas = deltas or {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear):
            target, slot = flux_layout.original_name(name)
            weight = module.weight.detach().double() + deltas.get(f"transformer.{name}", 0)
            groups.setdefault(target, {})[slot] = weight
    out = {}
    for target, parts in groups.items():
        weight = torch.cat([parts[s] for s in sorted(parts)])
        if target == flux_layout.SWAPPED:
            weight = torch.cat(weight.chunk(2)[::-1])
        out[f"diffusion_model.{target}.weight"] = weight
    for name, module in clip.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            path = name if name.startswith("text_model.") else "text_model." + name
            out[f"clip_l.transformer.{path}.weight"] = module.weight.detach().double() + \
                deltas.get(f"text_encoder.{path}", 0)
    return out


class Holder(nn.Module):
    """Answers state_dict() with the given weights, and the attributes Forge's key maps read."""

    def __init__(self, weights: dict, **attributes):
        super().__init__()
        self._weights = weights
        self.__dict__.update(attributes)

    def state_dict(self, *args, **kwargs):
        return self._weights


def run_forge(forge, base: dict, config: dict, lora: dict) -> tuple[int, list[str], dict]:
    """(patches, keys left unloaded, patched weights) of Forge's loader on one file."""
    unet = {k: v.float() for k, v in base.items() if k.startswith("diffusion_model.")}
    clip = {k: v.float() for k, v in base.items() if k.startswith("clip_l.")}
    model = Holder(unet, diffusion_model=types.SimpleNamespace(config=config),
                   config=types.SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev"))
    key_map = {**forge.model_lora_keys_unet(model, {}), **forge.model_lora_keys_clip(Holder(clip), {})}
    patches, remaining = forge.load_lora(dict(lora), key_map)
    weights = {**unet, **clip}
    for key, patch in patches.items():
        # a tuple key is (weight, offset) or (weight, offset, function): a row slice of a fused weight
        name, offset, function = (key, None, None) if isinstance(key, str) else (*key, None)[:3]
        weights[name] = forge.merge_lora_to_weight([(1.0, patch, 1.0, offset, function)], weights[name], name)
    return len(patches), sorted(remaining), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forge", type=Path, required=True, help="a stable-diffusion-webui-forge checkout")
    args = parser.parse_args()
    from diffusers import FluxPipeline
    from safetensors.torch import load_file, save_file
    from test_flux_layout import adapt, deltas, diffusers_state, tiny_clip, tiny_transformer

    torch.set_num_threads(2)
    transformer, clip = tiny_transformer(), tiny_clip()
    base = bfl_weights(transformer, clip)
    config = adapt(transformer, TARGETS, rank_pattern={"transformer_blocks.0.attn.to_k": 2})
    clip_config = adapt(clip, CLIP_TARGETS, seed=2)
    tensors, alphas = diffusers_state(transformer, "transformer", config)
    clip_tensors, clip_alphas = diffusers_state(clip, "text_encoder", clip_config)
    everything, all_alphas = {**tensors, **clip_tensors}, {**alphas, **clip_alphas}
    reference = bfl_weights(tiny_transformer(), tiny_clip(), deltas(everything, all_alphas))
    ranks = {k[:-len(".lora_A.weight")]: v.shape[0] for k, v in everything.items() if k.endswith(".lora_A.weight")}
    at_scale_1 = bfl_weights(tiny_transformer(), tiny_clip(), deltas(everything, ranks))
    forge = load_forge(args.forge)
    comfy_config = {"depth": 1, "depth_single_blocks": 1, "hidden_size": transformer.config.num_attention_heads *
                    transformer.config.attention_head_dim}
    with tempfile.TemporaryDirectory() as folder:
        FluxPipeline.save_lora_weights(
            folder, transformer_lora_layers={k[len("transformer."):]: v for k, v in tensors.items()},
            # CLIP's text_model. level, as lora-booth's diffusers files keep it (formats.canonical_path)
            text_encoder_lora_layers={"text_model." + k[len("text_encoder."):].removeprefix("text_model."): v
                                      for k, v in clip_tensors.items()},
            transformer_lora_adapter_metadata=config.to_dict(),
            text_encoder_lora_adapter_metadata=clip_config.to_dict())
        kohya_path = Path(folder) / "subject.safetensors"
        save_file(flux_layout.to_kohya(everything, all_alphas), str(kohya_path))
        files = {"kohya": (load_file(str(kohya_path)), reference),
                 "diffusers, alpha = rank": (load_file(str(Path(folder) / "pytorch_lora_weights.safetensors")),
                                             at_scale_1)}
        print(f"{'file':24} {'patches':>7} {'unloaded':>8} {'max |W_forge − W_ref|':>22}  modules off")
        failed = False
        for name, (lora, expected) in files.items():
            count, remaining, weights = run_forge(forge, base, comfy_config, lora)
            errors = {k: (weights[k].double() - expected[k]).abs().max().item() for k in expected}
            off = sorted(k for k, e in errors.items() if e > 1e-5)
            print(f"{name:24} {count:7} {len(remaining):8} {max(errors.values()):22.2e}  {', '.join(off) or '-'}")
            for key in remaining:
                print(f"           not loaded: {key}")
            failed |= bool(off or remaining)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
