"""Typed, validated configuration: one dataclass per section, layered
defaults ← preset ← user YAML (`config=`) ← `key=value` overrides.

The docstring under each field is its `--help` text. Defaults live only here.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import stat
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from . import kohya_data
from .errors import ConfigError, ConfigErrors
from .machine import available_memory


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
    """Store the frozen UNet weights in float8 (e4m3) and upcast each layer to the training precision just before it runs: half the UNet weight memory of fp16, at a small cost in quality and speed. Class images are drawn before, at full precision; sample grids with the fp8 weights. Needs mixed_precision fp16/bf16 and gradient checkpointing (without it every upcast copy is kept for the backward pass)."""
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
    """CPU threads torch uses. 0: chosen by the work: one for small models (the toy world, the tiny test models: their operations are too small to share out, and one thread was faster even on an idle machine), torch's default for large ones, or OMP_NUM_THREADS when it is set. The start summary says which."""
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


@lru_cache(maxsize=None)
def field_docs(section: type) -> dict[str, str]:
    """The docstring under each field (PEP 257 attribute docstrings), read from the source."""
    tree = ast.parse(inspect.getsource(section))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def all_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field_type(key: str) -> Any:
    section, name = key.split(".", 1)
    return typing.get_type_hints(SECTIONS[section])[name]


def _suggest(key: str) -> str:
    candidates = all_keys() + list(ALIASES) + list(LAYER_KEYS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # "rnak" should still find "lora.rank"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[near[0]]] if near else []
    if close:
        return f"did you mean '{close[0]}'?"
    return "run `lora-booth train --help` for the list of keys"


def canonical_key(key: str, source: str) -> str:
    key = key.strip().replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key in all_keys():
        return key
    raise ConfigError(key, "is not a known key", _suggest(key), source)


def shown(value: Any, limit: int = 120) -> str:
    """A value as an error message may print it: its repr, cut short (a YAML alias can expand to
    gigabytes, and printing it was the expensive part)."""
    text = repr(value) if not isinstance(value, (dict, list, tuple)) else f"a {type(value).__name__} of {len(value)} items"
    return text if len(text) <= limit else text[:limit] + "…"


def coerce(key: str, value: Any, source: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or fail naming the key."""
    kind = _field_type(key)
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in choices:
            near = difflib.get_close_matches(str(text), [str(c) for c in choices], n=1)
            hint = f"did you mean '{near[0]}'?" if near else ""
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, not {shown(value)}", hint, source)
        return text
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(key, f"must be true or false, not {shown(value)}", "", source)
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, not {shown(value)}", "", source)
        try:
            number = kind(value) if kind is float else int(str(value).strip(), 10) if isinstance(value, str) else value
            if kind is int and isinstance(number, float):
                if not number.is_integer():
                    raise ValueError
                number = int(number)
            number = kind(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(key, f"must be {'an integer' if kind is int else 'a number'}, not {shown(value)}",
                              "", source) from None
        if kind is float and not math.isfinite(number):  # nan passes every comparison a range check makes
            raise ConfigError(key, f"must be a finite number, not {shown(value)}", "", source)
        return number
    if kind is tuple:
        items = value if isinstance(value, (list, tuple)) else list_items(key, str(value), source)
        if any(isinstance(item, (dict, list, tuple)) for item in items):
            raise ConfigError(key, f"must be a list of words or texts, not {shown(value)}", "", source)
        return tuple(str(item).strip() for item in items if item is not None and str(item).strip())
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"must be a text value, not {shown(value)}", "", source)
        return "" if value is None else str(value)
    raise TypeError(f"no coercion for {kind} ({key})")


def _flatten(data: dict, source: str, problems: list[ConfigError] | None = None) -> dict[str, Any]:
    """A YAML mapping with sections (`lora: {rank: 8}`), dotted keys or aliases → {canonical key: value}.
    With `problems`, an unknown key is added there and the rest of the file still read."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        try:
            if key in SECTIONS and isinstance(value, dict):
                for inner, inner_value in value.items():
                    try:
                        flat[canonical_key(f"{key}.{inner}", source)] = inner_value
                    except ConfigError as problem:
                        if problems is None:
                            raise
                        problems.append(problem)
            elif key in LAYER_KEYS:
                raise ConfigError(key, "cannot be set inside a config file", "pass it on the command line", source)
            else:
                flat[canonical_key(key, source)] = value
        except ConfigError as problem:
            if problems is None:
                raise
            problems.append(problem)
    return flat


def presets_dir() -> Path:
    # presets/ lives at the top of the repository; a wheel installs it as lora_booth/presets
    installed = Path(__file__).parent / "presets"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


MAX_CONFIG_BYTES = 1 * 2**20
MAX_YAML_NODES = 100_000  # what the file means once every alias is expanded: a few hundred for real configs


def _expanded_size(root) -> int:
    """Values in the YAML document with every alias expanded, computed on the shared node graph
    (aliases are references there), so a 'billion laughs' file is measured, never expanded."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that contains itself counts once
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        else:
            total = 1
        sizes[id(node)] = min(total, 10 * MAX_YAML_NODES)
        return sizes[id(node)]
    return 0 if root is None else size(root)


def _read_yaml(path: Path, what: str) -> dict:
    """A config file is untrusted input: a regular file, at most 1 MiB, few aliases, safe YAML."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(what, f"{path} is not a regular file (a pipe, device or folder)", "pass a .yaml file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(what, f"{path} is {info.st_size:,} bytes; a config file is at most "
                              f"{MAX_CONFIG_BYTES:,}", "pass the YAML file of your settings")
        text = path.read_text(encoding="utf-8")
        expanded = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if expanded > MAX_YAML_NODES:
            raise ConfigError(what, f"{path} expands to {expanded:,} YAML values through its aliases (at most "
                              f"{MAX_YAML_NODES:,})", "write the values out instead of nesting anchors")
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(what, f"{path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(what, f"{path} nests deeper than any config", "flatten it") from None
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror}", "check the path") from None
    except yaml.YAMLError as exc:
        raise ConfigError(what, f"{path} is not valid YAML: {exc}", "fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(what, f"{path} must hold a mapping of keys to values", "")
    return data


PRESET_ALIASES = {"tiny": "demo"}   # the demo's name before it had its own
# what a demo preset brings along besides settings: its subject and its base. Your own photos
# (instance_dir from a config file or the command line) drop all of them, so no toy star ends up
# in your prompts, samples or model card, and you name your base model yourself.
DEMO_SUBJECT_KEYS = ("model.source", "data.instance_dir", "data.instance_prompt", "prior.class_prompt",
                     "sample.prompts")
MODEL_EXAMPLES = ("e.g. model=stable-diffusion-v1-5/stable-diffusion-v1-5 (a hub id), model=/models/sd15 (a diffusers "
                  "folder), model=/models/v1-5-pruned.safetensors (a single file), or model=toyworld with "
                  "preset=demo for the CPU demo")


def read_preset(name: str) -> dict[str, Any]:
    name = PRESET_ALIASES.get(name, name)
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        near = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"choose one of {', '.join(preset_names())}"
        raise ConfigError("preset", f"names no preset called {name!r}", hint)
    return _flatten(_read_yaml(path, "preset"), f"preset {name}")


def list_items(key: str, text: str, source: str = "") -> list:
    """A list value from the command line: `a,b` or the list syntax `[a, b]` / `["a, with comma", "b"]`
    (YAML flow, which includes JSON); brackets are never taken as part of the first item."""
    stripped = text.strip()
    if not (stripped.startswith("[") or stripped.endswith("]")):
        return stripped.split(",")
    import yaml

    try:
        items = yaml.safe_load(stripped)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list):
        raise ConfigError(key, f"is {shown(text)}, which is not a list", 'write it as [a, b] or ["a, b", "c"] '
                          "(quote items that contain commas), or as a,b", source)
    return items


def resolve(args: dict[str, str] | list[tuple[str, str]], check_paths: bool = False) -> tuple[Config, dict[str, str]]:
    """Build the config from `key=value` pairs (in order). Returns it and where each non-default value came from.
    Every problem found is reported in one ConfigErrors; check_paths=True adds whether the photo folder
    exists (train's own check; `plan` and the planner's trials need no photos)."""
    pairs = list(args.items()) if isinstance(args, dict) else list(args)
    layers: list[tuple[str, dict[str, Any]]] = []
    overrides: dict[str, Any] = {}
    if any(key == "preset" and value == "auto" for key, value in pairs):
        pairs = [(k, v) for k, v in pairs if not (k == "preset" and v == "auto")]
        pairs.insert(0, ("preset", auto_preset(pairs)))
    presets = [value for key, value in pairs if key == "preset"]
    if len(presets) > 1:
        raise ConfigError("preset", f"is given {len(presets)} times ({', '.join(presets)})",
                          "name one preset; set other keys one by one on top of it")
    datasets = [value for key, value in pairs if key == "dataset"]
    if len(datasets) > 1:  # kohya's trainer reads one --dataset_config; a second would silently win
        raise ConfigError("dataset", f"is given {len(datasets)} times ({', '.join(map(shown, datasets))})",
                          "pass one kohya dataset .toml per run")
    problems: list[ConfigError] = []  # every one is reported, in one message
    for key, value in pairs:
        try:
            if key == "preset":
                layers.insert(0, (f"preset {value}", read_preset(value)))
            elif key == "config":
                path = Path(value).expanduser()
                layers.append((str(path), _flatten(_read_yaml(path, "config"), str(path), problems)))
            elif key == "dataset":  # a kohya dataset .toml
                path = Path(value).expanduser()
                layers.append((str(path), kohya_data.read_dataset_toml(path)))
            else:
                overrides[canonical_key(key, "the command line")] = value
        except ConfigError as problem:
            problems.append(problem)
    dropped: dict[str, str] = {}  # demo subject key → the preset that set it
    if any("data.instance_dir" in flat for source, flat in layers if not source.startswith("preset ")) or \
            "data.instance_dir" in overrides:
        dropped = {k: source for source, flat in layers if source.startswith("preset ") for k in flat
                   if k in DEMO_SUBJECT_KEYS and k != "data.instance_dir"}
        layers = [(source, {k: v for k, v in flat.items() if k not in DEMO_SUBJECT_KEYS})
                  if source.startswith("preset ") else (source, flat) for source, flat in layers]
    run_folder = _run_folder(overrides.get("train.resume", ""))
    if run_folder is not None:  # resume=out/: the run's own config.yaml, continued where it stands
        saved = _flatten(_read_yaml(run_folder / "config.yaml", "train.resume"), f"{run_folder / 'config.yaml'}")
        layers.insert(1 if presets else 0, (f"{run_folder / 'config.yaml'}", saved))
        overrides.update({"train.resume": "latest", "save.output_dir": str(run_folder)})
    layers.append(("the command line", overrides))
    values: dict[str, tuple[Any, str]] = {}
    for source, flat in layers:
        for key, value in flat.items():
            try:
                values[key] = (coerce(key, value, source), source)
            except ConfigError as problem:
                problems.append(problem)
    values.update(_prompts_from_folder_names(values))
    cfg = Config()
    for key, (value, _) in values.items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    sources = {key: source for key, (_, source) in values.items()}
    try:
        validate(cfg, sources, check_paths=check_paths)
    except ConfigErrors as found:  # a key already reported as wrong is not reported again as missing
        reported = {problem.key for problem in problems}
        problems += [problem for problem in found.problems if problem.key not in reported]
    if problems:
        raise ConfigErrors(problems, _dropped_note(dropped, {problem.key for problem in problems}))
    cfg.origins = sources  # family_defaults fills the family-dependent keys no layer set
    return cfg, sources


def _dropped_note(dropped: dict[str, str], wrong: set[str]) -> str:
    """Why a demo preset's subject keys are missing: your own photos leave its toy subject behind."""
    missing = [key for key in dropped if key in wrong]
    if not missing:
        return ""
    preset = dropped[missing[0]]
    return (f"Note: {preset} sets {', '.join(dropped)} for its own toy subject. With your own photos "
            f"(data.instance_dir) these are dropped, so the toy subject ends up in none of your prompts, samples "
            f"or model card: set {', '.join(missing)} for your subject (model=toyworld trains the demo's small "
            f"base on your photos).")


def _prompts_from_folder_names(values: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """kohya's layout names the prompt in the folder (`10_sks dog/`): with one such folder and no
    prompt given, that is the prompt, as in kohya."""
    found = {}
    for prompt_key, dir_key in (("data.instance_prompt", "data.instance_dir"), ("prior.class_prompt", "prior.class_dir")):
        folder = values.get(dir_key, ("", ""))[0]
        if folder and not values.get(prompt_key, ("", ""))[0] and isinstance(folder, str) \
                and not folder.startswith("builtin:"):
            named = kohya_data.repeat_folders(Path(folder).expanduser())
            if len(named) == 1:
                found[prompt_key] = (named[0][2], f"the folder name {named[0][0].name!r}")
    return found


def _run_folder(resume: Any) -> Path | None:
    """A run's output folder (it holds the config.yaml lora-booth wrote) rather than one checkpoint."""
    if not isinstance(resume, str) or resume.strip() in ("", "latest"):
        return None
    folder = Path(resume).expanduser()
    if (folder / "config.yaml").is_file() and not (folder / "state.json").is_file():
        return folder
    return None


def auto_preset(pairs: list[tuple[str, str]]) -> str:
    """preset=auto: the best-quality preset whose memory plan fits the GPU (given or detected)."""
    from . import plan

    budget = plan.gpu_budget(dict(pairs).get("train.gpu_memory", ""))
    if budget is None:
        raise ConfigError("preset", "is auto, but no CUDA GPU is detected",
                          "pass train.gpu_memory=8GiB to plan for a GPU, or name a preset")
    name = plan.choose_preset(pairs, budget)
    print(f"preset=auto → {name} (fits {budget / 2**30:.1f} GiB with 10 % headroom)")
    return name


def from_dict(data: dict) -> Config:
    """A saved config.yaml back into a Config (validated)."""
    cfg = Config()
    flat = _flatten(data, "saved config")
    for key, value in flat.items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, coerce(key, value, "saved config"))
    validate(cfg, {})
    cfg.origins = {key: "saved config" for key in flat}
    return cfg


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
    from .data import IMAGE_SUFFIXES  # the data module's list of what it decodes

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
