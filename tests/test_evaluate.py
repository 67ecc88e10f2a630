"""`lora-booth eval`: the scores on known answers, and the whole verb on a tiny trained adapter
with tiny random CLIP and DINO models saved to a folder (as a downloaded model would be)."""
from __future__ import annotations

import json

import pytest
import torch

from lora_booth import cli, evaluate, scores
from lora_booth.errors import ConfigError, ModelError
from lora_booth.recipe import run

from conftest import make_photos, tiny_config


# ------------------------------------------------------------------------------ known answers


def test_identical_embeddings_score_one():
    embeddings = torch.randn(5, 7)
    assert scores.mean_cross_similarity(embeddings[:1], embeddings[:1] * 3) == pytest.approx(1.0, abs=1e-12)
    assert scores.mean_paired_similarity(embeddings, embeddings * 2) == pytest.approx(1.0, abs=1e-12)
    repeated = embeddings[:1].repeat(4, 1)
    assert scores.mean_cross_similarity(repeated, repeated) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_embeddings_score_zero():
    a, b = torch.eye(4)[:2], torch.eye(4)[2:]
    assert scores.mean_cross_similarity(a, b) == pytest.approx(0.0, abs=1e-12)
    assert scores.mean_paired_similarity(a, b) == pytest.approx(0.0, abs=1e-12)
    assert scores.diversity(torch.eye(3)) == pytest.approx(1.0, abs=1e-12)  # every pair orthogonal


def test_cross_similarity_is_the_mean_over_all_pairs():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 0.0]])
    assert scores.mean_cross_similarity(generated, real) == pytest.approx(0.5)  # (1 + 0) / 2
    assert scores.mean_pairwise_similarity(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1 / 3)


def test_identical_images_have_no_diversity_and_no_drift():
    embeddings = torch.randn(1, 8).repeat(6, 1)
    assert scores.diversity(embeddings) == pytest.approx(0.0, abs=1e-12)
    varied = torch.randn(6, 8)
    assert scores.prior_drift(varied, varied.clone()) == pytest.approx(0.0, abs=1e-12)
    assert scores.prior_drift(varied, -varied) == pytest.approx(2.0)  # opposite images: the most drift


def test_pairwise_scores_need_two_images_and_paired_ones_equal_shapes():
    with pytest.raises(ValueError):
        scores.diversity(torch.randn(1, 4))
    with pytest.raises(ValueError):
        scores.mean_paired_similarity(torch.randn(2, 4), torch.randn(3, 4))


def test_trigger_and_prompts_come_from_the_runs_prompts():
    assert evaluate.split_trigger("a photo of sks dog", "a photo of dog") == ("sks", "dog")
    assert evaluate.split_trigger("a photo of sks stuffed animal", "") == ("sks", "stuffed animal")
    assert evaluate.without_token("a sks dog in the jungle", "sks") == "a dog in the jungle"
    live, objects = evaluate.load_templates("live"), evaluate.load_templates("object")
    assert len(live) == len(objects) == 25 and live != objects
    assert evaluate.fill(live[0], "sks", "dog") == "a sks dog in the jungle"


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory):
    """Random CLIP and DINO-architecture models, 32 px, saved as a download would be."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from lora_booth.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("evaluators")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir() / "tokenizer")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(clip_config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **small), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-run")
    run(tiny_config(root, make_photos(root), max_steps=3, lr="5e-2"), report=lambda *_: None)
    return root / "out"


def eval_args(out, evaluators, *extra):
    clip, dino = evaluators
    return ["eval", f"lora={out}", f"clip={clip}", f"dino={dino}", "n=1", "class_n=3", "steps=2", *extra]


def test_eval_writes_the_papers_scores_and_the_report_shows_them(trained, evaluators, capsys):
    assert cli.main(eval_args(trained, evaluators)) == 0
    results = json.loads((trained / "eval.json").read_text())
    values = results["scores"]
    assert set(values) == set(evaluate.SCORE_NAMES)  # 3 real photos: real_DINO is there too
    for name in ("DINO", "CLIP-I", "CLIP-T", "real_DINO"):
        assert -1.0 <= values[name] <= 1.0
    assert values["prior_drift"] > 0  # the adapter, trained at a high lr, changes the class images
    assert 0 < values["class_diversity"] <= 2 and 0 < values["base_class_diversity"] <= 2
    assert results["setup"]["prompts"][0] == "a sks dog in the jungle" and results["setup"]["kind"] == "live"
    assert results["images_drawn"] == 25 * 1 + 3 + 3 and results["real_images"] == 3
    printed = capsys.readouterr().out
    assert "CLIP-T" in printed and f"{values['DINO']:.4f}" in printed
    page = (trained / "report.html").read_text()
    assert "id='eval'" in page and f"{values['CLIP-I']:.4f}" in page


def test_adapter_at_scale_zero_does_not_drift(trained, evaluators, tmp_path):
    """The class images with the adapter at strength 0 are the base model's: drift exactly 0."""
    assert cli.main(eval_args(f"{trained}:0", evaluators, f"out={tmp_path}")) == 0
    values = json.loads((tmp_path / "eval.json").read_text())["scores"]
    assert values["prior_drift"] == pytest.approx(0.0, abs=1e-9)
    assert values["class_diversity"] == pytest.approx(values["base_class_diversity"], abs=1e-9)


def test_missing_evaluator_model_says_where_to_get_it(trained, evaluators, tmp_path):
    clip, _ = evaluators
    with pytest.raises(ModelError, match="`hf download "):
        evaluate.evaluate({"lora": [str(trained)], "clip": str(tmp_path / "no-such-clip"), "dino": str(clip.parent / "dino"),
                           "n": 1, "class_n": 2, "steps": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        evaluate.evaluate({"lora": [str(trained)], "dino": str(tmp_path / "empty"), "clip": str(clip)})


def test_eval_keys_are_checked(trained, evaluators):
    with pytest.raises(ConfigError, match="one adapter"):
        evaluate.resolve_setup({"lora": [str(trained), str(trained)]})
    with pytest.raises(ConfigError, match="class_n"):
        evaluate.resolve_setup({"lora": [str(trained)], "class_n": 1})
    assert cli.main(["eval", f"lora={trained}", "metrics=toyworld", "clip=x"]) == 2  # a DreamBooth-only key
    assert cli.main(["eval", f"lora={trained}", "metrics=lpips"]) == 2


def test_toy_world_adapters_keep_the_detector_metrics(tmp_path):
    """The run's config.yaml picks the metrics; metrics= and model= override it."""
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "config.yaml").write_text("model:\n  source: toyworld\n")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "config.yaml").write_text("model:\n  source: stable-diffusion-v1-5/stable-diffusion-v1-5\n")
    assert evaluate.choose_metrics({"lora": [str(tmp_path / "toy")]}) == "toyworld"
    assert evaluate.choose_metrics({"lora": [str(tmp_path / "toy" / "out.safetensors:0.5")]}) == "toyworld"
    assert evaluate.choose_metrics({"lora": [str(tmp_path / "sd")]}) == "dreambooth"
    assert evaluate.choose_metrics({"lora": [str(tmp_path / "toy")], "metrics": "dreambooth"}) == "dreambooth"
    assert evaluate.choose_metrics({"lora": [str(tmp_path / "sd")], "model": "toyworld"}) == "toyworld"
