"""FLUX.1-dev and FLUX.1-schnell each train with their own recipe, read from their configs: the
time shift of the scheduler, the T5 length (the same in training and sampling), the ModelSpec
architecture; and a FLUX.1 folder is judged by its own VAE, not by full-size constants."""
import json
import re
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from lora_booth.config import loading
from lora_booth.adapters import formats
from lora_booth.adapters import file_metadata
from lora_booth.model import lora, loading as models, text
from lora_booth.families import noise
from lora_booth.config.sections import LoraConfig, ModelConfig, ObjectiveConfig
from lora_booth.io.errors import ModelError
from lora_booth.families import flux
from lora_booth.families.tiny import tiny_model_dir

DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)  # its scheduler_config.json


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    """The tiny FLUX.1 folder as schnell is made: no guidance input, a scheduler without shift."""
    folder = tmp_path_factory.mktemp("schnell") / "schnell"
    shutil.copytree(tiny_model_dir("tiny-flux"), folder)
    pipe = FluxPipeline.from_pretrained(folder)
    transformer = type(pipe.transformer)(**{**pipe.transformer.config, "guidance_embeds": False})
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER), vae=pipe.vae,
                 text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                 tokenizer_2=pipe.tokenizer_2, transformer=transformer).save_pretrained(folder)
    return folder


def median_sigma(shift: float) -> float:
    generator = torch.Generator().manual_seed(0)
    return torch.stack([noise.flow_sigma(generator, ObjectiveConfig(), shift) for _ in range(4001)]).median().item()


def test_schnell_trains_at_its_schedulers_fixed_shift_dev_at_the_resolutions():
    dev, schnell = (FlowMatchEulerDiscreteScheduler(**c) for c in (DEV_SCHEDULER, SCHNELL_SCHEDULER))
    for tokens in (256, 4096):  # 256 px and 1024 px
        assert flux.resolution_shift(schnell, tokens) == 1.0
    assert flux.resolution_shift(dev, 4096) == pytest.approx(torch.e ** 1.15)
    assert median_sigma(flux.resolution_shift(schnell, 4096)) == pytest.approx(0.5, abs=0.02)
    assert median_sigma(flux.resolution_shift(dev, 4096)) == pytest.approx(0.76, abs=0.02)


def test_flow_sigma_docstring_states_the_shifts_it_samples_with():
    """Every "k at N px" the docstring of flow_sigma states is dev's resolution shift at N px."""
    dev = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    stated = re.findall(r"([0-9.]+)\s+at\s+([0-9]+)\s+px", noise.flow_sigma.__doc__)
    assert len(stated) >= 2
    for shift, pixels in stated:
        tokens = (int(pixels) // 16) ** 2  # 8× VAE, then 2×2 packing
        assert float(shift) == pytest.approx(flux.resolution_shift(dev, tokens), abs=0.006), (shift, pixels)


@pytest.mark.parametrize("member,limit,expected", [("dev", 1024, 512), ("schnell", 1024, 256), ("dev", None, 512),
                                                   ("dev", 24, 24)])
def test_t5_reads_as_many_tokens_in_training_as_in_sampling(member, limit, expected, schnell_dir):
    """The prompt cache (training) holds what FluxPipeline computes with the max_sequence_length
    the samples are drawn with; a tokenizer with a longer limit, or none, is capped at the member's."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    base = models.load_frozen(ModelConfig(source=str(schnell_dir) if member == "schnell" else "tiny-flux"))
    assert base.variant == member
    base.tokenizer_2.model_max_length = VERY_LARGE_INTEGER if limit is None else limit
    length = base.kind.pipeline_kwargs(base)["max_sequence_length"]
    assert length == expected
    cache = text.PromptCache(base.text_encoders, ["a photo of sks dog"], torch.device("cpu"), base.variant)
    trained = cache(["a photo of sks dog"], torch.device("cpu"), torch.float32)
    pipe = base.kind.pipeline(base, base.unet, base.noise_scheduler)
    with torch.no_grad():
        sampled, pooled, _ = pipe.encode_prompt("a photo of sks dog", prompt_2=None, device="cpu",
                                                max_sequence_length=length)
    assert trained.hidden.shape[1] == expected
    assert torch.equal(trained.hidden, sampled) and torch.equal(trained.pooled, pooled)


def test_the_modelspec_architecture_is_the_members(schnell_dir, tmp_path):
    for source, architecture in ((str(schnell_dir), "flux-1-schnell/lora"), ("tiny-flux", "flux-1-dev/lora")):
        base = models.load_frozen(ModelConfig(source=source))
        lora.add_adapters(base, LoraConfig(rank=2), seed=0)
        cfg, _ = loading.resolve({"model": source, "instance_dir": str(tmp_path), "instance_prompt": "a sks dog",
                                 "prior_weight": "0", "output_dir": str(tmp_path / "out")})
        metadata = file_metadata.kohya_file_metadata(formats.from_model(base), file_metadata.run_metadata(cfg, base, 1), base.family)
        assert metadata["modelspec.architecture"] == architecture


def folder_with(tmp_path, source: str, denoiser_channels: int, vae_channels: int):
    folder = tmp_path / f"{denoiser_channels}-over-{vae_channels}"
    shutil.copytree(tiny_model_dir(source), folder)
    denoiser = "transformer" if source == "tiny-flux" else "unet"
    for part, key, value in ((denoiser, "in_channels", denoiser_channels), ("vae", "latent_channels", vae_channels)):
        path = folder / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    return folder


@pytest.mark.parametrize("source,packing", [("tiny", 1), ("tiny-sdxl", 1), ("tiny-flux", 4)])
def test_inpainting_fill_and_control_are_told_by_the_vae(tmp_path, source, packing):
    """A denoiser whose input is its VAE's latents (packed 2×2 for FLUX.1) is text-to-image, at any
    width: a 4-channel VAE under a 16-wide FLUX.1 transformer (diffusers' own tiny test pipelines)
    is one. An input wider than that takes a mask or a control image too and is refused."""
    models.locate(ModelConfig(source=str(folder_with(tmp_path, source, 4 * packing, 4))))
    wider = 4 * packing + 5 * 4  # Fill: the masked image's latents and the mask on top
    with pytest.raises(ModelError, match=f"{wider} input channels"):
        models.locate(ModelConfig(source=str(folder_with(tmp_path, source, wider, 4))))
