"""Prior preservation by prediction (prior.mode=prediction, issue #18): the class rows are the
instance rows' own noisy latents heard with the class prompt, their target the frozen base
model's prediction with every adapter off. No class image is drawn or read."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from lora_booth.config import loading
from lora_booth.model import lora, objective, text
from lora_booth.planning import plan
from lora_booth.training import prior, step
from lora_booth.io.errors import ConfigError
from lora_booth.training.recipe import run

from conftest import run_until_first_checkpoint, tiny_config

PREDICTION = {"prior.mode": "prediction"}


def quiet(*_):
    pass


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_no_class_images_are_drawn_and_the_prior_loss_starts_at_zero(tmp_path, photos, monkeypatch):
    """Nothing is drawn, the class folder is never read; the card and metadata say the mode. At
    step 1 the adapters are still a no-op (B = 0), so the adapted prediction is the base's own and
    the prior loss is 0; after that it measures how far the adapters moved the class prompt."""
    def refuse(*args, **kwargs):
        raise AssertionError("prior.mode=prediction drew class images")
    monkeypatch.setattr(prior, "generate", refuse)
    class_dir = tmp_path / "never"
    messages = []
    trained = run(tiny_config(tmp_path, photos, **PREDICTION, class_dir=class_dir, max_steps=3,
                              **{"train.split_prior": "true"}), messages.append)
    assert not class_dir.exists()
    assert any("class images: none (prior.mode=prediction" in m and "is not read" in m for m in messages)
    assert any("prior preservation by the base model's predictions (λ = 1" in m for m in messages)
    records = metrics(tmp_path / "out")
    assert records[0]["prior_loss"] == 0.0  # the class pass of one row: the very same numbers
    assert all(r["prior_loss"] > 0 for r in records[1:])
    assert all(r["loss"] == pytest.approx(r["instance_loss"] + r["prior_loss"], rel=1e-5) for r in records)
    with safe_open(str(trained.adapter), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["lora_booth.config"])["prior"]["mode"] == "prediction"
    assert metadata["lora_booth.class_images"] == "0"
    card = (tmp_path / "out/README.md").read_text()
    assert "by prediction" in card and "no class images" in card


def test_the_class_target_is_a_fresh_frozen_models_prediction(tmp_path, photos, tiny_dir, monkeypatch):
    """The text encoder trains too, so both adapted parts must be switched off for the target:
    the class rows' target of the last step equals what a freshly loaded base UNet and text
    encoder predict for the same noisy latents, timesteps and class prompt, while the adapted
    model (its prediction, its class-prompt states) has moved away from it."""
    calls, losses = [], []

    def record(module, args, kwargs):
        inputs = dict(zip(("sample", "timestep", "encoder_hidden_states"), args), **kwargs)
        calls.append({"grad": torch.is_grad_enabled(), **{k: inputs[k].detach().clone()
                                                          for k in ("sample", "timestep", "encoder_hidden_states")}})
    add_adapters = lora.add_adapters

    def add_and_watch(base, *args):
        params = add_adapters(base, *args)
        base.unet.register_forward_pre_hook(record, with_kwargs=True)
        return params
    monkeypatch.setattr(lora, "add_adapters", add_and_watch)
    loss = objective.dreambooth_loss

    def watched(pred, target, is_prior, *args, **kwargs):
        losses.append((pred.detach().clone(), target.detach().clone(), is_prior.clone()))
        return loss(pred, target, is_prior, *args, **kwargs)
    monkeypatch.setattr(objective, "dreambooth_loss", watched)
    run(tiny_config(tmp_path, photos, **PREDICTION, max_steps=3, **{"lora.text_encoder": "true"}), quiet)

    assert [c["grad"] for c in calls] == [False, True] * 3       # one no-grad forward, then the trained one
    target_call, trained_call = calls[-2], calls[-1]
    pred, target, is_prior = losses[-1]
    assert is_prior.tolist() == [False, True]
    # the class row is the instance row's noisy latent and timestep, heard with the class prompt
    assert torch.equal(trained_call["sample"][1], trained_call["sample"][0])
    assert torch.equal(trained_call["timestep"][1], trained_call["timestep"][0])
    assert torch.equal(target_call["sample"][0], trained_call["sample"][1])

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet").eval()
    with torch.no_grad():
        hidden = encoder(text.token_ids(tokenizer, ["a photo of dog"]))[0]
        fresh = unet(trained_call["sample"][1:], trained_call["timestep"][1:], hidden).sample
    assert torch.allclose(target_call["encoder_hidden_states"], hidden, atol=1e-6)
    assert torch.allclose(target[1:], fresh, atol=1e-6)
    assert not torch.allclose(trained_call["encoder_hidden_states"][1:], hidden, atol=1e-4)  # TE adapters moved
    assert not torch.allclose(pred[1:], fresh, atol=1e-4)                                   # UNet adapters moved


def test_only_adapters_train_and_their_flags_are_kept(tmp_path, photos, tiny_dir):
    """Switching the adapters off and on every step leaves the base weights bit-identical and the
    trainable set exactly the adapter tensors (peft's enable_adapters would re-flag them)."""
    from diffusers import StableDiffusionPipeline

    trained = run(tiny_config(tmp_path, photos, **PREDICTION, **{"lora.text_encoder": "true"}), quiet)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    for part in ("unet", "text_encoder"):
        module = getattr(trained.base, part)
        reference = getattr(fresh, part).state_dict()
        names = {name for name, _ in module.named_parameters()}
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        assert trainable == {name for name in names if "lora_" in name} and trainable
        for name, tensor in module.state_dict().items():
            if "lora_" not in name:
                assert torch.equal(tensor, reference[name.replace(".base_layer", "")]), f"{part}.{name} changed"
    ups = [v for k, v in load_file(str(trained.adapter)).items() if "lora_B" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)


def test_resume_continues_exactly_in_prediction_mode(tmp_path, photos, monkeypatch):
    """With the loss and timestep options on too: every draw comes from the rows' own streams."""
    common = dict(max_steps=4, **PREDICTION, **{"save.checkpoint_every": 2, "train.grad_accum": 2,
                                                "lora.dropout": 0.1, "data.flip": "true", "objective.loss": "huber",
                                                "objective.timesteps": "logit_normal"})
    straight = run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), quiet)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "a/out")[-1]["loss"] == metrics(tmp_path / "b/out")[-1]["loss"]


def test_split_prior_trains_the_same_in_prediction_mode(tmp_path, photos):
    common = dict(max_steps=3, **PREDICTION, **{"train.batch_size": 2})
    run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run(tiny_config(tmp_path / "b", photos, **common, **{"train.split_prior": "true"}), quiet)
    for key in ("loss", "instance_loss", "prior_loss"):
        a, b = [r[key] for r in metrics(tmp_path / "a/out")], [r[key] for r in metrics(tmp_path / "b/out")]
        assert a == pytest.approx(b, rel=1e-3, abs=1e-9)


PLACEHOLDERS = {"instance_dir": "x", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                "output_dir": "x"}


def resolve(**pairs):
    cfg, _ = loading.resolve({**PLACEHOLDERS, **{k: str(v) for k, v in pairs.items()}})
    return cfg


@pytest.mark.parametrize("batch_size", [1, 2])
def test_the_plan_adds_one_no_grad_forward_of_the_base(batch_size, tiny_dir):
    """Same trained pass (2·B rows) in both modes; prediction adds the base UNet's forward over the
    B class rows: exactly its FLOPs (counted here on a real tiny UNet) and almost no memory, since
    its activations are freed before the trained pass. The fake trace still matches a real one."""
    from torch.utils.flop_counter import FlopCounterMode

    images = plan.estimate(resolve(model="tiny", resolution=64, **{"train.batch_size": batch_size}))
    cfg = resolve(model="tiny", resolution=64, **{"train.batch_size": batch_size}, **PREDICTION)
    predicted = plan.estimate(cfg)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(torch.randn(batch_size, 4, 16, 16), torch.zeros(batch_size, dtype=torch.long),
             torch.randn(batch_size, 77, unet.config.cross_attention_dim))
    assert predicted.flops - images.flops == counter.get_total_flops() > 0
    assert images.tracked_peak <= predicted.tracked_peak <= images.tracked_peak * 1.02
    real = plan.estimate(cfg, fake=False)
    assert predicted.tracked_peak == pytest.approx(real.tracked_peak, rel=0.05) and predicted.flops == real.flops


def test_config_class_prompt_still_required_and_class_images_optional():
    cfg = resolve(model="tiny", num_class_images=0, **PREDICTION)
    assert cfg.prior.by_prediction
    assert not resolve(model="tiny", prior_weight=0, **PREDICTION).prior.by_prediction
    with pytest.raises(ConfigError, match="prior.num_class_images"):
        resolve(model="tiny", num_class_images=0)
    with pytest.raises(ConfigError, match="prior.class_prompt"):
        loading.resolve({**PLACEHOLDERS, "model": "tiny", "class_prompt": "", **PREDICTION})
    with pytest.raises(ConfigError, match="must be one of images, prediction"):
        resolve(model="tiny", **{"prior.mode": "predict"})


def test_prediction_rows_copy_the_instance_rows_with_the_class_prompt():
    from lora_booth.data.batches import Batch

    batch = Batch(latents=torch.randn(2, 4, 2, 2), prompts=["a photo of sks dog", ""],
                  is_prior=torch.tensor([False, False]), slots=[("instance", 7), ("instance", 8)],
                  sizes=torch.randn(2, 6), dropped=torch.tensor([False, True]))
    doubled = step.with_prediction_rows(batch, "a photo of dog")
    assert torch.equal(doubled.latents, torch.cat([batch.latents, batch.latents]))
    assert doubled.prompts == ["a photo of sks dog", "", "a photo of dog", "a photo of dog"]
    assert doubled.is_prior.tolist() == [False, False, True, True]
    assert doubled.slots == batch.slots * 2                     # the same noise and timestep streams
    assert doubled.dropped.tolist() == [False, True, False, False]  # the class copy keeps its prompt
    assert torch.equal(doubled.sizes[2:], batch.sizes)
