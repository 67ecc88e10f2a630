"""tools/prior_study.py (issue #18 §2): its headline on a short run, and the pieces it adds to
lora_booth/training/toy_study.py (the composed photos and their masks, the colour distance, the table)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import prior_study  # noqa: E402

from lora_booth.toyworld import detector, subject, toy_base_dir, world
from lora_booth.training import toy_study as evaluate  # noqa: E402

# A short, steep run: 150 steps at 3× the demo's learning rate drift the class without the prior
# as far as the demo's 800 steps do (measured on 16 samples: class shape 0.12 without, 0.38 with;
# drift 0.31 and 0.12). The full ablation: tools/prior_study.py, docs/training.md.
SHORT = {"train.max_steps": "150", "optim.lr": "6e-3"}


def test_prior_preservation_keeps_more_of_the_class_than_none(tmp_path):
    """The ablation's direction: with λ = 1 more "a photo of a star" samples stay five-pointed
    stars than with λ = 0, on the same seed, steps and sampling seeds."""
    base = toy_base_dir()
    if not (base / "model_index.json").exists():
        pytest.skip(f"no pretrained toy base at {base}")
    stats = {}
    for cell in ("no-prior", "images-1"):
        adapter, _ = prior_study.train_cell(tmp_path, base, cell, 0, SHORT, None)
        stats[cell] = evaluate.class_stats(evaluate.sample(evaluate.load(base, adapter), evaluate.CLASS_PROMPT, 16))
    with_prior, without = stats["images-1"], stats["no-prior"]
    assert with_prior["shape"] > without["shape"] + 0.1, stats
    assert with_prior["drift"] < without["drift"], stats


def test_composed_photos_keep_the_subject_and_their_masks_cover_it(tmp_path):
    folder = prior_study.write_photos(tmp_path / "photos", "outline")
    photos = sorted(p for p in folder.glob("*.png") if not p.name.endswith(".mask.png"))
    assert len(photos) == 4
    for photo in photos:
        image = np.asarray(Image.open(photo).convert("RGB"))
        mask = np.asarray(Image.open(photo.with_name(photo.stem + ".mask.png"))) > 127
        assert subject.is_subject(image)
        assert prior_study.nearest_background(detector.detect(image).background_rgb) == prior_study.LEAK_BACKGROUND
        # outside the mask only the brown background: the subject, rim included, is all white
        assert (image[~mask] == world.BACKGROUNDS[prior_study.LEAK_BACKGROUND]).all()
        assert 0.15 < mask.mean() < 0.35
    assert not any(p.name.endswith(".mask.png") for p in prior_study.write_photos(tmp_path / "plain", "none").iterdir())


def test_colour_distance_and_table():
    assert prior_study.colour_tv({"red": 2, "blue": 2}, {"red": 4, "blue": 4}) == 0.0
    assert prior_study.colour_tv({"red": 3}, {"blue": 5}) == 1.0
    runs = [{"cell": "images-1", "label": "ignored: the label is the cell's own", "seed": seed, "subject": s, "context_subject": s,
             "context_background": 1.0, "class_shape": c, "class_colour_tv": 0.1, "class_colours": 5,
             "class_drift": 0.0, "trigger_leak": 0.1, "wall_s": 50.0} for seed, s, c in ((0, 0.97, 0.84), (1, 1.0, 0.88))]
    summary = prior_study.summarise(runs, ["images-1", "no-prior"])
    assert list(summary) == ["images-1"] and summary["images-1"]["class_shape"]["min"] == 0.84
    base = {"subject": 0.03, "context_subject": 0.03, "context_background": 1.0, "class_shape": 0.91,
            "class_colour_tv": 0.0, "class_colours": 6, "class_drift": 0.0, "trigger_leak": 0.12}
    table = prior_study.format_table(base, summary)
    row = table.splitlines()[-1]
    assert row.startswith(f"| {prior_study.CELLS['images-1'][0]} ×2 | 98 (97–100)% |") and row.endswith("| yes |"), row
