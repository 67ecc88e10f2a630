"""The training math that review found wrong (issue #21): inputs in the compute dtype under fp8
weights, the result saved before the optional extras, the logged loss of the whole optimizer
step, skipped updates that change nothing, and caption dropout on the pipeline's own
unconditional input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lora_booth.results import card, sample
from lora_booth.model import fp8, loading as models, objective, text
from lora_booth.training import recipe
from lora_booth.results import report as run_report
from lora_booth.config.sections import ModelConfig
from lora_booth.training.recipe import run

from conftest import make_photo, tiny_config


def quiet(*_):
    pass


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def record_unet_inputs(monkeypatch, calls: list) -> None:
    """Every UNet call of the run (training steps and the sample grid), as the UNet receives it."""
    store = fp8.store_in_fp8

    def store_and_watch(unet, compute_dtype, *keep):
        layers = store(unet, compute_dtype, *keep)

        def watch(module, args, kwargs):
            inputs = dict(zip(("sample", "timestep", "encoder_hidden_states"), args), **kwargs)
            calls.append({"sample": inputs["sample"].dtype, "hidden": inputs["encoder_hidden_states"].dtype,
                          "added": {k: v.detach().clone() for k, v in (inputs.get("added_cond_kwargs") or {}).items()}})
        unet.register_forward_pre_hook(watch, with_kwargs=True)
        return layers
    monkeypatch.setattr(fp8, "store_in_fp8", store_and_watch)  # what quantize.store calls for fp8


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_base_weights_get_inputs_in_the_compute_dtype_in_training_and_sampling(tmp_path, family, monkeypatch):
    """fp8 is a storage format: latents, text states, pooled embeddings and SDXL's size numbers
    reach the UNet in bf16 (the training precision). SDXL runs the shipped sdxl-8gb preset (bf16
    instead of its fp16, which needs CUDA); a photo of 600×500 makes size numbers above e4m3's
    maximum of 448, which fp8 inputs clipped to 448."""
    photos = tmp_path / "photos"
    photos.mkdir()
    make_photo(photos / "00.png", 0, size=(600, 500))
    make_photo(photos / "01.png", 1, size=(64, 80))
    keys = {"train.fp8_base": True, "train.mixed_precision": "bf16", "train.gradient_checkpointing": True,
            "max_steps": 2, "sample.num": 1, "sample.steps": 2}
    if family == "sdxl":
        keys = {"preset": "sdxl-8gb", "model": "tiny-sdxl", "resolution": 32, "train.mixed_precision": "bf16",
                "max_steps": 2, "sample.num": 1, "sample.steps": 2, "prior.sample_steps": 2}
    calls = []
    record_unet_inputs(monkeypatch, calls)
    trained = run(tiny_config(tmp_path, photos, **keys), quiet)
    assert trained.step == 2 and trained.adapter.is_file()
    assert (tmp_path / "out/samples/step-00000002.png").is_file()   # the sampling path under fp8 too
    assert any(p.dtype == fp8.STORAGE for p in trained.base.unet.parameters())
    passes = 4 if family == "sdxl" else 2                   # sdxl-8gb: split_prior, two passes a step
    training, sampling = calls[:passes], calls[passes:]
    assert all(c["sample"] == torch.bfloat16 and c["hidden"] == torch.bfloat16 for c in training), training
    # sampling starts from latents in bf16; the scheduler may hand back fp32, which autocast takes
    assert sampling and sampling[0]["sample"] == torch.bfloat16
    assert all(c["sample"] in (torch.bfloat16, torch.float32) and c["hidden"] == torch.bfloat16 for c in sampling)
    if family == "sdxl":
        assert all(c["added"]["text_embeds"].dtype == torch.bfloat16 for c in training + sampling)
        sizes = torch.cat([c["added"]["time_ids"].float() for c in training])
        # the 600×500 photo's original size (height, width) arrives unclipped
        assert ((sizes[:, 0] == 500) & (sizes[:, 1] == 600)).any(), sizes
        assert sizes.max() > 448


def test_the_adapter_is_saved_before_the_optional_extras(tmp_path, photos, monkeypatch):
    """A failing sample grid, model card and report cost warnings, never the trained result; the
    final checkpoint lets resume=latest redo the end without training again."""
    def broken(*args, **kwargs):
        raise RuntimeError("disk trouble")
    for module, name in ((sample, "training_grid"), (card, "write_model_card"), (run_report, "write_report")):
        monkeypatch.setattr(module, name, broken)
    messages = []
    cfg = tiny_config(tmp_path, photos, max_steps=3, **{"sample.num": 1, "sample.steps": 2})
    trained = run(cfg, messages.append)
    out = tmp_path / "out"
    assert trained.adapter.is_file() and (out / "sks_dog.safetensors").is_file()
    assert (out / "checkpoints/step-00000003/state.json").is_file()
    warnings = [m for m in messages if m.startswith("warning:")]
    assert any("sample grid" in m and "resume=latest" in m for m in warnings), warnings
    assert any("model card" in m and "resume=latest" in m for m in warnings), warnings
    assert any("report.html" in m for m in warnings), warnings
    adapter = load_file(str(trained.adapter))
    monkeypatch.undo()
    messages = []
    again = run(tiny_config(tmp_path, photos, max_steps=3, resume="latest", **{"sample.num": 1, "sample.steps": 2}),
                messages.append)
    assert not any(m.startswith("trained ") for m in messages)           # no step was trained again
    assert (out / "README.md").is_file() and (out / "report.html").is_file()
    assert (out / "samples/step-00000003.png").is_file()
    resaved = load_file(str(again.adapter))
    assert all(torch.equal(adapter[k], resaved[k]) for k in adapter)


def test_the_logged_loss_is_the_mean_over_the_steps_micro_batches(tmp_path, photos, monkeypatch):
    seen = []
    original = objective.dreambooth_loss

    def watched(*args, **kwargs):
        losses = original(*args, **kwargs)
        seen.append([float(v.detach()) for v in losses])
        return losses
    monkeypatch.setattr(objective, "dreambooth_loss", watched)
    run(tiny_config(tmp_path, photos, max_steps=2, **{"train.grad_accum": 2}), quiet)
    logged = metrics(tmp_path / "out")
    assert len(seen) == 4 and len(logged) == 2
    for record, pair in zip(logged, (seen[0:2], seen[2:4])):
        for index, key in enumerate(("loss", "instance_loss", "prior_loss")):
            assert record[key] == pytest.approx((pair[0][index] + pair[1][index]) / 2, rel=1e-6)
        assert record["loss"] != pytest.approx(pair[1][0], rel=1e-6)  # not the last micro-batch's


def poison_second_loss(monkeypatch):
    """The second loss of the run (the second micro-batch) becomes NaN; `.calls` can be reset."""
    original = objective.dreambooth_loss

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        poisoned.calls += 1
        return losses._replace(total=losses.total * float("nan")) if poisoned.calls == 2 else losses
    poisoned.calls = 0
    monkeypatch.setattr(objective, "dreambooth_loss", poisoned)
    return poisoned


class SkippingOptimizer:
    """Stands for fp16's loss scaler finding inf gradients on the `skip`-th optimizer step: it
    leaves the weights alone and says so, as accelerate's optimizer wrapper does."""

    def __init__(self, inner, skip: int) -> None:
        self.inner, self.skip, self.calls, self.step_was_skipped = inner, skip, 0, False

    def step(self, *args, **kwargs):
        self.calls += 1
        self.step_was_skipped = self.calls == self.skip
        if not self.step_was_skipped:
            self.inner.step(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("cause", ["nan", "scaler"])
def test_a_skipped_update_changes_nothing_and_is_not_counted(tmp_path, photos, monkeypatch, cause):
    """Whether the loss was non-finite (on_nan=skip) or the scaler caught an overflow, the skipped
    update moves neither the adapters, the EMA nor the schedule: the run applies max_steps updates
    with the learning rates of a run without the skip."""
    keys = {"max_steps": 3, "optim.schedule": "linear", "train.ema": 0.9, "train.on_nan": "skip",
            "save.checkpoint_every": 1, "save.keep": 5}
    clean = run(tiny_config(tmp_path / "clean", photos, **keys), quiet)
    if cause == "nan":
        poison_second_loss(monkeypatch)
    else:
        prepare = recipe.prepare_optimization

        def prepared(*args):
            setup = prepare(*args)
            setup.optimizer = SkippingOptimizer(setup.optimizer, skip=2)
            return setup
        monkeypatch.setattr(recipe, "prepare_optimization", prepared)
    messages = []
    skipped = run(tiny_config(tmp_path / "skipped", photos, **keys), messages.append)
    assert skipped.step == clean.step == 3
    assert sum("update was skipped" in m for m in messages) == 1, messages
    out = tmp_path / "skipped/out"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert [r["lr"] for r in metrics(out)] == [r["lr"] for r in metrics(tmp_path / "clean/out")]
    state = json.loads((out / "checkpoints/step-00000003/state.json").read_text())
    assert state["ema"]["optimization_step"] == 3            # three EMA updates, not four
    assert state["micro_steps"] == 4                         # the data moved on past the skipped batch
    # the skip came after step 1: up to there both runs are the same; the skipped batch applied nothing
    one = load_file(str(out / "checkpoints/step-00000001/adapter.safetensors"))
    reference = load_file(str(tmp_path / "clean/out/checkpoints/step-00000001/adapter.safetensors"))
    assert all(torch.equal(one[k], reference[k]) for k in one)
    assert all(torch.isfinite(t).all() for t in load_file(str(skipped.adapter)).values())


def test_resuming_after_a_skipped_update_continues_the_data_where_it_stood(tmp_path, photos, monkeypatch):
    poisoned = poison_second_loss(monkeypatch)
    keys = {"train.on_nan": "skip", "save.checkpoint_every": 1, "save.keep": 5}
    whole = run(tiny_config(tmp_path / "whole", photos, max_steps=4, **keys), quiet)
    poisoned.calls = 0
    run(tiny_config(tmp_path / "parts", photos, max_steps=2, **keys), quiet)
    monkeypatch.undo()
    resumed = run(tiny_config(tmp_path / "parts", photos, max_steps=4, resume="latest", **keys), quiet)
    a, b = load_file(str(whole.adapter)), load_file(str(resumed.adapter))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_caption_dropout_trains_the_pipelines_unconditional_input(tmp_path, photos, monkeypatch):
    """SD 1.x: dropped rows hear the encoded empty prompt. SDXL: its pipeline guides with zero
    hidden states and a zero pooled embedding (force_zeros_for_empty_prompt), and so do dropped rows."""
    for model in ("tiny", "tiny-sdxl"):
        calls = []
        unet_forward = {}

        def watch(module, args, kwargs):
            hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
            pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
            calls.append((hidden.detach().clone(), None if pooled is None else pooled.detach().clone()))
        prepare = recipe.prepare_optimization

        def prepared(*args):
            setup = prepare(*args)
            unet_forward["hook"] = setup.base.unet.register_forward_pre_hook(watch, with_kwargs=True)
            return setup
        monkeypatch.setattr(recipe, "prepare_optimization", prepared)
        cfg = tiny_config(tmp_path / model, photos, model=model, max_steps=4, **{"data.caption_dropout": 0.5,
                                                                                 "prior.weight": 0})
        trained = run(cfg, quiet)
        monkeypatch.undo()
        base = trained.base
        fresh = models.load_frozen(ModelConfig(source=model))  # the run freed its encoders after caching
        with torch.no_grad():
            empty = text.encode_prompts(fresh.text_encoders, [""], torch.device("cpu"))
        rows = [(hidden[i], None if pooled is None else pooled[i]) for hidden, pooled in calls
                for i in range(hidden.shape[0])]
        zero_rows = [r for r in rows if not r[0].any()]
        empty_rows = [r for r in rows if torch.allclose(r[0], empty.hidden[0], atol=1e-6)]
        if model == "tiny-sdxl":
            assert base.unconditional_zeros
            assert zero_rows and not empty_rows
            assert all(not pooled.any() for _, pooled in zero_rows)
        else:
            assert not base.unconditional_zeros
            assert empty_rows and not zero_rows
        assert len(zero_rows + empty_rows) < len(rows)  # the other rows keep their caption


def test_unconditional_zeroes_only_the_dropped_rows():
    hidden, pooled = torch.ones(3, 2, 4), torch.ones(3, 5)
    dropped = torch.tensor([False, True, False])
    result = text.unconditional(text.Conditioning(hidden, pooled), dropped, zeros=True)
    assert result.hidden[1].abs().sum() == 0 and result.pooled[1].abs().sum() == 0
    assert torch.equal(result.hidden[[0, 2]], hidden[[0, 2]]) and torch.equal(result.pooled[[0, 2]], pooled[[0, 2]])
    same = text.unconditional(text.Conditioning(hidden, pooled), dropped, zeros=False)
    assert torch.equal(same.hidden, hidden)
