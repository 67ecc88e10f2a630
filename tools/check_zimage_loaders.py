"""Run the Z-Image LoRA loaders of other tools on the files lora-booth writes, at strength 1 and 0.5,
and compare what they compute with peft's merge (the Z-Image counterpart of
tools/check_flux_loaders.py; the table in docs/zimage.md comes from it):

    OMP_NUM_THREADS=2 python tools/check_zimage_loaders.py --comfyui ~/src/ComfyUI

diffusers (`ZImagePipeline.load_lora_weights`, `set_adapters(weights=[s])`, `fuse_lora`) and
lora-booth's own reader always run; ComfyUI when a checkout is given. The model is the tiny Z-Image
transformer (lora_booth/families/tiny_zimage.py: two blocks, one refiner of each kind); peft puts
LoRA adapters (rank 4, alpha 2) on every attention projection and MLP of every block, drawn at
random, and lora-booth writes both of its files as `train` does: the diffusers file and the
ComfyUI-layout one (`diffusion_model.<module>.lora_down/lora_up/alpha`).

ComfyUI runs its own key map and weight arithmetic (comfy/lora.py: model_lora_keys_unet's Lumina2
branch over comfy/utils.py's z_image_to_diffusers, load_lora, calculate_weight; stubbed as in
tools/check_loaders.py) on a stand-in model that holds the weights under the original names
(`diffusion_model.layers.0.attention.qkv.weight`, q, k and v as row slices), an instance of a class
standing for comfy.model_base.Lumina2. Keys not loaded: what load_lora logs as "lora key not loaded".
A cell: the largest |W_tool − W_ref| over all adapted weights, W_ref = W + s·(W_peft − W).
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from check_loaders import definitions, load_comfyui  # noqa: E402
from lora_booth.adapters import formats  # noqa: E402
from lora_booth.families import zimage_layout  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
STRENGTHS = (1.0, 0.5)


class ComfyLumina2:
    """Stands for comfy.model_base.Lumina2, the model class ComfyUI serves Z-Image with."""


class Holder(nn.Module, ComfyLumina2):
    """Answers state_dict() with the given weights, and the attributes the key map reads."""

    def __init__(self, weights: dict, **attributes):
        super().__init__()
        self._weights = weights
        self.__dict__.update(attributes)

    def state_dict(self, *args, **kwargs):
        return self._weights


def adapted():
    """A lora-booth base namespace around the tiny transformer, with random LoRA adapters."""
    from lora_booth import families
    from lora_booth.config.sections import LoraConfig
    from lora_booth.families.tiny_zimage import build_tiny_zimage_pipeline
    from lora_booth.model import lora

    transformer = build_tiny_zimage_pipeline().transformer
    base = types.SimpleNamespace(kind=families.ZIMAGE, family="zimage", unet=transformer)
    lora.add_adapters(base, LoraConfig(rank=4, alpha=2.0, targets=TARGETS), 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return base


def linear_weights(transformer: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """Every Linear weight by diffusers module name; merge=True: peft's adapters merged in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, out = copy.deepcopy(transformer), {}
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            if merge:
                layer.merge()
            out[name] = layer.get_base_layer().weight.detach().double()
        elif isinstance(layer, nn.Linear) and ".lora_" not in name and ".base_layer" not in name:
            out[name] = layer.weight.detach().double()
    return out


def to_original(weights: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Diffusers-named Linear weights → ComfyUI's state dict: the original names, q, k, v stacked."""
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for module, weight in weights.items():
        key, rows = zimage_layout.original_tensor_name(f"{module}.weight", width)
        fused.setdefault(f"diffusion_model.{key}", {})[0 if rows is None else rows[0]] = weight
    return {key: torch.cat([parts[s] for s in sorted(parts)]) for key, parts in fused.items()}


def run_comfyui(root: Path, original: dict, config: dict, lora: dict, strength: float) -> tuple[list[str], dict]:
    comfy = load_comfyui(root)
    sys.modules["comfy.model_base"].Lumina2 = ComfyLumina2
    utils = sys.modules["comfy.utils"]
    if not hasattr(utils, "z_image_to_diffusers"):
        definitions(root / "comfy" / "utils.py", {"z_image_to_diffusers"}, utils.__dict__)
    model = Holder(original, model_config=types.SimpleNamespace(unet_config=config))
    key_map = comfy.model_lora_keys_unet(model, {})
    missing: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: missing.append(record.getMessage().removeprefix("lora key not loaded: ")) \
        if record.getMessage().startswith("lora key not loaded") else None
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.load_lora(dict(lora), key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    weights = {k: v.float().clone() for k, v in original.items()}
    for key, patch in patches.items():
        # a tuple key is (weight, offset) or (weight, offset, function): a row slice of qkv
        name, offset, function = (key, None, None) if isinstance(key, str) else (*key, None)[:3]
        weights[name] = comfy.calculate_weight([(strength, patch, 1.0, offset, function)], weights[name], name)
    return missing, weights


def run_diffusers(file: Path, strength: float) -> tuple[list[str], dict]:
    """ZImagePipeline.load_lora_weights, set_adapters(weights=[s]), fuse_lora: the fused weights."""
    from diffusers import ZImagePipeline

    from lora_booth.families.tiny_zimage import build_tiny_zimage_pipeline

    pipe: ZImagePipeline = build_tiny_zimage_pipeline()
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="file")
    loaded = {name for name, m in pipe.transformer.named_modules() if "file" in getattr(m, "lora_A", {})}
    pipe.set_adapters(["file"], adapter_weights=[strength])
    pipe.fuse_lora(lora_scale=1.0)
    return sorted(loaded), linear_weights(pipe.transformer, merge=False)


def run_lora_booth(plain: dict, file: Path, strength: float) -> tuple[list[str], dict]:
    adapter = formats.read(file)
    weights = dict(plain)
    for (_, module), entry in adapter.modules.items():
        weights[module] = entry.apply(weights[module].float(), strength).double()
    return [], weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout")
    args = parser.parse_args()
    from safetensors.torch import load_file

    from lora_booth.adapters import diffusers_layout, kohya_layout, neutral

    torch.set_num_threads(2)
    base = adapted()
    transformer = base.unet
    width = transformer.config.dim
    config = {"n_layers": transformer.config.n_layers, "dim": width,
              "n_refiner_layers": transformer.config.n_refiner_layers}
    peft, plain = linear_weights(transformer, merge=True), linear_weights(transformer, merge=False)
    adapted_modules = {k for k in peft if not torch.equal(peft[k], plain[k])}
    original = to_original(plain, width)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        adapter = formats.from_model(base)
        files = {"diffusers file": diffusers_layout.write_diffusers(adapter, Path(scratch) / neutral.DIFFUSERS_WEIGHT_NAME),
                 "ComfyUI file": kohya_layout.write_kohya(adapter, Path(scratch) / "sks_dog.safetensors",
                                                          family="zimage")}
        for label, file in files.items():
            lora = load_file(str(file))
            for strength in STRENGTHS:
                reference = {k: v + strength * (peft[k] - v) for k, v in plain.items()}
                runs = {"diffusers": lambda s: run_diffusers(file, s), "lora-booth": lambda s: run_lora_booth(plain, file, s)}
                if args.comfyui:
                    runs["ComfyUI"] = lambda s: run_comfyui(args.comfyui, original, config, lora, s)
                for tool, run in runs.items():
                    try:
                        listed, weights = run(strength)
                        if tool == "ComfyUI":
                            error = max(float((weights[k].double() - v).abs().max())
                                        for k, v in to_original(reference, width).items())
                            note = f"{len(listed)} keys not loaded" + (f" (such as {listed[0]})" if listed else "")
                        else:
                            error = max(float((weights[k].double() - reference[k]).abs().max()) for k in reference)
                            note = "" if tool == "lora-booth" else \
                                f"{len(adapted_modules - set(listed))} adapted modules not loaded"
                        rows.append((tool, label, f"{strength:g}", f"{error:.2g}", note))
                    except Exception as exc:  # noqa: BLE001 - a tool that refuses a file is a row
                        rows.append((tool, label, f"{strength:g}", "refuses it", f"{type(exc).__name__}: {exc}"[:100]))
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print("| tool | file | strength | max abs error | keys |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
