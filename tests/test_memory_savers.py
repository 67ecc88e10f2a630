"""The memory savers of big bases (issue #32): block offload moves exactly what it should when it
should and changes no number; int8/nf4 frozen weights train adapters that load on the unquantized
base in diffusers; host RAM is checked before loading; the plan prices all of it."""
from __future__ import annotations

import collections
import copy
import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_config
from lora_booth import families
from lora_booth.config import loading
from lora_booth.families.tiny import tiny_model_dir
from lora_booth.io.errors import ConfigError
from lora_booth.model import offload
from lora_booth.planning import plan, presets, savers
from lora_booth.training import recipe


class HostReads(TorchDispatchMode):
    """Records every op but a copy that reads a tensor whose storage is one of the host copies: on a
    GPU that op would fail (or read over PCIe); on the CPU it would silently compute, so it is caught
    here."""
    COPIES = ("aten.detach.default", "aten.clone.default", "aten._to_copy.default", "aten.copy_.default")

    def __init__(self, host_pointers: set[int]):
        super().__init__()
        self.host_pointers, self.reads = host_pointers, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        for value in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in self.host_pointers \
                    and str(func) not in self.COPIES:
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _denoiser(name: str):
    """The tiny model's denoiser (fp32, frozen) with LoRA adapters, and an input for it."""
    import diffusers

    family = families.family({"tiny": "sd1", "tiny-flux": "flux"}[name])
    folder = tiny_model_dir(name) / family.denoiser
    # a copy: weights read from the file may sit at addresses whose alignment changes which CPU kernel
    # runs (differences of 1e-10 against a copy of the same numbers); offload computes with copies
    model = copy.deepcopy(getattr(diffusers, family.denoiser_class).from_pretrained(folder))
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    torch.manual_seed(0)
    if family.name == "flux":
        config = model.config
        tokens, text = 16, 4
        inputs = dict(hidden_states=torch.randn(1, tokens, config.in_channels),
                      encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim),
                      pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([0.5]),
                      img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                      guidance=torch.tensor([3.5]) if config.guidance_embeds else None)
    else:
        inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                      encoder_hidden_states=torch.randn(1, 77, model.config.cross_attention_dim))
    return model, family, inputs


def _step(model, inputs) -> dict[str, torch.Tensor]:
    for parameter in model.parameters():
        parameter.grad = None
    model(**inputs).sample.square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
def test_offloaded_blocks_arrive_before_use_also_for_recomputation_and_change_no_gradient(name):
    model, family, inputs = _denoiser(name)
    model.enable_gradient_checkpointing()
    model.train()
    reference = _step(copy.deepcopy(model), inputs)
    trace: list = []
    held = offload.install(model, family.offload_units, "all", torch.device("cpu"), trace)
    blocks = list(held.units)
    assert len(blocks) == len(offload.units(model, family.offload_units)) >= 2
    host = {param.untyped_storage().data_ptr() for entries in held.host.values() for _, _, param in entries}
    with HostReads(host) as watch:
        gradients = [_step(model, inputs) for _ in range(2)]
    assert watch.reads == [], f"ops read host-resident weights: {watch.reads[:5]}"
    held.settle()  # what the next forward pass starts with: a recomputation that stopped early left one block
    for grads in gradients:  # the same numbers as with every block resident, bit for bit
        assert grads.keys() == reference.keys() and all(torch.equal(grads[k], reference[k]) for k in grads)
    arrivals = collections.Counter(name for event, name in trace if event == "in")
    # every block comes in for the forward pass of each step, and again for checkpointing's
    # recomputation where the backward pass goes through it (not through a UNet's first resnet: nothing
    # before it trains) or where the block is not checkpointed (the mid block's first resnet)
    assert set(arrivals) == set(blocks) and set(arrivals.values()) <= {2, 4}
    assert sum(count == 4 for count in arrivals.values()) >= len(blocks) - 2
    for index, (event, block) in enumerate(trace):  # each block leaves before another arrives
        if event == "in":
            following = [e for e in trace[index + 1:] if e[0] != "prefetch"][0]
            assert following == ("out", block)
    # from the second step on, the next block's copy is made ahead, in each direction, and used
    second_step = trace[len(trace) // 2:]
    prefetched = [name for event, name in second_step if event == "prefetch"]
    assert len(prefetched) >= len(blocks) - 1
    unused = [block for index, (event, block) in enumerate(second_step)
              if event == "prefetch" and ("in", block) not in second_step[index:]]
    assert len(unused) <= 1 and held.pending is None  # the guess after the last block: dropped by settle()
    # between steps, only the host copies are in the layers
    assert all(owner._parameters[slot] is param for entries in held.host.values() for owner, slot, param in entries)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_with_every_block_offloaded_is_bit_identical(tmp_path, photos):
    runs = {}
    for setting in ("0", "all"):
        cfg = tiny_config(tmp_path / setting, photos, max_steps=2, **{"train.offload_blocks": setting,
                                                                      "train.gradient_checkpointing": "true"})
        trained = recipe.run(cfg, report=lambda *a: None)
        runs[setting] = (load_file(trained.adapter), _losses(tmp_path / setting / "out"), trained.base)
    (plain, plain_losses, _), (offloaded, offloaded_losses, base) = runs["0"], runs["all"]
    assert base.unet._block_offload.units  # it was on
    assert plain_losses == offloaded_losses
    assert plain.keys() == offloaded.keys() and all(torch.equal(plain[k], offloaded[k]) for k in plain)


def test_offload_settings_are_checked():
    assert offload.count(0.5, 9) == 4 and offload.count("all", 9) == 9 and offload.count(20, 9) == 9
    for bad in ("many", "1.5", "-1"):
        with pytest.raises(ConfigError, match="train.offload_blocks"):
            loading.resolve({"model": "tiny", "instance_dir": "x", "instance_prompt": "a", "class_prompt": "b",
                             "train.offload_blocks": bad})
