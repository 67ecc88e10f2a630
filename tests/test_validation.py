"""Validation loss (validate.every, issue #18): the training objective on fixed held-out rows,
from random streams of their own, evaluated without gradients; it changes no training number."""
import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from lora_booth.families.latents import LatentCodec
from lora_booth.config import loading
from lora_booth.data import batches as data
from lora_booth.data import rows as data_rows
from lora_booth.model import text
from lora_booth.training import validation
from lora_booth.io.errors import ConfigError
from lora_booth.training.recipe import run

from conftest import tiny_config


def quiet(*_):
    pass


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [{}, {"data.cache_latents": "false", "prior.mode": "prediction",
                                        "lora.text_encoder": "true", "data.buckets": "true",
                                        "data.bucket_step": "16"}])
def test_validating_changes_no_training_number(tmp_path, photos, extra):
    """Every step validated, or never: bit-identical adapters and training losses (with adapter
    and caption dropout, flips, and in the second case uncached latents, prior by prediction,
    trained text encoders and buckets); the validation losses are logged apart."""
    common = dict(max_steps=3, **extra, **{"lora.dropout": 0.1, "data.flip": "true", "data.caption_dropout": 0.3})
    plain = run(tiny_config(tmp_path / "a", photos, **common), quiet)
    validated = run(tiny_config(tmp_path / "b", photos, **common, **{"validate.every": 1, "validate.rows": 3}),
                    quiet)
    a, b = load_file(str(plain.adapter)), load_file(str(validated.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records_a, records_b = metrics(tmp_path / "a/out"), metrics(tmp_path / "b/out")
    for key in ("loss", "instance_loss", "prior_loss", "lr"):
        assert [r[key] for r in records_a] == [r[key] for r in records_b]
    assert not any(k.startswith("val_") for r in records_a for k in r)
    assert all(r["val_instance_loss"] > 0 and r["val_prior_loss"] >= 0 for r in records_b)


@pytest.mark.parametrize("ema", ["0", "0.5"])
def test_the_validation_loss_is_the_saved_adapters_loss_on_the_held_out_rows(tmp_path, photos, tiny_dir, ema):
    """From first principles: a fresh pipeline with the saved adapter, the held-out rows' latents,
    noise and timesteps drawn from their "validate-instance" streams, plain MSE on ε, gives the
    logged val_instance_loss of the last step; without prior preservation no prior term is logged.
    With train.ema the saved adapter is the average, and so is what validation measures."""
    cfg = tiny_config(tmp_path, photos, max_steps=3, prior_weight=0, **{"validate.every": 2, "validate.rows": 5,
                                                                         "train.ema": ema})
    run(cfg, quiet)
    records = metrics(tmp_path / "out")
    assert [("val_instance_loss" in r) for r in records] == [False, True, True]  # every 2, and the last step
    assert not any("val_prior_loss" in r for r in records)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "out")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    instances = data_rows.instance_rows(cfg.data, quiet)
    source = data.LatentSource(pipe.vae, cfg.data, torch.device("cpu"), cfg.train.seed, codec=LatentCodec(pipe.vae.config))
    (rows, slots, size), = validation.held_out_rows(cfg, data.DreamBoothBatches(instances, [], source, 1, 0))
    assert len(rows) == 5 and len({row.path for row in rows[:3]}) == 3   # every photo before any repeats
    latents, _, _ = source.latents(rows, slots, size)
    losses = []
    with torch.no_grad():
        for latent, (stream, position), row in zip(latents, slots, rows):
            generator = data_rows.derived_generator(cfg.train.seed, f"noise-{stream}", position)
            noise = torch.randn(latent.shape, generator=generator)
            timestep = torch.randint(0, 1000, (), generator=generator)
            noisy = scheduler.add_noise(latent[None], noise[None], timestep[None])
            hidden = pipe.text_encoder(text.token_ids(pipe.tokenizer, [row.prompt]))[0]
            pred = pipe.unet(noisy, timestep[None], hidden).sample
            losses.append(torch.mean((pred - noise[None]) ** 2).item())
    assert records[-1]["val_instance_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_class_rows_are_held_out_only_with_prior_preservation(tmp_path, photos):
    class Batches:
        instances = [data_rows.Row(photos / f"0{i}.png", "a photo of sks dog", False) for i in (0, 1, 2, 0, 1, 2)]
        classes = [data_rows.Row(photos / f"c{i}.png", "a photo of dog", True) for i in range(10)]
        square = (32, 32)
        latent_source = None
    cfg = tiny_config(tmp_path, photos, **{"validate.every": 5, "validate.rows": 4})
    (rows, slots, size), = validation.held_out_rows(cfg, Batches)
    assert [row.is_prior for row in rows] == [False] * 4 + [True] * 4 and size == (32, 32)
    assert slots == [("validate-instance", i) for i in range(4)] + [("validate-class", i) for i in range(4)]
    assert len({row.path for row in rows[4:]}) == 4 and rows[3].path == rows[0].path
    Batches.classes = []
    (rows, slots, _), = validation.held_out_rows(cfg, Batches)
    assert not any(row.is_prior for row in rows)
    assert [step for step in range(1, 5) if validation.due(cfg, step)] == [4]  # every 5, max_steps 4: the last
    cfg.validate.every, cfg.train.max_steps = 2, 5
    assert [step for step in range(1, 6) if validation.due(cfg, step)] == [2, 4, 5]
    cfg.validate.every = 0
    assert not any(validation.due(cfg, step) for step in range(1, 6))


def test_validate_keys_are_checked_and_may_change_on_resume(tmp_path, photos):
    base = {"model": "tiny", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog", "output_dir": "x"}
    with pytest.raises(ConfigError, match="validate.every.*must not be negative"):
        loading.resolve({**base, "validate.every": "-1"})
    with pytest.raises(ConfigError, match="validate.rows.*must be positive"):
        loading.resolve({**base, "validate.rows": "0"})
    from lora_booth.model import checkpoint

    before = tiny_config(tmp_path, photos).to_dict()
    after = tiny_config(tmp_path, photos, **{"validate.every": 10, "validate.rows": 8}).to_dict()
    assert checkpoint.config_differences(before, after) == []


def test_the_report_plots_the_validation_loss_and_marks_its_minimum(tmp_path):
    from lora_booth.results import report

    out = tmp_path / "run"
    out.mkdir()
    values = {2: 0.5, 4: 0.3, 6: 0.4}
    lines = [{"step": s, "loss": 1.0, "instance_loss": 0.6, "prior_loss": 0.4, "lr": 1e-4, "step_seconds": 0.1,
              **({"val_instance_loss": values[s], "val_prior_loss": 0.2} if s in values else {})} for s in range(1, 7)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    page = report.build_html(out)
    assert "id='validation'" in page
    assert "<td id='val-instance-loss'>0.3000 at step 4 (last 0.4000 at step 6)</td>" in page
    assert "<td id='val-prior-loss'>0.2000 at step 2" in page
    (out / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in line.items() if not k.startswith("val_")})
                                               + "\n" for line in lines))
    assert "id='validation'" not in report.build_html(out)


def test_two_processes_validate_alike_without_hanging(tmp_path, photos, tiny_dir):
    """Every process evaluates the same held-out rows (with trained text encoders and the base
    model's class targets, DDP-wrapped modules are called by all alike): no process waits for
    another, and the numbers are a one-process run's at the same global batch. (tiny_dir: the
    tiny model is built before two processes would both build it.)"""
    from test_distributed import train

    common = {"max_steps": 2, "validate.every": 1, "lora.text_encoder": "true", "prior.mode": "prediction"}
    two, _ = train(tmp_path, photos, "two", *(f"{k}={v}" for k, v in common.items()), "launch.processes=2")
    run(tiny_config(tmp_path / "one", photos, **common, **{"train.batch_size": 2}), quiet)
    assert len(metrics(two)) == 2
    for a, b in zip(metrics(tmp_path / "one/out"), metrics(two)):
        for key in ("loss", "val_instance_loss", "val_prior_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4)
