"""output_dir/README.md: what was trained, on what, how, and how to use it anywhere."""
from __future__ import annotations

import re
import shlex
import urllib.parse
from pathlib import Path

from ..adapters.formats import LOADERS
from ..config.sections import Config
from ..families.tiny import TINY_NAMES
from ..io import atomic
from ..io.untrusted import clean_text
from ..io.version import __version__
from ..model.lora import targets_for
from ..model.pivotal import FILE_NAME, new_tokens, rewrite, usage


def write_model_card(out: Path, cfg: Config, base, step: int, files: list[Path], grid: Path | None,
                     seconds: float) -> Path:
    alpha = cfg.lora.rank if cfg.lora.alpha is None else cfg.lora.alpha
    kohya = next((f for f in files if f.name not in ("pytorch_lora_weights.safetensors", FILE_NAME)), None)
    prompt = rewrite(cfg.data.instance_prompt, cfg.pivotal)  # with pivotal tuning: the new tokens
    name = kohya.stem if kohya else "lora"
    pipeline = base.kind.pipelines[0]
    lines = [
        f"# DreamBooth LoRA: {md_code(prompt)}",
        "",
        f"Trained with lora-booth {__version__} on **{md_text(cfg.model.source)}** ({base.family}, "
        f"{PREDICTION_NAMES.get(base.prediction_type, base.prediction_type)}) in {seconds / 60:.1f} minutes.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| trigger prompt | {md_code(prompt, in_table=True)} |",
        "| class prompt (prior preservation) | " + prior_phrase(cfg) + " |",
        f"| adapters | {cfg.lora.type}, rank {cfg.lora.rank}, alpha {alpha:g} on the {base.kind.denoiser} "
        f"{', '.join(targets_for(cfg.lora, base.kind))}"
        + (f" and {base.kind.text_encoders_phrase()}" if cfg.lora.text_encoder else "") + " |",
        f"| steps × batch | {step} × {cfg.train.batch_size} (accumulation {cfg.train.grad_accum}) |",
        f"| optimizer | {cfg.optim.optimizer}, lr {cfg.optim.lr:g}, {cfg.optim.schedule}, warmup {cfg.optim.warmup_steps} |",
        f"| resolution, precision | {cfg.data.resolution} px"
        + (" (aspect-ratio buckets)" if cfg.data.buckets else "") + f", {cfg.train.mixed_precision} |",
        f"| seed | {cfg.train.seed} |",
        *([f"| objective | {objective_phrase(cfg)} |"] if objective_phrase(cfg) else []),
        "",
    ]
    if grid is not None:
        lines += [f"Last samples (rows: {', '.join(md_code(p) for p in _prompts(grid))}):", "",
                  f"![samples](<{urllib.parse.quote(grid.relative_to(out).as_posix())}>)", ""]
    lines += ["## Use it", ""]
    if cfg.lora.type != "lora":
        lines += [f"{cfg.lora.type}: {base.kind.loaders_note(cfg.lora.type) or LOADERS[cfg.lora.type]}.", ""]
    if cfg.lora.type in ("loha", "lokr"):  # diffusers' load_lora_weights refuses these (README)
        command = (f"lora-booth generate {shlex.quote(f'model={cfg.model.source}')} {shlex.quote(f'lora={out}')} "
                   f"{shlex.quote(f'prompt={cfg.data.instance_prompt}')} out=images/")
        lines += ["lora-booth:", *fenced("bash", [command])]
    else:
        lines += ["diffusers:", *fenced("python", diffusers_snippet(cfg.model.source, pipeline, out, prompt))]
    if cfg.pivotal.enabled:
        lines += ["", "Pivotal tuning: the prompt must contain the new tokens. Load them before prompting:", "",
                  *fenced("text", [line.strip() for line in usage(out, new_tokens(cfg.pivotal), prompt)])]
    if kohya and base.kind.webui_names:  # "": no web UI of that kind runs the family
        lines += ["", f"{base.kind.webui_names}: copy {md_code(kohya.name)} into `models/Lora/` and prompt "
                  f"{md_code(f'{prompt} <lora:{name}:1>')}."]
    if kohya:
        lines += [
            "",
            f"ComfyUI: copy {md_code(kohya.name)} into `models/loras/` and add a LoraLoader node (strength 1.0) "
            "between the checkpoint loader and the sampler.",
        ]
    lines += ["", "The resolved configuration is in `config.yaml`; per-step losses in `metrics.jsonl`; loss curves, "
              "the sample grids over training and timings in `report.html` (`lora-booth eval lora=<this folder>` "
              "adds the DreamBooth scores to it).", ""]
    path = out / "README.md"
    atomic.write_text(path, "\n".join(lines))
    return path


def md_code(text: str, in_table: bool = False) -> str:
    """`text` as one Markdown code span on one line, whatever it holds: prompts come from folder
    names and downloaded dataset TOML. Backticks inside get a longer fence (CommonMark), a table's
    `|` is escaped, and line breaks become spaces, so no text closes the span or opens raw HTML."""
    text = clean_text(" ".join(str(text).split()))
    if in_table:  # GFM splits cells at any unescaped | even inside a code span
        text = text.replace("|", "\\|")
    runs = [len(run) for run in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") or not text.strip() else text
    return f"{fence}{padded}{fence}"


def md_text(text: str) -> str:
    """`text` as literal Markdown prose: HTML and Markdown's own characters escaped, one line."""
    text = clean_text(" ".join(str(text).split()))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", text)


def fenced(language: str, lines: list[str]) -> list[str]:
    """A fenced code block whose fence is longer than any run of backticks inside it (a prompt with
    ``` in it cannot end the block early)."""
    body = [clean_text(line) for line in lines]
    longest = max((len(run) for line in body for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", *body, fence]


PREDICTION_NAMES = {"epsilon": "ε-prediction", "v_prediction": "v-prediction"}


def objective_phrase(cfg: Config) -> str:
    """The loss and timestep options that differ from plain MSE at uniform timesteps, and the
    masked loss (data.masks), or ""."""
    objective, words = cfg.objective, []
    if objective.loss != "mse":
        words.append(f"{objective.loss} loss, c = {objective.huber_c:g} ({objective.huber_schedule} schedule)")
    if objective.timesteps == "logit_normal":
        words.append(f"logit-normal timesteps (mean {objective.logit_mean:g}, std {objective.logit_std:g})")
    elif objective.timesteps == "shifted":
        words.append(f"shifted timesteps (shift {objective.timestep_shift:g})")
    if objective.min_snr_gamma:
        words.append(f"min-SNR γ = {objective.min_snr_gamma:g}")
    if objective.noise_offset:
        words.append(f"noise offset {objective.noise_offset:g}")
    if cfg.data.masks != "none":
        words.append(f"masked loss ({'mask files' if cfg.data.masks == 'files' else 'alpha channel'}, background "
                     f"weight {objective.unmasked_weight:g}" + (f", mask dropout {cfg.data.mask_dropout:g}"
                                                                if cfg.data.mask_dropout else "") + ")")
    return ", ".join(words)


def prior_phrase(cfg: Config) -> str:
    """How the class prior was kept: off, by class images (the paper's), or by the base model's
    own predictions (prior.mode=prediction)."""
    if cfg.prior.weight <= 0:
        return "off"
    if cfg.prior.by_prediction:
        return (f"{md_code(cfg.prior.class_prompt, in_table=True)}, λ = {cfg.prior.weight:g}, by prediction: the target of each photo's "
                "noisy latent with the class prompt is the base model's own prediction (no class images)")
    return f"{md_code(cfg.prior.class_prompt, in_table=True)}, λ = {cfg.prior.weight:g}, {cfg.prior.num_class_images} class images"


def diffusers_snippet(source: str, pipeline: str, out: Path, prompt: str) -> list[str]:
    """Python that loads the base as the run did and the adapter on top, runnable as written."""
    lines = [f"from diffusers import {pipeline}"]
    if source == "toyworld":  # the base ships inside lora-booth
        lines += ["from lora_booth.toyworld import toy_base_dir", f"pipe = {pipeline}.from_pretrained(toy_base_dir())"]
    elif source in TINY_NAMES:
        lines += ["from lora_booth.families.tiny import tiny_model_dir",
                  f"pipe = {pipeline}.from_pretrained(tiny_model_dir({source!r}))"]
    elif Path(source).expanduser().is_file():
        lines += [f"pipe = {pipeline}.from_single_file({source!r})"]
    else:
        lines += [f"pipe = {pipeline}.from_pretrained({source!r})"]
    return lines + [f"pipe.load_lora_weights({str(out)!r})", f"image = pipe({prompt!r}).images[0]"]


def _prompts(grid: Path) -> list[str]:
    from PIL import Image

    with Image.open(grid) as image:
        return image.info.get("prompts", "").splitlines()
