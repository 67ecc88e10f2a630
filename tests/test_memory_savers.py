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

    family = families.family({"tiny": "sd1", "tiny-flux": "flux", "tiny-flux2": "flux2", "tiny-zimage": "zimage",
                              "tiny-qwenimage": "qwenimage"}[name])
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
    elif family.name == "flux2":  # packed latents of a 4×4 token grid and 4 text states, as Flux2Family.predict
        from lora_booth.families.flux2 import image_ids, text_ids

        config = model.config
        inputs = dict(hidden_states=torch.randn(1, 16, config.in_channels), timestep=torch.tensor([0.5]),
                      encoder_hidden_states=torch.randn(1, 4, config.joint_attention_dim),
                      guidance=torch.tensor([4.0]) if config.guidance_embeds else None,
                      img_ids=image_ids(8, 8, "cpu"), txt_ids=text_ids(4, "cpu"))
    elif family.name == "zimage":  # one image of 8×8 latents (one frame) and 4 caption states, as ZImageFamily.predict
        config = model.config
        inputs = dict(x=[torch.randn(config.in_channels, 1, 8, 8)], t=torch.tensor([0.5]),
                      cap_feats=[torch.randn(4, config.cap_feat_dim)])
    elif family.name == "qwenimage":  # packed latents of a 4×4 token grid, as QwenImageFamily.predict sends them
        config = model.config
        inputs = dict(hidden_states=torch.randn(1, 16, config.in_channels), timestep=torch.tensor([0.5]),
                      encoder_hidden_states=torch.randn(1, 4, config.joint_attention_dim),
                      encoder_hidden_states_mask=None, img_shapes=[[(1, 4, 4)]])
    else:
        inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                      encoder_hidden_states=torch.randn(1, 77, model.config.cross_attention_dim))
    return model, family, inputs


def _step(model, inputs) -> dict[str, torch.Tensor]:
    for parameter in model.parameters():
        parameter.grad = None
    output = model(**inputs).sample
    (torch.stack(output) if isinstance(output, list) else output).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["tiny", "tiny-flux", "tiny-flux2", "tiny-zimage", "tiny-qwenimage"])
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
        cfg = tiny_config(tmp_path / setting, photos, max_steps=2, **{
            "train.offload_blocks": setting, "train.gradient_checkpointing": "true", "prior.mode": "prediction"})
        trained = recipe.run(cfg, report=lambda *a: None)
        runs[setting] = (load_file(trained.adapter), _losses(tmp_path / setting / "out"), trained.base)
    (plain, plain_losses, _), (offloaded, offloaded_losses, base) = runs["0"], runs["all"]
    assert base.unet._block_offload.units  # it was on
    assert plain_losses == offloaded_losses
    assert plain.keys() == offloaded.keys() and all(torch.equal(plain[k], offloaded[k]) for k in plain)


def _resolve(**keys):
    return loading.resolve({"model": "tiny", "instance_dir": "x", "instance_prompt": "a", "class_prompt": "b",
                            "output_dir": "out", **keys})[0]


def test_saver_settings_are_checked_with_the_key_named():
    assert offload.count(0.5, 9) == 4 and offload.count("all", 9) == 9 and offload.count(20, 9) == 9
    with pytest.raises(ConfigError, match="train.offload_blocks"):  # nothing to offload is said, never ignored
        offload.install(torch.nn.Sequential(torch.nn.Linear(2, 2)), r"blocks\.\d+", "all", torch.device("cpu"))
    assert _resolve(**{"train.fp8_base": "true", "train.mixed_precision": "bf16",
                       "train.gradient_checkpointing": "true"}).train.stored_weights == "fp8"  # the older spelling
    refused = [({"train.offload_blocks": bad}, "train.offload_blocks") for bad in ("many", "1.5", "-1")]
    refused += [({"train.fp8_base": "true", "train.base_weights": "int8", "train.mixed_precision": "bf16",
                  "train.gradient_checkpointing": "true"}, "train.fp8_base"),
                ({"train.base_weights": "nf4"}, "mixed_precision=no"),
                ({"train.base_weights": "int8", "train.mixed_precision": "bf16", "lora.type": "dora"}, "dora"),
                ({"train.base_weights": "int8", "train.mixed_precision": "bf16", "train.offload_blocks": "2"},
                 "train.offload_blocks"),
                ({"train.base_weights": "int4"}, "train.base_weights"),
                ({"train.host_memory": "lots"}, "train.host_memory")]
    for keys, named in refused:
        with pytest.raises(ConfigError, match=named):
            _resolve(**keys)


def _prediction(unet, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return unet(latents.to(dtype), torch.tensor([10, 500]), hidden.to(dtype)).sample.float()


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_adapter_trained_over_quantized_weights_loads_on_the_unquantized_base(tmp_path, photos, tiny_dir, weights):
    """The plain base in diffusers with the saved adapter predicts what the trained model (quantized
    base + adapters) predicts, up to the base's own quantization error, measured here on the same
    inputs with the adapters off: 1.7 % of the prediction for int8, 5.5 % for nf4 on the tiny model.
    Without the adapter the gap is several times larger: the file carries the trained change."""
    from diffusers import StableDiffusionPipeline
    from lora_booth.model.lora import adapters_disabled

    cfg = tiny_config(tmp_path, photos, max_steps=2, rank=4, lr=5e-2, **{
        "train.base_weights": weights, "train.mixed_precision": "bf16", "prior.weight": 0, "sample.num": 1,
        "sample.steps": 1})
    lines: list[str] = []
    trained = recipe.run(cfg, report=lines.append)
    assert (tmp_path / "out" / "samples" / "step-00000002.png").is_file(), [l for l in lines if "warning" in l]
    unet = trained.base.unet.eval()
    assert any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in unet.modules()), "nothing was quantized"
    expected = _prediction(unet, torch.bfloat16)
    with adapters_disabled(trained.base):
        quantized_base = _prediction(unet, torch.bfloat16)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, torch_dtype=torch.bfloat16)
    plain_base = _prediction(pipe.unet, torch.bfloat16)
    pipe.load_lora_weights(cfg.save.output_dir)
    loaded = _prediction(pipe.unet, torch.bfloat16)

    def gap(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    quantization_error = gap(quantized_base, plain_base)
    assert 0 < quantization_error < (0.03 if weights == "int8" else 0.08)
    assert gap(loaded, expected) <= 1.25 * quantization_error
    assert gap(plain_base, expected) > 2 * gap(loaded, expected)


def test_train_refuses_a_run_whose_host_ram_will_not_fit_with_the_numbers(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, **{"train.host_memory": "0.25GiB"})
    with pytest.raises(ConfigError) as error:
        recipe.run(cfg, report=lambda *a: None)
    message = str(error.value)
    assert "train.host_memory" in message and "loading needs" in message and "0.25 GiB is train.host_memory" in message
    assert "unet weights as loaded" in message and "train.force=true" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written or loaded
    needed = sum(plan.host_estimate(cfg, on_gpu=False).values())
    ok = tiny_config(tmp_path, photos, **{"train.host_memory": f"{needed / 2**30 + 0.01:.2f}GiB"})
    recipe.check_memory(ok, torch.device("cpu"), report=lambda *a: None)  # the same run with room: no refusal


PLAN_KEYS = [("model", "tiny-flux"), ("instance_dir", "(plan)"), ("instance_prompt", "a photo of sks dog"),
             ("class_prompt", "a photo of dog"), ("output_dir", "(plan)"), ("resolution", "64"),
             ("train.mixed_precision", "bf16"), ("train.gradient_checkpointing", "true")]


def _plan(*extra):
    cfg, _ = loading.resolve(PLAN_KEYS + list(extra))
    return plan.estimate(cfg, flops=False)


def test_plan_prices_stored_weights_offload_and_host_ram():
    frozen = {weights: _plan(("train.base_weights", weights)).parts["transformer weights (frozen)"]
              for weights in ("compute", "int8", "nf4")}  # fp8: tests/test_plan.py
    assert frozen["nf4"] < frozen["int8"] < frozen["compute"]
    plain, offloaded = _plan(), _plan(("train.offload_blocks", "all"))
    resident = offloaded.parts["transformer weights (frozen), resident"]
    assert offloaded.offloaded > 0 and resident < frozen["compute"]
    assert offloaded.host_peak == plain.host_peak > offloaded.offloaded  # the load is the host's peak
    text = offloaded.text(2**30)
    assert "planned host-RAM peak" in text and "offloaded blocks" in text


def test_a_run_that_does_not_fit_is_told_the_first_saver_combination_that_does(monkeypatch):
    monkeypatch.setattr(savers, "COMBINATIONS", [savers.COMBINATIONS[i] for i in (0, 4, 6)])  # fp8, offload, nf4
    pairs = PLAN_KEYS + [("optim.optimizer", "adamw8bit"), ("lora.text_encoder", "false"),
                         ("data.cache_latents", "true"), ("train.batch_size", "1")]
    totals = []
    for keys, _ in savers.COMBINATIONS:
        cfg, _ = loading.resolve(pairs + list(keys))
        totals.append(plan.estimate(cfg, flops=False).total)
    budget = sorted(totals)[1]  # only some fit: the answer is the first of those in the saver order
    first = next(index for index, total in enumerate(totals) if total <= budget)
    lines: list[str] = []
    fixes = presets.advice(pairs, budget, lines.append)
    assert [(k, v) for k, v, _ in fixes][-len(savers.COMBINATIONS[first][0]):] == list(savers.COMBINATIONS[first][0])
    assert "fits" in lines[-1]
    everything_offloaded = _plan(("train.offload_blocks", "all")).total
    assert savers.auto_offload(loading.resolve(PLAN_KEYS)[0], everything_offloaded) != "0"


def test_offload_asked_of_a_denoiser_without_offloadable_blocks_is_refused_not_ignored():
    """A family whose blocks the offload pattern does not name would otherwise train with every weight
    on the GPU while the plan and the user believe otherwise."""
    model, family, _ = _denoiser("tiny")
    with pytest.raises(ConfigError, match="train.offload_blocks.*no blocks"):
        offload.install(model, r"no_such_blocks\.\d+", "2", torch.device("cpu"))
    assert offload.install(model, r"no_such_blocks\.\d+", "0", torch.device("cpu")) is None


def test_the_planner_offers_no_offload_for_a_denoiser_without_offloadable_blocks(monkeypatch):
    """Such a family's train would refuse the offload (above): the advice passes over those
    combinations and auto resolves to none."""
    tried = []

    def priced(cfg, flops=False):
        tried.append(cfg.train.offload_blocks)
        return plan.Plan(model="", resolution=64, rows=2, parts={}, adapter="", tracked_peak=100 * 2**30)

    monkeypatch.setattr(savers, "offload_total", lambda cfg: 0)
    monkeypatch.setattr(savers, "estimate", priced)
    assert savers.combination(list(PLAN_KEYS), 2**30, lambda *_: None) == []
    assert tried and set(tried) == {"0"}  # fp8, int8, nf4 priced; nothing with blocks offloaded
    tried.clear()
    assert savers.auto_offload(loading.resolve(PLAN_KEYS)[0], 2**30) == "0" and tried == []


def test_a_text_encoder_that_does_not_fit_the_card_encodes_the_prompts_on_the_cpu(tmp_path, photos):
    """Qwen-Image's 15.4 GiB Qwen2.5-VL on a 16 GB card: the prompts are encoded once on the CPU,
    never sent to a card they would fill (the run would stop out of memory before its first step);
    a card that holds the encoder, a run on the CPU, or prompts that are not cached keep the old way."""
    from types import SimpleNamespace

    from lora_booth.training import preparation

    encoder = torch.nn.Linear(1024, 1024)  # 4 MiB stands for the encoder's weights
    base = SimpleNamespace(kind=families.family("qwenimage"), text_encoders={"text_encoder": (None, encoder)})
    cuda = torch.device("cuda")

    def reason(**keys):
        cfg = tiny_config(tmp_path, photos, **keys)
        return preparation.encoders_stay_on_cpu(cfg, base, cuda)

    assert "do not fit the card's 1.0 GiB" in reason(**{"train.gpu_memory": "1GiB", "prior.mode": "prediction"})
    assert "do not fit" in reason(**{"train.gpu_memory": "1GiB", "prior.weight": 0})
    assert reason(**{"train.gpu_memory": "1GiB"}) == ""  # class images to draw: the pipeline needs the encoder there
    assert reason(**{"train.gpu_memory": "24GiB"}) == ""
    assert reason(**{"train.gpu_memory": "1GiB", "prior.mode": "prediction", "train.cache_text_embeddings": "false"}) == ""
    assert preparation.encoders_stay_on_cpu(tiny_config(tmp_path, photos, **{"train.gpu_memory": "1GiB"}), base,
                                            torch.device("cpu")) == ""


def test_a_run_resumes_with_other_offload_or_host_ram_settings(tmp_path, photos):
    """Offload moves weights, never numbers, and train.host_memory is a check: a resume on another
    card (offload_blocks=auto settling elsewhere) is not refused for them; stored weights are."""
    from lora_booth.model import checkpoint

    saved = tiny_config(tmp_path, photos).to_dict()
    for key, value in (("train.offload_blocks", "all"), ("train.host_memory", "64GiB")):
        assert checkpoint.config_differences(saved, tiny_config(tmp_path, photos, **{key: value}).to_dict()) == []
    changed = tiny_config(tmp_path, photos, **{"train.base_weights": "fp8", "train.mixed_precision": "bf16",
                                               "train.gradient_checkpointing": "true"}).to_dict()
    assert any("base_weights" in line for line in checkpoint.config_differences(saved, changed))
