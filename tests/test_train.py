"""End-to-end runs on the tiny model: what a user gets must load, reproduce and resume."""
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lora_booth.config import loading
from lora_booth.training import prior
from lora_booth.io.errors import CheckpointError, ConfigError
from lora_booth.training.recipe import run

from conftest import run_until_first_checkpoint, tiny_config


def quiet(*_):
    pass


def unet_prediction(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), hidden).sample


def test_trained_adapter_loads_into_a_fresh_pipeline_and_reproduces_the_model(tmp_path, photos, tiny_dir):
    """alpha ≠ rank on purpose: without the adapter metadata diffusers would load it at the wrong strength."""
    cfg = tiny_config(tmp_path, photos, alpha=1, rank=4, max_steps=5)
    trained = run(cfg, quiet)
    trained.base.unet.eval()
    expected = unet_prediction(trained.base.unet)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    before = unet_prediction(pipe.unet)
    pipe.load_lora_weights(cfg.save.output_dir)
    loaded = unet_prediction(pipe.unet)
    assert not torch.allclose(before, expected, atol=1e-4)   # training changed the model
    assert torch.allclose(loaded, expected, atol=1e-5)        # and the file carries exactly that change


def test_base_weights_are_bit_identical_and_only_adapters_train(tmp_path, photos, tiny_dir):
    cfg = tiny_config(tmp_path, photos, **{"lora.text_encoder": "true"})
    trained = run(cfg, quiet)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    for part in ("unet", "text_encoder"):
        module = getattr(trained.base, part)
        reference = getattr(fresh, part).state_dict()
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in name for name in trainable)
        for name, tensor in module.state_dict().items():
            if "lora_" in name:
                continue
            clean = name.replace(".base_layer", "")
            assert torch.equal(tensor, reference[clean]), f"{part}.{name} changed"
    with safe_open(str(trained.adapter), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


def test_outputs_metadata_and_config(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, rank=2, alpha=4)
    trained = run(cfg, quiet)
    out = tmp_path / "out"
    with safe_open(str(trained.adapter), "pt") as f:
        metadata = f.metadata()
    adapter = json.loads(metadata["lora_adapter_metadata"])
    # alpha/r is in the weights (read at scale 1 by every loader); the trained alpha is recorded beside
    assert adapter["unet.r"] == 2 and adapter["unet.lora_alpha"] == 2
    assert json.loads(metadata["lora_booth.alpha_folded"])["trained"]["unet"]["alpha"] == 4
    assert metadata["lora_booth.trigger_prompt"] == "a photo of sks dog"
    assert metadata["lora_booth.base_model"] == "tiny" and metadata["lora_booth.family"] == "sd1"
    assert metadata["lora_booth.steps"] == "4"
    saved = loading.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert saved == cfg
    assert not list(out.glob(".*tmp"))  # nothing half-written left behind
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] == pytest.approx(r["instance_loss"] + r["prior_loss"], rel=1e-5) for r in records)


def test_refuses_to_overwrite_a_finished_run(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, max_steps=1)
    run(cfg, quiet)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run(cfg, quiet)
    run(tiny_config(tmp_path, photos, max_steps=1, overwrite="true"), quiet)


def test_resume_continues_exactly(tmp_path, photos, monkeypatch):
    """A run that dies after its step-3 checkpoint and is resumed gives the bytes of an
    uninterrupted run: data order, flips, dropout, noise, LR schedule, Adam state, accumulation."""
    common = dict(max_steps=6, **{"save.checkpoint_every": 3, "train.grad_accum": 2, "optim.schedule": "cosine",
                                  "optim.warmup_steps": 2, "lora.dropout": 0.1, "data.flip": "true"})
    straight = run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    assert (tmp_path / "b/out/checkpoints/step-00000003/state.json").is_file()
    assert not (tmp_path / "b/out/pytorch_lora_weights.safetensors").exists()
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), quiet)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings_and_damaged_checkpoints(tmp_path, photos):
    run(tiny_config(tmp_path, photos, max_steps=2, **{"save.checkpoint_every": 1}), quiet)
    with pytest.raises(ConfigError, match="lora.rank"):
        run(tiny_config(tmp_path, photos, max_steps=4, rank=3, resume="latest"), quiet)
    newest = tmp_path / "out/checkpoints/step-00000002/adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:-4] + b"oops")
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=3, resume="latest"), messages.append)
    assert any("skipping a damaged checkpoint" in m for m in messages)
    assert any("step-00000001 at step 1" in m for m in messages)
    for state in (tmp_path / "out/checkpoints").glob("step-*/state.json"):
        state.write_text("{")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        run(tiny_config(tmp_path, photos, max_steps=4, resume="latest"), quiet)
    shutil.rmtree(tmp_path / "out/checkpoints")  # stopped before its first checkpoint: starts afresh
    messages.clear()
    run(tiny_config(tmp_path, photos, max_steps=4, resume="latest"), messages.append)
    assert any("starting at step 0" in m for m in messages)


def test_class_images_are_generated_once_and_reused(tmp_path, photos):
    class_dir = tmp_path / "class"
    cfg = tiny_config(tmp_path, photos, max_steps=1, class_dir=class_dir, num_class_images=3)
    messages = []
    run(cfg, messages.append)
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 3 and any("drawing 3 of 3" in m for m in messages)
    stamps = [p.stat().st_mtime_ns for p in images]
    messages.clear()
    run(tiny_config(tmp_path, photos, max_steps=1, class_dir=class_dir, num_class_images=3, overwrite="true"),
        messages.append)
    assert any("reusing 3" in m for m in messages)
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps
    # a damaged image of ours is drawn again, identical to the first time
    first = images[0].read_bytes()
    images[0].write_bytes(first[:40])
    run(tiny_config(tmp_path, photos, max_steps=1, class_dir=class_dir, num_class_images=3, overwrite="true"), quiet)
    assert images[0].read_bytes() == first
    # asking for more draws only the missing ones
    run(tiny_config(tmp_path, photos, max_steps=1, class_dir=class_dir, num_class_images=5, overwrite="true"), quiet)
    assert len(list(class_dir.glob("*.png"))) == 5


def test_default_class_cache_is_keyed_by_what_changes_the_images(tmp_path, photos):
    a = tiny_config(tmp_path, photos)
    b = tiny_config(tmp_path, photos, class_prompt="a photo of cat")
    c = tiny_config(tmp_path, photos, seed=1)
    keys = {prior.cache_key(cfg, "model") for cfg in (a, b, c)}
    assert len(keys) == 3 and prior.cache_key(a, "other-model") not in keys


def test_cached_and_uncached_runs_train_the_same_model(tmp_path, photos):
    """The caches are an optimisation only. The VAE sees batches of different sizes, so its sums
    round differently (~1e-7); Adam moves near-zero-gradient weights by ±lr whatever the sign, so
    weights are compared through what they do: the per-step losses."""
    run(tiny_config(tmp_path / "a", photos, max_steps=4), quiet)
    run(tiny_config(tmp_path / "b", photos, max_steps=4, **{"data.cache_latents": "false",
                                                           "train.cache_text_embeddings": "false"}), quiet)

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "out/metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-4)


def test_split_prior_passes_train_the_same_model(tmp_path, photos):
    """Instance rows and class rows in two passes: the same losses and the same gradient sum (the
    text encoder trains too, so each pass encodes its own prompts)."""
    common = dict(max_steps=4, **{"train.batch_size": 2, "lora.text_encoder": "true"})
    run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run(tiny_config(tmp_path / "b", photos, **common, **{"train.split_prior": "true"}), quiet)

    def log(folder):
        return [json.loads(line) for line in (folder / "out/metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "instance_loss", "prior_loss"):
        assert [r[key] for r in log(tmp_path / "a")] == pytest.approx([r[key] for r in log(tmp_path / "b")], rel=1e-4)
    assert all(r["prior_loss"] > 0 for r in log(tmp_path / "b"))


@pytest.mark.parametrize("overrides", [
    {"optim.optimizer": "adamw8bit"},
    {"model.prediction_type": "v_prediction", "objective.min_snr_gamma": 5, "objective.noise_offset": 0.05},
    {"prior.weight": 0, "train.mixed_precision": "bf16", "train.gradient_checkpointing": "true"},
    {"data.crop": "random", "data.cache_latents": "false", "train.batch_size": 2, "optim.schedule": "linear"},
])
def test_training_variants_run_and_change_the_adapter(tmp_path, photos, overrides):
    trained = run(tiny_config(tmp_path, photos, max_steps=2, **overrides), quiet)
    tensors = load_file(str(trained.adapter))
    ups = [v for k, v in tensors.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # B starts at zero: it moved
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_fp16_on_cpu_and_xformers_without_cuda_are_config_errors(tmp_path, photos):
    with pytest.raises(ConfigError, match="(?i)fp16 needs a CUDA GPU"):
        run(tiny_config(tmp_path, photos, **{"train.mixed_precision": "fp16"}), quiet)
    with pytest.raises(ConfigError, match="(?i)xformers kernels run only on CUDA"):
        run(tiny_config(tmp_path, photos, overwrite="true", **{"train.attention": "xformers"}), quiet)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, photos):
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "lora_booth", "train", "model=tiny", f"instance_dir={photos}",
               "instance_prompt=a photo of sks dog", "prior.weight=0", f"output_dir={tmp_path / 'out'}",
               "resolution=32", "max_steps=100000", "train.device=cpu", "rank=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    output = []
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the loop runs
        line = process.stdout.readline()
        output.append(line)
        if line.startswith("output "):
            break
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    text = "".join(output) + rest
    assert process.returncode != 0, text
    assert "resume=latest" in text
    checkpoints = list((tmp_path / "out/checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "state.json").is_file()
    assert not (tmp_path / "out/pytorch_lora_weights.safetensors").exists()


def test_text_encoder_adapters_load_into_diffusers_at_the_trained_strength(tmp_path, photos, tiny_dir):
    cfg = tiny_config(tmp_path, photos, rank=4, alpha=2, max_steps=3, **{"lora.text_encoder": "true",
                                                                         "lora.text_encoder_rank": 2})
    trained = run(cfg, quiet)
    tokens = trained.base.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids
    trained.base.text_encoder.eval()
    with torch.no_grad():
        expected = trained.base.text_encoder(tokens)[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    with torch.no_grad():
        before = pipe.text_encoder(tokens)[0]
    pipe.load_lora_weights(cfg.save.output_dir)
    with torch.no_grad():
        loaded = pipe.text_encoder(tokens)[0]
    assert not torch.allclose(before, expected, atol=1e-5)
    assert torch.allclose(loaded, expected, atol=1e-5)


def test_save_now_and_sample_now_act_at_the_next_step_and_training_goes_on(tmp_path, photos, monkeypatch):
    """SIGUSR1 (save now) writes a checkpoint and SIGUSR2 (sample now) a grid at the step boundary
    after they arrive, off every schedule (no checkpoint_every, no sample.every), and the run ends
    normally; the checkpoint resumes like any other."""
    import os
    import signal

    from lora_booth.training import recipe

    cfg = tiny_config(tmp_path, photos, max_steps=4, **{"prior.weight": 0, "sample.num": 1,
                                                                       "sample.steps": 2, "save.checkpoint_every": 0})
    logged = recipe.log_metrics

    def log_and_ask(log, step, *rest, **named):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)
        return logged(log, step, *rest, **named)

    monkeypatch.setattr(recipe, "log_metrics", log_and_ask)
    run(cfg)
    out = tmp_path / "out"
    assert "step-00000002" in [p.name for p in (out / "checkpoints").glob("step-*")]
    assert any("00002" in p.name for p in (out / "samples").glob("*.png")), sorted((out / "samples").iterdir())
    assert (out / "pytorch_lora_weights.safetensors").exists()
