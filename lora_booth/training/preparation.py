"""Before the first step: the output folder, the accelerator, checks that fail fast (memory,
sizes, xformers), the frozen model on its device, the class images, and the encoded inputs. The
recipe (recipe.py) calls these in order; each either succeeds or stops with a clear error."""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
from pathlib import Path

import torch
import yaml

from .. import families
from ..adapters import file_metadata, neutral
from ..config.sections import Config
from ..data import batches as data, buckets, files, rows
from ..families.tiny import TINY_NAMES
from ..io import atomic, manifest
from ..io.errors import ConfigError, DataError
from ..io.machine import available_memory
from ..io.progress import Progress
from ..model import checkpoint, loading as models, offload, text
from ..planning import plan, presets, savers
from ..results import sample
from . import prior, sharding


def prepare_output_dir(cfg: Config, accelerator) -> Path:
    """Refuse to mix two runs in one folder; write the resolved config before anything slow.
    The main process checks and writes (and, from here on, records what it writes in the folder's
    manifest); the others wait for it."""
    out = Path(cfg.save.output_dir).expanduser()
    if accelerator.is_main_process:
        _prepare_output_dir(cfg, out)
    accelerator.wait_for_everyone()
    return out


def check_output_apart_from_inputs(cfg: Config, out: Path) -> None:
    """The output folder is never a photo folder: config.yaml among the photos would be read as
    data by every later run, and overwrite=true would reach into them."""
    resolved = out.resolve()  # judged where the folders really are: a symlink spells a folder otherwise
    inputs = [("data.instance_dir", cfg.data.instance_dir), ("prior.class_dir", cfg.prior.class_dir)]
    for key, value in inputs:
        if not value or value.startswith(files.BUILTIN_PREFIX):
            continue
        folder = Path(value).expanduser().resolve()
        if folder == resolved:
            raise ConfigError("save.output_dir", f"is the same folder as {key} ({value})",
                              "choose an output_dir of its own, e.g. out/")
        if resolved in folder.parents:
            raise ConfigError("save.output_dir", f"{out} contains the folder of {key} ({value})",
                              "choose an output_dir outside that folder's tree, e.g. out/")
        if folder in resolved.parents:  # its files would be read as photos (a kohya `1_run` folder) next time
            raise ConfigError("save.output_dir", f"{out} lies inside the folder of {key} ({value})",
                              "choose an output_dir outside that folder's tree, e.g. out/")


# What a run writes at the top of its folder under fixed names: a file of the user's by one of
# these names is never replaced (a README.md, a config.yaml of their own), overwrite=true or not.
RUN_FILES = ("config.yaml", "metrics.jsonl", "run.json", "README.md", "report.html", "eval.json", "samples")


def check_no_foreign_files(cfg: Config, out: Path) -> None:
    """Refuse, before anything is written, a folder where the run would replace files lora-booth
    did not write: those its record (manifest) does not list."""
    if not out.is_dir():
        return
    record_path = out / manifest.NAME
    if os.path.lexists(record_path) and (record_path.is_symlink() or not record_path.is_file()):
        raise ConfigError("save.output_dir", f"{record_path} is not a record lora-booth wrote (a symlink, or not a "
                          "regular file)", "remove it, or choose another output_dir")
    for folder in ("checkpoints", "samples"):
        if (out / folder).is_symlink():  # lora-booth writes and deletes in these: never somewhere else
            raise ConfigError("save.output_dir", f"{out / folder} is a symlink to {os.path.realpath(out / folder)}",
                              "replace it by a folder, or choose another output_dir")
    record = manifest.Manifest(out)
    names = [*RUN_FILES, neutral.DIFFUSERS_WEIGHT_NAME, f"{file_metadata.output_name(cfg)}.safetensors"]
    foreign = [name for name in names if os.path.lexists(out / name) and not record.owns(out / name)]
    if foreign:
        raise ConfigError("save.output_dir", f"{out} holds {', '.join(foreign)}, which lora-booth did not write "
                          f"(they are not listed in its record {manifest.NAME}) and would replace",
                          "move them out of that folder or choose another output_dir (overwrite=true "
                          "replaces only files lora-booth wrote)")


def _prepare_output_dir(cfg: Config, out: Path) -> None:
    check_output_apart_from_inputs(cfg, out)
    finished = out / neutral.DIFFUSERS_WEIGHT_NAME if "diffusers" in cfg.save.formats else \
        out / f"{file_metadata.output_name(cfg)}.safetensors"
    checkpoints = checkpoint.folders(out) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ConfigError("save.output_dir", f"{out} is a file", "choose a folder name")
    check_no_foreign_files(cfg, out)
    if not cfg.train.resume and not cfg.save.overwrite:
        if finished.exists():
            raise ConfigError("save.output_dir", f"{out} already holds a finished run ({finished.name})",
                              "choose another output_dir, or pass overwrite=true to replace it")
        if checkpoints:
            raise ConfigError("save.output_dir", f"{out} holds an unfinished run ({checkpoints[-1].name})",
                              "continue it with resume=latest, or pass overwrite=true to start over")
    for folder in (out, out / "checkpoints", out / "samples"):  # a killed lora-booth run's leftovers: in the way
        atomic.sweep_stale(folder)
    if cfg.save.overwrite and not cfg.train.resume:
        remove_previous_run(out, finished, checkpoints)
    if not cfg.train.resume:  # a fresh run's log starts empty (it is lora-booth's: checked above)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    try:
        atomic.make_dirs(out)
        free = shutil.disk_usage(out).free
        if free < 256 * 2**20:
            raise DataError(f"{out}: only {free / 2**20:.0f} MiB free on this disk. Free some space first.")
        manifest.activate(out)
        atomic.write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except PermissionError:
        raise DataError(f"{out}: cannot write there (permission denied). Choose another output_dir.") from None


def remove_previous_run(out: Path, finished: Path, checkpoints: list[Path]) -> None:
    """overwrite=true: the files the previous run recorded in its manifest, its checkpoints (each
    by the files its state.json lists) and its adapter when the record lists it; never anything else in the
    folder (an adapter file it does not list is the user's, and check_no_foreign_files refuses the folder)."""
    manifest.Manifest(out).remove_recorded()
    for folder in checkpoints:
        checkpoint.remove(folder)
    with contextlib.suppress(OSError):
        (out / "checkpoints").rmdir()  # only when that left it empty


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    device = models.pick_device(cfg.train.device)
    refuse_fp16_without_cuda(cfg, device)
    if cfg.train.attention == "xformers":
        check_xformers(device)
    check_launch_environment()
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one precision per process; a second run in the same process (a notebook,
    # a test) with another precision would be refused. The process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                              cpu=device.type == "cpu")
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu":
        # accelerate runs fp16 on the CPU as plain fp32 (no autocast, no loss scaler); torch runs both
        # there, so the path the fp16 presets take on a GPU is the one tests run on the CPU
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    world = launched_world_size()
    if world is not None and world != accelerator.num_processes:
        raise ConfigError("launch", f"the launcher started {world} processes, but this one joined a group of "
                          f"{accelerator.num_processes}", MULTI_MACHINE_HINT)
    sharding.check_group(cfg, accelerator)
    return accelerator


def refuse_fp16_without_cuda(cfg: Config, device: torch.device) -> None:
    """fp16 training is for CUDA GPUs: elsewhere bf16 (or fp32) is faster and needs no loss scaler."""
    if cfg.train.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.mixed_precision", f"is fp16, but training runs on {device.type}",
                          "fp16 needs a CUDA GPU; use bf16 or no")


MULTI_MACHINE_HINT = ("on several machines use `torchrun --nnodes N --nproc_per_node G --node_rank R "
                      "--master_addr HOST --master_port PORT -m lora_booth train …` (add ACCELERATE_USE_CPU=true "
                      "for CPU processes), or `accelerate launch --multi_gpu --num_machines N …`; "
                      "`accelerate launch --cpu` starts every machine as a process of its own")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_world_size() -> int | None:
    import os

    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def check_launch_environment() -> None:
    """A launch meant for several processes or machines never trains alone silently: a launcher
    that sets the rendezvous address (MASTER_ADDR) but no world size started this process by
    itself (accelerate's --cpu launcher on several machines does), and each machine would train
    a full run of its own."""
    import os

    if os.environ.get("MASTER_ADDR") and launched_world_size() is None:
        raise ConfigError("launch", f"the launcher set MASTER_ADDR={os.environ['MASTER_ADDR'][:100]} for a "
                          "multi-process run, but started this process alone (no WORLD_SIZE)",
                          MULTI_MACHINE_HINT + "; to train in one process, unset MASTER_ADDR")


def broadcast(accelerator, value):
    """The main process's value on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def check_memory(cfg: Config, device: torch.device, report, processes: int = 1) -> None:
    """Before any weights load: train.offload_blocks=auto settled for the GPU; on a GPU, the memory
    plan of this exact configuration must fit; everywhere, the host RAM that loading takes, once per
    process on this machine (train.force=true skips both checks)."""
    budget = presets.gpu_budget(cfg.train.gpu_memory) if device.type == "cuda" else None
    cfg.train.offload_blocks = savers.resolve_auto(cfg, budget, report).train.offload_blocks
    if cfg.train.force:
        return
    if device.type == "cuda":
        estimate = plan.estimate(cfg, flops=False)  # whether it fits: half the trace time
        report(f"memory plan: {estimate.total / plan.GiB:.2f} GiB of {budget / plan.GiB:.1f} GiB")
        if not estimate.fits(budget):
            report(estimate.text(budget))
            raise ConfigError("train.gpu_memory", f"the plan needs {estimate.total / plan.GiB:.2f} GiB but the GPU "
                              f"has {budget / plan.GiB:.1f} GiB", "run `lora-booth plan` with the same keys for "
                              "settings that fit, or pass train.force=true to try anyway")
    check_host_memory(cfg, device, processes)


def check_host_memory(cfg: Config, device: torch.device, processes: int) -> None:
    """The planned host-RAM peak (the load) of every process on this machine must fit
    train.host_memory, or the RAM available now: a run that would swap is refused with the numbers."""
    parts = plan.host_estimate(cfg, device.type == "cuda")
    needed = sum(parts.values()) * processes
    available = presets.budget_bytes(cfg.train.host_memory) if cfg.train.host_memory else available_memory()
    if needed <= available:
        return
    where = f"train.host_memory={cfg.train.host_memory}" if cfg.train.host_memory else "available now (MemAvailable)"
    lines = ", ".join(f"{name} {size / plan.GiB:.2f}" for name, size in parts.items())
    raise ConfigError("train.host_memory", f"loading needs {needed / plan.GiB:.2f} GiB of host RAM"
                      + (f" ({processes} processes)" if processes > 1 else "") + f" but {available / plan.GiB:.2f} "
                      f"GiB is {where}; per process, in GiB: {lines}",
                      "close other programs, train on a machine with more RAM, or pass train.force=true to try "
                      "anyway (the system may swap or stop the run)")


# how far from the base's own size a run may go before it is told: a base sees detail and
# composition at the size it was trained at, and the cost of a step grows with the pixels
FAR_FROM_NATIVE = 1.5


def settle_resolution(cfg: Config, info: models.ModelInfo, report) -> None:
    """data.resolution from the base when unset; a warning, with the numbers, when far from it."""
    native = models.native_resolution(info)
    if cfg.data.resolution is None:
        cfg.data.resolution = native
        report(f"resolution   {native} px, the base model's own (data.resolution=N to change)")
        return
    ratio = cfg.data.resolution / native
    if ratio > FAR_FROM_NATIVE or ratio < 1 / FAR_FROM_NATIVE:
        report(f"warning: data.resolution={cfg.data.resolution} is {ratio:.3g}× the base model's own {native} px: "
               f"each image costs about {ratio ** 2:.3g}× the pixels of {native} px (class images, steps, samples), "
               f"and the base draws worst at sizes it was not trained at. Leave data.resolution unset for "
               f"{native} px.")


def check_family(cfg: Config, info: models.ModelInfo) -> None:
    """Settings the base model's family cannot train with, refused before any weights load."""
    refusal = families.family(info.family).refuses_config(cfg)
    if refusal:
        raise ConfigError(*refusal)


def check_sizes(cfg: Config, base: models.Base) -> None:
    """Image sides must survive the VAE's and the denoiser's downsampling without remainder (SD: 64)."""
    multiple = base.kind.size_multiple(base)
    key, value = ("data.bucket_step", cfg.data.bucket_step) if cfg.data.buckets else \
        ("data.resolution", cfg.data.resolution)
    if value % multiple:
        raise ConfigError(key, f"is {value}, but this model needs image sides that are a multiple of {multiple}",
                          f"use a multiple of {multiple}")


def check_xformers(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError("train.attention", f"is xformers, but training runs on {device.type}",
                          "xformers kernels run only on CUDA; use train.attention=sdpa")
    try:
        import xformers.ops  # noqa: F401
    except ImportError as exc:
        raise ConfigError("train.attention", f"is xformers, but it cannot be imported ({exc})",
                          "pip install 'lora-booth[xformers]', or use train.attention=sdpa") from None


def cache_latents(cfg: Config, base: models.Base, batches: data.DreamBoothBatches, first_micro_step: int,
                  updates_left: int, process, held_out: list[data.Key] = ()) -> None:
    """The latents this run will reach from `first_micro_step` (after a resume: from where it
    stands) through its `updates_left` updates, then those of the validation rows (`held_out`);
    then the VAE leaves the accelerator. When an update may be
    skipped and retried on a further batch (fp16's loss scaler, train.on_nan=skip), the VAE stays
    on the CPU for the rows beyond; sampling keeps it there too."""
    if not cfg.data.cache_latents:
        return

    source = batches.latent_source
    keys = batches.reachable(range(first_micro_step, first_micro_step + max(0, updates_left) * cfg.train.grad_accum))
    with Progress(max(1, len(keys)), "latents", "image", enabled=len(keys) >= 50 and process.is_main_process) as bar:
        def advance(done: int, total: int) -> None:
            bar.total = max(1, total)
            bar.advance_to(done)
        source.build_cache(keys, progress=advance)
    source.build_cache(held_out)  # in VAE calls of their own: the training latents' batches stay as they were
    may_skip = cfg.train.mixed_precision == "fp16" or cfg.train.on_nan == "skip"
    source.release(keep_on_cpu=may_skip or cfg.sample.num > 0)
    base.vae = source.vae if cfg.sample.num > 0 else None   # not needed for training: moved, or freed
    gc.collect()
    if process.device.type == "cuda":
        torch.cuda.empty_cache()


# The bases whose steps are too small to share out among threads: lora-booth's own toy world and
# tiny test models. The demo (toy world, 32 px, 200 steps) took 26.7 s on one thread and 29.5 s on
# torch's default two on an idle 2-core machine, and 45 s against 132 s beside two busy processes.
# The parameter count does not decide it: the benchmark's tiny SD-architecture UNet (1.5 M
# parameters, fewer than the toy world's 1.8 M) at 64 px took 0.84 s/step on one thread and
# 0.47 s/step on two, idle. Any other base keeps torch's default.
ONE_THREAD_BASES = ("toyworld", *TINY_NAMES)
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before any run changes it


def choose_threads(cfg: Config, device: torch.device, environ=None) -> tuple[int, str]:
    """How many CPU threads torch gets for this run, and why (for the start summary)."""
    environ = os.environ if environ is None else environ
    if cfg.train.threads:
        return cfg.train.threads, "train.threads"
    if environ.get("OMP_NUM_THREADS", "").strip():
        return TORCH_DEFAULT_THREADS, "OMP_NUM_THREADS"
    if device.type == "cpu" and cfg.model.source in ONE_THREAD_BASES:
        return 1, f"chosen: model={cfg.model.source} runs fastest on one; train.threads=N to change"
    return TORCH_DEFAULT_THREADS, "torch's default; train.threads=N to change"


def set_threads(cfg: Config, base: models.Base, device: torch.device) -> str:
    threads, why = choose_threads(cfg, device)
    torch.set_num_threads(threads)
    return f"{threads} ({why})"


def denoiser_waits(cfg: Config, base: models.Base, device: torch.device) -> bool:
    """Whether the denoiser stays on the CPU until place_denoiser: a family whose denoiser and text
    encoders do not fit a consumer GPU together (FLUX.1: 22 GiB of bf16 transformer, 9 GiB of T5),
    and any run that stores its weights in fewer bits or offloads blocks (issue #32): those reach
    the GPU only in their small form."""
    smaller = cfg.train.stored_weights != "compute" or cfg.train.offload_blocks.strip() not in ("0", "")
    return (base.kind.stages_denoiser or smaller) and device.type != "cpu"


# what prompt encoding needs on the card besides the encoders' weights: the CUDA context, the
# activations of a chunk of 16 prompts, the allocator's slack
ENCODING_EXTRA = int(1.5 * 2**30)


def encoders_stay_on_cpu(cfg: Config, base: models.Base, device: torch.device) -> str:
    """Why the prompts are encoded on the CPU, or "": a big text encoder (Qwen2.5-VL's 15.4 GiB,
    Qwen3-8B's) that does not fit the card beside nothing else, in a run that caches its prompts
    and whose denoiser comes to the card only afterwards. Encoding once on the CPU is slow (seconds
    a prompt), but a card that cannot hold the encoder would otherwise stop the run out of memory."""
    draws_class_images = cfg.prior.weight > 0 and not cfg.prior.by_prediction  # the pipeline needs them on the card
    if device.type != "cuda" or not denoiser_waits(cfg, base, device) or not text.caches_prompts(cfg) or \
            draws_class_images:
        return ""
    budget = presets.gpu_budget(cfg.train.gpu_memory)
    weights = sum(p.numel() * p.element_size() for _, encoder in base.text_encoders.values()
                  for p in encoder.parameters())
    if budget is None or weights + ENCODING_EXTRA <= budget * 0.9:
        return ""
    return (f"the text encoders' {weights / 2**30:.1f} GiB do not fit the card's {budget / 2**30:.1f} GiB "
            "(less 10 %); the prompts are encoded once on the CPU instead (seconds a prompt)")


def place(base: models.Base, device: torch.device, cfg: Config, report=print) -> None:
    """The frozen parts onto the device; the denoiser too unless it waits (denoiser_waits), the
    text encoders too unless they only encode prompts once and do not fit (encoders_stay_on_cpu)."""
    if denoiser_waits(cfg, base, device):
        on_cpu = encoders_stay_on_cpu(cfg, base, device)
        if on_cpu:
            report(f"text encoder {on_cpu}")
        for module in (base.vae, *([] if on_cpu else [encoder for _, encoder in base.text_encoders.values()])):
            module.to(device)
    else:
        base.to(device)
    if cfg.train.attention == "xformers":
        base.unet.enable_xformers_memory_efficient_attention()


def place_denoiser(base: models.Base, device: torch.device) -> None:
    """The denoiser onto the device, once it carries its adapters and its stored weights (fp8,
    int8, nf4), except the blocks offloaded to host RAM: a no-op where place() put it there already."""
    offload.to_device(base.unet, device)


def offload_setting(cfg: Config, accelerator) -> str:
    """train.offload_blocks as a count, a fraction or all (check_memory settled auto before)."""
    setting = cfg.train.offload_blocks.strip().lower()
    if setting not in ("0", "") and accelerator.num_processes > 1:
        raise ConfigError("train.offload_blocks", f"is {setting} with {accelerator.num_processes} processes; block "
                          "offload runs in one process", "set train.offload_blocks=0, or train in one process")
    return setting or "0"


def ensure_class_images(cfg: Config, base: models.Base, info: models.ModelInfo, accelerator,
                        report) -> list[rows.Row]:
    """The missing class images, each process drawing its share (image i by process i mod P).
    None with prior.mode=prediction: the class rows are then the instance rows' own noisy latents
    heard with the class prompt, their target the frozen base model's prediction (recipe.py)."""
    if cfg.prior.weight == 0:
        return []
    if cfg.prior.by_prediction:
        report(f"class images: none (prior.mode=prediction: each instance row is trained once more with "
               f"{cfg.prior.class_prompt!r}, toward the base model's own prediction)"
               + (f"; prior.class_dir={cfg.prior.class_dir} is not read" if cfg.prior.class_dir else ""))
        return []
    key = prior.cache_key(cfg, models.fingerprint(info))
    folder = prior.class_dir_for(cfg, key)
    missing = prior.missing_indices(folder, key, cfg.prior.num_class_images) if accelerator.is_main_process else []
    missing = broadcast(accelerator, missing)                   # one list, decided before anyone draws
    if missing:
        report(f"class images: drawing {len(missing)} of {cfg.prior.num_class_images} for "
               f"{cfg.prior.class_prompt!r} into {folder} ({prior.SAMPLER}, {cfg.prior.sample_steps} steps, "
               f"guidance {cfg.prior.guidance_scale}, {accelerator.num_processes} process(es))")
        share = [i for i in missing if prior.block_of(i, cfg) % accelerator.num_processes == accelerator.process_index]
        staged = denoiser_waits(cfg, base, accelerator.device)
        if staged:  # drawing needs the whole pipeline on the device: the denoiser goes back to the CPU after
            check_room_to_draw(cfg, base, accelerator.device, len(missing))
            base.unet.to(accelerator.device)
        prior.generate(base, cfg, folder, key, share, accelerator.device, report, accelerator.is_main_process)
        if staged:
            base.unet.to("cpu")
            torch.cuda.empty_cache()
    else:
        report(f"class images: reusing {cfg.prior.num_class_images} in {folder}")
    accelerator.wait_for_everyone()
    paths = prior.class_image_paths(folder, cfg.prior.num_class_images)
    for path in paths:
        files.load_rgb(path)
    return rows.class_rows(paths, cfg.prior.class_prompt)


def check_room_to_draw(cfg: Config, base: models.Base, device: torch.device, count: int) -> None:
    """Drawing class images needs the whole pipeline on the GPU at once, its denoiser in the compute
    precision (FLUX.1 in bf16: 22 GiB of transformer and 9 GiB of T5): refused, before anything
    moves, where that cannot fit."""
    if device.type != "cuda":
        return
    modules = (base.unet, base.vae, *(encoder for _, encoder in base.text_encoders.values()))
    needed = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())) + 2 * 2**30
    total = torch.cuda.get_device_properties(device).total_memory
    if needed > 0.95 * total:
        raise ConfigError("prior.mode", f"is images and {count} class images must be drawn, which needs the whole "
                          f"{base.kind.title} pipeline on the GPU ({needed / 2**30:.0f} GiB) but it has "
                          f"{total / 2**30:.0f} GiB", "use prior.mode=prediction (the FLUX.1 presets' choice: no class "
                          "images), or draw them on a larger GPU and pass their folder as prior.class_dir")


def encode_inputs(cfg: Config, base: models.Base, instances: list[rows.Row], classes: list[rows.Row],
                  process, report):
    """The batches, and the prompt embeddings, cached when allowed (then the text encoders leave
    the accelerator); the latents are cached by cache_latents, once resume says where the run stands."""
    device = process.device
    for row in {r.prompt: r for r in instances + classes}.values():
        if text.truncated(base.tokenizer, row.prompt):
            report(f"warning: the prompt for {row.path.name} is longer than {base.tokenizer.model_max_length} "
                   "tokens; its end is ignored")
    if cfg.data.buckets:
        report(f"buckets      {buckets.describe([row.size for row in instances])} (width×height: instance rows)")
    latent_source = data.LatentSource(base.vae, cfg.data, device, cfg.train.seed,
                                      masked={row.path for row in instances if row.mask is not None},
                                      codec=base.kind.latent_codec(base.vae))
    batches = data.DreamBoothBatches(instances, classes, latent_source, cfg.train.batch_size, cfg.train.seed,
                                     process.process_index, process.num_processes, cfg.data.caption_dropout,
                                     cfg.data.mask_dropout)
    keep = cfg.sample.num > 0  # sampling needs the VAE and text encoders again, off the accelerator meanwhile
    prompt_cache = None
    if cfg.train.cache_text_embeddings and cfg.pivotal.enabled:
        report("pivotal=true: prompt embeddings are not cached, since the new token embeddings train "
               "(the text encoder stays on the accelerator)")
    if text.caches_prompts(cfg):
        prompts = [r.prompt for r in instances + classes] + ([data.EMPTY_PROMPT] if cfg.data.caption_dropout else []) \
            + ([cfg.prior.class_prompt] if cfg.prior.by_prediction else []) \
            + (sample.default_prompts(cfg) + [data.EMPTY_PROMPT] if base.kind.stages_denoiser and keep else [])  # grids from the cache
        encoding = next(base.text_encoder.parameters()).device  # the CPU where the encoders do not fit the card
        prompt_cache = text.PromptCache(base.text_encoders, prompts, encoding, base.variant)
        for part in list(base.text_encoders):  # both of SDXL's
            setattr(base, part, getattr(base, part).to("cpu") if keep else None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batches, prompt_cache
