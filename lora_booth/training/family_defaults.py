"""Settings whose right value depends on the model family: the guidance and sampler steps of
class images and sample grids (the resolution is the base's own: preparation.settle_resolution). SD's 7.5 is classifier-free guidance; FLUX.1-dev
takes the guidance it was distilled from as an input, where 7.5 is far from its 3.5, and schnell
samples in 4 steps without one. Each such key the user did not set (on the command line, in a
config file or through a preset) takes the family's value once the base model is known, and the
start summary says where every one of them came from."""
from __future__ import annotations

from .. import families
from ..config.sections import Config
from ..model import loading as models

KEYS = ("prior.guidance_scale", "prior.sample_steps", "sample.guidance_scale", "sample.steps")


def apply(cfg: Config, family, variant: str = "") -> dict[str, str]:
    """Set each key of KEYS that no layer set (config.resolve records the layers in cfg.origins) to
    the family's value. Returns key → where its value came from: a layer's name (the command line,
    preset flux-24gb, a file) or the family's default. A Config built without resolve keeps its values."""
    given = getattr(cfg, "origins", None)
    values = family.run_defaults(variant)
    member = f"{family.title}-{variant}" if variant else family.title
    origins = {}
    for key in KEYS:
        section, name = key.split(".", 1)
        if given is None:
            origins[key] = "set"
        elif key in given:
            origins[key] = given[key]
        else:
            setattr(getattr(cfg, section), name, values[key])
            origins[key] = f"{member}'s default"
    return origins


def summary(cfg: Config, origins: dict[str, str]) -> str:
    """The start summary's line: each family-dependent value and where it came from."""
    def value(key: str) -> str:
        section, name = key.split(".", 1)
        return f"{getattr(getattr(cfg, section), name):g}"
    return ", ".join(f"{key} {value(key)} ({origins[key]})" for key in KEYS if key in origins)


def apply_for_model(cfg: Config, info) -> dict[str, str]:
    """`apply` for the located base model (models.locate), from its configs on disk."""
    family = families.family(info.family)
    denoiser_config, _ = models.configs(info, cfg.model)
    return apply(cfg, family, family.variant(denoiser_config))
