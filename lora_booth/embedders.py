"""The evaluators' models: DINO ViT-S/16 (CLS token) and CLIP ViT-B/32 (image and text
embeddings), loaded from a hub id or a local folder. Safetensors only, never remote code.
Preprocessing is the models' own image processors (PIL/NumPy; torchvision is not needed)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .errors import ModelError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
BATCH = 16


def _missing(kind: str, source: str, key: str, exc: Exception) -> ModelError:
    return ModelError(
        f"cannot load the {kind} model {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        f"It must be a folder with config.json and model.safetensors, or a hub id in the local hub cache. "
        f"On a machine with internet: `hf download {source if '/' in source else DEFAULT_CLIP}`, "
        f"then copy the folder here and pass {key}=/path/to/folder.")


def _load(kind: str, source: str, key: str, load):
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"{key}={source}: no config.json in that folder. Point it at a saved {kind} model folder.")
    from .models import hub_unreachable

    try:
        if local.exists():
            return load(str(local), {})
        return load(source, {"local_files_only": True} if hub_unreachable() else {})  # offline: the cache at once
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _missing(kind, source, key, exc) from None


class Embedders:
    """Embeds lists of PIL images (DINO, CLIP image) and of prompts (CLIP text)."""

    def __init__(self, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO, device: torch.device | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.device = device or torch.device("cpu")
        options = {"use_safetensors": True, "trust_remote_code": False}
        self.clip = _load("CLIP", clip, "clip", lambda s, o: CLIPModel.from_pretrained(s, **options, **o)
                          ).to(self.device).eval()
        self.clip_images = _load("CLIP", clip, "clip", lambda s, o: AutoImageProcessor.from_pretrained(s, **o))
        self.clip_tokens = _load("CLIP", clip, "clip", lambda s, o: AutoTokenizer.from_pretrained(s, **o))
        # the CLS token of the last layer, as the paper uses it; no pooler (DINO checkpoints have none)
        self.dino = _load("DINO", dino, "dino", lambda s, o: ViTModel.from_pretrained(
            s, add_pooling_layer=False, **options, **o)).to(self.device).eval()
        self.dino_images = _load("DINO", dino, "dino", lambda s, o: AutoImageProcessor.from_pretrained(s, **o))

    def _batches(self, items: list):
        for start in range(0, len(items), BATCH):
            yield items[start:start + BATCH]

    @torch.no_grad()
    def dino_embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) DINO CLS embeddings."""
        parts = []
        for chunk in self._batches(images):
            pixels = self.dino_images(images=[i.convert("RGB") for i in chunk], return_tensors="pt")["pixel_values"]
            parts.append(self.dino(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0].float().cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def clip_image_embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, P) CLIP image embeddings (after the projection, as CLIP compares them with text)."""
        parts = []
        for chunk in self._batches(images):
            pixels = self.clip_images(images=[i.convert("RGB") for i in chunk], return_tensors="pt")["pixel_values"]
            parts.append(_features(self.clip.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.cat(parts)

    @torch.no_grad()
    def clip_text_embed(self, prompts: list[str]) -> torch.Tensor:
        """(N, P) CLIP text embeddings."""
        parts = []
        for chunk in self._batches(prompts):
            tokens = self.clip_tokens(chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            parts.append(_features(self.clip.get_text_features(input_ids=tokens["input_ids"],
                                                               attention_mask=tokens["attention_mask"])))
        return torch.cat(parts)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected tensor; 5 may wrap it in an output object."""
    if isinstance(output, torch.Tensor):
        return output.float().cpu()
    return output.pooler_output.float().cpu()
