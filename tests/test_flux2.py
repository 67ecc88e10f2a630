"""FLUX.2 klein base: conditioning as Flux2KleinPipeline encodes it, the VAE's batch-norm
normalisation, rectified flow from first principles, files the pipeline loads with every key,
BFL's names (single-file transformer, ComfyUI's LoRA layout), refusals, the planner."""
import inspect
import json
import shutil

import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors import safe_open

from lora_booth import families
from lora_booth.config import loading
from lora_booth.config.sections import ModelConfig
from lora_booth.families import flux2, flux2_layout
from lora_booth.io.errors import ConfigError, ModelError
from lora_booth.model import loading as models, objective, text
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def klein_dir():
    from lora_booth.families.tiny import tiny_model_dir

    return tiny_model_dir("tiny-flux2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, klein_dir):
    """Prior preservation on, alpha ≠ rank, every default target (single blocks' fused layers too)."""
    root = tmp_path_factory.mktemp("flux2")
    result = run(tiny_config(root, make_photos(root), model="tiny-flux2", rank=4, alpha=2, max_steps=3,
                             **{"save.name": "sks_dog"}), lambda *_: None)
    result.base.unet.eval()
    return result


def fixed_noisy(channels: int = 8, side: int = 8) -> torch.Tensor:
    return torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0))


def pipeline_prediction(pipe, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    """One transformer call exactly as Flux2KleinPipeline.__call__ makes it (its own static
    helpers for patches, packing and ids), back in the (B, C, h, w) layout."""
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=64)
        patches = Flux2KleinPipeline._patchify_latents(noisy)
        latent_ids = Flux2KleinPipeline._prepare_latent_ids(patches)
        tokens = Flux2KleinPipeline._pack_latents(patches)
        out = pipe.transformer(hidden_states=tokens, timestep=torch.tensor([sigma * 1000]) / 1000, guidance=None,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=latent_ids,
                               return_dict=False)[0]
        return Flux2KleinPipeline._unpatchify_latents(Flux2KleinPipeline._unpack_latents_with_ids(out, latent_ids))


def our_prediction(base, noisy: torch.Tensor, sigma: float, encoders=None) -> torch.Tensor:
    with torch.no_grad():
        conditioning = text.encode_prompts(encoders or base.text_encoders, [PROMPT], torch.device("cpu"))
        return flux2.FLUX2.predict(base, base.unet, noisy, torch.tensor([sigma]), conditioning, None, 4.0)


def test_detected_and_conditioned_as_flux2_klein_pipeline_encodes(klein_dir):
    info = models.locate(ModelConfig(source=str(klein_dir)))
    assert info.family == "flux2"
    base = models.load_frozen(ModelConfig(source=str(klein_dir)), info)
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(["a photo of dog", "a dog"], device="cpu", max_sequence_length=64)
        ours = text.encode_prompts(base.text_encoders, ["a photo of dog", "a dog"], torch.device("cpu"))
    assert torch.equal(ours.hidden, embeds) and ours.hidden.shape == (2, 64, 48)
    ids, mask = flux2.FLUX2.tokenize("text_encoder", base.tokenizer, ["a dog"], 64)
    assert 0 < int(mask.sum()) < 64 and bool(mask[0, :int(mask.sum())].all())  # the prompt's tokens, then padding
    assert "<think>" in base.tokenizer.decode(ids[0][mask[0]])  # thinking off, as the pipeline asks
    # the layers and length are the pipeline's own defaults
    call = inspect.signature(Flux2KleinPipeline.__call__).parameters
    assert tuple(call["text_encoder_out_layers"].default) == flux2.TEXT_LAYERS
    assert call["max_sequence_length"].default == flux2.TEXT_TOKENS


def test_latents_patches_and_ids_are_the_pipelines(klein_dir):
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    codec = flux2.FLUX2.latent_codec(pipe.vae)
    raw = torch.randn(2, 8, 6, 8)
    patches = Flux2KleinPipeline._patchify_latents(raw)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the tiny VAE's statistics are not the identity
    normalised = codec.normalize(raw)
    assert torch.allclose(flux2.patchify(normalised), (patches - mean) / std, atol=1e-6)
    assert torch.allclose(codec.denormalize(normalised), raw, atol=1e-5)
    assert torch.equal(flux2.pack(raw), Flux2KleinPipeline._pack_latents(patches))
    assert torch.equal(flux2.unpack(flux2.pack(raw), 6, 8), raw)
    assert torch.equal(flux2.image_ids(6, 8, "cpu"), Flux2KleinPipeline._prepare_latent_ids(patches)[0])
    assert torch.equal(flux2.text_ids(5, "cpu"), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 5, 3))[0])
    assert codec.channels == 8 and pipe.vae_scale_factor == models.Base.vae_scale_factor.fget(
        type("B", (), {"kind": flux2.FLUX2, "vae": pipe.vae})())  # 4: read from the VAE, not assumed 8


def test_one_step_from_first_principles(klein_dir):
    """Input (1 − σ)·x₀ + σ·ε, target ε − x₀, and the prediction the pipeline's own transformer call
    gives; σ logit-normal, shifted by exp(μ(tokens)) as musubi-tuner's flux2_shift."""
    base = models.load_frozen(ModelConfig(source=str(klein_dir)))
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    x0, eps = fixed_noisy(), torch.randn(1, 8, 8, 8)
    sigma = 0.37
    noisy, target = flux2.FLUX2.noisy_and_target(None, x0, eps, torch.tensor([sigma]))
    assert torch.allclose(noisy, (1 - sigma) * x0 + sigma * eps) and torch.equal(target, eps - x0)
    ours, theirs = our_prediction(base, noisy, sigma), pipeline_prediction(pipe, noisy, sigma)
    assert torch.allclose(ours, theirs, atol=1e-6)
    loss = objective.dreambooth_loss(ours, target, torch.tensor([False]), 0.0)
    assert loss.instance.item() == pytest.approx(((ours - target) ** 2).mean().item(), rel=1e-6)
    from lora_booth.config.sections import ObjectiveConfig

    generator = torch.Generator().manual_seed(3)
    _, drawn = flux2.FLUX2.sample_noise(base.noise_scheduler, torch.zeros(1, 8, 64, 64), [generator], ObjectiveConfig())
    replay = torch.Generator().manual_seed(3)
    torch.randn((8, 64, 64), generator=replay)
    u = torch.sigmoid(torch.randn((), generator=replay, dtype=torch.float64))
    k = torch.exp(torch.tensor(0.5 + (1.15 - 0.5) / (4096 - 256) * (32 * 32 - 256), dtype=torch.float64))
    assert drawn.item() == pytest.approx((k * u / (1 + (k - 1) * u)).item(), rel=1e-6)


def test_trained_file_loads_every_key_into_flux2_klein_pipeline(trained, klein_dir):
    from peft.utils import get_peft_model_state_dict

    out = trained.adapter.parent
    with safe_open(str(trained.adapter), "pt") as handle:
        keys = set(handle.keys())
    assert all(k.startswith("transformer.") for k in keys)
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.0.attn.to_out.lora_B.weight" in keys
    assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_A.weight" in keys
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    pipe.load_lora_weights(str(out), adapter_name="booth")
    loaded = {f"transformer.{k}" for k in get_peft_model_state_dict(pipe.transformer, adapter_name="booth")}
    assert loaded == keys  # diffusers drops unknown keys silently: every saved tensor must be read back
    noisy = fixed_noisy()
    fresh = models.load_frozen(ModelConfig(source=str(klein_dir)))  # training freed its text encoder
    expected = our_prediction(trained.base, noisy, 0.6, fresh.text_encoders)
    assert torch.allclose(pipeline_prediction(pipe, noisy, 0.6), expected, atol=1e-5)
    plain = pipeline_prediction(Flux2KleinPipeline.from_pretrained(klein_dir), noisy, 0.6)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapters did change the prediction


def test_comfyui_file_names_every_module_in_bfl_layout_with_exact_updates(trained, klein_dir, tmp_path):
    """sks_dog.safetensors: `lora_unet_<BFL module>` — what ComfyUI maps for every `diffusion_model.`
    weight of a BFL-named model — for modules that exist in the BFL transformer; q, k and v fused
    into qkv with ΔW = the stacked diffusers updates."""
    from lora_booth.adapters import formats

    path = trained.adapter.parent / "sks_dog.safetensors"
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        assert handle.metadata()["ss_base_model_version"] == "flux2_klein"
    bfl = {flux2_layout.original_tensor_name(n)[0] for n in trained.base.unet.state_dict() if "lora_" not in n
           and "base_layer" not in n} | {flux2_layout.original_tensor_name(n.replace(".base_layer", ""))[0]
                                         for n in trained.base.unet.state_dict() if ".base_layer." in n}
    comfy_names = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in bfl if k.endswith(".weight")}
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert modules <= comfy_names and len(modules) == 6  # img/txt qkv and proj, linear1, linear2
    diffusers = formats.read(trained.adapter)
    assert diffusers.family() == "flux2"
    delta = {path: module.delta() for (_, path), module in diffusers.modules.items()}

    def kohya_delta(name):
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        return tensors[f"{name}.alpha"] / down.shape[0] * up @ down

    stacked = torch.cat([delta[f"transformer_blocks.0.attn.{p}"] for p in ("to_q", "to_k", "to_v")])
    assert torch.allclose(kohya_delta("lora_unet_double_blocks_0_img_attn_qkv"), stacked, atol=1e-6)
    assert torch.allclose(kohya_delta("lora_unet_single_blocks_0_linear1"),
                          delta["single_transformer_blocks.0.attn.to_qkv_mlp_proj"], atol=1e-6)
    # read back (inspect, convert, generate): the same modules and updates, known as FLUX.2 by the
    # shape of linear1 alone (9 outputs per input; FLUX.1's 7) when no metadata says so
    from safetensors.torch import save_file

    save_file(tensors, str(path.parent / "bare.safetensors"))
    for read in (formats.read(path), formats.read(path.parent / "bare.safetensors")):
        assert read.family() == "flux2" and set(read.modules) == set(diffusers.modules)
        for key, module in diffusers.modules.items():
            assert torch.allclose(read.modules[key].delta(), module.delta(), atol=1e-6), key
    from lora_booth.adapters.neutral import Adapter

    assert Adapter(diffusers.modules, {}, "diffusers").family() == "flux2"  # from its module names, no metadata
    # converted back to diffusers' layout (the kohya metadata carried along), it reads as that layout
    back = formats.read(formats.convert(path, "diffusers", tmp_path / "back.safetensors"))
    assert back.source_format == "diffusers" and set(back.modules) == set(diffusers.modules)


def test_merge_into_a_klein_folder_is_the_loaded_adapter(trained, klein_dir, tmp_path):
    from lora_booth.adapters import merging

    merging.fuse(klein_dir, [(trained.adapter, 1.0)], tmp_path / "merged", report=lambda *_: None)
    merged = Flux2KleinPipeline.from_pretrained(tmp_path / "merged")
    loaded = Flux2KleinPipeline.from_pretrained(klein_dir)
    loaded.load_lora_weights(str(trained.adapter.parent))
    noisy = fixed_noisy()
    assert torch.allclose(pipeline_prediction(merged, noisy, 0.4), pipeline_prediction(loaded, noisy, 0.4), atol=1e-5)
    assert torch.equal(merged.vae.bn.running_var, loaded.vae.bn.running_var)  # the VAE's 0-d batch count too
    # and into the single BFL transformer file ComfyUI holds: the same weights, q, k and v in their rows of qkv
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    bfl_transformer_file(Flux2KleinPipeline.from_pretrained(klein_dir).transformer, tmp_path / "klein.safetensors")
    merging.fuse(tmp_path / "klein.safetensors", [(trained.adapter, 1.0)], tmp_path / "merged.safetensors",
                 report=lambda *_: None)
    file = load_file(str(tmp_path / "merged.safetensors"))
    weights = convert_flux2_transformer_checkpoint_to_diffusers({k.removeprefix("model.diffusion_model."): v
                                                                 for k, v in file.items()})
    folder = merged.transformer.state_dict()
    assert weights.keys() == folder.keys() and all(torch.allclose(weights[k], folder[k], atol=1e-6) for k in folder)


def test_a_negative_prompt_reaches_klein_as_the_pipeline_encodes_it(klein_dir):
    """Flux2KleinPipeline takes negative_prompt_embeds, not negative text: generate encodes it."""
    base = models.load_frozen(ModelConfig(source=str(klein_dir)))
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt("blurry, low quality", device="cpu", max_sequence_length=64)
    given = flux2.FLUX2.negative_kwargs(base, "blurry, low quality")
    assert set(given) == {"negative_prompt_embeds"} and torch.equal(given["negative_prompt_embeds"], expected)
    assert flux2.FLUX2.negative_kwargs(base, "") == {}


def bfl_transformer_file(transformer, path, prefix="model.diffusion_model.", dtype=None):
    """The transformer in BFL's layout, written from diffusers' weights by flux2_layout's names."""
    from safetensors.torch import save_file

    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in transformer.state_dict().items():
        key, slot, parts, swapped = flux2_layout.original_tensor_name(name)
        tensor = torch.cat(tensor.chunk(2)[::-1]) if swapped else tensor
        fused.setdefault(key, {})[slot] = tensor
    tensors = {prefix + k: torch.cat([v[s] for s in sorted(v)]).contiguous() for k, v in fused.items()}
    save_file({k: v.to(dtype) if dtype else v for k, v in tensors.items()}, str(path))
    return tensors


def test_bfl_names_are_diffusers_converters_inverse_and_comfyui_single_files_load(klein_dir, tmp_path):
    """Our BFL names, fed through diffusers' own BFL → diffusers converter, give back every tensor;
    a ComfyUI-saved transformer file (fp8 too) + the folder for the rest is the same model."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    base = models.load_frozen(ModelConfig(source=str(klein_dir)))
    bfl = bfl_transformer_file(base.unet, tmp_path / "klein.safetensors", prefix="")
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    original = base.unet.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    bfl_transformer_file(base.unet, tmp_path / "comfy.safetensors")
    cfg = ModelConfig(source=str(tmp_path / "comfy.safetensors"), single_file_config=str(klein_dir))
    info = models.locate(cfg)
    assert (info.kind, info.family) == ("single_file", "flux2")  # not FLUX.1, whose double blocks share names
    loaded = models.load_frozen(cfg, info).unet.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    bfl_transformer_file(base.unet, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    fp8 = models.load_frozen(ModelConfig(source=str(tmp_path / "fp8.safetensors"), single_file_config=str(klein_dir)))
    weight = "transformer_blocks.0.attn.to_k.weight"
    assert torch.equal(fp8.unet.state_dict()[weight], original[weight].to(torch.float8_e4m3fn).to(torch.bfloat16).float())


def edited_copy(tmp_path, klein_dir, index=None, transformer=None):
    folder = tmp_path / "variant"
    shutil.copytree(klein_dir, folder)
    for part, change in (("model_index.json", index), ("transformer/config.json", transformer)):
        if change:
            config = json.loads((folder / part).read_text())
            config.update(change)
            (folder / part).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change,expected", [
    ({"_class_name": "Flux2KleinInpaintPipeline"}, "inpainting"),
    ({"_class_name": "Flux2KleinKVPipeline"}, "reference-image editing"),
    ({"_class_name": "Flux2Pipeline"}, "FLUX.2 \\[dev\\]"),
    ({"is_distilled": True}, "step-distilled.*FLUX.2-klein-base-4B"),
])
def test_variants_and_distilled_klein_are_refused_with_the_reason(tmp_path, klein_dir, change, expected):
    with pytest.raises(ModelError, match=expected):
        models.locate(ModelConfig(source=str(edited_copy(tmp_path, klein_dir, index=change))))


def test_a_transformer_wider_than_the_vaes_packed_latents_is_refused(tmp_path, klein_dir):
    with pytest.raises(ModelError, match="64 input channels, not the 32"):
        models.locate(ModelConfig(source=str(edited_copy(tmp_path, klein_dir, transformer={"in_channels": 64}))))


@pytest.mark.parametrize("setting,key", [({"lora.text_encoder": "true"}, "lora.text_encoder"),
                                         ({"objective.min_snr_gamma": "5"}, "min_snr_gamma"),
                                         ({"pivotal": "true"}, "pivotal"),
                                         ({"lora.type": "loha"}, "save.formats")])
def test_settings_that_do_not_apply_are_refused(tmp_path, klein_dir, setting, key):
    with pytest.raises(ConfigError, match=key):
        run(tiny_config(tmp_path, make_photos(tmp_path), model="tiny-flux2", **setting), lambda *_: None)


def test_planner_fake_trace_equals_a_real_flux2_step():
    from lora_booth.planning import plan

    for extra in ({"prior.mode": "prediction"},):
        cfg, _ = loading.resolve({"model": "tiny-flux2", "instance_dir": "x", "instance_prompt": PROMPT,
                                 "class_prompt": "a photo of dog", "output_dir": "x", "resolution": "64", **extra})
        fake, real = plan.estimate(cfg), plan.estimate(cfg, fake=False)
        assert fake.tracked_peak == pytest.approx(real.tracked_peak, rel=0.05) and fake.flops == real.flops
        assert "transformer weights (frozen)" in fake.parts


def test_detection_keeps_flux1_and_flux2_apart():
    assert families.for_single_file({"double_blocks.0.img_attn.qkv.weight"}) is families.FLUX
    assert families.for_single_file({"double_blocks.0.img_attn.qkv.weight", flux2_layout.MARKER}) is families.FLUX2
    assert families.for_preset("flux2-klein-16gb") is families.FLUX2 and families.for_preset("flux-16gb") is families.FLUX


def test_the_tightest_flux2_preset_plans_below_its_card_minus_10_percent_offline():
    """flux2-klein-16gb on the shipped full-size klein base 4B configs (no hub): the preset with the
    least headroom (bf16 weights; 10.8 of 14.4 GiB). The others (12gb: 7.0 of 10.8 on the 4B; 24gb:
    13.7 of 21.6 on the 9B) are planned by tools/plan_presets.py and docs/flux2.md."""
    from lora_booth.planning import plan

    cfg, _ = loading.resolve({"preset": "flux2-klein-16gb", "model": "flux2-klein-4b", "instance_dir": "x",
                              "instance_prompt": PROMPT, "class_prompt": "a photo of dog", "output_dir": "x"})
    planned = plan.estimate(cfg, flops=False)
    assert cfg.data.resolution == 1024 and planned.total <= 0.9 * 16 * plan.GiB
    assert planned.parts["transformer weights (frozen)"] == pytest.approx(7.22 * plan.GiB, rel=0.01)  # 3.9 B in bf16


def test_grids_from_cached_prompts_are_the_pipelines_own_without_the_text_encoder(klein_dir):
    """A staged run draws its grids from cached embeddings with Qwen3 off the device: the unconditional
    branch of classifier-free guidance gets the cached empty prompt, and the images are those the
    pipeline draws from the prompt text."""
    import numpy as np

    from lora_booth.results import sample

    base = models.load_frozen(ModelConfig(source=str(klein_dir)))
    device = torch.device("cpu")
    arguments = ([PROMPT], 1, 32, 2, 4.0, 0, device)
    from_text = sample.draw(sample.pipeline(base, base.unet, device), *arguments, max_sequence_length=64)
    cache = text.PromptCache(base.text_encoders, [PROMPT, ""], device)
    base.text_encoder = None
    from_cache = sample.draw(sample.pipeline(base, base.unet, device), *arguments, encoded=cache, max_sequence_length=64)
    assert np.array_equal(np.asarray(from_cache[0][0]), np.asarray(from_text[0][0]))


def test_resume_continues_exactly_on_flux2(tmp_path, monkeypatch):
    """Interrupted at a checkpoint and resumed, a klein run ends with the bit-identical adapter
    (the codec's normalised latents, the cached Qwen3 states and each row's σ all come back)."""
    from safetensors.torch import load_file

    from conftest import run_until_first_checkpoint

    photos = make_photos(tmp_path)
    common = dict(model="tiny-flux2", max_steps=4, **{"save.checkpoint_every": 2, "lora.dropout": 0.1,
                                                       "data.flip": "true", "prior.mode": "prediction"})
    straight = run(tiny_config(tmp_path / "a", photos, **common), lambda *_: None)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), lambda *_: None)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tensors,expected", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 3)}, "are not one Linear's LoRA"),
    ({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(8, 2)}, "not a module of FLUX.2's double"),
    ({"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(8, 2),
      "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(float("nan"))}, "not a positive number"),
    ({"lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(8, 2)}, "no lora_down"),
])
def test_a_broken_flux2_kohya_file_is_refused_naming_the_module(tmp_path, tensors, expected):
    from safetensors.torch import save_file

    from lora_booth.adapters import formats
    from lora_booth.io.errors import AdapterError

    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"ss_base_model_version": "flux2_klein"})
    with pytest.raises(AdapterError, match=expected):
        formats.read(tmp_path / "x.safetensors")


def test_a_klein_transformer_file_that_lacks_a_tensor_is_refused_by_name(klein_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bfl_transformer_file(Flux2KleinPipeline.from_pretrained(klein_dir).transformer, tmp_path / "full.safetensors")
    tensors = load_file(str(tmp_path / "full.safetensors"))
    del tensors["model.diffusion_model.single_blocks.0.linear1.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelError, match="single_blocks.0.linear1.weight"):
        models.load_frozen(ModelConfig(source=str(tmp_path / "broken.safetensors"), single_file_config=str(klein_dir)))
