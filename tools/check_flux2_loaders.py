"""Run ComfyUI's LoRA loader on the FLUX.2 klein kohya file lora-booth writes (`lora_unet_<BFL
module>`, musubi-tuner's layout) and compare the weights it computes with peft's merge:

    OMP_NUM_THREADS=1 python tools/check_flux2_loaders.py --comfyui ~/src/ComfyUI

The model is lora-booth's tiny FLUX.2 klein transformer (tiny-flux2: one block of each kind).
peft puts LoRA (rank 4, alpha 2, every tensor drawn at random) on the family's default targets
(both attention streams of a double block, a single block's fused to_qkv_mlp_proj and to_out) and
on the double block's MLPs; lora-booth writes the kohya file as `train` does (families/flux2.py
kohya_tensors). ComfyUI's comfy/lora.py runs on a stand-in model whose state dict holds the
weights under BFL's names (`diffusion_model.double_blocks.0.img_attn.qkv.weight`, q, k and v as
row blocks, diffusers' convert_flux2_transformer_checkpoint_to_diffusers read backwards):
model_lora_keys_unet maps `lora_unet_<name with _>` onto every `diffusion_model.` weight of any
model, load_lora reads the file ('lora key not loaded' is logged for any key it cannot place), and
calculate_weight applies it at strength 1 and 0.5. Printed: keys not loaded, and the largest
|W_ComfyUI − (W + s·ΔW_peft)| over the adapted weights. Exit status 1 on any key not loaded or an
error above 1e-5.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from check_loaders import load_comfyui  # noqa: E402
from lora_booth import families  # noqa: E402
from lora_booth.adapters import formats  # noqa: E402
from lora_booth.families import flux2_layout  # noqa: E402

TARGETS = (*families.FLUX2.default_targets, "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
           "ff_context.linear_out")
STRENGTHS = (1.0, 0.5)


def adapted():
    """(base namespace, transformer with random LoRA) on the tiny FLUX.2 klein transformer."""
    from diffusers import Flux2Transformer2DModel

    from lora_booth.config.sections import LoraConfig
    from lora_booth.families.tiny import tiny_model_dir
    from lora_booth.model import lora

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_model_dir("tiny-flux2"), subfolder="transformer")
    base = types.SimpleNamespace(kind=families.FLUX2, family="flux2", unet=transformer)
    lora.add_adapters(base, LoraConfig(rank=4, alpha=2.0, targets=TARGETS), 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return base


def bfl_weights(transformer, merged: bool) -> dict[str, torch.Tensor]:
    """The transformer's Linear weights under BFL's names (`diffusion_model.` + flux2_layout), the
    adapters merged in by peft when `merged`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(transformer)
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge() if merged else None
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        if not name.endswith(".weight") or tensor.ndim != 2:
            continue
        key, slot, _, swapped = flux2_layout.original_tensor_name(name)
        fused.setdefault(key, {})[slot] = torch.cat(tensor.chunk(2)[::-1]) if swapped else tensor
    return {f"diffusion_model.{k}": torch.cat([v[s] for s in sorted(v)]).detach().double() for k, v in fused.items()}


class Holder(torch.nn.Module):
    def __init__(self, weights: dict, **attributes):
        super().__init__()
        self._weights = weights
        self.__dict__.update(attributes)

    def state_dict(self, *args, **kwargs):
        return self._weights


def run_comfyui(root: Path, plain: dict, lora_file: dict, strength: float) -> tuple[list[str], dict]:
    comfy = load_comfyui(root)
    model = Holder({k: v.float() for k, v in plain.items()}, model_config=types.SimpleNamespace(unet_config={}))
    key_map = comfy.model_lora_keys_unet(model, {})
    missing: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: missing.append(record.getMessage().removeprefix("lora key not loaded: ")) \
        if record.getMessage().startswith("lora key not loaded") else None
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.load_lora(dict(lora_file), key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    weights = {k: v.float().clone() for k, v in plain.items()}
    for key, patch in patches.items():
        name, offset = (key, None) if isinstance(key, str) else key[:2]
        weights[name] = comfy.calculate_weight([(strength, patch, 1.0, offset, None)], weights[name], name)
    return missing, weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (its comfy/ folder is read)")
    args = parser.parse_args()
    base = adapted()
    lora_file = families.FLUX2.kohya_tensors(formats.from_model(base).modules)  # what `train` writes
    plain, merged = bfl_weights(base.unet, False), bfl_weights(base.unet, True)
    adapted_keys = [k for k in plain if not torch.equal(plain[k], merged[k])]
    failed = False
    print(f"{len(lora_file)} tensors in the kohya file, {len(adapted_keys)} BFL weights adapted")
    for strength in STRENGTHS:
        missing, weights = run_comfyui(Path(args.comfyui), plain, lora_file, strength)
        error = max(float((weights[k].double() - (plain[k] + strength * (merged[k] - plain[k]))).abs().max())
                    for k in adapted_keys)
        untouched = [k for k in adapted_keys if torch.equal(weights[k].double(), plain[k])]
        print(f"ComfyUI, strength {strength}: {len(missing)} keys not loaded {missing[:4]}, "
              f"{len(untouched)} adapted weights left unchanged, max |error| {error:.2e}")
        failed |= bool(missing) or bool(untouched) or error > 1e-5
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
