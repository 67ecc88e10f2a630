"""Typed configuration: one dataclass per section. The docstring under each field is its `--help`
text (keys.py reads it). Defaults live only here; loading.py layers presets, files and `key=value`
on top of them, checks.py validates the result.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class ModelConfig:
    """The frozen base model the adapters are trained on."""

    source: str = ""
    """The base model, required: a hub id (stable-diffusion-v1-5/stable-diffusion-v1-5, read from the local hub cache when offline), a diffusers folder, a single-file .safetensors checkpoint, "toyworld" (the small pretrained demo pipeline shipped with lora-booth), or "tiny"/"tiny-sdxl"/"tiny-flux" (random weights, for tests)."""
    revision: str = ""
    """Hub revision (branch, tag or commit) when source is a hub id; empty for the default branch."""
    variant: str = ""
    """Weight variant to load from a diffusers folder or hub id, e.g. "fp16"; empty for the default files."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the UNet predicts. "auto" reads the scheduler config; set v_prediction for SD 2.x 768 single-file checkpoints, whose files do not say."""
    single_file_config: str = ""
    """For a single-file checkpoint: a diffusers folder or hub id whose configs describe it. Empty: the official repo of the detected family (needs it in the hub cache when offline)."""
    allow_pickle: bool = False
    """Allow loading .bin/.ckpt weights, which can run arbitrary code when unpickled. Only for files you trust."""


@dataclass
class LoraConfig:
    """The low-rank adapters (Hu et al. 2021): the only trained tensors."""

    type: Literal["lora", "dora", "loha", "lokr"] = "lora"
    """Adapter kind, all through peft: lora (B·A), dora (LoRA + a trained magnitude per output row), loha (Hadamard product of two low-rank pairs), lokr (Kronecker product). docs/adapter-types.md has their cost and which tools load each."""
    rank: int = 16
    """Rank r of each adapter. Higher learns more detail and makes bigger files; 4-32 is usual for one subject."""
    alpha: Optional[float] = None
    """Scale numerator: the update is (alpha / rank) · B·A. Empty means alpha = rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules that get adapters (comma-separated names of attention projections)."""
    text_encoder: bool = False
    """Also train adapters on the text encoder's attention (q/k/v/out_proj). Learns the trigger word better; disables cached prompt embeddings."""
    text_encoder_rank: Optional[int] = None
    """Rank of the text-encoder adapters. Empty: the same as rank."""


# the photos data.instance_dir and prior.class_dir may hold: what the data layer decodes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class DataConfig:
    """Instance photos of the subject and how they become training rows."""

    instance_dir: str = ""
    """Folder of photos of the subject (jpg, jpeg, png, webp, bmp), with optional caption files beside them (photo.txt or photo.caption); kohya's N_name/ subfolders repeat their photos N times. "builtin:dog" is the sample set shipped with lora-booth."""
    instance_prompt: str = ""
    """Prompt with the rare trigger token for the subject, e.g. "a photo of sks dog". A caption file beside an image replaces it for that image."""
    caption_ext: str = ".txt"
    """Extension of the optional caption file next to each image (photo.jpg → photo.txt)."""
    resolution: Optional[int] = None
    """Training size in pixels: the short side is resized to this, then cropped square. A multiple of 8 (of the VAE's downsampling factor). Empty: the base model's own (toy world 32, SD 1.5 512, SD 2.x-v 768, SDXL and FLUX.1 1024); a size far from it is warned about."""
    crop: Literal["center", "random"] = "center"
    """How the square is cut from the resized image. random augments, but cannot be combined with cached latents."""
    flip: bool = False
    """Random horizontal flips (probability 0.5). Off for subjects that are not mirror-symmetric (text, logos)."""
    repeats: int = 1
    """How many times each instance photo appears per epoch."""
    cache_latents: bool = True
    """Encode every image with the VAE once, then free the VAE from the accelerator. Faster and smaller; fixes the crop."""
    buckets: bool = False
    """Aspect-ratio buckets: each photo goes to the size of about resolution² pixels (sides multiples of bucket_step) nearest its aspect ratio, instead of a square crop; batches are drawn within one bucket. Keeps the whole subject in portrait and landscape photos."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (64 for SD: the UNet halves latents three times, and the VAE downsamples by 8)."""
    bucket_max_ratio: float = 2.0
    """Longest/shortest side limit of a bucket; photos more extreme than this are cropped to it."""
    caption_dropout: float = 0.0
    """Probability that an instance row is trained with the empty prompt instead of its caption (class rows never), so the subject also appears unprompted and guidance has an unconditional target. 0.1 is usual; 0 turns it off."""
    masks: Literal["none", "files", "alpha"] = "none"
    """Masked loss: weight each instance photo's loss, pixel by pixel, by a mask (white = the subject, weight 1; black = background, weight objective.unmasked_weight). files: a grayscale photo.mask.png beside each photo.jpg, of the photo's size (never read as a photo itself); alpha: the photo's own alpha channel (opaque = subject). The mask is resized, cropped, flipped and bucketed exactly as its photo, then averaged down to the latent grid; class rows are never masked. none: every pixel counts alike."""
    mask_dropout: float = 0.0
    """With data.masks: probability that an instance row ignores its mask for a step (every pixel weight 1), drawn from the row's own random stream, so the background is still learnt now and then. 0 turns it off."""


@dataclass
class PriorConfig:
    """Class-prior preservation: the λ-weighted second term of the DreamBooth loss."""

    class_prompt: str = ""
    """Prompt for the class images, e.g. "a photo of dog". Required when weight > 0."""
    class_dir: str = ""
    """Folder of class images. Missing ones are generated by the frozen base model. Empty: a cache folder keyed by model, prompt, size, sampler and seed."""
    weight: float = 1.0
    """λ. 0 trains on the instance photos alone: faster, and the class drifts more."""
    mode: Literal["images", "prediction"] = "images"
    """Where the class rows and their target come from. images (the paper's): class images drawn by the frozen base model, noised, with the noise (ε or v) as target. prediction (OneTrainer's prior prediction, ai-toolkit's differential output preservation): each instance row's noisy latent once more with the class prompt, the target being the frozen base model's own prediction there (adapters off, no gradients). No class images are drawn or read (class_dir, num_class_images and the sampler keys are ignored); one extra UNet forward without gradients per step."""
    num_class_images: int = 100
    """How many class images to use; missing ones are generated. 100-200 is the usual choice for a LoRA."""
    sample_steps: int = 25
    """Sampler steps per generated class image (DPM-Solver++; FLUX.1: its flow-matching Euler sampler). Unset: the family's: 25 for SD 1.x/2.x/SDXL, 28 for FLUX.1-dev, 4 for FLUX.1-schnell."""
    guidance_scale: float = 7.5
    """Guidance scale for generated class images. Unset: the family's: 7.5 (classifier-free) for SD 1.x/2.x/SDXL, 3.5 for FLUX.1-dev (the distilled guidance its transformer takes as an input), 0 for FLUX.1-schnell (no guidance input)."""
    sample_batch_size: int = 4
    """Class images generated per batch."""

    @property
    def by_prediction(self) -> bool:
        """Prior preservation is on, with the base model's predictions as the class target."""
        return self.weight > 0 and self.mode == "prediction"


@dataclass
class ObjectiveConfig:
    """The denoising objective each row is trained with."""

    min_snr_gamma: float = 0.0
    """Min-SNR-γ loss weighting (Hang et al. 2023); 5 is the paper's value. 0 turns it off."""
    noise_offset: float = 0.0
    """Offset noise strength (0.05-0.1 helps very dark or bright images). 0 turns it off."""
    loss: Literal["mse", "huber", "smooth_l1"] = "mse"
    """Per-element loss of the residual r = ŷ − y: mse (r²), huber (pseudo-Huber 2c(√(r² + c²) − c): r² for residuals well below c, 2c|r| for large ones, so an odd photo pulls less) or smooth_l1 (the same divided by c). c follows huber_schedule (Khrapov et al. 2024, as sd-scripts and diffusers' scripts use it)."""
    huber_c: float = 0.1
    """c of loss=huber/smooth_l1. With huber_schedule=exponential or snr it is the value at the noisiest timesteps (c_t starts at or near 1 at the least noisy) and must be in (0, 1]."""
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    """How c depends on the timestep t (T: the scheduler's training timesteps, 1000 for SD): constant (c), exponential (c_t = exp(−t·ln(1/c)/T) = c^(t/T)) or snr (c_t = (1 − c)/(1 + σ_t)² + c with σ_t = √((1 − ᾱ_t)/ᾱ_t)), sd-scripts' formulas and default."""
    timesteps: Literal["auto", "uniform", "logit_normal", "shifted"] = "auto"
    """Distribution of the training timestep t in 0…T−1 (FLUX.1: of the noise level σ in 0…1): uniform, logit_normal (t = ⌊sigmoid(N(logit_mean, logit_std))·T⌋: the middle timesteps more often, Esser et al. 2024) or shifted (u uniform, t = ⌊T·shift·u/(1 + (shift − 1)·u)⌋: more noise for timestep_shift > 1, SD3's time shift). auto: the family's own: uniform for SD 1.x/2.x/SDXL; for FLUX.1 logit_normal shifted by the image size as FLUX.1-dev samples (about 3.2 at 1024 px)."""
    logit_mean: float = 0.0
    """Mean m of the normal draw of timesteps=logit_normal; m > 0 trains noisier timesteps more often."""
    logit_std: float = 1.0
    """Standard deviation s of the normal draw of timesteps=logit_normal (positive); smaller concentrates t around sigmoid(m)·T."""
    timestep_shift: float = 3.0
    """shift of timesteps=shifted, at least 1 (1: uniform). 3 is SD3's value: the median t moves from T/2 to 3T/4."""
    unmasked_weight: float = 0.0
    """With data.masks: the loss weight of the background, 0…1. Each element of an instance row is weighted mask + unmasked_weight·(1 − mask), and the row's loss is the weighted sum over the weights' sum, so its scale does not depend on the subject's area. 0 trains on the subject alone; 1 is the unmasked loss."""
    guidance: float = 1.0
    """The guidance value a guidance-distilled transformer (FLUX.1-dev) is given while training, as sd-scripts and ai-toolkit train it (1). Sampling uses sample.guidance_scale. Ignored by models without a guidance input."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    """adamw (torch; fp32 state, 2 copies of the adapters), adamw8bit (bitsandbytes; 75 % less optimizer memory), prodigy (prodigyopt; estimates its own step size: set lr=1.0; 4 copies of the adapters), or adafactor (transformers; factored second moments, almost no state; used with relative_step=False, so lr and the schedule below apply as usual)."""
    lr: float = 1e-4
    """Peak learning rate of the UNet adapters. With optimizer=prodigy it is a multiplier on Prodigy's estimated step size: use 1.0 (0.5 to damp, 2 to push)."""
    text_encoder_lr: Optional[float] = None
    """Learning rate of the text-encoder adapters. Empty: the same as lr."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """Adam β1."""
    beta2: float = 0.999
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate curve after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    max_grad_norm: float = 1.0
    """Clip the adapters' gradient norm to this. 0 turns clipping off."""
    scale_lr: bool = False
    """Multiply the learning rates by the effective batch (batch × accumulation × processes). Off: the rates are used as given, whatever the number of GPUs."""
    loraplus_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): the lora_B (up) matrices learn at lr × this ratio, the lora_A matrices at lr. 16 is the paper's typical value; 0 turns it off. Not with prodigy (one step size for all)."""
    prodigy_d_coef: float = 1.0
    """Prodigy only: scales its estimated step size d (below 1 for a gentler run, e.g. 0.5)."""
    prodigy_safeguard_warmup: bool = True
    """Prodigy only: keep the learning-rate warmup out of the step-size estimate, which it would otherwise overestimate (Prodigy's README recommends it for diffusion models)."""
    prodigy_use_bias_correction: bool = True
    """Prodigy only: Adam-style bias correction of the estimate (recommended for diffusion models by Prodigy's README)."""


@dataclass
class TrainConfig:
    """The loop: steps, batch, precision, memory savers, reproducibility."""

    max_steps: int = 800
    """Optimizer steps to train."""
    batch_size: int = 1
    """Instance images per micro-batch; with prior preservation as many class images ride along."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Precision of the frozen weights and activations; adapters stay fp32. fp16 needs CUDA; bf16 needs an Ampere+ GPU or a CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory for about a third more compute."""
    fp8_base: bool = False
    """Store the frozen UNet weights in float8 (e4m3) and upcast each layer to the training precision just before it runs: half the UNet weight memory of fp16, at a small cost in quality and speed. Class images are drawn before, at full precision; sample grids with the fp8 weights. Needs mixed_precision fp16/bf16 and gradient checkpointing (without it every upcast copy is kept for the backward pass). The older spelling of train.base_weights=fp8."""
    base_weights: Literal["compute", "fp8", "int8", "nf4"] = "compute"
    """How the frozen denoiser's linear layers are stored. compute: in the training precision (train.mixed_precision). fp8: float8 e4m3, upcast layer by layer (what train.fp8_base=true means). int8: LLM.int8 (bitsandbytes; weights and, per row, activations in int8, outliers above 6 in 16 bit): about half the weight memory of bf16. nf4: 4-bit NormalFloat in blocks of 64 (bitsandbytes, QLoRA): about a quarter. The adapters train in the compute precision over them and load on the unquantized base. Class images are drawn before, at full precision. Needs mixed_precision fp16/bf16 (fp8 also gradient checkpointing); int8 and nf4 not with lora.type=dora (its norm reads the base weight). docs/memory.md gives the measured quality cost."""
    offload_blocks: str = "0"
    """Block offload: how many of the denoiser's frozen blocks live in host memory (pinned on CUDA) and are copied to the accelerator just ahead of use, in the forward pass and in gradient checkpointing's recomputation, then dropped; the adapters stay on the accelerator. A count (8), a fraction of the blocks (0.5), all, or auto (the fewest that make the memory plan fit train.gpu_memory). 0: off. The same numbers as without it, for more time per step. One process only; with base_weights compute or fp8."""
    host_memory: str = ""
    """Host RAM to plan for (e.g. 32GiB): `train` refuses a run whose planned host-RAM peak does not fit (train.force=true skips the check). Empty: the RAM available now (MemAvailable)."""
    split_prior: bool = False
    """With prior preservation, run the instance rows and the class rows through the UNet as two passes, each back-propagated before the next: about half the activation memory of one 2×batch pass, the same gradient, a little slower."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel: PyTorch SDPA (everywhere) or xformers (CUDA, when installed)."""
    cache_text_embeddings: bool = True
    """Encode each prompt once and free the text encoder from the accelerator (only while the text encoder is frozen)."""
    seed: int = 0
    """Seed of every random draw (data order, flips, noise, timesteps, class images)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train. auto: CUDA if available, else MPS, else CPU."""
    threads: int = 0
    """CPU threads torch uses. 0: one for model=toyworld and the tiny test models (their operations are too small to share out; one thread was faster even on an idle machine), torch's default for every other base, or OMP_NUM_THREADS when it is set. The start summary says which."""
    resume: str = ""
    """"latest" (the newest intact checkpoint in output_dir; a fresh start when there is none yet) or a checkpoint folder to continue from."""
    resume_changed_data: bool = False
    """Let resume continue although instance photos, captions or class images changed since the checkpoint (refused otherwise, with the changed files listed)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """What a NaN or infinite loss does: stop the run (the last checkpoint is kept), or skip that optimizer step.
    A skipped update (this, or an fp16 overflow the loss scaler caught) changes neither the adapters nor the EMA,
    does not count toward max_steps and leaves the learning-rate schedule where it was; the next batch is tried.
    50 skipped updates in a row stop the run."""
    log_every: int = 10
    """Print the losses every N steps."""
    gpu_memory: str = ""
    """GPU memory to plan for (e.g. 8GiB) in `lora-booth plan`, preset=auto and the check before training. Empty: the detected GPU's."""
    force: bool = False
    """Train even when the memory plan says the run will not fit the GPU."""
    ema: float = 0.0
    """Decay of an exponential moving average of the trained tensors (e.g. 0.999), saved as the final adapter instead of the last step's weights: smoother results, one extra fp32 copy of the adapters. 0 turns it off."""

    @property
    def stored_weights(self) -> str:
        """train.base_weights, with train.fp8_base=true read as its older spelling of fp8."""
        return "fp8" if self.fp8_base else self.base_weights


@dataclass
class PivotalConfig:
    """Pivotal tuning: new token embeddings for the trigger, trained by textual inversion alongside the LoRA."""

    enabled: bool = False
    """Replace the trigger word of the instance prompt and captions by new tokens <s0><s1>... in every tokenizer, and train their embedding rows (every other row stays bit-identical). Class prompts stay as they are; prompt embeddings are not cached (the text encoder's input trains). Saved as embeddings.safetensors next to the adapter; prompts must then contain the new tokens."""
    trigger: str = "sks"
    """The word of data.instance_prompt (and of the captions) that the new tokens replace, as a whole word: "a photo of sks dog" → "a photo of <s0><s1> dog"."""
    tokens: int = 2
    """How many new tokens (<s0>, <s1>, ...) replace the trigger. More tokens hold more detail and take more steps to learn."""
    init: Literal["word", "random"] = "word"
    """Starting value of the new rows: the mean embedding of init_word's tokens, or random with the per-dimension spread of the existing rows."""
    init_word: str = ""
    """Word whose embedding starts the new rows (init=word). Empty: the last word of prior.class_prompt ("a photo of dog" → "dog")."""
    lr: Optional[float] = None
    """Learning rate of the new embedding rows. Empty: the same as optim.lr. Textual inversion usually takes a higher rate than the LoRA (e.g. 1e-3 with lr=1e-4)."""


@dataclass
class SampleConfig:
    """Images drawn with the adapters in place during training, to judge likeness and drift."""

    num: int = 2
    """Images per prompt in each grid. 0 turns sampling off (and frees the VAE and text encoder after caching)."""
    every: int = 0
    """Draw a grid every N steps; 0: only at the end."""
    prompts: tuple = ()
    """Validation prompts (comma-separated). Empty: the instance prompt, the class prompt, and DreamBooth templates with the trigger ("a sks dog in the jungle", ...)."""
    steps: int = 25
    """Sampler steps (DPM-Solver++; FLUX.1: its flow-matching Euler sampler). Unset: the family's, as prior.sample_steps."""
    guidance_scale: float = 7.5
    """Guidance scale. Unset: the family's, as prior.guidance_scale (7.5 for SD, 3.5 for FLUX.1-dev, 0 for schnell)."""
    seed: int = 0
    """Seed of the first image of each row; the same seeds every time, so grids compare across steps."""


@dataclass
class ValidateConfig:
    """Validation loss: the loss on a fixed held-out set of noised rows, to see when training stops improving without drawing samples."""

    every: int = 0
    """Evaluate the validation loss every N steps (and at the last); 0 turns it off. Each held-out row is an instance photo (with prior preservation also a class row) with its own timestep and noise, drawn once from train.seed by streams training never uses, so evaluating changes no training number. Logged as val_instance_loss and val_prior_loss in metrics.jsonl and plotted in report.html."""
    rows: int = 4
    """Held-out rows of each kind: instance rows (the photos in turn) and, with prior preservation, as many class rows. More rows: a steadier curve, a slower evaluation."""


@dataclass
class SaveConfig:
    """Where results go and in what form."""

    output_dir: str = ""
    """Folder for the adapter, config.yaml and checkpoints."""
    overwrite: bool = False
    """Replace a finished run already in output_dir."""
    checkpoint_every: int = 250
    """Save a resumable checkpoint every N steps (0: only when the run is stopped with Ctrl-C or SIGTERM)."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Precision of the saved adapter weights. fp16 halves the file; fp32 reproduces training exactly."""
    formats: tuple = ("diffusers", "kohya")
    """Adapter files to write: diffusers (pytorch_lora_weights.safetensors, for diffusers pipelines) and kohya (<name>.safetensors, for AUTOMATIC1111, ComfyUI, Forge)."""
    name: str = ""
    """File name (without .safetensors) of the kohya adapter, shown in A1111 as <lora:name:1>. Empty: the output folder's name."""


@dataclass
class LogConfig:
    """Where the training curves go. output_dir/metrics.jsonl (one JSON line per step) is always written."""

    to: tuple = ()
    """Also log to: tensorboard (scalars and sample grids under log.dir; pip install tensorboard) and/or wandb (pip install wandb). Comma-separated; empty: metrics.jsonl only."""
    dir: str = ""
    """TensorBoard event folder. Empty: output_dir/logs (view with `tensorboard --logdir out/logs`)."""
    project: str = "lora-booth"
    """wandb project name (log.to=wandb)."""


LOG_TARGETS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # log.to value → the module it needs


@dataclass
class LaunchConfig:
    """Data-parallel training through Hugging Face accelerate."""

    processes: int = 1
    """Processes on this machine (one per GPU). Above 1, lora-booth re-launches itself with `accelerate launch`. For several machines, run `accelerate launch ... -m lora_booth train` yourself."""

    sharding: Literal["none", "fsdp"] = "none"
    """none: every process holds the whole frozen denoiser (data-parallel, DDP). fsdp: FSDP2 through accelerate shards the frozen denoiser's weights across the processes, each block gathered only while it runs, so each GPU holds about 1/processes of them; the adapters stay whole in every process and their gradients are averaged. Needs 2 or more processes; not with quantized or offloaded base weights, text-encoder adapters or sample grids during training (sample.num=0)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pivotal: PivotalConfig = field(default_factory=PivotalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}


SECTIONS: dict[str, type] = typing.get_type_hints(Config)

# Short names for the keys people type most; these are also the names the benchmark harness uses.
ALIASES: dict[str, str] = {
    "model": "model.source",
    "instance_dir": "data.instance_dir",
    "instance_prompt": "data.instance_prompt",
    "class_dir": "prior.class_dir",
    "class_prompt": "prior.class_prompt",
    "output_dir": "save.output_dir",
    "overwrite": "save.overwrite",
    "resolution": "data.resolution",
    "max_steps": "train.max_steps",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "seed": "train.seed",
    "resume": "train.resume",
    "lr": "optim.lr",
    "prior_weight": "prior.weight",
    "num_class_images": "prior.num_class_images",
    "pivotal": "pivotal.enabled",
}
# Keys that choose layers rather than set values.
LAYER_KEYS = ("preset", "config", "dataset")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value

