"""A tiny FLUX.2 klein base pipeline built from diffusers' and transformers' own classes at toy
width, offline: the test model of the flux2 family (model=tiny-flux2)."""
from __future__ import annotations

import torch

TINY_FLUX2_NAME = "tiny-flux2"

# Qwen3's chat template as Flux2KleinPipeline uses it: one user turn, the assistant's turn opened,
# and with thinking off an empty think block, as Qwen3's own template writes it
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                 "{% endif %}{% endif %}")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def qwen_tokenizer(max_tokens: int = 64):
    """A byte-level BPE tokenizer of Qwen's class without merges (every string tokenizes, byte by
    byte), with Qwen's chat tokens and template: no files, no hub."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(c) for c in printable + [256 + n for n in range(256 - len(printable))]]
    vocab = {token: index for index, token in enumerate([*symbols, *SPECIAL])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL[1:]], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3(width: int = 16, layers: int = 28, max_tokens: int = 64):
    """A Qwen3 causal LM with enough layers for the pipeline's (9, 18, 27), and qwen_tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer(max_tokens)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer, Qwen3ForCausalLM(config)


def build_tiny_flux2_pipeline(seed: int = 0):
    """FLUX.2 klein base in miniature: one block of each kind (2 heads × 16, rotary axes 4 × 4),
    no guidance embedding, conditioned on three stacked Qwen3 layers; an AutoencoderKLFlux2 of 8
    latent channels downsampling 4× whose batch-norm statistics are drawn away from (0, 1), so
    the normalisation is exercised; klein's flow-matching scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_qwen3()
    latent_channels = 8
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_encoder.config.hidden_size, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=32, sample_size=64, use_quant_conv=True,
        use_post_quant_conv=True)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
