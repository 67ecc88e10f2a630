"""Issue 34: the diffusers-layout file gives the trained weights in every loader, whichever way it
reads a module's strength. ComfyUI and Forge take it from a `<module>.alpha` tensor ÷ rank, else
1, and never read the peft metadata; diffusers reads `lora_adapter_metadata`. The files here are
written from randomly drawn (large) adapters with alpha ≠ rank on the tiny SD 1.x, SDXL and FLUX.1
models and read with those rules written out below, independent of lora-booth's reader, against
peft's own merge."""
import copy
import types

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from lora_booth import families, formats, lora, tiny
from lora_booth.config import LoraConfig

TYPES = ("lora", "dora", "loha", "lokr")
BUILDERS = {"sd1": tiny.build_tiny_pipeline, "sdxl": tiny.build_tiny_sdxl_pipeline, "flux": tiny.build_tiny_flux_pipeline}
# (rank, alpha): α/r not a power of two, so the file holds a rounded product and a lost scale shows;
# LoKr at rank 2 so that w2 is factored (a decomposed module: ComfyUI applies alpha/r to it)
RANK_ALPHA = {"lokr": (2, 1.5)}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pipeline(request):
    return request.param, BUILDERS[request.param]()


def adapted(family: str, pipe, kind: str):
    """A copy of the pipeline's denoiser and trainable text encoders with peft adapters of `kind`,
    every adapter tensor drawn at random (DoRA magnitudes moved ±30 %)."""
    kind_of = families.family(family)
    base = types.SimpleNamespace(kind=kind_of, family=family, unet=copy.deepcopy(getattr(pipe, kind_of.denoiser)))
    for part in kind_of.trainable_text_parts():
        setattr(base, part, copy.deepcopy(getattr(pipe, part)))
    rank, alpha = RANK_ALPHA.get(kind, (4, 3.0))
    lora.add_adapters(base, LoraConfig(type=kind, rank=rank, alpha=alpha, text_encoder=True), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lora.adapted_parts(base).values():
            for name, p in module.named_parameters():
                if p.requires_grad and "lora_magnitude_vector" in name:
                    p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=generator))
                elif p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return base


def peft_merged(base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """'part.module path' → (W, W merged by peft itself), text-encoder paths with CLIP's text_model. level."""
    out = {}
    for part, module in lora.adapted_parts(base).items():
        module = copy.deepcopy(module)
        for name, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                before = layer.get_base_layer().weight.detach().clone()
                layer.merge()
                out[f"{part}.{formats.canonical_path(part, name)}"] = (before, layer.get_base_layer().weight.detach())
    return out


def comfy_rule(tensors: dict[str, torch.Tensor], module: str, weight: torch.Tensor) -> torch.Tensor:
    """The adapted weight as ComfyUI's weight adapters compute it (comfy/weight_adapter/lora.py,
    loha.py, lokr.py): scale = `.alpha` ÷ rank when the tensor exists, else 1 (LoKr: alpha ÷ rank
    only when a factor is decomposed). DoRA's magnitude as peft and diffusers apply it."""
    get = lambda leaf: tensors.get(f"{module}.{leaf}")  # noqa: E731
    alpha = get("alpha")
    if get("lora_A.weight") is not None:
        down, up = get("lora_A.weight").double(), get("lora_B.weight").double()
        scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
        delta = scale * (up.flatten(1) @ down.flatten(1))
    elif get("hada_w1_a") is not None:
        scale = alpha.item() / get("hada_w1_b").shape[0] if alpha is not None else 1.0
        delta = scale * ((get("hada_w1_a").double() @ get("hada_w1_b").double())
                         * (get("hada_w2_a").double() @ get("hada_w2_b").double()))
    else:
        factor = lambda w: get(w).double() if get(w) is not None else get(w + "_a").double() @ get(w + "_b").double()  # noqa: E731
        rank = next((get(w).shape[0] for w in ("lokr_w2_b", "lokr_w1_b") if get(w) is not None), None)
        scale = alpha.item() / rank if alpha is not None and rank is not None else 1.0
        delta = scale * torch.kron(factor("lokr_w1"), factor("lokr_w2").flatten(1))
    directed = weight.double() + delta.reshape(weight.shape)
    magnitude = get("lora_magnitude_vector.weight")
    if magnitude is None:
        return directed
    return magnitude.double().reshape(-1, 1) * directed / directed.flatten(1).norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", TYPES)
def test_diffusers_file_read_at_alpha_tensors_or_scale_1_gives_the_peft_merge(pipeline, kind, tmp_path):
    family, pipe = pipeline
    base = adapted(family, pipe, kind)
    path = formats.write_diffusers(formats.from_model(base), tmp_path / formats.DIFFUSERS_WEIGHT_NAME)
    tensors = load_file(str(path))
    merged = peft_merged(base)
    assert merged and {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                       for k in tensors} <= set(merged) | {k[:-len(".lora_magnitude_vector.weight")]
                                                            for k in tensors if "magnitude" in k}
    worst = 0.0
    for module, (weight, expected) in merged.items():
        got = comfy_rule(tensors, module, weight)
        worst = max(worst, float((got - expected.double()).abs().max() / expected.abs().max()))
    assert worst < 1e-5, f"{family} {kind}: the file read at scale 1 is {worst:.2g} off peft's merge"
    # lora-booth reads back the trained alphas (the metadata says what was folded), at the same ΔW
    again = formats.read(path)
    trained = formats.from_model(base)
    for key, module in trained.modules.items():
        assert again.modules[key].alpha == module.alpha
        assert torch.allclose(again.modules[key].delta(), module.delta(), rtol=1e-6, atol=1e-6)


def test_power_of_two_scales_fold_and_unfold_bit_for_bit(tmp_path):
    """alpha = rank/2 or 1, as kohya habits go: the folded file reads back bit for bit, and its
    kohya rewrite equals the one written from the trained adapter."""
    generator = torch.Generator().manual_seed(0)
    modules = {("unet", f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{n}"):
               formats.Module(torch.randn(8, 32, generator=generator), torch.randn(32, 8, generator=generator), alpha)
               for n, alpha in (("q", 4.0), ("k", 1.0), ("v", 8.0))}
    adapter = formats.Adapter(modules)
    path = formats.write_diffusers(adapter, tmp_path / "d.safetensors")
    tensors = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in tensors)  # diffusers refuses .alpha tensors beside metadata
    back = formats.read(path)
    for key, module in modules.items():
        assert torch.equal(back.modules[key].up, module.up) and back.modules[key].alpha == module.alpha
    a = formats.write_kohya(adapter, tmp_path / "a.safetensors")
    b = formats.write_kohya(back, tmp_path / "b.safetensors")
    assert load_file(str(a)).keys() == load_file(str(b)).keys()
    assert all(torch.equal(x, load_file(str(b))[k]) for k, x in load_file(str(a)).items())


@pytest.mark.parametrize("kind,strength,how", [("lora", 0.5, "set_adapters"), ("lora", 0.5, "lora_scale"),
                                               ("dora", 1.0, "lora_scale")])
def test_diffusers_load_lora_weights_stays_exact(pipeline, kind, strength, how, tmp_path):
    """The folded file in diffusers' own loader: load_lora_weights, then set_adapters(weights=…)
    or fuse_lora(lora_scale=…), gives W + s·(W_peft − W) in every adapted module."""
    family, pipe = pipeline
    base = adapted(family, pipe, kind)
    formats.write_diffusers(formats.from_model(base), tmp_path / formats.DIFFUSERS_WEIGHT_NAME)
    merged = peft_merged(base)
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(tmp_path), weight_name=formats.DIFFUSERS_WEIGHT_NAME, adapter_name="subject")
    if how == "set_adapters":
        pipe.set_adapters(["subject"], [strength])
        pipe.fuse_lora(components=list(lora.adapted_parts(base)))
    else:
        pipe.fuse_lora(components=list(lora.adapted_parts(base)), lora_scale=strength)
    seen = 0
    for part in lora.adapted_parts(base):
        for name, layer in getattr(pipe, part).named_modules():
            if isinstance(layer, BaseTunerLayer):
                weight, expected = merged[f"{part}.{formats.canonical_path(part, name)}"]
                got = layer.get_base_layer().weight.detach()
                assert torch.allclose(got, weight + strength * (expected - weight), atol=1e-5), (part, name)
                seen += 1
    assert seen == len(merged)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_flux_refusal_names_only_the_paths_that_were_checked(kind, tmp_path):
    """FLUX.1's kohya layout holds plain LoRA only; the refusal names, per type, the file and the
    tools tools/check_flux_loaders.py measured as exact (and the tools that cannot load it)."""
    from conftest import make_photos, tiny_config

    from lora_booth.errors import ConfigError
    from lora_booth.recipe import run

    tiny.tiny_model_dir("tiny-flux")
    cfg = tiny_config(tmp_path, make_photos(tmp_path), model="tiny-flux", **{"lora.type": kind})
    with pytest.raises(ConfigError) as refused:
        run(cfg, lambda *_: None)
    message = str(refused.value).replace("Save.formats", "save.formats")  # the fix starts a sentence
    assert "save.formats=diffusers" in message and "ComfyUI reads its keys" not in message
    if kind == "dora":  # exact in diffusers; ComfyUI and Forge drop the magnitudes: the bake
        assert "FluxPipeline.load_lora_weights" in message and "dora=bake" in message
    else:  # exact in ComfyUI and Forge once alpha is folded; diffusers refuses LoHa/LoKr
        assert "loads exactly in ComfyUI and Forge" in message and "diffusers cannot load" in message
        assert "FluxPipeline" not in message


def test_flux_kohya_modules_diffusers_drops_are_named_at_save_time(tmp_path):
    """diffusers' kohya converter returns proj_out (lora_unet_final_layer_linear) and the other
    modules outside the blocks without the transformer. prefix, and load_lora_weights drops them."""
    from safetensors.torch import save_file

    from lora_booth import flux_layout

    generator = torch.Generator().manual_seed(0)
    tensors = {"transformer.proj_out.lora_A.weight": torch.randn(4, 32, generator=generator),
               "transformer.proj_out.lora_B.weight": torch.randn(64, 4, generator=generator),
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=generator),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=generator)}
    kohya = tmp_path / "sks_dog.safetensors"
    save_file(flux_layout.to_kohya(tensors, 2.0), str(kohya))
    line = formats.kohya_gap_warning(kohya, diffusers_written=True)
    assert "proj_out (lora_unet_final_layer_linear)" in line and formats.DIFFUSERS_WEIGHT_NAME in line
    assert "convert in=" in formats.kohya_gap_warning(kohya, diffusers_written=False)
    blocks_only = tmp_path / "blocks.safetensors"
    save_file(flux_layout.to_kohya({k: v for k, v in tensors.items() if "blocks" in k}, 2.0), str(blocks_only))
    assert formats.kohya_gap_warning(blocks_only, diffusers_written=True) is None


@pytest.mark.parametrize("family,kind,expected", [
    ("flux", "loha", "ComfyUI, Forge: copy pytorch_lora_weights.safetensors"),
    ("flux", "dora", "dora=bake"),
    ("sd1", "lora", "they take the kohya file"),
])
def test_end_of_run_says_which_file_each_tool_takes(family, kind, expected, tmp_path):
    """Without a kohya file: FLUX.1's diffusers file is ComfyUI's and Forge's (not for DoRA, whose
    magnitudes they drop), SD's is not (they do not map its UNet keys)."""
    from conftest import make_photos, tiny_config

    from lora_booth.recipe import report_end

    cfg = tiny_config(tmp_path, make_photos(tmp_path), **{"lora.type": kind, "save.formats": "diffusers"})
    lines = []
    report_end(cfg, families.family(family), tmp_path, [tmp_path / formats.DIFFUSERS_WEIGHT_NAME], None, 60.0,
               lines.append)
    assert expected in lines[0]
    if kind == "dora":
        assert "ComfyUI, Forge: copy" not in lines[0]


def test_flux_dora_bake_named_by_the_refusal_reproduces_the_dora(tmp_path):
    """The path the FLUX.1 DoRA hint names for ComfyUI and Forge: convert … to=kohya dora=bake at the
    weights' full rank gives a kohya file (BFL's fused names) whose plain LoRA is peft's DoRA merge."""
    import json

    from lora_booth import merging

    pipe = tiny.build_tiny_flux_pipeline()
    base = adapted("flux", pipe, "dora")
    folder = tmp_path / "base"
    pipe.transformer.save_pretrained(folder / "transformer")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    adapter = formats.from_model(base)
    source = formats.write_diffusers(adapter, tmp_path / formats.DIFFUSERS_WEIGHT_NAME, {"lora_booth.family": "flux"})
    full = max(min(m.update_shape()) for m in adapter.modules.values())
    baked = merging.bake_dora(source, "kohya", tmp_path / "baked.safetensors", full, str(folder), report=lambda *_: None)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(str(baked)))
    read = formats.read(baked)
    for key, (weight, expected) in peft_merged(base).items():
        part, path = key.split(".", 1)
        got = read.modules[(part, path)].apply(weight.float(), 1.0)
        assert torch.allclose(got, expected, atol=1e-5), key


def test_convert_rewrites_an_older_diffusers_file_with_its_scale_in_the_weights(tmp_path):
    """A diffusers file that keeps alpha only in its peft metadata (earlier lora-booth, diffusers'
    own trainers) reads at r/α times its update in ComfyUI; `convert … to=diffusers` fixes that."""
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator)
    config = {"unet.r": 4, "unet.lora_alpha": 1.0, "unet.target_modules": ["to_q"]}
    old = tmp_path / "old.safetensors"
    save_file({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}, str(old),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    new = formats.convert(old, "diffusers", tmp_path / "new.safetensors")
    tensors = load_file(str(new))
    got = comfy_rule(tensors, f"unet.{module}", torch.zeros(32, 32))
    assert torch.allclose(got, (0.25 * up.double() @ down.double()), atol=1e-6)
