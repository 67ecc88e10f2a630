"""The rules that make an adapter file load at its trained weights in other tools (issue 16), each
checked against an explicit reconstruction or another implementation, never against lora-booth's
own reader alone. tools/check_loaders.py runs the tools' real loaders on the same files."""
import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_booth import cli
from lora_booth.adapters import formats, merging
from lora_booth.adapters import low_rank
from lora_booth.adapters import kohya_layout
from lora_booth.adapters import diffusers_layout
from lora_booth.adapters import file_metadata
from lora_booth.adapters import neutral
from lora_booth.model import lycoris
from lora_booth.io.errors import LoraBoothError
from lora_booth.adapters.neutral import Adapter, Module

QUIET = lambda *_: None  # noqa: E731
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"   # tiny SD 1.x: 32 → 32
CONV1 = "down_blocks.0.resnets.0.conv1"                                # tiny SD 1.x: 3×3, 32 → 32
PROJ_IN = "down_blocks.0.attentions.0.proj_in"                         # tiny SD 1.x: 1×1 convolution


def metadata_of(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def base_weight(tiny_dir, module_path):
    return load_file(str(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"))[f"{module_path}.weight"]


# ---------------------------------------------------------------------------------------- LoKr


def test_lokr_with_a_4d_w2_is_the_kronecker_product_lycoris_computes():
    """LyCORIS on a 1×1 convolution stores lokr_w2 as (o, i, 1, 1); the update is
    ΔW[a·o + p, b·i + q] = w1[a, b] · w2[p, q] (w1 given two trailing unit dims, as LyCORIS,
    ComfyUI and A1111 do before torch.kron)."""
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 2, generator=generator), torch.randn(8, 16, 1, 1, generator=generator)
    module = lycoris.from_tensors({"lokr_w1": w1, "lokr_w2": w2}, None, "test")
    expected = torch.einsum("ab,pq->apbq", w1, w2[:, :, 0, 0]).reshape(32, 32, 1, 1)
    assert module.update_shape() == (32, 32)
    assert torch.equal(module.delta().reshape(32, 32, 1, 1), expected)
    assert torch.equal(module.apply(torch.zeros(32, 32, 1, 1), 1.0), expected)


def test_lokr_on_a_3x3_convolution_keeps_the_kernel_inside_w2():
    generator = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(2, 4, generator=generator), torch.randn(16, 8, 3, 3, generator=generator)
    module = lycoris.from_tensors({"lokr_w1": w1, "lokr_w2": w2}, None, "test")
    expected = torch.einsum("ab,pqhw->apbqhw", w1, w2).reshape(32, 32, 3, 3)
    assert torch.equal(module.delta().reshape(32, 32, 3, 3), expected)


# ---------------------------------------------------------------------------------------- LoCon


def locon_file(path, generator):
    """kohya LoCon: a 3×3 resnet convolution (lora_down (r, in, 3, 3), lora_up (out, r, 1, 1)) and
    an attention projection, alpha ≠ rank."""
    conv = Module(torch.randn(2, 32, 3, 3, generator=generator) * 0.2, torch.randn(32, 2, 1, 1, generator=generator) * 0.2,
                  1.0)
    linear = Module(torch.randn(2, 32, generator=generator) * 0.2, torch.randn(32, 2, generator=generator) * 0.2, 1.0)
    adapter = Adapter({("unet", CONV1): conv, ("unet", TO_Q): linear})
    return kohya_layout.write_kohya(adapter, path, family="sd1"), conv


def prediction(pipe):
    tokens = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([300]), pipe.text_encoder(tokens)[0]).sample


def test_locon_3x3_modules_merge_as_kohyas_formula_and_diffusers_loader(tiny_dir, tmp_path):
    path, conv = locon_file(tmp_path / "locon.safetensors", torch.Generator().manual_seed(2))
    out = merging.fuse(tiny_dir, [(path, 1.0)], tmp_path / "merged", report=QUIET)
    merged = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))[f"{CONV1}.weight"]
    # sd-scripts networks/lora.py merge_to, conv2d 3×3: W + scale · conv2d(down.permute(1, 0, 2, 3), up).permute(…)
    update = torch.nn.functional.conv2d(conv.down.permute(1, 0, 2, 3), conv.up).permute(1, 0, 2, 3)
    assert torch.allclose(merged, base_weight(tiny_dir, CONV1) + 0.5 * update, atol=1e-6)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    loaded.load_lora_weights(str(tmp_path), weight_name=path.name)          # diffusers' own kohya reader
    fused = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert torch.allclose(prediction(fused), prediction(loaded), atol=1e-5)


def test_locon_resizes_to_kohyas_conv_shapes(tmp_path):
    path, conv = locon_file(tmp_path / "locon.safetensors", torch.Generator().manual_seed(3))
    resized = low_rank.resize(path, tmp_path / "r.safetensors", rank=2, report=QUIET)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(resized)).items()}
    name = kohya_layout.kohya_name("unet", CONV1)
    assert shapes[f"{name}.lora_down.weight"] == (2, 32, 3, 3) and shapes[f"{name}.lora_up.weight"] == (32, 2, 1, 1)
    back = formats.read(resized).modules[("unet", CONV1)]
    assert torch.allclose(back.delta(), conv.delta(), atol=1e-5)  # rank 2 of a rank-2 update: exact


def test_an_exact_combination_of_locon_files_keeps_kohyas_conv_shapes(tmp_path):
    a, conv_a = locon_file(tmp_path / "a.safetensors", torch.Generator().manual_seed(4))
    b, conv_b = locon_file(tmp_path / "b.safetensors", torch.Generator().manual_seed(5))
    both = low_rank.combine([(a, 1.0), (b, 0.5)], tmp_path / "ab.safetensors", report=QUIET)
    name = kohya_layout.kohya_name("unet", CONV1)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(both)).items()}
    assert shapes[f"{name}.lora_down.weight"] == (4, 32, 3, 3) and shapes[f"{name}.lora_up.weight"] == (32, 4, 1, 1)
    summed = formats.read(both).modules[("unet", CONV1)].delta()
    assert torch.allclose(summed, conv_a.delta() + 0.5 * conv_b.delta(), atol=1e-6)


def test_a_folder_input_cannot_be_overwritten_through_its_file(tmp_path):
    (tmp_path / "run").mkdir()
    path, _ = locon_file(tmp_path / "run" / neutral.DIFFUSERS_WEIGHT_NAME, torch.Generator().manual_seed(6))
    with pytest.raises(merging.MergeError, match="is one of the inputs"):
        low_rank.resize(tmp_path / "run", path, rank=1, overwrite=True, report=QUIET)
    with pytest.raises(merging.MergeError, match="is one of the inputs"):
        low_rank.combine([(tmp_path / "run", 1.0)], path, overwrite=True, report=QUIET)


def test_metadata_from_a_file_that_lies_never_crashes_the_kohya_writer():
    adapter = Adapter({("unet", TO_Q): Module(torch.ones(1, 32), torch.ones(32, 1), 1.0)})
    for source in ({"ss_training_finished_at": "1e20"}, {"lora_booth.config": json.dumps({"train": {"batch_size": None}})},
                   {"lora_booth.config": json.dumps({"data": {"repeats": "3"}}), "lora_booth.family": "sd1"}):
        metadata = file_metadata.kohya_file_metadata(adapter, {"lora_booth.family": "sd1", **source})
        assert metadata["ss_base_model_version"] == "sd_v1"


def test_a_family_the_kohya_names_prove_wins_over_a_text_encoder_width():
    te1 = Module(torch.ones(1, 768), torch.ones(768, 1), 1.0)
    unet = Module(torch.ones(1, 2048), torch.ones(320, 1), 1.0)
    adapter = Adapter({("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): te1,
                       ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"): unet})
    assert adapter.family() == "sdxl"                       # the UNet's 2048-wide text input decides
    assert Adapter({("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): te1}, {}, "kohya",
                   "sdxl").family() == "sdxl"                # lora_te1_ names: SDXL, whatever the width


# ---------------------------------------------------------------------------------------- DoRA


def dora_module(generator, down_shape=(2, 32), up_shape=(32, 2), axis="out", size=32):
    return Module(torch.randn(*down_shape, generator=generator) * 0.3, torch.randn(*up_shape, generator=generator) * 0.3,
                  1.0, torch.rand(size, generator=generator) + 0.5, axis)


def test_dora_scale_is_written_in_lycoris_output_axis_layout_of_each_weight(tmp_path):
    """(out, 1) for a linear layer, (out, 1, 1, 1) for a convolution: a (out, 1) scale on a 4-D
    weight broadcasts to (out, out, 1, 1) in ComfyUI and Forge without an error."""
    generator = torch.Generator().manual_seed(4)
    adapter = Adapter({("unet", TO_Q): dora_module(generator),
                       ("unet", PROJ_IN): dora_module(generator, (2, 32, 1, 1), (32, 2, 1, 1))})
    tensors = load_file(str(kohya_layout.write_kohya(adapter, tmp_path / "dora.safetensors", family="sd1")))
    assert tuple(tensors[f"{kohya_layout.kohya_name('unet', TO_Q)}.dora_scale"].shape) == (32, 1)
    assert tuple(tensors[f"{kohya_layout.kohya_name('unet', PROJ_IN)}.dora_scale"].shape) == (32, 1, 1, 1)


def a1111_dora(weight, up, down, scale, magnitude_in):
    """A1111's extensions-builtin/Lora/network.py apply_weight_decompose, written out: the
    column norms of W + ΔW, each input column rescaled to its magnitude."""
    merged = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    return merged * (magnitude_in.reshape(1, -1, *[1] * (weight.ndim - 2)) / norm.reshape(1, -1, *[1] * (weight.ndim - 2)))


def test_input_axis_dora_files_are_read_and_applied_as_a1111_applies_them(tmp_path):
    generator = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 32, generator=generator) * 0.3, torch.randn(32, 2, generator=generator) * 0.3
    magnitude = torch.rand(1, 32, generator=generator) + 0.5
    name = kohya_layout.kohya_name("unet", TO_Q)
    path = tmp_path / "onetrainer.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0),
               f"{name}.dora_scale": magnitude}, str(path))
    module = formats.read(path).modules[("unet", TO_Q)]
    assert module.kind == "dora" and module.magnitude_axis == "in"
    weight = torch.randn(32, 32, generator=generator)
    assert torch.allclose(module.apply(weight, 1.0), a1111_dora(weight, up, down, 0.5, magnitude.flatten()), atol=1e-6)
    again = load_file(str(kohya_layout.write_kohya(formats.read(path), tmp_path / "again.safetensors")))
    assert torch.equal(again[f"{name}.dora_scale"], magnitude)                     # the layout it came in
    with pytest.raises(LoraBoothError, match="per input column.*dora=bake"):
        diffusers_layout.write_diffusers(formats.read(path), tmp_path / "d.safetensors")


def test_output_axis_dora_is_peft_and_lycoris_math():
    generator = torch.Generator().manual_seed(6)
    module = dora_module(generator)
    weight = torch.randn(32, 32, generator=generator)
    directed = weight + 0.5 * module.up @ module.down
    expected = module.magnitude[:, None] * directed / directed.norm(dim=1, keepdim=True)  # m ⊙ (W+ΔW)/‖W+ΔW‖ per row
    assert torch.allclose(module.apply(weight, 1.0), expected, atol=1e-6)


def test_a_dora_scale_that_fits_neither_axis_is_refused_by_name(tmp_path):
    name = kohya_layout.kohya_name("unet", TO_Q)
    path = tmp_path / "bad.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(16, 2),
               f"{name}.dora_scale": torch.ones(1, 7)}, str(path))
    with pytest.raises(LoraBoothError, match=r"dora_scale of shape \(1, 7\).*16 outputs"):
        formats.read(path)


@pytest.fixture
def dora_adapter(tiny_dir, tmp_path):
    generator = torch.Generator().manual_seed(7)
    adapter = Adapter({("unet", TO_Q): dora_module(generator),
                       ("unet", PROJ_IN): dora_module(generator, (2, 32, 1, 1), (32, 2, 1, 1))})
    return diffusers_layout.write_diffusers(adapter, tmp_path / "dora" / neutral.DIFFUSERS_WEIGHT_NAME,
                                   {"lora_booth.base_model": str(tiny_dir), "lora_booth.family": "sd1",
                                    "lora_booth.name": "sks_dog"})


def test_dora_bake_at_the_full_rank_is_the_dora_exactly(tiny_dir, tmp_path, dora_adapter):
    lines = []
    baked = low_rank.convert(dora_adapter, "kohya", tmp_path / "baked.safetensors", dora="bake", rank=32, report=lines.append)
    assert neutral.adapter_kind(formats.read(baked).modules.values()) == "lora"
    assert metadata_of(baked)["ss_network_module"] == "networks.lora"
    from_dora = merging.fuse(tiny_dir, [(dora_adapter, 1.0)], tmp_path / "a", report=QUIET)
    from_lora = merging.fuse(tiny_dir, [(baked, 1.0)], tmp_path / "b", report=QUIET)
    a = load_file(str(from_dora / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(from_lora / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert any("relative error of the update" in line for line in lines)


def test_dora_bake_at_a_low_rank_says_how_far_it_is(tmp_path, dora_adapter, capsys):
    assert cli.main(["convert", f"in={dora_adapter.parent}", "to=kohya", "dora=bake", "rank=1",
                     f"out={tmp_path / 'low.safetensors'}"]) == 0
    printed = capsys.readouterr().out
    error = re.search(r"relative error of the update mean ([\d.]+)%", printed)
    assert error and float(error.group(1)) > 1 and "max |W_baked − W_DoRA|" in printed
    assert cli.main(["convert", f"in={dora_adapter}", "to=kohya", "dora=bake", f"out={tmp_path / 'x.safetensors'}"]) == 1
    assert "needs rank=N" in capsys.readouterr().err
    assert cli.main(["convert", f"in={dora_adapter}", "to=kohya", "rank=4", f"out={tmp_path / 'y.safetensors'}"]) == 1
    assert "only apply with dora=bake" in capsys.readouterr().err


def test_the_end_of_a_dora_run_names_the_exact_fallback(tmp_path, photos):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, photos, **{"lora.type": "dora", "rank": 4, "save.name": "sks_dog"})
    line = formats.dora_warning(cfg, tmp_path / "out")
    assert "ComfyUI, Forge and A1111" in line
    assert f"lora-booth convert in={tmp_path / 'out'} to=kohya dora=bake rank=8 out=" in line
    assert formats.dora_warning(tiny_config(tmp_path, photos), tmp_path / "out") is None


# ---------------------------------------------------------------------------------------- metadata


SDXL_KEYS = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_network_module": "networks.lora",
             "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_resolution": "(32, 32)", "ss_clip_skip": "None",
             "ss_output_name": "sks_dog", "modelspec.sai_model_spec": "1.0.1",
             "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
             "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
             "modelspec.title": "sks_dog", "modelspec.resolution": "32x32", "modelspec.prediction_type": "epsilon",
             "modelspec.trigger_phrase": "sks dog"}


@pytest.fixture
def sdxl_diffusers_file(tmp_path, photos):
    """A diffusers file of an SDXL run as lora-booth writes it (its metadata from run_metadata)."""
    from types import SimpleNamespace

    from conftest import tiny_config

    cfg = tiny_config(tmp_path, photos, rank=4, alpha=2, **{"save.name": "sks_dog"})
    base = SimpleNamespace(family="sdxl", prediction_type="epsilon")
    generator = torch.Generator().manual_seed(8)
    adapter = Adapter({("unet", TO_Q): Module(torch.randn(4, 32, generator=generator), torch.zeros(32, 4), 2.0),
                       ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"):
                           Module(torch.randn(4, 32, generator=generator), torch.zeros(32, 4), 2.0)})
    metadata = file_metadata.run_metadata(cfg, base, 3, (3, 0), 1700000000.0, 1700000060.0)
    return diffusers_layout.write_diffusers(adapter, tmp_path / neutral.DIFFUSERS_WEIGHT_NAME, metadata)


def test_convert_to_kohya_writes_the_keys_a1111_and_forge_sort_sdxl_by(sdxl_diffusers_file, tmp_path):
    """A1111 files a LoRA under SDXL when ss_base_model_version starts with sdxl_ (else SD 1 for any
    metadata); Forge first matches modelspec.architecture == stable-diffusion-xl-v1-base/lora."""
    path = formats.convert(sdxl_diffusers_file, "kohya", tmp_path / "k.safetensors")
    metadata = metadata_of(path)
    assert {k: metadata.get(k) for k in SDXL_KEYS} == SDXL_KEYS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", metadata["modelspec.date"])
    assert metadata["modelspec.hash_sha256"] == "0x" + metadata["sshs_model_hash"]
    assert metadata["ss_training_started_at"] == "1700000000.0" and metadata["ss_steps"] == "3"
    assert json.loads(metadata["ss_tag_frequency"]) == {"photos": {"a photo of sks dog": 3}}


def test_resize_and_combine_of_a_kohya_file_state_their_own_rank_and_keep_the_family(sdxl_diffusers_file, tmp_path):
    kohya = formats.convert(sdxl_diffusers_file, "kohya", tmp_path / "k.safetensors")
    resized = metadata_of(low_rank.resize(kohya, tmp_path / "r.safetensors", rank=2, report=QUIET))
    assert resized["ss_network_dim"] == "2" and resized["ss_network_alpha"] == "2.0"
    assert resized["ss_training_comment"].startswith("dimension is resized from 4 to 2; trigger:")
    assert {k: resized[k] for k in ("ss_base_model_version", "modelspec.architecture")} == \
        {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    combined = metadata_of(low_rank.combine([(kohya, 1.0), (kohya, 0.5)], tmp_path / "c.safetensors", report=QUIET))
    assert combined["ss_network_dim"] == "8" and combined["modelspec.merged_from"] == "sks_dog, sks_dog"
    assert combined["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_a_loha_resized_to_lora_says_networks_lora(tmp_path):
    loha = lycoris.LoHa(*(torch.randn(s) for s in ((32, 2), (2, 32), (32, 2), (2, 32))), alpha=1.0)
    source = kohya_layout.write_kohya(Adapter({("unet", TO_Q): loha}), tmp_path / "loha.safetensors",
                                 file_metadata.kohya_file_metadata(Adapter({("unet", TO_Q): loha}), {}, "sd1"), family="sd1")
    assert json.loads(metadata_of(source)["ss_network_args"]) == {"algo": "loha"}
    resized = metadata_of(low_rank.resize(source, tmp_path / "r.safetensors", rank=2, report=QUIET))
    assert resized["ss_network_module"] == "networks.lora" and "ss_network_args" not in resized
