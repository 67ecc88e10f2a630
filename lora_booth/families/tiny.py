"""The built-in test base models: tiny Stable Diffusion 1.x and SDXL pipelines built from configs
with seeded random weights, so they run offline in seconds. It teaches nothing about
images; it exercises every real code path (the same diffusers/transformers classes as SD 1.5)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..io import atomic
from ..io.errors import DataError
from .tiny_flux2 import TINY_FLUX2_NAME, build_tiny_flux2_pipeline
from .tiny_qwenimage import TINY_QWENIMAGE_NAME, build_tiny_qwenimage_pipeline
from .tiny_zimage import build_tiny_zimage_pipeline

TINY_NAME = "tiny"
TINY_SDXL_NAME = "tiny-sdxl"
TINY_FLUX_NAME = "tiny-flux"
TINY_ZIMAGE_NAME = "tiny-zimage"
TINY_NAMES = (TINY_NAME, TINY_SDXL_NAME, TINY_FLUX_NAME, TINY_FLUX2_NAME, TINY_ZIMAGE_NAME, TINY_QWENIMAGE_NAME)
TINY_VERSION = 1  # bump when an architecture below changes, so old caches are not reused


def cache_root() -> Path:
    base = os.environ.get("LORA_BOOTH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-booth")
    return Path(base)


def usable_cache_root() -> Path:
    """cache_root(), created if need be. A container user often has a HOME that does not exist or
    cannot be written: say which folder failed and how to choose another, not just "no such file"."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable", str(root))
    except OSError as exc:
        chosen = "LORA_BOOTH_CACHE" if os.environ.get("LORA_BOOTH_CACHE") else \
            "XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else f"HOME={os.environ.get('HOME', '(unset)')}"
        raise DataError(f"lora-booth's cache folder {root} (from {chosen}) cannot be used ({exc.strerror or exc}). "
                        "It keeps class images and built models between runs. Point LORA_BOOTH_CACHE at a writable "
                        "folder, e.g. LORA_BOOTH_CACHE=/tmp/lora-booth-cache, or set HOME to an existing one") from None
    return root


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final: every string tokenizes
    (character by character), with no merges to learn."""
    # GPT-2/CLIP byte encoding: printable bytes stand for themselves, the rest are shifted past 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    symbols = [chr(c) for c in printable + shifted]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer_and_text_config(width: int = 32):
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return tokenizer, text_config


def _tiny_vae(scaling_factor: float = 0.18215, force_upcast: bool = False, **flux):
    from diffusers import AutoencoderKL

    # Three blocks: the VAE downsamples by 4, so the demo's 64 px photos become 16×16 latents.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=flux.get("latent_channels", 4),
        block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=32, sample_size=64,
        scaling_factor=scaling_factor, force_upcast=force_upcast, shift_factor=flux.get("shift_factor"),
        use_quant_conv=not flux, use_post_quant_conv=not flux)


def _sd_scheduler():
    from diffusers import DDPMScheduler

    # SD's own scheduler settings; steps_offset=1 as in SD's config, or diffusers warns on every load.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, steps_offset=1)


def build_tiny_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, text_config = _tokenizer_and_text_config()
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    return StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl_pipeline(seed: int = 0):
    """SDXL's shape in miniature: two text encoders (the second with a projection, whose pooled
    output and the six size/crop numbers condition the UNet), penultimate hidden states
    concatenated, a first down block without attention, two resnets per block as in SDXL (so
    the original UNet's block numbering — kohya's SDXL names — matches the real model's)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, text_config = _tokenizer_and_text_config(32)
    tokenizer_2, text_config_2 = _tokenizer_and_text_config(32)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=text_config.hidden_size + text_config_2.hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_config_2.projection_dim, norm_num_groups=32)
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025, force_upcast=True), text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config_2), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True)


def _tiny_t5(width: int = 32):
    """A T5 encoder and its tokenizer, built offline: a unigram vocabulary of single characters
    (each also in its word-initial "▁" form), so every ASCII prompt tokenizes, with T5's ids for
    padding (0) and the end of a sequence (1)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    characters = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + \
        [(c, -2.0) for c in characters] + [("▁" + c, -1.5) for c in characters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=32)  # FLUX.1-dev: 512
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config)


def build_tiny_flux_pipeline(seed: int = 0):
    """FLUX.1-dev's shape in miniature: one double-stream and one single-stream block, the guidance
    embedding of dev, CLIP-L's pooled output and T5's hidden states as conditioning, a 16-channel
    VAE with Flux's scale and shift (no quant convs), latents packed 2×2 into 64-wide tokens, and
    the flow-matching scheduler with dev's resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, text_config = _tokenizer_and_text_config(32)
    tokenizer_2, text_encoder_2 = _tiny_t5(32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=text_config.hidden_size,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=_tiny_vae(0.3611, latent_channels=16, shift_factor=0.1159),
                        text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


TINY_BUILDERS = {TINY_NAME: build_tiny_pipeline, TINY_SDXL_NAME: build_tiny_sdxl_pipeline,
                 TINY_FLUX_NAME: build_tiny_flux_pipeline, TINY_FLUX2_NAME: build_tiny_flux2_pipeline,
                 TINY_ZIMAGE_NAME: build_tiny_zimage_pipeline, TINY_QWENIMAGE_NAME: build_tiny_qwenimage_pipeline}


def tiny_model_dir(name: str = TINY_NAME) -> Path:
    """A tiny pipeline as a diffusers folder, built once per machine and reused."""
    target = usable_cache_root() / "models" / f"{name}-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    atomic.sweep_stale(target.parent)
    staging = atomic.temporary_dir(target)
    try:
        TINY_BUILDERS[name]().save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(target)
        except OSError:  # another process built it first: theirs is as good as ours
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
