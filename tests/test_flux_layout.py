"""FLUX.1 LoRA names: diffusers/peft ⇄ kohya sd-scripts' BFL layout, exact, and what diffusers'
own kohya reader makes of the files lora_booth.families.flux_layout writes."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from lora_booth.families import flux_layout
from lora_booth.families.flux_layout import FluxLayoutError, layout, to_kohya
from lora_booth.families.flux_reading import from_kohya

DOUBLE = [f"transformer_blocks.0.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear")]
SINGLE_ATTENTION = [f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")]
SINGLE_REST = ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
               "single_transformer_blocks.0.norm.linear"]
OUTSIDE = ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
           "time_text_embed.timestep_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
           "time_text_embed.text_embedder.linear_2", "norm_out.linear", "proj_out"]
CLIP = ["q_proj", "out_proj", "fc2"]  # CLIP-L's modules, whichever transformers names their level above


def tiny_transformer(width_heads=2, head_dim=16, num_layers=1, seed=0):
    """lora_booth.families.tiny's FLUX.1 transformer (one block of each kind, 2 heads × 16); with 24 × 128 it
    is FLUX.1's width, which diffusers' kohya reader needs for single blocks (it fixes linear1's rows)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = (4, 6, 6) if head_dim == 16 else (16, 56, 56)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=1,
                                  attention_head_dim=head_dim, num_attention_heads=width_heads, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=rope)


def tiny_clip(seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=99, max_position_embeddings=16))


def adapt(model, targets, seed=1, **patterns) -> LoraConfig:
    """peft LoRA (r=4, alpha=8) on `targets`, B drawn at random so that every ΔW ≠ 0."""
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets, **patterns)
    model.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return config


def peft_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def peft_alphas(tensors: dict, config: LoraConfig, part: str) -> dict[str, float]:
    """`part.<module>` → its alpha, as peft's config gives it (patterns here are full names)."""
    return {f"{part}.{k[:-len('.lora_A.weight')]}": next(
        (a for pattern, a in config.alpha_pattern.items() if k.startswith(pattern + ".")), config.lora_alpha)
        for k in tensors if k.endswith(".lora_A.weight")}


def diffusers_state(model, part: str, config: LoraConfig) -> tuple[dict, dict]:
    """The diffusers file's tensors and each module's alpha."""
    tensors = peft_tensors(model)
    return {f"{part}.{k}": v for k, v in tensors.items()}, peft_alphas(tensors, config, part)


def deltas(tensors: dict, alphas: dict) -> dict[str, torch.Tensor]:
    """module (CLIP's with its text_model. level) → ΔW = (alpha / rank) · B @ A."""
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")]
            up = tensors[module + ".lora_B.weight"]
            name = module.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")
            out[name] = alphas[module] / down.shape[0] * up.double() @ down.double()
    return out


def kohya_delta(tensors: dict, name: str) -> torch.Tensor:
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    return tensors[f"{name}.alpha"].item() / down.shape[0] * up @ down


@pytest.fixture(scope="module")
def adapted():
    """Every module kohya's FLUX.1 layout names, on the tiny transformer and CLIP-L; to_k of the
    double block at rank 2, alpha 3, so that img_attn.qkv takes the mixed-rank path."""
    transformer, clip = tiny_transformer(), tiny_clip()
    to_k = "transformer_blocks.0.attn.to_k"
    config = adapt(transformer, DOUBLE + SINGLE_ATTENTION + SINGLE_REST + OUTSIDE,
                   rank_pattern={to_k: 2}, alpha_pattern={to_k: 3})
    tensors, alphas = diffusers_state(transformer, "transformer", config)
    clip_config = adapt(clip, CLIP, seed=2)
    clip_tensors, clip_alphas = diffusers_state(clip, "text_encoder", clip_config)
    return {**tensors, **clip_tensors}, {**alphas, **clip_alphas}


def test_round_trip_gives_every_delta_back(adapted):
    tensors, alphas = adapted
    kohya = to_kohya(tensors, alphas)
    back, back_alphas = from_kohya(kohya)
    before, after = deltas(tensors, alphas), deltas(back, back_alphas)
    assert set(after) == set(before)
    for module, delta in before.items():
        assert torch.allclose(after[module], delta, atol=1e-6, rtol=0), module
    assert layout(kohya) == "kohya" and layout(back) == "diffusers"


def test_fused_modules_stack_the_parts_exactly(adapted):
    """up · down · alpha / rank of a fused kohya module = its diffusers parts' ΔW by rows (kohya
    computes the fused one, ComfyUI its row slices): qkv, and linear1 = q, k, v, proj_mlp."""
    tensors, alphas = adapted
    kohya = to_kohya(tensors, alphas)
    delta = deltas(tensors, alphas)
    double, single = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
    fused = {"lora_unet_double_blocks_0_img_attn_qkv": [f"{double}attn.to_{p}" for p in "qkv"],
             "lora_unet_double_blocks_0_txt_attn_qkv": [f"{double}attn.add_{p}_proj" for p in "qkv"],
             "lora_unet_single_blocks_0_linear1": [f"{single}attn.to_{p}" for p in "qkv"] + [f"{single}proj_mlp"]}
    for name, parts in fused.items():
        assert torch.allclose(kohya_delta(kohya, name), torch.cat([delta[p] for p in parts]), atol=1e-6, rtol=0), name
    # one rank and scale: blocks of rank 4, alpha 8 per part → rank 4·n, alpha 8·n (alpha/rank = 2 as trained)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 32)
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 32.0
    # mixed ranks (k: 2): blocks of their own rank, scales folded into up, alpha = rank
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (10, 32)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 10.0
    # final_layer.adaLN_modulation.1 holds norm_out.linear's (scale, shift) rows as (shift, scale)
    scale, shift = delta["transformer.norm_out.linear"].chunk(2)
    final = kohya_delta(kohya, "lora_unet_final_layer_adaLN_modulation_1")
    assert torch.allclose(final, torch.cat([shift, scale]), atol=1e-6, rtol=0)


def test_absent_parts_are_zero_blocks_and_read_back_absent():
    transformer = tiny_transformer()
    config = adapt(transformer, SINGLE_ATTENTION + ["transformer_blocks.0.attn.add_q_proj"])
    tensors, alphas = diffusers_state(transformer, "transformer", config)
    kohya = to_kohya(tensors, alphas)
    linear1 = kohya_delta(kohya, "lora_unet_single_blocks_0_linear1")  # (3·32 + 128, 32)
    assert linear1.shape == (224, 32) and not linear1[96:].any()
    txt_qkv = kohya_delta(kohya, "lora_unet_double_blocks_0_txt_attn_qkv")
    assert txt_qkv[:32].any() and not txt_qkv[32:].any()
    back, back_alphas = from_kohya(kohya)
    assert set(deltas(back, back_alphas)) == set(alphas)
    # a block-diagonal up splits into the trained rank-4 parts again
    assert back["transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (4, 32)


def _pipeline(transformer, clip=None):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def _transformer_output(transformer, seed=3):
    generator = torch.Generator().manual_seed(seed)
    width = transformer.config.in_channels
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 6, width, generator=generator),
                           encoder_hidden_states=torch.randn(1, 3, 32, generator=generator),
                           pooled_projections=torch.randn(1, 32, generator=generator),
                           timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                           img_ids=torch.stack([torch.zeros(6), torch.arange(6.0), torch.arange(6.0)], 1),
                           txt_ids=torch.zeros(3, 3)).sample


def _loaded_outputs(tmp_path, build, tensors, config, clip_build=None, clip_tensors=None, clip_config=None):
    """(base, diffusers file, kohya file) outputs, each file read by FluxPipeline.load_lora_weights."""
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=tensors, text_encoder_lora_layers=clip_tensors,
                                   transformer_lora_adapter_metadata=config.to_dict(),
                                   text_encoder_lora_adapter_metadata=clip_config.to_dict() if clip_config else None)
    alphas = {**peft_alphas(tensors, config, "transformer"),
              **(peft_alphas(clip_tensors, clip_config, "text_encoder") if clip_tensors else {})}
    kohya = to_kohya({**{f"transformer.{k}": v for k, v in tensors.items()},
                      **{f"text_encoder.{k}": v for k, v in (clip_tensors or {}).items()}}, alphas)
    save_file(kohya, str(tmp_path / "subject.safetensors"))
    outputs = []
    ids = torch.tensor([[0, 5, 9, 14, 2, 1]])
    for name in (None, "pytorch_lora_weights.safetensors", "subject.safetensors"):
        pipe = _pipeline(build(), clip_build() if clip_build else None)
        if name:
            pipe.load_lora_weights(str(tmp_path / name))
        with torch.no_grad():
            clip_out = pipe.text_encoder(ids).last_hidden_state if clip_build else None
        outputs.append((_transformer_output(pipe.transformer), clip_out))
    return outputs


def assert_same_output(base, from_diffusers, from_kohya_file):
    for b, d, k in zip(base, from_diffusers, from_kohya_file):
        if b is None:
            continue
        assert (d - b).norm() > 1e-2 * b.norm()          # the adapter changes the output
        assert (k - d).norm() <= 1e-5 * d.norm(), ((k - d).norm() / d.norm()).item()


def test_diffusers_reads_the_kohya_file_as_it_reads_the_diffusers_file(tmp_path):
    """The decisive check: diffusers' own kohya FLUX.1 reader, on double blocks (width-free) and
    the single block's linear2 and modulation, plus CLIP-L."""
    transformer, clip = tiny_transformer(), tiny_clip()
    config = adapt(transformer, DOUBLE + SINGLE_REST[1:])
    clip_config = adapt(clip, CLIP, seed=2)
    outputs = _loaded_outputs(tmp_path, tiny_transformer, peft_tensors(transformer), config,
                              tiny_clip, peft_tensors(clip), clip_config)
    assert_same_output(*outputs)


@pytest.mark.parametrize("targets,patterns", [
    (SINGLE_ATTENTION, {}),                                                   # proj_mlp a zero block
    (SINGLE_ATTENTION + SINGLE_REST[:1], {"rank_pattern": {"single_transformer_blocks.0.attn.to_v": 2}}),
], ids=["attention-only", "mixed-ranks-with-mlp"])
def test_diffusers_reads_linear1_at_flux_width(tmp_path, targets, patterns):
    """diffusers' reader splits linear1 at FLUX.1's rows (3072 × 3 + 12288), so this one runs a
    single block at full width (180 M parameters, no double block)."""
    def build():
        return tiny_transformer(24, 128, num_layers=0)

    transformer = build()
    config = adapt(transformer, targets, **patterns)
    tensors = peft_tensors(transformer)
    del transformer
    assert_same_output(*_loaded_outputs(tmp_path, build, tensors, config))


def test_layout_names_each_tools_keys():
    assert layout(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "kohya"
    assert layout(["lora_unet_single_blocks_3_linear1.alpha",
                   "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]) == "kohya"
    assert layout(["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]) == "comfyui"
    assert layout(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]) == "diffusers"
    assert layout(["transformer_blocks.0.attn.to_q.lora_B.weight"]) == "diffusers"       # peft's, no prefix
    assert layout(["lora_transformer_single_transformer_blocks_0_attn_to_q.alpha"]) == "onetrainer"
    assert layout(["double_blocks.0.processor.qkv_lora1.down.weight"]) == "xlabs"
    assert layout(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) is None  # SD
    assert layout(["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]) is None


def test_comfyui_spelling_reads_as_kohya(adapted):
    """ComfyUI's LoRA-saving nodes write the BFL names with dots under `diffusion_model.`."""
    tensors, alphas = adapted
    kohya = to_kohya(tensors, alphas)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    comfy = {key.replace(name, "diffusion_model.double_blocks.0.img_attn.qkv"): value
             for key, value in kohya.items() if key.startswith(name + ".")}
    assert layout(comfy) == "comfyui"
    back, back_alphas = from_kohya(comfy)
    assert set(back_alphas) == {f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"}
    same = from_kohya({key: value for key, value in kohya.items() if key.startswith(name + ".")})[0]
    assert all(torch.equal(back[key], value) for key, value in same.items())


def test_original_and_kohya_names():
    assert flux_layout.original_name("single_transformer_blocks.7.proj_mlp") == ("single_blocks.7.linear1", 3)
    assert flux_layout.original_name("transformer_blocks.2.attn.add_k_proj") == ("double_blocks.2.txt_attn.qkv", 1)
    assert flux_layout.kohya_name("transformer", "norm_out.linear") == "lora_unet_final_layer_adaLN_modulation_1"
    assert flux_layout.kohya_name("text_encoder", "text_model.encoder.layers.11.self_attn.out_proj") == \
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj"


def _file(rank=4, width=32, name="lora_unet_double_blocks_0_img_attn_qkv", rows=None):
    return {f"{name}.lora_down.weight": torch.randn(rank, width),
            f"{name}.lora_up.weight": torch.randn(rows or 3 * width, rank), f"{name}.alpha": torch.tensor(4.0)}


QKV = "lora_unet_double_blocks_0_img_attn_qkv"
MALFORMED = {
    "unknown module": ({**_file(name="lora_unet_double_blocks_0_img_attn_qkvv")}, "img_attn_qkvv"),
    "diffusers names in kohya's prefix": (_file(name="lora_unet_transformer_blocks_0_attn_to_q", rows=32),
                                         "lora_unet_transformer_blocks_0_attn_to_q"),
    "LoHa": ({**_file(), f"{QKV}.hada_w1_a": torch.randn(4, 4)}, "hada_w1_a"),
    "up missing": ({k: v for k, v in _file().items() if "up" not in k}, QKV),
    "3-D down": ({**_file(), f"{QKV}.lora_down.weight": torch.randn(4, 32, 1)}, QKV),
    "ranks disagree": ({**_file(), f"{QKV}.lora_up.weight": torch.randn(96, 5)}, QKV),
    "qkv rows not 3 × width": (_file(rows=95), QKV),
    "rank past both widths": (_file(rank=200, rows=96), QKV),
    "alpha NaN": ({**_file(), f"{QKV}.alpha": torch.tensor(float("nan"))}, f"{QKV}.alpha"),
    "alpha 0": ({**_file(), f"{QKV}.alpha": torch.tensor(0.0)}, f"{QKV}.alpha"),
    "alpha a vector": ({**_file(), f"{QKV}.alpha": torch.ones(3)}, f"{QKV}.alpha"),
    "integer weights": ({**_file(), f"{QKV}.lora_down.weight": torch.ones(4, 32, dtype=torch.int64)}, QKV),
    "huge block index": (_file(name="lora_unet_double_blocks_123456789012345_img_attn_qkv"), "123456789012345"),
    "T5": (_file(name="lora_te3_encoder_block_0_layer_0_SelfAttention_q", rows=96), "lora_te3_"),
    "widths disagree": ({**_file(), **_file(width=48, name="lora_unet_single_blocks_0_modulation_lin", rows=144)},
                        "lora_unet_"),
    "comfy and kohya spelling of one module": (
        {**_file(), "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.0)}, "appears twice"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_kohya_files_are_refused(case):
    tensors, named = MALFORMED[case]
    with pytest.raises(FluxLayoutError) as error:
        from_kohya(tensors)
    assert named in str(error.value) and isinstance(error.value, ValueError)


def test_config_bounds_blocks_and_widths():
    config = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
    from_kohya(_file(), config)
    with pytest.raises(FluxLayoutError, match="block 1, while the model has 1"):
        from_kohya(_file(name="lora_unet_double_blocks_1_img_attn_qkv"), config)
    with pytest.raises(FluxLayoutError, match="32-wide"):
        from_kohya(_file(width=48, rows=144), config)


@pytest.mark.parametrize("tensors,named", [
    ({"transformer.transformer_blocks.0.attn.to_qq.lora_A.weight": torch.randn(4, 32),
      "transformer.transformer_blocks.0.attn.to_qq.lora_B.weight": torch.randn(32, 4)}, "to_qq"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32)}, "without its partner"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
      "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(40, 4)}, "has 40 outputs"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.randn(32)}, "lora_magnitude_vector"),
    ({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.randn(4, 32)}, "unet.down_blocks"),
], ids=["unknown module", "A without B", "q wider than the block", "DoRA", "an SD file"])
def test_malformed_diffusers_state_dicts_are_refused(tensors, named):
    with pytest.raises(FluxLayoutError) as error:
        to_kohya(tensors)
    assert named in str(error.value)
