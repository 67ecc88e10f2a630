"""output_dir/report.html: one self-contained page about a run (every image inside it as a data:
URI) — loss curves, the sample grids over training, timings and memory, the resolved config and,
when `lora-booth eval` has run, its scores. Written at the end of training; `lora-booth report
out/` writes it again from the files in the folder."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import statistics
from pathlib import Path

from . import __version__, atomic
from .logs import read_metrics
from .errors import DataError

CURVES = (("loss", "total loss"), ("instance_loss", "instance loss"), ("prior_loss", "prior loss (λ-free)"),
          ("lr", "learning rate"))
GRID_WIDTH = 768  # px of a sample grid inside the page; the full PNG stays in samples/


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}). Delete it or write it again.") from None


def curves_png(records: list[dict]) -> bytes:
    """Total, instance and prior loss and the learning rate over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6), dpi=90, layout="constrained")
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


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def grid_thumbnail(path: Path) -> bytes:
    """A JPEG no wider than GRID_WIDTH: a long run's grids keep the page a few MB."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > GRID_WIDTH:
            image = image.resize((GRID_WIDTH, round(image.height * GRID_WIDTH / image.width)), Image.LANCZOS)
        elif image.width * 2 <= GRID_WIDTH:  # small (toy) images: enlarge by whole pixels, up to 4×
            factor = min(4, GRID_WIDTH // image.width)
            image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def grid_prompts(path: Path) -> list[str]:
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get("prompts", "").splitlines()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1024
    return ""


def summary_rows(records: list[dict], run: dict | None) -> list[tuple[str, str, str]]:
    """(label, element id, value): the numbers a reader looks for first."""
    rows = []
    if records:
        last = records[-1]
        rows += [("steps", "final-step", str(last["step"])),
                 ("final loss (total / instance / prior)", "final-loss",
                  f"{last['loss']:.4f} / {last['instance_loss']:.4f} / {last['prior_loss']:.4f}")]
        seconds = [r["step_seconds"] for r in records if "step_seconds" in r]
        if seconds:
            rows.append(("seconds per step (median, incl. sample grids)", "step-seconds",
                         f"{statistics.median(seconds):.3f}"))
    if run:
        rows.append(("total time of the run", "total-seconds", f"{run['seconds']:.1f} s"))
        if run.get("peak_memory_bytes"):
            rows.append((f"peak memory ({run.get('peak_memory_of', '')})", "peak-memory",
                         human_bytes(run["peak_memory_bytes"])))
        rows.append(("device", "device", str(run.get("device", ""))))
    return rows


def eval_section(results: dict) -> list[str]:
    from .evaluate import SCORE_NAMES, describe_score

    parts = ["<h2>Evaluation (lora-booth eval)</h2>",
             f"<p>{html.escape(results.get('protocol', ''))}</p>", "<table id='eval'>",
             "<tr><th>score</th><th>value</th><th>meaning</th></tr>"]
    for name in SCORE_NAMES:
        if name in results.get("scores", {}):
            parts.append(f"<tr><td>{name}</td><td class='num'>{results['scores'][name]:.4f}</td>"
                         f"<td>{html.escape(describe_score(name))}</td></tr>")
    parts.append("</table>")
    return parts


def build_html(out: Path) -> str:
    records = read_metrics(out)
    run = read_json(out / "run.json")
    results = read_json(out / "eval.json")
    config_path = out / "config.yaml"
    if not records and not config_path.exists():
        raise DataError(f"{out}: no metrics.jsonl or config.yaml here. Point `lora-booth report` at a training "
                        "output_dir.")
    title = html.escape(f"lora-booth run: {out.resolve().name}")
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{title}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             ".num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
             f"<h1>{title}</h1>", f"<p>written by lora-booth {__version__}</p>", "<h2>Summary</h2>", "<table>"]
    for label, element_id, value in summary_rows(records, run):
        parts.append(f"<tr><th>{html.escape(label)}</th><td id='{element_id}' class='num'>{html.escape(value)}</td></tr>")
    parts.append("</table>")
    if records:
        parts += ["<h2>Loss curves</h2>",
                  f"<img id='curves' alt='loss curves' src='{data_uri(curves_png(records), 'image/png')}'>"]
    grids = sorted((out / "samples").glob("step-*.png"))
    if grids:
        prompts = grid_prompts(grids[-1])
        parts += ["<h2>Samples during training</h2>",
                  "<p>Same prompts and seeds at every step; rows: "
                  + ", ".join(f"<code>{html.escape(p)}</code>" for p in prompts) + "</p>"]
        for path in grids:
            step = int(re.sub(r"\D", "", path.stem) or 0)
            parts.append(f"<h3>step {step}</h3><a href='samples/{html.escape(path.name)}'>"
                         f"<img class='grid' alt='samples at step {step}' "
                         f"src='{data_uri(grid_thumbnail(path), 'image/jpeg')}'></a>")
    if results:
        parts += eval_section(results)
    if config_path.exists():
        parts += ["<h2>Resolved configuration (config.yaml)</h2>",
                  f"<pre id='config'>{html.escape(config_path.read_text(encoding='utf-8'))}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: str | Path) -> Path:
    out = Path(out)
    if not out.is_dir():
        raise DataError(f"{out}: no such folder. Point `lora-booth report` at a training output_dir.")
    path = out / "report.html"
    atomic.write_text(path, build_html(out))
    return path
