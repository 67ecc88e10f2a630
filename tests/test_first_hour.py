"""A practitioner's first hour (issue #15): a run names its base, presets hold no subject, the
trigger advice never contradicts itself, and resume never throws work away."""
import json
import shutil

import pytest

from lora_booth import config, trigger
from lora_booth.errors import ConfigError
from lora_booth.recipe import run

from conftest import tiny_config

SUBJECT = {"instance_dir": "photos", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
           "output_dir": "out"}


def quiet(*_):
    pass


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_without_model_is_an_error_that_shows_the_choices():
    with pytest.raises(ConfigError, match="model.source.*hub id.*folder.*single file.*toyworld"):
        config.resolve(SUBJECT)


def test_the_demo_preset_keeps_its_subject_only_without_photos_of_yours():
    demo, _ = config.resolve({"preset": "demo", "output_dir": "out"})
    assert demo.model.source == "toyworld" and "star" in demo.data.instance_prompt
    with pytest.raises(ConfigError, match="model.source"):           # your photos: name your base
        config.resolve({"preset": "demo", **SUBJECT})
    own, sources = config.resolve({"preset": "demo", "model": "tiny", **SUBJECT})
    assert own.data.instance_prompt == "a photo of sks dog" and own.prior.class_prompt == "a photo of dog"
    assert own.sample.prompts == () and "star" not in json.dumps(own.to_dict())
    assert own.train.device == "cpu"                                  # the preset's other settings stay
    assert config.resolve({"preset": "tiny", "output_dir": "out"})[0].model.source == "toyworld"  # the old name


def test_the_trigger_advice_only_names_words_that_are_one_token(tiny_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    advice = trigger.advice(tokenizer, "sks")
    for word in trigger.RARE_TOKENS:
        if repr(word) in advice:
            assert len(tokenizer.tokenize(word)) == 1, advice
    if len(tokenizer.tokenize("sks")) > 1:
        assert "'sks'" not in advice


def test_the_tiny_model_is_called_what_it_is(tmp_path, photos):
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=1), messages.append)
    assert any("random weights, for tests" in m for m in messages)


def test_resume_continues_a_finished_run_from_its_last_step_and_from_its_own_folder(tmp_path, photos):
    out = tmp_path / "out"
    run(tiny_config(tmp_path, photos, max_steps=2, **{"save.checkpoint_every": 100}), quiet)
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=3, resume="latest"), messages.append)
    assert any("at step 2" in m for m in messages) and steps(out) == [1, 2, 3]   # no step trained twice
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)                       # a copied run folder resumes where it is
    cfg, _ = config.resolve({"resume": str(moved), "max_steps": "4"})
    assert cfg.save.output_dir == str(moved) and cfg.train.resume == "latest"
    messages = []
    resumed = run(cfg, messages.append)
    assert resumed.step == 4 and steps(moved) == [1, 2, 3, 4] and steps(out) == [1, 2, 3]


@pytest.mark.parametrize("verb", ["merge", "convert", "resize", "extract", "inspect", "eval", "report", "generate",
                                  "plan", "presets"])
def test_every_verb_has_help(verb, capsys):
    from lora_booth import cli

    assert cli.main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: lora-booth {verb}")
    if verb in cli.VERB_KEYS:
        assert all(f"  {key}=" in text for key in cli.VERB_KEYS[verb])


def test_a_misspelt_verb_gets_a_suggestion(capsys):
    from lora_booth import cli

    assert cli.main(["mrege"]) == 2
    assert "Did you mean `lora-booth merge`?" in capsys.readouterr().err


def test_double_dash_keys_mean_the_same_key_either_way():
    from lora_booth import cli

    assert cli.parse_pairs(["--rank", "4", "--lr=1e-4", "max_steps=3"]) == [("rank", "4"), ("lr", "1e-4"),
                                                                              ("max_steps", "3")]
    with pytest.raises(ConfigError, match="key=value"):
        cli.parse_pairs(["rank", "4"])
