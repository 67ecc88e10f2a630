"""Build the tiny Stable-Diffusion-architecture pipeline of the toy world from configs (no hub).

The parts are the real diffusers/transformers classes a full SD 1.x checkpoint uses
(AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel, DDPMScheduler), only tiny:
32 px images, an 8x8x4 latent (VAE downsamples by 4), a 2-layer 64-wide text encoder and a
two-level UNet. So everything lora-booth does to SD 1.5 it can do to this model, in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Longest prompt we expect: "a photo of sks striped star on a white background with dots" is
# 12 words; with BOS/EOS and some slack 20 positions are plenty (and keep attention cheap).
MAX_LENGTH = 20
LATENT_SIZE = world.IMAGE_SIZE // 4

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),  # three levels: 32 px -> 8 px latents
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=world.IMAGE_SIZE,
    # Replaced by 1/std of the trained VAE's latents when the pretraining has measured it.
    scaling_factor=1.0,
)

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=64,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    # Three levels (8x8 -> 4x4 -> 2x2) with narrow channels: measured on one CPU thread at batch 64,
    # this 1.8 M-parameter UNet trains at ~0.25 s/step, a (64, 128) two-level one at ~0.6 s/step.
    # Cross-attention on every level: at these sizes attention is cheap, and every level that sees
    # the prompt helps it learn to follow it (and gives LoRA more to adapt).
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads (head size 8..16)
    norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    # SD 1.x's own schedule (scaled_linear 0.00085..0.012, 1000 steps, steps_offset=1).
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    # v-prediction: at 8x8 latents the coarse layout (which shape, where) is decided at high
    # noise, where epsilon-prediction gives a weak signal about the image; v keeps it informative.
    prediction_type="v_prediction",
)


def build_tokenizer() -> CLIPTokenizer:
    """A word-level CLIP tokenizer: every word of the world (and the trigger words) is one token.

    The vocabulary and merges come from a `tokenizers` BPE trained on the word list with CLIP's
    pre-tokenisation, because BPE applies merges by global rank: hand-written merge chains break.
    Letters stay in the vocabulary, so unknown words still tokenize (character by character).
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    backend = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,  # an upper bound: training stops when every word is a single token
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=letters,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        show_progress=False,
    )
    backend.train_from_iterator(world.vocabulary() + letters, trainer=trainer)
    return CLIPTokenizer(vocab=backend.get_vocab(), merges=_merges_of(backend), model_max_length=MAX_LENGTH)


def _merges_of(backend: Tokenizer) -> list[tuple[str, str]]:
    """The trained merges, in rank order, read from the tokenizer's JSON (the stable public view)."""
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def build_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised toy pipeline (the pretraining starts from this)."""
    tokenizer = build_tokenizer()
    return assemble_pipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        unet=build_unet(seed + 2),
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    """Wrap the parts into an SD pipeline without safety checker (there is nothing to check)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# Components whose weights are stored in fp16 to fit the 10 MB package budget. diffusers upcasts
# fp16 weights to fp32 when a model is loaded without a dtype, so a plain `from_pretrained(folder)`
# still yields an all-fp32 pipeline. The text encoder stays fp32 on disk: transformers keeps the
# stored dtype, and an fp16 text encoder next to an fp32 UNet breaks the pipeline.
FP16_COMPONENTS = ("unet", "vae")


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` with safetensors, UNet and VAE weights stored in fp16; returns the folder."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for component in FP16_COMPONENTS:
        for weights in (folder / component).glob("*.safetensors"):
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
            save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def load_pipeline(folder: str | os.PathLike) -> StableDiffusionPipeline:
    """Load a saved toy pipeline strictly from disk (never touches a hub)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def safetensors_bytes(folder: str | os.PathLike) -> int:
    """Total size of the weight files in a saved pipeline (the package budget is 10 MB)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
