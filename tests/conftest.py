"""Tiny pipelines built from configs (random weights, offline, seconds on CPU)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Every test runs offline and keeps lora-booth's caches out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
_CACHE = tempfile.mkdtemp(prefix="lora-booth-test-cache-")
os.environ["LORA_BOOTH_CACHE"] = _CACHE

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lora_booth.config import sections as config  # noqa: E402
from lora_booth.config import loading
from lora_booth.families.tiny import tiny_model_dir  # noqa: E402

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting
# for each other make a step 100× slower.
torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The built-in tiny SD 1.x pipeline as a diffusers folder."""
    return tiny_model_dir()


def make_photo(path: Path, seed: int, size=(80, 64), mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def make_photos(root: Path, count: int = 3) -> Path:
    """root/photos with `count` small random instance photos."""
    folder = root / "photos"
    folder.mkdir()
    for index in range(count):
        make_photo(folder / f"{index:02d}.png", index)
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_photos(tmp_path)


def tiny_config(tmp_path: Path, photos: Path, **overrides) -> config.Config:
    """A fast run on the tiny model: 32 px, 4 class images drawn with 2 sampler steps."""
    pairs = {"model": "tiny", "instance_dir": str(photos), "instance_prompt": "a photo of sks dog",
             "class_prompt": "a photo of dog", "output_dir": str(tmp_path / "out"), "resolution": "32",
             "num_class_images": "4", "prior.sample_steps": "2", "max_steps": "4", "rank": "2",
             "train.device": "cpu", "lr": "1e-2", "sample.num": "0"}
    pairs.update({k: str(v) for k, v in overrides.items()})
    cfg, _ = loading.resolve(pairs)
    return cfg


class Crash(Exception):
    """Stands for a process killed right after a checkpoint was written."""


def run_until_first_checkpoint(cfg: config.Config, monkeypatch) -> None:
    """Train `cfg` and die right after its first checkpoint is on disk (then undo the patch)."""
    from lora_booth.training import recipe

    save = recipe.save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise Crash
    monkeypatch.setattr(recipe, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        recipe.run(cfg, lambda *_: None)
    monkeypatch.undo()
