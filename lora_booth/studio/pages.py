"""The pages: server-rendered HTML, every user text (names, captions, prompts, logs) escaped here;
the live parts are filled by static/studio.js through the API, with textContent only."""
from __future__ import annotations

import time
from html import escape

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from ..config.loading import preset_names
from . import datasets, progress

STATUS_CLASS = {"queued": "queued", "running": "running", "done": "done", "failed": "failed", "stopped": "stopped"}


def page(title: str, kind: str, body: str, **data: object) -> HTMLResponse:
    attributes = " ".join(f'data-{escape(k.replace("_", "-"))}="{escape(str(v))}"' for k, v in data.items())
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · lora-booth studio</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/static/studio.css"></head>
<body data-page="{escape(kind)}" {attributes}>
<header><a class="brand" href="/">lora-booth studio</a>
<nav><a href="/">Runs</a><a href="/datasets">Datasets</a><a href="/runs/new">New run</a></nav></header>
<main>
<h1>{escape(title)}</h1>
{body}
</main><script src="/static/studio.js"></script></body></html>""")


def when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else ""


def add_routes(app: FastAPI, studio) -> None:
    ws = studio.workspace

    @app.get("/", response_class=HTMLResponse)
    def runs_page():
        rows = []
        queued = sorted((run for run in studio.store.all() if run.status == "queued"), key=lambda r: r.position)
        sooner = {later.id: earlier.id for earlier, later in zip(queued, queued[1:])}
        for run in studio.store.all():
            state = progress.snapshot(ws, run, 0)
            request = run.request
            what = request.get("instance_prompt") or request.get("data.instance_prompt") or request.get("preset", "")
            rows.append(f'<tr><td><input type="checkbox" class="pick" value="{run.id}" aria-label="compare run {run.id}"> '
                        f'<a href="/runs/{run.id}">run {run.id}</a></td>'
                        f'<td><span class="status {STATUS_CLASS[run.status]}">{run.status}</span></td>'
                        f'<td>{state["step"]} / {run.max_steps}</td><td>{escape(str(what))}</td>'
                        f'<td>{escape(when(run.created))}</td><td>'
                        + (f'<button type="button" class="sooner" data-run="{run.id}" data-before="{sooner[run.id]}">'
                           'run sooner</button>' if run.id in sooner else '') + '</td></tr>')
        table = ('<table class="runs"><thead><tr><th>run</th><th>status</th><th>step</th><th>subject</th>'
                 '<th>queued</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
                 '<p><button type="button" id="compare">Compare the ticked runs</button> '
                 '<span id="compare-message" class="message"></span></p>') if rows else \
            '<p>No runs yet: <a href="/datasets">upload photos</a>, then start a <a href="/runs/new">new run</a>.</p>'
        return page("Runs", "runs", table)

    @app.get("/datasets", response_class=HTMLResponse)
    def datasets_page():
        items = "".join(f'<li><a href="/datasets/{escape(name)}">{escape(name)}</a></li>'
                        for name in datasets.names(ws))
        body = (f'<ul class="datasets">{items or "<li>none yet</li>"}</ul>'
                '<form id="new-dataset"><label>New dataset <input id="dataset-name" name="name" required '
                'pattern="[A-Za-z0-9_][A-Za-z0-9._ \\-]{0,99}" placeholder="my-dog"></label>'
                '<button type="submit">Create</button></form><p class="message" id="dataset-message"></p>')
        return page("Datasets", "datasets", body)

    @app.get("/datasets/{name}", response_class=HTMLResponse)
    def dataset_page(name: str):
        photos = datasets.photos(ws, name)
        cards = "".join(photo_card(name, photo) for photo in photos)
        body = (f'<p>Folder <code>datasets/{escape(name)}</code>: use <code>instance_dir=datasets/{escape(name)}</code>. '
                'Photos (jpg, png, webp, bmp), captions (<code>photo.txt</code>) and masks '
                '(<code>photo.mask.png</code>) are taken; each photo is checked as <code>train</code> checks it.</p>'
                '<div id="drop" class="drop" tabindex="0">Drop photos, captions and masks here, or '
                '<label class="pick">choose files<input id="file-input" type="file" multiple hidden></label></div>'
                '<ul id="upload-result" class="refused"></ul>'
                f'<div id="photos" class="photos">{cards}</div>')
        return page(f"Dataset {name}", "dataset", body, dataset=name)

    @app.get("/runs/new", response_class=HTMLResponse)
    def new_run_page():
        options = "".join(f'<option value="datasets/{escape(n)}">{escape(n)}</option>' for n in datasets.names(ws))
        presets = "".join(f'<option value="{escape(n)}"{" selected" if n == "demo" else ""}>{escape(n)}</option>'
                          for n in preset_names())
        body = f"""<form id="new-run" class="new-run">
<label>Photos <select name="instance_dir">{options}</select></label>
<label>Base model <input name="model" value="toyworld" placeholder="a hub id, or a folder under the workspace"></label>
<div class="field"><label>Instance prompt <input name="instance_prompt" value="a photo of a sks star" required></label>
<ul id="trigger" class="trigger"></ul></div>
<label>Class prompt <input name="class_prompt" value="a photo of a star"></label>
<label>Preset <select name="preset"><option value="">(none: the defaults)</option>
<option value="auto">auto: the best that fits this GPU</option>{presets}</select></label>
<label>Steps <input name="max_steps" type="number" min="1" value="200"></label>
<label class="wide">Every other key (YAML, the CLI's names)
<textarea name="yaml" rows="6" spellcheck="false" placeholder="sample:&#10;  every: 50&#10;lora:&#10;  rank: 8"></textarea></label>
<div class="wide"><ul id="problems" class="problems"></ul><pre id="command" class="command"></pre></div>
<div class="wide"><button type="button" id="plan">Plan the memory of a step</button>
<pre id="plan-text" class="command"></pre></div>
<button type="submit" id="start" class="wide">Start the run</button></form>"""
        return page("New run", "new-run", body)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: int):
        run = studio.run_or_404(run_id)
        state = progress.snapshot(ws, run)
        prompt = run.request.get("instance_prompt") or run.request.get("data.instance_prompt") or ""
        body = f"""<p class="subject">{escape(str(prompt))}</p>
<div class="state"><span id="status" class="status {STATUS_CLASS[run.status]}">{run.status}</span>
<progress id="bar" max="{run.max_steps}" value="{state['step']}"></progress>
<span id="step">{state['step']} / {run.max_steps}</span> <span id="eta"></span> <span id="loss"></span>
<button id="stop" type="button">Stop (saves a checkpoint)</button>
<button id="save-now" type="button">Save now</button> <button id="sample-now" type="button">Sample now</button>
<button id="resume" type="button">Resume from the last checkpoint</button></div>
<pre id="error" class="error">{escape(run.error)}</pre>
<h2>Loss</h2><p class="hint">Blue: the training loss of each step; orange: the validation loss on held-out noise
(with <code>validate.every</code>).</p><svg id="chart" class="chart" viewBox="0 0 600 160" role="img" aria-label="training loss"></svg>
<h2>Samples</h2><p class="hint">Each grid as it is drawn; base.png is the base model without the adapter.</p>
<div id="samples" class="samples"></div>
<h2>Files</h2><ul id="files" class="files"></ul>
<h2>Generate</h2><p class="hint">Draw with this run's adapter (the final files or a checkpoint's) once the run
has ended: <code>lora-booth generate</code>, each request into a new folder.</p>
<form id="generate" class="generate"><select id="generate-checkpoint"><option value="">final</option></select>
<input id="generate-prompt" maxlength="1000" placeholder="a photo of sks dog on the beach" value="{escape(str(prompt))}">
<input id="generate-n" type="number" min="1" max="8" value="2"> <input id="generate-seed" type="number" min="0" value="0">
<button type="submit">Generate</button> <span id="generate-state"></span></form>
<div id="generated" class="samples"></div>
<h2>Log</h2><pre id="log" class="log">{escape(chr(10).join(state['log']))}</pre>"""
        return page(f"Run {run_id}", "run", body, run=run_id)


def photo_card(dataset: str, photo: dict) -> str:
    name = escape(photo["name"])
    mask = '<span class="badge">mask</span>' if photo["mask"] else ""
    return (f'<figure class="photo" data-photo="{name}"><img alt="{name}" loading="lazy" '
            f'src="/api/datasets/{escape(dataset)}/thumbnails/{name}"><figcaption>{name} {mask}</figcaption>'
            f'<textarea class="caption" rows="2" placeholder="caption (empty: the instance prompt)">'
            f'{escape(photo["caption"])}</textarea></figure>')
