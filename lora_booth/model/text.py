"""Prompts → what the denoiser is conditioned on: the text encoders' hidden states it
cross-attends to, and a pooled embedding where the family has one (families/*.py say how)."""
from __future__ import annotations

import torch

from .. import families
from ..families.base import CLIP_TOKENS
from ..families.conditioning import Conditioning


def token_ids(tokenizer, prompts: list[str], length: int | None = None) -> torch.Tensor:
    """Each prompt padded or cut to `length` tokens (default: the tokenizer's own, at most CLIP's 77)."""
    length = length or min(int(tokenizer.model_max_length), CLIP_TOKENS)
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


class TextEncoders(dict):
    """(tokenizer, encoder) by part name, knowing whose they are: families that share an encoder
    class (Qwen3) differ in how they read it."""

    def __init__(self, parts: dict, family) -> None:
        super().__init__(parts)
        self.family = family


def token_lengths(encoders: dict, variant: str = "") -> list[int]:
    """Tokens per prompt of each encoder, as the family (and its member: FLUX.1-schnell's T5 reads
    256) says: the same lengths the sampling pipeline is given (Family.pipeline_kwargs)."""
    family = family_of(encoders)
    return [family.token_length(part, tokenizer, variant) for part, (tokenizer, _) in encoders.items()]


def encode_prompts(encoders: dict, prompts: list[str], device: torch.device, variant: str = "") -> Conditioning:
    """The conditioning the pipelines compute for `prompts`. `encoders` maps part names to
    (tokenizer, encoder), as `Base.text_encoders` gives them; their family says how, and `variant`
    (Base.variant) which member of it."""
    family = family_of(encoders)
    lengths = token_lengths(encoders, variant)
    ids, masks = [], []
    for (part, (tokenizer, _)), length in zip(encoders.items(), lengths):
        part_ids, part_mask = family.tokenize(part, tokenizer, prompts, length)
        ids.append(part_ids.to(device))
        masks.append(None if part_mask is None else part_mask.to(device))
    return encode_ids([encoder for _, encoder in encoders.values()], ids, family, masks)


def encode_ids(encoders: list, ids: list[torch.Tensor], family, masks: list | None = None) -> Conditioning:
    """From each encoder's token ids (and attention masks, where the family reads them), as the
    family's pipeline computes it (families/*.py). The planner traces this same function."""
    return family.encode(encoders, ids, masks or [None] * len(ids))


def family_of(encoders: dict):
    known = getattr(encoders, "family", None)
    return known if known is not None else families.for_text_encoders(encoders)


def unconditional(conditioning: Conditioning, dropped: torch.Tensor | None, zeros: bool) -> Conditioning:
    """Rows whose caption was dropped get what the pipeline feeds classifier-free guidance's
    unconditional branch, so dropout trains that very branch. Most pipelines encode the empty
    prompt (the rows already hold it); those with `force_zeros_for_empty_prompt` use zero hidden
    states and a zero pooled embedding instead (`zeros`), so those rows are zeroed."""
    if not zeros or dropped is None or not bool(dropped.any()):
        return conditioning
    keep = ~dropped.to(conditioning.hidden.device)
    hidden = conditioning.hidden * keep.view(-1, 1, 1).to(conditioning.hidden.dtype)
    pooled = None if conditioning.pooled is None else \
        conditioning.pooled * keep.view(-1, 1).to(conditioning.pooled.dtype)
    return Conditioning(hidden, pooled, conditioning.mask)


def caches_prompts(cfg) -> bool:
    """Prompt embeddings can be computed once only while nothing in the text encoders trains
    (neither adapters nor pivotal token embeddings)."""
    return cfg.train.cache_text_embeddings and not cfg.lora.text_encoder and not cfg.pivotal.enabled


def truncated(tokenizer, prompt: str) -> bool:
    """True when the prompt does not fit the encoder's 77 tokens and its end would be ignored."""
    return len(tokenizer(prompt).input_ids) > tokenizer.model_max_length


class PromptCache:
    """Each distinct prompt encoded once by the frozen text encoder(s), kept on the CPU."""

    def __init__(self, encoders: dict, prompts: list[str], device: torch.device, variant: str = "") -> None:
        self.hidden: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor] = {}
        distinct = sorted(set(prompts))
        with torch.no_grad():
            for start in range(0, len(distinct), 16):
                chunk = distinct[start:start + 16]
                encoded = encode_prompts(encoders, chunk, device, variant)
                self.hidden.update(zip(chunk, encoded.hidden.cpu()))
                if encoded.pooled is not None:
                    self.pooled.update(zip(chunk, encoded.pooled.cpu()))
                if encoded.mask is not None:
                    self.mask.update(zip(chunk, encoded.mask.cpu()))

    def __call__(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> Conditioning:
        pooled = torch.stack([self.pooled[p] for p in prompts]) if self.pooled else None
        mask = torch.stack([self.mask[p] for p in prompts]) if self.mask else None
        return Conditioning(torch.stack([self.hidden[p] for p in prompts]), pooled, mask).to(device, dtype)
