"""A tiny Z-Image pipeline from diffusers' and transformers' own classes at test width: the
transformer with two blocks and one refiner of each kind, a two-layer Qwen3 with a byte-level
tokenizer and a chat template built offline, FLUX.1's VAE kind at two levels (it downsamples 2×,
not 8×, as diffusers' own tiny Z-Image pipeline does), and Base's scheduler (fixed shift 6)."""
from __future__ import annotations

import torch

# Qwen3's chat template, reduced to what ZImagePipeline uses: user turns, the generation prompt,
# and the empty thinking block that enable_thinking=False adds (the real template's behaviour)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
SPECIAL = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


def tiny_qwen3(width: int = 32):
    """A Qwen3 encoder and a byte-level BPE tokenizer with no merges (every string tokenizes byte by
    byte), Qwen's special tokens and the chat template above."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    vocab = {symbol: index for index, symbol in enumerate(byte_symbols())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=128)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=width // 2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer, Qwen3Model(config)


def byte_symbols() -> list[str]:
    """Byte-level BPE's alphabet (GPT-2's, which Qwen's tokenizer shares): printable bytes stand for
    themselves, the others are shifted past 255, so every byte of every string has a symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def build_tiny_zimage_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_qwen3(32)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64])  # room for a 512-token prompt
    with torch.no_grad():  # diffusers leaves the pad tokens uninitialised (torch.empty): fix them
        transformer.x_pad_token.copy_(0.02 * torch.randn_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(0.02 * torch.randn_like(transformer.cap_pad_token))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=False, shift=6.0)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
