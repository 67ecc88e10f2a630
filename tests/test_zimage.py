"""Z-Image: Qwen3 conditioning in the chat template without padding, rectified flow at 1 − σ with
the output negated, adapters ZImagePipeline loads whole, the ComfyUI layout, the original
single-file transformer, and the variants and members lora-booth refuses."""
import json
import math
import shutil

import pytest
import torch
from diffusers import ZImagePipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_booth import families
from lora_booth.adapters import formats
from lora_booth.config import loading
from lora_booth.config.sections import ModelConfig, ObjectiveConfig
from lora_booth.families import noise as families_noise
from lora_booth.families import zimage, zimage_layout
from lora_booth.families.zimage import ZIMAGE
from lora_booth.io.errors import ConfigError, ModelError
from lora_booth.model import loading as models, text
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config

TOKENS = 128  # the tiny tokenizer's model_max_length: what lora-booth tokenizes to, and the pipeline is given


@pytest.fixture(scope="module")
def zimage_dir():
    from lora_booth.families.tiny import tiny_model_dir

    return tiny_model_dir("tiny-zimage")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zimage_dir):
    """alpha ≠ rank; prior preservation with class images drawn by the frozen base."""
    root = tmp_path_factory.mktemp("zimage")
    cfg = tiny_config(root, make_photos(root), model="tiny-zimage", rank=4, alpha=2, max_steps=3,
                      **{"save.name": "sks_dog"})
    result = run(cfg, lambda *_: None)
    result.base.unet.eval()
    return result


def encoders_of(pipe) -> dict:
    return text.TextEncoders({"text_encoder": (pipe.tokenizer, pipe.text_encoder)}, ZIMAGE)


def prediction(transformer, encoders: dict) -> torch.Tensor:
    """One transformer call on fixed noisy latents, conditioned as ZImagePipeline conditions it."""
    conditioning = text.encode_prompts(encoders, ["a photo of sks dog"], torch.device("cpu"))
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    holder = type("B", (), {"unet": transformer, "compute_dtype": torch.float32})()
    return ZIMAGE.predict(holder, transformer, noisy, torch.tensor([0.6]), conditioning, None, 0.0)


def test_zimage_is_detected_and_encoded_as_the_pipeline_encodes(zimage_dir):
    info = models.locate(ModelConfig(source=str(zimage_dir)))
    assert info.family == "zimage"
    base = models.load_frozen(ModelConfig(source=str(zimage_dir)), info)
    assert base.transformer is base.unet and families.for_text_encoders(base.text_encoders) is ZIMAGE
    pipe = ZImagePipeline.from_pretrained(zimage_dir)
    prompts = ["a photo of dog", "a photo of sks dog in a bucket on the beach"]  # different lengths: masks differ
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=TOKENS)
        ours = text.encode_prompts(base.text_encoders, prompts, torch.device("cpu"))
    assert ours.mask is not None and ours.hidden.shape[1] == TOKENS
    mine = zimage.prompt_list(ours)
    assert [m.shape for m in mine] == [t.shape for t in theirs] and mine[0].shape[0] < mine[1].shape[0]
    assert all(torch.equal(m, t) for m, t in zip(mine, theirs))


def test_sampling_steps_are_the_pipelines_from_the_flow_definition(zimage_dir):
    """The convention pinned against ZImagePipeline itself: its Euler steps from σ = 1 are
    x ← x + (σ' − σ)·v with v = lora-booth's prediction (the transformer at 1 − σ, negated), at the
    scheduler's shifted σ (shift 6: σ = 6u / (1 + 5u) for u = 1, 1/2)."""
    pipe = ZImagePipeline.from_pretrained(zimage_dir)
    encoders = encoders_of(pipe)
    conditioning = text.encode_prompts(encoders, ["a photo of dog"], torch.device("cpu"))
    start = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = pipe(prompt_embeds=zimage.prompt_list(conditioning), guidance_scale=0.0, num_inference_steps=2,
                      height=16, width=16, latents=start.clone(), output_type="latent").images
        holder = type("B", (), {"unet": pipe.transformer, "compute_dtype": torch.float32})()
        x, sigmas = start.clone(), [1.0, 6 * 0.5 / (1 + 5 * 0.5), 0.0]
        for sigma, following in zip(sigmas, sigmas[1:]):
            velocity = ZIMAGE.predict(holder, pipe.transformer, x, torch.tensor([sigma]), conditioning, None, 0.0)
            x = x + (following - sigma) * velocity
    assert torch.allclose(theirs, x, atol=1e-5)


def test_a_training_step_is_the_rectified_flow_loss_from_first_principles(tmp_path, monkeypatch):
    """The recipe's own step, watched: the transformer's input is (1 − σ)·x₀ + σ·ε, its timestep
    1 − σ, the prediction its output negated, and the loss the mean square of prediction − (ε − x₀)."""
    from lora_booth.model import objective
    from lora_booth.training import recipe

    seen, losses = {}, []
    draw, loss = zimage.ZImageFamily.sample_noise, objective.dreambooth_loss

    def sample_noise(self, scheduler, latents, generators, cfg):
        noise, sigma = draw(self, scheduler, latents, generators, cfg)
        seen.setdefault("draws", []).append((latents.clone(), noise.clone(), sigma.clone()))
        return noise, sigma

    def watched_loss(pred, target, is_prior, *rest, **kw):
        result = loss(pred, target, is_prior, *rest, **kw)
        losses.append((pred.detach().clone(), target.clone(), is_prior.clone(), result))
        return result

    calls = []
    from diffusers import ZImageTransformer2DModel

    forward = ZImageTransformer2DModel.forward

    def watched_forward(self, x, t, cap_feats, *args, **kwargs):
        output = forward(self, x, t, cap_feats, *args, **kwargs)
        calls.append((torch.stack(x).squeeze(2).clone(), t.clone(), [c.clone() for c in cap_feats],
                      torch.stack(output[0]).squeeze(2).detach().clone()))
        return output

    monkeypatch.setattr(zimage.ZImageFamily, "sample_noise", sample_noise)
    monkeypatch.setattr(recipe.objective, "dreambooth_loss", watched_loss)
    monkeypatch.setattr(ZImageTransformer2DModel, "forward", watched_forward)
    run(tiny_config(tmp_path, make_photos(tmp_path), model="tiny-zimage", max_steps=1,
                    **{"prior.mode": "prediction"}), lambda *_: None)
    (x0, noise, sigma), (pred, target, is_prior, result) = seen["draws"][0], losses[0]
    base_call, train_call = calls[-2], calls[-1]  # the frozen base's class-row prediction, then the trained pass
    s = sigma.view(-1, 1, 1, 1)
    assert bool(((0 < sigma) & (sigma < 1)).all())
    assert torch.allclose(train_call[0], (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(train_call[1], 1 - sigma, atol=1e-7)
    assert torch.allclose(pred, -train_call[3], atol=1e-6)
    assert all(c.shape[0] < 128 for c in train_call[2])  # the prompt's own tokens only: no padding
    assert torch.allclose(target[~is_prior], (noise - x0)[~is_prior], atol=1e-6)
    assert torch.allclose(target[is_prior], -base_call[3], atol=1e-6)  # prior by prediction: the base's own
    squares = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(result.instance, squares[~is_prior].mean(), atol=1e-6)
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["instance_loss"] == pytest.approx(result.instance.item(), rel=1e-6)


def test_sigma_auto_is_logit_normal_at_the_schedulers_fixed_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0, use_dynamic_shifting=False)
    latents = torch.zeros(2000, 1, 4, 4)
    generators = [torch.Generator().manual_seed(i) for i in range(len(latents))]
    _, sigma = ZIMAGE.sample_noise(scheduler, latents, generators, ObjectiveConfig())
    assert abs(sigma.median().item() - 6 / 7) < 0.02  # the median of sigmoid(z), 1/2, shifted by 6


def test_trained_adapter_loads_in_zimage_pipeline_with_every_key_at_the_trained_strength(trained, zimage_dir):
    out = trained.adapter.parent
    with safe_open(str(trained.adapter), "pt") as handle:
        keys = set(handle.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)  # diffusers keeps only these
    trained_modules = {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in keys}
    assert any(m.startswith("noise_refiner.") for m in trained_modules)
    assert any(m.startswith("context_refiner.") for m in trained_modules)
    plain = ZImagePipeline.from_pretrained(zimage_dir)  # Qwen3 is frozen: the run freed its own after caching
    with torch.no_grad():
        expected = prediction(trained.base.unet, encoders_of(plain))
        for file in (trained.adapter, out / "sks_dog.safetensors"):  # diffusers' file and ComfyUI's
            pipe = ZImagePipeline.from_pretrained(zimage_dir)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
            loaded_modules = {name for name, module in pipe.transformer.named_modules() if hasattr(module, "lora_A")
                              and "default_0" in getattr(module, "lora_A", {})}
            assert loaded_modules == trained_modules, file.name  # every key loaded, none dropped
            assert torch.allclose(prediction(pipe.transformer, encoders_of(pipe)), expected, atol=1e-5), file.name
        assert not torch.allclose(prediction(plain.transformer, encoders_of(plain)), expected, atol=1e-4)


def comfyui_key_map(transformer_config: dict) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """ComfyUI's Z-Image LoRA key map, written from its rules (comfy/lora.py model_lora_keys_unet,
    Lumina2 branch, over comfy/utils.py z_image_to_diffusers): each diffusers module of the layers and
    both refiners, as `diffusion_model.<module>` → the original weight it changes, q/k/v as row
    slices of qkv, to_out.0 as out; the final layer's and embedders' under their original names."""
    width, mapping = transformer_config["dim"], {}
    blocks = [f"layers.{i}" for i in range(transformer_config["n_layers"])] + \
        [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner") for i in range(transformer_config["n_refiner_layers"])]
    for block in blocks:
        for slot, name in enumerate(("to_q", "to_k", "to_v")):
            mapping[f"{block}.attention.{name}"] = (f"{block}.attention.qkv.weight", (slot * width, (slot + 1) * width))
        mapping[f"{block}.attention.to_out.0"] = (f"{block}.attention.out.weight", None)
        for leaf in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            mapping[f"{block}.{leaf}"] = (f"{block}.{leaf}.weight", None)
        if not block.startswith("context_refiner"):
            mapping[f"{block}.adaLN_modulation.0"] = (f"{block}.adaLN_modulation.0.weight", None)
    mapping.update({"all_final_layer.2-1.linear": ("final_layer.linear.weight", None),
                    "all_final_layer.2-1.adaLN_modulation.1": ("final_layer.adaLN_modulation.1.weight", None),
                    "all_x_embedder.2-1": ("x_embedder.weight", None), "cap_embedder.1": ("cap_embedder.1.weight", None),
                    "t_embedder.mlp.0": ("t_embedder.mlp.0.weight", None),
                    "t_embedder.mlp.2": ("t_embedder.mlp.2.weight", None)})
    return {f"diffusion_model.{module}": target for module, target in mapping.items()}


def test_comfyui_file_maps_every_key_to_the_trained_update(trained, zimage_dir):
    """Every module of the ComfyUI-layout file is one ComfyUI's key map knows, and alpha/rank · up @ down
    placed in its rows of the original weight is the trained ΔW (ComfyUI reads alpha from .alpha only)."""
    config = json.loads((zimage_dir / "transformer" / "config.json").read_text())
    key_map = comfyui_key_map(config)
    tensors = load_file(str(trained.adapter.parent / "sks_dog.safetensors"))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unmapped = sorted(m for m in modules if m not in key_map)
    assert not unmapped, f"lora key not loaded: {unmapped}"
    reference = formats.read(trained.adapter)
    width = config["dim"]
    for module in modules:
        target, rows = key_map[module]
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        delta = tensors[f"{module}.alpha"].item() / down.shape[0] * up @ down
        assert rows is None or (rows[1] - rows[0] == width == delta.shape[0])
        path = module.removeprefix("diffusion_model.")
        assert torch.allclose(delta, reference.modules[("transformer", path)].delta(), atol=1e-6), module


def test_both_files_read_back_as_zimage_adapters(trained):
    diffusers_file = formats.read(trained.adapter)
    comfy_file = formats.read(trained.adapter.parent / "sks_dog.safetensors")
    assert diffusers_file.family() == "zimage" and comfy_file.family() == "zimage"
    assert set(comfy_file.modules) == set(diffusers_file.modules)
    for key, module in diffusers_file.modules.items():
        assert torch.allclose(comfy_file.modules[key].delta(), module.delta(), atol=1e-6), key


def test_a_fused_qkv_file_in_the_original_names_splits_exactly():
    """kohya-style trainers name Z-Image's original modules: qkv fused, out for to_out.0."""
    down, up = torch.randn(4, 32), torch.randn(96, 4)
    tensors = {"diffusion_model.layers.0.attention.qkv.lora_down.weight": down,
               "diffusion_model.layers.0.attention.qkv.lora_up.weight": up,
               "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(2.0),
               "diffusion_model.layers.0.attention.out.lora_down.weight": down,
               "diffusion_model.layers.0.attention.out.lora_up.weight": up[:32],
               "diffusion_model.final_layer.linear.lora_down.weight": down,
               "diffusion_model.final_layer.linear.lora_up.weight": up[:64]}
    split = zimage_layout.from_comfyui(tensors)
    for slot, name in enumerate("qkv"):
        assert torch.equal(split[f"transformer.layers.0.attention.to_{name}.lora_B.weight"], up[32 * slot:32 * (slot + 1)])
        assert torch.equal(split[f"transformer.layers.0.attention.to_{name}.lora_A.weight"], down)
        assert split[f"transformer.layers.0.attention.to_{name}.alpha"].item() == 2.0
    assert "transformer.layers.0.attention.to_out.0.lora_B.weight" in split
    assert "transformer.all_final_layer.2-1.linear.lora_B.weight" in split


def test_planner_fake_trace_equals_a_real_zimage_step():
    from lora_booth.planning import plan

    for extra in ({}, {"prior.mode": "prediction", "train.cache_text_embeddings": "false"}):
        cfg, _ = loading.resolve({"model": "tiny-zimage", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
                                 "class_prompt": "a photo of dog", "output_dir": "x", "resolution": "64", **extra})
        fake, real = plan.estimate(cfg), plan.estimate(cfg, fake=False)
        assert fake.tracked_peak == pytest.approx(real.tracked_peak, rel=0.05) and fake.flops == real.flops
        assert "transformer weights (frozen)" in fake.parts


def test_the_presets_resolve_for_the_full_size_configs_shipped():
    """Their plans (10.2, 13.0 and 16.2 GiB, each below its card − 10 %) take about 20 s each to trace:
    tools/plan_presets.py and tools/gpu_check.py run them; here each resolves offline, at 1024 px."""
    from lora_booth.planning import plan

    assert plan.config_folder("zimage").joinpath("transformer", "config.json").is_file()
    for card in (12, 16, 24):
        cfg, _ = loading.resolve({"preset": f"zimage-{card}gb", "model": "zimage", "instance_dir": "x",
                                 "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                                 "output_dir": "x"})
        assert cfg.data.resolution == 1024 and cfg.prior.mode == "prediction" and families.for_preset(
            f"zimage-{card}gb") is ZIMAGE


def edited_copy(source, target, part: str, **changes):
    shutil.copytree(source, target)
    path = target / part
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))
    return target


@pytest.mark.parametrize("pipeline,expected", [("ZImageImg2ImgPipeline", "image-to-image"),
                                               ("ZImageInpaintPipeline", "inpainting"),
                                               ("ZImageControlNetPipeline", "ControlNet"),
                                               ("ZImageOmniPipeline", "Omni")])
def test_zimage_variants_are_refused_with_the_reason(tmp_path, zimage_dir, pipeline, expected):
    folder = edited_copy(zimage_dir, tmp_path / "variant", "model_index.json", _class_name=pipeline)
    with pytest.raises(ModelError, match=expected):
        models.locate(ModelConfig(source=str(folder)))


@pytest.mark.parametrize("changes,expected", [({"in_channels": 33}, "33 input channels"),
                                              ({"siglip_feat_dim": 32}, "SigLIP")])
def test_a_transformer_that_takes_more_than_text_is_refused(tmp_path, zimage_dir, changes, expected):
    folder = edited_copy(zimage_dir, tmp_path / "variant", "transformer/config.json", **changes)
    with pytest.raises(ModelError, match=expected):
        models.locate(ModelConfig(source=str(folder)))


def test_turbo_is_refused_with_the_reason_and_the_alternative(tmp_path, zimage_dir):
    """Turbo's scheduler ships shift 3 (Base's 6); a hub id or file that says Turbo is refused too."""
    folder = edited_copy(zimage_dir, tmp_path / "turbo", "scheduler/scheduler_config.json", shift=3.0)
    photos = make_photos(tmp_path)
    with pytest.raises(ConfigError, match="Turbo.*distill.*Tongyi-MAI/Z-Image"):
        run(tiny_config(tmp_path, photos, model=str(folder)), lambda *_: None)
    assert zimage.turbo_evidence(ModelConfig(source="Tongyi-MAI/Z-Image-Turbo"))
    assert zimage.turbo_evidence(ModelConfig(source="/models/z_image_turbo_bf16.safetensors"))
    assert zimage.turbo_evidence(ModelConfig(source=str(zimage_dir))) is None
    assert zimage.turbo_evidence(ModelConfig(source="Tongyi-MAI/Z-Image")) is None


@pytest.mark.parametrize("setting,key", [({"objective.min_snr_gamma": "5"}, "min_snr_gamma"),
                                         ({"objective.loss": "huber"}, "huber_schedule"),
                                         ({"lora.text_encoder": "true"}, "lora.text_encoder")])
def test_settings_that_do_not_apply_are_refused(tmp_path, setting, key):
    with pytest.raises(ConfigError, match=key):
        run(tiny_config(tmp_path, make_photos(tmp_path), model="tiny-zimage", **setting), lambda *_: None)


def original_file(transformer, path, prefix="model.diffusion_model.", dtype=None):
    """The transformer in Tongyi-MAI's original layout, as ComfyUI saves it (q, k, v stacked into qkv)."""
    width, tensors, fused = transformer.config.dim, {}, {}
    for name, value in transformer.state_dict().items():
        key, rows = zimage_layout.original_tensor_name(name, width)
        if rows is None:
            tensors[prefix + key] = value
        else:
            fused.setdefault(prefix + key, {})[rows[0]] = value
    tensors.update({key: torch.cat([parts[s] for s in sorted(parts)]) for key, parts in fused.items()})
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path))
    return tensors


def test_the_original_layout_is_diffusers_own_single_file_mapping(zimage_dir, tmp_path):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    base = models.load_frozen(ModelConfig(source=str(zimage_dir)))
    tensors = original_file(base.unet, tmp_path / "z.safetensors")
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(tensors))
    mine = base.unet.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)


@pytest.mark.parametrize("dtype", [None, torch.float8_e4m3fn])
def test_training_from_the_transformer_file_comfyui_holds(zimage_dir, tmp_path, dtype):
    """model=z_image.safetensors (the transformer alone, fp8 too) + model.single_file_config=<a
    Z-Image folder>: the same transformer (fp8: its fp8 values, in bf16)."""
    base = models.load_frozen(ModelConfig(source=str(zimage_dir)))
    original_file(base.unet, tmp_path / "z_image.safetensors", dtype=dtype)
    cfg = ModelConfig(source=str(tmp_path / "z_image.safetensors"), single_file_config=str(zimage_dir))
    info = models.locate(cfg)
    assert (info.kind, info.family) == ("single_file", "zimage")
    loaded = models.load_frozen(cfg, info).unet.state_dict()
    for name, tensor in base.unet.state_dict().items():
        expected = tensor if dtype is None else tensor.to(dtype).to(torch.bfloat16).float()
        assert torch.equal(loaded[name].float(), expected), name


def test_a_controlnet_file_is_refused_by_name(tmp_path):
    save_file({"control_all_x_embedder.2-1.weight": torch.zeros(4, 64), "layers.0.adaLN_modulation.0.weight":
               torch.zeros(4, 4), "cap_embedder.1.weight": torch.zeros(4, 4)}, str(tmp_path / "control.safetensors"))
    with pytest.raises(ModelError, match="ControlNet"):
        models.locate(ModelConfig(source=str(tmp_path / "control.safetensors")))


def test_merge_into_a_zimage_folder_matches_the_loaded_adapter(trained, zimage_dir, tmp_path):
    from lora_booth.adapters import merging

    out = merging.fuse(zimage_dir, [(trained.adapter.parent, 1.0)], tmp_path / "merged", report=lambda *_: None)
    merged, loaded = ZImagePipeline.from_pretrained(out), ZImagePipeline.from_pretrained(zimage_dir)
    loaded.load_lora_weights(str(trained.adapter.parent))
    with torch.no_grad():
        expected = prediction(loaded.transformer, encoders_of(loaded))
        assert torch.allclose(prediction(merged.transformer, encoders_of(merged)), expected, atol=1e-5)


def test_grids_from_cached_prompts_draw_what_the_pipeline_draws_from_text(zimage_dir):
    """With classifier-free guidance the pipeline needs the empty prompt's embeddings too when it is
    given encoded prompts (a family that keeps Qwen3 off the GPU while sampling)."""
    from lora_booth.results import sample

    base = models.load_frozen(ModelConfig(source=str(zimage_dir)))
    pipe = sample.pipeline(base, base.unet, torch.device("cpu"))
    cache = text.PromptCache(base.text_encoders, ["a photo of dog", ""], torch.device("cpu"))
    args = (["a photo of dog"], 1, 32, 2, 5.0, 0, torch.device("cpu"))
    extra = ZIMAGE.pipeline_kwargs(base)
    from_text = sample.draw(pipe, *args, **extra)[0][0]
    from_cache = sample.draw(pipe, *args, encoded=cache, **extra)[0][0]
    assert list(from_text.getdata()) == list(from_cache.getdata())


def test_merge_into_the_original_transformer_file_adds_each_update_to_its_rows(trained, zimage_dir, tmp_path):
    """The single file ComfyUI loads: to_q's update lands in qkv's first third, and so on."""
    from lora_booth.adapters import merging

    base = models.load_frozen(ModelConfig(source=str(zimage_dir)))
    before = original_file(base.unet, tmp_path / "z_image.safetensors")
    out = merging.fuse(tmp_path / "z_image.safetensors", [(trained.adapter.parent, 0.5)], tmp_path / "merged.safetensors",
                       report=lambda *_: None)
    after, adapter = load_file(str(out)), formats.read(trained.adapter)
    for (_, path), module in adapter.modules.items():
        key, rows = zimage_layout.original_tensor_name(f"{path}.weight", base.unet.config.dim)
        start, stop = rows or (0, before["model.diffusion_model." + key].shape[0])
        change = (after["model.diffusion_model." + key] - before["model.diffusion_model." + key])[start:stop]
        assert torch.allclose(change, 0.5 * module.delta(), atol=1e-6), path


def test_resume_continues_exactly_with_validation_and_ema_on_zimage(tmp_path, monkeypatch):
    """Through a checkpoint and back: the same adapter bit for bit, validation loss and EMA on
    (held-out rows of unpadded captions, and every LoRA tensor of the transformer averaged)."""
    from conftest import run_until_first_checkpoint

    photos = make_photos(tmp_path)
    common = dict(model="tiny-zimage", max_steps=2, **{"save.checkpoint_every": 1, "lora.dropout": 0.1,
                                                        "objective.noise_offset": 0.05, "prior.mode": "prediction",
                                                        "train.ema": 0.9, "validate.every": 1, "validate.rows": 2})
    straight = run(tiny_config(tmp_path / "a", photos, **common), lambda *_: None)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), lambda *_: None)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(record.get("val_instance_loss", math.nan)) for record in logged)
