"""Model families, one module each. What a family is lives there and nowhere else: its pipeline
and how its folders and single files show it, its text encoders and how a prompt becomes
conditioning, what its denoiser takes besides the noisy latents, the configs the planner builds
from, and a few words for the start summary and the model card. The recipe, planner, sampler and
model card ask `family(name)` instead of branching on the name."""
from __future__ import annotations

from .base import Family
from .flux import FLUX
from .flux2 import FLUX2
from .qwenimage import QWENIMAGE
from .sd import SD1, SD2
from .sdxl import SDXL
from .zimage import ZIMAGE

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, FLUX, FLUX2, ZIMAGE, QWENIMAGE)}
TRAINED = ("Stable Diffusion 1.x/2.x, SDXL, FLUX.1, FLUX.2 klein, Z-Image or Qwen-Image text-to-image")  # in words
# detection order: the first family that claims a folder or a file is its family
DETECTION_ORDER = (ZIMAGE, FLUX, QWENIMAGE, SDXL, SD2, SD1, FLUX2)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"no model family {name!r}; lora-booth knows {', '.join(FAMILIES)}") from None


def pipelines() -> tuple[str, ...]:
    """Every diffusers pipeline class some family trains."""
    return tuple(name for f in FAMILIES.values() for name in f.pipelines)


def for_folder(index: dict, denoiser_config: dict) -> Family | None:
    """The family of a diffusers folder from its model_index.json and denoiser config."""
    return next((f for f in DETECTION_ORDER if f.claims_folder(index, denoiser_config)), None)


def for_single_file(keys: set[str]) -> Family | None:
    """The family of an original-layout checkpoint from its tensor names."""
    return next((f for f in DETECTION_ORDER if f.claims_single_file(keys)), None)


def get(name: str) -> Family | None:
    """The family of that name, or None (test-sized models record none lora-booth knows)."""
    return FAMILIES.get(name)


def for_adapter(parts: set[str], text_width: int | None, paths=(), named: str = "") -> Family | None:
    """The family an adapter fits, from its parts and the text width its UNet cross-attends to.
    Families that name their denoiser alike (`transformer`) tell by the module `paths`; where those
    fit several, the family the file names (`named`) if it is one of them, else None."""
    fitting = [f for f in DETECTION_ORDER if f.denoiser != "unet" and f.denoiser in parts and f.adapter_paths_fit(paths)]
    if fitting:
        return fitting[0] if len(fitting) == 1 else next((f for f in fitting if f.name == named), None)
    for family in DETECTION_ORDER:
        trainable = family.trainable_text_parts()
        if len(trainable) > 1 and trainable[-1] in parts:  # only it trains that encoder (SDXL's bigG)
            return family
    return next((f for f in DETECTION_ORDER if f.text_width == text_width), None)


def for_adapter_modules(paths: list[str]) -> Family | None:
    """The family whose own module names an adapter's denoiser paths use, or None."""
    return next((f for f in DETECTION_ORDER if f.claims_adapter_modules(paths)), None)


def read_family_kohya(tensors, metadata: dict):
    """(family, diffusers tensors, alphas) of a kohya file in a family's own layout, or None."""
    for family in DETECTION_ORDER:
        read = family.read_kohya(tensors, metadata)
        if read is not None:
            return (family, *read)
    return None


def for_preset(name: str) -> Family | None:
    """The family a card preset was written for, by its name (24gb, sdxl-24gb, flux-24gb: the
    family's preset_prefix and the card's size), or None for a preset of no card (demo)."""
    import re

    if not re.fullmatch(r"[a-z0-9-]*?\d+gb", name):
        return None
    return max((f for f in FAMILIES.values() if name.startswith(f.preset_prefix)),
               key=lambda f: len(f.preset_prefix), default=None)


def kohya_read_prefixes() -> dict[str, str]:
    """Every kohya module-name prefix any family writes → the part it names."""
    return {"lora_unet_": "unet", **{prefix: part for f in FAMILIES.values() for part, prefix in f.kohya_text_prefixes}}


def for_text_encoders(encoders: dict) -> Family:
    """The family whose text side these (tokenizer, encoder) parts are."""
    parts = tuple(encoders)
    classes = tuple(type(getattr(encoder, "module", encoder)).__name__ for _, encoder in encoders.values())  # DDP: .module
    return next(f for f in DETECTION_ORDER if f.text_parts == parts and f.text_encoder_classes == classes)


def denoisers() -> tuple[str, ...]:
    """Every denoiser attribute any family trains (unet, transformer)."""
    return tuple(dict.fromkeys(f.denoiser for f in FAMILIES.values()))


def text_parts() -> tuple[str, ...]:
    """Every text-encoder attribute any family has, in order (text_encoder, text_encoder_2)."""
    return tuple(dict.fromkeys(part for f in FAMILIES.values() for part in f.text_parts))


__all__ = ["Family", "FAMILIES", "FLUX", "FLUX2", "QWENIMAGE", "SD1", "SD2", "SDXL", "ZIMAGE", "denoisers", "family", "for_adapter", "for_folder", "for_preset", "for_single_file",
           "for_text_encoders", "get", "kohya_read_prefixes", "pipelines", "text_parts"]
