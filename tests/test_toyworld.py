"""The toy world: deterministic generator, truthful captions, a reliable detector, a loadable model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_booth.toyworld import detector, model, world


def test_generator_is_deterministic_under_a_seed():
    images_a, captions_a, scenes_a = world.generate(16, seed=3)
    images_b, captions_b, scenes_b = world.generate(16, seed=3)
    images_c, _, _ = world.generate(16, seed=4)
    assert images_a.shape == (16, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b)
    assert captions_a == captions_b and scenes_a == scenes_b
    assert not np.array_equal(images_a, images_c)


def test_captions_describe_the_drawn_content():
    images, captions, scenes = world.generate(200, seed=5)
    for image, text, scene in zip(images, captions, scenes):
        words = text.split()
        assert text.startswith("a photo of ")
        # The object's colour and the background's colour are the ones the caption names, if any.
        named_colours = [w for w in words if w in world.COLOURS]
        named_backgrounds = [w for w in words if w in world.BACKGROUNDS]
        named_shapes = [w for w in words if w in world.SHAPES]
        assert named_colours in ([], [scene.colour])
        assert named_backgrounds in ([], [scene.background])
        assert named_shapes in ([], [scene.shape])
        assert named_shapes or named_colours  # every caption says something about the object
        # The pixels agree: the corner is background-coloured, the centre of the object is its colour.
        assert np.abs(image[0, 0].astype(int) - world.BACKGROUNDS[scene.background]).max() <= 30
        cx, cy = int(scene.cx * world.IMAGE_SIZE), int(scene.cy * world.IMAGE_SIZE)
        assert np.abs(image[cy, cx].astype(int) - world.COLOURS[scene.colour]).max() <= 30


def test_every_caption_kind_occurs_including_class_only_prompts():
    _, captions, scenes = world.generate(400, seed=6)
    class_only = {f"a photo of a {shape}" for shape in world.SHAPES}
    assert any(c in class_only for c in captions)
    assert any(c.endswith("background") for c in captions)
    assert any(c.endswith(" shape") for c in captions)
    assert world.caption(scenes[0], "class") == f"a photo of a {scenes[0].shape}"
    assert world.caption(world.Scene("star", "orange", "white", .5, .5, .3, 0, (0, 0, 0), (0, 0, 0))) == \
        "a photo of an orange star on a white background"


def test_eval_prompts_cover_every_shape_and_colour_once():
    prompts = world.eval_prompts()
    assert len(prompts) == 24
    assert {(s, c) for _, s, c in prompts} == {(s, c) for s in world.SHAPES for c in world.COLOURS}


def test_detector_is_accurate_on_clean_images():
    result = detector.clean_accuracy(n=120, seed=11)
    assert result["shape"] >= 0.95 and result["colour"] >= 0.95


def test_detector_survives_blur_and_noise():
    from PIL import Image, ImageFilter

    images, _, scenes = world.generate(60, seed=12)
    rng = np.random.default_rng(0)
    degraded = [np.clip(np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.0)), float)
                        + rng.normal(0, 12, i.shape), 0, 255) for i in images]
    result = detector.accuracy(degraded, [s.shape for s in scenes], [s.colour for s in scenes])
    assert result["shape"] >= 0.9 and result["colour"] >= 0.9


def test_detector_reports_nothing_for_a_blank_image():
    blank = np.full((32, 32, 3), 128, np.uint8)
    found = detector.detect(blank)
    assert found.shape is None and found.colour is None


def test_tokenizer_keeps_world_and_trigger_words_whole():
    tokenizer = model.build_tokenizer()
    for word in world.vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
    ids = tokenizer("a photo of sks star").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 7
    assert len(tokenizer("a photo of a qqq").input_ids) > 6  # unknown words still tokenize (letters)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy") / "pipe"
    model.save_pipeline(model.build_pipeline(seed=0), folder)
    return folder


def test_pipeline_saves_within_budget_and_reloads_offline(saved_pipeline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model.safetensors_bytes(saved_pipeline) <= 10 * 1024 * 1024
    from diffusers import StableDiffusionPipeline

    # A plain from_pretrained (no dtype) must give an all-fp32 pipeline even with fp16 weights.
    pipe = StableDiffusionPipeline.from_pretrained(str(saved_pipeline))
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder.config.bos_token_id == pipe.tokenizer.bos_token_id


def test_reloaded_pipeline_generates_an_image(saved_pipeline):
    pipe = model.load_pipeline(saved_pipeline)
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of a red star", num_inference_steps=3, generator=generator, output_type="np").images
    assert out.shape == (1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.isfinite(out).all()
