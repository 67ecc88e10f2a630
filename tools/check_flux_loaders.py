"""Run the FLUX.1 LoRA loaders of other tools on every file lora-booth writes, at strength 1 and
0.5, and compare what they compute with peft's merge (the FLUX.1 counterpart of
tools/check_loaders.py; the table in docs/flux.md comes from):

    OMP_NUM_THREADS=2 python tools/check_flux_loaders.py --comfyui ~/src/ComfyUI \\
        --forge ~/src/stable-diffusion-webui-forge

Either checkout may be left out; diffusers (`FluxPipeline.load_lora_weights`, then
`set_adapters(weights=[s])` and `fuse_lora`) and lora-booth's own reader always run. The model is
tests/test_flux_layout.py's tiny FLUX.1 transformer (one block of each kind, 2 heads × 16) and a
tiny CLIP-L. peft puts adapters of each type (rank 4, alpha 2; LoKr rank 2, alpha 1, so w2 is
factored) on every Linear of the transformer that lora-booth can target, the model-level
`proj_out` included, and on CLIP-L's attention; every adapter tensor is drawn at random (DoRA
magnitudes moved ±30 %), and lora-booth writes its files as `train` does: the diffusers file
(`pytorch_lora_weights.safetensors`), the kohya file (LoRA only: BFL's fused q/k/v), and for DoRA
the `convert … to=kohya dora=bake rank=N` fallback at the weights' full rank.

ComfyUI and Forge run their own key maps and weight arithmetic on a stand-in model that holds the
weights under BFL's names (`diffusion_model.double_blocks.0.img_attn.qkv.weight`, q, k and v as row
slices) and CLIP-L's under `clip_l.transformer.text_model…`:
- ComfyUI: comfy/lora.py (model_lora_keys_unet's Flux branch with utils.flux_to_diffusers,
  model_lora_keys_clip, load_lora, calculate_weight) and comfy/weight_adapter/*; stubbed as in
  tools/check_loaders.py, with comfy.model_base.Flux a class the stand-in is an instance of.
  Keys not loaded: what load_lora logs as "lora key not loaded".
- Forge: packages_3rdparty/comfyui_lora_collection (its copy of ComfyUI's key maps and load_lora)
  and backend/patcher/lora.py's merge_lora_to_weight; keys not loaded: what load_lora returns.
A cell: the largest |W_tool − W_ref| over all adapted weights, with W_ref = W + s·(W_peft − W)
(peft's merge at strength 1; a DoRA strength s moves s of the way, as ComfyUI, Forge and lora-booth
apply it; diffusers scales DoRA's ΔW inside the norm instead, so its DoRA row at 0.5 differs by that
convention), and the file's keys the tool left unloaded.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
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

from check_loaders import ComfyFlux, load_comfyui, load_forge  # noqa: E402
from lora_booth import flux_layout  # noqa: E402

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
           "x_embedder", "context_embedder", "linear_1", "linear_2", "norm_out.linear")
TYPES = ("lora", "dora", "loha", "lokr")
RANK_ALPHA = {"lokr": (2, 1.0)}
STRENGTHS = (1.0, 0.5)


def adapted(kind: str):
    """(lora-booth base namespace, transformer, CLIP-L) with peft adapters of `kind`, drawn at random."""
    from test_flux_layout import tiny_clip, tiny_transformer

    from lora_booth import families, lora
    from lora_booth.config import LoraConfig

    base = types.SimpleNamespace(kind=families.FLUX, family="flux", unet=tiny_transformer(), text_encoder=tiny_clip())
    rank, alpha = RANK_ALPHA.get(kind, (4, 2.0))
    lora.add_adapters(base, LoraConfig(type=kind, rank=rank, alpha=alpha, targets=TARGETS, text_encoder=True), 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lora.adapted_parts(base).values():
            for name, p in module.named_parameters():
                if p.requires_grad and "lora_magnitude_vector" in name:
                    p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=generator))
                elif p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return base


def merged_by_peft(base) -> dict[str, torch.Tensor]:
    """'transformer.<module>' / 'text_encoder.text_model.<module>' → peft's merged weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_booth import formats, lora

    out = {}
    for part, module in lora.adapted_parts(base).items():
        module = copy.deepcopy(module)
        for name, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                out[f"{part}.{formats.canonical_path(part, name)}"] = layer.get_base_layer().weight.detach().double()
    return out


def plain_weights(transformer: nn.Module, clip: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear weight (peft's base layer where adapted) by 'transformer.<module>' / 'text_encoder.…'."""
    from lora_booth import formats

    out = {}
    for part, model in (("transformer", transformer), ("text_encoder", clip)):
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".lora_" not in name:
                name = name.removesuffix(".base_layer")
                out[f"{part}.{formats.canonical_path(part, name)}"] = module.weight.detach().double()
    return out


def to_bfl(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-named weights → ComfyUI's/Forge's names: BFL's modules, fused rows stacked."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, weight in weights.items():
        part, _, name = key.partition(".")
        if part == "text_encoder":
            if ".layers." in name:
                out[f"clip_l.transformer.{name}.weight"] = weight
            continue
        target, slot = flux_layout.original_name(name)
        groups.setdefault(target, {})[slot] = weight
    for target, parts in groups.items():
        weight = torch.cat([parts[s] for s in sorted(parts)])
        if target == flux_layout.SWAPPED:
            weight = torch.cat(weight.chunk(2)[::-1])
        out[f"diffusion_model.{target}.weight"] = weight
    return out


class Holder(nn.Module):
    """Answers state_dict() with the given weights, and the attributes the key maps read."""

    def __init__(self, weights: dict, **attributes):
        super().__init__()
        self._weights = weights
        self.__dict__.update(attributes)

    def state_dict(self, *args, **kwargs):
        return self._weights


class ComfyFluxHolder(Holder, ComfyFlux):
    pass


def _patched(bfl: dict, patches: dict, merge) -> dict:
    weights = {k: v.float().clone() for k, v in bfl.items()}
    for key, patch in patches.items():
        # a tuple key is (weight, offset) or (weight, offset, function): a row slice of a fused weight
        name, offset, function = (key, None, None) if isinstance(key, str) else (*key, None)[:3]
        weights[name] = merge(name, patch, weights[name], offset, function)
    return weights


def run_comfyui(root: Path, bfl: dict, config: dict, lora: dict, strength: float) -> tuple[list[str], dict]:
    comfy = load_comfyui(root)
    unet = {k: v for k, v in bfl.items() if k.startswith("diffusion_model.")}
    clip = {k: v for k, v in bfl.items() if k.startswith("clip_l.")}
    model = ComfyFluxHolder(unet, model_config=types.SimpleNamespace(unet_config=config))
    key_map = comfy.model_lora_keys_clip(Holder(clip), comfy.model_lora_keys_unet(model, {}))
    missing: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: missing.append(record.getMessage().removeprefix("lora key not loaded: ")) \
        if record.getMessage().startswith("lora key not loaded") else None
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.load_lora(dict(lora), key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    return missing, _patched(bfl, patches, lambda name, patch, weight, offset, function: comfy.calculate_weight(
        [(strength, patch, 1.0, offset, function)], weight, name))


def run_forge(root: Path, bfl: dict, config: dict, lora: dict, strength: float) -> tuple[list[str], dict]:
    forge = load_forge(root)
    unet = {k: v for k, v in bfl.items() if k.startswith("diffusion_model.")}
    clip = {k: v for k, v in bfl.items() if k.startswith("clip_l.")}
    model = Holder(unet, diffusion_model=types.SimpleNamespace(config=config),
                   config=types.SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev"))
    key_map = {**forge.model_lora_keys_unet(model, {}), **forge.model_lora_keys_clip(Holder(clip), {})}
    patches, remaining = forge.load_lora(dict(lora), key_map)
    return sorted(remaining), _patched(bfl, patches, lambda name, patch, weight, offset, function:
                                       forge.merge_lora_to_weight([(strength, patch, 1.0, offset, function)], weight,
                                                                  name))


def run_diffusers(_root, base, file: Path, strength: float) -> tuple[list[str], dict]:
    """FluxPipeline.load_lora_weights, set_adapters(weights=[s]), fuse_lora: the fused weights."""
    from diffusers import FluxPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from test_flux_layout import tiny_clip, tiny_transformer

    from lora_booth import formats

    transformer, clip = tiny_transformer(), tiny_clip()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="subject")
    pipe.set_adapters(["subject"], [strength])
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    loaded = set()
    for part, model in (("transformer", transformer), ("text_encoder", clip)):
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                loaded.add(f"{part}.{formats.canonical_path(part, name)}")
    wanted = {f"{part}.{path}" for part, path in formats.read(file).modules}
    return sorted(wanted - loaded), plain_weights(transformer, clip)


def run_lora_booth(_root, base, file: Path, strength: float) -> tuple[list[str], dict]:
    """lora-booth's own reader and merge arithmetic (merge, generate)."""
    from test_flux_layout import tiny_clip, tiny_transformer

    from lora_booth import formats

    weights = plain_weights(tiny_transformer(), tiny_clip())
    for (part, path), module in formats.read(file).modules.items():
        key = f"{part}.{path}"
        weights[key] = module.apply(weights[key].float(), strength).double()
    return [], weights


def write_files(base, kind: str, folder: Path) -> dict[str, Path | str]:
    """lora-booth's files for the adapter, by label (a refusal's message instead of a path)."""
    from diffusers import FluxTransformer2DModel  # noqa: F401 - save_pretrained below needs diffusers loaded

    from lora_booth import formats, merging

    adapter = formats.from_model(base)
    source = {"lora_booth.family": "flux", "lora_booth.base_model": str(folder / "base")}
    files: dict[str, Path | str] = {
        "diffusers": formats.write_diffusers(adapter, folder / formats.DIFFUSERS_WEIGHT_NAME, source)}
    try:
        files["kohya"] = formats.write_kohya(adapter, folder / "subject.safetensors",
                                             formats.kohya_file_metadata(adapter, source, "flux"), family="flux")
    except formats.AdapterError as exc:
        files["kohya"] = str(exc).split(":", 1)[-1].strip()
    if kind == "dora":
        save_base(folder / "base")
        full = max(min(m.update_shape()) for m in adapter.modules.values())
        files[f"dora=bake rank={full} (full), kohya"] = merging.bake_dora(
            files["diffusers"], "kohya", folder / "baked.safetensors", full, str(folder / "base"), report=lambda *_: None)
    return files


def save_base(folder: Path) -> None:
    """The pristine tiny model as a FLUX.1 diffusers folder, which dora=bake reads W from."""
    from test_flux_layout import tiny_clip, tiny_transformer

    tiny_transformer().save_pretrained(folder / "transformer")
    tiny_clip().save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout")
    parser.add_argument("--forge", type=Path, help="a stable-diffusion-webui-forge checkout")
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()
    from safetensors.torch import load_file
    from test_flux_layout import tiny_clip, tiny_transformer

    from lora_booth.models import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(2)
    transformer = tiny_transformer()
    config = {"depth": 1, "depth_single_blocks": 1,
              "hidden_size": transformer.config.num_attention_heads * transformer.config.attention_head_dim}
    bfl = to_bfl(plain_weights(transformer, tiny_clip()))
    outside = {name: run for name, run in (("ComfyUI", run_comfyui), ("Forge", run_forge))
               if getattr(args, name.lower())}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for kind in args.types.split(","):
            folder = Path(scratch) / kind
            folder.mkdir()
            base = adapted(kind)
            peft = merged_by_peft(base)
            plain = plain_weights(tiny_transformer(), tiny_clip())
            for label, file in write_files(base, kind, folder).items():
                if isinstance(file, str):
                    rows.append(("lora-booth", label, kind, "–", "not written", file[:90]))
                    continue
                lora = load_file(str(file))
                for strength in STRENGTHS:
                    reference = to_bfl({k: v + strength * (peft[k] - v) if k in peft else v for k, v in plain.items()})
                    runs = {"diffusers": lambda s: run_diffusers(None, base, file, s),
                            "lora-booth": lambda s: run_lora_booth(None, base, file, s)}
                    runs.update({name: (lambda s, run=run, name=name: run(getattr(args, name.lower()), bfl, config,
                                                                         lora, s)) for name, run in outside.items()})
                    for tool, run in runs.items():
                        try:
                            missing, weights = run(strength)
                            weights = to_bfl(weights) if tool in ("diffusers", "lora-booth") else weights
                            error = max(float((weights[k].double() - reference[k]).abs().max()) for k in reference)
                            rows.append((tool, label, kind, f"{strength:g}", f"{error:.2g}",
                                         f"{len(missing)}" + (f" (such as {missing[0]})" if missing else "")))
                        except Exception as exc:  # noqa: BLE001 - a tool that refuses a file is a row
                            why = f"{type(exc).__name__}: {' '.join(str(exc).split()).split('. ')[0][:80]}"
                            if tool == "diffusers" and isinstance(exc, AssertionError):
                                why = "its kohya reader splits linear1 at FLUX.1's own width (3072) only"
                            rows.append((tool, label, kind, f"{strength:g}", "refuses it", why))
                        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows, ["diffusers", *outside, "lora-booth"])


def print_table(rows: list[tuple], tools: list[str]) -> None:
    """One line per adapter type × file, one column per tool: max |W_tool − W_ref| at strength 1 ·
    0.5, and how many of the file's keys the tool left unloaded (the first ones named)."""
    cells = {(r[2], r[1], r[0], r[3]): r[4:] for r in rows}
    print(f"| type | file | {' | '.join(tools)} |")
    print("|---|---|" + "---|" * len(tools))
    for kind, label in dict.fromkeys((r[2], r[1]) for r in rows):
        line = []
        for tool in tools:
            found = [cells.get((kind, label, tool, f"{s:g}")) for s in STRENGTHS]
            refused = cells.get((kind, label, "lora-booth", "–"))
            if refused:
                line.append(f"not written: {refused[1]}" if tool == "lora-booth" else "–")
            elif not found[0]:
                line.append("–")
            elif found[0][0] == "refuses it":
                line.append(f"refuses it: {found[0][1]}")
            else:
                unloaded = found[0][1]
                line.append(" · ".join(c[0] for c in found if c) +
                            ("" if unloaded == "0" else f"; {unloaded} keys not loaded"))
        print(f"| {kind} | {label} | " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
