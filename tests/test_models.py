"""Base models from a folder, the hub cache and a single file; families and clear refusals."""
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lora_booth.families import ldm
from lora_booth.model import loading as models
from lora_booth.config.sections import ModelConfig
from lora_booth.io.errors import ModelError


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_checkpoint_loads_with_its_family_detected(tmp_path, tiny_dir, tiny_pipe):
    """Written in the LDM layout A1111 uses, read back by diffusers' own single-file converter."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.sd1_checkpoint(tiny_pipe.unet, tiny_pipe.vae,
                                                                 tiny_pipe.text_encoder).items()}, str(path))
    cfg = ModelConfig(source=str(path), single_file_config=str(tiny_dir))
    info = models.locate(cfg)
    assert info.kind == "single_file" and info.family == models.SD1
    base = models.load_frozen(cfg, info)
    assert same_weights(base.unet, tiny_pipe.unet)
    assert same_weights(base.vae, tiny_pipe.vae)
    assert same_weights(base.text_encoder, tiny_pipe.text_encoder)


def test_hub_id_is_read_from_the_local_cache_offline(tmp_path, tiny_dir, monkeypatch):
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = models.locate(ModelConfig(source="someone/tiny-sd"))
    assert info.kind == "folder" and info.path.name == commit
    base = models.load_frozen(ModelConfig(source="someone/tiny-sd"), info)
    assert base.family == models.SD1
    with pytest.raises(ModelError, match="not in the local hub cache"):
        models.locate(ModelConfig(source="someone/missing-model"))


def edited_copy(tiny_dir, tmp_path, part, **changes):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    name = {"unet": "unet/config.json", "index": "model_index.json",
            "scheduler": "scheduler/scheduler_config.json"}[part]
    config = json.loads((folder / name).read_text())
    config.update(changes)
    (folder / name).write_text(json.dumps(config))
    return folder


def test_v_prediction_is_read_from_the_scheduler(tiny_dir, tmp_path):
    folder = edited_copy(tiny_dir, tmp_path, "scheduler", prediction_type="v_prediction")
    assert models.load_frozen(ModelConfig(source=str(folder))).prediction_type == "v_prediction"
    forced = models.load_frozen(ModelConfig(source=str(tiny_dir), prediction_type="v_prediction"))
    assert forced.prediction_type == "v_prediction"


def test_sd2_is_told_apart_by_its_text_width(tiny_dir, tmp_path):
    folder = edited_copy(tiny_dir, tmp_path, "unet", cross_attention_dim=1024)
    assert models.detect_folder_family(folder) == models.SD2


@pytest.mark.parametrize("part,changes,message", [
    ("index", {"text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "_class_name": "StableDiffusionXLPipeline"}, "refiner"),
    ("unet", {"in_channels": 9}, "inpainting"),
    ("index", {"_class_name": "StableDiffusion3Pipeline"}, "not a Stable Diffusion 1.x/2.x, SDXL, FLUX.1, FLUX.2 klein, Z-Image"),
    ("index", {"_class_name": "FluxPipeline"}, "transformer.config.json: cannot read it"),  # no transformer inside
])
def test_unsupported_models_are_refused_before_loading(tiny_dir, tmp_path, part, changes, message):
    folder = edited_copy(tiny_dir, tmp_path, part, **changes)
    with pytest.raises(ModelError, match=message):
        models.locate(ModelConfig(source=str(folder)))


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        models.locate(ModelConfig(source=str(tmp_path / "missing.safetensors")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        models.locate(ModelConfig(source=str(tmp_path / "plain")))
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="allow_pickle"):
        models.locate(ModelConfig(source=str(pickle_file)))
    not_a_model = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(not_a_model))
    with pytest.raises(ModelError, match="no Stable Diffusion UNet"):
        models.locate(ModelConfig(source=str(not_a_model)))


def test_a_model_folder_missing_parts_is_explained(tiny_dir, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot load the pipeline"):
        models.load_frozen(ModelConfig(source=str(folder)))
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json"):
        models.locate(ModelConfig(source=str(folder)))


@pytest.mark.parametrize("claim", ["double_blocks.0.img_attn.qkv.weight",                 # FLUX.1 / FLUX.2 (BFL names)
                                   "model.diffusion_model.input_blocks.0.0.weight",      # SD's LDM layout
                                   "layers.0.adaLN_modulation.0.weight cap_embedder.1.weight",  # Z-Image
                                   "transformer_blocks.0.img_mod.1.weight"])             # Qwen-Image
@pytest.mark.parametrize("mark", ["double_blocks.0.img_attn.qkv.scale_weight", "layers.0.attention.qkv.weight_scale",
                                  "scaled_fp8", "x.input_scale"])
def test_scaled_fp8_single_files_are_refused_for_every_family(tmp_path, claim, mark):
    """ComfyUI's scaled-fp8 files keep per-layer scales beside fp8 weights: read without them, the
    base is silently wrong. Whatever family the file claims, it is refused naming the scale."""
    import torch
    from safetensors.torch import save_file

    from lora_booth.model import loading

    path = tmp_path / "scaled.safetensors"
    shape = (4, 4, 3, 3) if "input_blocks" in claim else (12, 4)
    save_file({**{key: torch.zeros(shape) for key in claim.split()}, mark: torch.ones(())}, str(path))
    with pytest.raises(ModelError, match="scaled-fp8"):
        loading.detect_single_file_family(path, allow_pickle=False)
