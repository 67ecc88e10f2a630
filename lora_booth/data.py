"""Instance photos and class images → training rows: decoding, captions, crops, flips, and the
cached VAE latents. Every random choice is a function of (seed, micro-step), so a resumed run
sees exactly the rows the uninterrupted run would have seen."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DataConfig
from .errors import DataError

EMPTY_PROMPT = ""  # what caption dropout trains on: the unconditional prompt of classifier-free guidance
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BUILTIN_PREFIX = "builtin:"


def derived_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """An independent, reproducible random stream for (seed, purpose, position)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def resolve_dir(name: str) -> Path:
    if name.startswith(BUILTIN_PREFIX):
        folder = Path(str(resources.files("lora_booth") / "samples" / name[len(BUILTIN_PREFIX):]))
        if not folder.is_dir():
            raise DataError(f"{name}: no such built-in sample set (lora-booth ships builtin:dog).")
        return folder
    return Path(name).expanduser()


def list_images(folder: Path, key: str, caption_ext: str = ".txt") -> list[Path]:
    """The images of a folder, sorted. Caption files and hidden files are expected; anything
    else is a mistake worth stopping for (a HEIC from a phone, a zip, a stray document)."""
    if not folder.exists():
        raise DataError(f"{key}={folder}: no such folder. Check the path.")
    if not folder.is_dir():
        raise DataError(f"{key}={folder}: not a folder. Point it at a folder of images.")
    images = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        elif suffix != caption_ext.lower():
            raise DataError(f"{path}: not an image lora-booth reads ({', '.join(IMAGE_SUFFIXES)}). "
                            "Convert it to JPEG or PNG, or move it out of the folder.")
    return images


def load_rgb(path: Path) -> Image.Image:
    """Decode any common image as 8-bit RGB, upright as the camera meant it."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise DataError(f"{path}: larger than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels (a possible "
                        "decompression bomb). Downscale it first; training uses only a few hundred pixels a side.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode this image ({exc}). Re-save it as JPEG or PNG, or remove it.") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, don't clip
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent → white, not black
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def square_crop(image: Image.Image, resolution: int, crop: str, generator: torch.Generator | None,
                flip: bool) -> torch.Tensor:
    """Resize the short side to `resolution` (LANCZOS), cut a square, optionally mirror.
    Returns (3, R, R) in [-1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.LANCZOS)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if crop == "random" and generator is not None:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    else:
        left, top = spare_x // 2, spare_y // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, R, R)
    return pixels / 127.5 - 1.0


@dataclass
class Row:
    """One training example before encoding."""
    path: Path
    prompt: str
    is_prior: bool


def instance_rows(cfg: DataConfig, warn=print) -> list[Row]:
    """One row per photo (× repeats). Every photo is decoded here, so a broken file fails before
    any model loads; photos smaller than the resolution and exact duplicates get a warning."""
    folder = resolve_dir(cfg.instance_dir)
    images = list_images(folder, "data.instance_dir", cfg.caption_ext)
    if not images:
        raise DataError(f"data.instance_dir={folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}). "
                        "Put 3-20 photos of the subject there.")
    rows, seen = [], {}
    for path in images:
        caption_path = path.with_suffix(cfg.caption_ext)
        prompt = cfg.instance_prompt
        if caption_path.is_file():
            prompt = caption_path.read_text(encoding="utf-8").strip()
            if not prompt:
                raise DataError(f"{caption_path}: the caption file is empty. Write the prompt for "
                                f"{path.name} in it (with the trigger word), or delete it to use instance_prompt.")
        width, height = load_rgb(path).size
        if min(width, height) < cfg.resolution:
            warn(f"warning: {path.name} is {width}×{height}, smaller than data.resolution={cfg.resolution}; "
                 "it is upscaled, which blurs it. Use larger photos or a lower resolution.")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            warn(f"warning: {path.name} is a copy of {seen[digest].name}; it will count twice")
        seen.setdefault(digest, path)
        rows.append(Row(path, prompt, is_prior=False))
    return rows * cfg.repeats


def class_rows(paths: list[Path], class_prompt: str) -> list[Row]:
    return [Row(path, class_prompt, is_prior=True) for path in paths]


@dataclass
class Batch:
    """One micro-batch: instance rows first, then as many class rows."""
    latents: torch.Tensor            # (B, 4, h, w), scaled by the VAE's scaling factor
    prompts: list[str]
    is_prior: torch.Tensor           # (B,) bool
    slots: list[tuple[str, int]]     # each row's (stream, position): the key of its random draws


class LatentSource:
    """Turns rows into VAE latents, either from a cache built once (then the VAE can leave the
    accelerator) or by encoding on the fly. Both sample the latent distribution with the same
    CPU generator, so cached and uncached runs train on the same numbers."""

    def __init__(self, vae, cfg: DataConfig, device: torch.device, seed: int) -> None:
        self.vae, self.cfg, self.device, self.seed = vae, cfg, device, seed
        self.scaling_factor = vae.config.scaling_factor  # kept: the VAE itself is freed once cached
        self.cache: dict[tuple[Path, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def build_cache(self, rows: list[Row], batch_size: int = 8, progress=None) -> None:
        """Encode every distinct (image, mirrored?) once; mirrored copies only when flips are on."""
        wanted = sorted({(row.path, flip) for row in rows for flip in ((False, True) if self.cfg.flip else (False,))})
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]
            pixels = torch.stack([square_crop(load_rgb(p), self.cfg.resolution, "center", None, f) for p, f in chunk])
            means, stds = self._encode(pixels)
            for index, item in enumerate(chunk):
                self.cache[item] = (means[index], stds[index])
            if progress:
                progress(min(start + batch_size, len(wanted)), len(wanted))

    def latents(self, rows: list[Row], slots: list[tuple[str, int]]) -> torch.Tensor:
        """Each row's flip, crop and latent sample come from its own stream, keyed by the row's slot
        (stream, position in that stream): the same numbers whatever batch or process it lands in."""
        generators = [derived_generator(self.seed, f"augment-{stream}", position) for stream, position in slots]
        flips = [self.cfg.flip and bool(torch.rand((), generator=g) < 0.5) for g in generators]
        if self.cache:
            means, stds = zip(*(self.cache[(row.path, flip)] for row, flip in zip(rows, flips)))
            mean, std = torch.stack(means), torch.stack(stds)
        else:
            pixels = torch.stack([square_crop(load_rgb(row.path), self.cfg.resolution, self.cfg.crop, g, flip)
                                  for row, flip, g in zip(rows, flips, generators)])
            mean, std = self._encode(pixels)
        sample = mean + std * torch.stack([torch.randn(m.shape, generator=g) for m, g in zip(mean, generators)])
        return sample * self.scaling_factor


class DreamBoothBatches:
    """Micro-batch k = B instance rows (+ B class rows with prior preservation) per process. Rows
    are a pure function of (seed, k, process): each stream walks through a fresh permutation per
    epoch, and the P processes take consecutive slices of the global micro-batch of P·B rows, so
    P processes at batch B see exactly the rows of one process at batch P·B."""

    def __init__(self, instances: list[Row], classes: list[Row], latent_source: LatentSource,
                 batch_size: int, seed: int, process_index: int = 0, num_processes: int = 1,
                 caption_dropout: float = 0.0) -> None:
        self.instances, self.classes = instances, classes
        self.caption_dropout = caption_dropout
        self.latent_source, self.batch_size, self.seed = latent_source, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self._orders: dict[tuple[str, int], list[int]] = {}
        self.first_micro_step, self.first_row = 0, 0  # where this run's slicing starts (see resume_at)

    def resume_at(self, micro_step: int, rows_done: int) -> None:
        """Continue the streams after `rows_done` rows, whatever process count consumed them."""
        self.first_micro_step, self.first_row = micro_step, rows_done

    def rows_done(self, micro_step: int) -> int:
        return self.first_row + (micro_step - self.first_micro_step) * self.num_processes * self.batch_size

    def positions(self, micro_step: int) -> range:
        start = self.rows_done(micro_step) + self.process_index * self.batch_size
        return range(start, start + self.batch_size)

    def _pick(self, rows: list[Row], stream: str, micro_step: int) -> list[tuple[Row, tuple[str, int]]]:
        picked = []
        for position in self.positions(micro_step):
            epoch, offset = divmod(position, len(rows))
            if (stream, epoch) not in self._orders:
                self._orders = {k: v for k, v in self._orders.items() if k[1] >= epoch - 1}
                order = torch.randperm(len(rows), generator=derived_generator(self.seed, stream, epoch))
                self._orders[(stream, epoch)] = order.tolist()
            picked.append((rows[self._orders[(stream, epoch)][offset]], (stream, position)))
        return picked

    def _drops_caption(self, row: Row, slot: tuple[str, int]) -> bool:
        """Caption dropout: an instance row's own stream decides, so resume and process count
        change nothing. Class rows keep their prompt: they anchor the class, not the subject."""
        if row.is_prior or not self.caption_dropout:
            return False
        stream, position = slot
        return bool(torch.rand((), generator=derived_generator(self.seed, f"caption-{stream}", position))
                    < self.caption_dropout)

    def __call__(self, micro_step: int) -> Batch:
        picked = self._pick(self.instances, "instance", micro_step)
        if self.classes:
            picked += self._pick(self.classes, "class", micro_step)
        rows, slots = [row for row, _ in picked], [slot for _, slot in picked]
        prompts = [EMPTY_PROMPT if self._drops_caption(row, slot) else row.prompt for row, slot in zip(rows, slots)]
        return Batch(latents=self.latent_source.latents(rows, slots), prompts=prompts,
                     is_prior=torch.tensor([row.is_prior for row in rows]), slots=slots)
