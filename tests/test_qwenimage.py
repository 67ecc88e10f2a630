"""Qwen-Image: rectified flow on packed latents of a 3-D VAE with its own latent statistics,
conditioning from Qwen2.5-VL through the pipeline's template with padding masked, adapters on both
streams' attention, and files QwenImagePipeline and ComfyUI load at the trained strength."""
import json
import shutil

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors import safe_open

from lora_booth import families
from lora_booth.config import loading
from lora_booth.config.sections import ModelConfig
from lora_booth.families import qwenimage
from lora_booth.io.errors import ConfigError, ModelError
from lora_booth.model import loading as models, objective, text
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config

TINY = "tiny-qwenimage"
PROMPTS = ["a photo of sks dog", "a dog on a cobblestone street in the rain"]


@pytest.fixture(scope="module")
def qwen_dir():
    from lora_booth.families.tiny import tiny_model_dir

    return tiny_model_dir(TINY)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    return QwenImagePipeline.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qwen_dir):
    """Prior preservation with class images drawn by the tiny base (true CFG), alpha ≠ rank, adapters
    on the attention and MLPs of both streams and on the model-level projections."""
    root = tmp_path_factory.mktemp("qwen")
    targets = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,img_mlp.net.2,txt_mod.1,proj_out"
    cfg = tiny_config(root, make_photos(root), model=TINY, rank=4, alpha=2, max_steps=3,
                      **{"save.name": "sks_dog", "lora.targets": targets})
    result = run(cfg, lambda *_: None)
    result.base.unet.eval()
    return result


def prediction(transformer, encoders: dict) -> torch.Tensor:
    """One transformer call on fixed noisy latents, conditioned as QwenImagePipeline conditions it."""
    conditioning = text.encode_prompts(encoders, PROMPTS[:1], torch.device("cpu"))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    holder = type("B", (), {"unet": transformer, "compute_dtype": torch.float32})()
    return qwenimage.QWENIMAGE.predict(holder, transformer, noisy, torch.tensor([0.6]), conditioning, None, 1.0)


def pipe_encoders(pipe) -> text.TextEncoders:
    return text.TextEncoders({"text_encoder": (pipe.tokenizer, pipe.text_encoder)}, qwenimage.QWENIMAGE)


def test_qwen_image_is_detected_and_encoded_as_the_pipeline_encodes(qwen_dir, pipe):
    """Template, dropped template tokens, last hidden states, padding zeroed and masked: the
    pipeline's encode_prompt, for prompts of different lengths in one batch."""
    info = models.locate(ModelConfig(source=str(qwen_dir)))
    assert info.family == "qwenimage"
    base = models.load_frozen(ModelConfig(source=str(qwen_dir)), info)
    assert base.transformer is base.unet and base.prediction_type == "flow" and base.vae_scale_factor == 4
    assert families.for_text_encoders(base.text_encoders) is qwenimage.QWENIMAGE
    with torch.no_grad():
        ours = text.encode_prompts(base.text_encoders, PROMPTS, torch.device("cpu"))
        theirs, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    used = theirs.shape[1]
    assert ours.hidden.shape == (2, qwenimage.TEXT_TOKENS, 16) and ours.pooled is None
    assert torch.allclose(ours.hidden[:, :used], theirs, atol=1e-5)
    assert torch.equal(ours.mask[:, :used], mask.bool()) and not ours.mask[:, used:].any()
    assert not ours.hidden[:, used:].any() and not ours.hidden[0][~ours.mask[0]].any()  # padding is zeros
    assert ours.mask[0].sum() < ours.mask[1].sum()  # the shorter prompt's own padding is masked too


def test_latents_are_the_pipelines(pipe):
    """Packing as the pipeline packs; the VAE's frame axis and per-channel statistics as the pipeline
    undoes them before decoding: normalize(z) = (z − mean) / std."""
    latents = torch.randn(2, 4, 6, 8)
    assert torch.equal(qwenimage.pack(latents), QwenImagePipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(qwenimage.QWENIMAGE.latents_from_pipeline(qwenimage.pack(latents[:, :, :6, :6]), 24, 4),
                       latents[:, :, :6, :6])
    codec = qwenimage.QWENIMAGE.latent_codec(pipe.vae)
    assert codec.channels == 4
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1)
    assert torch.allclose(codec.normalize(latents), (latents - mean) / std)
    assert torch.allclose(codec.denormalize(codec.normalize(latents)), latents, atol=1e-6)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_mean, z_std = codec.distribution(pipe.vae, pixels)
        expected = pipe.vae.encode(pixels[:, :, None]).latent_dist
        assert torch.equal(z_mean, expected.mean[:, :, 0]) and torch.equal(z_std, expected.std[:, :, 0])
        decoded = codec.decode(pipe.vae, codec.normalize(z_mean))
        reference = pipe.vae.decode(z_mean[:, :, None]).sample[:, :, 0]  # the pipeline's latents / (1/std) + mean
    assert decoded.shape == (1, 3, 16, 16) and torch.allclose(decoded, reference, atol=1e-5)


def test_resolution_shift_is_the_pipelines_calculate_shift():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from lora_booth.families.flux import resolution_shift
    from lora_booth.families.tiny_qwenimage import SCHEDULER
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    for tokens in (64, 4096, 6889):  # 1024 px: 64 × 64 packed tokens
        mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
        assert resolution_shift(scheduler, tokens) == pytest.approx(torch.e ** mu)
        # the scheduler's exponential time shift of σ is exactly the shift flow_sigma applies
        sigma = torch.tensor([0.3], dtype=torch.float64)
        k = resolution_shift(scheduler, tokens)
        assert scheduler.time_shift(mu, 1.0, sigma).item() == pytest.approx((k * sigma / (1 + (k - 1) * sigma)).item())


def test_cutting_the_padding_changes_no_prediction(pipe):
    """predict drops the text states every row masks out; the transformer fed all 512 states with
    the mask computes the same."""
    encoders = pipe_encoders(pipe)
    with torch.no_grad():
        conditioning = text.encode_prompts(encoders, PROMPTS, torch.device("cpu"))
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        time = torch.tensor([0.2, 0.9])
        holder = type("B", (), {"unet": pipe.transformer, "compute_dtype": torch.float32})()
        ours = qwenimage.QWENIMAGE.predict(holder, pipe.transformer, noisy, time, conditioning, None, 1.0)
        full = pipe.transformer(hidden_states=qwenimage.pack(noisy), timestep=time, encoder_hidden_states=conditioning.hidden,
                                encoder_hidden_states_mask=conditioning.mask, img_shapes=[[(1, 4, 4)]] * 2,
                                return_dict=False)[0]
    assert torch.allclose(ours, qwenimage.unpack(full, 8, 8), atol=1e-5)


def test_a_training_step_is_the_rectified_flow_loss_from_first_principles(tmp_path, monkeypatch):
    """The recipe's own step, watched: the transformer gets the packed (1 − σ)·x₀ + σ·ε with σ as its
    timestep and the masked text states; the logged losses are the mean square of prediction −
    (ε − x₀) on the instance and the class rows."""
    from lora_booth.training import recipe

    seen, losses, calls = [], [], []
    family = qwenimage.QwenImageFamily
    draw, predict, loss = family.sample_noise, family.predict, objective.dreambooth_loss

    def sample_noise(self, scheduler, latents, generators, cfg):
        noise, sigma = draw(self, scheduler, latents, generators, cfg)
        seen.append({"x0": latents.clone(), "noise": noise.clone(), "sigma": sigma.clone()})
        return noise, sigma

    def watched_predict(self, base, model, noisy, time, conditioning, *rest):
        seen[-1].update(noisy=noisy.clone(), time=time.clone(), mask=conditioning.mask.clone())
        pred = predict(self, base, model, noisy, time, conditioning, *rest)
        seen[-1]["pred"] = pred.detach().clone()
        return pred

    def watched_loss(pred, target, is_prior, *rest, **kw):
        result = loss(pred, target, is_prior, *rest, **kw)
        losses.append((target.clone(), is_prior.clone(), result))
        return result

    def forward(module, args, kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "attention_kwargs"})

    monkeypatch.setattr(family, "sample_noise", sample_noise)
    monkeypatch.setattr(family, "predict", watched_predict)
    monkeypatch.setattr(recipe.objective, "dreambooth_loss", watched_loss)
    photos = make_photos(tmp_path)
    from diffusers import QwenImageTransformer2DModel
    original = QwenImageTransformer2DModel.forward

    def watched_forward(self, *args, **kwargs):
        forward(self, args, kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer2DModel, "forward", watched_forward)
    run(tiny_config(tmp_path, photos, model=TINY, max_steps=1), lambda *_: None)
    step, (target, is_prior, result), call = seen[0], losses[0], calls[-1]
    sigma = step["sigma"].view(-1, 1, 1, 1)
    assert bool(((0 < step["sigma"]) & (step["sigma"] < 1)).all()) and torch.equal(step["time"], step["sigma"])
    assert torch.allclose(step["noisy"], (1 - sigma) * step["x0"] + sigma * step["noise"], atol=1e-6)
    assert torch.allclose(call["hidden_states"], qwenimage.pack(step["noisy"]), atol=1e-6)
    assert torch.equal(call["timestep"], step["sigma"])
    b, _, h, w = step["x0"].shape
    assert call["img_shapes"] == [[(1, h // 2, w // 2)]] * b
    used = int(step["mask"].sum(dim=1).max())
    assert call["encoder_hidden_states"].shape[1] == used  # the padding every row masks is cut off
    assert torch.allclose(target, step["noise"] - step["x0"], atol=1e-6)
    squares = ((step["pred"] - target) ** 2).mean(dim=(1, 2, 3))
    assert is_prior.any() and (~is_prior).any()
    assert torch.allclose(result.instance, squares[~is_prior].mean(), atol=1e-6)
    assert torch.allclose(result.prior, squares[is_prior].mean(), atol=1e-6)
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["instance_loss"] == pytest.approx(result.instance.item(), rel=1e-6)


def test_trained_adapter_loads_in_qwen_image_pipeline_with_every_key(trained, qwen_dir):
    """diffusers' loader keeps only `transformer.` keys and drops the rest without a word: every
    module of the file must carry weights in the pipeline, and the pipeline must predict what the
    trained model predicts."""
    out = trained.adapter.parent
    with safe_open(str(trained.adapter), "pt") as handle:
        keys = set(handle.keys())
    modules = {key.rsplit(".lora_", 1)[0].removeprefix("transformer.") for key in keys}
    assert all(key.startswith("transformer.") for key in keys)
    assert {"transformer_blocks.1.attn.add_q_proj", "transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.txt_mod.1",
            "proj_out"} <= modules
    loaded = QwenImagePipeline.from_pretrained(qwen_dir)
    loaded.load_lora_weights(str(out))
    layers = dict(loaded.transformer.named_modules())
    with safe_open(str(trained.adapter), "pt") as handle:
        for key in keys:  # each tensor of the file is in its module's adapter, as written
            module, half = key.removeprefix("transformer.").rsplit(".lora_", 1)
            layer = getattr(layers[module], "lora_" + half.split(".")[0])["default_0"]
            assert torch.equal(layer.weight, handle.get_tensor(key)), key
    plain = QwenImagePipeline.from_pretrained(qwen_dir)
    with torch.no_grad():
        expected = prediction(trained.base.unet, pipe_encoders(plain))
        got = prediction(loaded.transformer, pipe_encoders(loaded))
        base_only = prediction(plain.transformer, pipe_encoders(plain))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(base_only, expected, atol=1e-4)  # the adapters did change something


def comfyui_key_map(state_keys) -> dict[str, str]:
    """The LoRA names ComfyUI's comfy/lora.py model_lora_keys_unet maps onto a QwenImage model's
    weights (ComfyUI 01f4512: the generic `lora_unet_<flat>` and `<module>` of every model, and its
    QwenImage branch's `<module>`, `transformer.<module>`, `lycoris_<flat>`), with the model's
    weights under `diffusion_model.` in diffusers' module names (comfy/ldm/qwen_image/model.py names
    them so; diffusers' single-file mapping for this transformer is the identity)."""
    key_map = {}
    for key in state_keys:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            module = key[len("diffusion_model."):-len(".weight")]
            flat = module.replace(".", "_")
            key_map.update({f"lora_unet_{flat}": key, f"diffusion_model.{module}": key, module: key,
                            f"transformer.{module}": key, f"lycoris_{flat}": key})
    return key_map


def test_every_key_of_both_files_maps_in_comfyui_and_diffusers(trained, qwen_dir):
    """The kohya file (lora_unet_<module>, the names musubi-tuner writes, with .alpha) maps key by
    key in ComfyUI's Qwen-Image mapping onto the right weight at the right shape, and diffusers'
    own Qwen-Image converter reads every key of it; the diffusers file's keys map in ComfyUI too."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers
    from safetensors.torch import load_file

    state = {f"diffusion_model.{k}": v for k, v in trained.base.unet.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer", ""): v for k, v in state.items()}
    key_map = comfyui_key_map(state)
    kohya = load_file(str(trained.adapter.parent / "sks_dog.safetensors"))
    names = {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in kohya}
    assert all(name.startswith("lora_unet_") for name in names)
    for name in names:
        assert name in key_map, name
        weight = state[key_map[name]]
        assert (kohya[f"{name}.lora_up.weight"].shape[0], kohya[f"{name}.lora_down.weight"].shape[1]) == weight.shape
        assert kohya[f"{name}.alpha"].item() == 2.0
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(kohya))
    with safe_open(str(trained.adapter), "pt") as handle:
        diffusers_keys = set(handle.keys())
    assert {k.rsplit(".lora_", 1)[0] for k in converted} == {k.rsplit(".lora_", 1)[0] for k in diffusers_keys}
    for key in diffusers_keys:
        assert key.rsplit(".lora_", 1)[0] in key_map, key


def test_the_kohya_file_reads_back_as_the_trained_adapter(trained):
    from lora_booth.adapters import formats

    diffusers_file = formats.read(trained.adapter)
    kohya_file = formats.read(trained.adapter.parent / "sks_dog.safetensors")
    assert diffusers_file.family() == kohya_file.family() == "qwenimage"
    assert set(kohya_file.modules) == set(diffusers_file.modules)  # the transformer's, not a "unet"
    deltas = {path: module.delta() for (_, path), module in kohya_file.modules.items()}
    for (_, path), module in diffusers_file.modules.items():
        assert torch.allclose(deltas[path], module.delta(), atol=1e-6), path


def test_adapter_families_tell_qwen_image_from_flux_by_module_paths():
    paths_qwen = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.net.2"]
    paths_flux = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"]
    assert families.for_adapter({"transformer"}, None, paths_qwen) is qwenimage.QWENIMAGE
    assert families.for_adapter({"transformer"}, None, paths_flux) is families.FLUX
    assert families.for_adapter({"transformer"}, None, ["transformer_blocks.40.attn.to_q"]) is qwenimage.QWENIMAGE
    ambiguous = ["transformer_blocks.0.attn.to_q"]  # both transformers have it: the file's own word decides
    assert families.for_adapter({"transformer"}, None, ambiguous, "qwenimage") is qwenimage.QWENIMAGE
    assert families.for_adapter({"transformer"}, None, ambiguous, "flux") is families.FLUX
    assert families.for_adapter({"transformer"}, None, ambiguous) is None


def test_prior_preservation_by_prediction(tmp_path):
    """The class rows' target is the frozen transformer's own prediction: at step 1 (adapters at their
    zero start) the prior loss is 0 up to rounding."""
    photos = make_photos(tmp_path)
    out = run(tiny_config(tmp_path, photos, model=TINY, max_steps=1, **{"prior.mode": "prediction"}),
              lambda *_: None).adapter.parent
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["prior_loss"] < 1e-10 and first["instance_loss"] > 0.1


def test_planner_fake_trace_equals_a_real_step():
    from lora_booth.planning import plan

    cfg, _ = loading.resolve({"model": TINY, "instance_dir": "x", "instance_prompt": "a photo of sks dog",
                              "class_prompt": "a photo of dog", "output_dir": "x", "resolution": "64",
                              "train.cache_text_embeddings": "false"})
    fake, real = plan.estimate(cfg), plan.estimate(cfg, fake=False)
    assert fake.tracked_peak == pytest.approx(real.tracked_peak, rel=0.05) and fake.flops == real.flops
    assert "transformer weights (frozen)" in fake.parts and "text_encoder weights (frozen)" in fake.parts


def test_shipped_configs_are_qwen_images_sizes():
    """lora_booth/configs/qwen-image builds the published architecture: a 20.43 B transformer of 60
    blocks, Qwen2.5-VL 7B (8.29 B with its vision tower), a 16-channel VAE downsampling by 8."""
    import diffusers
    import transformers
    from lora_booth.planning.plan import config_folder

    folder = config_folder("qwen-image")
    assert models.detect_folder_family(folder) == "qwenimage"
    with torch.device("meta"):
        transformer = diffusers.QwenImageTransformer2DModel.from_config(
            json.loads((folder / "transformer" / "config.json").read_text()))
        encoder = transformers.Qwen2_5_VLForConditionalGeneration(transformers.AutoConfig.from_pretrained(
            folder / "text_encoder"))
    assert sum(p.numel() for p in transformer.parameters()) == 20_430_401_088
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e9, 2) == 8.29
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert qwenimage.QWENIMAGE.vae_downsampling(vae) == 8 and vae["z_dim"] == 16


@pytest.mark.parametrize("pipeline,expected", [("QwenImageEditPipeline", "pairs of a source image"),
                                               ("QwenImageEditPlusPipeline", "pairs"),
                                               ("QwenImageLayeredPipeline", "RGBA layers"),
                                               ("QwenImageControlNetPipeline", "control image"),
                                               ("QwenImageImg2ImgPipeline", "image-to-image"),
                                               ("QwenImageInpaintPipeline", "inpainting")])
def test_variants_are_refused_with_the_reason(tmp_path, qwen_dir, pipeline, expected):
    folder = tmp_path / "variant"
    shutil.copytree(qwen_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = pipeline
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=expected):
        models.locate(ModelConfig(source=str(folder)))


@pytest.mark.parametrize("key,value,expected", [("in_channels", 128, "128 input channels"),
                                                ("zero_cond_t", True, "Edit-2511"),
                                                ("use_layer3d_rope", True, "Layered")])
def test_a_variant_transformer_is_refused_under_the_text_to_image_pipeline(tmp_path, qwen_dir, key, value, expected):
    folder = tmp_path / "variant"
    shutil.copytree(qwen_dir, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config[key] = value
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=expected):
        models.locate(ModelConfig(source=str(folder)))


@pytest.mark.parametrize("key,value", [("objective.min_snr_gamma", "5"), ("objective.loss", "huber"),
                                       ("lora.text_encoder", "true"), ("pivotal", "true"),
                                       ("model.prediction_type", "epsilon")])
def test_settings_that_do_not_apply_are_refused(tmp_path, key, value):
    photos = make_photos(tmp_path)
    with pytest.raises(ConfigError, match=key.split(".")[-1] if key != "objective.loss" else "huber_schedule"):
        run(tiny_config(tmp_path, photos, model=TINY, **{key: value}), lambda *_: None)


def comfy_transformer_file(transformer, path, prefix="", fp8=False, extra=None, drop=None):
    """The tiny transformer as ComfyUI holds Qwen-Image: diffusers' names, bare (Comfy-Org's files)
    or under model.diffusion_model. (a saved checkpoint), optionally fp8 (e4m3fn)."""
    from safetensors.torch import save_file

    state = {prefix + k: (v.to(torch.float8_e4m3fn) if fp8 and v.dim() == 2 else v).contiguous()
             for k, v in transformer.state_dict().items()}
    state.update(extra or {})
    for key in drop or ():
        del state[prefix + key]
    save_file(state, str(path))


def test_training_from_the_comfyui_transformer_file(qwen_dir, pipe, tmp_path):
    """model=<the transformer file> + model.single_file_config=<a Qwen-Image folder>: the same
    transformer as the folder's, in both key spellings; an fp8 file loads as its bf16 values."""
    for prefix in ("", "model.diffusion_model."):
        comfy_transformer_file(pipe.transformer, tmp_path / "qwen_image_bf16.safetensors", prefix)
        cfg = ModelConfig(source=str(tmp_path / "qwen_image_bf16.safetensors"), single_file_config=str(qwen_dir))
        info = models.locate(cfg)
        assert (info.kind, info.family) == ("single_file", "qwenimage")
        loaded = models.load_frozen(cfg, info)
        mine, theirs = loaded.unet.state_dict(), pipe.transformer.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert type(loaded.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    comfy_transformer_file(pipe.transformer, tmp_path / "qwen_image_fp8_e4m3fn.safetensors", fp8=True)
    cfg = ModelConfig(source=str(tmp_path / "qwen_image_fp8_e4m3fn.safetensors"), single_file_config=str(qwen_dir))
    weight = models.load_frozen(cfg).unet.transformer_blocks[0].attn.to_q.weight
    expected = pipe.transformer.transformer_blocks[0].attn.to_q.weight.to(torch.float8_e4m3fn).float()
    assert torch.equal(weight, expected)  # fp8 values, read as bf16 and cast to the training precision


@pytest.mark.parametrize("change,expected", [
    (dict(drop=["transformer_blocks.1.attn.to_v.weight"]), "transformer_blocks.1.attn.to_v.weight"),
    (dict(extra={"transformer_blocks.0.attn.to_q.scale_weight": torch.ones(())}), "scaled-fp8"),
    (dict(extra={"txt_in.text_norm.weight": torch.ones(16)}), "Qwen-Image 2.1"),
    (dict(extra={"transformer_blocks.0.stray.weight": torch.ones(2)}), "stray"),
    (dict(extra={"img_in.weight": torch.ones(32, 128)}), "128 input channels")])
def test_a_broken_or_foreign_transformer_file_is_refused_by_name(qwen_dir, pipe, tmp_path, change, expected):
    comfy_transformer_file(pipe.transformer, tmp_path / "qwen.safetensors", **change)
    cfg = ModelConfig(source=str(tmp_path / "qwen.safetensors"), single_file_config=str(qwen_dir))
    with pytest.raises(ModelError, match=expected):
        models.load_frozen(cfg)


def test_merge_into_a_qwen_image_folder_matches_the_loaded_adapter(trained, qwen_dir, tmp_path):
    from lora_booth.adapters import merging

    out = merging.fuse(qwen_dir, [(trained.adapter.parent, 1.0)], tmp_path / "merged", report=lambda *_: None)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    merged, loaded = QwenImagePipeline.from_pretrained(out), QwenImagePipeline.from_pretrained(qwen_dir)
    loaded.load_lora_weights(str(trained.adapter.parent))
    with torch.no_grad():
        assert torch.allclose(prediction(merged.transformer, pipe_encoders(merged)),
                              prediction(loaded.transformer, pipe_encoders(loaded)), atol=1e-5)


def test_sampling_from_cached_prompts_draws_what_the_prompt_draws(qwen_dir):
    """Sample grids of a staged run feed the cached conditioning (cut after the longest prompt) in
    place of the prompt; true CFG against " " is on at guidance 4 either way, and changes the image."""
    pipe = qwenimage.QWENIMAGE.pipeline_class().from_pretrained(qwen_dir)
    encoders = pipe_encoders(pipe)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    common = dict(height=32, width=32, num_inference_steps=2, output_type="latent",
                  latents=qwenimage.QWENIMAGE.pipeline_latents(noise))
    with torch.no_grad():
        cached = qwenimage.QWENIMAGE.pipeline_conditioning(text.encode_prompts(encoders, PROMPTS[:1], torch.device("cpu")))
        from_cache = pipe(guidance_scale=4.0, **cached, **common).images
        from_prompt = pipe(prompt=PROMPTS[:1], guidance_scale=4.0, **common).images
        unguided = pipe(prompt=PROMPTS[:1], guidance_scale=1.0, **common).images
    assert cached["prompt_embeds"].shape[1] < qwenimage.TEXT_TOKENS
    assert torch.allclose(from_cache, from_prompt, atol=1e-5)
    assert not torch.allclose(from_prompt, unguided, atol=1e-3)


# the presets' planned peaks (tools/plan_presets.py, full-size configs, 1024 px); tracing one takes 20-120 s
QWEN_PLANNED_GIB = {"qwen-image-24gb": 19.56, "qwen-image-16gb": 12.59, "qwen-image-12gb": 8.61, "qwen-image-8gb": 4.78}


def test_a_card_preset_of_another_family_plans_qwen_image_own_preset_for_that_card():
    from lora_booth.planning import presets

    said = []
    for card, expected in (("24gb", "qwen-image-24gb"), ("sdxl-16gb", "qwen-image-16gb"), ("12gb", "qwen-image-12gb"),
                           ("8gb", "qwen-image-8gb"), ("6gb", "qwen-image-8gb")):  # none below 8 GB: the smallest
        assert presets.family_preset([("preset", card), ("model", TINY)], said.append) == \
            [("preset", expected), ("model", TINY)]
    assert "written for SD 1.x" in said[0] and "qwen-image-24gb" in said[0]


def test_preset_auto_chooses_among_the_qwen_image_presets_by_their_plans(monkeypatch):
    """The selection, fed the presets' measured plans: the first of 24, 16, 12, 8 GB whose plan fits
    the card minus 10 %; each preset resolves for the shipped full-size configs, at 1024 px."""
    from types import SimpleNamespace

    from lora_booth.planning import presets

    assert set(QWEN_PLANNED_GIB) == {n for n in loading.preset_names() if n.startswith("qwen-image-")}
    planned = []
    by_offload = {str(loading.read_preset(name)["train.offload_blocks"]): name for name in QWEN_PLANNED_GIB}

    def measured(cfg, flops=False):  # the presets differ only in how many blocks they offload
        name = by_offload[cfg.train.offload_blocks]
        planned.append(name)
        return SimpleNamespace(total=QWEN_PLANNED_GIB[name] * 2**30)

    monkeypatch.setattr(presets, "estimate", measured)
    run_keys = [("model", TINY), ("instance_dir", "x"), ("instance_prompt", "a photo of sks dog"),
                ("class_prompt", "a photo of dog"), ("output_dir", "x")]
    for card, expected in ((24, "qwen-image-24gb"), (20, "qwen-image-16gb"), (16, "qwen-image-16gb"),
                           (12, "qwen-image-12gb"), (8, "qwen-image-8gb"), (6, "qwen-image-8gb")):
        planned.clear()
        assert presets.choose_preset(run_keys, card * 2**30, lambda *_: None) == expected
        assert planned[0] == "qwen-image-24gb" and planned[-1] == expected
    with pytest.raises(ConfigError, match="no preset fits 4.0 GiB"):
        presets.choose_preset(run_keys, 4 * 2**30, lambda *_: None)
    for name, gib in QWEN_PLANNED_GIB.items():
        card = int(name.removeprefix("qwen-image-").removesuffix("gb"))
        assert gib <= 0.9 * card, name
        cfg, _ = loading.resolve({"preset": name, "model": "qwen-image", "instance_dir": "x", "output_dir": "x",
                                  "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"})
        assert cfg.data.resolution == 1024 and cfg.train.stored_weights == "fp8" and cfg.prior.mode == "prediction"
        assert families.for_preset(name) is qwenimage.QWENIMAGE


def test_a_family_without_presets_is_refused_for_a_card_preset_and_for_auto(monkeypatch):
    from lora_booth.planning import presets

    others = [n for n in loading.preset_names() if not n.startswith("qwen-image-")]
    monkeypatch.setattr(presets, "preset_names", lambda: others)
    with pytest.raises(ConfigError, match="written for SD 1.x.*no preset yet"):
        presets.family_preset([("preset", "24gb"), ("model", TINY)])
    with pytest.raises(ConfigError, match="no preset yet"):
        presets.choose_preset([("model", TINY)], 24 * 2**30)


def test_lora_booth_presets_lists_the_qwen_image_savers():
    from lora_booth.planning.preset_table import presets_table

    rows = {line.split()[0]: line for line in presets_table() if line.startswith("qwen-image-")}
    assert set(rows) == set(QWEN_PLANNED_GIB)
    assert "fp8 weights" in rows["qwen-image-16gb"] and "36 blocks offloaded" in rows["qwen-image-16gb"]
    assert "all blocks offloaded" in rows["qwen-image-8gb"] and rows["qwen-image-24gb"].count("fp8 weights") == 1
