"""Pivotal tuning: new trigger tokens trained by textual inversion alongside the LoRA."""
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lora_booth import cli
from lora_booth.model import pivotal
from lora_booth.config.sections import PivotalConfig
from lora_booth.io.errors import ConfigError
from lora_booth.training.recipe import run

from conftest import run_until_first_checkpoint, tiny_config

PIVOTAL = {"pivotal": "true", "pivotal.lr": "5e-2", "lora.text_encoder": "true"}


def quiet(*_):
    pass


def prediction(unet, tokenizer, text_encoder, prompt):
    tokens = tokenizer([prompt] * 2, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), text_encoder(tokens)[0]).sample


def test_rewrite_replaces_the_trigger_as_a_whole_word():
    cfg = PivotalConfig(enabled=True, trigger="sks", tokens=3)
    assert pivotal.rewrite("a photo of sks dog, sks.", cfg) == "a photo of <s0><s1><s2> dog, <s0><s1><s2>."
    assert pivotal.rewrite("a photo of sksx dog", cfg) == "a photo of sksx dog"


def test_pivotal_training_changes_only_the_new_rows_and_diffusers_reproduces_it(tmp_path, photos, tiny_dir):
    messages = []
    trained = run(tiny_config(tmp_path, photos, max_steps=3, **PIVOTAL), messages.append)
    out = tmp_path / "out"
    base = trained.base
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    table = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, fresh.text_encoder.get_input_embeddings().weight)  # old rows bit-identical
    word_ids = fresh.tokenizer("dog", add_special_tokens=False).input_ids
    start = fresh.text_encoder.get_input_embeddings().weight[word_ids].mean(0)
    saved = load_file(str(out / pivotal.FILE_NAME))
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, table.shape[1])
    assert not torch.allclose(saved["emb_params"], start.expand(2, -1))  # the new rows trained
    with safe_open(str(out / pivotal.FILE_NAME), "pt") as handle:
        assert handle.metadata()["lora_booth.tokens"] == "<s0>,<s1>"
    assert any("<s0><s1>" in m and "pipe.load_textual_inversion" in m for m in messages)
    assert "a photo of <s0><s1> dog" in (out / "README.md").read_text()

    prompt = "a photo of <s0><s1> dog"
    base.unet.eval()
    expected = prediction(base.unet, base.tokenizer, base.text_encoder, prompt)
    fresh.load_lora_weights(str(out))
    fresh.load_textual_inversion(saved["emb_params"], token=["<s0>", "<s1>"])
    loaded = prediction(fresh.unet, fresh.tokenizer, fresh.text_encoder, prompt)
    assert torch.allclose(loaded, expected, atol=1e-5)


def test_pivotal_resume_restores_the_embeddings(tmp_path, photos, monkeypatch):
    common = dict(max_steps=3, prior_weight=0, **{"save.checkpoint_every": 2, "train.ema": 0.9}, **PIVOTAL)
    run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    assert (tmp_path / "b/out/checkpoints/step-00000002/embeddings.safetensors").is_file()
    run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), quiet)
    for name in (pivotal.FILE_NAME, "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(tmp_path / "a/out" / name)), load_file(str(tmp_path / "b/out" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_loads_the_embeddings_from_the_output_folder(tmp_path, photos, tiny_dir, capsys):
    run(tiny_config(tmp_path, photos, max_steps=1, prior_weight=0, **PIVOTAL), quiet)
    code = cli.main(["generate", f"model={tiny_dir}", f"lora={tmp_path / 'out'}", "prompt=a photo of <s0><s1> dog",
                     f"out={tmp_path / 'images'}", "n=1", "steps=2"])
    assert code == 0 and len(list((tmp_path / "images").glob("*.png"))) == 1
    assert "loaded the embeddings of <s0><s1>" in capsys.readouterr().out


def test_pivotal_config_errors(tmp_path, photos):
    with pytest.raises(ConfigError, match="pivotal.trigger"):
        tiny_config(tmp_path, photos, pivotal="true", **{"pivotal.trigger": "ohwx"})
    with pytest.raises(ConfigError, match="pivotal.init_word"):
        tiny_config(tmp_path, photos, pivotal="true", prior_weight=0, class_prompt="")


def test_install_covers_both_text_encoders_of_an_sdxl_like_base(tmp_path, tiny_dir):
    """Written over (tokenizer, text encoder) pairs: with a second pair (SDXL) both get the new
    tokens, and the file holds the A1111/ComfyUI SDXL keys clip_l and clip_g."""
    from types import SimpleNamespace

    from transformers import CLIPTextModel, CLIPTokenizer

    def pair():
        return CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer"), CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    (tok1, enc1), (tok2, enc2) = pair(), pair()
    base = SimpleNamespace(tokenizer=tok1, text_encoder=enc1, tokenizer_2=tok2, text_encoder_2=enc2)
    embeddings = pivotal.install(base, PivotalConfig(enabled=True, init="random"), "a photo of dog", seed=0)
    assert [e.key for e in embeddings.encoders] == ["clip_l", "clip_g"]
    for tokenizer in (tok1, tok2):
        assert tokenizer.tokenize("a <s0><s1> dog")[1:3] == ["<s0>", "<s1>"]
    ids = tok2("a <s0><s1> dog", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = enc2.get_input_embeddings()(ids)
    assert torch.equal(hidden[0, 2], embeddings.encoders[1].rows[0]) and torch.equal(hidden[0, 3],
                                                                                     embeddings.encoders[1].rows[1])
    saved = load_file(str(embeddings.save(tmp_path, "sks")))
    assert sorted(saved) == ["clip_g", "clip_l"]
