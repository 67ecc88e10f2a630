"""Adapters re-factored by SVD: combine several into one (exactly, or to a rank), resize one to a
lower rank or a kept share of its spectrum, bake a DoRA adapter into a plain LoRA, extract the
difference of two models as a LoRA."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import families
from ..io import atomic, tensorfile
from ..io.errors import AdapterError
from . import diffusers_layout, file_metadata, formats, kohya_layout, neutral
from .merging import (MergeError, _attach, _check_output, _component_file, _folder_files, _folder_sources,
                      _single_file_sources, _swap_halves, base_path, check_dense_sizes, check_finite)
from .neutral import Adapter, Module


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
    kept = file_metadata.carried_metadata(example.metadata)
    kept.update(adapter.metadata)
    if example.source_format == "kohya":
        metadata = file_metadata.kohya_file_metadata(adapter, kept, example.family(), title=out.stem)
        if comment:
            metadata["ss_training_comment"] = f"{comment}; {metadata.get('ss_training_comment', '')}"
        kohya_layout.write_kohya(adapter, out, metadata, family=example.family())
    else:
        diffusers_layout.write_diffusers(adapter, out, kept)


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
    if neutral.adapter_kind(adapter.modules.values()) != "dora":
        raise MergeError(f"{path}: holds no DoRA modules; dora=bake turns a DoRA adapter into a plain LoRA")
    base = base or adapter.metadata.get("lora_booth.base_model")
    if not base:
        raise MergeError(f"{path}: its metadata names no base model; pass base= (the model it was trained on)")
    as_folder = formats.names_folder(out)
    out = Path(out).expanduser()
    if as_folder:
        out = out / (neutral.DIFFUSERS_WEIGHT_NAME if to == "diffusers" else
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
    metadata = file_metadata.carried_metadata(adapter.metadata)
    metadata.update({"lora_booth.type": "lora", "lora_booth.rank": str(rank), "lora_booth.alpha": str(rank),
                     "lora_booth.baked_from": f"{path.name} (DoRA) on {base}"})
    baked = Adapter(modules, metadata, adapter.source_format, adapter.family_hint)
    atomic.make_dirs(out.parent)
    if to == "kohya":
        kohya_layout.write_kohya(baked, out, file_metadata.kohya_file_metadata(baked, metadata, adapter.family(), title=out.stem),
                            family=adapter.family())
    else:
        diffusers_layout.write_diffusers(baked, out, metadata)
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
                key = (part, neutral.canonical_path(part, module_path))
                modules[key], kept = low_rank(difference, rank)
                fits[key] = (modules[key].rank, kept)
    if not modules:
        raise MergeError(f"{tuned} and {base} do not differ in any targeted projection; nothing to extract")
    report_fit(fits, report)
    diffusers_layout.write_diffusers(Adapter(modules, {}), out, {"lora_booth.extracted_from": f"{tuned} - {base}"})
    return out
