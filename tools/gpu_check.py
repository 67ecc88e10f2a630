"""One prepared GPU check (issue #20): every preset, precision path and memory plan measured on a
real card in one short run, through lora-booth's own training code (`recipe.run`, unchanged).

The full-size SD 1.5, SDXL and FLUX.1-dev architectures are built with seeded random weights
directly on the GPU from the configs lora-booth ships (lora_booth/configs), so no weights travel.
Each case trains a few steps with prior preservation on (the FLUX.1 presets': by prediction) and
records the peak of torch.cuda.max_memory_allocated() and max_memory_reserved() against the
planner's figure for the same config, steady seconds per step, achieved TFLOP/s against the card's
peak, every loss, and the loss scaler. The SD 1.5 512 px step is also timed with the diffusers
reference script (the benchmark harness in $BENCH, copied into .gpu-carry by tools/gpu_check.sh). gpu_check.json
and gpu_check.md are rewritten in --out after every case, so a run cut short still returns what
it measured.

  python3 tools/gpu_check.py --out "$OUT"                 # on the GPU machine: tools/README.md
  .venv/bin/python tools/gpu_check.py --dry-run --out /tmp/gpu-check   # same cases, CPU, tiny models

How it reaches into lora-booth (module attributes swapped for the length of one case, nothing edited):
  models.load_pipeline   a folder of configs without weights becomes a random pipeline on the device
  recipe.training_step   timed and measured around each call; an inf gradient injected on request
  prior.generate         class-image generation timed; sample.render: every VAE decode checked
  recipe.make_accelerator  --dry-run only: fp16 on the CPU through a CPU GradScaler (cpu_fp16_accelerator)
  report.write_report    a stub page: report.html's matplotlib curves cost 1.5 s a case and measure nothing
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from lora_booth.config import loading

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
SD15_PRESETS = ("24gb", "16gb", "12gb", "8gb", "6gb")
SDXL_PRESETS = ("sdxl-24gb", "sdxl-16gb", "sdxl-12gb", "sdxl-8gb")
FLUX_PRESETS = ("flux-24gb", "flux-16gb")
ZIMAGE_PRESETS = ("zimage-24gb", "zimage-16gb", "zimage-12gb")
# Qwen-Image at 1024 px: fp8 weights and 16, 36, 48 or all 60 blocks offloaded (GPU and host-RAM peaks vs plan)
QWEN_IMAGE_PRESETS = ("qwen-image-24gb", "qwen-image-16gb", "qwen-image-12gb", "qwen-image-8gb")
FLUX2_PRESETS = (("flux2-klein-24gb", "flux2-9b"), ("flux2-klein-16gb", "flux2"), ("flux2-klein-12gb", "flux2"))
# dense tensor-core peaks (H200.md: the H100's rates; 769–798 TFLOP/s measured for bf16 on random
# data, KINDS.md). Keyed by what the compute dtype runs on; fp32 without TF32 matmuls is plain FP32.
CARD_PEAKS = {"H200": {"fp16": 989e12, "bf16": 989e12, "no": 67e12},
              "H100": {"fp16": 989e12, "bf16": 989e12, "no": 67e12}}
NO_CUDA = "skipped: no CUDA"
PROMPTS = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}
CLASS_IMAGES = 4


@dataclass(frozen=True)
class Models:
    """What a case's family (Case.family) is built from, and what its cases may take."""
    configs: str        # lora_booth/configs/<configs>: the full-size architecture the GPU run builds
    tiny: str           # lora-booth's tiny model of the same shape: the dry run's configs
    share_s: int        # seconds one of its cases may take on the GPU (4× that in the dry run)
    photo_px: int       # the largest resolution its presets train at: the photos are made that size


FAMILIES = {"sd15": Models("sd15", "tiny", 60, 512), "sdxl": Models("sdxl", "tiny-sdxl", 90, 1024),
            # 11.9 B transformer, T5-XXL (4.76 B), CLIP-L and the 16-channel VAE, made in bf16
            "flux": Models("flux-dev", "tiny-flux", 90, 1024),
            "zimage": Models("zimage", "tiny-zimage", 90, 1024),  # 6.15 B transformer, Qwen3-4B, FLUX.1's VAE
            # 20.4 B transformer and Qwen2.5-VL 7B (8.3 B) made in bf16 (58 GiB), then the transformer in fp8
            "qwenimage": Models("qwen-image", "tiny-qwenimage", 150, 1024),
            # FLUX.2 klein base: 3.9 B / 9.1 B transformer, Qwen3-4B / -8B, the 32-channel batch-norm VAE
            "flux2": Models("flux2-klein-4b", "tiny-flux2", 60, 1024), "flux2-9b": Models("flux2-klein-9b", "tiny-flux2", 90, 1024)}


class CaseTimeout(BaseException):
    """A case ran past its time budget. BaseException, so no `except Exception` inside the
    recipe (its optional end-of-run extras) swallows it."""


@dataclass
class Case:
    name: str
    group: str                  # "preset" | "precision" | "reference"
    family: str                 # "sd15" | "sdxl" | "flux": a key of FAMILIES
    keys: dict                  # config keys on top of the common ones
    why: str = ""
    needs: tuple = ()           # "xformers"
    runner: str = "lora-booth"  # or "reference": the diffusers script
    overflow_at: int | None = None  # micro-step whose gradient is made inf (fp16 loss-scaler check)
    pair: str = ""              # reference pairs: the precision both sides train in


def variant(preset: str, family: str, key: str, value, why: str) -> Case:
    return Case(f"{preset} {key}={value}", "precision", family, {"preset": preset, key: value}, why)


def matched_keys(precision: str) -> dict:
    """lora-booth at the reference's settings (the benchmark harness's README, 'Settings both trainers
    must match'): 1 instance + 1 class row, rank 4 = alpha, AdamW, lr 1e-4 constant, clip 1.0, no
    savers, text encoder and VAE run every step (nothing cached)."""
    return {"lora.rank": 4, "lora.alpha": 4, "lora.text_encoder": "false", "train.batch_size": 1,
            "train.mixed_precision": precision, "train.gradient_checkpointing": "false",
            "train.cache_text_embeddings": "false", "data.cache_latents": "false", "optim.optimizer": "adamw",
            "optim.lr": 1e-4, "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.max_grad_norm": 1.0,
            "optim.weight_decay": 1e-2, "prior.weight": 1.0}


def all_cases() -> list[Case]:
    """In the order they run: what matters most first, so a run cut short still has it."""
    cases = [Case(name, "preset", "sd15", {"preset": name}, "as shipped, 512 px") for name in SD15_PRESETS]
    cases += [Case(name, "preset", "sdxl", {"preset": name}, "as shipped, 1024 px") for name in SDXL_PRESETS]
    cases += [Case(name, "preset", "flux", {"preset": name}, f"as shipped, {px} px, prior by prediction (no class "
                   "images)") for name, px in zip(FLUX_PRESETS, (1024, 512))]
    cases += [Case(name, "preset", "zimage", {"preset": name}, "as shipped, 1024 px, prior by prediction")
              for name in ZIMAGE_PRESETS]
    cases += [Case(name, "preset", "qwenimage", {"preset": name}, "as shipped, 1024 px, fp8 weights, blocks in "
                   "host RAM, prior by prediction") for name in QWEN_IMAGE_PRESETS]
    cases += [Case(name, "preset", family, {"preset": name}, "as shipped, 1024 px, prior by prediction")
              for name, family in FLUX2_PRESETS]
    cases += [Case("reference fp32", "reference", "sd15", {}, "diffusers train_dreambooth_lora.py", runner="reference",
                   pair="no"),
              Case("lora-booth fp32", "reference", "sd15", matched_keys("no"), "the reference's settings", pair="no")]
    cases += [
        Case("8gb fp16 overflow", "precision", "sd15", {"preset": "8gb"},
             "inf gradient in the second step: update skipped, scale halved", overflow_at=1),
        variant("24gb", "sd15", "train.mixed_precision", "bf16", "bf16 autocast, no loss scaler"),
        Case("8gb train.fp8_base=true", "precision", "sd15",
             {"preset": "8gb", "train.fp8_base": "true", "train.gradient_checkpointing": "true"},
             "UNet weights in fp8 (needs checkpointing): against the next case"),
        variant("sdxl-8gb", "sdxl", "train.fp8_base", "false", "sdxl-8gb with fp16 UNet weights"),
        variant("8gb", "sd15", "optim.optimizer", "adamw", "fp32 AdamW state instead of 8-bit"),
        dataclasses.replace(variant("8gb", "sd15", "train.attention", "xformers", "xformers attention"),
                            needs=("xformers",)),
        variant("8gb", "sd15", "train.gradient_checkpointing", "true", "checkpointing on"),
        variant("sdxl-12gb", "sdxl", "train.gradient_checkpointing", "false", "checkpointing off"),
        variant("8gb", "sd15", "train.split_prior", "true", "instance and class rows as two passes"),
        variant("sdxl-24gb", "sdxl", "train.split_prior", "false", "one pass of 4 rows"),
        # the big-base savers (issue #32): stored weights and block offload, against the plan
        variant("8gb", "sd15", "train.base_weights", "int8", "UNet linear layers in LLM.int8 (bitsandbytes)"),
        variant("8gb", "sd15", "train.base_weights", "nf4", "UNet linear layers in NF4 (bitsandbytes)"),
        variant("flux-16gb", "flux", "train.offload_blocks", "0.5", "half the transformer blocks in host RAM"),
    ]
    cases += [Case("reference fp16", "reference", "sd15", {}, "diffusers train_dreambooth_lora.py",
                   runner="reference", pair="fp16"),
              Case("lora-booth fp16", "reference", "sd15", matched_keys("fp16"), "the reference's settings",
                   pair="fp16")]
    return cases


@dataclass
class Context:
    """What every case shares: the device, sizes, folders, probes of optional packages, plans."""
    dry_run: bool
    work: Path
    out: Path
    carry: Path
    warmup: int
    timed: int
    device: str = "cpu"
    photos: Path | None = None
    capabilities: dict = field(default_factory=dict)   # name → "ok" or why not
    context_bytes: int = 0                             # CUDA context outside PyTorch's allocator
    plans: dict = field(default_factory=dict)          # case name → future or figures
    pool: object = None
    reference_model: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def resolution(self, family: str) -> int | None:
        return 32 if self.dry_run else None  # None: the preset's (512 px SD 1.5, 1024 px SDXL, FLUX.1 its own)

    def config_folder(self, family: str) -> Path:
        """Configs only, no weights: models.load_pipeline is answered by random_pipeline."""
        if not self.dry_run:
            return ROOT / "lora_booth" / "configs" / FAMILIES[family].configs
        return tiny_configs(self.work / "models", FAMILIES[family].tiny)


# ------------------------------------------------------------------------------------- models


def tiny_configs(folder: Path, name: str) -> Path:
    """The JSON files of a tiny model, without its weights: the dry run builds its models the way
    the GPU run builds the full-size ones."""
    from lora_booth.families.tiny import tiny_model_dir

    target = folder / f"{name}-configs"
    if not (target / "model_index.json").is_file():
        source = tiny_model_dir(name)
        for path in source.rglob("*.json"):
            if path.parent.name.startswith("tokenizer"):
                continue
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.relative_to(source))
    return target


def has_weights(folder: Path) -> bool:
    """Whether the denoiser's folder (unet/, FLUX.1's transformer/) holds weights: a saved model, not configs."""
    from lora_booth import families

    return any(any((folder / part).glob("*.safetensors")) for part in families.denoisers())


@contextlib.contextmanager
def default_dtype(dtype):
    """New parameters made in `dtype` (None: as they are), the previous default put back afterwards."""
    import torch

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_tokenizer(encoder_class: str):
    """A tokenizer that needs no files, with the real one's sequence length, so the same compute:
    lora-booth's byte-level CLIP tokenizer (77 tokens), or for T5 the tiny model's character
    vocabulary at FLUX.1-dev's 512 tokens (T5's own ids: padding 0, end of sequence 1)."""
    if encoder_class == "Qwen3Model":  # the tiny model's byte-level tokenizer and chat template, Z-Image's length
        from lora_booth.families.tiny_zimage import tiny_qwen3
        from lora_booth.families.zimage import TEXT_TOKENS

        tokenizer, _ = tiny_qwen3(8)
        tokenizer.model_max_length = TEXT_TOKENS
        return tokenizer
    if encoder_class == "Qwen2_5_VLForConditionalGeneration":  # byte-level Qwen2 tokens: ids inside any vocabulary
        from lora_booth.families.tiny_qwenimage import tiny_qwen_tokenizer

        return tiny_qwen_tokenizer()
    if encoder_class == "Qwen3ForCausalLM":  # FLUX.2 klein: the chat template padded to 512 tokens
        from lora_booth.families.flux2 import TEXT_TOKENS as QWEN_TOKENS
        from lora_booth.families.tiny_flux2 import qwen_tokenizer

        return qwen_tokenizer(QWEN_TOKENS)
    if encoder_class == "T5EncoderModel":
        from lora_booth.families.flux import TEXT_TOKENS
        from lora_booth.families.tiny import _tiny_t5

        tokenizer, _ = _tiny_t5()   # its encoder (width 32) is dropped: only the tokenizer serves
        tokenizer.model_max_length = TEXT_TOKENS
        return tokenizer
    from transformers import CLIPTokenizer

    from lora_booth.families.tiny import byte_level_vocab

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)


def random_pipeline(folder: Path, device: str, dtype=None):
    """The pipeline `folder`'s configs describe, its family's parts (lora_booth/families) with
    seeded random weights made on `device`, never on the CPU first: a full SDXL in seconds on a
    GPU, FLUX.1-dev's 11.9 B transformer and 4.76 B T5 straight into 22 + 9 GiB of bf16 (in fp32
    on the CPU they would be 62 GiB). `dtype`: what the denoiser and text encoders are made in
    (None: fp32, which load_frozen then casts as it casts a checkpoint); the VAE is fp32, as
    load_frozen keeps it. The tokenizers are random_tokenizer's."""
    import diffusers
    import torch
    import transformers
    from transformers import AutoConfig

    from lora_booth import families
    from lora_booth.families.base import TOKENIZERS
    from lora_booth.model.loading import detect_folder_family

    def read(part: str, name: str = "config.json") -> dict:
        return json.loads((folder / part / name).read_text())

    family = families.family(detect_folder_family(folder))
    encoder_classes = dict(zip(family.text_parts, family.text_encoder_classes))
    tokenizers = {part: random_tokenizer(kind) for part, kind in encoder_classes.items()}  # before the seed
    torch.manual_seed(0)
    with torch.device(device):
        with default_dtype(dtype):
            denoiser = getattr(diffusers, family.denoiser_class).from_config(read(family.denoiser))
        vae = getattr(diffusers, family.vae_class).from_config(read("vae"))
        with default_dtype(dtype):
            encoders = {}
            for part, kind in encoder_classes.items():
                # the tokenizer's special ids, or CLIP's pooling (at the end-of-text id) reads the wrong token
                ids = {name: getattr(tokenizers[part], name) for name in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")
                       if getattr(tokenizers[part], name) is not None}
                encoders[part] = getattr(transformers, kind)(AutoConfig.from_pretrained(folder / part, **ids))
    parts = {"vae": vae, family.denoiser: denoiser,
             "scheduler": family.training_scheduler(read("scheduler", "scheduler_config.json"))}  # DDPM / flow matching
    for part in family.text_parts:
        parts[part], parts[TOKENIZERS[part]] = encoders[part], tokenizers[part]
    if family.has_safety_checker:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return family.pipeline_class()(**parts)


def cpu_fp16_accelerator(cfg):
    """train.mixed_precision=fp16 on the CPU, which lora-booth refuses and accelerate 1.15 turns
    into plain fp32 (no autocast, no scaler): the same Accelerator lora-booth builds, then
    accelerate's fp16 machinery switched on with torch's CPU GradScaler. Lets the fp16 path (scaled
    backward, unscale before clipping, skipped steps, scaler state in checkpoints) run without a GPU."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision="fp16", gradient_accumulation_steps=cfg.train.grad_accum, cpu=True)
    accelerator.native_amp = True               # autocast in prepare()d forwards and accelerator.autocast()
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


@contextlib.contextmanager
def patched(*replacements):
    """(object, attribute, value) triples, put back afterwards whatever happens."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


# ------------------------------------------------------------------------------- measurement


class Probe:
    """What one lora-booth run measures, filled in by wrappers around the recipe's functions."""

    def __init__(self, ctx: Context, case: Case) -> None:
        self.ctx, self.case = ctx, case
        self.steps: list[dict] = []
        self.memory: dict = {}
        self.class_images: dict | None = None
        self.decodes: list[dict] = []
        self.log: list[str] = []
        self.build_dtype = None         # what random_pipeline makes the denoiser and text encoders in

    def sync(self) -> None:
        import torch
        if self.ctx.cuda:
            torch.cuda.synchronize()

    def patches(self):
        from lora_booth.model import loading as models
        from lora_booth.training import prior, recipe
        from lora_booth.results import sample
        from lora_booth.results import report as run_report

        replacements = [(run_report, "write_report", stub_report),
                        (models, "load_pipeline", self.load_pipeline(models.load_pipeline)),
                        (recipe, "training_step", self.training_step(recipe.training_step)),
                        (prior, "generate", self.generate(prior.generate)),
                        (sample, "render", self.render(sample.render)),
                        (recipe, "make_accelerator", self.make_accelerator(recipe.make_accelerator))]
        return patched(*replacements)

    def load_pipeline(self, original):
        def load(info, cfg, **options):
            if has_weights(info.path):                  # the reference pairs' saved model: the real load
                return original(info, cfg, **options)
            from lora_booth.model.loading import quiet_libraries
            quiet_libraries()
            started = time.perf_counter()
            pipe = random_pipeline(info.path, self.ctx.device, self.build_dtype)
            self.memory["build_seconds"] = round(time.perf_counter() - started, 2)
            return pipe
        return load

    def make_accelerator(self, original):
        def make(cfg):
            fp16_on_cpu = cfg.train.mixed_precision == "fp16" and not self.ctx.cuda
            return cpu_fp16_accelerator(cfg) if fp16_on_cpu else original(cfg)
        return make

    def training_step(self, original):
        import torch

        def step(setup, micro_step, cfg):
            if not self.steps:  # what setup left on the device is measured apart from the steps
                self.sync()
                if self.ctx.cuda:
                    self.memory["setup_peak_allocated"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    self.memory["resident_at_first_step"] = torch.cuda.memory_allocated()
                self.started = time.perf_counter()
            scaler = setup.accelerator.scaler
            trained = [p for group in setup.params.values() for p in group]
            poison = micro_step == self.case.overflow_at
            if poison:  # an fp16 overflow on demand: the scaler must skip this update and halve its scale
                before = [p.detach().clone() for p in trained]
                hook = trained[0].register_hook(lambda grad: grad * float("inf"))
            scale = scaler.get_scale() if scaler is not None else None
            losses = original(setup, micro_step, cfg)
            self.sync()
            record = {"micro_step": micro_step, "end": time.perf_counter() - self.started,
                      "loss": losses.total.detach().item(), "instance": losses.instance.item(),
                      "prior": losses.prior.item(),
                      "skipped": bool(getattr(setup.optimizer, "step_was_skipped", False)),
                      "scale_before": scale, "scale_after": scaler.get_scale() if scaler is not None else None}
            if poison:
                hook.remove()
                record["poisoned"] = True
                record["adapters_unchanged"] = all(torch.equal(a, p.detach()) for a, p in zip(before, trained))
            if self.ctx.cuda:
                record["peak_allocated"] = torch.cuda.max_memory_allocated()
                record["peak_reserved"] = torch.cuda.max_memory_reserved()
            self.steps.append(record)
            return losses
        return step

    def generate(self, original):
        import torch

        def generate(base, cfg, *args, **kwargs):
            self.sync()
            if self.ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            original(base, cfg, *args, **kwargs)
            self.sync()
            indices = args[2] if len(args) > 2 else kwargs.get("indices", [])
            self.class_images = {"images": len(indices), "seconds": round(time.perf_counter() - started, 3),
                                 "sample_batch_size": cfg.prior.sample_batch_size,
                                 "sample_steps": cfg.prior.sample_steps, "compute_dtype": str(base.compute_dtype),
                                 "resolution": cfg.data.resolution,
                                 "peak_allocated": torch.cuda.max_memory_allocated() if self.ctx.cuda else NO_CUDA}
        return generate

    def render(self, original):
        import numpy as np
        import torch

        def render(pipe, prompts, latents, size, device, compute_dtype, autocast_dtype, **kwargs):
            vae, seen = pipe.vae, []
            decode = vae.decode

            def watched(z, *args, **kw):
                result = decode(z, *args, **kw)
                pixels = result.sample if hasattr(result, "sample") else result[0]
                seen.append({"input_dtype": str(z.dtype), "vae_weights": str(vae.dtype),
                             "autocast": torch.is_autocast_enabled(device.type),
                             "finite": bool(torch.isfinite(pixels).all())})
                return result
            vae.decode = watched
            try:
                images = original(pipe, prompts, latents, size, device, compute_dtype, autocast_dtype, **kwargs)
            finally:
                del vae.decode
            arrays = [np.asarray(image) for image in images]
            self.decodes.append({"images": len(images), "black": sum(int(a.max() == 0) for a in arrays),
                                 "pixel_std": round(float(np.mean([a.std() for a in arrays])), 2),
                                 "force_upcast": bool(getattr(vae.config, "force_upcast", False)),
                                 "autocast_dtype": str(autocast_dtype), "decodes": seen})
            return images
        return render


def stub_report(out) -> Path:
    path = Path(out) / "report.html"
    path.write_text("<p>report.html is not drawn by tools/gpu_check.py</p>\n")
    return path


def steady(ends: list[float], warmup: int) -> float | None:
    """Seconds per step after the warm-up: (t_N − t_warmup) / (N − warmup), the bench's method."""
    if len(ends) <= warmup or warmup < 1:
        return None
    return (ends[-1] - ends[warmup - 1]) / (len(ends) - warmup)


# ------------------------------------------------------------------------------------- running


def case_pairs(case: Case, ctx: Context) -> tuple[dict, list[str]]:
    """The config keys of a case (common ones, then the case's own) and notes on substitutions."""
    slug = "".join(c if c.isalnum() else "-" for c in case.name)
    pairs = {"model": str(ctx.config_folder(case.family)), "instance_dir": str(ctx.photos), **PROMPTS,
             "output_dir": str(ctx.work / "runs" / slug), "prior.num_class_images": CLASS_IMAGES,
             "prior.sample_steps": 2 if ctx.dry_run else 4, "train.max_steps": ctx.warmup + ctx.timed,
             "train.device": ctx.device, "train.force": "true", "sample.num": 0, "save.checkpoint_every": 0,
             "save.formats": "diffusers"}  # the kohya copy adds only disk writes (0.2 GB a case for SDXL)
    if ctx.resolution(case.family):
        pairs["resolution"] = ctx.resolution(case.family)
    if case.pair:  # both trainers on the same saved model and the same pre-made class images
        pairs.update(model=str(ctx.reference_model or ctx.config_folder(case.family)), resolution=reference_size(ctx),
                     **{"prior.class_dir": str(ctx.work / "class_images")})
    pairs.update(case.keys)
    notes = []
    cfg, _ = loading.resolve({k: str(v) for k, v in pairs.items()})
    if cfg.optim.optimizer == "adamw8bit" and ctx.capabilities.get("bitsandbytes") != "ok":
        pairs["optim.optimizer"] = "adamw"
        notes.append(f"adamw8bit unavailable ({ctx.capabilities.get('bitsandbytes')}): ran and planned adamw")
    return {k: str(v) for k, v in pairs.items()}, notes


def reference_size(ctx: Context) -> int:
    return 32 if ctx.dry_run else 512


def plan_figures(pairs: dict) -> dict:
    """The planner's figures for a case (run in a worker process on the GPU machine's CPUs)."""
    from lora_booth.planning import plan

    started = time.perf_counter()
    cfg, _ = loading.resolve(pairs)
    estimate = plan.estimate(cfg)
    return {"tracked_peak": estimate.tracked_peak, "total": estimate.total, "flops": estimate.flops,
            "parts": estimate.parts, "host_peak": estimate.host_peak, "offloaded": estimate.offloaded,
            "seconds": round(time.perf_counter() - started, 1)}


def _plan_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def submit_plans(ctx: Context, cases: list[Case], workers: int, patterns: str) -> None:
    """Every case's plan (or those `patterns` select), computed on the CPU while the GPU trains
    (workers > 0) or on demand."""
    if workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 2) // (workers + 1))
        ctx.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_plan_worker, initargs=(threads,))
    planned = {c.name for c in select(cases, patterns)}
    for case in cases:
        if case.runner != "lora-booth":
            continue
        if case.name not in planned:
            ctx.plans[case.name] = "skipped: not in --plan-cases"
            continue
        try:
            pairs, _ = case_pairs(case, ctx)
        except Exception:  # noqa: BLE001 - the case itself will fail with this error and record it
            continue
        pairs["model"] = str(ctx.config_folder(case.family))  # the same architecture; no weights needed
        ctx.plans[case.name] = ctx.pool.submit(plan_figures, pairs) if ctx.pool else pairs


def attach_plans(ctx: Context, report: dict, wait: float) -> None:
    """Each finished lora-booth case gets its plan and the ratios, as soon as the plan is ready
    (wait=0: only those done; the GPU never waits for the CPU's planner between cases)."""
    deadline = time.perf_counter() + wait
    for result in report["cases"]:
        entry = ctx.plans.get(result["name"])
        if "plan" in result or entry is None or result.get("status") == "skipped":
            continue
        if isinstance(entry, str):
            result["plan"] = {"skipped": entry}
            continue
        if ctx.pool is not None and not entry.done() and wait <= 0:
            continue
        try:
            result["plan"] = entry.result(timeout=max(1.0, deadline - time.perf_counter())) \
                if ctx.pool is not None else plan_figures(entry)
        except TimeoutError:
            result["plan"] = {"error": "not ready by --deadline-s (still tracing on the CPU)"}
        except Exception as exc:  # noqa: BLE001 - a planner failure is a finding, not a reason to stop
            result["plan"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        result.update(against_plan(result, ctx))


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"ran past its budget of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_lora_booth(case: Case, ctx: Context, probe: Probe, result: dict) -> None:
    from lora_booth.model import precision
    from lora_booth.training import recipe

    pairs, notes = case_pairs(case, ctx)
    cfg, _ = loading.resolve(pairs)
    result.update(runner="lora-booth", keys=case.keys, notes=notes, mixed_precision=cfg.train.mixed_precision,
                  fp8_base=cfg.train.fp8_base, base_weights=cfg.train.stored_weights,
                  offload_blocks=cfg.train.offload_blocks)
    if cfg.train.mixed_precision == "bf16":  # FLUX.1 in fp32 first would be 62 GiB; fp16 runs cast from fp32 as before
        probe.build_dtype = precision.compute_dtype("bf16")
    if cfg.train.mixed_precision == "fp16" and not ctx.cuda:
        notes.append("fp16 on the CPU through torch's CPU GradScaler (cpu_fp16_accelerator)")
    with probe.patches():
        trained = recipe.run(cfg, report=probe.log.append)
    result["steps_done"] = trained.step
    del trained
    states = sorted((Path(cfg.save.output_dir) / "checkpoints").glob("*/state.json"))
    if states:  # the final checkpoint: what a resume would restore, the loss scaler included
        result["checkpoint_scaler"] = json.loads(states[-1].read_text()).get("scaler")


def run_reference(case: Case, ctx: Context) -> dict:
    """diffusers' train_dreambooth_lora.py, unmodified, through the bench's launch_timed.py (a
    timestamp after every optimizer step) and its torchvision shim, on the model lora-booth's
    matched case trains."""
    script, launcher = reference_files(ctx)
    out = ctx.work / "runs" / ("reference-" + case.pair)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = ctx.warmup + ctx.timed
    command = [sys.executable, str(launcher), "--torchvision-shim", str(script),
               "--pretrained_model_name_or_path", str(ctx.reference_model), "--instance_data_dir", str(ctx.photos),
               "--class_data_dir", str(ctx.work / "class_images"), "--output_dir", str(out / "lora"),
               "--with_prior_preservation", "--prior_loss_weight", "1.0", "--num_class_images", str(CLASS_IMAGES),
               "--instance_prompt", PROMPTS["instance_prompt"], "--class_prompt", PROMPTS["class_prompt"],
               "--resolution", str(reference_size(ctx)), "--train_batch_size", "1", "--gradient_accumulation_steps",
               "1", "--max_train_steps", str(steps), "--rank", "4", "--learning_rate", "1e-4", "--lr_scheduler",
               "constant", "--lr_warmup_steps", "0", "--mixed_precision", case.pair, "--seed", "0",
               "--checkpointing_steps", "1000000", "--report_to", "dvclive"]  # an absent tracker: none logs
    env = {**os.environ, "BENCH_STAMPS": str(out / "stamps.json"), "HF_HUB_OFFLINE": "1"}
    if ctx.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"the reference exited with {proc.returncode}: "
                           + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])[-900:])
    stamps = json.loads((out / "stamps.json").read_text())
    ends = [stamp[0] - stamps["t_launch"] for stamp in stamps["steps"]]
    return {"runner": "reference", "steps": [{"end": end} for end in ends], "wall_seconds": round(wall, 1),
            "s_per_step": steady(ends, ctx.warmup), "mixed_precision": case.pair,
            "command": " ".join(command[:4]) + " …"}


def reference_files(ctx: Context) -> tuple[Path, Path]:
    return ctx.carry / "reference" / "train_dreambooth_lora.py", ctx.carry / "bench" / "launch_timed.py"


def run_case(case: Case, ctx: Context, budget: float) -> dict:
    import torch

    result = {"name": case.name, "group": case.group, "family": case.family, "why": case.why}
    missing = [need for need in case.needs if ctx.capabilities.get(need) != "ok"]
    if case.runner == "reference" and case.pair == "fp16" and not ctx.cuda:
        result.update(status="skipped", reason=f"{NO_CUDA}: accelerate runs the reference's fp16 on the CPU "
                      "without autocast or loss scaler, which is not its GPU path")
        return result
    if case.runner == "reference" and not all(path.is_file() for path in reference_files(ctx)):
        missing.append("reference")
        ctx.capabilities["reference"] = f"no {' or '.join(str(p) for p in reference_files(ctx))} (tools/gpu_check.sh " \
                                        "copies them into .gpu-carry)"
    if missing:
        result.update(status="skipped", reason="; ".join(f"{need}: {ctx.capabilities.get(need)}" for need in missing))
        return result
    start_allocated = torch.cuda.memory_allocated() if ctx.cuda else None
    reset_host_peak()
    probe = Probe(ctx, case) if case.runner == "lora-booth" else None
    started = time.perf_counter()
    try:
        with time_limit(budget):
            if case.pair and ctx.reference_model is None:
                prepare_reference_model(ctx)
            if probe is not None:
                run_lora_booth(case, ctx, probe, result)
            else:
                result.update(run_reference(case, ctx))
        result["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except CaseTimeout as exc:
        result.update(status="timeout", reason=str(exc))
    except BaseException as exc:  # noqa: BLE001 - OOM, a lora-booth error, anything: recorded, the rest runs
        if str(exc).startswith("stopped by SIG"):  # the recipe's own Ctrl-C/SIGTERM handling: the run ends
            raise KeyboardInterrupt from exc
        oom = type(exc).__name__ == "OutOfMemoryError"
        result.update(status="oom" if oom else "failed", reason=f"{type(exc).__name__}: {str(exc)[:600]}",
                      traceback=traceback.format_exc(limit=-4)[-1500:])
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["host_peak_rss"] = host_peak()
    if ctx.cuda:  # cuDNN, cuBLAS and attention kernels load as they are first used: the context grows
        ctx.context_bytes = result["context_bytes"] = max(ctx.context_bytes, context_bytes())
    if probe is not None:
        result.update(measurements(probe, ctx, start_allocated))
        if result["status"] != "ok":
            result["log_tail"] = probe.log[-8:]
    elif result.get("steps") is not None:
        result["losses_finite"] = "n/a (reference: time only)"
    return result


def reset_host_peak() -> None:
    """Linux: the process's peak resident set (VmHWM) starts again from what is resident now."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def host_peak() -> int | None:
    """VmHWM in bytes: the case's host-RAM peak (against the plan's host_peak), where Linux says it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def measurements(probe: Probe, ctx: Context, start_allocated) -> dict:
    steps = probe.steps
    values = [s[k] for s in steps for k in ("loss", "instance", "prior")]
    out = {"steps": steps, "losses_finite": bool(steps) and all(math.isfinite(v) for v in values),
           "skipped_updates": sum(s["skipped"] for s in steps),
           "s_per_step": steady([s["end"] for s in steps], ctx.warmup), **probe.memory}
    if probe.class_images:
        out["class_images"] = probe.class_images
    if probe.decodes:
        out["decodes"] = probe.decodes
    if ctx.cuda and steps:
        out["peak_allocated"] = max(s["peak_allocated"] for s in steps)
        out["peak_reserved"] = max(s["peak_reserved"] for s in steps)
        out["allocated_at_case_start"] = start_allocated
    elif not ctx.cuda:
        out["peak_allocated"] = out["peak_reserved"] = NO_CUDA
    poisoned = [s for s in steps if s.get("poisoned")]
    if poisoned:
        s = poisoned[0]
        out["overflow_check"] = {"skipped": s["skipped"], "adapters_unchanged": s["adapters_unchanged"],
                                 "scale_before": s["scale_before"], "scale_after": s["scale_after"],
                                 "ok": bool(s["skipped"] and s["adapters_unchanged"] and s["scale_before"]
                                            and s["scale_after"] == s["scale_before"] / 2)}
    return out


def card_peak(ctx: Context, precision: str):
    if not ctx.cuda:
        return None
    name = ctx.capabilities.get("gpu_name", "")
    for key, peaks in CARD_PEAKS.items():
        if key in name:
            return peaks.get(precision)
    return None


def against_plan(result: dict, ctx: Context) -> dict:
    """Measured against planned: the ratios the issue asks for, and TFLOP/s against the card."""
    plan, out = result.get("plan", {}), {}
    seconds = result.get("s_per_step")
    if plan.get("flops") and seconds:
        out["tflops"] = plan["flops"] / seconds / 1e12
        peak = card_peak(ctx, result.get("mixed_precision", ""))
        out["peak_fraction"] = out["tflops"] * 1e12 / peak if peak else (NO_CUDA if not ctx.cuda else "unknown card")
    if not ctx.cuda:
        out["allocated_vs_plan"] = out["device_vs_plan"] = NO_CUDA
        return out
    if isinstance(result.get("peak_allocated"), int) and plan.get("tracked_peak"):
        used = result["peak_allocated"] - (result.get("allocated_at_case_start") or 0)
        out["allocated_vs_plan"] = used / plan["tracked_peak"]
        # what nvidia-smi would show: the allocator's reserve plus the CUDA context outside it
        device = result["peak_reserved"] - (result.get("allocated_at_case_start") or 0) + \
            result.get("context_bytes", ctx.context_bytes)
        out["device_bytes"] = device
        out["device_vs_plan"] = device / plan["total"]
        if result["group"] == "preset":
            budget = float(result["name"].split("-")[-1].removesuffix("gb")) * GiB * 0.9
            out["fits_name_minus_10pct"] = device <= budget
    return out


# --------------------------------------------------------------------------------- preparation


def make_images(folder: Path, count: int, size: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        # smooth colour fields plus noise: photo-like statistics, cheap to make at 1024 px
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        pixels = np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return folder


def probe_capabilities(ctx: Context) -> None:
    """Which optional paths can run here, and why not when they cannot."""
    import torch

    caps = ctx.capabilities
    caps["cuda"] = "ok" if ctx.cuda else "no CUDA"
    try:
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        weight = torch.nn.Parameter(torch.randn(64, 64, device=ctx.device))  # ≥ 4096 values: the 8-bit state
        optimizer = bnb.optim.AdamW8bit([weight])
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        caps["bitsandbytes"] = "ok"
    except Exception as exc:  # noqa: BLE001 - import errors and missing kernels alike
        caps["bitsandbytes"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if not ctx.cuda:
        caps["xformers"] = f"{NO_CUDA} (xformers kernels run only on CUDA)"
    else:
        try:
            import xformers.ops  # noqa: F401
            caps["xformers"] = "ok"
        except Exception as exc:  # noqa: BLE001
            caps["xformers"] = f"not importable ({type(exc).__name__}: {str(exc)[:120]})"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        caps["gpu_name"], caps["gpu_memory"] = props.name, props.total_memory
        caps["capability"] = f"{props.major}.{props.minor}"
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
        torch.nn.functional.conv2d(torch.randn(1, 4, 64, 64, device="cuda"), torch.randn(4, 4, 3, 3, device="cuda"))
        (a @ a).sum().item()
        ctx.context_bytes = context_bytes()
        try:
            caps["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            caps["driver"] = f"unknown ({type(exc).__name__})"


def context_bytes() -> int:
    """Device memory in use outside PyTorch's allocator: the CUDA context, cuBLAS/cuDNN handles."""
    import torch
    free, total = torch.cuda.mem_get_info()
    return int(total - free - torch.cuda.memory_reserved())


def prepare_reference_model(ctx: Context) -> None:
    """Both sides of the reference pairs train one model from disk: on the GPU the random SD 1.5
    written once (4.3 GB fp32), in the dry run the tiny model."""
    if ctx.dry_run:
        from lora_booth.families.tiny import tiny_model_dir
        ctx.reference_model = tiny_model_dir("tiny")
        return
    folder = ctx.work / "models" / "sd15-random"
    if not has_weights(folder):
        pipe = random_pipeline(ctx.config_folder("sd15"), ctx.device).to("cpu")
        pipe.save_pretrained(folder, safe_serialization=True)
        del pipe
        free_memory(ctx)
    ctx.reference_model = folder


def free_memory(ctx: Context) -> None:
    import torch
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def versions() -> dict:
    import importlib.metadata as metadata

    import torch
    found = {"python": sys.version.split()[0], "torch_cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             # as both trainers leave them: TF32 convolutions on by default, TF32 matmuls off
             "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers", "safetensors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# -------------------------------------------------------------------------------------- report


def gib(value) -> str:
    return f"{value / GiB:.2f}" if isinstance(value, (int, float)) else (value or "")


def ratio(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else (value or "")


def table(report: dict) -> str:
    meta, cases = report["meta"], report["cases"]
    caps = meta["capabilities"]
    lines = [f"# lora-booth GPU check ({'dry run on the CPU, tiny models' if meta['dry_run'] else 'full-size models'})",
             "", f"- card: {caps.get('gpu_name', NO_CUDA)}, driver {caps.get('driver', '-')}, "
             f"CUDA context {gib(meta.get('context_bytes'))} GiB; torch {meta['versions']['torch']} "
             f"(CUDA {meta['versions']['torch_cuda']}), diffusers {meta['versions']['diffusers']}, transformers "
             f"{meta['versions']['transformers']}, peft {meta['versions']['peft']}, accelerate "
             f"{meta['versions']['accelerate']}",
             f"- bitsandbytes: {caps.get('bitsandbytes')}; xformers: {caps.get('xformers')}",
             f"- {meta['warmup']} warm-up + {meta['timed']} timed steps per case; {meta['elapsed_s']:.0f} s of "
             f"{meta['budget_s']:.0f} s budget; random weights (memory and speed are real, image quality is not)",
             "- device = max_memory_reserved + CUDA context (what nvidia-smi shows); plan = `lora-booth plan` "
             "(tracked peak; total adds 10 % fragmentation and 0.5 GiB context)", "",
             "| case | status | s/step | TFLOP/s | % of peak | max allocated GiB | plan tracked GiB | alloc/plan "
             "| device GiB | plan total GiB | device/plan | name − 10 % | losses finite | notes |",
             "|" + "---|" * 14]
    pairs = {c.get("mixed_precision"): c for c in cases if c.get("runner") == "reference" and c.get("s_per_step")}
    for c in cases:
        plan = c.get("plan", {})
        notes = list(c.get("notes", []))
        if c.get("reason"):
            notes.append(c["reason"])
        if plan.get("error") or plan.get("skipped"):
            notes.append(f"plan: {plan.get('error') or plan['skipped']}")
        if c.get("overflow_check"):
            o = c["overflow_check"]
            notes.append(f"overflow: skipped={o['skipped']}, unchanged={o['adapters_unchanged']}, "
                         f"scale {o['scale_before']:g}→{o['scale_after']:g}: {'ok' if o['ok'] else 'WRONG'}")
        if c["group"] == "reference" and c.get("runner") == "lora-booth" and c.get("s_per_step"):
            reference = pairs.get(c.get("mixed_precision"))
            if reference:
                notes.append(f"{c['s_per_step'] / reference['s_per_step']:.2f}× the reference's s/step")
        fraction = c.get("peak_fraction")
        fits = c.get("fits_name_minus_10pct")
        lines.append("| " + " | ".join([
            c["name"], c.get("status", ""), f"{c['s_per_step']:.3f}" if c.get("s_per_step") else "",
            f"{c['tflops']:.1f}" if isinstance(c.get("tflops"), float) and c["tflops"] >= 0.1 else
            (f"{c['tflops']:.2g}" if isinstance(c.get("tflops"), float) else ""),
            f"{fraction:.0%}" if isinstance(fraction, float) else (fraction or ""),
            gib(c.get("peak_allocated")), gib(plan.get("tracked_peak")), ratio(c.get("allocated_vs_plan")),
            gib(c.get("device_bytes")) or (NO_CUDA if not meta["cuda"] and c.get("runner") == "lora-booth" else ""),
            gib(plan.get("total")), ratio(c.get("device_vs_plan")),
            "" if fits is None else ("yes" if fits else "NO"),
            {True: "yes", False: "NO"}.get(c.get("losses_finite"), c.get("losses_finite") or ""),
            "; ".join(notes).replace("|", "/")]) + " |")
    lines += ["", "## Class images and VAE decodes", "",
              "| case | images | s/image | batch | dtype | resolution | peak allocated GiB | decodes | how the VAE "
              "decoded | all finite | black images |", "|" + "---|" * 11]
    for c in cases:
        info, decodes = c.get("class_images"), c.get("decodes", [])
        if not info:
            continue
        inner = [d for batch in decodes for d in batch["decodes"]]
        lines.append("| " + " | ".join([
            c["name"], str(info["images"]), f"{info['seconds'] / max(1, info['images']):.3f}",
            str(info["sample_batch_size"]), info["compute_dtype"].replace("torch.", ""), str(info["resolution"]),
            gib(info["peak_allocated"]), str(len(inner)),
            ", ".join(sorted({f"{d['vae_weights'].replace('torch.', '')} weights, "
                              + (f"{batch['autocast_dtype'].replace('torch.', '')} autocast" if d["autocast"]
                                 else "autocast off") for batch in decodes for d in batch["decodes"]})),
            "yes" if inner and all(d["finite"] for d in inner) else "NO",
            str(sum(batch["black"] for batch in decodes))]) + " |")
    return "\n".join(lines) + "\n"


def write(ctx: Context, report: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)), ("gpu_check.md", table(report))):
        temporary = ctx.out / f".{name}.partial"
        temporary.write_text(text)
        temporary.replace(ctx.out / name)


def select(cases: list[Case], patterns: str) -> list[Case]:
    if not patterns:
        return cases
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cases if any(fnmatch.fnmatch(c.name, p) or p == c.name for p in wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gpu_check.json/.md (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every case on the CPU with the tiny models")
    parser.add_argument("--cases", default="", help="comma-separated names or globs (default: all); --list shows them")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the cases (default 370 GPU, 900 dry)")
    parser.add_argument("--deadline-s", type=float, default=None, help="seconds for everything, the plans' wait "
                        "included (default budget + 50)")
    parser.add_argument("--steps", default="", help="WARMUP,TIMED (default 2,3 on the GPU, 1,2 in the dry run)")
    parser.add_argument("--carry", default=str(ROOT / ".gpu-carry"), help="the folder tools/gpu_check.sh prepared")
    parser.add_argument("--plan-cases", default="", help="plan only these cases (names or globs; default: all)")
    parser.add_argument("--plan-workers", type=int, default=None, help="processes for the plans (default 5 GPU, 0 dry)")
    parser.add_argument("--work", default="", help="scratch folder (default: a new temporary one, removed at the end)")
    args = parser.parse_args(argv)
    cases = select(all_cases(), args.cases)
    if args.list:
        print("\n".join(f"{c.group:<10} {c.name:<45} {c.why}" for c in cases))
        return 0
    if not args.out:
        parser.error("--out is required when $OUT is not set")
    warmup, timed = (int(n) for n in (args.steps or ("1,2" if args.dry_run else "2,3")).split(","))
    budget = args.budget_s or (900.0 if args.dry_run else 370.0)
    deadline = args.deadline_s or budget + 50
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lora-booth-gpu-check-"))
    carry = Path(args.carry)
    if not (carry / "reference").is_dir() and (ROOT.parent / "shared" / "bench" / "reference").is_dir():
        carry = ROOT.parent / "shared" / "bench"   # here, before tools/gpu_check.sh copied it
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
                      TQDM_DISABLE="1", LORA_BOOTH_CACHE=str(work / "cache"))
    started = time.perf_counter()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here; use --dry-run for the CPU version", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models gain nothing from threads; a busy CPU makes them slower
    ctx = Context(args.dry_run, work, Path(args.out), carry, warmup, timed, device="cpu" if args.dry_run else "cuda")
    report = {"meta": {"argv": sys.argv[1:] if argv is None else argv, "dry_run": args.dry_run, "cuda": ctx.cuda,
                       "warmup": warmup, "timed": timed, "budget_s": budget,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(), "elapsed_s": 0.0,
                       "capabilities": ctx.capabilities, "cases_selected": [c.name for c in cases]},
              "cases": []}
    try:
        side = 48 if args.dry_run else max((FAMILIES[c.family].photo_px for c in cases), default=512)
        ctx.photos = make_images(work / "photos", 4, side, seed=1)
        make_images(work / "class_images", CLASS_IMAGES, 48 if args.dry_run else 512, seed=2)
        probe_capabilities(ctx)
        report["meta"]["context_bytes"] = ctx.context_bytes if ctx.cuda else NO_CUDA
        submit_plans(ctx, cases, args.plan_workers if args.plan_workers is not None else (0 if args.dry_run else 5),
                     args.plan_cases)
        write(ctx, report)
        for case in cases:
            left = budget - (time.perf_counter() - started)
            share = FAMILIES[case.family].share_s if case.runner == "lora-booth" else 150
            if left < min(share, 20):
                report["cases"].append({"name": case.name, "group": case.group, "family": case.family,
                                        "status": "skipped", "reason": f"time budget spent ({left:.0f} s left)"})
                continue
            result = run_case(case, ctx, min(share * (4 if args.dry_run else 1), left))
            free_memory(ctx)
            shutil.rmtree(work / "runs", ignore_errors=True)
            report["cases"].append(result)
            attach_plans(ctx, report, wait=0)
            report["meta"]["elapsed_s"] = time.perf_counter() - started
            print(f"[{report['meta']['elapsed_s']:6.1f} s] {case.name}: {result['status']}"
                  + (f", {result['s_per_step']:.3f} s/step" if result.get("s_per_step") else "")
                  + (f", {gib(result['peak_allocated'])} GiB allocated"
                     if isinstance(result.get("peak_allocated"), int) else "")
                  + (f" ({result.get('reason')})" if result.get("reason") else ""), flush=True)
            write(ctx, report)
    except KeyboardInterrupt:
        report["meta"]["interrupted"] = True
    finally:
        wait = 2.0 if report["meta"].get("interrupted") else deadline - (time.perf_counter() - started)
        attach_plans(ctx, report, wait=max(2.0, wait))
        report["meta"]["elapsed_s"] = time.perf_counter() - started
        if ctx.cuda:
            report["meta"]["context_bytes_at_end"] = context_bytes()
        write(ctx, report)
        if ctx.pool:
            workers = list((getattr(ctx.pool, "_processes", None) or {}).values())
            ctx.pool.shutdown(wait=False, cancel_futures=True)
            for process in workers:  # a plan still tracing is not waited for
                process.terminate()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
