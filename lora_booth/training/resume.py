"""A run's checkpoints from the recipe's side: save one (training state + the shareable files of its
step), and resume: find the checkpoint, check it belongs to this run, restore every stream."""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from ..adapters import file_metadata, formats, neutral
from ..config.sections import Config
from ..data import rows as data_rows
from ..io import atomic
from ..io.errors import CheckpointError, ConfigError, WriteError
from ..model import checkpoint, lora
from ..results import logs
from . import ema, rescue
from .step import Setup, TrainingError, trained_tensors


def save_checkpoint(cfg: Config, setup: Setup, out: Path, step: int, report=print) -> Path:
    """The main process writes; all wait, so no process runs ahead of a checkpoint being written.
    When the run folder's disk is full, the state goes to a rescue location (rescue.py) and the
    run stops with a message that says exactly what survived."""
    folder = out / "checkpoints" / f"{checkpoint.PREFIX}{step:08d}"
    scaler = setup.accelerator.scaler.state_dict() if setup.accelerator.scaler is not None else None
    if setup.accelerator.is_main_process:
        rows = {"rows_done": setup.batches.rows_done(setup.micro_steps), "micro_steps": setup.micro_steps,
                "data": setup.trained_on}
        files = {}
        if setup.pivotal is not None:
            files["pivotal_state"] = setup.pivotal.state()
        if setup.ema is not None:
            files["ema"], rows["ema"] = ema.state(setup.ema)

        def write(checkpoints: Path) -> Path:
            return checkpoint.save(checkpoints, step, lora.trainable_state(setup.base), setup.optimizer,
                                   scaler, cfg.to_dict(), cfg.save.keep, rows, files,
                                   shareable=lambda folder: shareable_files(cfg, setup, folder, step), report=report)
        try:
            folder = write(out / "checkpoints")
        except (OSError, WriteError) as exc:  # disk full, quota, removed folder
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else getattr(exc, "fact", str(exc))
            rescued, _ = rescue.save_elsewhere(out, write, report)
            raise TrainingError(f"step {step}: cannot write a checkpoint in {out / 'checkpoints'} ({reason}). " +
                                rescue.what_survived(out, step, step >= cfg.train.max_steps, rescued)) from None
    setup.accelerator.wait_for_everyone()
    setup.checkpointed_step = step
    return folder


def shareable_files(cfg: Config, setup: Setup, folder: Path, step: int) -> list[Path]:
    """The adapter as the end of the run would write it (the EMA average when on), so each
    checkpoint is a LoRA to try: pytorch_lora_weights.safetensors and <name>-<step>.safetensors."""
    with ema.averaged(setup.ema, trained_tensors(setup)):
        written = formats.save_trained(setup.base, folder, cfg, step, setup.counts, setup.started, time.time(),
                                       kohya_stem=f"{file_metadata.output_name(cfg)}-{step:06d}")
        if setup.pivotal is not None:
            written.append(setup.pivotal.save(folder, cfg.pivotal.trigger, neutral.SAVE_DTYPES[cfg.save.dtype]))
    return written


def resume_step(cfg: Config, out: Path, setup: Setup, report) -> int:
    if not cfg.train.resume:
        return 0
    path = checkpoint.find(out, cfg.train.resume, report)
    if path is None:
        report(f"resume=latest: no checkpoint in {out / 'checkpoints'} yet; starting at step 0")
        truncate_metrics(out, 0)
        return 0
    state = checkpoint.verify(path)
    differences = checkpoint.config_differences(state["config"], cfg.to_dict())
    if differences:
        raise ConfigError("train.resume", f"{path} was trained with other settings: " + "; ".join(differences),
                          "resume with the settings the run started with (only max_steps and the "
                          "checkpoint/log cadence may change)")
    changed = data_rows.fingerprint_changes(state["data"], setup.trained_on) if "data" in state else []
    if changed and not cfg.train.resume_changed_data:
        listed = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError("train.resume", f"{path} was trained on other data: {listed}",
                          "put the files back as they were, start a new run in another output_dir, or pass "
                          "train.resume_changed_data=true to continue on the new data")
    if changed:
        report(f"warning: resuming on changed data ({len(changed)} files; train.resume_changed_data=true)")
    resumed = checkpoint.load(path, setup.base, setup.optimizer)
    try:
        if setup.pivotal is not None:
            setup.pivotal.load_state(checkpoint.read_tensors(path, "pivotal_state", "embeddings"))
        if setup.ema is not None:
            ema.restore(setup.ema, checkpoint.read_tensors(path, "ema"), state["ema"], setup.accelerator.device)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: does not fit this run ({exc}). Resume with the settings the run started "
                              "with.") from None
    if resumed.scaler and setup.accelerator.scaler is not None:
        setup.accelerator.scaler.load_state_dict(resumed.scaler)
    # checkpoints before skipped updates stopped counting as steps hold no micro_steps: then every
    # micro-batch drawn was a step's
    micro_step = resumed.micro_steps if resumed.micro_steps is not None else resumed.step * cfg.train.grad_accum
    setup.batches.resume_at(micro_step, resumed.rows_done if resumed.rows_done is not None
                            else setup.batches.rows_done(micro_step))
    setup.micro_steps = micro_step
    # a state resumed from elsewhere (a rescued checkpoint) is written into this run folder again at the end
    in_run = Path(os.path.realpath(path.parent)) == Path(os.path.realpath(out / "checkpoints"))
    setup.checkpointed_step = resumed.step if in_run else -1
    if setup.accelerator.is_main_process:
        truncate_metrics(out, resumed.step)
    report(f"resumed from {path} at step {resumed.step}")
    return resumed.step


def truncate_metrics(out: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint: the resumed run will log them again."""
    path = out / "metrics.jsonl"
    if path.exists():
        records = itertools.takewhile(lambda record: "step" in record, logs.read_metrics(out))
        kept = [record for record in records if record["step"] <= step]
        atomic.write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
