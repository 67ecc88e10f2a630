"""Adapter files: diffusers ⇄ kohya, files made by other tools, and hostile files."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_booth.adapters import formats
from lora_booth.adapters import neutral
from lora_booth.adapters import kohya_layout
from lora_booth.adapters import diffusers_layout
from lora_booth.io.errors import AdapterError
from lora_booth.training.recipe import run

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    """rank 4, alpha 2 (≠ rank), text encoder adapters of rank 2: the cases that go wrong."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("trained")
    photos = make_photos(root)
    cfg = tiny_config(root, photos, rank=4, alpha=2, max_steps=3, **{"lora.text_encoder": "true",
                                                                     "lora.text_encoder_rank": 2,
                                                                     "save.name": "sks_dog"})
    result = run(cfg, lambda *_: None)
    result.base.unet.eval()
    result.base.text_encoder.eval()
    return result


def predictions(unet, text_encoder, tokenizer):
    tokens = tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        hidden = text_encoder(tokens)[0]
        return unet(latents, torch.tensor([300]), hidden).sample


def loaded_prediction(tiny_dir, folder, weight_name):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return predictions(pipe.unet, pipe.text_encoder, pipe.tokenizer)


def test_train_writes_both_formats_and_each_loads_in_diffusers(trained, tiny_dir):
    out = trained.adapter.parent
    expected = predictions(trained.base.unet, trained.base.text_encoder, trained.base.tokenizer)
    from_diffusers = loaded_prediction(tiny_dir, out, neutral.DIFFUSERS_WEIGHT_NAME)
    from_kohya = loaded_prediction(tiny_dir, out, "sks_dog.safetensors")  # diffusers' own kohya reader
    assert torch.allclose(from_diffusers, expected, atol=1e-5)
    assert torch.allclose(from_kohya, expected, atol=1e-5)


def test_kohya_file_has_kohya_names_alpha_and_metadata(trained):
    path = trained.adapter.parent / "sks_dog.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert alpha.item() == 2.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_output_name"] == "sks_dog"
    assert metadata["ss_resolution"] == "(32, 32)" and metadata["ss_steps"] == "3"
    assert "a photo of sks dog" in metadata["ss_training_comment"]
    body = path.read_bytes()
    header = int.from_bytes(body[:8], "little")
    import hashlib
    assert metadata["sshs_model_hash"] == hashlib.sha256(body[8 + header:]).hexdigest()


def test_round_trip_diffusers_kohya_diffusers_is_bit_exact(trained, tmp_path):
    original = trained.adapter
    adapter = formats.read(original)
    kohya_layout.write_kohya(adapter, tmp_path / "k.safetensors")
    back = formats.read(tmp_path / "k.safetensors")
    diffusers_layout.write_diffusers(back, tmp_path / "d.safetensors")
    a, b = load_file(str(original)), load_file(str(tmp_path / "d.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = formats.read(tmp_path / "d.safetensors")
    assert {k: m.alpha for k, m in again.modules.items()} == {k: m.alpha for k, m in adapter.modules.items()}


def test_kohya_names_parse_back():
    for part, path in [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
                       ("unet", "mid_block.attentions.0.proj_in"),
                       ("unet", "up_blocks.2.resnets.1.time_emb_proj"),
                       ("text_encoder", "text_model.encoder.layers.11.self_attn.out_proj"),
                       ("text_encoder", "text_model.encoder.layers.3.mlp.fc1")]:
        assert kohya_layout.parse_kohya_name(kohya_layout.kohya_name(part, path)) == (part, path)


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_files_from_other_tools(tmp_path):
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    # diffusers without metadata: alpha = rank, as diffusers assumes
    bare = formats.read(write(tmp_path / "bare.safetensors", {f"unet.{module}.lora_A.weight": down,
                                                               f"unet.{module}.lora_B.weight": up}))
    assert bare.modules[("unet", module)].alpha == 4.0
    # the older diffusers layout (.lora.down/.lora.up) with per-module alpha keys
    old = formats.read(write(tmp_path / "old.safetensors", {f"unet.{module}.lora.down.weight": down,
                                                             f"unet.{module}.lora.up.weight": up,
                                                             f"unet.{module}.alpha": torch.tensor(1.0)}))
    assert old.modules[("unet", module)].alpha == 1.0 and torch.equal(old.modules[("unet", module)].down, down)
    # kohya with a different alpha per module, and a text-encoder-only kohya file
    kohya = formats.read(write(tmp_path / "k.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(8.0),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight": down.clone(),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight": up.clone(),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.alpha": torch.tensor(1.0)}))
    alphas = sorted(m.alpha for m in kohya.modules.values())
    assert alphas == [1.0, 8.0] and kohya.source_format == "kohya"
    te_only = formats.read(write(tmp_path / "te.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": down,
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight": up}))
    assert te_only.parts() == ["text_encoder"]
    # per-module alphas survive a trip through the diffusers layout (alpha_pattern)
    diffusers_layout.write_diffusers(kohya, tmp_path / "kd.safetensors")
    assert sorted(m.alpha for m in formats.read(tmp_path / "kd.safetensors").modules.values()) == [1.0, 8.0]


def test_hostile_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="neither a diffusers LoRA key"):
        formats.read(write(tmp_path / "model.safetensors", {"conv_in.weight": torch.zeros(2)}))
    truncated = tmp_path / "truncated.safetensors"
    write(truncated, {"unet.a.lora_A.weight": torch.zeros(64, 64)})
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        formats.read(truncated)
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # claims a 1 TiB header
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        formats.read(bomb)
    pickle_file = tmp_path / "old.ckpt"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    with pytest.raises(AdapterError, match="allow_pickle"):
        formats.read(pickle_file)
    half = tmp_path / "half.safetensors"
    write(half, {"unet.a.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="lacks its up matrix"):
        formats.read(half)


@pytest.mark.parametrize("text_width,family", [(768, "sd1"), (1024, "sd2")])
def test_round_trip_and_family_for_sd1_and_sd2_widths(tmp_path, text_width, family):
    """SD 2.x uses the same module names with 1024-wide text features: same mapping, other shapes."""

    generator = torch.Generator().manual_seed(0)
    modules = {("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"):
               neutral.Module(torch.randn(8, text_width, generator=generator),
                              torch.randn(640, 8, generator=generator), 4.0),
               ("text_encoder", "text_model.encoder.layers.22.self_attn.out_proj"):
               neutral.Module(torch.randn(8, text_width, generator=generator),
                              torch.randn(text_width, 8, generator=generator), 8.0)}
    adapter = neutral.Adapter(modules)
    diffusers_layout.write_diffusers(adapter, tmp_path / "d.safetensors")
    kohya_layout.write_kohya(formats.read(tmp_path / "d.safetensors"), tmp_path / "k.safetensors")
    back = formats.read(tmp_path / "k.safetensors")
    assert back.modules.keys() == modules.keys()
    for key, module in modules.items():
        assert torch.equal(back.modules[key].down, module.down) and torch.equal(back.modules[key].up, module.up)
        assert back.modules[key].alpha == module.alpha
    assert back.family() == family


def test_kohya_file_carries_modelspec_and_the_keys_front_ends_show(trained):
    """ModelSpec as kohya sd-scripts writes it (library/sai_model_spec.py), and the ss_* keys A1111
    and Forge display (tags for the activation text, dataset folders, clip skip, training date)."""
    import json
    import re

    with safe_open(str(trained.adapter.parent / "sks_dog.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert {k: metadata[k] for k in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                                     "modelspec.title", "modelspec.resolution", "modelspec.prediction_type",
                                     "modelspec.trigger_phrase")} == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "sks_dog", "modelspec.resolution": "32x32",
        "modelspec.prediction_type": "epsilon", "modelspec.trigger_phrase": "sks dog"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", metadata["modelspec.date"])
    assert metadata["modelspec.hash_sha256"] == "0x" + metadata["sshs_model_hash"]
    assert json.loads(metadata["ss_tag_frequency"]) == {"photos": {"a photo of sks dog": 3}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"photos": {"img_count": 3, "n_repeats": 1}}
    assert metadata["ss_clip_skip"] == "1" and metadata["ss_cache_latents"] == "True"
    assert metadata["ss_enable_bucket"] == "False" and metadata["ss_num_train_images"] == "3"
    assert metadata["ss_epoch"] == "1" and metadata["ss_num_epochs"] == "1" and metadata["ss_session_id"].isdigit()
    assert not {"ss_v_parameterization", "ss_network_train_unet_only", "ss_new_sd_model_hash"} & set(metadata)


def test_convert_to_kohya_rebuilds_the_trained_files_metadata(trained, tmp_path):
    """One rule for train and convert: the kohya file made from the diffusers file later says what
    the one written at the end of training says."""
    out = trained.adapter.parent
    converted = formats.convert(trained.adapter, "kohya", tmp_path / "sks_dog.safetensors")
    with safe_open(str(out / "sks_dog.safetensors"), "pt") as f, safe_open(str(converted), "pt") as g:
        written, rebuilt = f.metadata(), g.metadata()
    assert rebuilt == written
