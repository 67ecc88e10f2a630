"""FLUX.1: rectified flow on packed latents, conditioning from CLIP-L (pooled) and T5 (hidden),
adapters on both kinds of transformer block, and files FluxPipeline loads at the trained strength."""
import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

from lora_booth import families
from lora_booth.model import loading as models, objective, text
from lora_booth.families import noise as families_noise
from lora_booth.config.sections import ModelConfig, ObjectiveConfig
from lora_booth.io.errors import ConfigError, ModelError
from lora_booth.families import flux
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config
from lora_booth.adapters import neutral
from lora_booth.adapters import diffusers_layout
from lora_booth.config import loading


@pytest.fixture(scope="module")
def flux_dir():
    from lora_booth.families.tiny import tiny_model_dir

    return tiny_model_dir("tiny-flux")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flux_dir):
    """CLIP-L's adapters trained too; alpha ≠ rank; prior preservation with class images."""
    root = tmp_path_factory.mktemp("flux")
    cfg = tiny_config(root, make_photos(root), model="tiny-flux", rank=4, alpha=2, max_steps=3,
                      **{"lora.text_encoder": "true", "save.name": "sks_dog"})
    result = run(cfg, lambda *_: None)
    for module in (result.base.unet, result.base.text_encoder):
        module.eval()
    return result


def prediction(base_or_pipe, transformer, encoders: dict) -> torch.Tensor:
    """One transformer call on fixed noisy latents, conditioned as FluxPipeline conditions it."""
    conditioning = text.encode_prompts(encoders, ["a photo of sks dog"], torch.device("cpu"))
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    holder = type("B", (), {"unet": transformer, "compute_dtype": torch.float32})()
    return flux.FLUX.predict(holder, transformer, noisy, torch.tensor([0.6]), conditioning, None, 1.0)


def pipe_encoders(pipe) -> dict:
    return {"text_encoder": (pipe.tokenizer, pipe.text_encoder), "text_encoder_2": (pipe.tokenizer_2, pipe.text_encoder_2)}


def test_flux_is_detected_and_conditioned_as_the_pipeline_conditions_it(flux_dir):
    info = models.locate(ModelConfig(source=str(flux_dir)))
    assert info.family == "flux"
    base = models.load_frozen(ModelConfig(source=str(flux_dir)), info)
    assert base.transformer is base.unet and base.prediction_type == "flow"
    pipe = FluxPipeline.from_pretrained(flux_dir)
    with torch.no_grad():
        hidden, pooled, _ = pipe.encode_prompt("a photo of dog", prompt_2=None, device="cpu", max_sequence_length=32)
        ours = text.encode_prompts(base.text_encoders, ["a photo of dog"], torch.device("cpu"))
    assert torch.equal(ours.hidden, hidden) and torch.equal(ours.pooled, pooled)
    assert families.for_text_encoders(base.text_encoders) is families.FLUX  # not SDXL, whose parts share names


def test_packing_and_position_ids_are_the_pipelines():
    latents = torch.randn(2, 16, 6, 8)
    assert torch.equal(flux.pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(flux.unpack(flux.pack(latents), 6, 8), latents)
    assert torch.equal(flux.image_ids(6, 8, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_rectified_flow_noise_and_target_from_first_principles():
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    noisy, target = flux.FLUX.noisy_and_target(None, x0, eps, sigma)
    assert torch.allclose(noisy[0], x0[0]) and torch.allclose(noisy[2], eps[2])
    assert torch.allclose(noisy[1], 0.75 * x0[1] + 0.25 * eps[1])
    assert torch.equal(target, eps - x0)


def test_sigma_distributions():
    def draws(kind, shift, n=4000, **keys):
        cfg = ObjectiveConfig(timesteps=kind, **keys)
        return torch.stack([families_noise.flow_sigma(torch.Generator().manual_seed(i), cfg, shift) for i in range(n)])

    k = 3.0
    auto = draws("auto", k)
    # z = 0 is the median of the normal: u = 1/2, shifted to k/(k + 1)
    assert abs(auto.median().item() - k / (k + 1)) < 0.02
    assert abs(draws("logit_normal", k).median().item() - 0.5) < 0.02  # unshifted
    uniform = draws("uniform", k)
    assert abs(uniform.mean().item() - 0.5) < 0.02 and uniform.min() >= 0 and uniform.max() < 1
    shifted = draws("shifted", k, timestep_shift=2.0)
    assert abs(shifted.median().item() - 2 * 0.5 / (1 + 0.5)) < 0.03
    # the same generator draws the same σ: resume and processes see the same numbers
    assert torch.equal(draws("auto", k, n=3), draws("auto", k, n=3))


def test_resolution_shift_is_flux_devs():
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    assert flux.resolution_shift(dev, 256) == pytest.approx(torch.e ** 0.5)
    assert flux.resolution_shift(dev, 4096) == pytest.approx(torch.e ** 1.15)  # 1024 px: 64 × 64 tokens


def test_trained_flux_adapter_loads_in_flux_pipeline_at_the_trained_strength(trained, flux_dir):
    base, out = trained.base, trained.adapter.parent
    with safe_open(str(trained.adapter), "pt") as handle:
        keys = set(handle.keys())
    assert any(k.startswith("transformer.transformer_blocks.0.attn.add_q_proj.") for k in keys)  # text stream
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) and not any(k.startswith("text_encoder_2.") for k in keys)
    with torch.no_grad():
        expected = prediction(base, base.unet, base.text_encoders)
        pipe = FluxPipeline.from_pretrained(flux_dir)
        pipe.load_lora_weights(str(out))
        loaded = prediction(pipe, pipe.transformer, pipe_encoders(pipe))
        plain_pipe = FluxPipeline.from_pretrained(flux_dir)
        plain = prediction(plain_pipe, plain_pipe.transformer, pipe_encoders(plain_pipe))
    assert torch.allclose(loaded, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapters did change something


def test_only_adapters_train_and_t5_is_untouched(trained, flux_dir):
    fresh = models.load_frozen(ModelConfig(source=str(flux_dir)))
    for mine, theirs in ((trained.base.unet, fresh.unet), (trained.base.text_encoder, fresh.text_encoder),
                         (trained.base.text_encoder_2, fresh.text_encoder_2)):
        weights = {k.replace(".base_layer", ""): v for k, v in mine.state_dict().items() if "lora_" not in k}
        for name, tensor in theirs.state_dict().items():
            assert torch.equal(weights[name], tensor), name


def test_flux_refuses_what_flow_matching_cannot_train(tmp_path, flux_dir):
    photos = make_photos(tmp_path)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        run(tiny_config(tmp_path, photos, model="tiny-flux", **{"objective.min_snr_gamma": "5"}), lambda *_: None)
    with pytest.raises(ConfigError, match="huber_schedule"):
        run(tiny_config(tmp_path, photos, model="tiny-flux", **{"objective.loss": "huber"}), lambda *_: None)


@pytest.mark.parametrize("pipeline,expected", [("FluxFillPipeline", "Fill"), ("FluxKontextPipeline", "Kontext"),
                                               ("FluxPriorReduxPipeline", "Redux")])
def test_flux_variants_are_refused_with_the_reason(tmp_path, flux_dir, pipeline, expected):
    import shutil

    folder = tmp_path / "variant"
    shutil.copytree(flux_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = pipeline
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=expected):
        models.locate(ModelConfig(source=str(folder)))


def test_a_transformer_with_other_input_channels_is_refused(tmp_path, flux_dir):
    import shutil

    folder = tmp_path / "fill"
    shutil.copytree(flux_dir, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["in_channels"] = 384
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="384 input channels"):
        models.locate(ModelConfig(source=str(folder)))


def test_kohya_file_is_in_bfl_names_and_reads_back_to_the_trained_updates(trained):
    from lora_booth.adapters import formats

    out = trained.adapter.parent
    path = out / "sks_dog.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys   # q, k, v fused, as sd-scripts writes
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.alpha" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    diffusers_file, kohya_file = formats.read(trained.adapter), formats.read(path)
    assert kohya_file.family() == "flux" and diffusers_file.family() == "flux"
    assert set(kohya_file.modules) == set(diffusers_file.modules)
    for key, module in diffusers_file.modules.items():
        assert torch.allclose(kohya_file.modules[key].delta(), module.delta(), atol=1e-6), key


def test_resume_continues_exactly_on_flux(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from conftest import run_until_first_checkpoint

    photos = make_photos(tmp_path)
    common = dict(model="tiny-flux", max_steps=4, **{"save.checkpoint_every": 2, "lora.dropout": 0.1,
                                                      "data.flip": "true", "objective.noise_offset": 0.05})
    straight = run(tiny_config(tmp_path / "a", photos, **common), lambda *_: None)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), lambda *_: None)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prior_preservation_by_prediction_on_flux(tmp_path):
    """The class rows' target is the frozen transformer's own prediction: at step 1 (adapters at
    their zero start) the prior loss is 0 up to the rounding of a batch of another size."""
    photos = make_photos(tmp_path)
    out = run(tiny_config(tmp_path, photos, model="tiny-flux", max_steps=2, **{"prior.mode": "prediction"}),
              lambda *_: None).adapter.parent
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["prior_loss"] < 1e-10 and first["instance_loss"] > 0.1


def test_planner_fake_trace_equals_a_real_flux_step():
    from lora_booth.planning import plan

    for extra in ({}, {"lora.text_encoder": "true", "prior.mode": "prediction"}):
        cfg, _ = loading.resolve({"model": "tiny-flux", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
                                 "class_prompt": "a photo of dog", "output_dir": "x", "resolution": "64", **extra})
        fake, real = plan.estimate(cfg), plan.estimate(cfg, fake=False)
        assert fake.tracked_peak == pytest.approx(real.tracked_peak, rel=0.05) and fake.flops == real.flops
        assert "transformer weights (frozen)" in fake.parts


def test_merge_into_a_flux_folder_matches_the_loaded_adapter(trained, flux_dir, tmp_path):
    from lora_booth.adapters import merging

    out = merging.fuse(flux_dir, [(trained.adapter.parent, 1.0)], tmp_path / "merged", report=lambda *_: None)
    merged = FluxPipeline.from_pretrained(out)
    loaded = FluxPipeline.from_pretrained(flux_dir)
    loaded.load_lora_weights(str(trained.adapter.parent))
    with torch.no_grad():
        expected = prediction(loaded, loaded.transformer, pipe_encoders(loaded))
        fused = prediction(merged, merged.transformer, pipe_encoders(merged))
    assert torch.allclose(fused, expected, atol=1e-5)


def bfl_transformer_file(transformer, path):
    """The tiny transformer in Black Forest Labs' single-file layout (q, k, v stacked into qkv, a
    single block's linear1 with proj_mlp, norm_out's halves swapped, RMSNorm scales renamed), as
    ComfyUI and Forge hold FLUX.1."""
    from safetensors.torch import save_file

    from lora_booth.families import flux_layout

    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    fused: dict[str, dict[int, torch.Tensor]] = {}
    tensors = {}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            try:
                target, rows, swapped = flux_layout.weight_rows(name, width)
            except flux_layout.FluxLayoutError:
                continue
            for leaf in ("weight", "bias"):
                value = getattr(module, leaf).detach()
                value = torch.cat(value.chunk(2)[::-1]) if swapped else value
                fused.setdefault(f"{target}.{leaf}", {})[0 if rows is None else rows[0]] = value
        elif name.count(".") == 3 and name.split(".", 2)[2] in norms:  # <blocks>.<i>.attn.norm_*
            block, index, rest = name.split(".", 2)
            kind = "double_blocks" if block == "transformer_blocks" else "single_blocks"
            bfl = norms[rest] if kind == "double_blocks" else norms[rest].replace("img_attn.", "")
            tensors[f"{kind}.{index}.{bfl}.scale"] = module.weight.detach()
    tensors.update({key: torch.cat([parts[start] for start in sorted(parts)]).contiguous()
                    for key, parts in fused.items()})
    save_file(tensors, str(path))
    return width


def test_merge_into_a_bfl_transformer_file_adds_each_update_to_its_rows(trained, flux_dir, tmp_path):
    """The single file ComfyUI and Forge load: to_q's update lands in qkv's first third, and so on."""
    from lora_booth.families import flux_layout
    from lora_booth.adapters import formats, merging

    base = models.load_frozen(ModelConfig(source=str(flux_dir)))
    width = bfl_transformer_file(base.unet, tmp_path / "flux1.safetensors")
    adapter = formats.read(trained.adapter.parent / "sks_dog.safetensors")
    transformer_only = neutral.Adapter({k: m for k, m in adapter.modules.items() if k[0] == "transformer"})
    diffusers_layout.write_diffusers(transformer_only, tmp_path / "transformer_lora.safetensors")
    out = merging.fuse(tmp_path / "flux1.safetensors", [(tmp_path / "transformer_lora.safetensors", 0.5)],
                       tmp_path / "merged.safetensors", report=lambda *_: None)
    from safetensors.torch import load_file

    before, after = load_file(str(tmp_path / "flux1.safetensors")), load_file(str(out))
    for (part, path), module in transformer_only.modules.items():
        target, rows, _ = flux_layout.weight_rows(path, width)
        start, stop = rows or (0, before[f"{target}.weight"].shape[0])
        change = (after[f"{target}.weight"] - before[f"{target}.weight"])[start:stop]
        assert torch.allclose(change, 0.5 * module.delta(), atol=1e-6), path
    with pytest.raises(merging.MergeError, match="CLIP-L"):  # the transformer file has no text encoder
        merging.fuse(tmp_path / "flux1.safetensors", [(trained.adapter.parent, 1.0)], tmp_path / "m2.safetensors",
                     report=lambda *_: None)


def test_training_from_the_bfl_transformer_file_comfyui_holds(trained, flux_dir, tmp_path):
    """model=flux1-dev.safetensors (the transformer alone) + model.single_file_config=<a FLUX.1
    folder> for the rest: the same model as the folder it came from."""
    base = models.load_frozen(ModelConfig(source=str(flux_dir)))
    bfl_transformer_file(base.unet, tmp_path / "flux1-dev.safetensors")
    cfg = ModelConfig(source=str(tmp_path / "flux1-dev.safetensors"), single_file_config=str(flux_dir))
    info = models.locate(cfg)
    assert (info.kind, info.family) == ("single_file", "flux")
    loaded = models.load_frozen(cfg, info)
    mine, theirs = loaded.unet.state_dict(), base.unet.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert type(loaded.text_encoder_2).__name__ == "T5EncoderModel"


def test_a_transformer_file_that_lacks_a_tensor_is_refused_by_name(flux_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = models.load_frozen(ModelConfig(source=str(flux_dir)))
    bfl_transformer_file(base.unet, tmp_path / "full.safetensors")
    tensors = load_file(str(tmp_path / "full.safetensors"))
    del tensors["single_blocks.0.linear2.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    cfg = ModelConfig(source=str(tmp_path / "broken.safetensors"), single_file_config=str(flux_dir))
    with pytest.raises(ModelError, match="single_blocks.0.linear2.weight"):
        models.load_frozen(cfg)


def test_a_training_step_is_the_rectified_flow_loss_from_first_principles(tmp_path, monkeypatch):
    """The recipe's own step, watched: the transformer's input is (1 − σ)·x₀ + σ·ε of the step's
    latents, noise and σ, and the instance loss logged is the mean square of prediction − (ε − x₀)."""
    from lora_booth.training import recipe

    seen, losses = [], []
    predict, loss = flux.FluxFamily.predict, objective.dreambooth_loss
    draw = flux.FluxFamily.sample_noise

    def sample_noise(self, scheduler, latents, generators, cfg):
        noise, sigma = draw(self, scheduler, latents, generators, cfg)
        seen.append({"x0": latents.clone(), "noise": noise.clone(), "sigma": sigma.clone()})
        return noise, sigma

    def watched_predict(self, base, model, noisy, time, *rest):
        seen[-1].update(noisy=noisy.clone(), time=time.clone())
        pred = predict(self, base, model, noisy, time, *rest)
        seen[-1]["pred"] = pred.detach().clone()
        return pred

    def watched_loss(pred, target, is_prior, *rest, **kw):
        result = loss(pred, target, is_prior, *rest, **kw)
        losses.append((target.clone(), is_prior.clone(), result))
        return result

    monkeypatch.setattr(flux.FluxFamily, "sample_noise", sample_noise)
    monkeypatch.setattr(flux.FluxFamily, "predict", watched_predict)
    monkeypatch.setattr(recipe.objective, "dreambooth_loss", watched_loss)
    photos = make_photos(tmp_path)
    run(tiny_config(tmp_path, photos, model="tiny-flux", max_steps=1), lambda *_: None)
    step, (target, is_prior, result) = seen[0], losses[0]
    sigma = step["sigma"].view(-1, 1, 1, 1)
    assert torch.equal(step["time"], step["sigma"]) and bool(((0 < step["sigma"]) & (step["sigma"] < 1)).all())
    assert torch.allclose(step["noisy"], (1 - sigma) * step["x0"] + sigma * step["noise"], atol=1e-6)
    assert torch.allclose(target, step["noise"] - step["x0"], atol=1e-6)
    squares = ((step["pred"] - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(result.instance, squares[~is_prior].mean(), atol=1e-6)
    assert torch.allclose(result.prior, squares[is_prior].mean(), atol=1e-6)
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["instance_loss"] == pytest.approx(result.instance.item(), rel=1e-6)
