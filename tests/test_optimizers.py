"""Prodigy, Adafactor and LoRA+: built from their libraries, driven by our schedule, resumed exactly."""
import pytest
import torch
from safetensors.torch import load_file

from lora_booth.config import sections as config
from lora_booth.config import loading
from lora_booth.training import optim
from lora_booth.io.errors import ConfigError
from lora_booth.training.recipe import run

from conftest import run_until_first_checkpoint, tiny_config


def quiet(*_):
    pass


def optim_config(**pairs):
    cfg = config.Config()
    for key, value in pairs.items():
        setattr(cfg.optim, key, value)
    return cfg.optim


def two_parts():
    a, b = torch.nn.Parameter(torch.randn(2, 4)), torch.nn.Parameter(torch.zeros(4, 2))
    return {"unet": [a, b]}, frozenset({id(b)})


def test_loraplus_groups_keep_their_ratio_through_the_schedule():
    params, up = two_parts()
    opt = optim.build_optimizer(params, optim_config(lr=1e-3, loraplus_ratio=16.0), 1, up)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert [p.shape for p in by_name["unet.lora_B"]["params"]] == [(4, 2)]
    for factor in (0.5, 0.1):
        optim.set_learning_rate(opt, factor)
        assert by_name["unet.lora_B"]["lr"] == pytest.approx(16 * by_name["unet"]["lr"])
        assert by_name["unet"]["lr"] == pytest.approx(1e-3 * factor)


def test_loraplus_needs_lora_b_matrices():
    params, _ = two_parts()
    with pytest.raises(ConfigError, match="loraplus_ratio"):
        optim.build_optimizer(params, optim_config(loraplus_ratio=16.0), 1, frozenset())


def test_prodigy_needs_lr_near_one_and_one_rate_for_all_groups():
    with pytest.raises(ConfigError, match="optim.lr.*Set optim.lr=1.0"):
        loading.resolve({"instance_dir": "x", "instance_prompt": "a sks dog", "prior_weight": "0",
                        "output_dir": "o", "optim.optimizer": "prodigy"})
    params, up = two_parts()
    with pytest.raises(ConfigError, match="prodigy"):
        optim.build_optimizer(params, optim_config(optimizer="prodigy", lr=1.0, loraplus_ratio=4.0), 1, up)


@pytest.mark.parametrize("name", ["prodigy", "adafactor"])
def test_library_optimizers_step(name):
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    params, up = two_parts()
    opt = optim.build_optimizer(params, optim_config(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2), 1, up)
    assert isinstance(opt, {"prodigy": Prodigy, "adafactor": Adafactor}[name])
    before = [p.detach().clone() for p in params["unet"]]
    sum((p * torch.ones_like(p)).sum() for p in params["unet"]).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params["unet"]))


@pytest.mark.parametrize("settings", [
    {"optim.optimizer": "prodigy", "lr": "1.0", "optim.warmup_steps": 1},
    {"optim.optimizer": "adafactor"},
    {"optim.optimizer": "adamw8bit", "optim.loraplus_ratio": 16},
    {"train.ema": 0.9, "data.caption_dropout": 0.5},
], ids=["prodigy", "adafactor", "adamw8bit-loraplus", "ema-caption-dropout"])
def test_resume_is_exact_with_each_optimizer(tmp_path, photos, monkeypatch, settings):
    """Checkpoint after step 2, crash, resume: the same bytes as a straight 3-step run."""
    common = dict(max_steps=3, prior_weight=0, **{"save.checkpoint_every": 2}, **settings)
    straight = run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), quiet)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["adamw8bit", "prodigy", "adafactor"])
def test_optimizer_state_round_trips_through_checkpoint_files(tmp_path, name):
    """A tensor above bitsandbytes' 4096-value threshold gets real 8-bit state (a nested dict of
    quantisation tensors): the flattened files must restore it exactly."""
    from lora_booth.model import checkpoint
    from safetensors.torch import save_file
    import json

    def make():
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(64, 100)), torch.nn.Parameter(torch.zeros(100, 64))
        return [a, b], optim.build_optimizer({"unet": [a, b]}, optim_config(optimizer=name, lr=1.0 if name == "prodigy"
                                                                           else 1e-3, loraplus_ratio=0.0), 1)

    def step(params, opt, seed):
        torch.manual_seed(seed)
        sum((p * torch.randn_like(p)).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()

    params, opt = make()
    step(params, opt, 1)
    tensors, rest = checkpoint.flatten_optimizer(opt.state_dict())
    save_file(tensors, str(tmp_path / "o.safetensors"))
    rest = json.loads(json.dumps(rest))
    copy, reloaded = make()
    with torch.no_grad():
        for p, q in zip(copy, params):
            p.copy_(q)
    reloaded.load_state_dict(checkpoint.unflatten_optimizer(load_file(str(tmp_path / "o.safetensors")), rest))
    step(params, opt, 2)
    step(copy, reloaded, 2)
    assert all(torch.equal(p, q) for p, q in zip(params, copy))
