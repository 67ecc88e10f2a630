"""lora.type=lora|dora|loha|lokr: each trains only its own tensors, saves, loads, exports to the
kohya/LyCORIS layout at the trained strength, merges, resumes and shows up in the plan."""
import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lora_booth.config import sections as config
from lora_booth.adapters import formats, merging
from lora_booth.adapters import low_rank
from lora_booth.adapters import neutral
from lora_booth.adapters import kohya_layout
from lora_booth.adapters import diffusers_layout
from lora_booth.model import lora, lycoris, loading as models
from lora_booth.planning import plan
from lora_booth.training.recipe import run

from conftest import make_photos, run_until_first_checkpoint, tiny_config

TYPES = ("lora", "dora", "loha", "lokr")
OWN_TENSORS = {"lora": {"lora_A", "lora_B"}, "dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
               "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
               "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}}


@pytest.fixture(scope="module", params=TYPES)
def trained(request, tmp_path_factory):
    """Two steps on the tiny model with text-encoder adapters; alpha ≠ rank so a lost scale shows."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(root, make_photos(root), rank=2, alpha=1, max_steps=2, lr=5e-2,
                      **{"lora.type": request.param, "lora.text_encoder": "true", "prior.weight": 0,
                         "save.name": "subject"})
    messages = []
    result = run(cfg, messages.append)
    result.report = "\n".join(map(str, messages))
    for module in (result.base.unet, result.base.text_encoder):
        module.eval()
    return request.param, result


def prediction(unet, text_encoder, tokenizer):
    tokens = tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(latents, torch.tensor([300]), text_encoder(tokens)[0]).sample


def fresh(tiny_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)


def test_only_the_types_own_tensors_train_and_the_base_stays_bit_identical(trained, tiny_dir):
    kind, result = trained
    base = models.load_frozen(config.ModelConfig(source="tiny"))
    for part in ("unet", "text_encoder"):
        model = getattr(result.base, part)
        assert lora.adapter_type(model) == kind
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        leaves = {n.replace(".default", "").rsplit(".", 1)[-1] if not n.endswith(".weight")
                  else n.replace(".default", "").rsplit(".", 2)[-2] for n in trainable}
        assert trainable and leaves <= OWN_TENSORS[kind]
        original = getattr(base, part).state_dict()
        for name, tensor in model.state_dict().items():
            if any(f".{leaf}" in name for leaf in OWN_TENSORS[kind]):
                continue
            assert torch.equal(tensor, original[name.replace(".base_layer", "")]), name
    # the factor that starts at zero moved: training reached this type's tensors
    expected = prediction(result.base.unet, result.base.text_encoder, result.base.tokenizer)
    assert not torch.allclose(expected, prediction(base.unet, base.text_encoder, base.tokenizer), atol=1e-5)


def test_saved_adapter_reproduces_the_trained_model(trained, tiny_dir):
    """Where diffusers' load_lora_weights reads a file (lora: both; dora: the diffusers file) it
    reproduces the model; LoHa/LoKr it refuses, DoRA's kohya file it reads without its magnitudes
    (diffusers 0.42 drops dora_scale with a warning) — the README says so. lora-booth's own path
    (generate, merge) reproduces every file."""
    kind, result = trained
    out = result.adapter.parent
    expected = prediction(result.base.unet, result.base.text_encoder, result.base.tokenizer)
    for weight_name in (neutral.DIFFUSERS_WEIGHT_NAME, "subject.safetensors"):
        diffusers_reads = kind == "lora" or (kind == "dora" and weight_name == neutral.DIFFUSERS_WEIGHT_NAME)
        if diffusers_reads:
            pipe = fresh(tiny_dir)
            pipe.load_lora_weights(str(out), weight_name=weight_name)
            assert torch.allclose(prediction(pipe.unet, pipe.text_encoder, pipe.tokenizer), expected, atol=1e-5)
        elif kind in ("loha", "lokr"):
            with pytest.raises(ValueError):
                fresh(tiny_dir).load_lora_weights(str(out), weight_name=weight_name)
        pipe = fresh(tiny_dir)
        merging.fuse_into_modules({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                                  formats.read(out / weight_name), 1.0, out / weight_name)
        assert torch.allclose(prediction(pipe.unet, pipe.text_encoder, pipe.tokenizer), expected, atol=1e-5), \
            weight_name


def test_files_round_trip_bit_exactly(trained, tmp_path):
    kind, result = trained
    out = result.adapter.parent
    for name, write in (("subject.safetensors", kohya_layout.write_kohya),
                        (neutral.DIFFUSERS_WEIGHT_NAME, diffusers_layout.write_diffusers)):
        adapter = formats.read(out / name)
        assert neutral.adapter_kind(adapter.modules.values()) == kind
        again = write(adapter, tmp_path / name)
        first, second = load_file(str(out / name)), load_file(str(again))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    from_model = formats.from_model(result.base)
    from_kohya = formats.read(out / "subject.safetensors")
    assert from_model.modules.keys() == from_kohya.modules.keys()


def reference_weight(tensors: dict[str, torch.Tensor], prefix: str, weight: torch.Tensor) -> torch.Tensor:
    """The adapted weight as LyCORIS's formulas define it, read straight off a kohya/LyCORIS file
    (independent of lora_booth's readers)."""
    t = {k[len(prefix) + 1:]: v.double() for k, v in tensors.items() if k.startswith(prefix + ".")}
    w = weight.double()
    if "hada_w1_a" in t:   # LoHa: (alpha / r) · (w1a w1b) ⊙ (w2a w2b), r = rows of w1b
        scale = t["alpha"].item() / t["hada_w1_b"].shape[0]
        return w + scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    if any(k.startswith("lokr_") for k in t):   # LoKr: alpha / r only where a factor is decomposed
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        scale = t["alpha"].item() / rank if rank is not None else 1.0
        return w + scale * torch.kron(w1, w2)
    adapted = w + t["alpha"].item() / t["lora_down.weight"].shape[0] * (t["lora_up.weight"] @ t["lora_down.weight"])
    if "dora_scale" in t:  # output-axis DoRA: rows rescaled to the trained magnitude
        adapted = t["dora_scale"] * adapted / adapted.norm(dim=1, keepdim=True)
    return adapted


def test_exported_file_applies_the_update_peft_trained(trained):
    """What A1111/ComfyUI compute from the kohya/LyCORIS file equals peft's own merge, per module."""
    kind, result = trained
    tensors = load_file(str(result.adapter.parent / "subject.safetensors"))
    checked = 0
    for part in ("unet", "text_encoder"):
        model = copy.deepcopy(getattr(result.base, part))
        layers = {n: m for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "merge")}
        for path, layer in layers.items():
            weight = layer.base_layer.weight.detach().clone()
            layer.merge()
            merged = layer.base_layer.weight.detach().double()
            prefix = kohya_layout.kohya_name(part, path)
            expected = reference_weight(tensors, prefix, weight)
            assert torch.allclose(merged, expected, rtol=0, atol=1e-6), f"{prefix}: {(merged - expected).abs().max()}"
            checked += 1
    assert checked == len({k.split(".")[0] for k in tensors})


def test_merge_into_the_base_matches_the_adapter_in_place(trained, tiny_dir, tmp_path):
    kind, result = trained
    expected = prediction(result.base.unet, result.base.text_encoder, result.base.tokenizer)
    for name in (neutral.DIFFUSERS_WEIGHT_NAME, "subject.safetensors"):
        out = merging.fuse(tiny_dir, [(result.adapter.parent / name, 1.0)], tmp_path / name.split(".")[0],
                           report=lambda *_: None)
        merged = fresh(out)
        assert torch.allclose(prediction(merged.unet, merged.text_encoder, merged.tokenizer), expected, atol=1e-5)


def test_the_end_of_training_says_who_loads_the_files(trained):
    kind, result = trained
    says_diffusers = "pipe.load_lora_weights(" in result.report
    assert says_diffusers == (kind in ("lora", "dora"))
    if kind in ("loha", "lokr"):
        assert "cannot load" in result.report and "lora-booth generate/merge" in result.report
    assert ("dora=bake" in result.report) == (kind == "dora")  # the front-ends' DoRA problem, and its fix


def test_generate_and_inspect_take_every_file(trained, tmp_path):
    from lora_booth.adapters import describe
    from lora_booth.results import sample

    kind, result = trained
    kohya = result.adapter.parent / "subject.safetensors"
    assert f"type         {kind}" in describe.describe(kohya)
    quiet = lambda *_: None  # noqa: E731
    plain = sample.generate("tiny", [], "a photo of sks dog", tmp_path / "plain", n=1, steps=2, size=32, report=quiet)
    images = [sample.generate("tiny", [(path, 1.0)], "a photo of sks dog", tmp_path / path.stem, n=1, steps=2,
                              size=32, report=quiet)[0] for path in (kohya, result.adapter)]
    from PIL import Image
    pixels = [torch.tensor(list(Image.open(p).getdata())) for p in (plain[0], *images)]
    # both files draw the same image (to rounding: fused weights vs. adapter layers), and it is not the base's
    assert (pixels[1] - pixels[2]).abs().max() <= 1 < (pixels[0] - pixels[1]).abs().max()


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_resume_continues_exactly(kind, tmp_path, photos, monkeypatch):
    """A run that dies after its step-2 checkpoint and resumes gives the bytes of a straight run."""
    quiet = lambda *_: None  # noqa: E731
    common = {"max_steps": 3, "prior.weight": 0, "lora.type": kind, "lora.text_encoder": "true", "lr": 5e-2,
              "save.checkpoint_every": 2}
    straight = run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), quiet)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])   # lora: tests/test_plan.py
def test_plan_prices_each_type_and_its_fake_trace_matches_a_real_step(kind, tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, **{"lora.type": kind})
    fake, real = plan.estimate(cfg), plan.estimate(cfg, fake=False)
    assert fake.tracked_peak == pytest.approx(real.tracked_peak, rel=0.05) and fake.flops == real.flops
    base = models.load_frozen(config.ModelConfig(source="tiny"))
    counted = lora.count(lora.add_adapters(base, cfg.lora, 0))
    assert f"{kind} rank 2: {sum(counted.values()):,} adapter parameters" in fake.text()
    assert fake.parts["unet adapters"] == 4 * counted["unet"]          # fp32 adapters
    # AdamW: two fp32 moments per parameter, plus a step counter per tensor
    state = fake.parts["optimizer state (adamw)"]
    assert 0 <= state - 2 * 4 * sum(counted.values()) <= 4 * 300


def test_lokr_with_both_factors_full_exports_at_peft_strength(tmp_path):
    """When r is large next to the factors, peft keeps w1 and w2 full and still scales by alpha/r,
    while LyCORIS readers scale such a module by 1: the export must carry peft's scale."""
    from peft import LoKrConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 32)),
                           LoKrConfig(r=8, alpha=3, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    assert "default" in layer.lokr_w2  # both factors full
    tensors = {"lokr_w1": layer.lokr_w1["default"].detach(), "lokr_w2": layer.lokr_w2["default"].detach()}
    module = lycoris.from_peft(tensors, 8, 3.0, "test")
    expected = layer.get_delta_weight("default").detach()
    assert torch.allclose(module.delta(), expected, atol=1e-6)
    adapter = neutral.Adapter({("unet", "down_blocks.0.attentions.0.proj_in"): module})
    path = kohya_layout.write_kohya(adapter, tmp_path / "lokr.safetensors")
    written = load_file(str(path))
    base = torch.zeros(32, 32)
    prefix = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert torch.allclose(reference_weight(written, prefix, base).float(), expected, atol=1e-6)
    back = formats.read(path).modules[("unet", "down_blocks.0.attentions.0.proj_in")]
    assert all(torch.equal(back.factors[k], module.factors[k]) for k in module.factors)


def test_resize_turns_loha_into_lora_and_refuses_dora(tmp_path):
    from lora_booth.io.errors import LoraBoothError

    torch.manual_seed(0)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    loha = lycoris.LoHa(*(torch.randn(s) for s in ((32, 2), (2, 32), (32, 2), (2, 32))), alpha=1.0)
    source = kohya_layout.write_kohya(neutral.Adapter({("unet", path): loha}), tmp_path / "loha.safetensors")
    resized = low_rank.resize(source, tmp_path / "lora4.safetensors", rank=4, report=lambda *_: None)
    module = formats.read(resized).modules[("unet", path)]
    assert module.kind == "lora" and module.rank == 4    # the best rank-4 approximation of ΔW
    assert torch.allclose(module.delta(), low_rank.low_rank(loha.delta(), 4)[0].delta(), atol=1e-5)
    dora = neutral.Module(torch.randn(2, 32), torch.randn(32, 2), 2.0, torch.rand(32))
    source = kohya_layout.write_kohya(neutral.Adapter({("unet", path): dora}), tmp_path / "dora.safetensors")
    with pytest.raises(LoraBoothError, match="DoRA.*merge"):
        low_rank.resize(source, tmp_path / "out.safetensors", rank=1, report=lambda *_: None)


def test_dropout_with_loha_or_lokr_is_a_config_error(tmp_path, photos):
    from lora_booth.io.errors import ConfigError

    with pytest.raises(ConfigError, match="lora.dropout"):
        tiny_config(tmp_path, photos, **{"lora.type": "loha", "lora.dropout": 0.1})
