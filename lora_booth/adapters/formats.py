"""The adapter files people share: find and read any of them into the neutral form (neutral.py),
convert between the layouts (diffusers_layout.py, kohya_layout.py), and save a trained adapter in
both with its metadata (file_metadata.py). Every file read is checked first (untrusted.py). Which
tool computes which file right: docs/adapter-types.md, measured by tools/check_loaders.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import families
from ..families import flux_layout
from ..io import atomic
from ..io.errors import AdapterError
from ..model import checkpoint, lycoris
from ..model.lora import adapted_parts
from .diffusers_layout import _alpha_from_config, _from_diffusers, _rank_from_config, write_diffusers
from .file_metadata import _config_json, carried_metadata, file_stem, kohya_file_metadata, output_name, run_metadata
from .kohya_layout import KOHYA_READ_PREFIXES, _from_family_kohya, _from_flux_kohya, _from_kohya, write_kohya
from .neutral import Adapter, DIFFUSERS_WEIGHT_NAME, Module, SAVE_DTYPES, canonical_path
from .untrusted import _read_safetensors, check_adapter_file, validated


# ---------------------------------------------------------------------------------------- reading


def locate(path: str | Path) -> Path:
    """The adapter file a path names: the file itself, or in a run folder or checkpoint folder
    (`out/`, `out/checkpoints/step-750`) its diffusers file, else its one kohya file."""
    path = checkpoint.named(Path(path).expanduser())
    in_checkpoint = (path.parent if path.is_file() else path) / "state.json"
    if path.is_file() and path.name in checkpoint.RESUME_FILES and in_checkpoint.is_file():
        beside = sorted(p.name for p in path.parent.glob("*.safetensors") if p.name not in checkpoint.RESUME_FILES)
        raise AdapterError(f"{path}: is a checkpoint's training state, for resume=, not a LoRA. "
                           + (f"The adapter of that step is beside it: {', '.join(beside)} (or give the folder)."
                              if beside else "This checkpoint is older than the ones that hold their adapter: resume "
                              "from it (train resume=...) to write one."))
    if not path.is_dir():
        return path
    if (path / DIFFUSERS_WEIGHT_NAME).is_file():
        return path / DIFFUSERS_WEIGHT_NAME
    skip = set(checkpoint.RESUME_FILES) | {"embeddings.safetensors"}
    files = sorted(p for p in path.glob("*.safetensors") if p.name not in skip and not p.name.startswith("."))
    if len(files) == 1:
        return files[0]
    if in_checkpoint.is_file() and not files:
        raise AdapterError(f"{path}: this checkpoint is older than the ones that hold their adapter files. Resume "
                           "from it (train resume=...) to write them, or use the run's final adapter.")
    found = f"it holds {len(files)} adapter files ({', '.join(p.name for p in files[:4])}): name one" if files \
        else f"it holds no {DIFFUSERS_WEIGHT_NAME} and no other .safetensors adapter"
    raise AdapterError(f"{path}: {found}. Give the adapter file, or a run or checkpoint folder.")


def read(path: str | Path, allow_pickle: bool = False) -> Adapter:
    """Any LoRA file lora-booth understands: diffusers/PEFT (with or without metadata, old
    `.lora.down` keys too) or kohya (per-module alpha), or a folder that holds one (`locate`)."""
    path = locate(path)
    check_adapter_file(path)
    if path.suffix.lower() != ".safetensors":
        if not allow_pickle:
            raise AdapterError(f"{path}: not a .safetensors file. Pickle files can run code when loaded; "
                               "convert it, or pass allow_pickle=true if you trust its source.")
        tensors, metadata = dict(torch.load(path, map_location="cpu", weights_only=True)), {}
    else:
        tensors, metadata = _read_safetensors(path)
    try:
        own = families.read_family_kohya(tensors, metadata)  # a family's own kohya layout (FLUX.2's BFL names)
        if own is not None:
            return validated(_from_family_kohya(*own, metadata, path), path)
        tensors = next((own for f in families.FAMILIES.values() if (own := f.own_layout(tensors)) is not None), tensors)
        if flux_layout.layout(tensors) in ("kohya", "comfyui"):  # FLUX.1 in BFL's names (sd-scripts, ComfyUI)
            return validated(_from_flux_kohya(tensors, metadata, path), path)
        if any(k.startswith(tuple(KOHYA_READ_PREFIXES)) for k in tensors):
            return validated(_from_kohya(tensors, metadata, path), path)
        return validated(_from_diffusers(tensors, metadata, path), path)
    except AdapterError as exc:
        if str(path) in str(exc):
            raise
        raise AdapterError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------- writing


def names_folder(out: str | Path) -> bool:
    """out= names a folder (an existing one, or a name ending in /) for the file's usual name."""
    return str(out).endswith(("/", os.sep)) or Path(out).expanduser().is_dir()


def convert(source: str | Path, to: str, out: str | Path, allow_pickle: bool = False,
            overwrite: bool = False) -> Path:
    """Rewrite an adapter in the other layout; metadata other than peft's travels along. `out`
    may be a folder (an existing one, or a name ending in /): the file gets its usual name there."""
    if to not in ("diffusers", "kohya"):
        raise AdapterError(f"to={to}: choose diffusers or kohya")
    as_folder = names_folder(out)
    out = Path(out).expanduser()
    adapter = read(source, allow_pickle)
    if as_folder:
        out = out / (DIFFUSERS_WEIGHT_NAME if to == "diffusers" else f"{kohya_file_stem(adapter, locate(source))}.safetensors")
    if out.exists() and not overwrite:
        raise AdapterError(f"out={out} already exists. Choose another name, or pass overwrite=true.")
    atomic.make_dirs(out.parent)
    if to == "kohya":  # the ss_* and ModelSpec keys A1111/Forge sort a LoRA by, rebuilt as train writes them
        return write_kohya(adapter, out, kohya_file_metadata(adapter, adapter.metadata, title=out.stem))
    return write_diffusers(adapter, out, carried_metadata(adapter.metadata))


def kohya_file_stem(adapter: Adapter, path: Path) -> str:
    """A kohya file's name for a converted adapter: the name it was trained under, else its own;
    from a checkpoint folder with its step too (sks_dog-000750), as the checkpoint names its own."""
    name = adapter.metadata.get("ss_output_name") or adapter.metadata.get("lora_booth.name") or \
        (path.parent.name if path.name == DIFFUSERS_WEIGHT_NAME else path.stem)
    name = file_stem(name)
    step = adapter.metadata.get("lora_booth.steps", "")
    if (path.parent / "state.json").is_file() and step.isdigit() and not name.endswith(f"-{int(step):06d}"):
        name = f"{name}-{int(step):06d}"
    return name


def trained_config(path: str | Path) -> dict:
    """The training config an adapter file carries in its metadata (lora_booth.config), or {}
    for files made elsewhere. Only the header is read."""
    from safetensors import safe_open

    file = locate(path)
    try:
        check_adapter_file(file)
        with safe_open(str(file), framework="pt") as handle:
            return _config_json(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - metadata is a convenience: an unreadable one is as good as none
        return {}


# ---------------------------------------------------------------------------------------- training


def from_model(base) -> Adapter:
    """The trained adapters of a model, as the neutral form (fp32, on the CPU)."""
    from peft.utils import get_peft_model_state_dict

    modules = {}
    for part, model in adapted_parts(base).items():
        config = model.peft_config["default"]
        patterns = {"lora_alpha": getattr(config, "lora_alpha", getattr(config, "alpha", None)),
                    "alpha_pattern": dict(config.alpha_pattern or {}), "r": config.r,
                    "rank_pattern": dict(config.rank_pattern or {})}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in get_peft_model_state_dict(model).items():
            module_path, _, leaf = key.removesuffix(".weight").rpartition(".")
            grouped.setdefault(module_path, {})[leaf] = value.detach().float().cpu()
        for module_path, tensors in grouped.items():
            rank = _rank_from_config(patterns, module_path)
            alpha = _alpha_from_config(patterns, module_path, rank)
            if "lora_A" in tensors:
                module = Module(tensors["lora_A"], tensors["lora_B"], alpha, tensors.get("lora_magnitude_vector"))
            else:
                module = lycoris.from_peft(tensors, rank, alpha, f"{part}.{module_path}")
            modules[(part, canonical_path(part, module_path))] = module
    return Adapter(modules, {}, "model")


LOADERS = {
    "lora": "diffusers load_lora_weights (both files), A1111/Forge/ComfyUI (kohya file)",
    "dora": "diffusers load_lora_weights reads the diffusers file exactly; the kohya file (LyCORIS's dora_scale, "
            "per output row as trained) is exact in LyCORIS and lora-booth, but ComfyUI and Forge divide by the base "
            "weight's norm instead of the adapted one's and A1111 reads only per-input-column DoRA, so no DoRA file "
            "loads at the trained weights there (docs/adapter-types.md). For those tools: `lora-booth convert in=OUT "
            "to=kohya dora=bake rank=N out=NAME-lora.safetensors` (a plain LoRA, its error printed) or `lora-booth merge`",
    "loha": "diffusers' load_lora_weights cannot load LoHa for SD 1.x/2.x/SDXL; use the kohya (LyCORIS) file "
            "in A1111/Forge/ComfyUI, or lora-booth generate/merge",
    "lokr": "diffusers' load_lora_weights cannot load LoKr for SD 1.x/2.x/SDXL; use the kohya (LyCORIS) file "
            "in A1111/Forge/ComfyUI, or lora-booth generate/merge",
}


def dora_warning(cfg, out_dir: Path, kohya_stem: str | None = None) -> str | None:
    """The line the end of a DoRA run prints: which tools read its kohya file wrong, and the exact
    command for a plain-LoRA file they all load (None for other kinds, or without a kohya file)."""
    if cfg.lora.type != "dora" or "kohya" not in cfg.save.formats:
        return None
    name = kohya_stem or output_name(cfg)
    return (f"warning: ComfyUI, Forge and A1111 do not load the DoRA file {name}.safetensors at the trained weights "
            "(no DoRA file can satisfy all three; LyCORIS and lora-booth read it exactly). For them, bake it into a "
            f"plain LoRA: lora-booth convert in={out_dir} to=kohya dora=bake rank={2 * cfg.lora.rank} "
            f"out={Path(out_dir) / (name + '-lora.safetensors')} (prints the approximation error; a higher rank is closer)")


def kohya_gap_warning(kohya_file: Path, diffusers_written: bool) -> str | None:
    """The line the end of a FLUX.1 run prints when its kohya file adapts modules that diffusers'
    kohya reader drops silently (flux_layout.dropped_by_diffusers): which file to give diffusers."""
    # the tensor names from the header lora-booth just wrote (safetensors' own reader refuses a path
    # that is not UTF-8, which a user's folder may be)
    with open(kohya_file, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    dropped = flux_layout.dropped_by_diffusers(name for name in header if name != "__metadata__")
    if not dropped:
        return None
    fix = (f"give diffusers {DIFFUSERS_WEIGHT_NAME}, which it loads whole" if diffusers_written else
           f"for diffusers, convert it: lora-booth convert in={kohya_file} to=diffusers out={kohya_file.parent}/")
    return (f"note: {kohya_file.name} adapts {', '.join(dropped)}, which diffusers' load_lora_weights drops from a "
            f"kohya-layout FLUX.1 file without a warning (ComfyUI and Forge read them): {fix}")


def save_trained(base, out_dir: Path, cfg, step: int, counts: tuple[int, int], started: float,
                 finished: float, kohya_stem: str | None = None) -> list[Path]:
    """Write the formats in save.formats: diffusers (pytorch_lora_weights.safetensors) and/or kohya
    (<name>.safetensors, or `kohya_stem`.safetensors), with the run's metadata in each."""
    adapter = from_model(base)
    dtype = SAVE_DTYPES[cfg.save.dtype]
    metadata = run_metadata(cfg, base, step, counts, started, finished)
    written = []
    if "diffusers" in cfg.save.formats:
        written.append(write_diffusers(adapter, out_dir / DIFFUSERS_WEIGHT_NAME, metadata, dtype))
    if "kohya" in cfg.save.formats:  # the same rule as `convert to=kohya` of the diffusers file
        written.append(write_kohya(adapter, out_dir / f"{kohya_stem or output_name(cfg)}.safetensors",
                                   kohya_file_metadata(adapter, metadata, base.family), dtype, base.family))
    return written
