"""Images with the adapters in place: grids during training (same prompts and seeds every time,
so progress and language drift show at a glance, beside one grid of the base model without the
adapters) and the `generate` verb."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .. import families
from ..adapters import formats, merging, neutral
from ..config.sections import Config, ModelConfig
from ..data.rows import derived_generator
from ..io import atomic
from ..io.errors import ConfigError
from ..model import loading as models, lora
from ..model.pivotal import FILE_NAME, load_into, rewrite
from ..model.precision import autocast_dtype
from ..model.text import caches_prompts

TEMPLATES = ("a {subject} in the jungle", "a {subject} on the beach", "a {subject} on a cobblestone street")


def default_prompts(cfg: Config) -> list[str]:
    """The instance prompt, the class prompt (its row shows drift), and DreamBooth templates with
    the trigger phrase ("sks dog" out of "a photo of sks dog")."""
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    subject = re.sub(r"^(an? )?(photo|picture|image) of (an? |the )?", "", cfg.data.instance_prompt.strip())
    prompts = [cfg.data.instance_prompt]
    if cfg.prior.class_prompt:
        prompts.append(cfg.prior.class_prompt)
    return prompts + [template.format(subject=subject) for template in TEMPLATES]


def pipeline(base, unet, device: torch.device):
    """A text-to-image pipeline around the training modules themselves: no copy, no reload. It
    samples with the family's sampler (DPM-Solver++; FLUX.1: its flow-matching Euler)."""
    kind = base.kind
    pipe = kind.pipeline(base, unet, kind.sampler(base.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    pipe.lora_booth_family = kind  # render asks it how the pipeline takes and returns latents
    return pipe


def latent_channels(pipe) -> int:
    """Channels of the starting noise, in the family's latent layout (before any packing)."""
    return pipe.lora_booth_family.latent_codec(pipe.vae).channels


def render(pipe, prompts: list[str], latents: torch.Tensor, size: int, device: torch.device,
           compute_dtype: torch.dtype, autocast_dtype: torch.dtype | None, **kwargs) -> list[Image.Image]:
    """Run the pipeline from the given starting noise, in `compute_dtype` (the base's, never the
    storage dtype of fp8 weights), under autocast when it is a half precision. A VAE that overflows
    in fp16 (SDXL's: `force_upcast` in its config) decodes in fp32 outside autocast, or the images
    come out black (NaN)."""
    kind = pipe.lora_booth_family
    fp16_unsafe = autocast_dtype is not None and getattr(pipe.vae.config, "force_upcast", False)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if prompts is not None:
            kwargs["prompt"] = prompts
        result = pipe(height=size, width=size, latents=kind.pipeline_latents(latents).to(device, compute_dtype),
                      output_type="latent" if fp16_unsafe else "pil", **kwargs).images
    if not fp16_unsafe:
        return result
    vae = pipe.vae
    result = kind.latents_from_pipeline(result, size, pipe.vae_scale_factor)
    with torch.autocast(device.type, enabled=False):
        pixels = kind.latent_codec(vae).decode(vae, result.float())
    return pipe.image_processor.postprocess(pixels, output_type="pil")


@torch.no_grad()
def draw(pipe, prompts: list[str], num: int, size: int, steps: int, guidance: float, seed: int,
         device: torch.device, compute_dtype: torch.dtype = torch.float32, encoded=None,
         **extra) -> list[list[Image.Image]]:
    """num images per prompt; image j of every row starts from the same noise (seed, j).
    `encoded`: prompt → its cached conditioning, fed to the pipeline instead of the prompt (the
    text encoders then stay off the device)."""
    channels = latent_channels(pipe)
    latent_side = size // pipe.vae_scale_factor
    noise = torch.stack([torch.randn((channels, latent_side, latent_side), generator=derived_generator(seed, "sample", j))
                         for j in range(num)])
    def text(prompt: str) -> dict:
        if encoded is None:
            return {"prompt": [prompt] * num}
        family = pipe.lora_booth_family  # and the unconditional branch's, where the pipeline would encode it
        return {**family.pipeline_conditioning(encoded([prompt] * num, device, compute_dtype)),
                **family.negative_conditioning(encoded, num, device, compute_dtype)}

    return [render(pipe, None, noise, size, device, compute_dtype, autocast_dtype(compute_dtype),
                   num_inference_steps=steps, guidance_scale=guidance, **text(prompt), **extra) for prompt in prompts]


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (c * width, r * height))
    return sheet


def save_png(image: Image.Image, path: Path, info: dict[str, str]) -> Path:
    metadata = PngImagePlugin.PngInfo()
    for key, value in info.items():
        metadata.add_text(key, value)
    with atomic.atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=metadata)
    return path


BASE_GRID = "base.png"  # samples/base.png: the base model without the adapters, drawn once per run


def grid_settings(cfg: Config, prompts: list[str]) -> str:
    """What two grids must share to compare image by image: prompts, seeds and sampler."""
    return json.dumps({"prompts": prompts, "num": cfg.sample.num, "seed": cfg.sample.seed, "steps": cfg.sample.steps,
                       "guidance_scale": cfg.sample.guidance_scale, "resolution": cfg.data.resolution}, sort_keys=True)


def drawn_with(path: Path, settings: str) -> bool:
    try:
        with Image.open(path) as image:
            return image.info.get("settings") == settings
    except OSError:  # missing or damaged: draw it (again)
        return False


def training_grid(base, unet, cfg: Config, out: Path, step: int, device: torch.device, prompt_cache=None) -> Path:
    """samples/step-N.png: one row per prompt, one column per seed, the adapters as they are at
    `step`. The first grid of a run also draws samples/base.png, the base model without adapters
    on the same prompts and seeds; a resumed run keeps it unless the sample settings changed."""
    modules = [unet, *lora.adapted_parts(base).values()]
    modes = [module.training for module in modules]
    prompts = default_prompts(cfg)
    settings = grid_settings(cfg, prompts)
    base_path = out / "samples" / BASE_GRID
    arguments = (cfg.sample.num, cfg.data.resolution, cfg.sample.steps, cfg.sample.guidance_scale, cfg.sample.seed,
                 device, base.compute_dtype)
    # sampling draws its noise from its own generators; the global ones (adapter dropout) stay
    # where training left them whatever the pipeline does
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for module in modules:  # no adapter dropout while drawing
                module.eval()
            # the VAE and text encoders wait on the CPU between grids; a family that stages its denoiser
            # (FLUX.1: T5 would not fit beside it) draws from the cached prompts, encoders left where they are
            staged = base.kind.stages_denoiser and prompt_cache is not None
            base.vae.to(device) if staged else base.to(device)
            pipe = pipeline(base, unet, device)
            extra = {**base.kind.pipeline_kwargs(base), **({"encoded": prompt_cache} if staged else {})}
            if not drawn_with(base_path, settings):
                with lora.adapters_disabled(base):  # the base hears the trigger as a plain word, not <s0><s1>
                    base_rows = draw(pipe, prompts, *arguments, **extra)
                save_png(grid(base_rows), base_path, grid_info(cfg, prompts, settings, adapters="none"))
            adapted = [rewrite(prompt, cfg.pivotal) for prompt in prompts]  # trigger → <s0><s1>
            rows = draw(pipe, adapted, *arguments, **extra)
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
            if device.type != "cpu":  # back off the accelerator: training needs the room
                base.vae.to("cpu")
                if caches_prompts(cfg):
                    for _, encoder in base.text_encoders.values():
                        encoder.to("cpu")
    return save_png(grid(rows), out / "samples" / f"step-{step:08d}.png",
                    grid_info(cfg, adapted, settings, step=str(step)))


def grid_info(cfg: Config, prompts: list[str], settings: str, **extra: str) -> dict[str, str]:
    """The PNG's text chunks: enough to read the grid alone (rows, columns, sampler)."""
    return {**extra, "prompts": "\n".join(prompts), "seed": str(cfg.sample.seed), "num": str(cfg.sample.num),
            "steps": str(cfg.sample.steps), "guidance_scale": str(cfg.sample.guidance_scale), "settings": settings}


MAX_SIZE = 8192  # px: what `generate size=` accepts (cli.CEILINGS)


def check_family(adapter, family: str, model: str, path: Path) -> None:
    """An adapter's tensors, its metadata and the base model must agree on the family: a file whose
    metadata names another family than its tensors is damaged or mislabelled, and applying it to
    the family its metadata names would change some layers and silently skip the rest."""
    from_tensors = neutral.Adapter(adapter.modules, {}, adapter.source_format, adapter.family_hint).family()
    named = adapter.metadata.get("lora_booth.family", "")
    if from_tensors in families.FAMILIES and named in families.FAMILIES and named != from_tensors:
        raise formats.AdapterError(f"{path}: its metadata says {named}, but its tensors are those of a {from_tensors} "
                                   "adapter. The file is mislabelled: it is refused rather than half-applied")
    if from_tensors in families.FAMILIES and family in families.FAMILIES and family != from_tensors:
        raise formats.AdapterError(f"{path}: is a {from_tensors} adapter, but {model} is a {family} model. Pass the "
                                   f"model= it was trained on (`lora-booth inspect {path}` names it)")


def generate(model: str, loras: list[tuple[Path, float]], prompt: str, out: Path, n: int = 4, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, size: int | None = None, negative: str = "",
             allow_pickle: bool = False, report=print, overwrite: bool = False) -> list[Path]:
    """`lora-booth generate`: any number of adapters at their scales, PNGs with the prompt and
    settings in their metadata. Existing images are never replaced unless `overwrite`. Steps and
    guidance not given are the family's (Family.run_defaults: FLUX.1-dev's 3.5 is not SD's 7.5)."""
    taken = [Path(out) / f"{index:04d}.png" for index in range(n) if (Path(out) / f"{index:04d}.png").exists()]
    if taken and not overwrite:
        raise ConfigError("out", f"{out} already holds {taken[0].name}" + (f" and {len(taken) - 1} more of the "
                          "images this would write" if len(taken) > 1 else ""),
                          "choose another out folder, or pass overwrite=true to replace them")

    trained = formats.trained_config(loras[0][0]) if loras else {}
    if not model:  # the base and size the adapter was trained with, from its own metadata
        model = (trained.get("model") if isinstance(trained.get("model"), dict) else {}).get("source", "")
        if not isinstance(model, str) or not model:
            raise ConfigError("model", "is not given" + (f", and {loras[0][0]} does not record its base model"
                                                         if loras else ""),
                              "pass model= (a hub id, a diffusers folder, a .safetensors file, or toyworld)")
        report(f"model={model} (the base {loras[0][0]} was trained on)")
        resolution = (trained.get("data") if isinstance(trained.get("data"), dict) else {}).get("resolution")
        if not size and resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool)
                                                    or not 8 <= resolution <= MAX_SIZE):
            raise ConfigError("size", f"is not given, and the resolution {str(resolution)[:40]!r} that {loras[0][0]} "
                              f"records is not a size lora-booth draws (8 … {MAX_SIZE})", "pass size=512 (or 1024)")
        size = size or resolution
    models.quiet_libraries()
    model_cfg = ModelConfig(source=model, allow_pickle=allow_pickle)
    info = models.locate(model_cfg)
    base = models.load_frozen(model_cfg, info)
    device = models.pick_device("auto")
    pipe = pipeline(base.to(device), base.unet, device)
    family_values = base.kind.run_defaults(base.variant)
    steps = family_values["sample.steps"] if steps is None else steps
    guidance = family_values["sample.guidance_scale"] if guidance is None else guidance
    names = []
    loadable = []
    parts = {base.kind.denoiser: base.unet, **{part: encoder for part, (_, encoder) in base.text_encoders.items()}}
    adapters = []
    for path, scale in [(Path(p), s) for p, s in loras]:  # all read and checked before any is applied
        adapter = formats.read(path, allow_pickle)
        path = formats.locate(path)  # a run or checkpoint folder: the file inside it
        check_family(adapter, base.family, model, path)
        merging.check_fits(parts, adapter, path)
        adapters.append((adapter, path, scale))
    for adapter, path, scale in adapters:
        kind = neutral.adapter_kind(adapter.modules.values())
        # diffusers refuses LoHa/LoKr and drops a kohya file's DoRA magnitudes: those are added here
        if kind == "lora" or (kind == "dora" and adapter.source_format == "diffusers"):
            loadable.append((path, scale))
        else:
            merging.fuse_into_modules(parts, adapter, scale, path)  # SDXL: both text encoders
    for index, (path, scale) in enumerate(loadable):
        folder, weight = (path, None) if path.is_dir() else (path.parent, path.name)
        name = f"lora{index}"
        try:
            pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise formats.AdapterError(f"{path}: does not fit {model} ({type(exc).__name__}: {str(exc)[:200]}). "
                                       "Use the base model the adapter was trained on (`lora-booth inspect` names "
                                       "it).") from None
        names.append((name, scale))
        pivotal = formats.trained_config(path).get("pivotal", {}).get("enabled") is True
        if pivotal and (path.parent / FILE_NAME).is_file():  # a pivotal run's own new tokens come along
            tokens = load_into(pipe, path.parent / FILE_NAME)
            report(f"loaded the embeddings of {''.join(tokens)} from {path.parent / FILE_NAME}")
            if not all(token in prompt for token in tokens):
                report(f"warning: the prompt lacks {''.join(tokens)}, which this adapter was trained with")
    if names:
        pipe.set_adapters([n for n, _ in names], [s for _, s in names])
    size = size or base.kind.native_size(base)
    multiple = base.kind.size_multiple(base)
    if size % multiple:
        raise ConfigError("size", f"is {size}, but this model draws images whose sides are multiples of {multiple}",
                          f"use {max(multiple, round(size / multiple) * multiple)}")
    latent_side = size // base.vae_scale_factor
    written = []
    for index in range(n):
        noise = torch.randn((1, latent_channels(pipe), latent_side, latent_side),
                            generator=derived_generator(seed, "generate", index))
        image = render(pipe, [prompt], noise, size, device, base.compute_dtype, None, **base.kind.negative_kwargs(base, negative),
                       num_inference_steps=steps, guidance_scale=guidance, **base.kind.pipeline_kwargs(base))[0]
        info = {"prompt": prompt, "negative_prompt": negative, "model": model, "seed": str(seed), "index": str(index),
                "steps": str(steps), "guidance_scale": str(guidance), "sampler": "DPM-Solver++",
                "loras": ", ".join(f"{p}:{s:g}" for p, s in loras)}
        written.append(save_png(image, Path(out) / f"{index:04d}.png", info))
    report(f"wrote {len(written)} images to {out}")
    return written
