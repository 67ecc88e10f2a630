"""The studio's API (lora-booth ui) without a browser: FastAPI's TestClient, no train process
except where a test says so. The browser and the restart live in tests/test_studio_browser.py."""
from __future__ import annotations

import io
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the studio's libraries are in the [ui] and [test] extras")
from fastapi.testclient import TestClient  # noqa: E402

from lora_booth import cli  # noqa: E402
from lora_booth.io.errors import ConfigError  # noqa: E402
from lora_booth.studio import datasets as studio_datasets  # noqa: E402
from lora_booth.studio.app import create_app  # noqa: E402
from lora_booth.studio.store import RunStore  # noqa: E402
from lora_booth.studio import worker as workers_module  # noqa: E402
from lora_booth.studio.worker import Workers  # noqa: E402
from lora_booth.studio.workspace import Workspace  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "lora_booth" / "samples" / "toystar"
CHANGE = {"X-Lora-Booth": "1"}   # what the pages send with every request that changes something
STAR_RUN = {"instance_dir": "datasets/stars", "model": "toyworld", "instance_prompt": "a photo of a sks star",
            "class_prompt": "a photo of a star", "preset": "demo", "max_steps": 20}


def png(size=(24, 24), color=(200, 80, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def client(tmp_path):
    app = create_app(tmp_path / "ws", start_workers=False, devices=[None])
    with TestClient(app, base_url="http://127.0.0.1:7860") as test_client:
        test_client.workspace = tmp_path / "ws"
        yield test_client


@pytest.fixture
def stars(client):
    assert client.post("/api/datasets", json={"name": "stars"}, headers=CHANGE).status_code == 201
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(SAMPLES.glob("*.png"))]
    answer = client.post("/api/datasets/stars/files", files=files, headers=CHANGE).json()
    assert len(answer["stored"]) == 4 and not answer["refused"]
    return client


# ---------------------------------------------------------------------------- runs and keys

def test_a_run_is_checked_by_the_cli_loader_and_queued(stars):
    answer = stars.post("/api/runs", json=STAR_RUN, headers=CHANGE)
    assert answer.status_code == 201, answer.text
    run = stars.get(f"/api/runs/{answer.json()['id']}").json()
    assert (run["status"], run["step"], run["max_steps"]) == ("queued", 0, 20)
    second = stars.post("/api/runs", json=STAR_RUN, headers=CHANGE).json()["id"]
    assert f'data-run="{second}" data-before="{answer.json()["id"]}"' in stars.get("/").text   # "run sooner"


@pytest.mark.parametrize("keys, wrong, hint", [
    ({"preset": "demo", "max_stpes": 20}, "max_stpes", "Did you mean 'max_steps'?"),
    ({"preset": "demo", "lora.rnak": 4}, "lora.rnak", "Did you mean 'lora.rank'?"),
    ({"preset": "demox"}, "preset", "Did you mean 'demo'?"),
    ({"preset": "demo", "max_steps": "many"}, "train.max_steps", "must be an integer"),
    ({"preset": "demo", "lora": {"rank": "x"}}, "lora.rank", "must be an integer"),
    ({"preset": "demo", "max_steps": {"a": 1}}, "max_steps", "must be a text, number"),
])
def test_bad_keys_get_the_cli_message(client, keys, wrong, hint):
    answer = client.post("/api/runs", json=keys, headers=CHANGE)
    assert answer.status_code == 422
    assert wrong in answer.json()["detail"] and hint in answer.json()["detail"], answer.json()
    assert client.get("/api/runs").json() == []  # nothing queued


@pytest.mark.parametrize("key", ["output_dir", "save.output_dir", "resume", "overwrite", "config", "dataset"])
def test_where_a_run_writes_and_what_it_reads_is_the_studios_choice(client, key):
    answer = client.post("/api/runs", json={"preset": "demo", key: "x"}, headers=CHANGE)
    assert answer.status_code == 422 and "is set by the studio" in answer.json()["detail"]


def test_validate_as_you_type_merges_the_yaml_box(stars):
    keys = {k: v for k, v in STAR_RUN.items()}
    bad = stars.post("/api/validate", json={"keys": keys, "yaml": "lora:\n  rnak: 4\n"}, headers=CHANGE).json()
    assert not bad["ok"] and "Did you mean 'lora.rank'?" in bad["problems"][0]
    good = stars.post("/api/validate", json={"keys": keys, "yaml": "lora:\n  rank: 4\nsample.every: 10\n"},
                      headers=CHANGE).json()
    assert good["ok"] and good["keys"]["lora.rank"] == 4 and good["keys"]["sample.every"] == 10
    assert "lora-booth train" in good["command"] and "lora.rank=4" in good["command"]
    assert not stars.post("/api/validate", json={"keys": [1], "yaml": ""}, headers=CHANGE).json()["ok"]
    for text in ("a: *b", "- 1\n- 2", "lora: [", "x" * 70_000):
        answer = stars.post("/api/validate", json={"keys": keys, "yaml": text}, headers=CHANGE).json()
        assert not answer["ok"] and answer["problems"][0].startswith("'yaml'"), (text[:20], answer)


# ------------------------------------------------------------------------- paths and files

@pytest.mark.parametrize("value", ["../outside", "/etc", "~/photos", "datasets/../../outside", "datasets/%2e%2e/x",
                                   "linked"])
def test_a_run_never_reads_outside_the_workspace(client, tmp_path, value):
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "a.png")
    (client.workspace / "linked").symlink_to(tmp_path / "outside")
    answer = client.post("/api/runs", json={**STAR_RUN, "instance_dir": value}, headers=CHANGE)
    assert answer.status_code == 422, answer.text
    for key in ("model", "class_dir", "log.dir"):
        answer = client.post("/api/runs", json={**STAR_RUN, key: "../outside" if value == "%2e" else "/etc"},
                             headers=CHANGE)
        assert answer.status_code == 422 and key.split(".")[-1] in answer.json()["detail"]


def test_run_files_are_served_from_the_run_folder_only(stars, tmp_path):
    run_id = stars.post("/api/runs", json=STAR_RUN, headers=CHANGE).json()["id"]
    folder = stars.workspace / "runs" / f"run-{run_id}"
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "step-1.png").write_bytes(png())
    (tmp_path / "secret.txt").write_text("secret")
    (folder / "leak").symlink_to(tmp_path / "secret.txt")
    assert stars.get(f"/api/runs/{run_id}/files/samples/step-1.png").content == png()
    for name in ("../../studio.db", "..%2f..%2fstudio.db", "%2e%2e/%2e%2e/studio.db", "%2Fetc%2Fpasswd",
                 "/etc/passwd", "leak", "samples/../../run-1/../../studio.db", "nothing.png"):
        answer = stars.get(f"/api/runs/{run_id}/files/{name}")
        assert 400 <= answer.status_code < 500, (name, answer.status_code)
        assert b"secret" not in answer.content and b"SQLite" not in answer.content
    for name in ("..%2f..%2fstudio.db", "%2e%2e", "toystar-0.png%00"):
        assert stars.get(f"/api/datasets/stars/thumbnails/{name}").status_code in (400, 404)
    assert stars.get("/api/datasets/..%2f..%2fx").status_code in (400, 404)


def test_uploads_store_only_checked_photos_captions_and_masks(client):
    client.post("/api/datasets", json={"name": "dog"}, headers=CHANGE)
    files = [("files", ("a.png", png(), "image/png")), ("files", ("a.txt", b"a photo of sks dog", "text/plain")),
             ("files", ("a.mask.png", png(color=(255, 255, 255)), "image/png")),
             ("files", ("../../escape.png", png(), "image/png")), ("files", ("C:\\Users\\x\\win.png", png(), "image/png")),
             ("files", ("run.sh", b"touch pwned", "text/plain")), ("files", ("b.png", b"not an image", "image/png")),
             ("files", ("wide.png", png((400, 20)), "image/png")), ("files", ("c.txt", b"\xff\xfe bad", "text/plain")),
             ("files", (".hidden.png", png(), "image/png")), ("files", ("a.mask.jpg", png(), "image/jpeg"))]
    answer = client.post("/api/datasets/dog/files", files=files, headers=CHANGE).json()
    assert sorted(answer["stored"]) == ["a.mask.png", "a.png", "a.txt", "escape.png", "win.png"]
    reasons = {item["name"]: item["reason"] for item in answer["refused"]}
    assert set(reasons) == {"run.sh", "b.png", "wide.png", "c.txt", ".hidden.png", "a.mask.jpg"}
    assert "cannot decode" in reasons["b.png"] and "aspect" in reasons["wide.png"] and "UTF-8" in reasons["c.txt"]
    folder = client.workspace / "datasets" / "dog"
    assert sorted(p.name for p in folder.iterdir()) == ["a.mask.png", "a.png", "a.txt", "escape.png", "win.png"]
    assert not (client.workspace / "escape.png").exists()
    photos = client.get("/api/datasets/dog").json()["photos"]
    assert [(p["name"], p["caption"], p["mask"]) for p in photos][0] == ("a.png", "a photo of sks dog", True)


def test_uploads_are_capped_in_size_and_count(client, monkeypatch):
    client.post("/api/datasets", json={"name": "dog"}, headers=CHANGE)
    monkeypatch.setattr(studio_datasets, "MAX_FILE_BYTES", 500)
    big = client.post("/api/datasets/dog/files", files=[("files", ("big.png", png((64, 64), (1, 2, 3)) + b"\0" * 600,
                                                                       "image/png"))], headers=CHANGE).json()
    assert big["stored"] == [] and "over the" in big["refused"][0]["reason"]
    monkeypatch.setattr(studio_datasets, "MAX_FILES_PER_UPLOAD", 3)
    many = client.post("/api/datasets/dog/files", files=[("files", (f"{i}.png", png(), "image/png")) for i in range(5)],
                       headers=CHANGE)
    assert many.status_code == 400
    monkeypatch.setattr(studio_datasets, "MAX_UPLOAD_BYTES", 100)
    whole = client.post("/api/datasets/dog/files", files=[("files", ("x.png", png(), "image/png"))], headers=CHANGE)
    assert whole.status_code == 413
    assert list((client.workspace / "datasets" / "dog").iterdir()) == []


def test_dataset_names_are_plain(client):
    for name in ("../x", "a/b", ".hidden", "", "x" * 200, "a\x00b", "<script>"):
        assert client.post("/api/datasets", json={"name": name}, headers=CHANGE).status_code in (400, 404, 422)
    assert sorted(p.name for p in (client.workspace / "datasets").iterdir()) == []


def test_captions_are_edited_in_place_and_escaped_in_the_pages(stars):
    text = '<script>document.title="pwned"</script> & "quotes"'
    assert stars.put("/api/datasets/stars/captions/toystar-0.png", json={"caption": text}, headers=CHANGE).is_success
    assert (stars.workspace / "datasets" / "stars" / "toystar-0.txt").read_text() == text + "\n"
    page = stars.get("/datasets/stars").text
    assert "<script>document" not in page and "&lt;script&gt;document.title=&quot;pwned&quot;" in page
    assert stars.put("/api/datasets/stars/captions/..%2fx.png", json={"caption": "x"}, headers=CHANGE).status_code \
        in (400, 404)
    run = stars.post("/api/runs", json={**STAR_RUN, "instance_prompt": "a photo of a sks star <img src=x onerror=alert(1)>"},
                     headers=CHANGE).json()["id"]
    for url in ("/", f"/runs/{run}"):
        body = stars.get(url).text
        assert "<img src=x" not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    assert stars.put("/api/datasets/stars/captions/toystar-0.png", json={"caption": ""}, headers=CHANGE).is_success
    assert not (stars.workspace / "datasets" / "stars" / "toystar-0.txt").exists()


# ----------------------------------------------------------------------------------- security

def test_changes_need_the_studio_header_and_a_same_origin(client):
    assert client.post("/api/datasets", json={"name": "a"}).status_code == 403
    assert client.post("/api/datasets", json={"name": "a"},
                       headers={**CHANGE, "Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/datasets", json={"name": "a"},
                       headers={**CHANGE, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/api/datasets", json={"name": "a"},
                       headers={**CHANGE, "Origin": "http://127.0.0.1:7860"}).status_code == 201


def test_a_loopback_studio_refuses_other_host_names(client):
    """DNS rebinding: evil.example resolving to 127.0.0.1 reaches the port, but not the studio."""
    assert client.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 421
    assert client.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200


def test_another_address_needs_a_token_and_every_request_carries_it(tmp_path):
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(ConfigError, match="ui.token"):
            create_app(tmp_path / "ws", host=host, start_workers=False)
    token = "t0k3n-" + "x" * 20
    app = create_app(tmp_path / "ws", host="0.0.0.0", token=token, start_workers=False)
    with TestClient(app, base_url="http://studio.lan:7860") as open_client:
        assert open_client.get("/api/runs").status_code == 401
        assert open_client.get("/").status_code == 401
        assert open_client.get("/api/runs", headers={"X-Lora-Booth-Token": "wrong"}).status_code == 401
        assert open_client.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        visit = open_client.get(f"/datasets?token={token}", follow_redirects=False)
        assert visit.status_code == 303 and "token" not in visit.headers["location"]
        assert "httponly" in visit.headers["set-cookie"].lower() and "samesite=strict" in visit.headers["set-cookie"].lower()
        assert open_client.get("/datasets").status_code == 200   # the cookie now
        assert open_client.post("/api/datasets", json={"name": "a"}).status_code == 403   # still the CSRF rule


def test_pages_forbid_inline_and_foreign_scripts(client):
    page = client.get("/runs/new")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert "<script src=\"/static/studio.js\">" in page.text and "http" not in page.text.split("<body")[1].split(
        "</header>")[0].replace("href=\"/", "")
    assert "cdn" not in client.get("/static/studio.js").text.lower()


def test_ui_verb_keys_and_refusals(tmp_path, capsys):
    assert "ui " in cli.USAGE and "token" in cli.verb_help("ui")
    assert cli.main(["ui", "host=0.0.0.0", f"workspace={tmp_path}"]) == 2
    assert "ui.token" in capsys.readouterr().err
    assert cli.main(["ui", "prot=1"]) == 2
    assert "Did you mean 'port'?" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the queue

def test_a_restart_requeues_running_runs_to_resume_and_leaves_finished_ones(tmp_path):
    store = RunStore(tmp_path / "q.db")
    ids = [store.add({"preset": "demo"}, 10) for _ in range(4)]
    for run_id in ids[:3]:
        assert store.claim(0).id == run_id
    store.finish(ids[0], "done", 0)
    store.finish(ids[1], "failed", 1, "boom")
    workers = Workers(Workspace(tmp_path / "ws"), store, devices=[None])
    assert workers.recover() == [ids[2]]
    states = {run.id: (run.status, run.resume) for run in store.all()}
    assert states == {ids[0]: ("done", False), ids[1]: ("failed", False), ids[2]: ("queued", True),
                      ids[3]: ("queued", False)}


def test_queue_order_stop_and_resume(tmp_path):
    store = RunStore(tmp_path / "q.db")
    a, b, c = (store.add({"preset": "demo"}, 10) for _ in range(3))
    assert store.move(c, a)
    assert store.request_stop(b) == "stopped"
    assert store.claim(0).id == c and store.claim(0).id == a and store.claim(0) is None
    assert store.requeue(b) and store.get(b).resume and store.claim(0).id == b
    assert not store.requeue(a)   # running: nothing to resume


def test_a_run_whose_process_dies_is_failed_with_its_log_tail(tmp_path, monkeypatch):
    """A crash or an out-of-memory kill marks the run failed with the last lines of its log, and
    the worker goes on with the next run."""
    workspace = Workspace(tmp_path / "ws")
    store = RunStore(workspace.database)
    crash, ok = store.add({"preset": "demo"}, 10), store.add({"preset": "demo"}, 10)
    scripts = {crash: "import os, signal; print('loading the model', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
               ok: "print('fine')"}
    workers = Workers(workspace, store, devices=[None], poll_s=0.05)
    monkeypatch.setattr(workers, "launch_words", lambda run: [sys.executable, "-c", scripts[run.id]])
    workers.start()
    try:
        deadline = time.monotonic() + 30
        while store.get(ok).status != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        workers.shutdown()
    failed = store.get(crash)
    assert failed.status == "failed" and "SIGKILL" in failed.error and "loading the model" in failed.error
    assert store.get(ok).status == "done"


def wait_until(check, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_stop_signals_the_run_and_a_shutdown_sends_runs_back_to_the_queue(tmp_path, monkeypatch):
    """Stop: SIGTERM to the run (train saves a checkpoint on it), status stopped. A server shutdown:
    the same signal, and the run waits in the queue to resume at the next start."""
    workspace = Workspace(tmp_path / "ws")
    store = RunStore(workspace.database)
    stop_me, shut_down = store.add({"preset": "demo"}, 10), store.add({"preset": "demo"}, 10)
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (print('checkpoint saved', "
              "flush=True), sys.exit(1))); print('training', flush=True); time.sleep(60)")
    workers = Workers(workspace, store, devices=[None], poll_s=0.05)
    monkeypatch.setattr(workers, "launch_words", lambda run: [sys.executable, "-c", script])
    workers.start()
    try:
        wait_until(lambda: "training" in workspace.log_file(stop_me).read_text() if workspace.log_file(stop_me).exists()
                   else False)
        assert store.request_stop(stop_me) == "running"
        wait_until(lambda: store.get(stop_me).status == "stopped")
        assert "checkpoint saved" in workspace.log_file(stop_me).read_text()
        wait_until(lambda: workspace.log_file(shut_down).exists() and "training" in
                   workspace.log_file(shut_down).read_text())
    finally:
        workers.shutdown()
    run = store.get(shut_down)
    assert (run.status, run.resume) == ("queued", True)
    assert "checkpoint saved" in workspace.log_file(shut_down).read_text()


def test_the_database_is_plain_sqlite_in_the_workspace(client):
    client.post("/api/datasets", json={"name": "stars"}, headers=CHANGE)
    with sqlite3.connect(client.workspace / "studio.db") as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
    assert os.path.isdir(client.workspace / "datasets" / "stars")


def test_one_server_per_workspace(tmp_path, capsys):
    """Two servers on one workspace would each requeue the other's running runs."""
    from lora_booth.io import locking

    (tmp_path / "ws").mkdir()
    with locking.exclusive(tmp_path / "ws" / "studio.db", "ui"):
        assert cli.main(["ui", f"workspace={tmp_path / 'ws'}", "port=0"]) == 1
    assert "LockedError" in capsys.readouterr().err


def test_the_trigger_check_is_shown_as_the_prompt_is_typed(stars):
    keys = dict(STAR_RUN)
    good = stars.post("/api/validate", json={"keys": keys, "yaml": ""}, headers=CHANGE).json()
    assert any("'sks' → 1 token" in line for line in good["trigger"]), good
    assert not any(line.startswith("warning") for line in good["trigger"])
    keys["instance_prompt"] = "a photo of a dog star"
    common = stars.post("/api/validate", json={"keys": keys, "yaml": ""}, headers=CHANGE).json()
    assert any("'dog' is a common word" in line for line in common["trigger"]), common


def test_one_worker_per_gpu_each_on_its_own_card(tmp_path, monkeypatch):
    workspace = Workspace(tmp_path / "ws")
    store = RunStore(workspace.database)
    runs = [store.add({"preset": "demo"}, 10) for _ in range(2)]
    script = "import os, time; print('card', os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(1.5)"
    workers = Workers(workspace, store, devices=["0", "1"], poll_s=0.05)
    monkeypatch.setattr(workers, "launch_words", lambda run: [sys.executable, "-c", script])
    workers.start()
    try:
        wait_until(lambda: all(store.get(r).status == "running" for r in runs))   # both at once
        wait_until(lambda: all(store.get(r).status == "done" for r in runs))
    finally:
        workers.shutdown()
    cards = {workspace.log_file(r).read_text().split("card ")[1].split()[0] for r in runs}
    assert cards == {"0", "1"}


def test_runs_are_compared_side_by_side(stars):
    ids = [stars.post("/api/runs", json={**STAR_RUN, "max_steps": steps}, headers=CHANGE).json()["id"]
           for steps in (20, 30)]
    for run_id, loss in zip(ids, (0.5, 0.25)):   # what a finished run leaves for the report
        folder = stars.workspace / "runs" / f"run-{run_id}"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {loss}}}\n' for s in (1, 2))
                                              + f'{{"step": 3, "loss": {loss}, "val_instance_loss": 0.125}}\n')
    state = stars.get(f"/api/runs/{ids[0]}").json()
    assert state["step"] == 3 and state["losses"] == [[1, 0.5], [2, 0.5], [3, 0.5]] and state["validation"] == [[3, 0.125]]
    assert stars.post("/api/compare", json={"runs": [ids[0]]}, headers=CHANGE).status_code == 422
    assert stars.post("/api/compare", json={"runs": [ids[0], 99]}, headers=CHANGE).status_code == 404
    url = stars.post("/api/compare", json={"runs": ids}, headers=CHANGE).json()["url"]
    page = stars.get(url).text
    assert "2 runs compared" in page and f"run-{ids[0]}" in page and f"run-{ids[1]}" in page
    assert stars.get("/files/runs/..%2fstudio.db").status_code == 404
    assert 'id="compare"' in stars.get("/").text


def test_the_memory_plan_of_the_new_run_says_what_fits(stars):
    keys = {**STAR_RUN, "model": "tiny", "preset": "", "train.gpu_memory": "1GiB", "resolution": 32}
    del keys["preset"]
    fits = stars.post("/api/plan", json=keys, headers=CHANGE).json()
    assert fits["fits"] is True and "planned peak" in fits["text"] and "fits in 1.0 GiB" in fits["text"]
    small = stars.post("/api/plan", json={**keys, "train.gpu_memory": "0.3GiB"}, headers=CHANGE).json()
    assert small["fits"] is False and "none of the savers suffice" in small["text"]
    assert stars.post("/api/plan", json={**keys, "lora.rnak": 2}, headers=CHANGE).status_code == 422


def test_save_now_and_sample_now_reach_the_run_through_its_keeper(tmp_path, monkeypatch):
    """The run page's "save now" and "sample now": SIGUSR1 and SIGUSR2 pass the keeper to the run,
    which goes on; a run that is not running is refused with its status."""
    workspace = Workspace(tmp_path / "ws")
    store = RunStore(workspace.database)
    run_id = store.add({"preset": "demo"}, 10)
    script = ("import signal, time; print('ignored before the loop', signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN "
              "and signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN, flush=True); "
              "signal.signal(signal.SIGUSR1, lambda *_: print('asked to save', flush=True)); "
              "signal.signal(signal.SIGUSR2, lambda *_: print('asked to sample', flush=True)); "
              "print('training', flush=True); time.sleep(60)")
    workers = Workers(workspace, store, devices=[None], poll_s=0.05)
    keeper = str(Path(workers_module.__file__).with_name("keeper.py"))
    # the keeper runs `python -m lora_booth …`: a stand-in lora_booth/__main__ on the path that plays train
    fake = tmp_path / "fake" / "lora_booth"
    fake.mkdir(parents=True)
    (fake / "__main__.py").write_text(script)
    monkeypatch.setattr(workers, "launch_words", lambda run: [sys.executable, keeper, "train"])
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    assert not workers.ask(run_id, signal.SIGUSR1)  # nothing runs yet
    workers.start()
    try:
        log = workspace.log_file(run_id)
        wait_until(lambda: log.exists() and "training" in log.read_text())
        assert workers.ask(run_id, signal.SIGUSR1) and workers.ask(run_id, signal.SIGUSR2)
        wait_until(lambda: "asked to save" in log.read_text() and "asked to sample" in log.read_text())
        assert "ignored before the loop True" in log.read_text()  # a click before the first step ends nothing
        assert store.get(run_id).status == "running"  # it goes on
    finally:
        workers.shutdown()


def test_save_now_is_refused_for_a_run_that_is_not_running(stars):
    run_id = stars.post("/api/runs", json=STAR_RUN, headers=CHANGE).json()["id"]
    for what in ("save-now", "sample-now"):
        answer = stars.post(f"/api/runs/{run_id}/{what}", headers=CHANGE)
        assert answer.status_code >= 400 and "queued" in answer.text, answer.text


def test_generate_is_checked_before_anything_is_drawn(stars):
    """Generate on a run that has not ended, with a checkpoint name that is not one (a path
    escape included) or a bad prompt/count: refused with the key named, nothing drawn."""
    run_id = stars.post("/api/runs", json=STAR_RUN, headers=CHANGE).json()["id"]
    answer = stars.post(f"/api/runs/{run_id}/generate", json={"prompt": "a sks star"}, headers=CHANGE)
    assert answer.status_code >= 400 and "queued" in answer.text, answer.text
    stars.post(f"/api/runs/{run_id}/stop", headers=CHANGE)  # a queued run stops at once
    for body, key in [({"prompt": "a sks star", "checkpoint": "../../etc"}, "checkpoint"),
                      ({"prompt": "a sks star", "checkpoint": "step-00000010"}, "checkpoint"),  # none written
                      ({"prompt": ""}, "prompt"), ({"prompt": "two\nlines"}, "prompt"),
                      ({"prompt": "a sks star", "n": 99}, "n"), ({"prompt": "a sks star", "seed": -1}, "seed")]:
        answer = stars.post(f"/api/runs/{run_id}/generate", json=body, headers=CHANGE)
        assert answer.status_code >= 400 and key in answer.text, (body, answer.text)
    assert not (stars.workspace / "generated").exists()


def test_a_chunked_json_body_is_capped_as_it_comes(client):
    """A body sent in chunks states no length: it is counted as it arrives and refused past 1 MiB."""
    def chunks():
        yield b'{"keys": {"instance_prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}}'

    answer = client.post("/api/validate", content=chunks(), headers={**CHANGE, "Content-Type": "application/json"})
    assert answer.status_code >= 400 and "1 MiB" in answer.text, answer.text[:200]
