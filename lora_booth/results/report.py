"""output_dir/report.html: one self-contained page about a run (every image inside it as a data:
URI) that answers "which step do I ship?": the run's summary, the training photos, the sample grids
of every saved step behind a slider beside the base model on the same prompts and seeds, loss
curves, timings, the config (non-default keys first) and, when `lora-booth eval` has run, its
scores. Written at the end of training; `lora-booth report out/` writes it again, and
`lora-booth report a/ b/ out=page.html` puts several runs on one page."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic, manifest, untrusted
from ..io.errors import ConfigError
from ..io.version import __version__
from .charts import curves_png, validation_png
from .report_sections import (config_section, config_value, esc, eval_section, flat, grid_table, link,
                              photos_section, samples_section, summary_rows, toy_scores_section)
from .run_record import Run, data_uri, read_run

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
