"""output_dir/report.html: one self-contained page about a run (every image inside it as a data:
URI) that answers "which step do I ship?": the run's summary, the training photos, the sample grids
of every saved step behind a slider beside the base model on the same prompts and seeds, loss
curves, timings, the config (non-default keys first) and, when `lora-booth eval` has run, its
scores. Written at the end of training; `lora-booth report out/` writes it again, and
`lora-booth report a/ b/ out=page.html` puts several runs on one page."""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
import statistics
import urllib.parse
from pathlib import Path

import yaml

from . import __version__, atomic, checkpoint, manifest, untrusted
from .config import Config, from_dict, shown
from .errors import ConfigError, DataError, LoraBoothError
from .logs import read_metrics
from .sample import BASE_GRID

CURVES = (("loss", "total loss"), ("instance_loss", "instance loss"), ("prior_loss", "prior loss (λ-free)"),
          ("lr", "learning rate"))
TILE = 256          # px: the most a sample image keeps inside the page; the full PNGs stay in samples/
PAGE_WIDTH = 1040   # px of images a row of tiles may fill, beside the prompts' column
PHOTO_HEIGHT = 96   # px of a training photo's thumbnail
MAX_PHOTOS = 40
COMPARISON = "lora-booth-compare.html"  # `report a/ b/` without out=, in the current folder

STYLE = ("body{font-family:sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
         "vertical-align:top}.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto}.scroll{overflow-x:auto}"
         "table.grid td,table.grid th{padding:2px}"
         "table.grid th.prompt{min-width:9em;max-width:14em;font-weight:normal;vertical-align:middle}"
         "table.grid th.seed{font-weight:normal;font-size:80%;color:#555;text-align:center}"
         "table.grid th.group{text-align:center;background:#eef}table.grid th.base{background:#efe}"
         "img.tile{display:block;max-width:none;width:var(--tile)}img.pixels{image-rendering:pixelated}"
         ".strip{display:flex;gap:4px;overflow-x:auto}.strip img{height:96px;max-width:none}"
         ".differs{background:#fff3c4}.runs{display:flex;gap:1em}.runs>div{flex:1;min-width:0}"
         "#controls{margin:.5em 0}#step-slider{width:min(40em,90%);vertical-align:middle}")
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


MAX_JSON_BYTES = 16 * untrusted.MiB    # run.json and eval.json are a few KiB
MAX_CONFIG_BYTES = 1 * untrusted.MiB   # as for any config file
MAX_STATE_BYTES = 64 * untrusted.MiB   # a checkpoint's state.json: its optimizer layout grows with the adapter
# what each file's keys must hold when present: anything else is refused with the file and key named
RUN_FIELDS = {"steps": (int,), "steps_this_run": (int,), "seconds": (float,), "peak_memory_bytes": (float,),
              "peak_memory_of": (str,), "device": (str,)}
EVAL_FIELDS = {"protocol": (str,), "scores": (dict,)}


def read_json(path: Path, fields: dict | None = None) -> dict | None:
    """A JSON file of the run folder (run.json, eval.json): untrusted, so checked for kind, size and types."""
    if not os.path.lexists(path):
        return None
    data = untrusted.read_json(path, MAX_JSON_BYTES)
    untrusted.check_fields(data, fields or {}, untrusted.shown_path(path))
    if isinstance(data.get("scores"), dict):
        for name, value in data["scores"].items():
            if not untrusted.is_number(value):
                raise DataError(f"{untrusted.shown_path(path)}: score {str(name)[:60]!r} is {str(value)[:60]!r}, "
                                "not a number. Run `lora-booth eval` again to rewrite it.")
    return data


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def jpeg_uri(image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg")


@dataclasses.dataclass
class Grid:
    """samples/step-N.png (or base.png): one row per prompt, one column per seed."""
    path: Path
    step: int | None       # None: the base model without adapters
    prompts: list[str]
    seed: str
    columns: int
    tile_width: int        # px of one image in the PNG
    settings: str          # sample.grid_settings: grids with equal settings compare image by image

    @property
    def layout(self) -> tuple:
        return self.settings, tuple(self.prompts), self.columns

    def tiles(self) -> list[list[str]]:
        """Each image as a JPEG data URI, small ones enlarged by whole pixels (up to 4×)."""
        from PIL import Image

        with Image.open(self.path) as sheet:
            sheet = sheet.convert("RGB")
            width, height = sheet.width // self.columns, sheet.height // len(self.prompts)
            factor = max(1, min(4, TILE // width))
            rows = []
            for r in range(len(self.prompts)):
                row = []
                for c in range(self.columns):
                    tile = sheet.crop((c * width, r * height, (c + 1) * width, (r + 1) * height))
                    if factor > 1:
                        tile = tile.resize((width * factor, height * factor), Image.NEAREST)
                    elif width > TILE:
                        tile = tile.resize((TILE, round(height * TILE / width)), Image.LANCZOS)
                    row.append(jpeg_uri(tile))
                rows.append(row)
        return rows


MAX_GRID_BYTES = 256 * untrusted.MiB


def read_grid(path: Path) -> Grid | None:
    """A sample grid and the layout its PNG text records, or None for a file that is no readable
    grid (a pipe or folder in its place is never opened; a layout that does not fit the image is
    not believed)."""
    from PIL import Image

    try:
        untrusted.check_regular(path, MAX_GRID_BYTES)
        with Image.open(path) as image:
            info, size = dict(image.info), image.size
    except (OSError, ValueError, DataError, Image.DecompressionBombError):
        return None
    prompts = [p for p in str(info.get("prompts", "")).splitlines() if p] or ["(prompt not recorded)"]
    if len(prompts) > max(1, size[1]):  # more rows than pixels: the text is not this image's
        prompts = prompts[:1]
    named = str(info.get("num", ""))
    # older grids name no column count: their images are square
    columns = int(named) if named.isdigit() and 0 < int(named) <= size[0] else \
        max(1, size[0] // max(1, size[1] // len(prompts)))
    columns = min(columns, max(1, size[0]))
    step = int(re.sub(r"\D", "", path.stem) or 0) if path.name != BASE_GRID else None
    return Grid(path, step, prompts, str(info.get("seed", "?")), columns, size[0] // columns,
                str(info.get("settings", "")))


@dataclasses.dataclass
class Run:
    """What the page says about one output folder, read from its files."""
    out: Path
    records: list[dict]
    summary: dict | None       # run.json
    results: dict | None       # eval.json
    config_text: str
    cfg: Config | None
    grids: list[Grid]          # oldest first
    base: Grid | None

    @property
    def name(self) -> str:
        return self.out.resolve().name

    def comparable(self) -> list[Grid]:
        """The grids drawn with the newest grid's prompts and seeds: the ones the slider steps through."""
        return [g for g in self.grids if g.layout == self.grids[-1].layout]

    def base_for(self, grid: Grid) -> Grid | None:
        return self.base if self.base and self.base.settings and self.base.settings == grid.settings else None


def read_run(out: Path) -> Run:
    out = Path(out)
    if not out.is_dir():
        raise DataError(f"{out}: no such folder. Point `lora-booth report` at a training output_dir.")
    records = read_metrics(out)
    config_path = out / "config.yaml"
    if not records and not config_path.exists():
        raise DataError(f"{out}: no metrics.jsonl or config.yaml here. Point `lora-booth report` at a training "
                        "output_dir.")
    text = untrusted.clean_text(untrusted.read_text(config_path, MAX_CONFIG_BYTES)) \
        if os.path.lexists(config_path) else ""
    try:
        cfg = from_dict(yaml.safe_load(text) or {}) if text else None
    except (LoraBoothError, yaml.YAMLError, AttributeError, TypeError, ValueError, RecursionError):
        cfg = None  # written by another version, or not by lora-booth: shown as text only
    grids = [g for g in map(read_grid, sorted((out / "samples").glob("step-*.png"))) if g]
    return Run(out, records, read_json(out / "run.json", RUN_FIELDS), read_json(out / "eval.json", EVAL_FIELDS),
               text, cfg, grids, read_grid(out / "samples" / BASE_GRID)
               if os.path.lexists(out / "samples" / BASE_GRID) else None)


def curves_png(records: list[dict], size: tuple[float, float] = (10, 6)) -> bytes:
    """Total, instance and prior loss and the learning rate over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=90, layout="constrained")
    steps = [r["step"] for r in records]
    for index, (key, title) in enumerate(CURVES):
        axes = figure.add_subplot(2, 2, index + 1)
        values = [r.get(key, float("nan")) for r in records]
        axes.plot(steps, values, color="C0" if key != "lr" else "C1", linewidth=1)
        if key != "lr" and len(values) >= 10:  # per-step losses are noisy: a moving average shows the trend
            window = max(2, len(values) // 20)
            smooth = [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
            axes.plot(steps, smooth, color="C3", linewidth=1.5, label=f"mean of {window}")
            axes.legend(loc="upper right", fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


VALIDATION = (("val_instance_loss", "instance rows", "C0"), ("val_prior_loss", "class rows (λ-free)", "C2"))


def validation_points(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that hold a validation loss (validate.every)."""
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def lowest(points: list[tuple[int, float]]) -> tuple[int, float]:
    """The (step, value) of the smallest value, the earliest step on a tie."""
    return min(points, key=lambda point: (point[1], point[0]))


def validation_png(records: list[dict]) -> bytes | None:
    """The validation losses over steps, each curve's minimum marked; None when none was logged."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    curves = [(validation_points(records, key), label, color) for key, label, color in VALIDATION]
    curves = [curve for curve in curves if curve[0]]
    if not curves:
        return None
    figure = Figure(figsize=(10, 3.5), dpi=90, layout="constrained")
    for index, (points, label, color) in enumerate(curves):
        axes = figure.add_subplot(1, len(curves), index + 1)
        axes.plot([s for s, _ in points], [v for _, v in points], color=color, linewidth=1, marker=".")
        step, value = lowest(points)
        axes.plot([step], [value], "o", markersize=9, markerfacecolor="none", color="C3",
                  label=f"minimum {value:.4f} at step {step}")
        axes.legend(loc="upper right", fontsize=8)
        axes.set_title(f"validation loss: {label}", fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1024
    return ""


def trained_counts(out: Path) -> tuple[int, int] | None:
    """(instance photos, class images) as the newest checkpoint's data fingerprint lists them."""
    folders = checkpoint.folders(out)
    try:
        data = untrusted.read_json(folders[-1] / "state.json", MAX_STATE_BYTES)["data"] if folders else None
        return (len(data["instance"]), len(data["class"])) if data else None
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None


def summary_rows(run: Run) -> list[tuple[str, str, str]]:
    """(label, element id, value): the numbers and names a reader looks for first."""
    from .trigger import candidates

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
    from .evaluate import SCORE_NAMES, describe_score

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

    from .data import image_paths, resolve_dir

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
    from .toyworld import progress

    cfg = run.cfg
    if cfg is None or cfg.model.source != "toyworld" or not run.grids:
        return []
    shape = progress.class_shape_of(cfg.prior.class_prompt or "")
    from .pivotal import rewrite

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


def head(title: str) -> list[str]:
    return ["<!DOCTYPE html>", f"<html><head><meta charset='utf-8'>{GENERATOR}",
            f"<title>{esc(title)}</title>", f"<style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>",
            f"<p>written by lora-booth {__version__}</p>"]


def build_html(out: Path, page: Path | None = None) -> str:
    run = read_run(out)
    page = page or run.out / "report.html"
    parts = head(f"lora-booth run: {run.name}") + ["<h2>Summary</h2>", "<table id='summary'>"]
    for label, element_id, value in summary_rows(run):
        parts.append(f"<tr><th>{esc(label)}</th><td id='{element_id}'>{esc(value)}</td></tr>")
    parts.append("</table>")
    parts += photos_section(run) + samples_section(run, page)
    if run.records:
        parts += ["<h2>Loss curves</h2>",
                  f"<img id='curves' alt='loss curves' src='{data_uri(curves_png(run.records), 'image/png')}'>"]
        validation = validation_png(run.records)
        if validation:
            parts += ["<p>Validation loss (validate.every): the same held-out rows, timesteps and noise at every "
                      "evaluation, so the curve compares steps; the circle marks its minimum.</p>",
                      f"<img id='validation' alt='validation loss' src='{data_uri(validation, 'image/png')}'>"]
    parts += toy_scores_section(run)
    if run.results:
        parts += eval_section(run.results)
    parts += config_section(run)
    parts.append("</body></html>")
    return "\n".join(parts)


def comparison_html(runs: list[Run], page: Path) -> str:
    """Several runs on one page: their summaries side by side (differences marked), the settings
    that differ, each run's final grid on the same prompts and seeds, and each run's loss curves."""
    names = [run.name if [r.name for r in runs].count(run.name) == 1 else str(run.out) for run in runs]
    columns = "".join(f"<th class='run'>{esc(n)}</th>" for n in names)
    parts = head(f"lora-booth: {len(runs)} runs compared") + ["<h2>Summary</h2>", "<table id='summary'>",
                                                              f"<tr><th></th>{columns}</tr>"]
    tables = [{label: (element_id, value) for label, element_id, value in summary_rows(run)} for run in runs]
    for label in dict.fromkeys(label for table in tables for label in table):
        values = [table.get(label, ("", "—")) for table in tables]
        cells = "".join(f"<td id='{element_id}-{i}'>{esc(value)}</td>" if element_id else f"<td>{esc(value)}</td>"
                        for i, (element_id, value) in enumerate(values))
        differs = " class='differs'" if len({value for _, value in values}) > 1 else ""
        parts.append(f"<tr{differs}><th>{esc(label)}</th>{cells}</tr>")
    configs = [flat(run.cfg.to_dict()) if run.cfg else {} for run in runs]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if len({json.dumps(c.get(k)) for c in configs}) > 1]
    parts += ["</table>", "<h2>Settings that differ</h2>", "<table id='config-differs'>",
              f"<tr><th>key</th>{columns}</tr>"]
    parts += [f"<tr><td><code>{esc(k)}</code></td>" + "".join(f"<td>{esc(config_value(c.get(k, '—')))}</td>"
                                                               for c in configs) + "</tr>" for k in keys]
    parts += ["</table>", *final_samples(runs, names, page), "<h2>Loss curves</h2>", "<div class='runs'>"]
    for name, run in zip(names, runs):
        image = (f"<img class='curves' alt='loss curves of {esc(name)}' "
                 f"src='{data_uri(curves_png(run.records, (6, 4.5)), 'image/png')}'>" if run.records else "no metrics")
        parts.append(f"<div><h3>{esc(name)}</h3>{image}</div>")
    parts += ["</div>", "</body></html>"]
    return "\n".join(parts)


def final_samples(runs: list[Run], names: list[str], page: Path) -> list[str]:
    """Each run's last grid: one table when all share prompts and seeds, beside the base model's
    grid when they also share the base model."""
    finals = [(name, run, run.grids[-1]) for name, run in zip(names, runs) if run.grids]
    parts = ["<h2>Samples at each run's final step</h2>"] if finals else []
    groups = [(f"{esc(name)}: step {g.step} (<a href='{link(g.path, page)}'>PNG</a>)", g, f" data-run='{i}'")
              for i, (name, run, g) in enumerate(finals)]
    if len({g.layout for _, _, g in finals}) == 1:
        base = finals[0][1].base_for(finals[0][2])
        if base and len({run.cfg.model.source if run.cfg else None for _, run, _ in finals}) == 1:
            groups.insert(0, ("base model, no adapter", base, ""))
        parts.append("<p>The same prompts and seeds in every run: each row is one prompt, each column one seed.</p>")
        parts += grid_table("compare-samples", finals[0][2].prompts, groups, sum(g.columns for _, g, _ in groups))
    elif finals:
        parts.append("<p>These runs drew their samples with different prompts, seeds or sizes, so each grid is "
                     "shown with its own labels.</p>")
        for i, group in enumerate(groups):
            parts += grid_table(f"compare-samples-{i}", group[1].prompts, [group], group[1].columns)
    missing = [name for name, run in zip(names, runs) if not run.grids]
    if missing:
        parts.append(f"<p>No sample grids in {esc(', '.join(missing))} (sample.num=0).</p>")
    return parts


GENERATOR = "<meta name='generator' content='lora-booth'>"  # also how a report.html of lora-booth's is known


def write_report(out: str | Path) -> Path:
    """out/report.html, the run's own page (replaced every time)."""
    out = Path(out)
    path = out / "report.html"
    manifest.check_replaceable(path, "the report", GENERATOR.encode())
    atomic.write_text(path, untrusted.clean_text(build_html(out)))
    manifest.note_on_disk(path)
    return path


def write(folders: list[str | Path], page: str | Path | None = None, overwrite: bool = False) -> Path:
    """`lora-booth report`: one folder → its report.html (or `page`); several → one comparison page
    at `page` (default lora-booth-compare.html here). A page given by out= (or that default) is
    replaced only with overwrite=true; a run's own report.html always."""
    folders = [Path(f).expanduser() for f in folders]
    if len(folders) == 1 and page is None:
        return write_report(folders[0])
    path = Path(page if page is not None else COMPARISON).expanduser()
    if path.is_dir():
        path = path / (COMPARISON if len(folders) > 1 else "report.html")
    if path.exists() and not overwrite:
        raise ConfigError("out", f"names {path}, which exists", "choose another out=, or pass overwrite=true to "
                          "replace it")
    text = build_html(folders[0], path) if len(folders) == 1 else comparison_html([read_run(f) for f in folders], path)
    atomic.write_text(path, untrusted.clean_text(text))
    return path
