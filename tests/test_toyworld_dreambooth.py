"""DreamBooth measurably works: trained through lora-booth's own trainer on the shipped toy base,
the adapter draws the shipped subject (an orange four-pointed star, a shape the world never shows)
on "a photo of a sks star" far more often than the base model does."""
from __future__ import annotations

import numpy as np
import pytest

from lora_booth.toyworld import subject, toy_base_dir, world


def test_subject_check_tells_the_subject_from_the_world():
    shipped = subject.sample_images()
    assert shipped.shape == (4, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert all(subject.is_subject(image) for image in shipped)
    assert np.array_equal(shipped, subject.sample_images())  # deterministic
    fresh = subject.generate_subject(24, seed=5)
    assert np.mean([subject.is_subject(image) for image in fresh]) >= 0.95
    images, _, scenes = world.generate(120, seed=8)
    assert not any(subject.is_subject(image) for image in images)
    # The hardest world images: orange shapes, five-pointed stars and squares, none is the subject.
    assert any(s.colour == subject.COLOUR for s in scenes) and any(s.shape == "star" for s in scenes)


def test_shipped_photos_are_the_generated_ones():
    from PIL import Image

    from lora_booth.training.toy_study import samples_dir

    files = sorted(samples_dir().glob("*.png"))
    assert len(files) == 4
    for path, expected in zip(files, subject.sample_images()):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)


def _base_or_skip():
    base = toy_base_dir()
    if not (base / "model_index.json").exists():
        pytest.skip(f"no pretrained toy base at {base}")
    return base


def test_dreambooth_teaches_the_subject(tmp_path):
    from lora_booth.training import toy_study as evaluate

    base = _base_or_skip()
    # 500 steps instead of the preset's 800: about half a minute on one CPU thread, and
    # still far above the base (measured 0.69-0.72 vs 0.00 on 32 samples).
    adapter, _ = evaluate.train_subject(tmp_path / "out", base, class_dir=str(tmp_path / "class"), max_steps=500)
    n = 16
    before = evaluate.subject_hit_rate(evaluate.sample(evaluate.load(base), evaluate.TRIGGER_PROMPT, n))
    after_pipe = evaluate.load(base, adapter)
    after = evaluate.subject_hit_rate(evaluate.sample(after_pipe, evaluate.TRIGGER_PROMPT, n))
    assert after >= 0.5 and after >= before + 0.4, (before, after)
    # Prior preservation keeps the class: most "a photo of a star" samples are still five-pointed stars.
    stats = evaluate.class_stats(evaluate.sample(after_pipe, evaluate.CLASS_PROMPT, n))
    assert stats["shape"] >= 0.5, stats
