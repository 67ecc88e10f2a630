"""merge / combine / resize / extract, checked against diffusers' own loading of the adapter."""
import hashlib
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from lora_booth import cli
from lora_booth.adapters import formats, merging
from lora_booth.adapters import low_rank
from lora_booth.adapters import diffusers_layout
from lora_booth.families import ldm
from lora_booth.io.errors import AdapterError
from lora_booth.adapters.neutral import Adapter, Module
from lora_booth.training.recipe import run

from conftest import make_photos, tiny_config


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    photos = make_photos(root)
    cfg = tiny_config(root, photos, rank=4, alpha=2, max_steps=3, lr=5e-2, **{"lora.text_encoder": "true"})
    return run(cfg, lambda *_: None).adapter


def prediction(pipe):
    tokens = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([300]), pipe.text_encoder(tokens)[0]).sample


def with_adapter(tiny_dir, adapter, scale=1.0):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="a")
    pipe.set_adapters(["a"], [scale])
    return prediction(pipe)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fuse_into_a_folder_matches_the_loaded_adapter(tiny_dir, adapter_file, tmp_path):
    before = digest(tiny_dir)
    out = merging.fuse(tiny_dir, [(adapter_file, 0.7)], tmp_path / "merged", report=lambda *_: None)
    assert digest(tiny_dir) == before                              # inputs untouched
    merged = prediction(StableDiffusionPipeline.from_pretrained(out, safety_checker=None))
    # fp32 weights: fusing reorders one matmul-add per weight, ~1e-6 relative (FACTS: fuse_lora 1.5e-6)
    assert torch.allclose(merged, with_adapter(tiny_dir, adapter_file, 0.7), atol=1e-5)


def test_fuse_into_a_single_file_and_from_one(tiny_dir, adapter_file, tmp_path):
    expected = with_adapter(tiny_dir, adapter_file)
    single = merging.fuse(tiny_dir, [(adapter_file, 1.0)], tmp_path / "merged.safetensors", report=lambda *_: None)
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_dir), safety_checker=None)
    assert torch.allclose(prediction(pipe), expected, atol=1e-5)
    # a single-file base in, a single file out
    base = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.sd1_checkpoint(base.unet, base.vae, base.text_encoder).items()},
              str(plain))
    again = merging.fuse(plain, [(adapter_file, 1.0)], tmp_path / "again.safetensors", dtype="fp16",
                         report=lambda *_: None)
    from lora_booth.io.tensorfile import header_of
    assert {dtype for _, dtype in header_of(again).values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_single_file(str(again), config=str(tiny_dir), safety_checker=None)
    # fp16 storage: relative rounding 2^-11 per weight, so compare loosely
    assert torch.allclose(prediction(pipe.to(torch.float32)), expected, atol=5e-2)


def test_fuse_refuses_an_adapter_for_another_model_and_writes_nothing(tiny_dir, tmp_path):
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = Adapter({("unet", module): Module(torch.zeros(2, 320), torch.zeros(320, 2), 2.0)})
    path = diffusers_layout.write_diffusers(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(AdapterError, match=r"to_q makes a \(320, 320\) update.*\(32, 32\)"):
        merging.fuse(tiny_dir, [(path, 1.0)], tmp_path / "out", report=lambda *_: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_combine_exact_equals_the_weighted_sum(adapter_file, tmp_path):
    out = low_rank.combine([(adapter_file, 1.0), (adapter_file, -0.25)], tmp_path / "ab.safetensors",
                          report=lambda *_: None)
    original, combined = formats.read(adapter_file), formats.read(out)
    for key, module in original.modules.items():
        assert combined.modules[key].rank == 2 * module.rank
        assert torch.allclose(combined.modules[key].delta(), 0.75 * module.delta(), atol=1e-6)


def known_adapter(singular_values, out_features=24, in_features=20, seed=0):
    """ΔW = U·diag(σ)·Vᵀ with orthonormal U, V: singular values known exactly."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, len(singular_values), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(singular_values), generator=generator))
    sigma = torch.tensor(singular_values)
    rank = len(singular_values)
    # alpha 2 with rank 4: scale 0.5, so the stored up is doubled
    return Module(down=v.T.contiguous(), up=(u * sigma * (rank / 2)).contiguous(), alpha=2.0)


def test_resize_is_lossless_at_the_true_rank_and_drops_exactly_the_small_singular_values(tmp_path):
    module = known_adapter([4.0, 3.0, 2.0, 1.0])
    source = diffusers_layout.write_diffusers(Adapter({("unet", "mid_block.attentions.0.proj_in"): module}),
                                     tmp_path / "a.safetensors")
    low_rank.resize(source, tmp_path / "r4.safetensors", rank=4, report=lambda *_: None)
    same = next(iter(formats.read(tmp_path / "r4.safetensors").modules.values()))
    assert torch.allclose(same.delta(), module.delta(), atol=1e-5)
    lines = []
    low_rank.resize(source, tmp_path / "r2.safetensors", rank=2, report=lines.append)
    smaller = next(iter(formats.read(tmp_path / "r2.safetensors").modules.values()))
    residual = (module.delta() - smaller.delta()).square().sum().item()
    assert smaller.rank == 2 and residual == pytest.approx(2.0**2 + 1.0**2, rel=1e-4)
    assert f"rank 4 → 2, relative error of the update mean {(5 / 30) ** 0.5:.2%}" in lines[0]  # one summary line
    assert lines[-1].startswith("wrote") and len(lines) == 2
    low_rank.resize(source, tmp_path / "fro.safetensors", sv_fro=0.8, report=lambda *_: None)
    assert next(iter(formats.read(tmp_path / "fro.safetensors").modules.values())).rank == 2  # 25/30 ≥ 0.8


def test_combine_by_svd_reports_the_error_of_the_sum(tmp_path):
    key = ("unet", "mid_block.attentions.0.proj_in")
    a = diffusers_layout.write_diffusers(Adapter({key: known_adapter([3.0, 1.0], seed=1)}), tmp_path / "a.safetensors")
    lines = []
    low_rank.combine([(a, 1.0)], tmp_path / "c.safetensors", rank=1, report=lines.append)
    assert f"worst {0.1 ** 0.5:.2%}" in lines[0]  # 9 of 9 + 1 of the energy kept: error √(1/10)


def test_extract_recovers_a_low_rank_difference(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_dir, tuned)
    weights = tuned / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    change = known_adapter([0.5, 0.25], out_features=32, in_features=32)
    state[key] = state[key] + change.delta()
    save_file(state, str(weights))
    out = low_rank.extract(tiny_dir, tuned, tmp_path / "x.safetensors", rank=2, report=lambda *_: None)
    extracted = formats.read(out)
    assert list(extracted.modules) == [("unet", key[:-len(".weight")])]
    assert torch.allclose(extracted.modules[("unet", key[:-len(".weight")])].delta(), change.delta(), atol=1e-5)


def test_file_verbs_through_the_cli(adapter_file, tiny_dir, tmp_path, capsys):
    assert cli.main(["convert", f"in={adapter_file}", "to=kohya", f"out={tmp_path / 'k.safetensors'}"]) == 0
    assert cli.main(["inspect", str(tmp_path / "k.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "format       kohya" in text and "unet" in text and "alpha 2" in text
    assert "trigger      a photo of sks dog" in text
    assert cli.main(["merge", f"base={tiny_dir}", f"lora={tmp_path / 'k.safetensors'}:0.5",
                     f"out={tmp_path / 'm'}"]) == 0
    assert (tmp_path / "m/unet/diffusion_pytorch_model.safetensors").is_file()
    assert cli.main(["merge", f"base={tiny_dir}", f"lora={adapter_file}", f"out={tmp_path / 'm'}"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["resize", f"in={adapter_file}", f"out={tmp_path / 'r.safetensors'}", "rnk=2"]) == 2
    assert "did you mean 'rank'" in capsys.readouterr().err.lower()
