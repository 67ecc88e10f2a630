"""The recipe: DreamBooth (Ruiz et al. 2023, §3) with LoRA adapters (Hu et al. 2021).
setup → loop → save, and resume. The details live in the modules it calls."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import formats, neutral
from ..config.sections import Config
from ..data import rows as data_rows, trigger
from ..families.tiny import TINY_NAMES
from ..io import atomic, locking, manifest, progress
from ..io.errors import WriteError
from ..model import checkpoint, loading as models, lora, objective, offload, pivotal, precision, quantize
from ..results import card, logs, report as run_report, sample
from . import ema, family_defaults, optim, sharding, validation
from .preparation import (cache_latents, check_family, check_memory, check_sizes, encode_inputs, ensure_class_images,
                          make_accelerator, offload_setting, place, place_denoiser, prepare_output_dir, set_threads,
                          settle_resolution)
from .resume import resume_step, save_checkpoint
from .step import Setup, TrainingError, trained_tensors, training_step

# an fp16 loss scaler starting at 2^16 finds a workable scale within about 20 halvings; far more
# skipped updates in a row mean the run diverged rather than met a rare overflow
MAX_SKIPS_IN_A_ROW = 50


@dataclass
class Trained:
    adapter: Path          # the diffusers/PEFT file
    base: models.Base      # the model with its trained adapters still attached
    step: int


def train(cfg: Config, report=print) -> Path:
    """DreamBooth (Ruiz et al. 2023, §3) with LoRA adapters (Hu et al. 2021)."""
    return run(cfg, report).adapter


def run(cfg: Config, report=print) -> Trained:
    logs.check_installed(cfg)                                   # log.to=tensorboard/wandb importable
    accelerator = make_accelerator(cfg)                         # one per process under accelerate launch
    out = Path(cfg.save.output_dir).expanduser()
    with ExitStack() as held:
        if accelerator.is_main_process:                         # one run per output folder
            held.enter_context(locking.exclusive(out, "train"))
        held.callback(manifest.deactivate, out)
        created = accelerator.is_main_process and not out.exists()
        try:
            return run_locked(cfg, accelerator, report)
        except BaseException:
            if created:
                remove_unstarted_run(out)
            raise


def remove_unstarted_run(out: Path) -> None:
    """A run that created its output folder and failed before its first step (a bad photo, a model
    that does not load, Ctrl-C while class images are drawn) leaves nothing of its own behind:
    what it wrote is in the folder's manifest. A run with a finished step keeps its log and
    checkpoints, for resume."""
    if logs.read_metrics(out) or checkpoint.folders(out):
        return
    manifest.deactivate(out)
    manifest.Manifest(out).remove_recorded()
    with contextlib.suppress(OSError):
        out.rmdir()                                             # only when nothing else is in it


def run_locked(cfg: Config, accelerator, report) -> Trained:
    report = report if accelerator.is_main_process else (lambda *_: None)
    info = models.locate(cfg.model)                             # family known before any weights load
    origins = family_defaults.apply_for_model(cfg, info)        # guidance and steps: the family's unless set
    check_family(cfg, info)                                     # settings it cannot train with (FLUX.1: min-SNR)
    settle_resolution(cfg, info, report)                        # the base's own size unless set
    out = prepare_output_dir(cfg, accelerator)                  # refuses to clobber; config.yaml first
    instances = data_rows.instance_rows(cfg.data, report)            # every photo decoded: bad files fail now
    check_memory(cfg, accelerator.device, report, local_processes(accelerator))  # before gigabytes load
    base = models.load_frozen(cfg.model, info, precision.compute_dtype(cfg.train.mixed_precision))
    check_sizes(cfg, base)
    threads = set_threads(cfg, base, accelerator.device)         # before the first heavy work: class images
    place(base, accelerator.device, cfg, report)
    classes = ensure_class_images(cfg, base, info, accelerator, report)  # drawn by the frozen base
    trigger.check([tokenizer for tokenizer, _ in base.text_encoders.values()], cfg, report)
    embeddings = pivotal.install_for_run(cfg, base, accelerator.num_processes, report)  # <s0><s1>... (pivotal=true)
    instances = pivotal.rewrite_rows(instances, cfg.pivotal, report)
    trained_on = data_rows.fingerprint(instances, classes)           # resume refuses other data
    batches, prompt_cache = encode_inputs(cfg, base, instances, classes, accelerator, report)
    params = lora.add_adapters(base, cfg.lora, cfg.train.seed)  # the only tensors the optimizer sees
    quantize.store(base.unet, cfg.train.stored_weights, base.compute_dtype,  # fp8/int8/nf4, layer by layer
                   base.kind.fp8_keep, accelerator.device)
    offload.install(base.unet, base.kind.offload_units,          # frozen blocks kept in host RAM
                    offload_setting(cfg, accelerator), accelerator.device)
    if cfg.launch.sharding == "none":                           # sharded: FSDP places it, a block at a time
        place_denoiser(base, accelerator.device)                # FLUX.1: only now, after T5 has left the GPU
    if embeddings is not None:
        params["embeddings"] = embeddings.parameters()
    setup = prepare_optimization(cfg, base, params, accelerator, batches, prompt_cache)
    setup.pivotal = embeddings
    setup.trained_on = trained_on
    setup.counts = (len({r.path for r in instances}), len(classes))
    setup.ema = ema.make(cfg.train.ema, trained_tensors(setup))
    step = resume_step(cfg, out, setup, report)                 # 0 unless resuming
    setup.threads = threads
    setup.held_out = validation.HeldOut(cfg, setup.batches)    # validate.every: rows drawn from streams of their own
    cache_latents(cfg, base, setup.batches, setup.micro_steps, cfg.train.max_steps - step, accelerator,
                  setup.held_out.latent_keys())                 # what it reaches, then the held-out rows
    report_plan(cfg, base, setup, instances, classes, out, step, report, origins)
    started, first_step = time.time(), step
    setup.started = started
    log = logs.RunLog(cfg, out, accelerator.is_main_process)    # metrics.jsonl (+ TensorBoard, wandb)
    try:
        step = run_loop(cfg, setup, out, step, report, log)
        if setup.checkpointed_step != step:  # the final state first: resume=latest redoes a failed end
            save_checkpoint(cfg, setup, out, step, report)
        if setup.ema is not None:                               # the average is what gets saved
            ema.copy_to(setup.ema, trained_tensors(setup))
        adapter = out / neutral.DIFFUSERS_WEIGHT_NAME
        written: list[Path] = []
        if accelerator.is_main_process:                         # files are written once, before anything optional
            try:
                written = formats.save_trained(base, out, cfg, step, setup.counts, started, time.time())  # diffusers + kohya
                if setup.pivotal is not None:
                    written.append(setup.pivotal.save(out, cfg.pivotal.trigger, neutral.SAVE_DTYPES[cfg.save.dtype]))
            except WriteError as exc:
                raise WriteError(f"{exc} The trained state of step {step} is safe in {out / 'checkpoints'}: repeat the "
                                 "command with resume=latest to write the files without training again.") from None
            adapter = adapter if "diffusers" in cfg.save.formats else written[0]
        accelerator.wait_for_everyone()
        last_grid = optional("the sample grid", lambda: sample_grid(cfg, setup, out, step), report) \
            if cfg.sample.num else None                         # the adapters as saved
        log.image(step, last_grid)
    finally:
        log.close()
    if accelerator.is_main_process:
        card_path = optional("the model card (README.md)", lambda: card.write_model_card(
            out, cfg, base, step, written, last_grid, time.time() - started), report)
        written += [card_path] if card_path else []
        written += write_run_summary(out, step, first_step, started, accelerator.device, report)
        report_end(cfg, base.kind, out, written, last_grid, time.time() - started, report)
        if setup.pivotal is not None:
            report("\n".join(pivotal.usage(out, setup.pivotal.tokens, pivotal.rewrite(cfg.data.instance_prompt,
                                                                                      cfg.pivotal))))
    finish(accelerator)
    return Trained(adapter, base, step)


def optional(what: str, make, report):
    """An end-of-run extra: the adapter files are already written, so a failure here is a warning
    that says how to redo it, never a lost run (issue #21)."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - any failure of an extra must leave the saved result standing
        report(f"warning: {what} was not written ({type(exc).__name__}: {str(exc)[:300]}). The adapter is saved; "
               "to redo the end of the run without training again, repeat the command with resume=latest")
        return None


def finish(accelerator) -> None:
    """Every process reaches the end; the process group is torn down explicitly, since gloo can
    abort at interpreter exit otherwise (FACTS.md: 3–15 % of runs)."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_loop(cfg: Config, setup: Setup, out: Path, step: int, report, log: logs.RunLog) -> int:
    """Optimizer steps until max_steps; a stop signal ends it cleanly at the next step boundary."""
    stop = StopSignal()
    started, first_step, skipped_in_a_row = time.perf_counter(), step, 0
    bar = progress.Progress(cfg.train.max_steps, "train", "step", initial=step,
                            enabled=setup.accelerator.is_main_process)
    with stop:
        while step < cfg.train.max_steps:
            step_started, setup.next_step = time.perf_counter(), step + 1
            # `step` counts updates applied: the schedule is a function of it, so a skipped step leaves it
            optim.set_learning_rate(setup.optimizer, optim.lr_factor(step, cfg.optim, cfg.train.max_steps))
            parts = [training_step(setup, setup.micro_steps + micro, cfg) for micro in range(cfg.train.grad_accum)]
            setup.micro_steps += cfg.train.grad_accum               # the data moves on, applied or not
            losses = objective.mean(parts)                          # the optimizer step's loss, not one micro-batch's
            if setup.accelerator.num_processes > 1:                 # ... and the global batch's
                losses = objective.Losses(*(setup.accelerator.reduce(t.detach(), "mean") for t in losses))
            if skipped_update(setup):
                skipped_in_a_row += 1
                report(f"warning: step {step + 1}: {setup.skip_reason}; the update was skipped and the step is "
                       "retried on the next batch (the adapters, EMA and learning rate are unchanged)")
                if skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise TrainingError(f"step {step + 1}: {skipped_in_a_row} updates in a row were skipped "
                                        f"({setup.skip_reason}). Lower optim.lr, or use train.mixed_precision="
                                        "bf16/no; the last checkpoint is kept.")
                continue
            skipped_in_a_row = 0
            if setup.ema is not None:
                setup.ema.step(trained_tensors(setup))
            step += 1
            seconds = time.perf_counter() - step_started          # the step's own time, without validation
            log_metrics(log, step, losses, setup.optimizer, seconds, setup.held_out.losses(setup, step))
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                bar.set_postfix(loss=f"{losses.total.item():.4f}", instance=f"{losses.instance.item():.4f}",
                                prior=f"{losses.prior.item():.4f}",
                                lr=f"{setup.optimizer.param_groups[0]['lr']:.2e}")
            bar.update(1)
            save_now, sample_now = stop.take_requests(setup.accelerator)
            if (cfg.save.checkpoint_every and step % cfg.save.checkpoint_every == 0) or \
                    (save_now and step < cfg.train.max_steps):  # the last step's files are the final ones
                save_checkpoint(cfg, setup, out, step, report)
            if cfg.sample.num and step < cfg.train.max_steps and (
                    (cfg.sample.every and step % cfg.sample.every == 0) or sample_now):
                log.image(step, sample_grid(cfg, setup, out, step))
            if stop.requested and step < cfg.train.max_steps:
                path = save_checkpoint(cfg, setup, out, step, report)
                bar.close()
                raise TrainingError(f"stopped by {stop.requested} after step {step}; checkpoint {path}. "
                                    f"Continue with the same command plus resume=latest.")
    bar.close()
    elapsed = time.perf_counter() - started
    if step > first_step:
        report(f"trained {step - first_step} steps in {elapsed:.1f} s ({elapsed / (step - first_step):.3f} s/step)")
    return step


def skipped_update(setup: Setup) -> bool:
    """Whether the optimizer step just taken changed nothing: a non-finite loss (train.on_nan=skip)
    or an fp16 gradient overflow that the loss scaler caught. Both are treated alike: no update,
    no EMA step, no step counted; the scaler has lowered its scale and the next batch is tried."""
    if setup.skipped > setup.skips_seen:
        setup.skips_seen, setup.skip_reason = setup.skipped, "non-finite loss (train.on_nan=skip)"
        return True
    if getattr(setup.optimizer, "step_was_skipped", False):
        setup.skip_reason = "fp16 gradient overflow (the loss scaler lowered its scale)"
        return True
    return False


def sample_grid(cfg: Config, setup: Setup, out: Path, step: int) -> Path | None:
    """The main process draws; every process must call this (it ends with a barrier)."""
    path = None
    try:
        if setup.accelerator.is_main_process:
            path = sample.training_grid(setup.base, setup.base.unet, cfg, out, step, setup.accelerator.device,
                                        setup.prompt_cache)
    finally:  # a failed grid must not leave the other processes waiting here for ever
        setup.accelerator.wait_for_everyone()
    return path


def report_end(cfg: Config, kind, out: Path, written: list[Path], grid: Path | None, seconds: float, report) -> None:
    lines = [f"done in {seconds / 60:.1f} min", "files:"]
    lines += [f"  {path}" for path in written + ([grid] if grid else [])]
    if "diffusers" in cfg.save.formats and cfg.lora.type in ("lora", "dora"):
        lines.append(f"diffusers:  pipe.load_lora_weights({str(out)!r})")
    if cfg.lora.type != "lora":  # who loads which file differs per adapter kind
        lines.append(f"{cfg.lora.type}: {kind.loaders_note(cfg.lora.type) or formats.LOADERS[cfg.lora.type]}")
    kohya = [p for p in written if p.suffix == ".safetensors" and p.name != neutral.DIFFUSERS_WEIGHT_NAME]
    if kohya and kind.webui_names:  # "": no web UI of that kind runs the family
        lines.append(f"{kind.webui_names}: copy {kohya[0].name} to models/Lora/ and add "
                     f"<lora:{kohya[0].stem}:1> to the prompt")
    if kohya:
        lines.append(f"ComfyUI:     copy {kohya[0].name} to models/loras/ and load it with a LoraLoader node")
    elif kind.comfyui_reads_diffusers_file and cfg.lora.type != "dora":  # no kohya file: FLUX.1 LoHa/LoKr…
        lines.append(f"ComfyUI, Forge: copy {neutral.DIFFUSERS_WEIGHT_NAME} to models/loras/ (LoraLoader node)")
    else:  # SD's diffusers file: ComfyUI and Forge do not map its UNet keys
        lines.append(f"ComfyUI, Forge, AUTOMATIC1111: they take the kohya file: lora-booth convert in={out} to=kohya "
                     f"out={out}/")
    warning = formats.dora_warning(cfg, out)  # no DoRA file loads right in every front-end: say so, and the fix
    if warning:
        lines.append(warning)
    gap = formats.kohya_gap_warning(kohya[0], "diffusers" in cfg.save.formats) if kohya else None
    if gap:  # diffusers drops FLUX.1's modules outside the blocks from a kohya file (issue 34)
        lines.append(gap)
    report("\n".join(lines))


def log_metrics(log: logs.RunLog, step: int, losses: objective.Losses, optimizer, seconds: float,
                validated: dict | None = None) -> None:
    """One record per optimizer step: the losses apart, the learning rate, the step's time, and on
    the steps validate.every names the validation losses."""
    record = {"step": step, "loss": losses.total.item(), "instance_loss": losses.instance.item(),
              "prior_loss": losses.prior.item(), "lr": optimizer.param_groups[0]["lr"], "step_seconds": seconds,
              **(validated or {})}
    log.scalars(step, record)


def write_run_summary(out: Path, step: int, first_step: int, started: float, device: torch.device,
                      report) -> list[Path]:
    """output_dir/run.json (timings and peak memory, for the report), then report.html."""
    summary = {"steps": step, "steps_this_run": step - first_step, "seconds": time.time() - started,
               "device": str(device), **peak_memory(device)}
    atomic.write_text(out / "run.json", json.dumps(summary, indent=2) + "\n")
    written = [out / "run.json"]
    try:
        written.append(run_report.write_report(out))
    except Exception as exc:  # noqa: BLE001 - the trained adapter is saved; a report problem must not fail the run
        report(f"warning: report.html not written ({type(exc).__name__}: {exc}); retry with `lora-booth report {out}`")
    return written


def peak_memory(device: torch.device) -> dict:
    """The accelerator's peak allocation where torch tracks it, else the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "CUDA allocated"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024, "peak_memory_of": "process RSS"}


class StopSignal:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step boundary (after a checkpoint);
    a second Ctrl-C stops at once. SIGUSR1 asks for a checkpoint now and SIGUSR2 for a sample
    grid now, at the next step boundary, and training goes on (the studio's "save now" and
    "sample now"; `kill -USR1 <pid>` from a shell)."""

    def __init__(self) -> None:
        self.requested = ""
        self.save_now = self.sample_now = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step and saving a checkpoint (again to abort now)")

    def _ask(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGUSR1", None):
            self.save_now = True
        else:
            self.sample_now = True

    def __enter__(self) -> "StopSignal":
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            for name in ("SIGUSR1", "SIGUSR2"):  # POSIX only
                if hasattr(signal, name):
                    self._previous[getattr(signal, name)] = signal.signal(getattr(signal, name), self._ask)
        except ValueError:  # not the main thread: leave signals to the host program
            pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def take_requests(self, accelerator) -> tuple[bool, bool]:
        """(save now?, sample now?), cleared; under several processes whichever process was asked
        speaks for all, since saving and sampling wait for every process."""
        asked = (self.save_now, self.sample_now)
        self.save_now = self.sample_now = False
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(torch.tensor([float(a) for a in asked], device=accelerator.device), "max")
            asked = (bool(flags[0] > 0), bool(flags[1] > 0))
        return asked


# ---------------------------------------------------------------------------------------- setup


def prepare_optimization(cfg: Config, base: models.Base, params, accelerator, batches, prompt_cache) -> Setup:
    encoders = base.text_encoders
    # the encoders with adapters; a frozen one (FLUX.1's T5) stays in eval mode: no dropout in it
    trained = list(base.kind.trainable_text_parts()) if cfg.lora.text_encoder else []
    if cfg.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for part in trained:
            models.checkpoint_activations(encoders[part][1])
    base.unet.train()
    for part in trained:
        encoders[part][1].train()
    effective_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    part_lrs = {"embeddings": cfg.pivotal.lr} if cfg.pivotal.lr is not None else {}
    optimizer = optim.build_optimizer(params, cfg.optim, effective_batch, lora.up_matrices(base), part_lrs)
    # DDP-wrapped with several processes, so the adapters' gradients are averaged across them
    # a denoiser with offloaded blocks is placed already: accelerate's .to(device) would bring every block
    placed_already = getattr(base.unet, "_block_offload", None) is not None
    if cfg.launch.sharding == "fsdp":  # FSDP2 instead of DDP; no text-encoder adapters (config checks)
        sharding.shard(base.unet, base.kind.offload_units, accelerator.device, accelerator.num_processes)
        model, optimizer, prepared = base.unet, accelerator.prepare(optimizer), []
    else:
        model, *prepared, optimizer = accelerator.prepare(base.unet, *(encoders[p][1] for p in trained), optimizer,
                                                          device_placement=[not placed_already,
                                                                            *([True] * len(trained)), True])
    text_models = None if prompt_cache is not None else \
        {part: (tokenizer, dict(zip(trained, prepared)).get(part, encoder)) for part, (tokenizer, encoder) in encoders.items()}
    return Setup(base, accelerator, optimizer, params, batches, prompt_cache, model, text_models,
                 trained_models=[model, *prepared])


def report_plan(cfg: Config, base: models.Base, setup: Setup, instances, classes, out: Path, step: int,
                report, origins: dict[str, str] | None = None) -> None:
    counts = lora.count(setup.params)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * setup.accelerator.num_processes
    distinct_instances = len({r.path for r in instances})
    epochs = cfg.train.max_steps * per_step / max(1, len(instances))
    lines = [
        f"base model   {cfg.model.source} ({base.family}, {base.prediction_type}-prediction"
        + ("; random weights, for tests: it learns nothing real" if cfg.model.source in TINY_NAMES else "")
        + ")",
        f"processes    {setup.accelerator.num_processes}; effective batch {per_step} instance rows per step "
        f"(batch {cfg.train.batch_size} × accumulation {cfg.train.grad_accum} × processes); learning rate "
        + ("scaled by it" if cfg.optim.scale_lr else "not scaled (optim.scale_lr=true to scale it)"),
        "trainable    " + ", ".join(f"{part} {n:,}" for part, n in counts.items())
        + f" parameters ({cfg.lora.type}, rank {cfg.lora.rank}, alpha {cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank})",
        f"precision    {cfg.train.mixed_precision}{stored_note(cfg, base)} "
        f"(adapters fp32) on {setup.accelerator.device}, "
        f"{cfg.optim.optimizer}, lr {cfg.optim.lr:g} {cfg.optim.schedule}"
        + base.kind.precision_note(cfg.train.mixed_precision)
        + (f", LoRA+ ×{cfg.optim.loraplus_ratio:g}" if cfg.optim.loraplus_ratio else "")
        + (f", EMA {cfg.train.ema:g}" if cfg.train.ema else ""),
        f"CPU threads  {setup.threads}",
        f"data         {distinct_instances} instance images, {len(instances)} rows per epoch with repeats"
        + (f", {len(classes)} class images (λ = {cfg.prior.weight:g})" if classes else
           f", prior preservation by the base model's predictions (λ = {cfg.prior.weight:g}, no class images)"
           if cfg.prior.by_prediction else ", no prior preservation")
        + f", {cfg.data.resolution} px",
        f"steps        {cfg.train.max_steps} × {per_step} instance rows ({epochs:.1f} epochs)"
        + (f", resuming at {step}" if step else ""),
        f"output       {out}",
    ]
    shard_line = sharding.summary(base.unet, setup.accelerator.num_processes)
    if shard_line:
        lines.insert(2, shard_line)
    if origins:  # the settings whose value depends on the family, and who chose each
        lines.insert(-2, "by family    " + family_defaults.summary(cfg, origins))
    report("\n".join(lines))


def local_processes(accelerator) -> int:
    """Processes on this machine (each loads its own copy of the base into host RAM)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.strip().isdigit() else accelerator.num_processes


def stored_note(cfg: Config, base: models.Base) -> str:
    """How the frozen denoiser is held, when a memory saver changes it."""
    notes = [f"{base.kind.denoiser} weights stored in {cfg.train.stored_weights}"] \
        if cfg.train.stored_weights != "compute" else []
    held = getattr(base.unet, "_block_offload", None)
    if held is not None:
        notes.append(f"{len(held.units)} blocks ({held.host_bytes() / 2**30:.2f} GiB) offloaded to host RAM")
    return f" ({'; '.join(notes)})" if notes else ""
