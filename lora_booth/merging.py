"""Fuse adapters into a base model, combine adapters, change an adapter's rank, extract one from
two models. Everything streams: one tensor in memory at a time, outputs written atomically,
inputs never modified."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import atomic, families, formats, ldm, manifest, tensorfile
from .machine import available_memory
from .errors import LoraBoothError
from .families.flux import single_file_prefix as flux_single_file_prefix
from .formats import Adapter, AdapterError, Module

MERGE_DTYPES = {"same": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENT_FILES = {"unet": "diffusion_pytorch_model", "transformer": "diffusion_pytorch_model",
                   "vae": "diffusion_pytorch_model", "text_encoder": "model",
                   "text_encoder_2": "model"}  # a folder has the ones its family has: SD unet, FLUX.1 transformer…
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL single files: CLIP-L, as SD 1.x's text tower


class MergeError(LoraBoothError):
    """Inputs that cannot be merged, or an output that would overwrite something."""


MAX_SCALE = 100.0


def parse_weighted(spec: str) -> tuple[Path, float]:
    """"a.safetensors:0.8" → (a.safetensors, 0.8); no scale means 1.0."""
    path, colon, tail = spec.rpartition(":")
    if colon:
        try:
            scale = float(tail)
        except ValueError:
            return Path(spec).expanduser(), 1.0
        if not math.isfinite(scale):
            raise MergeError(f"lora={spec}: the scale {tail} is not a finite number. Use e.g. {path}:0.8.")
        if abs(scale) > MAX_SCALE:  # strengths are 0-2 in practice; 1e30 would only overflow the weights
            raise MergeError(f"lora={spec}: the scale {tail} is beyond ±{MAX_SCALE:g}, more than any adapter is "
                             f"applied with. Use e.g. {path}:0.8.")
        return Path(path).expanduser(), scale
    return Path(spec).expanduser(), 1.0


# ---------------------------------------------------------------------------------------- fuse


@dataclass
class Source:
    """One tensor of the output: where it comes from and what adapters add to it."""
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    additions: list[tuple[Module, float, tuple[int, int] | None, bool]]  # module, scale, rows, halves swapped
    reshape_to: tuple[int, ...] | None = None   # LDM's VAE attention: linear → 1×1 convolution


def _component_file(folder: Path, component: str) -> Path:
    files = _component_files(folder, component)
    if len(files) == 1:
        return files[0]
    raise MergeError(f"{folder / component}: its weights are sharded over {len(files)} files; extract reads one "
                     "file per component (save the model without sharding)")


def _component_files(folder: Path, component: str) -> list[Path]:
    """A component's weight files: one .safetensors, or the shards its index names (FLUX.1-dev's
    transformer and T5 are sharded)."""
    stem = COMPONENT_FILES[component]
    path = folder / component / f"{stem}.safetensors"
    if path.is_file():
        return [path]
    index = folder / component / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            if index.stat().st_size > 16 * 2**20:
                raise ValueError("too large for an index")
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MergeError(f"{index}: not a readable shard index ({exc})") from None
        files = [folder / component / name for name in shards]
        for file in files:  # names from a file: never outside the component's folder
            if file.parent != folder / component or not file.name.endswith(".safetensors") or not file.is_file():
                raise MergeError(f"{index}: names {file.name!r}, which is not a .safetensors file beside it")
        return files
    found = sorted((folder / component).glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise MergeError(f"{folder / component}: expected one {stem}.safetensors or a shard index (pickled weights are "
                     "not merged; save the model with safe_serialization)")


def _module_key(part: str, module_path: str, keys: set[str]) -> str | None:
    bare = module_path[len("text_model."):] if module_path.startswith("text_model.") else module_path
    for candidate in (f"{module_path}.weight", f"{bare}.weight"):
        if candidate in keys:
            return candidate
    return None


def _attach(adapters: list[tuple[Adapter, float, Path]], locate: Callable, sources: dict[str, Source]) -> None:
    """Point every adapter module at its base tensor (or its rows there, where the base fuses
    several modules into one weight: FLUX.1's qkv); refuse anything that does not fit."""
    for adapter, scale, path in adapters:
        for (part, module_path), module in adapter.modules.items():
            found = locate(part, module_path)
            name, rows, swapped = found if isinstance(found, tuple) else (found, None, False)
            if name is None or name not in sources:
                raise AdapterError(f"{path}: module {part}.{module_path} has no weight in the base model. "
                                   "Was the adapter trained on another model family?")
            source = sources[name]
            update = tuple(module.update_shape())
            outputs = source.shape[0] if rows is None else rows[1] - rows[0]
            # a convolution's update is (out, in·kh·kw), 3×3 (LoCon, LyCORIS's default preset) included
            if (outputs, math.prod(source.shape[1:])) != update:
                raise AdapterError(f"{path}: module {part}.{module_path} makes a {update} update, but the base "
                                   f"model's weight there is {tuple(source.shape)}: the adapter belongs to "
                                   "another base model")
            source.additions.append((module, scale, rows, swapped))


def _produce(sources: dict[str, Source], dtype: torch.dtype | None) -> Callable[[str], torch.Tensor]:
    readers: dict[Path, tensorfile.Reader] = {}

    def produce(name: str) -> torch.Tensor:
        source = sources[name]
        if source.file not in readers:
            readers[source.file] = tensorfile.Reader(source.file)
        tensor = readers[source.file].get_tensor(source.key)
        if source.additions:
            merged = tensor.float()
            for module, scale, rows, swapped in source.additions:  # LoRA/LoHa/LoKr add s·ΔW; DoRA renormalises rows
                if swapped:  # BFL keeps (shift, scale) where diffusers has (scale, shift)
                    merged = _swap_halves(module.apply(_swap_halves(merged), scale))
                elif rows is None:
                    merged = module.apply(merged, scale)
                else:
                    merged[rows[0]:rows[1]] = module.apply(merged[rows[0]:rows[1]], scale)
            tensor = merged.to(tensor.dtype)
        if source.reshape_to is not None:
            tensor = tensor.reshape(source.reshape_to)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if (source.additions or dtype is not None) and tensor.is_floating_point():
            check_finite(tensor, f"{name} (from {source.file})")
        return tensor

    produce.close = lambda: [reader.close() for reader in readers.values()]
    return produce


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """A weight about to be written must be finite in its own dtype: an fp16 sum beyond ±65504 is
    inf, and a model with one inf weight draws black images."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"{where}: the result holds infinite or NaN values in {str(tensor.dtype).split('.')[-1]} "
                         f"(largest finite {torch.finfo(tensor.dtype).max:g}). Nothing was written. Lower the "
                         "adapters' scales, or write dtype=fp32.")


# a dense ΔW (out × in) that resize/combine/bake build per module: the largest layer of the families
# lora-booth knows is FLUX.1's linear1, 21504 × 3072 = 66 M values; a file declaring far wider ones
# would allocate for minutes, then fail
MAX_DENSE_VALUES = 2**28


def check_dense_sizes(modules, where: Path) -> None:
    """Before any ΔW is built: every module's declared out × in within MAX_DENSE_VALUES, and the
    largest (with the SVD's workspace, about 4 copies in fp32) within the memory free now."""
    largest, largest_key = 0, None
    for key, module in modules.items():
        out_features, in_features = module.update_shape()
        values = int(out_features) * int(in_features)
        if values > largest:
            largest, largest_key = values, key
    if largest_key is None:
        return
    needed = 4 * 4 * largest
    if largest > MAX_DENSE_VALUES or needed > available_memory():
        raise AdapterError(f"{where}: module {largest_key[0]}.{largest_key[1]} declares a "
                           f"{'×'.join(map(str, modules[largest_key].update_shape()))} update ({largest:,} values, "
                           f"{needed / 2**30:.1f} GiB to re-factorise), wider than any layer of the models lora-booth "
                           f"knows (at most {MAX_DENSE_VALUES:,}) or than the {available_memory() / 2**30:.1f} GiB "
                           "of free memory. The file is not a LoRA of a model lora-booth handles.")


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    return torch.cat(weight.chunk(2, dim=0)[::-1])


def _out_dtype(source: Source, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and source.dtype.is_floating_point else source.dtype


def base_path(source: str, allow_pickle: bool = False) -> Path:
    """merge's base names a model as model= does: a folder, a single file, a hub id, toyworld."""
    from . import models
    from .config import ModelConfig

    path = Path(source).expanduser()
    return path if path.exists() else models.locate(ModelConfig(source=source, allow_pickle=allow_pickle)).path


def fuse(base: Path, loras: list[tuple[Path, float]], out: Path, dtype: str = "same", overwrite: bool = False,
         allow_pickle: bool = False, report=print) -> Path:
    """W += s · ΔW for every adapter module (ΔW of its kind: LoRA, LoHa, LoKr; DoRA renormalises
    the rows of W + ΔW), into a diffusers folder or a single file."""
    base, out = Path(base).expanduser(), Path(out).expanduser()
    _check_output(out, overwrite, inputs=[base, *(formats.locate(p) for p, _ in loras)])
    adapters = [(formats.read(p, allow_pickle), s, p) for p, s in loras]
    target_dtype = MERGE_DTYPES[dtype]
    single_out = out.suffix.lower() == ".safetensors"
    if base.is_dir():
        files = _folder_files(base)
        if single_out:
            sources = _folder_as_ldm(base, files)
            unet_config = json.loads((base / "unet" / "config.json").read_text())
            locate = _ldm_locator(unet_config)
        else:
            sources, locate = _folder_sources(files)
        _attach(adapters, locate, sources)
        if single_out:
            _write_single(out, sources, target_dtype)
        else:
            _write_folder(base, out, files, sources, target_dtype)
    elif base.suffix.lower() == ".safetensors":
        if not single_out:
            raise MergeError(f"out={out}: a single-file base merges into a single file; name the output "
                             "something.safetensors")
        sources, locate = _single_file_sources(base, [a for a, _, _ in adapters])
        _attach(adapters, locate, sources)
        _write_single(out, sources, target_dtype)
    else:
        raise MergeError(f"base={base}: not a diffusers folder or a .safetensors checkpoint")
    touched = sum(1 for s in sources.values() if s.additions)
    report(f"merged {len(adapters)} adapter(s) into {touched} weights → {out}")
    return out


def _folder_files(base: Path) -> dict[str, list[Path]]:
    """The weight files of each component a diffusers folder has."""
    if not (base / "model_index.json").is_file():
        raise MergeError(f"base={base}: no model_index.json, so not a diffusers pipeline folder")
    files = {c: _component_files(base, c) for c in COMPONENT_FILES if (base / c).is_dir()}
    if not files.keys() & {"unet", "transformer"}:
        raise MergeError(f"base={base}: no unet/ or transformer/ folder: not a text-to-image pipeline lora-booth merges into")
    return files


def _folder_sources(files: dict[str, list[Path]]) -> tuple[dict[str, Source], Callable[[str, str], str | None]]:
    """The weights of a diffusers folder's components (each in one file or in shards), and where
    each adapter module's weight is."""
    sources = {f"{c}/{k}": Source(f, k, s, d, [])
               for c, shards in files.items() for f in shards for k, (s, d) in tensorfile.header_of(f).items()}
    component_keys = {c: {k for f in shards for k in tensorfile.header_of(f)} for c, shards in files.items()}

    def locate(part: str, module_path: str) -> str | None:
        key = _module_key(part, module_path, component_keys.get(part, set()))
        return f"{part}/{key}" if key else None
    return sources, locate


def _single_file_sources(base: Path, adapters: list[Adapter]) -> tuple[dict[str, Source], Callable]:
    """The weights of an LDM single-file checkpoint, and where each adapter module's weight is."""
    header = tensorfile.header_of(base)
    sources = {k: Source(base, k, s, d, []) for k, (s, d) in header.items()}
    flux = flux_single_file_prefix(set(header))
    if flux is not None:
        return sources, _flux_locator(base, header, flux, adapters)
    sdxl = any(k.startswith("conditioner.embedders.") for k in header)
    fused = ("text_encoder_2",) if sdxl else ("text_encoder", "text_encoder_2") if any(
        k.startswith("cond_stage_model.model.") for k in header) else ()
    if any(p in fused for a in adapters for p in a.parts()):
        raise MergeError(f"{base}: adapters of the OpenCLIP text encoder ({'SDXL' if sdxl else 'SD 2.x'}) cannot "
                         "be merged into a single file yet (its weights are stored fused); merge into the "
                         "diffusers folder instead")
    return sources, _ldm_locator(infer_unet_layout(header), SDXL_CLIP_L_PREFIX if sdxl else ldm.CLIP_PREFIX)


def _flux_locator(base: Path, header: dict, prefix: str, adapters: list[Adapter]) -> Callable:
    """Where each FLUX.1 adapter module's weight is in a BFL-layout transformer file: q, k and v
    are rows of qkv (and, in a single block, of linear1 with the MLP's input)."""
    from . import flux_layout

    others = sorted({part for adapter in adapters for part in adapter.parts() if part != "transformer"})
    if others:
        raise MergeError(f"{base}: holds FLUX.1's transformer alone, but the adapter also changes {', '.join(others)} "
                         "(CLIP-L); merge into a diffusers folder (base=<FLUX.1 folder> out=merged/), or keep "
                         "loading the adapter")
    width = header[f"{prefix}double_blocks.0.img_attn.proj.weight"][0][0]

    def locate(part: str, module_path: str):
        try:
            target, rows, swapped = flux_layout.weight_rows(module_path, width)
        except flux_layout.FluxLayoutError:
            return None
        return f"{prefix}{target}.weight", rows, swapped
    return locate


@torch.no_grad()
def fuse_into_modules(parts: dict[str, torch.nn.Module], adapter: Adapter, scale: float, where: Path) -> int:
    """Add `adapter` at `scale` to loaded models' weights in place (for kinds diffusers cannot
    load: `generate` uses it). Returns the number of weights changed."""
    targets = check_fits(parts, adapter, where)  # every module first: a misfit is never half-applied
    for key, module in adapter.modules.items():
        target = targets[key]
        target.weight.copy_(module.apply(target.weight.float(), scale).to(target.weight.dtype))
    return len(targets)


def check_fits(parts: dict[str, torch.nn.Module], adapter: Adapter, where: Path) -> dict:
    """The layer of `parts` each module of `adapter` changes, after checking that every module has
    one of its shape: an adapter of another base model is refused before anything is applied."""
    targets = {}
    for (part, module_path), module in adapter.modules.items():
        model = parts.get(part)
        bare = module_path[len("text_model."):] if module_path.startswith("text_model.") else module_path
        target = None
        for candidate in (module_path, bare):
            try:
                target = model.get_submodule(candidate) if model is not None else None
                break
            except AttributeError:
                continue
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.flatten(1).shape) != tuple(module.update_shape()):
            raise AdapterError(f"{where}: module {part}.{module_path} does not fit this model. "
                               "Was the adapter trained on another base model?")
        targets[(part, module_path)] = target
    return targets


def _check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    resolved = out.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise MergeError(f"out={out} is one of the inputs; merging never modifies its inputs. Choose another name.")
    if out.exists() and not overwrite:
        raise MergeError(f"out={out} already exists. Choose another name, or pass overwrite=true.")
    if out.is_dir():
        foreign_files(out)


def foreign_files(folder: Path) -> None:
    """overwrite=true replaces a folder only when lora-booth wrote all of it (its manifest lists
    every file): a user's folder is never deleted to make room."""
    recorded = set(manifest.Manifest(folder).entries())
    others = [p for p in sorted(folder.rglob("*")) if (p.is_file() or p.is_symlink()) and p.name != manifest.NAME
              and p.relative_to(folder).as_posix() not in recorded]
    if others:
        listed = ", ".join(str(p.relative_to(folder)) for p in others[:3]) + (" …" if len(others) > 3 else "")
        raise MergeError(f"out={folder} holds files lora-booth did not write ({listed}); overwrite=true replaces "
                         "only a folder lora-booth made. Choose another out.")


def remove_replaced_folder(out: Path) -> None:
    foreign_files(out)
    shutil.rmtree(out)


def _folder_as_ldm(base: Path, shards: dict[str, list[Path]]) -> dict[str, Source]:
    """A diffusers SD 1.x folder as the sources of an LDM single-file checkpoint."""
    if "unet" not in shards:
        raise MergeError(f"{base}: writing a FLUX.1 pipeline as one file is not supported (ComfyUI and Forge load its "
                         "transformer alone): merge into a folder (out=merged/), or into the transformer's single "
                         "file (base=flux1-dev.safetensors out=….safetensors)")
    files = {c: _component_file(base, c) for c in shards}
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    vae_config = json.loads((base / "vae" / "config.json").read_text())
    if unet_config.get("cross_attention_dim") == 1024 or "text_encoder_2" in files:
        raise MergeError(f"{base}: writing an {'SDXL' if 'text_encoder_2' in files else 'SD 2.x'} model as a single "
                         "file is not supported yet (its OpenCLIP text encoder is stored fused); use a folder output "
                         "(out=merged/)")
    sources = {}
    for key, (shape, dtype) in tensorfile.header_of(files["unet"]).items():
        module, _, leaf = key.rpartition(".")
        sources[f"{ldm.UNET_PREFIX}{ldm.unet_module_name(module, unet_config)}.{leaf}"] = \
            Source(files["unet"], key, shape, dtype, [])
    for key, (shape, dtype) in tensorfile.header_of(files["vae"]).items():
        name = ldm.vae_name(key, vae_config)
        reshape = (*shape, 1, 1) if ".mid.attn_1." in name and len(shape) == 2 else None
        sources[ldm.VAE_PREFIX + name] = Source(files["vae"], key, reshape or shape, dtype, [], reshape)
    for key, (shape, dtype) in tensorfile.header_of(files["text_encoder"]).items():
        full = key if key.startswith("text_model.") else "text_model." + key
        sources[ldm.CLIP_PREFIX + full] = Source(files["text_encoder"], key, shape, dtype, [])
    return sources


def infer_unet_layout(header: dict) -> dict:
    """layers_per_block and which up blocks attend, read off an LDM checkpoint's key names."""
    prefix = ldm.UNET_PREFIX
    ops = sorted(int(k[len(prefix):].split(".")[1]) for k in header
                 if k.startswith(prefix + "input_blocks.") and ".0.op." in k)
    outputs = {int(k[len(prefix):].split(".")[1]) for k in header if k.startswith(prefix + "output_blocks.")}
    if not ops or not outputs:
        raise MergeError("the checkpoint has no Stable Diffusion UNet (model.diffusion_model.input_blocks…)")
    per_block = ops[0] - 1
    blocks = (max(outputs) + 1) // (per_block + 1)
    up_types = ["CrossAttnUpBlock2D" if any(k.startswith(f"{prefix}output_blocks.{b * (per_block + 1)}.1.")
                                            for k in header) else "UpBlock2D" for b in range(blocks)]
    return {"layers_per_block": per_block, "up_block_types": up_types}


def _ldm_locator(unet_config: dict, clip_prefix: str = ldm.CLIP_PREFIX) -> Callable[[str, str], str | None]:
    def locate(part: str, module_path: str) -> str | None:
        if part == "unet":
            try:
                return f"{ldm.UNET_PREFIX}{ldm.unet_module_name(module_path, unet_config)}.weight"
            except (KeyError, ValueError, IndexError):
                return None
        if part == "text_encoder":
            return f"{clip_prefix}{formats.canonical_path(part, module_path)}.weight"
        return None
    return locate


def _write_single(out: Path, sources: dict[str, Source], dtype: torch.dtype | None) -> None:
    entries = [(name, s.shape, _out_dtype(s, dtype)) for name, s in sources.items()]
    produce = _produce(sources, dtype)
    try:
        tensorfile.write_streamed(out, entries, produce, {"format": "pt"})
    finally:
        produce.close()


def _write_folder(base: Path, out: Path, files: dict[str, Path], sources: dict[str, Source],
                  dtype: torch.dtype | None) -> None:
    """Copy the folder, rewriting each component's weights; staged, then renamed into place."""
    staging = atomic.temporary_dir(out)  # what a killed merge left here is swept by the verb (cli.run_file_verb)
    try:
        weight_files = {f.resolve() for shards in files.values() for f in shards}
        for item in base.rglob("*"):
            target = staging / item.relative_to(base)
            if item.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif item.resolve() not in weight_files and item.suffix not in (".bin", ".ckpt") and \
                    not item.name.endswith(".safetensors"):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
        produce = _produce(sources, dtype)
        try:
            for component, shards in files.items():
                for file in shards:  # each shard keeps its keys: the index beside them stays right
                    names = [n for n in sources if n.startswith(component + "/") and sources[n].file == file]
                    entries = [(n[len(component) + 1:], sources[n].shape, _out_dtype(sources[n], dtype))
                               for n in names]
                    tensorfile.write_streamed(staging / component / file.name, entries,
                                              lambda key, c=component: produce(f"{c}/{key}"), {"format": "pt"})
        finally:
            produce.close()
        record = manifest.Manifest(staging)
        for path in sorted(staging.rglob("*")):
            record.record(path)
        if out.exists():
            remove_replaced_folder(out)
        atomic.publish_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------- SVD


def low_rank(delta: torch.Tensor, rank: int | None = None, sv_fro: float | None = None,
             kernel: tuple[int, ...] = ()) -> tuple[Module, float]:
    """Best rank-k factorisation of ΔW (Eckart–Young) as a module with alpha = k (scale 1), and the
    fraction of ΔW's squared Frobenius norm it keeps. `sv_fro` picks the smallest k keeping that much.
    A convolution's ΔW is (out, in·kh·kw); with its `kernel` (kh, kw) the module comes out in kohya's
    LoCon shapes, down (k, in, kh, kw) and up (out, k, 1, 1)."""
    delta = delta.float().flatten(1)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    energy = S.square()
    total = float(energy.sum())
    if sv_fro is not None:
        cumulative = torch.cumsum(energy, 0) / max(total, 1e-30)
        rank = int(torch.searchsorted(cumulative, torch.tensor(sv_fro * (1 - 1e-6))).item()) + 1
    rank = max(1, min(rank or len(S), len(S)))
    kept = float(energy[:rank].sum()) / total if total > 0 else 1.0
    down, up = Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()
    if kernel:
        down = down.reshape(rank, -1, *kernel)
        up = up.reshape(*up.shape, *[1] * len(kernel))
    return Module(down=down, up=up, alpha=float(rank)), kept


def _kernel(module) -> tuple[int, ...]:
    """A convolution module's kernel size, else (): LoCon keeps it in lora_down, LoKr in a 4-D
    lokr_w2. A re-factorised module keeps it, or the file would not fit the layer elsewhere."""
    if isinstance(module, Module):
        return tuple(module.down.shape[2:]) if module.down.ndim == 4 else ()
    w2 = (getattr(module, "factors", None) or {}).get("lokr_w2")
    return tuple(w2.shape[2:]) if w2 is not None and w2.ndim == 4 else ()


def _refactorable(module, where: str) -> None:
    if getattr(module, "magnitude", None) is not None:
        raise AdapterError(f"{where}: a DoRA module's update depends on the base weight; it cannot be "
                           "re-factorised without it. Bake it with `lora-booth convert in=… to=kohya dora=bake "
                           "rank=N out=…` (it reads the base model), or merge it into the base with `lora-booth merge`.")


def combine(loras: list[tuple[Path, float]], out: Path, rank: int | None = None, overwrite: bool = False,
            allow_pickle: bool = False, report=print) -> Path:
    """One adapter equal to Σ sᵢ·ΔWᵢ: exact (ranks concatenated) without `rank`, else the best
    rank-`rank` approximation of the sum, with the energy kept per module."""
    out = Path(out).expanduser()
    _check_output(out, overwrite, [formats.locate(p) for p, _ in loras])  # the files a folder names
    adapters = [(formats.read(p, allow_pickle), s, p) for p, s in loras]
    if rank is not None:  # the sum is built densely, then re-factorised
        for adapter, _, path in adapters:
            check_dense_sizes(adapter.modules, path)
    keys = sorted({k for a, _, _ in adapters for k in a.modules})
    modules, fits = {}, {}
    for key in keys:
        terms = [(a.modules[key], s, p) for a, s, p in adapters if key in a.modules]
        shapes = {tuple(m.update_shape()) for m, _, _ in terms}
        if len(shapes) > 1:
            raise AdapterError(f"module {key[0]}.{key[1]} has different shapes in the inputs: {sorted(shapes)}; "
                               "the adapters were trained on different base models")
        if rank is None:  # [s₁α₁/r₁·B₁ | s₂α₂/r₂·B₂] @ [A₁; A₂] = Σ sᵢ·ΔWᵢ exactly
            kinds = {m.kind for m, _, _ in terms}
            if kinds != {"lora"}:
                raise AdapterError(f"module {key[0]}.{key[1]}: an exact combination needs plain LoRA inputs, "
                                   f"these are {sorted(kinds)}. Pass rank=N for a rank-N LoRA of the sum.")
            up = torch.cat([m.up.float().flatten(1) * (s * m.scale) for m, s, _ in terms], dim=1)
            down = torch.cat([m.down.float().flatten(1) for m, _, _ in terms], dim=0)
            kernel = _kernel(terms[0][0])
            if kernel:  # a convolution keeps kohya's LoCon shapes: down (r, in, kh, kw), up (out, r, 1, 1)
                down, up = down.reshape(down.shape[0], -1, *kernel), up.reshape(*up.shape, *[1] * len(kernel))
            modules[key] = Module(down, up, float(down.shape[0]))
        else:
            for m, _, p in terms:
                _refactorable(m, f"{p}: {key[0]}.{key[1]}")
            total = sum(s * m.delta() for m, s, _ in terms)
            modules[key], kept = low_rank(total, rank, kernel=_kernel(terms[0][0]))
            fits[key] = (modules[key].rank, kept)
    if fits:
        report_fit(fits, report)
    titles = [a.metadata.get("modelspec.title") or a.metadata.get("lora_booth.name") or p.stem for a, _, p in adapters]
    combined = Adapter(modules, {"lora_booth.combined_from": json.dumps([f"{p}:{s}" for p, s in loras]),
                                 "modelspec.merged_from": ", ".join(titles)})
    _write_like_input(combined, out, adapters[0][0])
    report(f"wrote {out} ({len(modules)} modules)")
    return out


def _write_like_input(adapter: Adapter, out: Path, example: Adapter, comment: str = "") -> None:
    """kohya in, kohya out (its ss_* and ModelSpec keys rebuilt for the new modules); anything
    else in, diffusers out. Metadata other than peft's is kept. `comment` goes in front of
    ss_training_comment, as kohya's resize_lora.py notes a resize there."""
    for (part, module_path), module in adapter.modules.items():
        for name, tensor in vars(module).items():
            if isinstance(tensor, torch.Tensor):
                check_finite(tensor, f"{out}: module {part}.{module_path} {name}")
    kept = formats.carried_metadata(example.metadata)
    kept.update(adapter.metadata)
    if example.source_format == "kohya":
        metadata = formats.kohya_file_metadata(adapter, kept, example.family(), title=out.stem)
        if comment:
            metadata["ss_training_comment"] = f"{comment}; {metadata.get('ss_training_comment', '')}"
        formats.write_kohya(adapter, out, metadata, family=example.family())
    else:
        formats.write_diffusers(adapter, out, kept)


def resize(source: Path, out: Path, rank: int | None = None, sv_fro: float | None = None, overwrite: bool = False,
           allow_pickle: bool = False, report=print) -> Path:
    """Re-factorise every module by SVD to `rank`, or to the smallest rank keeping `sv_fro` of its
    energy; alpha is rescaled so the effective update keeps its strength."""
    if (rank is None) == (sv_fro is None):
        raise MergeError("resize needs exactly one of rank=N or sv_fro=0.9")
    fits = {}
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_output(out, overwrite, [formats.locate(source)])  # out=out/pytorch_lora_weights… of in=out/ is refused
    adapter = formats.read(source, allow_pickle)
    check_dense_sizes(adapter.modules, source)
    modules = {}
    for key, module in sorted(adapter.modules.items()):
        _refactorable(module, f"{source}: {key[0]}.{key[1]}")
        modules[key], kept = low_rank(module.delta(), rank, sv_fro, kernel=_kernel(module))
        fits[key] = (modules[key].rank, kept)
    report_fit(fits, report, ranks_before={key: m.rank for key, m in adapter.modules.items()})
    before, after = sorted({m.rank for m in adapter.modules.values()}), sorted({m.rank for m in modules.values()})
    _write_like_input(Adapter(modules, {}), out, adapter,
                      comment=f"dimension is resized from {'/'.join(map(str, before))} to {'/'.join(map(str, after))}")
    report(f"wrote {out} ({len(modules)} modules)")
    return out


# ---------------------------------------------------------------------------------------- DoRA


def convert(source: str | Path, to: str, out: str | Path, dora: str = "keep", rank: int | None = None,
            base: str | None = None, allow_pickle: bool = False, overwrite: bool = False, report=print) -> Path:
    """`lora-booth convert`: the other layout (formats.convert), or with dora=bake a plain LoRA of
    rank `rank` in place of a DoRA adapter, for the tools that read DoRA files wrong."""
    if dora not in ("keep", "bake"):
        raise MergeError(f"dora={dora}: choose keep (the DoRA modules as they are) or bake (a plain LoRA of rank=N)")
    if dora == "keep":
        if rank is not None or base is not None:
            raise MergeError("rank= and base= only apply with dora=bake (convert never changes a module otherwise)")
        return formats.convert(source, to, out, allow_pickle, overwrite)
    if rank is None:
        raise MergeError("dora=bake needs rank=N: the rank of the plain LoRA that approximates W' − W (the error of "
                         "the approximation is printed; 2-4 × the DoRA's rank is a good start)")
    return bake_dora(source, to, out, rank, base, allow_pickle, overwrite, report)


def bake_dora(source: str | Path, to: str, out: str | Path, rank: int, base: str | None = None,
              allow_pickle: bool = False, overwrite: bool = False, report=print) -> Path:
    """A plain LoRA whose every module is the best rank-`rank` approximation (SVD) of what the DoRA
    module changes in the base weight, W' − W with W' = m ⊙ (W + ΔW)/‖W + ΔW‖. ComfyUI, Forge and
    A1111 load plain LoRA exactly and DoRA wrong (docs/adapter-types.md): this file is as close to
    the trained weights as its rank allows, everywhere. `base`: the model the adapter was trained
    on, by default the one its metadata names."""
    if to not in ("diffusers", "kohya"):
        raise AdapterError(f"to={to}: choose diffusers or kohya")
    if rank < 1:
        raise MergeError(f"rank={rank}: a rank is at least 1")
    adapter = formats.read(source, allow_pickle)
    path = formats.locate(source)
    check_dense_sizes(adapter.modules, path)
    if formats.adapter_kind(adapter.modules.values()) != "dora":
        raise MergeError(f"{path}: holds no DoRA modules; dora=bake turns a DoRA adapter into a plain LoRA")
    base = base or adapter.metadata.get("lora_booth.base_model")
    if not base:
        raise MergeError(f"{path}: its metadata names no base model; pass base= (the model it was trained on)")
    as_folder = formats.names_folder(out)
    out = Path(out).expanduser()
    if as_folder:
        out = out / (formats.DIFFUSERS_WEIGHT_NAME if to == "diffusers" else
                     f"{formats.kohya_file_stem(adapter, path)}-lora.safetensors")
    _check_output(out, overwrite, [path])
    base_file = base_path(base, allow_pickle)
    weights = _base_weights_of(base_file, adapter, path)
    modules, fits, worst, largest = {}, {}, 0.0, 0.0
    try:
        for key, module in sorted(adapter.modules.items()):
            weight = weights(key)
            change = module.apply(weight, 1.0) - weight            # W' − W: full rank in general
            modules[key], kept = low_rank(change, rank, kernel=_kernel(module))
            fits[key] = (modules[key].rank, kept)
            worst = max(worst, float((modules[key].delta().reshape(change.shape) - change).abs().max()))
            largest = max(largest, float(change.abs().max()))
    finally:
        weights.close()
    report_fit(fits, report, ranks_before={key: m.rank for key, m in adapter.modules.items()})
    report(f"max |W_baked − W_DoRA| = {worst:.3g}, of a DoRA change max |W_DoRA − W| = {largest:.3g} "
           "(a higher rank= is closer; the rank of the weight is exact)")
    metadata = formats.carried_metadata(adapter.metadata)
    metadata.update({"lora_booth.type": "lora", "lora_booth.rank": str(rank), "lora_booth.alpha": str(rank),
                     "lora_booth.baked_from": f"{path.name} (DoRA) on {base}"})
    baked = Adapter(modules, metadata, adapter.source_format, adapter.family_hint)
    atomic.make_dirs(out.parent)
    if to == "kohya":
        formats.write_kohya(baked, out, formats.kohya_file_metadata(baked, metadata, adapter.family(), title=out.stem),
                            family=adapter.family())
    else:
        formats.write_diffusers(baked, out, metadata)
    return out


def _base_weights_of(base: Path, adapter: Adapter, where: Path):
    """weights(key) → the base model's fp32 weight under an adapter module (a folder or a single
    file), each read when asked; refuses an adapter that does not fit, as merge does."""
    if base.is_dir():
        sources, locate = _folder_sources(_folder_files(base))
    elif base.suffix.lower() == ".safetensors":
        sources, locate = _single_file_sources(base, [adapter])
    else:
        raise MergeError(f"base={base}: not a diffusers folder or a .safetensors checkpoint")
    _attach([(adapter, 1.0, where)], locate, sources)
    by_module = {id(m): (s, rows, swapped) for s in sources.values() for m, _, rows, swapped in s.additions}
    readers: dict[Path, tensorfile.Reader] = {}

    def weights(key: tuple[str, str]) -> torch.Tensor:
        source, rows, swapped = by_module[id(adapter.modules[key])]
        if source.file not in readers:
            readers[source.file] = tensorfile.Reader(source.file)
        weight = readers[source.file].get_tensor(source.key).float()
        weight = _swap_halves(weight) if swapped else weight
        return weight if rows is None else weight[rows[0]:rows[1]]

    weights.close = lambda: [reader.close() for reader in readers.values()]
    return weights


def report_fit(fits: dict[tuple[str, str], tuple[int, float]], report, ranks_before: dict | None = None) -> None:
    """One line per adapted part (ranks, mean and worst relative error of ΔW), and the worst
    module by name, instead of a line per module."""
    def error(kept: float) -> float:
        return max(0.0, 1 - kept) ** 0.5  # ‖ΔW − ΔW_r‖ / ‖ΔW‖ from the energy the rank keeps

    for part in sorted({part for part, _ in fits}):
        items = {key: value for key, value in fits.items() if key[0] == part}
        ranks = sorted({rank for rank, _ in items.values()})
        before = sorted({ranks_before[key] for key in items}) if ranks_before else []
        errors = [error(kept) for _, kept in items.values()]
        worst = max(items, key=lambda key: error(items[key][1]))
        span = lambda values: f"{values[0]}" if len(values) == 1 else f"{values[0]}–{values[-1]}"  # noqa: E731
        report(f"{part}: {len(items)} modules, rank {span(before) + ' → ' if before else ''}{span(ranks)}, relative "
               f"error of the update mean {sum(errors) / len(errors):.2%}, worst {max(errors):.2%} ({worst[1]})")


def extract(base: Path, tuned: Path, out: Path, rank: int, targets: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"),
        overwrite: bool = False, report=print) -> Path:
    """An adapter from the difference of two diffusers folders of the same architecture: the best
    rank-`rank` approximation of W_tuned − W_base on the targeted projections."""
    from safetensors import safe_open

    base, tuned, out = Path(base).expanduser(), Path(tuned).expanduser(), Path(out).expanduser()
    _check_output(out, overwrite, [base, tuned])
    modules, fits = {}, {}
    # the denoiser under its family's name (unet, or FLUX.1's transformer), then the text encoders it has
    for part in (part for part in (*families.denoisers(), *families.text_parts()) if (base / part).is_dir()):
        with safe_open(str(_component_file(base, part)), "pt") as a, safe_open(str(_component_file(tuned, part)),
                                                                              "pt") as b:
            if set(a.keys()) != set(b.keys()):
                raise MergeError(f"{part}: the two models have different weights; extract needs the same architecture")
            for key in sorted(a.keys()):
                module_path = key[:-len(".weight")]
                if not key.endswith(".weight") or not module_path.endswith(targets):
                    continue
                difference = b.get_tensor(key).float() - a.get_tensor(key).float()
                if difference.ndim != 2 or not difference.any():
                    continue
                key = (part, formats.canonical_path(part, module_path))
                modules[key], kept = low_rank(difference, rank)
                fits[key] = (modules[key].rank, kept)
    if not modules:
        raise MergeError(f"{tuned} and {base} do not differ in any targeted projection; nothing to extract")
    report_fit(fits, report)
    formats.write_diffusers(Adapter(modules, {}), out, {"lora_booth.extracted_from": f"{tuned} - {base}"})
    return out
