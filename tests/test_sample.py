"""Samples during training, the model card, and `lora-booth generate`."""
import torch
from PIL import Image

from lora_booth import cli
from lora_booth.results import sample
from lora_booth.training.recipe import run

from conftest import tiny_config


def test_grids_during_training_and_the_model_card(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, max_steps=4, **{"sample.num": 2, "sample.every": 2, "sample.steps": 2})
    messages = []
    run(cfg, messages.append)
    out = tmp_path / "out"
    grids = sorted((out / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-00000002.png", "step-00000004.png"]
    prompts = sample.default_prompts(cfg)
    assert prompts[:2] == ["a photo of sks dog", "a photo of dog"] and "a sks dog in the jungle" in prompts
    with Image.open(grids[-1]) as image:
        assert image.size == (2 * 32, len(prompts) * 32)
        assert image.info["prompts"].splitlines() == prompts
    card = (out / "README.md").read_text()
    assert "`a photo of sks dog`" in card and "samples/step-00000004.png" in card
    assert "load_lora_weights" in card and "<lora:sks_dog:1>" in card and "LoraLoader" in card
    assert any("AUTOMATIC1111 / Forge: copy sks_dog.safetensors" in m for m in messages)


def test_same_seeds_give_the_same_grid_and_sampling_does_not_disturb_training(tmp_path, photos):
    a = run(tiny_config(tmp_path / "a", photos, max_steps=3, **{"sample.num": 1, "sample.every": 1,
                                                                "sample.steps": 2}), lambda *_: None)
    b = run(tiny_config(tmp_path / "b", photos, max_steps=3), lambda *_: None)
    from safetensors.torch import load_file
    ta, tb = load_file(str(a.adapter)), load_file(str(b.adapter))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # drawing samples changed no training number


def test_generate_with_two_adapters(tmp_path, photos, tiny_dir):
    trained = run(tiny_config(tmp_path, photos, max_steps=2, lr=0.1), lambda *_: None)
    kohya = trained.adapter.parent / "sks_dog.safetensors"
    out = tmp_path / "images"
    code = cli.main(["generate", f"model={tiny_dir}", f"lora={trained.adapter.parent}", f"lora={kohya}:0.5",
                     "prompt=a photo of sks dog", "n=2", "steps=2", "size=32", f"out={out}"])
    assert code == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 2
    with Image.open(images[0]) as image:
        assert image.info["prompt"] == "a photo of sks dog" and "sks_dog.safetensors:0.5" in image.info["loras"]
