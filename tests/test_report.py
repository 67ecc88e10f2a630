"""Logs and the run report: TensorBoard gets the scalars and sample grids; report.html labels every
grid, steps through the saved grids beside the base model's, names the run's settings and loads
every image in a real (headless) browser; `lora-booth report a/ b/` compares runs on one page."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess

import pytest
import torch
import yaml
from PIL import Image

from lora_booth import cli
from lora_booth.config import loading
from lora_booth.results import report, sample
from lora_booth.results import logs
from lora_booth.io.errors import ConfigError
from lora_booth.training.recipe import run

from conftest import tiny_config

KEYS = {"sample.num": 2, "sample.every": 2, "sample.steps": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps on the tiny model with TensorBoard and sample grids (2 seeds) at steps 2 and 4."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the [test] extra")
    from conftest import make_photos

    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config(root, make_photos(root), **KEYS, **{"log.to": "tensorboard"})
    run(cfg, report=lambda *_: None)
    return root / "out"


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory):
    """A copy of the trained run, continued to step 6: a second run for the comparison page, and a
    resume that must keep the base model's grid. Returns the folder and that grid's bytes and mtime."""
    copy = tmp_path_factory.mktemp("resumed") / "out"
    shutil.copytree(trained, copy)
    base = copy / "samples" / sample.BASE_GRID
    before = base.read_bytes(), base.stat().st_mtime_ns
    cfg, _ = loading.resolve({"resume": str(copy), "max_steps": "6"})
    run(cfg, report=lambda *_: None)
    return copy, before


def test_tensorboard_event_file_holds_the_scalars_and_sample_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = logs.read_metrics(trained)
    for name in ("loss", "instance_loss", "prior_loss", "lr", "step_seconds"):
        logged = events.Scalars(f"train/{name}")
        assert [e.step for e in logged] == [1, 2, 3, 4]
        assert [e.value for e in logged] == pytest.approx([r[name] for r in records], rel=1e-6)
    images = events.Images("samples")
    assert [i.step for i in images] == [2, 4]
    # one row per sample prompt (instance, class and 3 templates), one 32 px column per seed
    assert (images[-1].width, images[-1].height) == (2 * 32, 5 * 32)


def test_run_json_records_time_and_memory(trained):
    summary = json.loads((trained / "run.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 4
    assert summary["seconds"] > 0 and summary["peak_memory_bytes"] > 0


def test_the_base_grid_is_drawn_once_and_changes_no_training_number(trained, resumed, tmp_path):
    """samples/base.png: the adapters disabled, the same prompts and seeds as the step grids. A run
    without any grid trains bit-identically, and a resumed run keeps the grid it has."""
    from conftest import make_photos
    from safetensors.torch import load_file

    with Image.open(trained / "samples" / sample.BASE_GRID) as base, \
            Image.open(trained / "samples" / "step-00000004.png") as last:
        assert base.info["adapters"] == "none" and base.info["settings"] == last.info["settings"]
        assert base.size == last.size and base.info["prompts"] == last.info["prompts"]
        assert base.tobytes() != last.tobytes()  # the adapters were off for one and on for the other
    copy, (content, mtime) = resumed
    assert (copy / "samples" / "step-00000006.png").is_file()
    base = copy / "samples" / sample.BASE_GRID
    assert base.read_bytes() == content and base.stat().st_mtime_ns == mtime  # not drawn again
    plain = tiny_config(tmp_path, make_photos(tmp_path), **{"sample.num": 0, "log.to": "tensorboard"})
    run(plain, report=lambda *_: None)
    losses = [[r[k] for k in ("loss", "instance_loss", "prior_loss")] for r in logs.read_metrics(trained)]
    assert [[r[k] for k in ("loss", "instance_loss", "prior_loss")] for r in logs.read_metrics(tmp_path / "out")] \
        == losses
    drawn, undrawn = (load_file(str(out / "pytorch_lora_weights.safetensors")) for out in (trained, tmp_path / "out"))
    assert drawn.keys() == undrawn.keys() and all(torch.equal(drawn[k], undrawn[k]) for k in drawn)


# what the page's reader sees once its script has run: labels, the slider and which columns show
PROBE = """
const q = selector => [...document.querySelectorAll(selector)];
const texts = selector => q(selector).map(e => e.textContent.trim());
const shown = () => [...new Set(q('#samples td[data-k]').filter(td => !td.hidden).map(td => td.dataset.k))];
const cells = {};
q('td[id]').forEach(td => cells[td.id] = td.textContent);
const slider = document.getElementById('step-slider');
const result = {widths: q('img').map(i => i.naturalWidth), cells: cells, prompts: texts('table.grid th.prompt'),
                groups: texts('table.grid th.group'), seeds: texts('table.grid th.seed'),
                base_tiles: q('table.grid td:not([data-k]):not([data-run]) img').length,
                photos: q('#photos img').length, config_keys: texts('#config-changed code'),
                runs: texts('#summary th.run')};
if (slider) {
  Object.assign(result, {slider: [slider.min, slider.max, slider.value], shown_at_load: shown(),
                         label_at_load: document.getElementById('step-label').textContent});
  slider.value = '0'; slider.dispatchEvent(new Event('input'));
  Object.assign(result, {shown_at_first: shown(), label_at_first: document.getElementById('step-label').textContent});
  document.getElementById('all-steps').click();
  result.shown_all = shown();
}
"""


def chromium_probe(page, tmp_path) -> dict:
    """Loads a copy of `page` (beside it, so relative links resolve) with a script that writes what
    PROBE finds into the DOM after load, then reads the DOM back."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    probe = ("<script>window.addEventListener('load', () => {" + PROBE +
             "const pre = document.createElement('pre'); pre.id = 'probe-result';"
             "pre.textContent = JSON.stringify(result); document.body.appendChild(pre);});</script>")
    copy = page.parent / "report-probe.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    try:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
                              "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120).stdout
    finally:
        copy.unlink()
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert found, f"chromium did not run the probe; DOM starts {dom[:300]!r}"
    import html
    return json.loads(html.unescape(found.group(1)))


def test_report_labels_every_grid_and_steps_through_them(trained, tmp_path):
    page = trained / "report.html"
    assert page.exists()  # written at the end of training
    prompts = sample.default_prompts(loading.from_dict(yaml.safe_load((trained / "config.yaml").read_text())))
    text = page.read_text()
    sources = re.findall(r"<img[^>]*\ssrc=['\"]([^'\"]*)", text)
    tiles = len(prompts) * 2 * 3  # 2 seeds × (the base model, step 2, step 4)
    assert len(sources) == 1 + 3 + tiles and all(s.startswith("data:image/") for s in sources)  # self-contained
    result = chromium_probe(page, tmp_path)
    assert len(result["widths"]) == 1 + 3 + tiles and all(width > 0 for width in result["widths"])  # all decoded
    assert result["prompts"] == prompts                                   # the prompt beside every row
    assert result["seeds"] == ["seed 0 · #1", "seed 0 · #2"] * 3           # the seed above every column
    assert result["groups"][0].startswith("base model") and result["base_tiles"] == len(prompts) * 2
    assert [g.split(" (")[0] for g in result["groups"][1:]] == ["step 2", "step 4"]
    grids = sorted((trained / "samples").glob("step-*.png"))
    assert result["slider"] == ["0", str(len(grids) - 1), str(len(grids) - 1)]  # one position per saved grid
    assert (result["shown_at_load"], result["label_at_load"]) == (["1"], "step 4")
    assert (result["shown_at_first"], result["label_at_first"]) == (["0"], "step 2")
    assert result["shown_all"] == ["0", "1"]
    assert result["photos"] == 3                                          # the training photos
    cells = result["cells"]
    last = logs.read_metrics(trained)[-1]
    assert cells["final-step"] == "4" and cells["final-loss"].startswith(f"{last['loss']:.4f}")
    assert (cells["trigger"], cells["base-model"], cells["instance-prompt"]) == ("sks", "tiny", "a photo of sks dog")
    assert cells["class-prompt"].startswith("a photo of dog") and cells["lr"].startswith("0.01")
    assert cells["adapter"].startswith("lora, rank 2, alpha 2")
    assert cells["images"] == "3 instance photos, 4 class images" and cells["total-seconds"].endswith(" s")
    assert result["config_keys"][:2] == ["model.source", "lora.rank"] and "optim.lr" in result["config_keys"]
    assert "sample.num" not in result["config_keys"]  # a default: only in the folded full config
    assert re.search(r"<details><summary>the full resolved configuration.*num: 2", text, re.S)


def test_report_verb_writes_it_again(trained, capsys):
    (trained / "report.html").unlink()
    assert cli.main(["report", str(trained)]) == 0
    assert (trained / "report.html").exists() and "report.html" in capsys.readouterr().out
    assert cli.main(["report", str(trained / "missing")]) == 1
    assert cli.verb_arguments("report", ["a/", "dir=b/", "--out", "c.html"]) == {"dir": ["a/", "b/"], "out": "c.html"}


def test_report_compares_runs_on_one_page(trained, resumed, tmp_path, monkeypatch, capsys):
    copy, _ = resumed
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", str(trained), str(copy)]) == 0
    page = tmp_path / report.COMPARISON
    written = page.read_text()
    assert cli.main(["report", str(trained), str(copy)]) == 2  # never replaced without overwrite=true
    assert "overwrite=true" in capsys.readouterr().err and page.read_text() == written
    assert cli.main(["report", str(trained), str(copy), "overwrite=true"]) == 0
    result = chromium_probe(page, tmp_path)
    assert all(width > 0 for width in result["widths"])
    assert result["runs"] == [str(trained), str(copy)]  # both folders are called out/: named by path
    assert (result["cells"]["final-step-0"], result["cells"]["final-step-1"]) == ("4", "6")
    assert len(result["prompts"]) == 5 and result["seeds"] == ["seed 0 · #1", "seed 0 · #2"] * 3  # one table, same seeds
    assert result["groups"][0].startswith("base model") and result["base_tiles"] == 5 * 2
    assert result["groups"][1].startswith(f"{trained}: step 4") and result["groups"][2].startswith(f"{copy}: step 6")
    assert "train.max_steps" in written and written.count("class='curves'") == 2  # what differs; each run's curves
    assert cli.main(["report", str(trained), "out=" + str(tmp_path / "one.html")]) == 0  # one run, elsewhere
    assert "samples/step-00000004.png" in (tmp_path / "one.html").read_text()  # its links reach the run's files


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_when_absent_is_a_clear_error(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, **{"log.to": "wandb"})
    with pytest.raises(ConfigError, match="pip install wandb"):
        run(cfg, report=lambda *_: None)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unknown_log_target_names_the_key(tmp_path, photos):
    with pytest.raises(ConfigError, match="log.to"):
        tiny_config(tmp_path, photos, **{"log.to": "mlflow"})
