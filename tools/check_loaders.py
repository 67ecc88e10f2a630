"""Run the LoRA loaders of other tools on lora-booth's own files and compare what they compute
with peft's merge of the diffusers file (issues 16, 34). The table in docs/adapter-types.md comes from:

    OMP_NUM_THREADS=2 python tools/check_loaders.py --comfyui ~/src/ComfyUI \\
        --forge ~/src/stable-diffusion-webui-forge --a1111 ~/src/stable-diffusion-webui \\
        --sd-scripts ~/src/sd-scripts --lycoris ~/src/LyCORIS

Give any subset of the checkouts (none: diffusers and lora-booth only); rerun after each release of
those tools. Both files lora-booth writes (the kohya file and pytorch_lora_weights.safetensors) go
through every loader, at strength 1 and 0.5; the reference at strength s is W + s·(W_peft − W). The
diffusers column is diffusers' own loader: load_lora_weights, set_adapters(weights=[s]), fuse_lora
(its DoRA strength scales ΔW inside the norm, so its DoRA cells at 0.5 differ by that convention).
For every family (SD 1.x,
SDXL: the tiny models of lora_booth/tiny.py, random weights) and adapter type it trains nothing:
peft puts the adapters on the model, their tensors are drawn at random and large ("a strongly
trained adapter", DoRA magnitudes moved ±30 %), and lora-booth writes both files the way `train`
does. Each tool's loader then reads the kohya file and patches a fresh copy of the base weights; a
cell says how many of the file's modules it matched, the largest |W_tool − W_peft|, and when that
is not ~0 the largest ‖W_tool − W_peft‖ / ‖W_peft − W‖ of a module. Types: lora; locon (LoRA on the
resnets' 3×3 convolutions too); loha; lokr (rank 2: w2 = w2_a·w2_b); lokr with a full 4-D w2 (on
SD 1.x's 1×1 proj_in/proj_out convolutions); dora (peft's, per output row, as lora-booth writes
it); dora as an input-axis file (per input column, A1111's and OneTrainer's layout; the reference is
lora-booth's reader of it, peft cannot hold it); and the `convert … dora=bake rank=N` fallback. The
lora-booth column is lora-booth's own reader and merge arithmetic on the same files; LyCORIS is its
modules' forward pass, "LyCORIS merge_to" its merge (used by its tools/merge.py).

Only the loader code runs, with everything around it stubbed (no UI, no checkpoint loading, no
GPU): each tool's own functions do the key matching and the weight arithmetic, on stand-ins for its
model objects that hold lora-booth's tiny weights under that tool's names.
- ComfyUI: comfy/lora.py (model_lora_keys_unet/_clip, load_lora, calculate_weight) and
  comfy/weight_adapter/*. Stubbed: comfy.model_management (cast_to_device: a plain .to()),
  comfy.model_base (empty classes, so the isinstance checks for other families are false),
  comfy.utils (only unet_to_diffusers and its tables are taken from the checkout's file), and
  weight_adapter's glora/oft/boft when the checkout lacks them.
- Forge: backend/patcher/lora.py (merge_lora_to_weight, weight_decompose) with the key maps and
  load_lora of packages_3rdparty/comfyui_lora_collection (Forge's own priority order). Stubbed:
  backend.memory_management (cast_to_device), backend.utils, backend.operations.
- AUTOMATIC1111: extensions-builtin/Lora network*.py as they are; from networks.py the name
  conversion, load_network and network_apply_weights (taken out of the file and run). Stubbed:
  modules.* (shared.sd_model is a stand-in with A1111's module names: LDM UNet names, the CLIP-L
  `transformer.text_model…` tree, SDXL's OpenCLIP-G as nn.MultiheadAttention with fused
  in_proj_weight, as A1111 holds it); devices.dtype is fp32 (A1111's --no-half).
- sd-scripts: networks/lora.py (create_network_from_weights, merge_to). Stubbed: library.utils
  (logging setup) and library.sdxl_original_unet (its class only marks the SDXL UNet; the stand-in
  holds the tiny UNet's modules under kohya's SDXL names). networks.lora reads LoRA/LoCon only;
  sd-scripts loads LyCORIS files (DoRA, LoHa, LoKr) through lycoris.kohya: the LyCORIS rows.
- LyCORIS: lycoris/kohya.py create_network_from_weights, then each module's merge_to. Stubbed:
  einops and toml when not installed (BOFT and preset files only).
The SD 1.x model is tiny.py's SD 1.x with SD 1.5's block layout (two resnets per level, the
outermost down block and innermost up block without attention): A1111 and ComfyUI derive kohya's
SD 1.x names from that layout, and on tiny.py's one-resnet layout they point at other blocks.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import itertools
import json
import math
import os
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

KINDS = ("lora", "locon", "loha", "lokr", "lokr-conv", "dora", "dora-in", "dora-bake")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TARGETS = {"lora": ATTENTION,
                "locon": (*ATTENTION, "conv1", "conv2"),       # LoRA on the resnets' 3×3 convolutions
                "loha": ATTENTION,
                "lokr": ATTENTION,                              # rank 2: w2 = w2_a·w2_b, scaled by α/r
                "lokr-conv": ("proj_in", "proj_out"),           # rank 4: w2 full, 4-D on SD 1.x's 1×1 convs
                "dora": (*ATTENTION, "proj_in")}                # SD 1.x proj_in: a 1×1 convolution
RANKS = {"lokr": (2, 1.0)}                                      # (rank, alpha); alpha ≠ rank, so a lost scale shows
RANK, ALPHA = 4, 2.0
LABELS = {"lora": "lora", "locon": "locon (3×3 conv)", "loha": "loha", "lokr": "lokr", "lokr-conv": "lokr, 4-D w2",
          "dora": "dora", "dora-in": "dora, input-axis file", "dora-bake": "dora → dora=bake"}


# ---------------------------------------------------------------------------------------- models


class Base:
    """What lora_booth.lora.add_adapters and formats.from_model need, plus the family."""

    def __init__(self, family, unet, encoders):
        from lora_booth import families

        self.family, self.unet = family, unet
        self.kind = families.family(family)
        self.text_encoder = encoders[0]
        self.text_encoder_2 = encoders[1] if len(encoders) > 1 else None

    def parts(self):
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        return parts


def pristine(family: str) -> Base:
    from diffusers import UNet2DConditionModel

    from lora_booth import tiny

    if family == "sdxl":
        pipe = tiny.build_tiny_sdxl_pipeline()
        return Base("sdxl", pipe.unet, [pipe.text_encoder, pipe.text_encoder_2])
    pipe = tiny.build_tiny_pipeline()
    torch.manual_seed(1)
    config = {**pipe.unet.config, "layers_per_block": 2, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
    return Base("sd1", UNet2DConditionModel.from_config(config), [pipe.text_encoder])


def unet_layout(unet) -> dict:
    c = unet.config
    return {"layers_per_block": c.layers_per_block, "up_block_types": list(c.up_block_types)}


def adapted(base: Base, kind: str, seed: int = 0) -> Base:
    """A copy of `base` with peft adapters of `kind`, their tensors drawn large at random."""
    from lora_booth import lora
    from lora_booth.config import LoraConfig

    model = copy.deepcopy(base)
    peft_kind = {"locon": "lora", "lokr-conv": "lokr"}.get(kind, kind)
    rank, alpha = RANKS.get(kind, (RANK, ALPHA))
    lora.add_adapters(model, LoraConfig(type=peft_kind, rank=rank, alpha=alpha, targets=UNET_TARGETS[kind],
                                        text_encoder=kind != "lokr-conv"), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for part in model.parts().values():
            for name, p in part.named_parameters():
                if not p.requires_grad:
                    continue
                if "lora_magnitude_vector" in name:  # DoRA: ‖W‖ per row, moved ±30 %
                    p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=generator))
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if "lora_" in name else 0.5))
    return model


def write_files(model: Base, folder: Path) -> tuple[Path, Path]:
    from lora_booth import formats

    adapter = formats.from_model(model)
    source = {"lora_booth.family": model.family, "lora_booth.prediction_type": "epsilon"}
    diffusers_file = formats.write_diffusers(adapter, folder / formats.DIFFUSERS_WEIGHT_NAME, source)
    kohya_file = formats.write_kohya(adapter, folder / "subject.safetensors",
                                     formats.kohya_file_metadata(adapter, source, model.family), family=model.family)
    return diffusers_file, kohya_file


def peft_reference(base: Base, diffusers_file: Path) -> dict:
    """(part, path) → the weight peft computes when the diffusers file is loaded and merged."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(diffusers_file), "pt") as handle:
        flat = json.loads(handle.metadata()["lora_adapter_metadata"])
    tensors = load_file(str(diffusers_file))
    model = copy.deepcopy(base)
    merged = {}
    for part, module in model.parts().items():
        config = {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
        if not config:
            continue
        kind = LoraConfig if "use_dora" in config else LoKrConfig if "decompose_both" in config else LoHaConfig
        inject_adapter_in_model(kind(**config), module)
        own = {}
        for key, value in tensors.items():
            if key.startswith(part + "."):
                key = key[len(part) + 1:]
                if key.startswith("text_model.") and not hasattr(module, "text_model"):
                    key = key[len("text_model."):]
                own[key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = value
        result = set_peft_model_state_dict(module, own)
        if result.unexpected_keys:
            raise SystemExit(f"peft did not take {result.unexpected_keys[:3]} of {diffusers_file}")
        for name, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                merged[(part, canonical(part, name))] = layer.get_base_layer().weight.detach().clone()
    return merged


def canonical(part: str, name: str) -> str:
    return "text_model." + name if part.startswith("text_encoder") and not name.startswith("text_model.") else name


def module_of(model: Base, part: str, path: str) -> nn.Module:
    root = model.parts()[part]
    return root.get_submodule(path[len("text_model."):] if path.startswith("text_model.") and
                              not hasattr(root, "text_model") else path)


def ldm_tree(base: Base) -> dict[str, tuple[str, str]]:
    """The UNet's leaf modules under their LDM names (input_blocks.1.1.proj_in …) → (part, path)."""
    from lora_booth import ldm

    names = {}
    layout = unet_layout(base.unet)
    for path, module in base.unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        try:
            names[ldm.unet_module_name(path, layout)] = ("unet", path)
        except (KeyError, ValueError, IndexError):
            pass
    return names


def nest(pairs: dict[str, nn.Module], cls_names: dict[str, str] | None = None) -> nn.Module:
    """An nn.Module tree holding each module at its dotted name (containers get `cls_names`)."""
    root = nn.Module()
    for dotted, module in pairs.items():
        node = root
        parts = dotted.split(".")
        for i, piece in enumerate(parts[:-1]):
            if piece not in node._modules:
                prefix = ".".join(parts[:i + 1])
                cls = type((cls_names or {}).get(prefix, "Container"), (nn.Module,), {})
                node.add_module(piece, cls())
            node = node._modules[piece]
        node.add_module(parts[-1], module)
    return root


def encoder_leaves(encoder: nn.Module) -> dict[str, nn.Module]:
    """A CLIP text encoder's Linear modules under transformers' nested names (text_model.…)."""
    return {canonical("text_encoder", n): m for n, m in encoder.named_modules() if isinstance(m, nn.Linear)}


# ---------------------------------------------------------------------------------------- loading


def import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stub(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def package(name: str, path: Path | None = None) -> types.ModuleType:
    module = stub(name)
    module.__path__ = [str(path)] if path else []
    return module


def definitions(path: Path, names: set[str], namespace: dict) -> dict:
    """Run only the named top-level functions, classes and assignments of a file (its imports
    would pull in the whole application)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keep = [node for node in tree.body
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names)
            or (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets))]
    missing = names - {getattr(n, "name", None) or n.targets[0].id for n in keep}
    if missing:
        raise SystemExit(f"{path}: has no {sorted(missing)}; the loader changed, update tools/check_loaders.py")
    exec(compile(ast.Module(keep, []), str(path), "exec"), namespace)
    return namespace


def cast_to_device(tensor, device, dtype, non_blocking=False, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


class Dummy:
    """Stands for every model class an isinstance check asks about: none of them."""


def comfy_unet_config(unet) -> dict:
    """ComfyUI's unet_config keys that unet_to_diffusers reads, from a diffusers UNet config."""
    c = unet.config
    levels = len(c.block_out_channels)
    per_block = c.layers_per_block
    depth = c.transformer_layers_per_block
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = [depth[i] if "CrossAttn" in c.down_block_types[i] else 0 for i in range(levels)]
    up = [list(reversed(depth))[j] if "CrossAttn" in c.up_block_types[j] else 0 for j in range(levels)]
    return {"num_res_blocks": [per_block] * levels, "channel_mult": [1] * levels,
            "transformer_depth": [d for d in down for _ in range(per_block)],
            "transformer_depth_output": [up[levels - 1 - level] for level in range(levels) for _ in range(per_block + 1)],
            "transformer_depth_middle": depth[-1]}


def comfy_state(base: Base) -> tuple[dict, dict, dict]:
    """ComfyUI's (and Forge's) weight names: diffusion_model.<LDM>, clip_l./clip_g.transformer.…"""
    unet, clip, where = {}, {}, {}
    for name, (part, path) in ldm_tree(base).items():
        key = f"diffusion_model.{name}.weight"
        unet[key] = module_of(base, part, path).weight
        where[key] = (part, path)
    towers = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    for part, encoder in base.parts().items():
        if part in towers:
            for path, module in encoder_leaves(encoder).items():
                key = f"{towers[part]}.transformer.{path}.weight"
                clip[key] = module.weight
                where[key] = (part, path)
    return unet, clip, where


class Holder:
    def __init__(self, state, **attributes):
        self._state = state
        self.__dict__.update(attributes)

    def state_dict(self):
        return self._state


class ComfyFlux:
    """Stands for comfy.model_base.Flux: the one model class whose isinstance check is true for a
    FLUX.1 stand-in (tools/check_flux_loaders.py)."""


def load_comfyui(root: Path):
    """ComfyUI's comfy/lora.py and weight adapters, imported once with the stubs they need."""
    if "comfy.lora" not in sys.modules:
        package("comfy", root / "comfy")
        stub("comfy.model_management", cast_to_device=cast_to_device)
        stub("comfy.model_base", __getattr__=lambda name: Dummy, Flux=ComfyFlux)
        utils = stub("comfy.utils", torch=torch)
        definitions(root / "comfy" / "utils.py", {"UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS", "UNET_MAP_RESNET",
                                                  "UNET_MAP_BASIC", "unet_to_diffusers", "flux_to_diffusers",
                                                  "swap_scale_shift"},
                    utils.__dict__)
        for extra, cls in (("glora", "GLoRAAdapter"), ("oft", "OFTAdapter"), ("boft", "BOFTAdapter")):
            if not (root / "comfy" / "weight_adapter" / f"{extra}.py").is_file():
                stub(f"comfy.weight_adapter.{extra}", **{cls: type(cls, (), {"load": classmethod(lambda *a: None)})})
        importlib.import_module("comfy.lora")
    return sys.modules["comfy.lora"]


def run_comfyui(root: Path, base: Base, kohya_file: Path, strength: float = 1.0) -> tuple[int, dict]:
    from safetensors.torch import load_file

    comfy_lora = load_comfyui(root)
    unet, clip, where = comfy_state(base)
    model = Holder(unet, model_config=types.SimpleNamespace(unet_config=comfy_unet_config(base.unet)))
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    key_map = comfy_lora.model_lora_keys_clip(Holder(clip), key_map)
    patches = comfy_lora.load_lora(load_file(str(kohya_file)), key_map, log_missing=False)
    weights = {}
    for key, patch in patches.items():
        weight = (unet.get(key) if key in unet else clip[key]).detach().float().clone()
        weights[where[key]] = comfy_lora.calculate_weight([(strength, patch, 1.0, None, None)], weight, key)
    return len(patches), weights


def load_forge(root: Path):
    """Forge's backend/patcher/lora.py, imported once with the stubs it needs."""
    if "forge_lora" not in sys.modules:
        sys.path.insert(0, str(root))
        package("backend", root / "backend")
        package("backend.patcher", root / "backend" / "patcher")
        stub("backend.memory_management", cast_to_device=cast_to_device)
        stub("backend.utils")
        stub("backend.operations")
        import_file("forge_lora", root / "backend" / "patcher" / "lora.py")
    return sys.modules["forge_lora"]


def run_forge(root: Path, base: Base, kohya_file: Path, strength: float = 1.0) -> tuple[int, dict]:
    from safetensors.torch import load_file

    forge = load_forge(root)
    unet, clip, where = comfy_state(base)
    model = Holder(unet, diffusion_model=types.SimpleNamespace(config=comfy_unet_config(base.unet)),
                   config=types.SimpleNamespace(huggingface_repo=""))
    key_map = {**forge.model_lora_keys_unet(model, {}), **forge.model_lora_keys_clip(Holder(clip), {})}
    patches, _ = forge.load_lora(load_file(str(kohya_file)), key_map)
    weights = {}
    for key, patch in patches.items():
        weight = (unet.get(key) if key in unet else clip[key]).detach().float().clone()
        weights[where[key]] = forge.merge_lora_to_weight([(strength, patch, 1.0, None, None)], weight, key)
    return len(patches), weights


def a1111_model(base: Base) -> tuple[types.SimpleNamespace, dict]:
    """shared.sd_model as A1111 holds it: model.diffusion_model with LDM names; SD 1.x
    cond_stage_model.wrapped.transformer (transformers' CLIP-L); SDXL conditioner.embedders
    [CLIP-L, OpenCLIP-G with nn.MultiheadAttention]. Returns it and a function reading weights back."""
    leaves = {f"diffusion_model.{name}": module_of(base, part, path) for name, (part, path) in ldm_tree(base).items()}
    model = nest(leaves)
    if base.family != "sdxl":
        wrapped = nest({f"transformer.{p}": m for p, m in encoder_leaves(base.text_encoder).items()})
        return types.SimpleNamespace(is_sdxl=False, model=model, cond_stage_model=types.SimpleNamespace(wrapped=wrapped)), {}
    first = nest({f"transformer.{p}": m for p, m in encoder_leaves(base.text_encoder).items()})
    heads, fused = {}, {}
    layers = base.text_encoder_2.encoder.layers if hasattr(base.text_encoder_2, "encoder") else \
        base.text_encoder_2.text_model.encoder.layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        width = attn.q_proj.weight.shape[0]
        mha = nn.MultiheadAttention(width, attn.num_heads if hasattr(attn, "num_heads") else 1, bias=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            mha.out_proj.weight.copy_(attn.out_proj.weight)
        heads[f"model.transformer.resblocks.{i}.attn"] = mha
        heads[f"model.transformer.resblocks.{i}.mlp.c_fc"] = layer.mlp.fc1
        heads[f"model.transformer.resblocks.{i}.mlp.c_proj"] = layer.mlp.fc2
        fused[i] = mha
    second = nest(heads)
    embedders = [types.SimpleNamespace(wrapped=first), types.SimpleNamespace(wrapped=second)]
    return types.SimpleNamespace(is_sdxl=True, model=model, conditioner=types.SimpleNamespace(embedders=embedders)), fused


def run_a1111(root: Path, base: Base, kohya_file: Path, strength: float = 1.0) -> tuple[int, dict]:
    from safetensors.torch import load_file

    lora_dir = root / "extensions-builtin" / "Lora"
    if "a1111_networks" not in sys.modules:
        package("modules")
        shared = stub("modules.shared", opts=types.SimpleNamespace(lora_functional=False), sd_model=None)
        stub("modules.sd_models", read_state_dict=lambda filename, *a, **k: load_file(filename),
             read_metadata_from_safetensors=lambda filename: {})
        for name in ("cache", "errors", "hashes"):
            stub(f"modules.{name}")
        stub("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32)
        package("modules.models")
        package("modules.models.sd3")
        stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (nn.Linear,), {}))
        sys.path.insert(0, str(lora_dir))
        network = import_file("network", lora_dir / "network.py")
        types_ = [import_file(n, lora_dir / f"{n}.py") for n in ("lyco_helpers", "network_lora", "network_hada",
                                                                   "network_lokr")]
        namespace = {"os": os, "re": __import__("re"), "torch": torch, "logging": __import__("logging"),
                     "Union": __import__("typing").Union, "network": network, "shared": shared,
                     "sd_models": sys.modules["modules.sd_models"], "devices": sys.modules["modules.devices"],
                     "modules": sys.modules["modules"], "textual_inversion": None, "loaded_networks": [],
                     "extra_network_lora": types.SimpleNamespace(errors={}),
                     "module_types": [types_[1].ModuleTypeLora(), types_[2].ModuleTypeHada(), types_[3].ModuleTypeLokr()]}
        definitions(lora_dir / "networks.py", {"re_digits", "re_x_proj", "re_compiled", "suffix_conversion",
                                               "convert_diffusers_name_to_compvis",
                                               "assign_network_names_to_compvis_modules", "BundledTIHash",
                                               "load_network", "allowed_layer_without_weight", "store_weights_backup",
                                               "restore_weights_backup", "network_restore_weights_from_backup",
                                               "network_apply_weights"}, namespace)
        sys.modules["a1111_networks"] = types.SimpleNamespace(ns=namespace, shared=shared)
    a1111 = sys.modules["a1111_networks"]
    sd_model, fused = a1111_model(base)
    a1111.shared.sd_model = sd_model
    ns = a1111.ns
    ns["assign_network_names_to_compvis_modules"](sd_model)
    net = ns["load_network"]("subject", types.SimpleNamespace(filename=str(kohya_file)))
    net.te_multiplier, net.unet_multiplier, net.dyn_dim = strength, strength, None
    ns["loaded_networks"][:] = [net]
    # A1111 patches a layer when its forward runs; nn.MultiheadAttention never runs its out_proj's
    # forward (it reads the weight), so the out_proj is patched through the attention alone
    inner = {id(m.out_proj) for m in fused.values()}
    with torch.no_grad():
        for module in {id(m): m for m in sd_model.network_layer_mapping.values()}.values():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and id(module) not in inner:
                ns["network_apply_weights"](module)
    weights = {}
    files = {k.split(".")[0] for k in load_file(str(kohya_file))}
    from lora_booth import formats
    for name in files:
        part, path = formats.parse_kohya_name(name)
        path = formats.canonical_path(part, path)
        if part == "text_encoder_2" and fused and path.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
            layer = int(path.split(".")[3])
            q, k, v = fused[layer].in_proj_weight.detach().chunk(3, 0)
            weights[(part, path)] = {"q_proj": q, "k_proj": k, "v_proj": v}[path.split(".")[-1]].clone()
        elif part == "text_encoder_2" and fused and path.endswith("out_proj"):
            weights[(part, path)] = fused[int(path.split(".")[3])].out_proj.weight.detach().clone()
        else:
            weights[(part, path)] = module_of(base, part, path).weight.detach().clone()
    return len(net.modules), weights


def sdxl_unet_standin(base: Base, marker: type) -> nn.Module:
    """The tiny UNet's modules under kohya's SDXL UNet names, with the class names sd-scripts and
    LyCORIS look for (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D)."""
    leaves, classes = {}, {}
    for name, (part, path) in ldm_tree(base).items():
        leaves[name] = module_of(base, part, path)
        pieces = name.split(".")
        depth = 2 if pieces[0] == "middle_block" else 3  # middle_block.1.proj_in, input_blocks.4.1.proj_in
        if pieces[0] not in ("input_blocks", "middle_block", "output_blocks") or len(pieces) <= depth:
            continue
        block, slot = ".".join(pieces[:depth]), pieces[depth]
        if slot in ("transformer_blocks", "proj_in", "proj_out", "norm"):
            classes[block] = "Transformer2DModel"
        elif slot in ("in_layers", "out_layers", "emb_layers", "skip_connection"):
            classes[block] = "ResnetBlock2D"
        elif slot == "op":
            classes[block] = "Downsample2D"
        elif slot == "conv":
            classes[block] = "Upsample2D"
    tree = nest(leaves, classes)
    standin = type("SdxlStandIn", (marker,), {"__init__": lambda self: nn.Module.__init__(self)})()
    for child, module in tree.named_children():
        standin.add_module(child, module)
    return standin


def text_encoders_nested(base: Base) -> list[nn.Module]:
    """The encoders as transformers < 5.6 nests them (text_model.encoder…), the names kohya's use."""
    out = []
    for part in ("text_encoder", "text_encoder_2"):
        encoder = base.parts().get(part)
        if encoder is None:
            continue
        if hasattr(encoder, "text_model"):
            out.append(encoder)
        else:
            holder = nn.Module()
            holder.text_model = encoder
            out.append(holder)
    return out


def kohya_weights(base: Base, file: Path) -> dict:
    """The weights of every module the file adapts (either layout), as the tool left them."""
    from lora_booth import formats

    return {(part, path): module_of(base, part, path).weight.detach().clone() for part, path in formats.read(file).modules}


def run_sd_scripts(root: Path, base: Base, kohya_file: Path, strength: float = 1.0) -> tuple[int, dict]:
    if "sd_scripts_lora" not in sys.modules:
        sys.path.insert(0, str(root))
        package("library", root / "library")
        stub("library.utils", setup_logging=lambda *a, **k: None)
        stub("library.sdxl_original_unet", SdxlUNet2DConditionModel=type("SdxlUNet2DConditionModel", (nn.Module,), {}))
        import_file("sd_scripts_lora", root / "networks" / "lora.py")
    kohya = sys.modules["sd_scripts_lora"]
    marker = sys.modules["library.sdxl_original_unet"].SdxlUNet2DConditionModel
    unet = sdxl_unet_standin(base, marker) if base.family == "sdxl" else base.unet
    encoders = text_encoders_nested(base)
    encoders = encoders if base.family == "sdxl" else encoders[0]
    network, weights_sd = kohya.create_network_from_weights(strength, str(kohya_file), None, encoders, unet,
                                                            for_inference=True)
    with torch.no_grad():
        network.merge_to(encoders, unet, weights_sd, torch.float32, "cpu")
    names = {k.split(".")[0] for k in weights_sd}
    loaded = sum(1 for lora in network.text_encoder_loras + network.unet_loras if lora.lora_name in names)
    return loaded, kohya_weights(base, kohya_file)


def run_lycoris(root: Path, base: Base, kohya_file: Path, strength: float = 1.0, mode: str = "forward"
                ) -> tuple[int, dict]:
    if "lycoris.kohya" not in sys.modules:
        sys.path.insert(0, str(root))
        for name in ("einops", "toml"):
            try:
                importlib.import_module(name)
            except ImportError:
                stub(name, rearrange=None, load=None)
        importlib.import_module("lycoris.kohya")
    lyco = sys.modules["lycoris.kohya"]
    marker = type("SdxlUNet2DConditionModel", (nn.Module,), {})
    unet = sdxl_unet_standin(base, marker) if base.family == "sdxl" else base.unet
    encoders = text_encoders_nested(base)
    encoders = encoders if base.family == "sdxl" else encoders[0]
    import logging
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    network, _ = lyco.create_network_from_weights(strength, str(kohya_file), None, encoders, unet)
    modules = network.unet_loras + network.text_encoder_loras
    with torch.no_grad():
        if mode == "merge_to":
            for module in modules:
                module.merge_to(strength)
        else:  # the forward pass: the weight change each module's forward hands to its op
            changes = {}
            for module in modules:
                changes[id(module)] = forward_change(module)
            for module in modules:
                module.org_module[0].weight.add_(changes[id(module)])
    return len(modules), kohya_weights(base, kohya_file)


def forward_change(module) -> torch.Tensor:
    """What a LyCORIS module's forward adds to its layer's weight (delta_weight, as the forward
    passes it to F.linear/F.conv2d), caught at the op."""
    caught = {}
    layer = module.org_module[0]

    def op(x, weight, bias=None, **kwargs):
        caught["delta"] = weight.detach().clone()
        return original(x, torch.zeros_like(weight), bias, **kwargs)

    original = module.op
    module.op = op
    try:
        shape = (1, layer.in_features) if isinstance(layer, nn.Linear) else (1, layer.in_channels, 4, 4)
        module.forward(torch.zeros(shape))
    finally:
        module.op = original
    return caught["delta"]


def run_lora_booth(_root, base: Base, kohya_file: Path, strength: float = 1.0) -> tuple[int, dict]:
    """lora-booth's own reader and merge arithmetic (merge, generate) on the same file."""
    from lora_booth import formats

    adapter = formats.read(kohya_file)
    weights = {key: module.apply(module_of(base, *key).weight.detach().float(), strength)
               for key, module in adapter.modules.items()}
    return len(weights), weights


def run_diffusers(_root, base: Base, file: Path, strength: float = 1.0) -> tuple[int, dict]:
    """diffusers' own loader: load_lora_weights, set_adapters(weights=[s]), fuse_lora."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    if base.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=None, tokenizer_2=None, unet=base.unet, scheduler=None)
    else:
        pipe = StableDiffusionPipeline(vae=None, text_encoder=base.text_encoder, tokenizer=None, unet=base.unet,
                                       scheduler=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="subject")
    pipe.set_adapters(["subject"], [strength])
    pipe.fuse_lora(components=list(base.parts()))
    loaded = sum(isinstance(m, BaseTunerLayer) for part in base.parts().values() for m in part.modules())
    return loaded, kohya_weights(base, file)


TOOLS = {"lora-booth": ("lora_booth", run_lora_booth), "diffusers": ("diffusers", run_diffusers), "ComfyUI": ("comfyui", run_comfyui),
         "Forge": ("forge", run_forge), "A1111": ("a1111", run_a1111),
         "sd-scripts": ("sd_scripts", run_sd_scripts), "LyCORIS": ("lycoris", run_lycoris),
         "LyCORIS merge_to": ("lycoris", lambda *a: run_lycoris(*a, mode="merge_to"))}
BUILT_IN = ("lora-booth", "diffusers")  # always run: no checkout needed
STRENGTHS = (1.0, 0.5)
# sd-scripts' networks.lora reads LoRA and LoCon; it loads LyCORIS files through lycoris.kohya (the LyCORIS rows)
ONLY = {"sd-scripts": ("lora", "locon", "dora-bake")}


# ---------------------------------------------------------------------------------------- metadata


def classed_as(network_file: Path, metadata: dict) -> str:
    """The family the tool's Lora tab files the adapter under (NetworkOnDisk.detect_version)."""
    tree = ast.parse(network_file.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NetworkOnDisk")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "detect_version")
    enum_src = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SdVersion")
    namespace = {"enum": __import__("enum")}
    exec(compile(ast.Module([enum_src, method], []), str(network_file), "exec"), namespace)
    return namespace["detect_version"](types.SimpleNamespace(metadata=metadata)).name


# ---------------------------------------------------------------------------------------- main


def compare(reference: dict, pristine_base: Base, weights: dict) -> tuple[float, float]:
    """Over the modules the tool patched (ComfyUI and Forge return only those; the cell's count says
    how many it left unloaded), the largest |W_tool − W_ref| and ‖W_tool − W_ref‖/‖W_ref − W‖."""
    worst_abs, worst_rel = 0.0, 0.0
    for key, expected in reference.items():
        if key not in weights:
            continue
        before = module_of(pristine_base, *key).weight.detach().float()
        got = weights[key].float().reshape(expected.shape)
        worst_abs = max(worst_abs, float((got - expected).abs().max()))
        change = float((expected - before).norm())
        worst_rel = max(worst_rel, float((got - expected).norm()) / change if change else 0.0)
    return worst_abs, worst_rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, (flag, _) in {n: t for n, t in TOOLS.items() if n not in ("LyCORIS merge_to", *BUILT_IN)}.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=Path, help=f"a checkout of {name}")
    parser.add_argument("--families", default="sd1,sdxl")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    tools = {name: (ROOT if name in BUILT_IN else getattr(args, flag), run) for name, (flag, run) in TOOLS.items()
             if name in BUILT_IN or getattr(args, flag)}
    from lora_booth import formats, merging
    from lora_booth.models import quiet_libraries

    quiet_libraries()
    import logging
    logging.disable(logging.WARNING)
    rows, classes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for family in args.families.split(","):
            base = pristine(family)
            for kind in args.kinds.split(","):
                folder = Path(scratch) / f"{family}-{kind}"
                folder.mkdir()
                model = adapted(base, "dora" if kind.startswith("dora") else kind)
                diffusers_file, kohya_file = write_files(model, folder)
                reference = peft_reference(base, diffusers_file)
                variants = [(LABELS[kind], "kohya", kohya_file, reference),
                            (LABELS[kind], "diffusers", diffusers_file, reference)]
                if kind == "dora-in":
                    variants = [(LABELS[kind], "kohya", *input_axis_file(base, kohya_file, folder))]
                if kind == "dora-bake":  # the fallback: a plain LoRA of W' − W, exact at the weight's full rank
                    base_dir = folder / "base"
                    save_base(base, base_dir)
                    full = max(min(w.shape[0], w[0].numel()) for w in reference.values())
                    variants = [(f"{LABELS[kind]} rank={rank}{' (full)' if rank == full else ''}", "kohya",
                                 merging.bake_dora(diffusers_file, "kohya", folder / f"baked{rank}.safetensors", rank,
                                                   str(base_dir), report=lambda *_: None), reference)
                                for rank in (2 * RANK, full)]
                for (label, layout, file, expected), strength in itertools.product(variants, STRENGTHS):
                    total = len(formats.read(file).modules)
                    # strength s: W + s·(W_peft − W); for DoRA s of the way to W', as ComfyUI/Forge/A1111 apply it
                    at_strength = {key: (lambda w: w + strength * (value - w))(module_of(base, *key).weight.detach().float())
                                   for key, value in expected.items()}
                    where = (family, label, layout, f"{strength:g}")
                    for tool, (root, run) in tools.items():
                        if kind not in ONLY.get(tool, KINDS):
                            continue
                        try:
                            loaded, weights = run(root, copy.deepcopy(base), file, strength)
                            worst_abs, worst_rel = compare(at_strength, base, weights)
                            rows.append((tool, *where, f"{loaded}/{total}", f"{worst_abs:.2g}", f"{worst_rel:.1%}"))
                        except Exception as exc:  # noqa: BLE001 - a tool that fails is a row, not the end of the check
                            rows.append((tool, *where, "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:70]}", ""))
                        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
                if kind == "lora":  # what the Lora tab files it under: the metadata lora-booth writes
                    metadata = formats.read(kohya_file).metadata
                    for tool, network_file in (
                            ("A1111", args.a1111 and args.a1111 / "extensions-builtin/Lora/network.py"),
                            ("Forge", args.forge and args.forge / "extensions-builtin/sd_forge_lora/network.py")):
                        if network_file and network_file.is_file():
                            classes.append((tool, family, classed_as(network_file, metadata)))
    print_table(rows, [name for name in TOOLS if name in tools])
    for tool, family, found in classes:
        print(f"\n{tool} files lora-booth's {family} kohya file under SdVersion.{found}", end="")
    print()


def input_axis_file(base: Base, kohya_file: Path, folder: Path) -> tuple[Path, dict]:
    """The DoRA adapter rewritten with one magnitude per input column, as A1111 and OneTrainer
    lay DoRA out (peft cannot train it; the reference is lora-booth's reader of that layout)."""
    from lora_booth import formats

    adapter = formats.read(kohya_file)
    generator = torch.Generator().manual_seed(7)
    reference = {}
    for key, module in adapter.modules.items():
        weight = module_of(base, *key).weight.detach().float()
        directed = weight + module.delta().reshape(weight.shape)
        norms = directed.transpose(0, 1).flatten(1).norm(dim=1)
        module.magnitude = norms * (0.7 + 0.6 * torch.rand(norms.shape, generator=generator))
        module.magnitude_axis = "in"
        reference[key] = module.apply(weight, 1.0)
    path = formats.write_kohya(adapter, folder / "input-axis.safetensors", family=base.family)
    return path, reference


def print_table(rows: list[tuple], tools: list[str]) -> None:
    """One line per family × adapter type × file, one column per tool: modules loaded of the file's
    (fewer: keys the tool left unloaded), then per strength (1 · 0.5) max |W_tool − W_ref| and, when
    not ~0, max ‖W_tool − W_ref‖ / ‖W_ref − W‖ of a module."""
    cells = {(*r[1:5], r[0]): r[5:] for r in rows}
    strengths = [f"{s:g}" for s in STRENGTHS]
    print(f"| family | adapter type | file | {' | '.join(tools)} |")
    print("|---|---|---|" + "---|" * len(tools))
    for line_key in dict.fromkeys(r[1:4] for r in rows):
        line = []
        for tool in tools:
            found = [cells.get((*line_key, s, tool)) for s in strengths]
            if found[0] is None:
                line.append("–")
            elif found[0][0] == "error":
                line.append(f"refuses it ({found[0][1].split(':')[0]})")
            else:
                errors = " · ".join(c[1] + (f" ({c[2]})" if float(c[1]) > 1e-5 else "") for c in found if c)
                line.append(f"{found[0][0]}, {errors}")
        print(f"| {' | '.join(line_key)} | " + " | ".join(line) + " |")


def save_base(base: Base, folder: Path) -> None:
    """The base as a diffusers folder (UNet and text encoders), which dora=bake reads W from."""
    from safetensors.torch import save_file

    for part, module in base.parts().items():
        (folder / part).mkdir(parents=True)
        stem = "diffusion_pytorch_model" if part == "unet" else "model"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / part / f"{stem}.safetensors"))
    (folder / "vae").mkdir()
    save_file({"placeholder": torch.zeros(1)}, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    pipeline = "StableDiffusionXLPipeline" if base.family == "sdxl" else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))


if __name__ == "__main__":
    main()
