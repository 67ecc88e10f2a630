"""Class images for prior preservation, drawn by the frozen base model itself (Ruiz et al. 2023,
§3.3: the model's own samples of "a photo of dog" anchor what "dog" meant before fine-tuning)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..config.sections import Config
from ..data.files import image_paths
from ..data.rows import derived_generator
from ..families.tiny import usable_cache_root
from ..io import atomic
from ..io.progress import Progress
from ..model import precision
from ..results import sample

SAMPLER = "dpmsolver++"
PRIOR_FORMAT = 1  # bump when the way class images are drawn changes, so old caches are not reused


def cache_key(cfg: Config, model_fingerprint: str) -> str:
    """Everything that changes what the base model draws: model, prompt, size, sampler, seed."""
    recipe = {"model": model_fingerprint, "prompt": cfg.prior.class_prompt, "resolution": cfg.data.resolution,
              "sampler": SAMPLER, "steps": cfg.prior.sample_steps, "guidance": cfg.prior.guidance_scale,
              "seed": cfg.train.seed, "prediction": cfg.model.prediction_type, "format": PRIOR_FORMAT}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def class_dir_for(cfg: Config, key: str) -> Path:
    if cfg.prior.class_dir:
        return Path(cfg.prior.class_dir).expanduser()
    return usable_cache_root() / "class_images" / key


def existing_class_images(folder: Path) -> list[Path]:
    """Images already in the class folder: earlier generations, or real photos the user put there."""
    if not folder.exists():
        return []  # the folder itself and kohya's N_class/ subfolders (a kohya reg folder as it is)
    return image_paths(folder, "prior.class_dir")


def missing_indices(folder: Path, key: str, wanted: int) -> list[int]:
    """Which numbered images still need drawing. Images drawn with another key, and photos the
    user supplied, count towards `wanted` too (the folder is theirs to fill as they like)."""
    atomic.sweep_stale(folder)  # an image a killed run was writing: drawn again below
    for path in existing_class_images(folder):
        if path.stem.startswith(f"{key}-") and not _decodes(path):
            path.unlink()  # one of ours, damaged (disk error, manual edit): draw it again
    present = existing_class_images(folder)
    own = {p.stem for p in present if p.stem.startswith(f"{key}-")}
    shortfall = wanted - len(present)
    candidates = (i for i in range(10**6) if f"{key}-{i:05d}" not in own)
    return [next(candidates) for _ in range(max(0, shortfall))]


def _decodes(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


@torch.no_grad()
def generate(base, cfg: Config, folder: Path, key: str, indices: list[int], device: torch.device,
             report: Callable[[str], None] = print, show_progress: bool = True) -> None:
    """Draw the missing class images in batches. Image i always comes from the same seed, so an
    interrupted generation resumes where it stopped and produces the same files."""
    pipe = sample.pipeline(base, base.unet, device)
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg.data.resolution
    # half precision on GPUs: generation needs no gradients and fp16 halves time and memory.
    # Autocast also bridges a half-precision UNet and the fp32 VAE.
    autocast_dtype = precision.autocast_dtype(base.compute_dtype) or (torch.float16 if device.type == "cuda" else None)
    wanted, done = set(indices), 0
    bar = Progress(len(indices), "class images", "image", enabled=show_progress)
    for chunk in batches_of(indices, cfg.prior.sample_batch_size, cfg.prior.num_class_images):
        todo = sum(index in wanted for index in chunk)

        def sampler_step(pipe, index, timestep, tensors, done=done, todo=todo):
            # a batch takes many seconds at a large size: progress by sampler step, not by batch
            bar.advance_to(done + todo * (index + 1) / cfg.prior.sample_steps)
            return tensors
        latents = torch.stack([torch.randn((sample.latent_channels(pipe), size // base.vae_scale_factor,
                                            size // base.vae_scale_factor),
                                           generator=derived_generator(cfg.train.seed, "class-image", i))
                               for i in chunk])
        images = sample.render(pipe, [cfg.prior.class_prompt] * len(chunk), latents, size, device, base.compute_dtype,
                        autocast_dtype,
                        num_inference_steps=cfg.prior.sample_steps, guidance_scale=cfg.prior.guidance_scale,
                        callback_on_step_end=sampler_step, **base.kind.pipeline_kwargs(base))
        for index, image in zip(chunk, images):
            if index in wanted:  # the rest of the batch is on disk already, drawn the same way
                with atomic.atomic_path(folder / f"{key}-{index:05d}.png") as temporary:
                    image.save(temporary, format="PNG")
                done += 1
        bar.advance_to(done)
    bar.close()


def batches_of(indices: list[int], batch: int, count: int) -> list[list[int]]:
    """The batches that draw `indices`: always whole fixed blocks (image i with the images
    batch·⌊i/batch⌋ … up to `count`), whatever else is missing or which process draws it, since a
    batch of another size can give other pixels (a batch of one does, on the CPU) and the class
    images after an interrupted run must be those of an uninterrupted one, bit for bit."""
    blocks: dict[int, list[int]] = {}
    for index in indices:
        blocks.setdefault(index // batch, []).append(index)
    return [list(range(block * batch, max(min((block + 1) * batch, count), max(members) + 1)))
            for block, members in sorted(blocks.items())]


def block_of(index: int, cfg: Config) -> int:
    """The fixed block (batch) that draws class image `index`: processes share the work by blocks."""
    return index // cfg.prior.sample_batch_size


def class_image_paths(folder: Path, wanted: int) -> list[Path]:
    """The first `wanted` class images in name order: the same set on every run."""
    return existing_class_images(folder)[:wanted]  # list_images already keeps images only
