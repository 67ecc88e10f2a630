"""The studio as a person uses it: a real `lora-booth ui` server process, driven in headless Chromium
by Playwright (upload the demo photos, start a short run, watch it finish, see the grids, download
the adapter), and the server killed mid-run and started again (the run resumes from its checkpoint).

LORA_BOOTH_SCREENSHOTS=docs saves a screenshot of each page into docs/ (docs/ui.md shows them)."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the studio's libraries are in the [ui] and [test] extras")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "lora_booth" / "samples" / "toystar"
URL_LINE = re.compile(r"lora-booth studio: (http://\S+)")


class Server:
    """`lora-booth ui workspace=… port=0` as its own process; its URL read from what it prints."""

    def __init__(self, workspace: Path, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(log.parent / "home")}
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "lora_booth", "ui", f"workspace={workspace}", "port=0"],
                                        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            found = URL_LINE.search(log.read_text())
            if found:
                self.url = found.group(1).rstrip("/")
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.process.kill()
        raise AssertionError(f"the studio did not start: {log.read_text()[-2000:]}")

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, method=method, headers={"X-Lora-Booth": "1",
                                         "Content-Type": "application/json"},
                                         data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def wait_for(self, run_id: int, done, timeout_s: float = 240, poll_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.call("GET", f"/api/runs/{run_id}")
            if done(state):
                return state
            assert state["status"] != "failed", state["error"]
            time.sleep(poll_s)
        raise AssertionError(f"run {run_id} did not get there: {state}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()   # a clean shutdown: its runs save a checkpoint first
            self.process.wait(120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the train process follows the server through "
                    "Linux's parent-death signal")
def test_killing_the_server_mid_run_resumes_the_run_from_its_checkpoint(tmp_path):
    """...and the resumed run's adapter is the one the same keys give in a terminal, uninterrupted."""
    workspace = tmp_path / "ws"
    first = Server(workspace, tmp_path / "server-1.log")
    try:
        run_id = first.call("POST", "/api/runs", {"preset": "demo", "max_steps": 24, "save.checkpoint_every": 4,
                                                  "sample.num": 0})["id"]
        killed_at = first.wait_for(run_id, lambda state: state["step"] >= 6, poll_s=0.05)   # step 4's checkpoint is on disk
    finally:
        first.process.send_signal(signal.SIGKILL)                  # no shutdown handler runs
        first.process.wait()
    assert killed_at["status"] == "running" and killed_at["step"] < 24   # mid-run
    with sqlite3.connect(workspace / "studio.db") as db:
        (train_pid,) = db.execute("SELECT pid FROM runs WHERE id = ?", (run_id,)).fetchone()
    second = Server(workspace, tmp_path / "server-2.log")          # at once: the old train process may still save
    try:
        state = second.wait_for(run_id, lambda state: state["status"] == "done")
    finally:
        second.close()
    assert not alive(train_pid)
    log = (workspace / "logs" / f"run-{run_id}.log").read_text()
    assert "stopped by SIGTERM" in log             # the train process saved a checkpoint when the server died
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert resumed_at >= 4, log[-3000:]            # never from step 0
    starts = [line for line in log.splitlines() if line.startswith("$ lora-booth train")]
    assert len(starts) == 2 and starts[1].endswith(" resume=latest") and not starts[0].endswith("resume=latest")
    run_dir = workspace / "runs" / f"run-{run_id}"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25)) and state["step"] == 24
    # the same keys on the command line, uninterrupted: the same adapter, tensor for tensor
    from safetensors.torch import load_file

    from lora_booth import cli

    assert cli.main(["train", "preset=demo", "max_steps=24", "save.checkpoint_every=4", "sample.num=0",
                     f"output_dir={tmp_path / 'cli'}"]) == 0
    studio, terminal = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (run_dir, tmp_path / "cli"))
    assert studio.keys() == terminal.keys() and all(studio[k].equal(terminal[k]) for k in studio)


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = ROOT / "docs" if os.environ.get("LORA_BOOTH_SCREENSHOTS") == "docs" else tmp_path
    page.screenshot(path=str(folder / f"ui-{name}.png"))


def test_a_person_uploads_photos_trains_watches_and_downloads(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from safetensors import safe_open

    server = Server(tmp_path / "ws", tmp_path / "server.log")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760}, accept_downloads=True)
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))

            page.goto(server.url + "/datasets")
            page.fill("#dataset-name", "stars")
            page.click("button[type=submit]")
            page.wait_for_url("**/datasets/stars")
            photos = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()}
                      for p in sorted(SAMPLES.glob("*.png"))]
            page.evaluate("""(files) => {   // what a drop of files from the desktop delivers
                const transfer = new DataTransfer();
                for (const f of files) transfer.items.add(new File(
                    [Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0))], f.name, {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""", photos)
            page.wait_for_function("() => document.querySelectorAll('#photos img').length === 4 && "
                                   "[...document.querySelectorAll('#photos img')].every((i) => i.naturalWidth > 0)")
            caption = page.locator("#photos figure").first.locator("textarea")
            caption.fill("a photo of a sks star")
            caption.press("Tab")
            page.wait_for_selector("#photos textarea.saved")
            assert (tmp_path / "ws" / "datasets" / "stars" / "toystar-0.txt").read_text().strip() == \
                "a photo of a sks star"
            screenshot(page, "dataset", tmp_path)

            page.goto(server.url + "/runs/new")
            page.fill("input[name=max_steps]", "20")
            page.fill("textarea[name=yaml]", "lora:\n  rnak: 4\n")
            page.wait_for_selector("#problems li:has-text(\"Did you mean 'lora.rank'?\")")
            page.fill("textarea[name=yaml]", "sample:\n  every: 10\n  num: 4\nsave:\n  checkpoint_every: 10\n")
            page.wait_for_function("() => document.getElementById('command').textContent.includes('sample.every=10')")
            assert page.locator("#problems li").count() == 0
            screenshot(page, "new-run", tmp_path)
            page.click("#start")
            page.wait_for_url(re.compile(r".*/runs/\d+$"))
            page.wait_for_function("() => document.body.dataset.status === 'running'")
            page.wait_for_function("() => document.body.dataset.status === 'done'", timeout=240_000)
            page.wait_for_function("() => document.querySelectorAll('#samples img').length >= 3 && "
                                   "[...document.querySelectorAll('#samples img')].every((i) => i.naturalWidth > 0)")
            labels = page.locator("#samples figcaption").all_text_contents()
            assert {"base model", "step-00000010", "step-00000020"} <= set(labels), labels
            assert page.locator("#step").text_content() == "20 / 20"
            screenshot(page, "run", tmp_path)

            with page.expect_download() as download:
                page.click("a[download='sks_star.safetensors']")
            saved = tmp_path / "sks_star.safetensors"
            download.value.save_as(saved)
            run_dir = next((tmp_path / "ws" / "runs").iterdir())
            assert saved.read_bytes() == (run_dir / "sks_star.safetensors").read_bytes()
            with safe_open(str(saved), framework="pt") as adapter:
                assert any(key.startswith("lora_unet_") for key in adapter.keys())
            # generate with the checkpoint of step 10: one image, drawn by `lora-booth generate`
            page.select_option("#generate-checkpoint", "step-00000010")
            page.fill("#generate-n", "1")
            page.click("#generate button[type=submit]")
            page.wait_for_function("() => document.querySelectorAll('#generated img').length === 1 && "
                                   "document.querySelector('#generated img').naturalWidth > 0", timeout=120_000)
            drawn = list((tmp_path / "ws" / "generated").glob("run-*/0001-step-00000010/0000.png"))
            assert len(drawn) == 1, sorted((tmp_path / "ws").rglob("*.png"))
            report = page.locator("a:has-text('report.html')").get_attribute("href")
            assert "<html" in urllib.request.urlopen(server.url + report, timeout=30).read().decode()[:400].lower()

            page.goto(server.url + "/")
            assert page.locator("table.runs .status.done").count() == 1
            screenshot(page, "runs", tmp_path)
            page.goto(server.url + "/datasets")
            screenshot(page, "datasets", tmp_path)
            assert not errors, errors
            browser.close()
    finally:
        server.close()
