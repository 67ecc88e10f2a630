"""`lora-booth eval`: the DreamBooth paper's evaluation (Ruiz et al. 2023, §4.1) of one trained adapter.

- subject fidelity: DINO (ViT-S/16 CLS cosine) and CLIP-I (CLIP image cosine), mean over every
  (generated, real instance photo) pair;
- prompt fidelity: CLIP-T, mean cosine of each generated image with its own prompt;
over the paper's 25 prompt templates (object or live subject) × n images per prompt; and
- prior drift: 1 − mean DINO cosine of class-prompt images with and without the adapter (same seeds);
- class diversity: mean pairwise DINO distance among class-prompt images with the adapter (the
  paper uses LPIPS; DINO needs no extra model), next to the base model's.

Drawing (diffusers), embedding (embedders.py) and the scores (scores.py) are apart, so the scores
are tested on known answers and the whole verb on tiny models."""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from ..adapters import formats
from ..adapters.merging import parse_weighted
from ..config.sections import ModelConfig
from ..data.files import image_paths, load_rgb, resolve_dir
from ..io import atomic, manifest, untrusted
from ..io.errors import ConfigError, DataError
from ..model import loading as models
from ..model.loading import quiet_libraries
from . import sample, scores
from .embedders import DEFAULT_CLIP, DEFAULT_DINO, Embedders
from .report import write_report
from .scores import SCORE_NAMES, describe_score

LIVE_CLASSES = {"dog", "cat"}  # the dataset's README: live subjects are the dogs and cats
PROMPT_FILE = "dreambooth_prompts.json"


def choose_metrics(a: dict) -> str:
    """metrics=toyworld|dreambooth, or from the adapter: the toy world's own detector for adapters
    of the toy world's base model, the DreamBooth paper's DINO/CLIP scores for everything else."""
    if a.get("metrics"):
        if a["metrics"] not in ("dreambooth", "toyworld"):
            raise ConfigError("metrics", f"is {a['metrics']!r}", "use metrics=dreambooth or metrics=toyworld")
        return a["metrics"]
    if "model" in a:
        return "toyworld" if a["model"] == "toyworld" else "dreambooth"

    saved = run_config(parse_weighted(a["lora"][0])[0])
    return "toyworld" if saved.get("model", {}).get("source") == "toyworld" else "dreambooth"


def run_config(adapter: Path) -> dict:
    """The config of the run that made an adapter: its folder's config.yaml, else the copy in the
    adapter's own metadata (a checkpoint folder, or a file moved on its own)."""
    adapter = Path(adapter)
    saved = read_run_config(adapter if adapter.is_dir() else adapter.parent)
    if saved:
        return saved
    try:
        return formats.trained_config(adapter)
    except formats.AdapterError:  # no adapter there yet: the verb itself says so, with its own message
        return {}


def read_run_config(run_dir: Path) -> dict:
    """The training run's config.yaml as plain data; empty when the adapter came without one."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    text = untrusted.read_text(path, 2**20)  # a run folder from elsewhere: regular file, capped, UTF-8
    try:
        return yaml.safe_load(text) or {}
    except RecursionError:
        raise DataError(f"{path}: nests deeper than any config. Restore it, or pass model=, instance_dir=, token= "
                        "and class= to `lora-booth eval`.") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc}). Restore it, or pass model=, instance_dir=, token= "
                        "and class= to `lora-booth eval`.") from None


@dataclass
class EvalSetup:
    """What to evaluate and how; defaults from the run's config.yaml, any of it overridable."""
    adapter: Path
    scale: float
    run_dir: Path
    model: str
    instance_dir: str
    token: str
    class_noun: str
    kind: str
    class_prompt: str
    n: int = 4
    class_n: int = 16
    steps: int = 25
    guidance: float = 7.5
    size: int = 512
    seed: int = 0
    clip: str = ""
    dino: str = ""
    prompts: list[str] = field(default_factory=list)


def load_templates(kind: str) -> list[str]:
    templates = json.loads((resources.files("lora_booth") / "samples" / PROMPT_FILE).read_text(encoding="utf-8"))
    if kind not in templates:
        raise ConfigError("kind", f"is {kind!r}", f"use one of {', '.join(templates)}")
    return templates[kind]


def fill(template: str, token: str, class_noun: str) -> str:
    return template.format(token, class_noun)


def without_token(prompt: str, token: str) -> str:
    """CLIP has never seen the rare token: CLIP-T compares the image with the prompt minus it."""
    return re.sub(rf"\s*\b{re.escape(token)}\b", "", prompt).strip() if token else prompt


def split_trigger(instance_prompt: str, class_prompt: str) -> tuple[str, str]:
    """("sks", "dog") out of "a photo of sks dog" and "a photo of dog"."""
    strip = re.compile(r"^(an? )?(photo|picture|image) of (an? |the )?", re.I)
    subject = strip.sub("", instance_prompt.strip())
    noun = strip.sub("", class_prompt.strip()) if class_prompt.strip() else ""
    if noun and subject.endswith(noun) and subject != noun:
        return subject[: -len(noun)].strip(), noun
    words = subject.split()
    if len(words) < 2:
        raise ConfigError("token", f"cannot be read from the instance prompt {instance_prompt!r}",
                          "pass token=sks class=dog")
    return words[0], " ".join(words[1:])


def resolve_setup(a: dict) -> EvalSetup:
    """The eval verb's keys over the trained run's config.yaml."""
    if len(a["lora"]) != 1:
        raise ConfigError("lora", f"is given {len(a['lora'])} times; the DreamBooth metrics evaluate one adapter",
                          "run `lora-booth eval` once per adapter")
    adapter, scale = parse_weighted(a["lora"][0])
    if not adapter.exists():
        raise DataError(f"lora={adapter}: no such file or folder. Point it at a training output_dir.")
    run_dir = adapter if adapter.is_dir() else adapter.parent
    saved = run_config(adapter)
    model = a.get("model") or saved.get("model", {}).get("source", "")
    instance_dir = a.get("instance_dir") or saved.get("data", {}).get("instance_dir", "")
    class_prompt = saved.get("prior", {}).get("class_prompt", "")
    missing = [key for key, value in (("model", model), ("instance_dir", instance_dir)) if not value]
    if missing:
        raise ConfigError(missing[0], f"is not given and {run_dir / 'config.yaml'} does not say it",
                          f"pass {' '.join(k + '=...' for k in missing)}")
    if "token" in a and "class" in a:
        token, noun = a["token"], a["class"]
    else:
        token, noun = split_trigger(saved.get("data", {}).get("instance_prompt", ""), class_prompt)
        token, noun = a.get("token", token), a.get("class", noun)
    kind = a.get("kind") or ("live" if noun in LIVE_CLASSES else "object")
    setup = EvalSetup(adapter=adapter, scale=scale, run_dir=run_dir, model=model, instance_dir=instance_dir,
                      token=token, class_noun=noun, kind=kind,
                      class_prompt=a.get("class_prompt") or class_prompt or f"a photo of {noun}",
                      n=a.get("n", 4), class_n=a.get("class_n", 16), steps=a.get("steps", 25),
                      guidance=a.get("guidance", 7.5),
                      size=a.get("size") or saved.get("data", {}).get("resolution", 512), seed=a.get("seed", 0),
                      clip=a.get("clip", DEFAULT_CLIP), dino=a.get("dino", DEFAULT_DINO))
    for key in ("n", "steps", "size"):
        if getattr(setup, key) <= 0:
            raise ConfigError(key, f"must be positive, not {getattr(setup, key)}")
    if setup.class_n < 2:
        raise ConfigError("class_n", f"is {setup.class_n}; drift and diversity need at least 2 class images")
    setup.prompts = [fill(t, token, noun) for t in load_templates(kind)]
    return setup


@dataclass
class Drawn:
    subject: list                 # n images for each prompt, prompt-major
    subject_prompts: list[str]    # the prompt of each image
    class_with: list              # class prompt, with the adapter
    class_without: list           # class prompt, base model, the same seeds


def draw_images(setup: EvalSetup, report=print) -> Drawn:
    models.quiet_libraries()

    formats.read(setup.adapter)  # validated before anything is drawn: an untrusted file fails here, named
    device = models.pick_device("auto")
    base = models.load_frozen(ModelConfig(source=setup.model))
    pipe = sample.pipeline(base.to(device), base.unet, device)

    def draw(prompts: list[str], num: int) -> list:
        return sample.draw(pipe, prompts, num, setup.size, setup.steps, setup.guidance, setup.seed, device,
                           base.compute_dtype)

    report(f"eval: drawing {setup.class_n} class images without the adapter, then "
           f"{len(setup.prompts)} prompts × {setup.n} + {setup.class_n} with it ({setup.steps} steps, {setup.size} px)")
    class_without = draw([setup.class_prompt], setup.class_n)[0]
    file = formats.locate(setup.adapter)
    folder, weight = file.parent, file.name
    pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name="subject")
    pipe.set_adapters(["subject"], [setup.scale])
    rows = draw(setup.prompts, setup.n)
    class_with = draw([setup.class_prompt], setup.class_n)[0]
    return Drawn([image for row in rows for image in row], [p for p in setup.prompts for _ in range(setup.n)],
                 class_with, class_without)


def score_images(drawn: Drawn, real: list, embedders, token: str) -> dict[str, float]:
    """Every score of the table from images; `embedders` has dino_embed, clip_image_embed, clip_text_embed."""
    dino_generated, dino_real = embedders.dino_embed(drawn.subject), embedders.dino_embed(real)
    clip_generated = embedders.clip_image_embed(drawn.subject)
    texts = embedders.clip_text_embed([without_token(p, token) for p in drawn.subject_prompts])
    dino_with, dino_without = embedders.dino_embed(drawn.class_with), embedders.dino_embed(drawn.class_without)
    result = {"DINO": scores.mean_cross_similarity(dino_generated, dino_real),
              "CLIP-I": scores.mean_cross_similarity(clip_generated, embedders.clip_image_embed(real)),
              "CLIP-T": scores.mean_paired_similarity(clip_generated, texts)}
    if len(real) >= 2:
        result["real_DINO"] = scores.mean_pairwise_similarity(dino_real)
    result.update(prior_drift=scores.prior_drift(dino_with, dino_without),
                  class_diversity=scores.diversity(dino_with), base_class_diversity=scores.diversity(dino_without))
    return result


def real_images(instance_dir: str) -> list:
    paths = image_paths(resolve_dir(instance_dir), "instance_dir")
    if not paths:
        raise DataError(f"instance_dir={instance_dir}: no images to compare with.")
    return [load_rgb(path) for path in paths]


def format_table(results: dict) -> str:
    lines = [f"{'score':<22}{'value':>8}  meaning"]
    for name in SCORE_NAMES:
        if name in results["scores"]:
            lines.append(f"{name:<22}{results['scores'][name]:>8.4f}  {describe_score(name)}")
    return "\n".join(lines)


def evaluate(a: dict, report=print) -> dict:
    """Draw, embed, score; write eval.json (and report.html, when the folder holds a training run)."""
    quiet_libraries()  # no weight-loading progress bars between the table's lines
    started = time.time()
    setup = resolve_setup(a)
    out = Path(a.get("out") or setup.run_dir)
    mark = b'"protocol": "DreamBooth (Ruiz et al. 2023)'  # how an eval.json of lora-booth's begins
    manifest.check_replaceable(out / "eval.json", "the evaluation", mark)  # before minutes of drawing
    real = real_images(setup.instance_dir)
    embedders = Embedders(setup.clip, setup.dino)  # before drawing: a missing model fails in seconds
    drawn = draw_images(setup, report)
    results = {
        "protocol": (f"DreamBooth (Ruiz et al. 2023) metrics: {len(setup.prompts)} {setup.kind} prompts × "
                     f"{setup.n} images vs {len(real)} real photos; {setup.class_n} class-prompt images "
                     f"({setup.class_prompt!r}) with and without the adapter; {setup.steps} DPM-Solver++ steps, "
                     f"guidance {setup.guidance:g}, {setup.size} px, seed {setup.seed}; DINO={setup.dino}, "
                     f"CLIP={setup.clip}"),
        "scores": score_images(drawn, real, embedders, setup.token),
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(setup).items()},
        "real_images": len(real),
        "images_drawn": len(drawn.subject) + len(drawn.class_with) + len(drawn.class_without),
        "seconds": time.time() - started,
    }
    manifest.check_replaceable(out / "eval.json", "the evaluation", mark)
    atomic.write_text(out / "eval.json", json.dumps(results, indent=2) + "\n")
    manifest.note_on_disk(out / "eval.json")
    report(format_table(results))
    report(f"wrote {out / 'eval.json'} ({results['images_drawn']} images in {results['seconds']:.0f} s)")
    if (out / "metrics.jsonl").exists():
        report(f"wrote {write_report(out)}")
    return results
