"""Settings whose right value depends on the family (guidance and sampler steps of class images
and samples) take the family's value unless the user sets them, and the start summary says where
each came from."""
import pytest
import yaml

from lora_booth.config import loading
from lora_booth import families
from lora_booth.training import family_defaults
from lora_booth.model import loading as models
from lora_booth.config.sections import ModelConfig
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config


def resolved(**pairs):
    cfg, _ = loading.resolve({"instance_dir": "x", "instance_prompt": "a sks dog", "prior_weight": "0",
                             "output_dir": "o", **pairs})
    return cfg


@pytest.mark.parametrize("variant,guidance,steps", [("dev", 3.5, 28), ("schnell", 0.0, 4)])
def test_flux_members_take_their_own_guidance_and_steps(variant, guidance, steps):
    cfg = resolved(model="tiny-flux")
    origins = family_defaults.apply(cfg, families.FLUX, variant)
    assert (cfg.prior.guidance_scale, cfg.sample.guidance_scale) == (guidance, guidance)
    assert (cfg.prior.sample_steps, cfg.sample.steps) == (steps, steps)
    assert origins["prior.guidance_scale"] == f"FLUX.1-{variant}'s default"


def test_what_the_user_or_a_preset_sets_is_kept_and_named():
    cfg = resolved(model="tiny-flux", preset="flux-24gb", **{"prior.guidance_scale": "5"})
    origins = family_defaults.apply(cfg, families.FLUX, "dev")
    assert cfg.prior.guidance_scale == 5 and origins["prior.guidance_scale"] == "the command line"
    assert cfg.sample.steps == 28 and origins["sample.steps"] == "preset flux-24gb"
    assert cfg.prior.sample_steps == 28 and origins["prior.sample_steps"] == "FLUX.1-dev's default"


@pytest.mark.parametrize("source", ["tiny", "tiny-sdxl", "tiny-flux"])
def test_each_located_model_gets_its_familys_values(source):
    """SD 1.x and SDXL keep classifier-free 7.5 and 25 steps; FLUX.1-dev (the tiny one has a guidance
    input) gets 3.5 and 28."""
    cfg = resolved(model=source)
    family_defaults.apply_for_model(cfg, models.locate(ModelConfig(source=source)))
    expected = (3.5, 28) if source == "tiny-flux" else (7.5, 25)
    assert (cfg.prior.guidance_scale, cfg.sample.steps) == expected


def test_class_images_of_flux_dev_are_drawn_at_its_guidance_and_the_summary_says_why(tmp_path):
    lines = []
    cfg = tiny_config(tmp_path, make_photos(tmp_path), model="tiny-flux", max_steps=1)
    run(cfg, lines.append)
    summary = next(line for text in lines for line in str(text).splitlines() if line.startswith("by family"))
    assert "prior.guidance_scale 3.5 (FLUX.1-dev's default)" in summary
    assert "sample.steps 28 (FLUX.1-dev's default)" in summary and "prior.sample_steps 2 (the command line)" in summary
    assert any("guidance 3.5" in str(text) for text in lines)  # the class images' own report
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["prior"]["guidance_scale"] == 3.5 and saved["sample"]["steps"] == 28


def test_generate_samples_flux_dev_at_its_own_guidance_and_steps(tmp_path):
    from PIL import Image

    from lora_booth.results import sample

    written = sample.generate("tiny-flux", [], "a photo of dog", tmp_path / "images", n=1, size=32,
                              report=lambda *_: None)
    info = Image.open(written[0]).info
    assert (info["guidance_scale"], info["steps"]) == ("3.5", "28")
