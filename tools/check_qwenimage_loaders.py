"""Check that every key of the Qwen-Image LoRA files lora-booth writes maps onto the right weight in
ComfyUI's own key map and in diffusers' own loaders (docs/qwen-image.md, "Files"):

    OMP_NUM_THREADS=2 python tools/check_qwenimage_loaders.py --comfyui ~/src/ComfyUI

The model is the tiny Qwen-Image pipeline (lora-booth's `tiny-qwenimage`). peft puts a LoRA (rank 4,
alpha 2, so the strength rides on alpha) on every Linear of the transformer lora-booth can target:
both streams' attention, MLPs and modulation, the input and output projections; lora-booth writes
its two files as `train` does. Then:
- ComfyUI: comfy/lora.py's model_lora_keys_unet (read from the checkout and run alone, with
  comfy.model_base.QwenImage the class the stand-in model is an instance of and comfy.utils'
  unet_to_diffusers giving nothing, as it does for a model without UNet blocks) over a stand-in whose
  weights are the transformer's under `diffusion_model.` (ComfyUI's QwenImage module names are
  diffusers' own); every module of both files must map, at the module's shape. ComfyUI scales by the
  file's `.alpha` tensors only: the kohya file has them, the diffusers file (peft metadata) does not.
- diffusers: QwenImagePipeline.load_lora_weights on each file; every module must get weights whose
  ΔW = scale · B·A equals peft's. Its kohya reader goes through _convert_non_diffusers_qwen_lora_to_diffusers.
Without --comfyui, the ComfyUI rows are skipped. Prints one line per file and loader, exits 1 on a
mismatch.
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

import torch  # noqa: E402

from check_loaders import Holder, definitions, package, stub  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
           "img_in", "txt_in", "proj_out", "norm_out.linear", "linear_1", "linear_2")


class ComfyQwenImage:
    """Stands for comfy.model_base.QwenImage."""


def written_files(folder: Path):
    """(base, {file name: path}, {module: ΔW}) for a tiny Qwen-Image transformer with random adapters."""
    from lora_booth.adapters import formats
    from lora_booth.config.sections import LoraConfig
    from lora_booth.families import QWENIMAGE
    from lora_booth.families.tiny_qwenimage import build_tiny_qwenimage_pipeline
    from lora_booth.model import lora

    pipe = build_tiny_qwenimage_pipeline()
    base = types.SimpleNamespace(kind=QWENIMAGE, family="qwenimage", unet=pipe.transformer,
                                 text_encoder=pipe.text_encoder)
    lora.add_adapters(base, LoraConfig(rank=4, alpha=2.0, targets=TARGETS), 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    adapter = formats.from_model(base)
    deltas = {path: module.delta() for (_, path), module in adapter.modules.items()}
    from lora_booth.adapters import diffusers_layout, kohya_layout, file_metadata

    paths = {"diffusers": diffusers_layout.write_diffusers(adapter, folder / "pytorch_lora_weights.safetensors"),
             "kohya": kohya_layout.write_kohya(adapter, folder / "qwen.safetensors",
                                               file_metadata.kohya_file_metadata(adapter, {}, "qwenimage"),
                                               family="qwenimage")}
    return pipe, paths, deltas


def comfyui_map(root: Path, transformer) -> dict[str, str]:
    if "comfy" not in sys.modules:
        package("comfy", root / "comfy")
        stub("comfy.model_base", QwenImage=ComfyQwenImage)
        stub("comfy.utils", unet_to_diffusers=lambda unet_config: {})
    namespace = {"comfy": sys.modules["comfy"]}
    definitions(root / "comfy" / "lora.py", {"model_lora_keys_unet"}, namespace)
    state = {f"diffusion_model.{k.replace('.base_layer', '')}": v for k, v in transformer.state_dict().items()
             if "lora_" not in k}
    model = type("QwenStandIn", (Holder, ComfyQwenImage), {})(state, model_config=types.SimpleNamespace(unet_config={}))
    return namespace["model_lora_keys_unet"](model, {}), state


def check_comfyui(root: Path, transformer, paths: dict, deltas: dict) -> list[str]:
    from safetensors.torch import load_file

    key_map, state = comfyui_map(root, transformer)
    lines = []
    for kind, path in paths.items():
        tensors = load_file(str(path))
        up, down = (".lora_up.weight", ".lora_down.weight") if kind == "kohya" else (".lora_B.weight", ".lora_A.weight")
        names = {key[:-len(up)] for key in tensors if key.endswith(up)}
        missing = sorted(name for name in names if name not in key_map)
        wrong = []
        for name in sorted(set(names) - set(missing)):
            target = key_map[name][len("diffusion_model."):-len(".weight")]
            alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else tensors[name + down].shape[0]
            delta = alpha / tensors[name + down].shape[0] * tensors[name + up].float() @ tensors[name + down].float()
            if target not in deltas or not torch.allclose(delta, deltas[target], atol=1e-6):
                wrong.append(name)
        lines.append(f"ComfyUI   {path.name:<34} {len(names)} modules, {len(missing)} unmapped"
                     f"{' (' + missing[0] + ' …)' if missing else ''}, {len(wrong)} at another ΔW"
                     f"{' (' + wrong[0] + ' …)' if wrong else ''}")
        if missing or (wrong and kind == "kohya"):
            lines[-1] += "  MISMATCH"
    return lines


def check_diffusers(pipe, paths: dict, deltas: dict) -> list[str]:
    from diffusers import QwenImagePipeline

    lines = []
    for kind, path in paths.items():
        fresh = QwenImagePipeline(**{name: getattr(pipe, name) for name in ("scheduler", "vae", "text_encoder", "tokenizer")},
                                  transformer=type(pipe.transformer).from_config(pipe.transformer.config))
        fresh.transformer.load_state_dict({k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items()
                                           if "lora_" not in k})
        fresh.load_lora_weights(str(path), adapter_name="check")
        layers = dict(fresh.transformer.named_modules())
        wrong = [module for module, delta in deltas.items()
                 if not hasattr(layers[module], "lora_A") or "check" not in layers[module].lora_A
                 or not torch.allclose(layers[module].scaling["check"] * layers[module].lora_B["check"].weight
                                       @ layers[module].lora_A["check"].weight, delta, atol=1e-6)]
        lines.append(f"diffusers {path.name:<34} {len(deltas)} modules, {len(wrong)} missing or at another ΔW"
                     f"{' (' + wrong[0] + ' …)' if wrong else ''}{'  MISMATCH' if wrong else ''}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout (its comfy/lora.py is read)")
    args = parser.parse_args()
    from lora_booth.model.loading import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        pipe, paths, deltas = written_files(Path(folder))
        lines = check_diffusers(pipe, paths, deltas)
        if args.comfyui:
            lines += check_comfyui(args.comfyui, pipe.transformer, paths, deltas)
    print("\n".join(lines))
    return 1 if any(line.endswith("MISMATCH") for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
