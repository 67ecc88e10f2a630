"""Per-field ranges and the rules across sections, checked before anything heavy is loaded."""
from __future__ import annotations

import re
from pathlib import Path

from ..io.errors import ConfigError, ConfigErrors
from ..io.machine import available_memory
from .keys import shown
from .sections import IMAGE_SUFFIXES, LOG_TARGETS, Config, ObjectiveConfig, OptimConfig


MODEL_EXAMPLES = ("e.g. model=stable-diffusion-v1-5/stable-diffusion-v1-5 (a hub id), model=/models/sd15 (a diffusers "
                  "folder), model=/models/v1-5-pruned.safetensors (a single file), or model=toyworld with "
                  "preset=demo for the CPU demo")


def validate(cfg: Config, sources: dict[str, str], check_paths: bool = False) -> None:
    """Per-field ranges and cross-section rules. Runs before anything heavy is loaded. Every
    problem is collected and raised together (ConfigErrors), the first one per key."""
    problems: dict[str, ConfigError] = {}

    def fail(key: str, problem: str, fix: str = "") -> None:
        problems.setdefault(key, ConfigError(key, problem, fix, sources.get(key, "")))

    check_values(cfg, fail)
    if check_paths:
        check_input_folders(cfg, fail)
    if problems:
        raise ConfigErrors(list(problems.values()))


def check_input_folders(cfg: Config, fail) -> None:
    """The photo and class-image folders named exist, so a typo in a path is reported with the rest."""
    for key, value in (("data.instance_dir", cfg.data.instance_dir), ("prior.class_dir", cfg.prior.class_dir)):
        if not value or value.startswith("builtin:") or (key == "prior.class_dir" and cfg.prior.weight == 0):
            continue
        folder = Path(value).expanduser()
        if key == "data.instance_dir" and not folder.is_dir():
            fail(key, f"is {value}, which {'is not a folder' if folder.exists() else 'does not exist'}",
                 "pass the folder that holds your photos")
        elif key == "prior.class_dir" and folder.exists() and not folder.is_dir():
            fail(key, f"is {value}, which is not a folder", "pass a folder (missing class images are drawn into it)")


def check_values(cfg: Config, fail) -> None:
    """Per-field ranges and cross-section rules; `fail` records a problem and the checks go on."""

    positive = {"lora.rank": cfg.lora.rank, "data.resolution": 8 if cfg.data.resolution is None else cfg.data.resolution,
                "data.repeats": cfg.data.repeats, "train.max_steps": cfg.train.max_steps,
                "train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                "prior.sample_steps": cfg.prior.sample_steps, "prior.sample_batch_size": cfg.prior.sample_batch_size,
                "save.keep": cfg.save.keep, "train.log_every": cfg.train.log_every,
                "sample.steps": cfg.sample.steps, "launch.processes": cfg.launch.processes,
                "validate.rows": cfg.validate.rows}
    for key, value in positive.items():
        if value <= 0:
            fail(key, f"must be positive, not {value}")
    non_negative = {"prior.weight": cfg.prior.weight, "prior.num_class_images": cfg.prior.num_class_images,
                    "objective.min_snr_gamma": cfg.objective.min_snr_gamma,
                    "objective.noise_offset": cfg.objective.noise_offset, "optim.warmup_steps": cfg.optim.warmup_steps,
                    "optim.max_grad_norm": cfg.optim.max_grad_norm, "optim.weight_decay": cfg.optim.weight_decay,
                    "save.checkpoint_every": cfg.save.checkpoint_every, "sample.num": cfg.sample.num,
                    "sample.every": cfg.sample.every, "validate.every": cfg.validate.every}
    non_negative["train.threads"] = cfg.train.threads
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"must not be negative, not {value}")
    if cfg.optim.lr <= 0:
        fail("optim.lr", f"must be positive, not {cfg.optim.lr}")
    check_ceilings(cfg, fail)
    check_ranges(cfg, fail)
    check_optimizer(cfg.optim, fail)
    check_extras(cfg, fail)
    check_masks(cfg, fail)
    if not 0 <= cfg.lora.dropout < 1:
        fail("lora.dropout", f"must be in [0, 1), not {cfg.lora.dropout}")
    if cfg.lora.dropout and cfg.lora.type in ("loha", "lokr"):
        fail("lora.dropout", f"is {cfg.lora.dropout}, but peft's {cfg.lora.type} has no input dropout",
             "set lora.dropout=0, or use lora.type=lora or dora")
    if not cfg.lora.targets:
        fail("lora.targets", "is empty", "name at least one module, e.g. to_q,to_k,to_v,to_out.0")
    if cfg.data.resolution is not None and cfg.data.resolution % 8:
        fail("data.resolution", f"must be a multiple of 8, not {cfg.data.resolution}", "try "
             f"{max(8, round(cfg.data.resolution / 64) * 64)}")
    if not cfg.data.instance_dir:
        fail("data.instance_dir", "is empty", "set instance_dir=path/to/photos")
    if not cfg.data.instance_prompt.strip():
        fail("data.instance_prompt", "is empty", 'set instance_prompt="a photo of sks dog"')
    if cfg.prior.weight > 0 and not cfg.prior.class_prompt.strip():
        fail("prior.class_prompt", "is empty while prior.weight > 0",
             'set class_prompt="a photo of dog", or prior.weight=0 to train without prior preservation')
    if cfg.prior.weight > 0 and cfg.prior.mode == "images" and cfg.prior.num_class_images == 0:
        fail("prior.num_class_images", "is 0 while prior.weight > 0", "use 100-200, prior.mode=prediction (no class "
             "images), or prior.weight=0")
    check_savers(cfg, fail)
    check_sharding(cfg, fail)
    if cfg.train.fp8_base and cfg.train.mixed_precision == "no":
        fail("train.fp8_base", "is true with train.mixed_precision=no; fp8 weights are upcast to fp16 or bf16 to run",
             "set train.mixed_precision=bf16 (or fp16 on CUDA)")
    if cfg.train.fp8_base and not cfg.train.gradient_checkpointing:
        fail("train.fp8_base", "saves memory only with gradient checkpointing: without it the backward pass keeps "
             "every layer's upcast copy", "add train.gradient_checkpointing=true")
    if cfg.data.buckets and (cfg.data.bucket_step <= 0 or (cfg.data.resolution or 0) % cfg.data.bucket_step):
        fail("data.bucket_step", f"is {cfg.data.bucket_step}; data.resolution={cfg.data.resolution} must be a positive "
             "multiple of it", "use data.bucket_step=64 with a resolution that is a multiple of 64")
    if cfg.data.buckets and cfg.data.bucket_max_ratio < 1:
        fail("data.bucket_max_ratio", f"is {cfg.data.bucket_max_ratio}; a side ratio is at least 1", "try 2.0")
    if cfg.data.crop == "random" and cfg.data.cache_latents:
        fail("data.crop", "is random while data.cache_latents is true: a cached latent holds one fixed crop",
             "set data.crop=center, or data.cache_latents=false")
    unknown_formats = set(cfg.save.formats) - {"diffusers", "kohya"}
    if unknown_formats or not cfg.save.formats:
        fail("save.formats", f"must list diffusers and/or kohya, not {','.join(cfg.save.formats) or 'nothing'}",
             "e.g. save.formats=diffusers,kohya")
    if not cfg.save.output_dir:
        fail("save.output_dir", "is empty", "set output_dir=out/")
    check_log_targets(cfg, fail)
    if not cfg.model.source.strip():
        fail("model.source", "is not set: a run names the base model it trains on", MODEL_EXAMPLES)


SEED_MAX = 2**63 - 1  # torch's generators take a 64-bit seed; lora-booth derives others from it


# the largest value each number can mean, with what is usual: past it a typo (resolution=51200,
# batch_size=1000000) would allocate for minutes and then fail, or loop for days
CEILINGS = {"data.resolution": (8192, "SD 1.x trains at 512, SDXL and FLUX.1 at 1024"),
            "data.repeats": (10_000, "kohya's repeat folders use 1-100"),
            "lora.rank": (4096, "4-128 is usual"), "lora.text_encoder_rank": (4096, "4-128 is usual"),
            "train.batch_size": (1024, "1-8 is usual; train.grad_accum makes larger effective batches"),
            "train.grad_accum": (100_000, "1-16 is usual"),
            "train.max_steps": (10**9, "a few hundred to a few thousand is usual"),
            "prior.num_class_images": (1_000_000, "100-200 is usual"),
            "prior.sample_batch_size": (1024, "4 is usual"), "prior.sample_steps": (1000, "25 is usual"),
            "sample.num": (1000, "2-4 images per prompt is usual"), "sample.steps": (1000, "25 is usual"),
            "validate.rows": (100_000, "4-32 held-out rows is usual"), "pivotal.tokens": (1000, "2 is usual"),
            "launch.processes": (1024, "one per GPU"), "train.seed": (SEED_MAX, "any whole number ≥ 0"),
            "sample.seed": (SEED_MAX, "any whole number ≥ 0")}


def check_ceilings(cfg: Config, fail) -> None:
    """Every number has a largest sensible value; a batch of images must also fit in this
    machine's memory before anything is loaded."""
    for key, (ceiling, usual) in CEILINGS.items():
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        if value is not None and value > ceiling:
            fail(key, f"is {value:,}, more than lora-booth accepts ({ceiling:,})", usual)
    for key in ("train.seed", "sample.seed"):
        section, name = key.split(".", 1)
        if getattr(getattr(cfg, section), name) < 0:
            fail(key, f"must not be negative, not {getattr(getattr(cfg, section), name)}", "any whole number ≥ 0")
    # the decoded photos of one batch in fp32 (3 channels) and their copies on the way to latents;
    # an unset resolution becomes the base's own, at most 1024 px
    resolution = cfg.data.resolution or 1024
    batch_bytes = 4 * cfg.train.batch_size * 3 * resolution ** 2 * 4
    if batch_bytes > available_memory():
        fail("train.batch_size", f"× data.resolution: a batch of {cfg.train.batch_size} images of "
             f"{resolution} px needs about {batch_bytes / 2**30:.1f} GiB of memory to prepare, more than the "
             f"{available_memory() / 2**30:.1f} GiB free", "lower train.batch_size or data.resolution")
    alpha = cfg.lora.rank if cfg.lora.alpha is None else cfg.lora.alpha
    if cfg.lora.alpha is not None and cfg.lora.alpha > 0 and cfg.lora.rank > 0 and alpha / cfg.lora.rank > 256:
        fail("lora.alpha", f"is {alpha:g} at lora.rank={cfg.lora.rank}: the update would be scaled by "
             f"{alpha / cfg.lora.rank:g} (at most 256)", "leave it unset for alpha = rank, or use alpha ≤ 2 × rank")


def check_ranges(cfg: Config, fail) -> None:
    """Values no run can mean: each would train silently wrong, loop or fail late with the wrong advice."""
    if cfg.lora.alpha is not None and cfg.lora.alpha <= 0:
        fail("lora.alpha", f"must be positive, not {cfg.lora.alpha}", "leave it unset for alpha = rank")
    if cfg.lora.text_encoder_rank is not None and cfg.lora.text_encoder_rank < 1:
        fail("lora.text_encoder_rank", f"must be at least 1, not {cfg.lora.text_encoder_rank}",
             "leave it unset to use lora.rank")
    if cfg.optim.text_encoder_lr is not None and cfg.optim.text_encoder_lr <= 0:
        fail("optim.text_encoder_lr", f"must be positive, not {cfg.optim.text_encoder_lr} (a negative rate trains "
             "by gradient ascent)", "leave it unset to use optim.lr, or set lora.text_encoder=false")
    for key, beta in (("optim.beta1", cfg.optim.beta1), ("optim.beta2", cfg.optim.beta2)):
        if not 0 <= beta < 1:
            fail(key, f"must be in [0, 1), not {beta}")
    if cfg.optim.eps <= 0:
        fail("optim.eps", f"must be positive, not {cfg.optim.eps}", "1e-8 is usual")
    if not 1 <= cfg.data.bucket_max_ratio <= 10:
        fail("data.bucket_max_ratio", f"must be between 1 and 10, not {cfg.data.bucket_max_ratio}",
             "2.0 is usual; photos beyond 10:1 are refused anyway")
    check_objective(cfg.objective, fail)
    if cfg.prior.guidance_scale < 0 or cfg.sample.guidance_scale < 0:
        fail("prior.guidance_scale" if cfg.prior.guidance_scale < 0 else "sample.guidance_scale",
             "must not be negative", "7.5 is usual")
    ext = cfg.data.caption_ext
    if not ext.startswith(".") or len(ext) < 2 or "/" in ext:
        fail("data.caption_ext", f"must be a file extension such as .txt or .caption, not {shown(ext)}")
    if ext.lower() in IMAGE_SUFFIXES:
        fail("data.caption_ext", f"is {ext}, an image extension: every photo would be read as a caption",
             "use .txt or .caption")


def check_objective(objective: ObjectiveConfig, fail) -> None:
    """The loss and timestep options: a non-positive c divides by zero, a schedule above 1 would
    grow c with the noise, and a shift below 1 or a spread of 0 is no distribution these mean."""
    if objective.huber_c <= 0:
        fail("objective.huber_c", f"must be positive, not {objective.huber_c}", "0.1 is usual")
    if objective.huber_schedule != "constant" and objective.huber_c > 1:
        fail("objective.huber_c", f"is {objective.huber_c}; with huber_schedule={objective.huber_schedule} c_t runs "
             "from 1 down to c, so c must be at most 1", "use 0.1, or objective.huber_schedule=constant")
    if objective.logit_std <= 0:
        fail("objective.logit_std", f"must be positive, not {objective.logit_std}", "1.0 is usual")
    if objective.timestep_shift < 1:
        fail("objective.timestep_shift", f"must be at least 1, not {objective.timestep_shift} (1 is uniform; above "
             "1 trains noisier timesteps more often)", "3 is SD3's value")


def check_masks(cfg: Config, fail) -> None:
    """The masked loss: fractions in 0…1, and its knobs only with masks to act on."""
    for key, value in (("objective.unmasked_weight", cfg.objective.unmasked_weight),
                       ("data.mask_dropout", cfg.data.mask_dropout)):
        if not 0 <= value <= 1:
            fail(key, f"must be between 0 and 1, not {value}")
        if value and cfg.data.masks == "none":
            fail(key, f"is {value:g}, which does nothing while data.masks=none",
                 "set data.masks=files (photo.mask.png beside each photo) or data.masks=alpha, or leave it at 0")


def check_log_targets(cfg: Config, fail) -> None:
    """log.to names known trackers (whether their packages are installed is checked when training starts)."""
    for target in cfg.log.to:
        if target not in LOG_TARGETS:
            fail("log.to", f"has {target!r}; it must list tensorboard and/or wandb", "e.g. log.to=tensorboard")


def check_optimizer(optim: OptimConfig, fail) -> None:
    if optim.loraplus_ratio < 0:
        fail("optim.loraplus_ratio", f"must not be negative, not {optim.loraplus_ratio}", "16 is typical; 0 is off")
    if optim.optimizer == "prodigy":
        if optim.lr < 0.1:  # an Adam-sized lr would make Prodigy's steps ~10,000× too small
            fail("optim.lr", f"is {optim.lr:g} with optimizer=prodigy, where lr multiplies Prodigy's own step-size "
                 "estimate", "set optim.lr=1.0")
        if optim.prodigy_d_coef <= 0:
            fail("optim.prodigy_d_coef", f"must be positive, not {optim.prodigy_d_coef}", "1.0 is the default")


def trigger_pattern(word: str) -> re.Pattern:
    """The trigger as a whole word ("sks" in "sks," or "(sks)", not in "sksx")."""
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)")


def check_extras(cfg: Config, fail) -> None:
    """EMA, caption dropout and pivotal tuning (issue #11)."""
    if not 0 <= cfg.train.ema < 1:
        fail("train.ema", f"must be in [0, 1), not {cfg.train.ema}", "0.999 is usual; 0 is off")
    if not 0 <= cfg.data.caption_dropout < 1:
        fail("data.caption_dropout", f"must be in [0, 1), not {cfg.data.caption_dropout}", "0.1 is usual; 0 is off")
    pivotal = cfg.pivotal
    if not pivotal.enabled:
        return
    if cfg.launch.processes > 1:
        fail("pivotal.enabled", f"is not supported with launch.processes={cfg.launch.processes} yet",
             "train pivotal runs in one process")
    if pivotal.tokens < 1:
        fail("pivotal.tokens", f"must be positive, not {pivotal.tokens}", "2 is usual")
    if not pivotal.trigger.strip() or len(pivotal.trigger.split()) != 1:
        fail("pivotal.trigger", f"must be one word, not {pivotal.trigger!r}", "e.g. pivotal.trigger=sks")
    if not trigger_pattern(pivotal.trigger).search(cfg.data.instance_prompt):
        fail("pivotal.trigger", f"{pivotal.trigger!r} is not a word of data.instance_prompt "
             f"{cfg.data.instance_prompt!r}", "name the rare word of the instance prompt, e.g. pivotal.trigger=sks")
    if pivotal.init == "word" and not (pivotal.init_word.strip() or cfg.prior.class_prompt.strip()):
        fail("pivotal.init_word", "is empty and there is no prior.class_prompt to take the class word from",
             "set pivotal.init_word=dog, or pivotal.init=random")
    if pivotal.lr is not None and pivotal.lr <= 0:
        fail("pivotal.lr", f"must be positive, not {pivotal.lr}")


def offload_amount(text: str) -> int | float | str:
    """train.offload_blocks → a count of blocks (int), a fraction of them (float in (0, 1)), or
    "all" / "auto". ValueError for anything else."""
    cleaned = str(text).strip().lower()
    if cleaned in ("all", "auto"):
        return cleaned
    if cleaned.isdigit():
        return int(cleaned)
    fraction = float(cleaned)  # ValueError for words
    if not 0 < fraction < 1:
        raise ValueError(cleaned)
    return fraction


def check_savers(cfg, fail) -> None:
    """The memory savers of issue #32: quantized frozen weights and block offload."""
    stored = cfg.train.stored_weights
    if cfg.train.fp8_base and cfg.train.base_weights not in ("compute", "fp8"):
        fail("train.fp8_base", f"is true while train.base_weights={cfg.train.base_weights}; fp8_base=true means "
             "base_weights=fp8", "drop train.fp8_base and keep train.base_weights")
    if stored in ("int8", "nf4") and cfg.train.mixed_precision == "no":
        fail("train.base_weights", f"is {stored} with train.mixed_precision=no; the quantized layers compute in "
             "fp16 or bf16", "set train.mixed_precision=bf16 (or fp16 on CUDA)")
    if stored in ("int8", "nf4") and cfg.lora.type == "dora":
        fail("train.base_weights", f"is {stored} with lora.type=dora; DoRA's norm reads the base weight, which "
             "a quantized layer does not hold", "use lora.type=lora, or train.base_weights=compute or fp8")
    if cfg.train.host_memory.strip() and not re.fullmatch(r"\s*\d+(\.\d+)?\s*([gm](i?b)?)?\s*",
                                                          cfg.train.host_memory.lower()):
        fail("train.host_memory", f"is {cfg.train.host_memory!r}, not a memory size", "write it like 32GiB or 64")
    try:
        amount = offload_amount(cfg.train.offload_blocks)
    except ValueError:
        fail("train.offload_blocks", f"is {cfg.train.offload_blocks!r}; it takes a count of blocks (8), a fraction "
             "of them (0.5), all or auto", "e.g. train.offload_blocks=0.5, or 0 to keep every block on the GPU")
        return
    if amount and stored in ("int8", "nf4"):
        fail("train.offload_blocks", f"is on with train.base_weights={stored}; bitsandbytes keeps the quantization "
             "state on the layer, where block offload does not move it", "use train.base_weights=fp8 with "
             f"offload, or {stored} alone")


def check_sharding(cfg, fail) -> None:
    """launch.sharding=fsdp: only the combinations a two-process CPU test trains (tests/test_sharding.py).
    The number of processes is checked once they have met (training/sharding.py): a launcher may set it."""
    if cfg.launch.sharding == "none":
        return
    why = "launch.sharding=fsdp"
    if cfg.train.stored_weights != "compute":
        fail("train.base_weights", f"is {cfg.train.stored_weights} with {why}; quantized frozen weights are not "
             "sharded by lora-booth yet", "use train.base_weights=compute with sharding, or one process")
    if offload_amount(cfg.train.offload_blocks):
        fail("train.offload_blocks", f"is {cfg.train.offload_blocks} with {why}; block offload runs in one process",
             "set train.offload_blocks=0")
    if cfg.lora.text_encoder or cfg.pivotal.enabled:
        fail("lora.text_encoder" if cfg.lora.text_encoder else "pivotal.enabled", f"is on with {why}; only the "
             "denoiser's adapters train in a sharded run", "train the denoiser's adapters alone, or launch.sharding=none")
    if cfg.sample.num:
        fail("sample.num", f"is {cfg.sample.num} with {why}; a sample grid is drawn by the main process alone, "
             "which cannot run a denoiser whose weights the other processes hold", "set sample.num=0 and draw "
             "samples from the saved adapter afterwards")
