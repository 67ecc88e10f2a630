"""train.mixed_precision=fp16 through accelerate's real loss scaler, on the CPU (issue #20): an
overflowing step is skipped, gradients are unscaled before they are clipped, and the scaler's
state is checkpointed and restored on resume. lora-booth refuses fp16 without CUDA (and accelerate
would run it as fp32 without a scaler), so these tests build the accelerator with torch's CPU
GradScaler, tools/gpu_check.py's cpu_fp16_accelerator; the rest of the run is lora-booth's own.
test_training_math.py covers skipped updates with a stand-in optimizer; here the scaler decides."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_booth import recipe

from conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gpu_check import cpu_fp16_accelerator  # noqa: E402

FP16 = {"train.mixed_precision": "fp16", "save.checkpoint_every": 1, "save.keep": 8}


class Watch:
    """The accelerators a run builds, and an inf gradient on the chosen micro-steps."""

    def __init__(self, monkeypatch, poison=()):
        self.accelerators, self.poison, self.scaler_at_first_step = [], set(poison), None
        self.unchanged = {}
        monkeypatch.setattr(recipe, "make_accelerator", self.make)
        original = recipe.training_step

        def step(setup, micro_step, cfg):
            trained = [p for group in setup.params.values() for p in group]
            if self.scaler_at_first_step is None:
                self.scaler_at_first_step = dict(setup.accelerator.scaler.state_dict())
            if micro_step not in self.poison:
                return original(setup, micro_step, cfg)
            before = [p.detach().clone() for p in trained]
            hook = trained[0].register_hook(lambda grad: grad * float("inf"))
            try:
                return original(setup, micro_step, cfg)
            finally:
                hook.remove()
                self.unchanged[micro_step] = all(torch.equal(a, p.detach()) for a, p in zip(before, trained))
        monkeypatch.setattr(recipe, "training_step", step)

    def make(self, cfg):
        self.accelerators.append(cpu_fp16_accelerator(cfg))
        return self.accelerators[-1]


def scaler_state(out: Path, step: int) -> dict:
    return json.loads((out / f"checkpoints/step-{step:08d}/state.json").read_text())["scaler"]


def test_an_overflowing_step_is_skipped_and_halves_the_scale(tmp_path, photos, monkeypatch):
    watch = Watch(monkeypatch, poison={1})
    messages = []
    trained = recipe.run(tiny_config(tmp_path, photos, max_steps=3, **FP16), messages.append)
    assert trained.step == 3
    assert watch.unchanged == {1: True}                     # the skipped update moved no adapter
    skips = [m for m in messages if "update was skipped" in m]
    assert len(skips) == 1 and "fp16 gradient overflow" in skips[0], messages
    out = tmp_path / "out"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert scaler_state(out, 1)["scale"] == 65536.0         # torch's initial scale, before the overflow
    assert scaler_state(out, 2)["scale"] == 32768.0         # halved once, then a clean step
    state = json.loads((out / "checkpoints/step-00000003/state.json").read_text())
    assert state["micro_steps"] == 4                        # the poisoned batch was drawn and dropped
    assert all(torch.isfinite(t).all() for t in load_file(str(trained.adapter)).values())


def test_gradients_are_unscaled_before_they_are_clipped(tmp_path, photos, monkeypatch):
    """Clipping the scaled gradients would clip at max_grad_norm × scale, i.e. not at all."""
    watch = Watch(monkeypatch)
    seen = []

    def make(cfg):
        accelerator = watch.make(cfg)
        clip = accelerator.clip_grad_norm_

        def clip_and_record(parameters, max_norm, *args, **kwargs):
            parameters = list(parameters)
            scaled = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
            total = clip(parameters, max_norm, *args, **kwargs)
            after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
            seen.append((float(scaled), float(total), float(after), accelerator.scaler.get_scale(), max_norm))
            return total
        accelerator.clip_grad_norm_ = clip_and_record
        return accelerator
    monkeypatch.setattr(recipe, "make_accelerator", make)
    recipe.run(tiny_config(tmp_path, photos, max_steps=2, **FP16, **{"optim.max_grad_norm": 1e-3}), lambda *_: None)
    assert len(seen) == 2
    for scaled, total, after, scale, max_norm in seen:
        assert scale == 65536.0
        assert total == pytest.approx(scaled / scale, rel=1e-3)   # the norm clipping saw: unscaled
        assert total > max_norm and after == pytest.approx(max_norm, rel=1e-2)


def test_the_scaler_state_is_checkpointed_and_restored_on_resume(tmp_path, photos, monkeypatch):
    """A run resumed after an overflow continues with the halved scale and the growth count it
    had, and ends exactly as the run that was never interrupted."""
    Watch(monkeypatch, poison={1})
    whole = recipe.run(tiny_config(tmp_path / "whole", photos, max_steps=4, **FP16), lambda *_: None)
    monkeypatch.undo()                                      # each run wraps the recipe's own step
    Watch(monkeypatch, poison={1})
    recipe.run(tiny_config(tmp_path / "parts", photos, max_steps=2, **FP16), lambda *_: None)
    saved = scaler_state(tmp_path / "parts/out", 2)
    assert saved["scale"] == 32768.0 and saved["_growth_tracker"] == 1
    monkeypatch.undo()
    watch = Watch(monkeypatch)
    resumed = recipe.run(tiny_config(tmp_path / "parts", photos, max_steps=4, resume="latest", **FP16),
                         lambda *_: None)
    assert watch.scaler_at_first_step == saved              # restored before the first resumed step
    assert scaler_state(tmp_path / "parts/out", 4) == scaler_state(tmp_path / "whole/out", 4)
    a, b = load_file(str(whole.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_runs_through_lora_booths_own_accelerator_on_the_cpu(tmp_path, photos, monkeypatch):
    """The fp16 presets' path with nothing of it replaced but the refusal of fp16 without CUDA:
    lora-booth's accelerator (autocast + torch's CPU GradScaler), frozen weights stored in fp16,
    the forward in fp16, fp32 adapters and gradients, an overflowing update skipped."""
    from lora_booth import preparation

    monkeypatch.setattr(preparation, "refuse_fp16_without_cuda", lambda cfg, device: None)
    seen = {"forward": [], "grads": set(), "unchanged": None, "scaler": None}
    original = recipe.training_step

    def step(setup, micro_step, cfg):
        trained = [p for group in setup.params.values() for p in group]
        seen["scaler"] = setup.accelerator.scaler
        seen.setdefault("frozen", {p.dtype for p in setup.base.unet.parameters() if not p.requires_grad})
        seen.setdefault("adapters", {p.dtype for p in trained})
        # an inner layer: accelerate hands the denoiser's own output back in fp32
        hooks = [setup.base.unet.conv_out.register_forward_hook(
            lambda module, args, output: seen["forward"].append(output.dtype))]
        hooks += [p.register_hook(lambda grad: seen["grads"].add(grad.dtype)) for p in trained]
        before = [p.detach().clone() for p in trained]
        if micro_step == 1:                                 # an fp16 overflow in the second update
            hooks.append(trained[0].register_hook(lambda grad: grad * float("inf")))
        try:
            return original(setup, micro_step, cfg)
        finally:
            for hook in hooks:
                hook.remove()
            if micro_step == 1:
                seen["unchanged"] = all(torch.equal(a, p.detach()) for a, p in zip(before, trained))
    monkeypatch.setattr(recipe, "training_step", step)
    messages = []
    trained = recipe.run(tiny_config(tmp_path, photos, max_steps=2, **FP16), messages.append)
    assert isinstance(seen["scaler"], torch.amp.GradScaler)
    assert seen["frozen"] == {torch.float16} and set(seen["forward"]) == {torch.float16}
    assert seen["adapters"] == {torch.float32} and seen["grads"] == {torch.float32}
    assert seen["unchanged"] is True and trained.step == 2
    assert any("fp16 gradient overflow" in m for m in messages), messages
    assert {t.dtype for t in load_file(str(trained.adapter)).values()} == {torch.float32}
