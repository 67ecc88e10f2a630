"""Resumable checkpoints: adapters, optimizer state, loss scaler and position, in safetensors and
JSON only (nothing that unpickles), each folder written under a temporary name and renamed whole.
Data order, noise and augmentation are functions of (seed, micro-step), so the step is all the
random state a resume needs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config.sections import Config
from ..io import atomic, untrusted
from ..io.errors import CheckpointError
from .lora import load_trainable_state

PREFIX = "step-"
RESUME_FILES = ("adapter.safetensors", "optimizer.safetensors", "ema.safetensors", "pivotal_state.safetensors")


@dataclass
class Resumed:
    step: int
    path: Path
    scaler: dict | None
    rows_done: int | None   # instance rows consumed per stream: where the data order continues
    micro_steps: int | None = None  # micro-batches drawn, skipped updates included


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() → tensors (for safetensors) + everything else (for JSON). Nested
    slot dicts (bitsandbytes keeps its 8-bit quantisation state in one) become "index.slot/inner"."""
    tensors, scalars = {}, {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):  # a copy: bitsandbytes shares its qmaps across tensors,
            tensors[prefix] = value.detach().to("cpu", copy=True).contiguous()  # which safetensors refuses
        elif isinstance(value, dict):
            for name, inner in value.items():
                visit(f"{prefix}/{name}", inner)
        else:
            scalars[prefix] = value

    for index, slots in state["state"].items():
        for name, value in slots.items():
            visit(f"{index}.{name}", value)
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat_key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, path = flat_key.split(".", 1)
        slots = state.setdefault(int(index), {})
        *outer, name = path.split("/")
        for key in outer:
            slots = slots.setdefault(key, {})
        slots[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save(folder: Path, step: int, adapters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         scaler_state: dict | None, config: dict, keep: int, extra: dict | None = None,
         files: dict[str, dict[str, torch.Tensor]] | None = None,
         shareable: Callable[[Path], list[Path]] | None = None, report=print) -> Path:
    """Write checkpoints/step-N whole or not at all, then drop all but the newest `keep`. `files`
    adds more tensor files (NAME.safetensors: EMA weights, pivotal state). `shareable` writes the
    adapter files a user loads (diffusers, kohya) into the folder, so every checkpoint is a LoRA."""
    final = folder / f"{PREFIX}{step:08d}"
    staging = atomic.temporary_dir(final)
    try:
        optimizer_tensors, optimizer_rest = flatten_optimizer(optimizer.state_dict())
        atomic.save_safetensors(staging / "adapter.safetensors", adapters)
        atomic.save_safetensors(staging / "optimizer.safetensors", optimizer_tensors)
        names = ["adapter.safetensors", "optimizer.safetensors"]
        for name, tensors in (files or {}).items():
            atomic.save_safetensors(staging / f"{name}.safetensors", tensors)
            names.append(f"{name}.safetensors")
        names += [path.name for path in (shareable(staging) if shareable else [])]
        state = {"step": step, "scaler": scaler_state, "optimizer": optimizer_rest, "config": config, **(extra or {}),
                 "sha256": {name: _sha256(staging / name) for name in names}}
        atomic.write_text(staging / "state.json", json.dumps(state, indent=1, default=_jsonable))
        if os.path.lexists(final):  # the same step saved again (on stop right after a scheduled save),
            make_room(final, report)  # or a damaged folder of that step that resume skipped
        atomic.publish_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in folders(folder.parent)[:-keep]:  # only lora-booth's own checkpoints count and go
        remove(old)
    return final


DAMAGED = "damaged-"


def make_room(final: Path, report) -> None:
    """Clear the way for checkpoint `final`: a checkpoint of lora-booth's is removed by the files
    it lists; whatever then remains (a damaged folder whose state.json is unreadable, files that
    are not lora-booth's, a symlink) is moved aside whole under damaged-step-N, never deleted, and
    the user is told where."""
    if not final.is_symlink():
        remove(final)
    if not os.path.lexists(final):
        return
    aside = final.parent / f"{DAMAGED}{final.name}"
    number = 1
    while os.path.lexists(aside):
        number += 1
        aside = final.parent / f"{DAMAGED}{final.name}-{number}"
    try:
        os.rename(final, aside)
    except OSError as exc:
        raise atomic.write_error(final, exc) from None
    report(f"warning: {final} was in the way of this step's checkpoint and is not a complete lora-booth "
           f"checkpoint (damaged, or holding other files); moved it aside to {aside} (delete it when you have "
           "looked)")


def _plain_name(name) -> bool:
    """A file name state.json may list: a name inside the checkpoint folder, never a path out of it."""
    return isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..")


def folders(output_dir: Path) -> list[Path]:
    """output_dir/checkpoints/step-N folders that are lora-booth checkpoints (hold a state.json), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if root.is_symlink():  # a folder elsewhere, planted under the run's name: not the run's
        return []
    return [p for p in sorted(root.glob(f"{PREFIX}*"))
            if not p.is_symlink() and p.is_dir() and (p / "state.json").is_file()
            and not (p / "state.json").is_symlink()]


def remove(path: Path) -> None:
    """Delete a checkpoint folder: the files its state.json names and state.json itself, then the
    folder if that left it empty. Anything else in it is not lora-booth's and stays, and so does a
    folder reached through a symlink (it lies elsewhere)."""
    if path.is_symlink() or path.parent.is_symlink():
        return
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = list(state["sha256"]) if isinstance(state, dict) and isinstance(state.get("sha256"), dict) else []
    except (OSError, ValueError):
        names = []
    names = [name for name in names if _plain_name(name)]
    for name in [*names, "state.json"]:
        (path / name).unlink(missing_ok=True)
    atomic.sweep_stale(path)
    try:
        path.rmdir()
    except OSError:
        pass


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def verify(path: Path) -> dict:
    """The checkpoint's state.json, after checking both tensor files against their recorded hashes."""
    try:
        state = untrusted.read_json(path / "state.json", MAX_STATE_BYTES)
        if not isinstance(state.get("sha256"), dict) or not isinstance(state.get("config"), dict):
            raise ValueError("state.json does not hold a checkpoint's record")
        check_state_fields(state)
        for name, expected in state["sha256"].items():
            if not _plain_name(name) or not isinstance(expected, str):
                raise ValueError(f"state.json names an impossible file {name!r}")
            if _sha256(path / name) != expected:
                raise CheckpointError(f"{path / name}: checksum mismatch (the file is damaged)")
    except (OSError, ValueError, KeyError, TypeError, untrusted.UntrustedFileError) as exc:
        raise CheckpointError(f"{path}: incomplete or unreadable checkpoint ({exc})") from None
    return state


MAX_STATE_BYTES = 64 * untrusted.MiB  # the optimizer's layout grows with the adapter: a few MiB for FLUX.1


def check_state_fields(state: dict) -> None:
    """state.json is read back untrusted: the counters a resume continues from are whole numbers in
    range (a step of -1, 2.5 or 10**30 would resume into a loop that never ends or never starts),
    and the records beside them have the kinds lora-booth writes."""
    for key, required in (("step", True), ("rows_done", False), ("micro_steps", False)):
        value = state.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= untrusted.MAX_STEP * 1024:
            raise ValueError(f"state.json has {key} {str(value)[:40]!r}; it must be a whole number from 0 to "
                             f"{untrusted.MAX_STEP * 1024:,}")
    if state["step"] > untrusted.MAX_STEP:
        raise ValueError(f"state.json has step {state['step']:,}, more than any run makes")
    for key, kind in (("optimizer", dict), ("scaler", dict), ("data", dict)):
        if state.get(key) is not None and not isinstance(state[key], kind):
            raise ValueError(f"state.json has {key} of type {type(state[key]).__name__}, not a mapping")
    data = state.get("data") or {}
    for key, rows in data.items():
        if not isinstance(rows, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rows.items()):
            raise ValueError(f"state.json's data fingerprint {str(key)[:40]!r} is not a mapping of file names to hashes")


def named(path: Path) -> Path:
    """`checkpoints/step-750` for `checkpoints/step-00000750`: the short name users type."""
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    if not path.exists() and match:
        padded = path.parent / f"{PREFIX}{int(match.group(1)):08d}"
        if padded.exists():
            return padded
    return path


def find(output_dir: Path, resume: str, report=print) -> Path | None:
    """The checkpoint folder `resume` names: "latest" = the newest intact one in output_dir, or
    None when the run has not written one yet (it was stopped early: start it again)."""
    if resume != "latest":
        path = named(Path(resume).expanduser())
        if not (path / "state.json").is_file():
            raise CheckpointError(f"train.resume={resume}: not a checkpoint folder (no state.json). "
                                  f"Use resume=latest or a folder under {output_dir / 'checkpoints'}.")
        verify(path)
        return path
    candidates = folders(output_dir)[::-1]
    for other in sorted(set((output_dir / "checkpoints").glob(f"{PREFIX}*")) - set(candidates)):
        report(f"warning: {other} is not a lora-booth checkpoint (it has no state.json); ignored")
    if not candidates:
        return None
    for path in candidates:
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            report(f"warning: skipping a damaged checkpoint: {exc}")
    raise CheckpointError(f"train.resume=latest: every checkpoint in {output_dir / 'checkpoints'} is damaged. "
                          "Start again with overwrite=true, or name a checkpoint folder.")


def load(path: Path, base, optimizer: torch.optim.Optimizer) -> Resumed:
    state = verify(path)
    try:
        load_trainable_state(base, load_file(str(path / "adapter.safetensors")))
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: does not fit this run's adapters or optimizer ({exc}). "
                              "Resume with the settings the run started with.") from None
    return Resumed(step=state["step"], path=path, scaler=state.get("scaler"), rows_done=state.get("rows_done"),
                   micro_steps=state.get("micro_steps"))


def read_tensors(path: Path, name: str, *older_names: str) -> dict[str, torch.Tensor]:
    """One of the extra tensor files of a checkpoint (verified by `verify` with the others);
    `older_names`: what earlier versions of lora-booth called the same file."""
    file = next((path / f"{n}.safetensors" for n in (name, *older_names) if (path / f"{n}.safetensors").is_file()),
                path / f"{name}.safetensors")
    if not file.is_file():
        raise CheckpointError(f"{path}: has no {file.name}, which this run needs. Resume with the settings "
                              "the run started with.")
    return load_file(str(file))


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose value differs between the checkpointed run and this one, ignoring those that may
    change on resume (step budget, checkpoint/log cadence, the resume key itself, save options, and
    where the run folder, photos and class images live: a moved run resumes, and the data itself
    is compared by its fingerprint)."""
    may_change = {"train.max_steps", "save.checkpoint_every", "save.keep", "train.resume", "train.on_nan",
                  "train.resume_changed_data", "save.output_dir", "data.instance_dir", "prior.class_dir",
                  "train.log_every", "save.overwrite", "save.dtype", "save.formats", "save.name", "train.device",
                  "train.force", "train.gpu_memory", "launch.processes",
                  # where frozen weights wait between uses, and the RAM check: the same numbers either way
                  "train.offload_blocks", "train.host_memory"}
    may_change |= {f"sample.{name}" for name in ("num", "every", "prompts", "steps", "guidance_scale", "seed")}
    may_change |= {"log.to", "log.dir", "log.project", "validate.every", "validate.rows"}  # measure, never train

    defaults = Config().to_dict()  # a key the checkpointed version did not have yet stood at its default
    differences = []
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            saved_section = saved.get(section, {}) if isinstance(saved.get(section), dict) else {}
            before = saved_section.get(key, defaults.get(section, {}).get(key))
            if name == "objective.timesteps" and (before, value) == ("uniform", "auto") and \
                    "guidance" not in saved_section:  # from before auto existed: uniform was every family's
                continue
            if name not in may_change and before != value:
                differences.append(f"{name}: {before!r} → {value!r}")
    return differences
