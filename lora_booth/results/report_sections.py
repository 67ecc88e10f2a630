"""The sections of report.html, each a list of HTML lines: summary, training photos, sample grids
behind a slider, config, eval scores, the toy world's progress."""
from __future__ import annotations

import html
import io
import json
import os
import statistics
import urllib.parse
from pathlib import Path

from ..config.keys import shown
from ..config.sections import Config
from ..data.files import image_paths, resolve_dir
from ..data.trigger import candidates
from ..io import untrusted
from ..io.errors import LoraBoothError
from ..model import checkpoint
from ..model.pivotal import rewrite
from ..toyworld import progress
from .charts import VALIDATION, lowest, validation_points
from .run_record import Grid, Run, TILE, data_uri, jpeg_uri, trained_counts
from .scores import SCORE_NAMES, describe_score


PAGE_WIDTH = 1040   # px of images a row of tiles may fill, beside the prompts' column
PHOTO_HEIGHT = 96   # px of a training photo's thumbnail
MAX_PHOTOS = 40


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1024
    return ""


def summary_rows(run: Run) -> list[tuple[str, str, str]]:
    """(label, element id, value): the numbers and names a reader looks for first."""
    rows, cfg, records, summary = [], run.cfg, run.records, run.summary
    if cfg:
        alpha = cfg.lora.rank if cfg.lora.alpha is None else cfg.lora.alpha
        trigger = " ".join(candidates(cfg)) or "(none: every word is in the class prompt)"
        counts = trained_counts(run.out)
        images = (f"{counts[0]} instance photos" if counts else "instance photos: not recorded") \
            + (f" × {cfg.data.repeats} repeats, " if cfg.data.repeats > 1 else ", ") \
            + (f"{counts[1] if counts else cfg.prior.num_class_images} class images" if cfg.prior.weight > 0 else
               "no class images")
        rows += [("trigger", "trigger", trigger + (f" → {cfg.pivotal.tokens} new tokens (pivotal)"
                                                   if cfg.pivotal.enabled else "")),
                 ("instance prompt", "instance-prompt", cfg.data.instance_prompt),
                 ("class prompt", "class-prompt", f"{cfg.prior.class_prompt} (λ = {cfg.prior.weight:g})"
                  if cfg.prior.weight > 0 else "off (prior.weight = 0)"),
                 ("base model", "base-model", cfg.model.source),
                 ("adapter", "adapter", f"{cfg.lora.type}, rank {cfg.lora.rank}, alpha {alpha:g}"
                  + (", UNet and text encoder" if cfg.lora.text_encoder else ", UNet only")),
                 ("learning rate", "lr", f"{cfg.optim.lr:g} ({cfg.optim.optimizer}, {cfg.optim.schedule})"),
                 ("images", "images", images),
                 ("resolution, batch", "resolution", f"{cfg.data.resolution} px, batch {cfg.train.batch_size} × "
                  f"accumulation {cfg.train.grad_accum}")]
    if records:
        last = records[-1]
        rows += [("steps", "final-step", str(last["step"])),
                 ("final loss (total / instance / prior)", "final-loss",
                  " / ".join(f"{last[key]:.4f}" if key in last else "–"
                             for key in ("loss", "instance_loss", "prior_loss")))]
        for key, label, _ in VALIDATION:
            points = validation_points(records, key)
            if points:
                step, value = lowest(points)
                rows.append((f"lowest validation loss, {label}", key.replace("_", "-"),
                             f"{value:.4f} at step {step} (last {points[-1][1]:.4f} at step {points[-1][0]})"))
        seconds = [r["step_seconds"] for r in records if "step_seconds" in r]
        if seconds:
            rows += [("seconds per step (median, incl. sample grids)", "step-seconds",
                      f"{statistics.median(seconds):.3f}"),
                     ("time in training steps (every session)", "train-seconds", f"{sum(seconds):.1f} s")]
    if summary:
        resumed = summary.get("steps_this_run", summary.get("steps")) != summary.get("steps")
        rows.append(("wall time", "total-seconds", f"{summary.get('seconds', float('nan')):.1f} s" + (
            f" (the last session: {summary.get('steps_this_run')} steps after a resume)" if resumed else "")))
        if summary.get("peak_memory_bytes"):
            rows.append((f"peak memory ({summary.get('peak_memory_of', '')})", "peak-memory",
                         human_bytes(summary["peak_memory_bytes"])))
        rows.append(("device", "device", str(summary.get("device", ""))))
    return rows


def flat(values: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, keys in values.items() for key, value in keys.items()}


def config_value(value) -> str:
    if value == "":
        return "(empty)"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return shown(value, limit=200)


def config_section(run: Run) -> list[str]:
    if not run.config_text:
        return []
    parts = ["<h2>Configuration</h2>"]
    if run.cfg:
        defaults = flat(Config().to_dict())
        changed = [(k, v) for k, v in flat(run.cfg.to_dict()).items() if v != defaults.get(k)]
        parts += ["<p>The keys this run set (everything else is the default):</p>", "<table id='config-changed'>",
                  "<tr><th>key</th><th>value</th><th>default</th></tr>"]
        parts += [f"<tr><td><code>{esc(k)}</code></td><td>{esc(config_value(v))}</td>"
                  f"<td>{esc(config_value(defaults.get(k)))}</td></tr>" for k, v in changed]
        parts.append("</table>")
    parts += ["<details><summary>the full resolved configuration (config.yaml)</summary>",
              f"<pre id='config'>{esc(run.config_text)}</pre></details>"]
    return parts


def eval_section(results: dict) -> list[str]:
    parts = ["<h2>Evaluation (lora-booth eval)</h2>",
             f"<p>{esc(results.get('protocol', ''))}</p>", "<table id='eval'>",
             "<tr><th>score</th><th>value</th><th>meaning</th></tr>"]
    for name in SCORE_NAMES:
        if name in results.get("scores", {}):
            parts.append(f"<tr><td>{name}</td><td class='num'>{results['scores'][name]:.4f}</td>"
                         f"<td>{esc(describe_score(name))}</td></tr>")
    parts.append("</table>")
    return parts


def esc(text) -> str:
    """User text (prompts, file names, config values) as HTML text: escaped, and any byte of a file
    name that is not UTF-8 spelled \\xNN rather than failing the page."""
    return html.escape(untrusted.clean_text(str(text)), quote=True)


def link(target: Path, page: Path) -> str:
    """`target` as the page at `page` reaches it (a relative URL)."""
    relative = Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()
    return esc(urllib.parse.quote(os.fsencode(relative)))  # the name's own bytes, UTF-8 or not


def photos_section(run: Run) -> list[str]:
    """The training photos as thumbnails, read from data.instance_dir as the config names it."""
    from PIL import Image

    if not run.cfg:
        return []
    try:
        # the photos' names only: no decoding or hashing of every photo for a strip of thumbnails
        paths = image_paths(resolve_dir(run.cfg.data.instance_dir), "data.instance_dir", run.cfg.data.caption_ext)
    except LoraBoothError as exc:
        return ["<h2>Training photos</h2>", f"<p id='photos'>Not shown: {esc(exc)}</p>"]
    parts = ["<h2>Training photos</h2>", "<div class='strip' id='photos'>"]
    for path in paths[:MAX_PHOTOS]:
        try:
            with Image.open(path) as image:
                image.thumbnail((2 * PHOTO_HEIGHT, PHOTO_HEIGHT))
                parts.append(f"<img class='photo' alt='{esc(path.name)}' title='{esc(path.name)}' "
                             f"src='{jpeg_uri(image)}'>")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # moved, damaged or huge since training
            parts.append(f"<span class='photo'>{esc(path.name)}: not shown ({esc(type(exc).__name__)})</span>")
    parts.append("</div>")
    if len(paths) > MAX_PHOTOS:
        parts.append(f"<p>The first {MAX_PHOTOS} of {len(paths)} photos, from {esc(run.cfg.data.instance_dir)}.</p>")
    return parts


def tile_width(columns: int) -> int:
    """px of each image when `columns` of them share the page's width (6 px of border and padding each)."""
    return max(40, min(TILE, PAGE_WIDTH // max(1, columns) - 6))


def grid_table(table_id: str, prompts: list[str], groups: list[tuple[str, Grid, str]], visible: int) -> list[str]:
    """One table: a row per prompt (labelled), for each group a header over its columns and the seed
    above each column. `groups`: (header HTML, grid, extra attributes of its cells); `visible`: how
    many columns show at once, which sets the size of the images."""
    columns = sum(g.columns for _, g, _ in groups)
    head = ["<tr><th></th>"] + [f"<th class='group{' base' if g.step is None else ''}' colspan='{g.columns}'{a}>"
                                f"{header}</th>" for header, g, a in groups] + ["</tr>"]
    seeds = ["<tr><th></th>"] + [f"<th class='seed'{a} title='starting noise {c + 1} of sample.seed={esc(g.seed)}: "
                                 f"the same in every grid'>seed {esc(g.seed)} · #{c + 1}</th>"
                                 for _, g, a in groups for c in range(g.columns)] + ["</tr>"]
    tiles = [(g, a, g.tiles()) for _, g, a in groups]
    rows = []
    for r, prompt in enumerate(prompts):
        cells = [f"<td{a}><img class='tile{' pixels' if g.tile_width * 2 <= TILE else ''}' alt='{esc(prompt)}, seed "
                 f"{esc(g.seed)} #{c + 1}, {'base model' if g.step is None else f'step {g.step}'}' src='{uri}'></td>"
                 for g, a, grid_tiles in tiles for c, uri in enumerate(grid_tiles[r])]
        # a pivotal run's grids say <s0><s1> where the base model heard the trigger word
        said = dict.fromkeys([prompt, *(g.prompts[r] for _, g, _ in groups)])
        rows.append(f"<tr><th class='prompt'>{'<br>'.join(map(esc, said))}</th>{''.join(cells)}</tr>")
    return [f"<div class='scroll'><table class='grid' id='{table_id}' style='--tile:{tile_width(visible)}px' "
            f"data-tile='{tile_width(visible)}' data-all-tile='{tile_width(columns)}'>", "".join(head), "".join(seeds),
            *rows, "</table></div>"]


def samples_section(run: Run, page: Path) -> list[str]:
    if not run.grids:
        return []
    grids = run.comparable()
    base = run.base_for(grids[-1])
    steps = [g.step for g in grids]
    groups = ([("base model, no adapter", base, "")] if base else [])
    for k, g in enumerate(grids):
        kept = run.out / "checkpoints" / f"{checkpoint.PREFIX}{g.step:08d}"
        files = f"<br><a href='{link(kept, page)}'>checkpoints/{esc(kept.name)}/</a>" if kept.is_dir() else ""
        groups.append((f"step {g.step} (<a href='{link(g.path, page)}'>PNG</a>){files}", g, f" data-k='{k}'"))
    parts = ["<h2>Samples: which step to ship</h2>",
             "<p>Each row is one prompt, each column one seed, the same at every step. "
             + ("The green columns are the base model without the adapter; " if base else
                "(No grid of the base model without the adapter: this run drew none with these settings.) ")
             + "drag the slider to step through training. Likeness grows over the steps; overfitting shows as the "
             "seeds all drawing the same picture of a training photo, and drift as the class prompt's row "
             "(compare it with the base model's) turning into your subject. Each step's checkpoint folder holds "
             "that step's adapter, to ship or to try.</p>",
             f"<div id='controls'><input type='range' id='step-slider' min='0' max='{len(grids) - 1}' step='1' "
             f"value='{len(grids) - 1}' data-steps='{esc(json.dumps(steps))}' aria-label='step'> "
             f"<output id='step-label'>step {steps[-1]}</output> "
             "<label><input type='checkbox' id='all-steps'> all steps side by side</label></div>"]
    parts += grid_table("samples", grids[-1].prompts, groups, grids[-1].columns * (2 if base else 1))
    others = [g for g in run.grids if g not in grids]
    if others:
        parts.append("<p>Drawn with other sample settings (before a resume changed them): "
                     + ", ".join(f"<a href='{link(g.path, page)}'>step {g.step}</a>" for g in others) + "</p>")
    return parts + [SLIDER_SCRIPT]


def toy_points(run: Run) -> list:
    """Toy-world runs only: the subject and class-prior scores of each grid (base first), or []."""
    cfg = run.cfg
    if cfg is None or cfg.model.source != "toyworld" or not run.grids:
        return []
    shape = progress.class_shape_of(cfg.prior.class_prompt or "")

    trigger = rewrite(cfg.data.instance_prompt, cfg.pivotal)
    base = run.base_for(run.grids[-1])
    grids = ([base] if base else []) + run.comparable()
    if shape is None or not grids:
        return []
    return [progress.score(g.path, g.prompts, g.columns, g.step or 0, trigger if g.step else cfg.data.instance_prompt,
                           cfg.prior.class_prompt, shape) for g in grids]


def toy_scores_section(run: Run) -> list[str]:
    points = toy_points(run)
    if not points:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    for key, label in (("subject", "trigger prompt shows the subject"), ("class_shape", "class prompt keeps its shape"),
                       ("drift", "class prompt shows the subject (drift)")):
        values = [(p.step, getattr(p, key)) for p in points if getattr(p, key) is not None]
        if values:
            axis.plot(*zip(*values), marker="o", label=label)
    axis.set(xlabel="step (0: the base model)", ylabel="fraction of the grid's samples", ylim=(-0.05, 1.05))
    axis.legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    rows = "".join(f"<tr><td>{p.step}</td><td>{_rate(p.subject)}</td><td>{_rate(p.class_shape)}</td>"
                   f"<td>{_rate(p.drift)}</td></tr>" for p in points)
    return ["<h2>Toy-world scores over training</h2>",
            "<p>Read off the sample grids by the toy world's detector (a few seeds per prompt, so coarse; "
            "<code>lora-booth eval</code> measures with more): the subject rate should rise while the class "
            "prompt keeps its shape and does not turn into the subject.</p>",
            f"<img id='toy-scores' alt='toy-world scores' src='{data_uri(buffer.getvalue(), 'image/png')}'>",
            "<table id='toy-scores-table'><tr><th>step</th><th>subject</th><th>class shape</th><th>drift</th></tr>"
            f"{rows}</table>"]


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


# the slider shows one step's columns beside the base model's; without scripts every step shows
SLIDER_SCRIPT = """<script>(() => {
  const slider = document.getElementById('step-slider'), all = document.getElementById('all-steps');
  const label = document.getElementById('step-label'), steps = JSON.parse(slider.dataset.steps);
  const table = document.getElementById('samples');
  const show = () => {
    table.querySelectorAll('[data-k]').forEach(cell => cell.hidden = !all.checked && cell.dataset.k !== slider.value);
    table.style.setProperty('--tile', (all.checked ? table.dataset.allTile : table.dataset.tile) + 'px');
    label.textContent = all.checked ? 'all steps' : 'step ' + steps[slider.value];
    slider.disabled = all.checked;
  };
  slider.addEventListener('input', show); all.addEventListener('change', show); show();
})();</script>"""
