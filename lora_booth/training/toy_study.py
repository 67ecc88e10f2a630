"""Measure a toy-world pipeline (optionally with a LoRA adapter) with the classical detectors.

What DreamBooth should do (Ruiz et al. 2023) and how it is measured here, all with fixed seeds:

- **subject hit rate**: fraction of samples of the trigger prompt ("a photo of sks star") that show
  the subject (``subject.is_subject``); the base model's rate on the same prompt is the baseline;
- **class correctness**: fraction of samples of the class prompt ("a photo of a star") that the
  detector reads as the class's shape;
- **class diversity**: number of distinct detected colours among the class-prompt samples (the world
  has 6), and **language drift**: fraction of class-prompt samples that are the subject;
- **prompt following**: detector accuracy of shape and colour on the 24 "a photo of a red star"
  prompts (every shape x colour), as in the pretraining's own evaluation.

``train_subject`` trains the shipped subject (``lora_booth/samples/toystar``) through lora-booth's
own trainer (``config.resolve`` + ``recipe.run``) with the ``demo`` preset.

Nothing runs at import; torch, diffusers and the trainer are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..adapters import formats
from ..config.loading import resolve
from ..toyworld import detector, toy_base_dir, world
from ..toyworld.rates import CLASS_PROMPT, CLASS_SHAPE, TRIGGER_PROMPT, class_stats, subject_hit_rate
from .recipe import run

# Sampling: DPM-Solver++ (as lora-booth draws class images) with these defaults.
STEPS = 10
GUIDANCE = 3.0
SEED = 1000


# The settings that teach the subject in well under 2 minutes on one CPU thread are the `demo`
# preset (presets/demo.yaml, the README's first command), its subject included (the
# shipped photos, builtin:toystar); tools/eval_toyworld.py measures them.
PRESET = "demo"


def samples_dir() -> Path:
    """The shipped instance photos of the subject."""
    return Path(__file__).resolve().parents[1] / "samples" / "toystar"


def train_subject(output_dir, base=None, report=None, **overrides):
    """Train the subject with lora-booth's trainer on ``base`` (default: the shipped toy base);
    ``overrides`` are more ``key=value`` settings (dots allowed via a dict: ``**{"prior.weight": "0"}``).
    Returns (adapter file, wall seconds of the whole run including class images)."""
    import time

    settings = [("preset", PRESET), ("model", str(base or toy_base_dir())), ("output_dir", str(output_dir)),
                ("sample.num", "0")]
    settings += [(k, str(v)) for k, v in overrides.items()]
    cfg, _ = resolve(settings)
    started = time.perf_counter()
    trained = run(cfg, report=report or (lambda message: None))
    return trained.adapter, time.perf_counter() - started


def load(pipeline_dir, lora=None, lora_scale: float = 1.0):
    """The toy pipeline from ``pipeline_dir`` (offline, fp32, CPU) with a DPM-Solver++ scheduler and,
    when ``lora`` is given (a folder or a .safetensors file), the adapter loaded at ``lora_scale``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # No dtype: diffusers upcasts the fp16-stored UNet/VAE weights to fp32 (see model.save_pipeline).
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        lora = Path(lora)

        formats.read(lora)  # an untrusted file is validated (and named) before it touches the model
        lora = formats.locate(lora)  # a run or checkpoint folder: the file inside it
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="subject")
        if lora_scale != 1.0:
            pipe.set_adapters(["subject"], [lora_scale])
    return pipe


def sample(pipe, prompt: str, n: int, seed: int = SEED, steps: int = STEPS, guidance: float = GUIDANCE,
           batch: int = 32) -> np.ndarray:
    """``n`` samples (n, H, W, 3) uint8 of ``prompt``; sample i always starts from the noise of
    seed ``seed + i``, so results do not depend on the batch size and base/adapter runs compare
    sample by sample."""
    import torch

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            count = min(batch, n - start)
            latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                                   for i in range(count)])
            images = pipe([prompt] * count, height=size, width=size, num_inference_steps=steps,
                          guidance_scale=guidance, negative_prompt=[""] * count if guidance > 1 else None,
                          latents=latents, output_type="np").images
            out.append((np.asarray(images) * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def prompt_following(pipe, samples_per_prompt: int = 4, seed: int = SEED, steps: int = STEPS,
                     guidance: float = GUIDANCE) -> dict:
    """Detector accuracy (shape, colour, both) on the 24 shape x colour prompts."""
    images, shapes, colours = [], [], []
    for prompt, shape, colour in world.eval_prompts():
        images.extend(sample(pipe, prompt, samples_per_prompt, seed, steps, guidance))
        shapes += [shape] * samples_per_prompt
        colours += [colour] * samples_per_prompt
    return detector.accuracy(images, shapes, colours)


@dataclass
class Result:
    """One row of the table: a model (base or base + adapter) measured on the same seeds."""

    name: str
    n: int
    subject: float  # hit rate on the trigger prompt
    class_shape: float
    class_colours: int
    class_drift: float
    colour_counts: dict = field(default_factory=dict)
    prompt_following: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_pipe(pipe, name: str = "model", n: int = 32, trigger_prompt: str = TRIGGER_PROMPT,
                  class_prompt: str = CLASS_PROMPT, class_shape: str = CLASS_SHAPE, seed: int = SEED,
                  steps: int = STEPS, guidance: float = GUIDANCE, with_prompt_following: bool = False) -> Result:
    hits = subject_hit_rate(sample(pipe, trigger_prompt, n, seed, steps, guidance))
    stats = class_stats(sample(pipe, class_prompt, n, seed, steps, guidance), class_shape)
    follow = prompt_following(pipe, 4, seed, steps, guidance) if with_prompt_following else None
    return Result(name, n, hits, stats["shape"], stats["distinct_colours"], stats["drift"], stats["colour_counts"], follow)


def evaluate(pipeline_dir, lora=None, name: str | None = None, lora_scale: float = 1.0, **kwargs) -> Result:
    """Load ``pipeline_dir`` (+ ``lora``) and measure it; ``kwargs`` go to ``evaluate_pipe``."""
    pipe = load(pipeline_dir, lora, lora_scale)
    return evaluate_pipe(pipe, name or ("base" if lora is None else str(lora)), **kwargs)


def format_table(results, trigger_prompt: str = TRIGGER_PROMPT, class_prompt: str = CLASS_PROMPT) -> str:
    """A markdown table of ``Result`` rows."""
    results = list(results)
    follow = any(r.prompt_following for r in results)
    head = ["model", f'subject in "{trigger_prompt}"', f'"{class_prompt}": shape ok', "distinct colours (of 6)",
            "drift (subject)"]
    if follow:
        head += ["24 prompts: shape", "colour"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    for r in results:
        cells = [r.name, f"{r.subject:.0%} ({round(r.subject * r.n)}/{r.n})", f"{r.class_shape:.0%}",
                 str(r.class_colours), f"{r.class_drift:.0%}"]
        if follow:
            pf = r.prompt_following or {}
            cells += [f"{pf['shape']:.2f}" if pf else "", f"{pf['colour']:.2f}" if pf else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
