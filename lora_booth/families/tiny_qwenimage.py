"""A tiny Qwen-Image pipeline built offline: the same diffusers and transformers classes as
Qwen/Qwen-Image (QwenImageTransformer2DModel, AutoencoderKLQwenImage, Qwen2.5-VL, Qwen2Tokenizer,
the flow-matching scheduler with Qwen-Image's own settings), at a width that runs in seconds."""
from __future__ import annotations

import torch

TINY_QWENIMAGE_NAME = "tiny-qwenimage"

# the special tokens the pipeline's prompt template and the encoder's config name
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2's chat format, so apply_chat_template works on the tiny tokenizer as on the real one
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen-Image's scheduler_config.json: dynamic, resolution-dependent shift (exponential), no fixed shift
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def tiny_qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer without merges: every string tokenizes, byte by byte, and
    the template's special tokens are single tokens, as in Qwen's own vocabulary."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}  # Qwen2's byte alphabet
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen_vl(tokenizer, width: int = 16):
    """Qwen2.5-VL at tiny width; the vision tower is there (the pipeline class expects the whole
    model) but only the text path runs."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=width, intermediate_size=width, num_heads=2, out_hidden_size=width),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwenimage_pipeline(seed: int = 0):
    """Qwen-Image's shape in miniature: two dual-stream MMDiT blocks over latents packed 2×2, a 3-D
    VAE (one frame) with per-channel latent statistics, Qwen2.5-VL's last hidden states as text."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = tiny_qwen_vl(tokenizer, 16)
    channels = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * channels, out_channels=channels, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    generator = torch.Generator().manual_seed(seed + 1)
    # non-trivial statistics, so a codec that forgets them (or inverts them) is seen
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=channels, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=(torch.randn(channels, generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(channels, generator=generator) + 0.5).tolist())
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
