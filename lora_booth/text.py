"""Prompts → the text encoder's hidden states that the UNet cross-attends to."""
from __future__ import annotations

import torch


def encode_prompts(text_encoder, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(B, 77, D) last hidden states, as the Stable Diffusion pipelines compute them."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(device))[0]


def caches_prompts(cfg) -> bool:
    """Prompt embeddings can be computed once only while nothing in the text encoders trains
    (neither adapters nor pivotal token embeddings)."""
    return cfg.train.cache_text_embeddings and not cfg.lora.text_encoder and not cfg.pivotal.enabled


def truncated(tokenizer, prompt: str) -> bool:
    """True when the prompt does not fit the encoder's 77 tokens and its end would be ignored."""
    return len(tokenizer(prompt).input_ids) > tokenizer.model_max_length


class PromptCache:
    """Each distinct prompt encoded once by the frozen text encoder, kept on the CPU."""

    def __init__(self, text_encoder, tokenizer, prompts: list[str], device: torch.device) -> None:
        self.embeddings: dict[str, torch.Tensor] = {}
        distinct = sorted(set(prompts))
        with torch.no_grad():
            for start in range(0, len(distinct), 16):
                chunk = distinct[start:start + 16]
                hidden = encode_prompts(text_encoder, tokenizer, chunk, device).cpu()
                self.embeddings.update(zip(chunk, hidden))

    def __call__(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([self.embeddings[p] for p in prompts]).to(device, dtype)
