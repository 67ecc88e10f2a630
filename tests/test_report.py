"""Logs and the run report: TensorBoard gets the scalars and sample grids, report.html shows the
run's numbers and every image loads in a real (headless) browser."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess

import pytest

from lora_booth import cli, report
from lora_booth.errors import ConfigError
from lora_booth.recipe import run

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps on the tiny model with TensorBoard and a sample grid at steps 2 and 4."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the [test] extra")
    from conftest import make_photos

    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config(root, make_photos(root), **{"sample.num": 1, "sample.every": 2, "sample.steps": 2,
                                                  "log.to": "tensorboard"})
    run(cfg, report=lambda *_: None)
    return root / "out"


def test_tensorboard_event_file_holds_the_scalars_and_sample_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = report.read_metrics(trained)
    for name in ("loss", "instance_loss", "prior_loss", "lr", "step_seconds"):
        logged = events.Scalars(f"train/{name}")
        assert [e.step for e in logged] == [1, 2, 3, 4]
        assert [e.value for e in logged] == pytest.approx([r[name] for r in records], rel=1e-6)
    images = events.Images("samples")
    assert [i.step for i in images] == [2, 4]
    # one row per sample prompt (instance, class and 3 templates), one 32 px column
    assert (images[-1].width, images[-1].height) == (32, 5 * 32)


def test_run_json_records_time_and_memory(trained):
    summary = json.loads((trained / "run.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 4
    assert summary["seconds"] > 0 and summary["peak_memory_bytes"] > 0


def chromium_probe(page, tmp_path) -> dict:
    """Loads a copy of `page` (beside it, so relative links resolve) with a script that writes every
    image's naturalWidth and the summary cells into the DOM, then reads the DOM back."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    probe = ("<script>window.addEventListener('load', () => {"
             "const cells = {}; document.querySelectorAll('td[id]').forEach(td => cells[td.id] = td.textContent);"
             "const result = {widths: [...document.images].map(i => i.naturalWidth), cells: cells};"
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


def test_report_shows_the_runs_numbers_and_every_image_loads(trained, tmp_path):
    page = trained / "report.html"
    assert page.exists()  # written at the end of training
    text = page.read_text()
    sources = re.findall(r"<img[^>]*\ssrc=['\"]([^'\"]*)", text)
    assert len(sources) == 3 and all(s.startswith("data:image/") for s in sources)  # self-contained
    result = chromium_probe(page, tmp_path)
    # the curves plot and the grids at steps 2 and 4, each decoded by the browser
    assert len(result["widths"]) == 3 and all(width > 0 for width in result["widths"])
    last = report.read_metrics(trained)[-1]
    assert result["cells"]["final-step"] == "4"
    assert result["cells"]["final-loss"].startswith(f"{last['loss']:.4f}")


def test_report_verb_writes_it_again(trained, capsys):
    (trained / "report.html").unlink()
    assert cli.main(["report", str(trained)]) == 0
    assert (trained / "report.html").exists() and "report.html" in capsys.readouterr().out
    assert cli.main(["report", str(trained / "missing")]) == 1


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_when_absent_is_a_clear_error(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, **{"log.to": "wandb"})
    with pytest.raises(ConfigError, match="pip install wandb"):
        run(cfg, report=lambda *_: None)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unknown_log_target_names_the_key(tmp_path, photos):
    with pytest.raises(ConfigError, match="log.to"):
        tiny_config(tmp_path, photos, **{"log.to": "mlflow"})
