"""SDXL: two text encoders, pooled embeddings and size conditioning, files diffusers' SDXL
pipeline loads, and kohya's SDXL names (original UNet blocks, lora_te1_/lora_te2_)."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from lora_booth.families.latents import LatentCodec
from lora_booth.adapters import formats
from lora_booth.adapters import kohya_layout
from lora_booth.adapters import neutral
from lora_booth.adapters import diffusers_layout
from lora_booth.families import ldm
from lora_booth.model import loading as models, text
from lora_booth.config.sections import ModelConfig
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config
from lora_booth.data import rows as data_rows


@pytest.fixture(scope="module")
def sdxl_dir():
    from lora_booth.families.tiny import tiny_model_dir

    return tiny_model_dir("tiny-sdxl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sdxl_dir):
    """Both text encoders trained too; alpha ≠ rank; prior preservation on."""
    root = tmp_path_factory.mktemp("sdxl")
    cfg = tiny_config(root, make_photos(root), model="tiny-sdxl", rank=4, alpha=2, max_steps=3,
                      **{"lora.text_encoder": "true", "save.name": "sks_dog"})
    result = run(cfg, lambda *_: None)
    for module in (result.base.unet, result.base.text_encoder, result.base.text_encoder_2):
        module.eval()
    return result


def prediction(unet, encoders: dict):
    """One UNet call conditioned as the SDXL pipeline conditions it."""
    conditioning = text.encode_prompts(encoders, ["a photo of sks dog"], torch.device("cpu"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    return unet(latents, torch.tensor([300]), conditioning.hidden,
                added_cond_kwargs={"text_embeds": conditioning.pooled, "time_ids": time_ids}).sample


def loaded_prediction(sdxl_dir, folder, weight_name):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    encoders = {"text_encoder": (pipe.tokenizer, pipe.text_encoder),
                "text_encoder_2": (pipe.tokenizer_2, pipe.text_encoder_2)}
    with torch.no_grad():
        return prediction(pipe.unet, encoders)


def test_sdxl_is_detected_and_loaded_with_both_encoders(sdxl_dir):
    info = models.locate(ModelConfig(source=str(sdxl_dir)))
    assert info.family == models.SDXL
    base = models.load_frozen(ModelConfig(source=str(sdxl_dir)), info)
    assert list(base.text_encoders) == ["text_encoder", "text_encoder_2"]
    encoded = text.encode_prompts(base.text_encoders, ["a photo of dog", "a dog"], torch.device("cpu"))
    # penultimate states of both encoders side by side, and the second's projection
    assert encoded.hidden.shape == (2, 77, base.unet.config.cross_attention_dim)
    assert encoded.pooled.shape == (2, base.text_encoder_2.config.projection_dim)


def test_sdxl_conditioning_matches_the_pipeline(sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    hidden, _, pooled, _ = pipe.encode_prompt("a photo of dog", device="cpu", do_classifier_free_guidance=False)
    encoders = {"text_encoder": (pipe.tokenizer, pipe.text_encoder),
                "text_encoder_2": (pipe.tokenizer_2, pipe.text_encoder_2)}
    with torch.no_grad():
        ours = text.encode_prompts(encoders, ["a photo of dog"], torch.device("cpu"))
    assert torch.equal(ours.hidden, hidden) and torch.equal(ours.pooled, pooled)


def test_trained_sdxl_adapter_loads_in_diffusers_at_the_trained_strength(trained, sdxl_dir):
    base, out = trained.base, trained.adapter.parent
    with torch.no_grad():
        expected = prediction(base.unet, base.text_encoders)
        untouched = loaded_prediction(sdxl_dir, out, neutral.DIFFUSERS_WEIGHT_NAME)
    assert torch.allclose(untouched, expected, atol=1e-5)
    kohya = loaded_prediction(sdxl_dir, out, "sks_dog.safetensors")  # diffusers' own kohya SDXL reader
    assert torch.allclose(kohya, expected, atol=1e-5)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    with torch.no_grad():
        plain = prediction(pipe.unet, {"text_encoder": (pipe.tokenizer, pipe.text_encoder),
                                       "text_encoder_2": (pipe.tokenizer_2, pipe.text_encoder_2)})
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapters did change something


def test_sdxl_kohya_file_uses_kohya_sdxl_names_and_round_trips(trained, tmp_path):
    path = trained.adapter.parent / "sks_dog.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    # down_blocks.1.attentions.0 of a two-resnets-per-level UNet is the original model's input_blocks.4.1
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_up_blocks")) for k in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    kohya = formats.read(path)
    diffusers_file = formats.read(trained.adapter)
    assert kohya.family() == "sdxl" and kohya.modules.keys() == diffusers_file.modules.keys()
    for key, module in diffusers_file.modules.items():  # bit-exact both ways
        assert torch.equal(kohya.modules[key].down, module.down) and torch.equal(kohya.modules[key].up, module.up)
        assert kohya.modules[key].alpha == module.alpha == 2.0
    again = kohya_layout.write_kohya(kohya, tmp_path / "again.safetensors")
    with safe_open(str(again), "pt") as handle:
        assert set(handle.keys()) == keys


@pytest.mark.parametrize("name", [
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k", "mid_block.attentions.0.proj_in",
    "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2", "up_blocks.2.resnets.2.conv1",
    "down_blocks.0.resnets.1.time_emb_proj", "down_blocks.1.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
    "mid_block.resnets.1.conv_shortcut", "conv_in"])
def test_original_sdxl_block_names_invert(name):
    original = ldm.unet_module_name(name, ldm.SDXL_UNET_LAYOUT)
    assert ldm.diffusers_unet_module_name(original) == name
    assert kohya_layout.parse_kohya_name(kohya_layout.kohya_name("unet", name, "sdxl")) == ("unet", name)


def test_size_conditioning_of_each_row(tmp_path):
    """A landscape photo's original size and crop corner, as SDXL conditions on them: centred crop
    of a 96×48 photo resized to 64×32 starts 16 px in; mirrored, the same corner."""
    from lora_booth.data import batches as data
    from conftest import make_photo
    from test_data import FakeVae

    folder = tmp_path / "wide"
    folder.mkdir()
    make_photo(folder / "a.png", 0, size=(96, 48))
    for flip in (False, True):
        cfg = tiny_config(tmp_path, folder, **{"data.flip": str(flip).lower()}).data
        rows = data_rows.instance_rows(cfg)
        source = data.LatentSource(FakeVae(), cfg, torch.device("cpu"), 0, codec=LatentCodec(FakeVae().config))
        batches = data.DreamBoothBatches(rows, [], source, batch_size=2, seed=0)
        source.build_cache(batches.every_latent())
        assert batches(0).sizes.tolist() == [[48.0, 96.0, 0.0, 16.0, 32.0, 32.0]] * 2


def test_fuse_into_an_sdxl_folder_matches_the_loaded_adapter(trained, sdxl_dir, tmp_path):
    from lora_booth.adapters import merging

    merged = merging.fuse(sdxl_dir, [(trained.adapter, 1.0)], tmp_path / "merged", report=lambda *_: None)
    fused = StableDiffusionXLPipeline.from_pretrained(merged)
    with torch.no_grad():
        expected = prediction(trained.base.unet, trained.base.text_encoders)
        got = prediction(fused.unet, {"text_encoder": (fused.tokenizer, fused.text_encoder),
                                      "text_encoder_2": (fused.tokenizer_2, fused.text_encoder_2)})
    assert torch.allclose(got, expected, atol=1e-4)
    with pytest.raises(merging.MergeError, match="SDXL model as a single file"):
        merging.fuse(sdxl_dir, [(trained.adapter, 1.0)], tmp_path / "one.safetensors", report=lambda *_: None)


def test_fuse_into_an_sdxl_single_file_adds_the_exact_update(trained, sdxl_dir, tmp_path):
    """An SGM-layout SDXL checkpoint: the UNet under model.diffusion_model with the original block
    names, CLIP-L under conditioner.embedders.0.transformer; its OpenCLIP tower is refused."""
    from safetensors.torch import load_file, save_file

    from lora_booth.adapters import merging

    base = models.load_frozen(ModelConfig(source=str(sdxl_dir)))
    tensors = {f"{ldm.UNET_PREFIX}{ldm.unet_module_name(k.rpartition('.')[0], base.unet.config)}.{k.rpartition('.')[2]}": v
               for k, v in base.unet.state_dict().items()}
    tensors.update({f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v
                    for k, v in base.text_encoder.state_dict().items()})
    tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(4)
    checkpoint = tmp_path / "sdxl.safetensors"
    save_file(tensors, str(checkpoint))
    adapter = formats.read(trained.adapter)
    unet_and_clip_l = neutral.Adapter({k: m for k, m in adapter.modules.items() if k[0] != "text_encoder_2"})
    partial = diffusers_layout.write_diffusers(unet_and_clip_l, tmp_path / "partial.safetensors")
    merged = load_file(str(merging.fuse(checkpoint, [(partial, 1.0)], tmp_path / "out.safetensors",
                                        report=lambda *_: None)))
    key = f"{ldm.UNET_PREFIX}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    module = adapter.modules[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")]
    assert torch.allclose(merged[key], tensors[key] + module.delta(), atol=1e-6)
    key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    module = adapter.modules[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    assert torch.allclose(merged[key], tensors[key] + module.delta(), atol=1e-6)
    with pytest.raises(merging.MergeError, match="OpenCLIP text encoder"):
        merging.fuse(checkpoint, [(trained.adapter, 1.0)], tmp_path / "refused.safetensors", report=lambda *_: None)
    assert not (tmp_path / "refused.safetensors").exists()


def test_sdxl_vae_decodes_in_fp32_even_under_half_precision_autocast(sdxl_dir):
    """SDXL's VAE overflows in fp16 (NaN images): sampling keeps its decoder out of autocast."""
    from lora_booth.results import sample

    base = models.load_frozen(ModelConfig(source=str(sdxl_dir)))
    pipe = sample.pipeline(base, base.unet, torch.device("cpu"))
    seen = []
    pipe.vae.decoder.conv_out.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = sample.render(pipe, ["a dog"], noise, 32, torch.device("cpu"), torch.float32, torch.bfloat16, num_inference_steps=2,
                           guidance_scale=1.0)
    assert seen == [torch.float32] and images[0].size == (32, 32)
    base.vae.config.force_upcast = False  # a VAE that is fp16-safe decodes under autocast like the rest
    sample.render(pipe, ["a dog"], noise, 32, torch.device("cpu"), torch.float32, torch.bfloat16, num_inference_steps=2,
                  guidance_scale=1.0)
    assert seen[-1] == torch.bfloat16


def test_fp8_weight_storage_gives_the_gradients_of_fp8_rounded_weights(sdxl_dir):
    """Each layer runs on a fresh upcast of its fp8 weights and backward uses that same copy: the
    adapters' gradients equal those of a model whose weights were rounded to fp8 once, for good."""
    from lora_booth.config import sections as config
    from lora_booth.model import fp8, lora

    def gradients(stored_in_fp8: bool, checkpointing: bool = False):
        base = models.load_frozen(ModelConfig(source=str(sdxl_dir)))
        if not stored_in_fp8:
            for name, module in base.unet.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "norm" not in name:
                    module.weight.data = module.weight.data.to(fp8.STORAGE).float()
        params = lora.add_adapters(base, config.LoraConfig(rank=2), 0)
        if stored_in_fp8:
            layers = fp8.store_in_fp8(base.unet, torch.float32)
            assert layers > 0 and all(p.dtype == torch.float32 for p in params["unet"])
            assert any(p.dtype == fp8.STORAGE for p in base.unet.parameters())
        with torch.no_grad():
            for p in params["unet"]:
                p.add_(0.01)  # B starts at zero: move it so every adapter gets a gradient
        if checkpointing:
            base.unet.enable_gradient_checkpointing()
            base.unet.train()
        encoders = base.text_encoders
        prediction(base.unet, encoders).pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in params["unet"]])

    reference = gradients(False)
    assert torch.allclose(gradients(True), reference, rtol=1e-5, atol=1e-8)
    assert torch.allclose(gradients(True, checkpointing=True), reference, rtol=1e-5, atol=1e-8)


def test_generate_with_an_sdxl_adapter_writes_images_with_their_settings(trained, sdxl_dir, tmp_path):
    from PIL import Image

    from lora_booth.results import sample

    written = sample.generate(str(sdxl_dir), [(trained.adapter.parent, 0.8)], "a photo of sks dog", tmp_path / "images",
                              n=2, steps=2, size=32, report=lambda *_: None)
    assert len(written) == 2
    with Image.open(written[0]) as image:
        assert image.size == (32, 32) and image.info["prompt"] == "a photo of sks dog"
        assert image.info["loras"].endswith(":0.8")


def test_generate_adds_an_sdxl_loha_with_both_text_encoders(tmp_path, sdxl_dir):
    """diffusers cannot load LoHa, so generate adds it to the weights itself: on SDXL that includes
    the second text encoder's modules."""
    from lora_booth.results import sample

    cfg = tiny_config(tmp_path, make_photos(tmp_path), model="tiny-sdxl", max_steps=1, prior_weight=0,
                      **{"lora.type": "loha", "lora.text_encoder": "true"})
    trained = run(cfg, lambda *_: None)
    assert "text_encoder_2" in formats.read(trained.adapter).parts()
    written = sample.generate(str(sdxl_dir), [(trained.adapter, 1.0)], "a photo of sks dog", tmp_path / "images",
                              n=1, steps=2, size=32, report=lambda *_: None)
    assert len(written) == 1
