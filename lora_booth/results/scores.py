"""The DreamBooth paper's scores on embeddings (Ruiz et al. 2023, §4.1), free of any model.

Every function takes (N, D) embeddings (DINO CLS tokens, CLIP image or text embeddings) and
returns a float. Cosine similarity throughout; embeddings need not be normalised."""
from __future__ import annotations

import torch


def unit(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1, in float64 so that identical inputs give exactly 1.0."""
    embeddings = embeddings.detach().to(torch.float64)
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_cross_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine over every (generated, real) pair: the paper's DINO and CLIP-I subject fidelity."""
    return float((unit(generated) @ unit(real).T).mean())


def mean_paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of row i of a with row i of b: CLIP-T (image i, its prompt i), or an image
    with the adapter against the same seed's image without it."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((unit(a) * unit(b)).sum(dim=-1).mean())


def mean_pairwise_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine over distinct pairs within one set (the real photos' self-similarity: the paper's
    "real images" row, a reference level for DINO and CLIP-I)."""
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError("pairwise scores need at least 2 embeddings")
    cosines = unit(embeddings) @ unit(embeddings).T
    off_diagonal = cosines.sum() - cosines.diagonal().sum()
    return float(off_diagonal / (count * (count - 1)))


def diversity(embeddings: torch.Tensor) -> float:
    """Mean cosine distance (1 − cosine) over distinct pairs: 0 when every image is the same.
    The paper measures diversity with LPIPS; this uses DINO features instead (no extra model)."""
    return 1.0 - mean_pairwise_similarity(embeddings)


def prior_drift(with_adapter: torch.Tensor, without_adapter: torch.Tensor) -> float:
    """1 − mean paired cosine between class-prompt images drawn with and without the adapter from
    the same seeds: 0 when the adapter leaves the class alone (no language drift)."""
    return 1.0 - mean_paired_similarity(with_adapter, without_adapter)


SCORE_NAMES = ("DINO", "CLIP-I", "CLIP-T", "real_DINO", "prior_drift", "class_diversity", "base_class_diversity")
MEANINGS = {
    "DINO": "subject fidelity: DINO cosine, generated vs real photos (higher = more like the subject)",
    "CLIP-I": "subject fidelity: CLIP image cosine, generated vs real photos",
    "CLIP-T": "prompt fidelity: CLIP cosine of each image with its prompt (trigger token removed)",
    "real_DINO": "DINO cosine among the real photos themselves: a reference level for DINO",
    "prior_drift": "1 - DINO cosine of class-prompt images with vs without the adapter, same seeds (0 = no drift)",
    "class_diversity": "mean pairwise DINO distance of class-prompt images with the adapter (higher = more varied)",
    "base_class_diversity": "the same for the base model without the adapter",
}


def describe_score(name: str) -> str:
    return MEANINGS.get(name, "")
