"""One step off the demo path (issue #35): every config problem in one message, sizes from the
base, progress a log can hold, plan across families, threads chosen by the work, commands that
exist, the presets overview, and nothing left behind by a run that never started."""
import io
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from lora_booth import cli, families
from lora_booth.config import sections as config
from lora_booth.config import loading
from lora_booth.model import loading as models
from lora_booth.planning import plan, presets, preset_table
from lora_booth.training import prior, recipe
from lora_booth.io import progress
from lora_booth.config.sections import ModelConfig
from lora_booth.io.errors import ConfigError
from lora_booth.training.preparation import TORCH_DEFAULT_THREADS, choose_threads, settle_resolution

from conftest import make_photo, tiny_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 1. every problem, one message

def test_every_missing_setting_and_the_missing_folder_come_in_one_message(tmp_path):
    """preset=demo with photos of your own: the demo's subject keys are dropped, and the folder is
    missing too. Four problems, one run, and the reason the demo's keys are gone."""
    with pytest.raises(ConfigError) as caught:
        loading.resolve([("preset", "demo"), ("instance_dir", str(tmp_path / "photos_missing")),
                        ("output_dir", str(tmp_path / "out"))], check_paths=True)
    message = str(caught.value)
    for key in ("data.instance_prompt", "prior.class_prompt", "model.source", "data.instance_dir"):
        assert f"'{key}'" in message, message
    assert "does not exist" in message
    assert "preset demo sets" in message and "dropped" in message and "your own photos" in message


def test_wrong_values_and_unknown_keys_of_every_layer_are_listed_together(tmp_path):
    settings = tmp_path / "my.yaml"
    settings.write_text("lora:\n  rnak: 4\ntrain:\n  max_steps: -3\n")
    with pytest.raises(ConfigError) as caught:
        loading.resolve([("config", str(settings)), ("optim.lr", "fast"), ("data.crop", "randomly"),
                        ("model", "tiny"), ("instance_dir", str(tmp_path)), ("instance_prompt", "a sks dog"),
                        ("class_prompt", "a dog"), ("output_dir", str(tmp_path / "out"))])
    message = str(caught.value)
    assert message.startswith("4 problems in the settings"), message
    for expected in ("'lora.rnak'", "Did you mean 'lora.rank'", "'train.max_steps'", "'optim.lr'", "'data.crop'"):
        assert expected in message, message


# ---------------------------------------------------------------- 2. sizes from the base, progress

@pytest.mark.parametrize("source, side", [("sd15", 512), ("sd21", 768), ("sdxl", 1024), ("flux-dev", 1024)])
def test_the_default_resolution_is_the_bases_own(source, side):
    assert plan.base_resolution(source) == side


def test_the_toy_world_trains_at_32_px_unless_told_and_a_far_size_is_warned(tmp_path):
    info = models.locate(ModelConfig(source="toyworld"))
    cfg, _ = loading.resolve([("model", "toyworld"), ("instance_dir", str(tmp_path)), ("instance_prompt", "a sks star"),
                             ("class_prompt", "a star"), ("output_dir", str(tmp_path / "out"))])
    assert cfg.data.resolution is None
    said = []
    settle_resolution(cfg, info, said.append)
    assert cfg.data.resolution == 32 and "32 px, the base model's own" in said[0]
    cfg.data.resolution, said = 512, []
    settle_resolution(cfg, info, said.append)
    assert len(said) == 1 and "warning: data.resolution=512 is 16× the base model's own 32 px" in said[0]
    assert "256×" in said[0]                                      # the cost in pixels, as a number


def test_class_images_show_progress_within_a_batch(tmp_path, photos, tiny_dir, capsys):
    """One batch of 4 images with 4 sampler steps: progress at each step, not once per batch."""
    cfg = tiny_config(tmp_path, photos, **{"prior.sample_steps": 4, "prior.sample_batch_size": 4})
    base = models.load_frozen(cfg.model)
    capsys.readouterr()
    prior.generate(base, cfg, tmp_path / "class", "key", [0, 1, 2, 3], torch.device("cpu"), lambda *_: None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("class images:")]
    assert len(lines) >= 4, lines                                 # 25 %, 50 %, 75 %, 100 %
    assert all("ETA" in line for line in lines) and "1/4 image" in lines[0]


# ---------------------------------------------------------------- 5. smoothed ETA, 6. logs without \r

def test_the_eta_barely_moves_for_one_slow_step_and_follows_a_lasting_change():
    rate = progress.SmoothedRate(window=20)
    for _ in range(50):
        rate.add(1, 0.1)
    rate.add(1, 30.0)                                             # a sample grid, a checkpoint
    assert rate.seconds_per_unit < 2.0                            # not 30 s per step for the rest of the run
    for _ in range(100):
        rate.add(1, 1.0)                                          # the machine got busy for good
    assert rate.seconds_per_unit == pytest.approx(1.0, rel=0.05)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_is_a_line_every_ten_percent_without_carriage_returns():
    log = io.StringIO()
    with progress.Progress(200, "train", "step", stream=log) as bar:
        for _ in range(200):
            bar.update()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and lines[0].startswith("train:  10% (20/200 step") and "ETA" in lines[0]
    terminal = Terminal()
    with progress.Progress(3, "train", "step", stream=terminal, refresh=0) as bar:
        for _ in range(3):
            bar.update()
    assert terminal.getvalue().count("\r") == 3                   # a terminal gets one line, redrawn


def test_a_training_run_logs_plain_lines_and_names_its_threads(tmp_path, photos, tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    capsys.readouterr()                                           # building the tiny model is not the run
    said = []
    recipe.run(tiny_config(tmp_path, photos, max_steps=10, **{"prior.weight": 0}), said.append)
    err = capsys.readouterr().err
    assert "\r" not in err and "train: 100% (10/10 step" in err
    summary = next(message for message in said if "CPU threads" in message)
    assert "CPU threads  1 (chosen: model=tiny runs fastest on one" in summary, summary


# ---------------------------------------------------------------- 5. threads chosen by the work

def test_threads_are_chosen_by_the_work(tmp_path):
    cfg = config.Config()
    cpu = torch.device("cpu")
    for source in ("toyworld", "tiny", "tiny-sdxl", "tiny-flux"):   # measured faster on one thread
        cfg.model.source = source
        assert choose_threads(cfg, cpu, environ={})[0] == 1
    assert choose_threads(cfg, torch.device("meta"), environ={})[0] == TORCH_DEFAULT_THREADS  # not a CPU run
    # any other base, however small (a tiny SD UNet from a folder ran 1.8x faster on two threads)
    for source in ("stable-diffusion-v1-5/stable-diffusion-v1-5", str(tmp_path / "small-unet")):
        cfg.model.source = source
        assert choose_threads(cfg, cpu, environ={})[0] == TORCH_DEFAULT_THREADS
    cfg.model.source = "toyworld"
    assert choose_threads(cfg, cpu, environ={"OMP_NUM_THREADS": "2"})[0] == TORCH_DEFAULT_THREADS
    cfg.train.threads = 3
    assert choose_threads(cfg, cpu, environ={}) == (3, "train.threads")
    with pytest.raises(ConfigError, match="train.threads"):
        loading.resolve([("model", "tiny"), ("instance_dir", str(tmp_path)), ("instance_prompt", "a sks dog"),
                        ("class_prompt", "a dog"), ("output_dir", str(tmp_path)), ("train.threads", "-1")])


# ---------------------------------------------------------------- 3. plan

def test_another_familys_preset_is_replaced_by_the_models_own(capsys):
    assert presets.family_preset([("preset", "24gb"), ("model", "flux-dev")]) == [("preset", "flux-24gb"), ("model", "flux-dev")]
    assert "preset=24gb is written for" in capsys.readouterr().out
    assert presets.family_preset([("preset", "flux-16gb"), ("model", "sdxl")])[0] == ("preset", "sdxl-16gb")
    assert presets.family_preset([("preset", "sdxl-8gb"), ("model", "sd15")])[0] == ("preset", "8gb")
    assert presets.family_preset([("preset", "16gb"), ("model", "sd21")])[0] == ("preset", "16gb")
    assert families.for_preset("demo") is None


def test_plan_says_fit_only_of_what_fits_and_prints_no_negative_size(capsys):
    assert cli.main(["plan", "model=tiny", "resolution=32", "train.gpu_memory=0.001GiB"]) == 1
    out = capsys.readouterr().out
    assert "would fit" not in out
    tried = [line for line in out.splitlines() if line.startswith("  with ")]
    assert tried and all(line.endswith("(does not fit)") for line in tried), out
    assert "none of the savers suffice" in out and "settings that fit" not in out
    assert not re.search(r"\s-\d+\.\d\d GiB", out), out


def test_a_tied_text_encoder_weight_never_prices_an_adapter_below_zero():
    """T5 ties its token embedding to the encoder's; its adapters were priced at minus that."""
    cfg, _ = loading.resolve([("model", "tiny-flux"), ("instance_dir", "x"), ("instance_prompt", "a sks dog"),
                             ("class_prompt", "a dog"), ("output_dir", "x"), ("resolution", "32"),
                             ("lora.text_encoder", "true")])
    text = plan.estimate(cfg, flops=False).text()
    assert not re.search(r"\s-\d+\.\d\d GiB", text), text


def test_no_deprecated_library_call_warns_while_planning(tmp_path):
    cfg, _ = loading.resolve([("model", "tiny"), ("instance_dir", "x"), ("instance_prompt", "a sks dog"),
                             ("class_prompt", "a dog"), ("output_dir", "x"), ("resolution", "32"),
                             ("lora.text_encoder", "true"), ("train.gradient_checkpointing", "true"),
                             ("lora.rank", "3")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan.estimate(cfg, flops=False)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [m for m in deprecated if "checkpointing" in m], deprecated


# ---------------------------------------------------------------- 4. commands that exist

def _backticked_commands(text: str) -> list[str]:
    return re.findall(r"(?<!`)`([a-z][a-z0-9_.-]*) [^`\n]*`(?!`)", text)


def test_every_command_a_message_names_is_installed():
    """Hints name programs the user has after installing lora-booth (`hf`, not the retired
    `huggingface-cli`), or lora-booth's own verbs."""
    installed = Path(sys.executable).parent
    allowed = set(cli.VERBS) | {"lora-booth", "pip"}
    named = {command for path in (ROOT / "lora_booth").rglob("*.py")
             for command in _backticked_commands(path.read_text(encoding="utf-8"))}
    missing = sorted(c for c in named - allowed if not (installed / c).exists() and shutil.which(c) is None)
    assert not missing, missing
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "huggingface-cli" not in page.read_text(encoding="utf-8"), page
    assert (installed / "hf").exists()


# ---------------------------------------------------------------- 7. the demo shows its features

def test_presets_opens_with_a_table_of_every_preset_and_auto():
    lines = preset_table.presets_text().splitlines()
    assert lines[0].split() == ["name", "family", "VRAM", "resolution", "memory", "savers"]
    names = [line.split()[0] for line in lines[2:2 + 1 + len(loading.preset_names())]]
    assert names[0] == "auto" and sorted(names[1:]) == sorted(loading.preset_names())
    flux = next(line for line in lines if line.startswith("flux-24gb "))
    assert "FLUX.1" in flux and "24 GB" in flux and "1024 px" in flux and "fp8 weights" in flux


def test_the_demo_draws_samples_at_several_steps():
    cfg, _ = loading.resolve([("preset", "demo"), ("output_dir", "out")])
    assert cfg.sample.num > 0 and 0 < cfg.sample.every < cfg.train.max_steps
    assert cfg.train.max_steps // cfg.sample.every >= 3


# ---------------------------------------------------------------- 8. inside the repository, nothing left behind

def test_no_tracked_file_refers_outside_the_repository():
    sibling = "../" + "shared"                                      # spelt apart, so this file is no offender
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".safetensors", ".png", ".gz") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if sibling in text or re.search(r"(?<![\w.])/" + r"work/", text):
            offenders.append(name)
    assert not offenders, offenders


def test_a_run_that_fails_on_its_model_leaves_no_output_folder(tmp_path, photos):
    out = tmp_path / "runs" / "out"
    code = cli.main(["train", "preset=demo", f"instance_dir={photos}", "instance_prompt=a photo of sks dog",
                     "class_prompt=a photo of dog", f"model={tmp_path / 'no-such-model.safetensors'}",
                     f"output_dir={out}"])
    assert code != 0 and not out.exists()


def test_a_run_that_fails_before_its_first_step_removes_what_it_created(tmp_path, photos):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    make_photo(photos / "fine.png", 9)
    cfg = tiny_config(tmp_path, photos)
    with pytest.raises(Exception):
        recipe.run(cfg, lambda *_: None)
    assert not (tmp_path / "out").exists()
    mine = tmp_path / "mine"                                       # a folder that was there stays, and its files
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    cfg = tiny_config(tmp_path, photos, output_dir=mine)
    with pytest.raises(Exception):
        recipe.run(cfg, lambda *_: None)
    assert (mine / "notes.txt").read_text() == "keep"
