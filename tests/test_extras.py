"""EMA of the adapters, caption dropout and the rare-token check."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_booth.data import batches as data, trigger
from lora_booth.data import rows as data_rows
from lora_booth.model import lora
from lora_booth.training.recipe import run

from conftest import tiny_config


def quiet(*_):
    pass


class ZeroLatents:
    cfg = data.DataConfig(resolution=16)

    def latents(self, rows, slots, size):
        return torch.zeros(len(rows), 4, 2, 2), torch.zeros(len(rows), 6), None  # latents, size conditioning, masks


def test_caption_dropout_is_seeded_per_row_and_spares_class_rows():
    instances = [data_rows.Row(Path(f"{i}.png"), "a photo of sks dog", False) for i in range(4)]
    classes = [data_rows.Row(Path(f"c{i}.png"), "a photo of dog", True) for i in range(4)]

    def prompts(seed, batch_size=2, dropout=0.5, steps=range(20)):
        batches = data.DreamBoothBatches(instances, classes, ZeroLatents(), batch_size, seed, caption_dropout=dropout)
        return [p for k in steps for p in batches(k).prompts]

    drawn = prompts(0)
    assert drawn == prompts(0)
    instance_prompts, class_prompts = drawn[0::4] + drawn[1::4], drawn[2::4] + drawn[3::4]
    assert 5 < instance_prompts.count(data.EMPTY_PROMPT) < 35        # about half of 40
    assert data.EMPTY_PROMPT not in class_prompts
    # a row's draw is its own: batch size 1 sees the same sequence of instance prompts
    single = prompts(0, batch_size=1, steps=range(40))
    assert single[0::2] == [p for k in range(20) for p in drawn[4 * k:4 * k + 2]]
    assert data.EMPTY_PROMPT not in prompts(0, dropout=0.0)


def test_caption_dropout_trains_with_cached_embeddings(tmp_path, photos):
    """The empty prompt is in the cache (else a KeyError on the first dropped row)."""
    trained = run(tiny_config(tmp_path, photos, max_steps=3, **{"data.caption_dropout": 0.9}), quiet)
    assert trained.step == 3


def test_ema_is_saved_as_the_adapter(tmp_path, photos):
    """diffusers' EMAModel: decay min(ema, (1 + n) / (10 + n)) with n = updates - 1, so after three
    steps the average is 0.25 · (2/11 · p1 + 9/11 · p2) + 0.75 · p3."""
    raw = run(tiny_config(tmp_path / "raw", photos, max_steps=3, **{"save.checkpoint_every": 1, "save.keep": 3}), quiet)
    steps = [load_file(str(tmp_path / f"raw/out/checkpoints/step-0000000{n}/adapter.safetensors")) for n in (1, 2, 3)]
    averaged = run(tiny_config(tmp_path / "ema", photos, max_steps=3, **{"train.ema": 0.9}), quiet)
    state = lora.trainable_state(averaged.base)
    assert state.keys() == steps[0].keys()
    for key in state:
        p1, p2, p3 = (s[key] for s in steps)
        expected = 0.25 * (2 / 11 * p1 + 9 / 11 * p2) + 0.75 * p3
        assert torch.allclose(state[key], expected, atol=1e-6), key
    assert any(not torch.equal(state[k], v) for k, v in lora.trainable_state(raw.base).items())
    saved = load_file(str(averaged.adapter))
    up = [k for k in saved if "lora_B" in k][0]
    assert not torch.equal(saved[up], load_file(str(raw.adapter))[up])


class OneTokenTokenizer:
    def tokenize(self, word):
        return [word + "</w>"]


def test_rare_token_check(tmp_path, photos, tiny_dir):
    from transformers import CLIPTokenizer

    tiny = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    messages = []
    cfg = tiny_config(tmp_path, photos)
    warnings = trigger.check([tiny], cfg, messages.append)           # byte-level: "sks" → s, k, s</w>
    assert "'sks' → 3 tokens" in messages[0] and "splits into 3 tokens" in warnings[0]
    common = tiny_config(tmp_path, photos, instance_prompt="a photo of red dog")
    assert "common word" in trigger.check([OneTokenTokenizer()], common, quiet)[0]
    assert trigger.check([OneTokenTokenizer()], cfg, quiet) == []     # one rare token: fine
    same = tiny_config(tmp_path, photos, instance_prompt="a photo of dog")
    assert "no trigger word" in trigger.check([OneTokenTokenizer()], same, quiet)[0]


def test_training_prints_the_trigger_split(tmp_path, photos):
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=1, prior_weight=0), messages.append)
    assert any(m.startswith("trigger      'sks' → 3 tokens") for m in messages)
