"""Instance photos and class images → training rows: decoding, captions, crops, flips, and the
cached VAE latents. Every random choice is a function of (seed, micro-step), so a resumed run
sees exactly the rows the uninterrupted run would have seen."""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import buckets, kohya_data, masks
from .config import DataConfig
from .errors import DataError

EMPTY_PROMPT = ""  # a dropped caption; what the UNet then hears is the family's unconditional input (text.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")  # kohya's two; data.caption_ext is looked for first
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
    captions = {caption_ext.lower(), *CAPTION_SUFFIXES}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or masks.is_mask_name(path):  # photo.mask.png: a mask
            continue
        if masks.looks_like_mask(path):
            raise DataError(f"{path}: a mask is read from a PNG only (lossless): save it as "
                            f"{path.name[:-len(path.suffix)]}.png, or rename it if it is a photo.")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or suffix in captions:
            regular_file(path)
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        elif suffix not in captions:
            raise DataError(f"{path}: not an image lora-booth reads ({', '.join(IMAGE_SUFFIXES)}) nor a caption "
                            f"({', '.join(sorted(captions))}). Convert it to JPEG or PNG, or move it out of the folder.")
    return images


def caption_for(image: Path, caption_ext: str) -> Path | None:
    """photo.jpg's caption file: photo<caption_ext>, else photo.txt or photo.caption."""
    for suffix in dict.fromkeys([caption_ext, *CAPTION_SUFFIXES]):
        if image.with_suffix(suffix).exists():
            return image.with_suffix(suffix)
    return None


def image_paths(folder: Path, key: str, caption_ext: str = ".txt") -> list[Path]:
    """The images of a folder and of its kohya `N_words/` subfolders, without their prompts."""
    return [path for path, _, _ in image_sources(folder, key, caption_ext, "", 1)]


def image_sources(folder: Path, key: str, caption_ext: str, prompt: str, repeats: int) -> list[tuple[Path, str, int]]:
    """(image, prompt without a caption, repeats) for the images of a folder and of kohya's
    `N_words/` subfolders inside it (N repeats, "words" the prompt)."""
    sources = [(path, prompt, repeats) for path in list_images(folder, key, caption_ext)]
    for sub, times, words in kohya_data.repeat_folders(folder):
        if times * repeats > kohya_data.MAX_REPEATS:  # the rows of one epoch are a list: keep it bounded
            raise DataError(f"{sub}: {times} repeats × data.repeats={repeats} is over {kohya_data.MAX_REPEATS:,} "
                            "repeats of each photo. Lower one of them.")
        sources += [(path, words, times * repeats) for path in list_images(sub, key, caption_ext)]
    return sources


# a crop of the training square out of anything narrower wastes nearly all of it, and covering the
# square first would upscale the long side without bound (1×20000 px at 512 px: 7 GB)
MAX_ASPECT = 10.0
MAX_CAPTION_BYTES = 64 * 1024


def regular_file(path: Path) -> None:
    """Refuse pipes, sockets and devices before anything opens them (a FIFO blocks a reader for ever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror}). Check the file and its permissions.") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a pipe, socket or device); lora-booth reads only image and "
                        "caption files. Move it out of the folder.")


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, of a sensible size, named in every error."""
    regular_file(path)
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes is not a caption (the text encoder reads 77 tokens). "
                        "Shorten it, or remove it to use instance_prompt.")
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}). Save the caption as UTF-8.") from None


def load_rgb(path: Path) -> Image.Image:
    """Decode any common image as 8-bit RGB, upright as the camera meant it. Its size and aspect
    ratio are checked from the header, before a pixel is decoded."""
    regular_file(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT:
                raise DataError(f"{path}: {width}×{height} pixels, an aspect ratio over {MAX_ASPECT:g}:1, cannot be "
                                "cropped to a training image sensibly. Crop it to the subject, or remove it.")
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


@dataclass(frozen=True)
class Placement:
    """Where a training crop comes from: the upright image resized (LANCZOS) to `resized` so it
    covers `size` = (width, height), the crop's top-left corner, and whether it is mirrored. The
    photo and its loss mask (data.masks) go through the same `apply`, so every mask pixel stays on
    its photo pixel through resizing, crops, flips and buckets."""
    original: tuple[int, int]   # (width, height) of the upright image
    resized: tuple[int, int]
    left: int
    top: int
    size: tuple[int, int]
    flip: bool

    def apply(self, image: Image.Image) -> Image.Image:
        if self.resized != image.size:
            image = image.resize(self.resized, Image.LANCZOS)
        image = image.crop((self.left, self.top, self.left + self.size[0], self.top + self.size[1]))
        return image.transpose(Image.FLIP_LEFT_RIGHT) if self.flip else image

    @property
    def conditioning(self) -> tuple[int, ...]:
        """SDXL's size conditioning: (original height, original width, crop top, crop left, target
        height, target width), the crop measured in the image as the model sees it (mirrored when
        flipped)."""
        left = self.resized[0] - self.size[0] - self.left if self.flip else self.left
        return (self.original[1], self.original[0], self.top, left, self.size[1], self.size[0])


def place(image_size: tuple[int, int], size: tuple[int, int], crop: str, generator: torch.Generator | None,
          flip: bool) -> Placement:
    """The Placement of an image of `image_size` cut to `size`: centred, or (crop=random, with a
    generator) at a corner drawn from it, left then top."""
    target_w, target_h = size
    width, height = image_size
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    spare_x, spare_y = resized[0] - target_w, resized[1] - target_h
    if crop == "random" and generator is not None:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    else:
        left, top = spare_x // 2, spare_y // 2
    return Placement(tuple(image_size), resized, left, top, tuple(size), flip)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) pixels in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def fit_crop(image: Image.Image, size: tuple[int, int], crop: str, generator: torch.Generator | None,
             flip: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Resize (LANCZOS) so the image covers `size` = (width, height), cut that out, optionally
    mirror (place). Returns (3, H, W) pixels in [-1, 1] and SDXL's size conditioning."""
    placement = place(image.size, size, crop, generator, flip)
    return to_pixels(placement.apply(image)), placement.conditioning


@dataclass
class Row:
    """One training example before encoding."""
    path: Path
    prompt: str
    is_prior: bool
    size: tuple[int, int] | None = None  # its aspect-ratio bucket (width, height); None: square, or the batch's
    content: str = ""  # SHA-256 of the file, when the photo check already read it (for the fingerprint)
    name: str = ""     # the photo's name inside instance_dir (kohya subfolders: "10_sks dog/1.jpg")
    mask: Path | None = None  # where its loss mask is read (data.masks): photo.mask.png, or the photo (alpha)
    mask_content: str = ""    # SHA-256 of photo.mask.png (for the fingerprint)


def instance_rows(cfg: DataConfig, warn=print) -> list[Row]:
    """One row per photo (× repeats), in its aspect-ratio bucket when buckets are on. Every photo
    is decoded here, so a broken file fails before any model loads; photos smaller than the
    resolution and exact duplicates get a warning."""
    folder = resolve_dir(cfg.instance_dir)
    sources = image_sources(folder, "data.instance_dir", cfg.caption_ext, cfg.instance_prompt, cfg.repeats)
    if not sources:
        raise DataError(f"data.instance_dir={folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}), neither itself "
                        "nor in kohya-style N_name/ subfolders. Put 3-20 photos of the subject there.")
    masks.check_files(cfg.masks, [path for path, _, _ in sources], warn)
    rows, seen = [], {}
    sizes = buckets.bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_ratio) if cfg.buckets else []
    from .progress import Progress

    # thousands of photos take minutes to check: counts and ETA (on the main process)
    bar = Progress(len(sources), "photos", "photo", enabled=len(sources) >= 50 and os.environ.get("RANK", "0") == "0")
    for path, prompt, repeats in sources:
        bar.update()
        caption_path = caption_for(path, cfg.caption_ext)
        if caption_path is not None:
            prompt = read_caption(caption_path)
            if not prompt:
                raise DataError(f"{caption_path}: the caption file is empty. Write the prompt for "
                                f"{path.name} in it (with the trigger word), or delete it to use instance_prompt.")
        width, height = load_rgb(path).size
        size = buckets.nearest_bucket(width, height, sizes) if cfg.buckets else None
        if cfg.resolution and min(width, height) < cfg.resolution:  # a run sets it before reading photos
            warn(f"warning: {path.name} is {width}×{height}, smaller than data.resolution={cfg.resolution}; "
                 "it is upscaled, which blurs it. Use larger photos or a lower resolution.")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            warn(f"warning: {path.name} is a copy of {seen[digest].name}; it will count twice")
        seen.setdefault(digest, path)
        name = path.name if path.parent == folder else f"{path.parent.name}/{path.name}"
        mask, mask_content = None, ""
        if cfg.masks != "none":  # decoded and checked now too, against the photo's size
            masks.load(path, cfg.masks, (width, height))
            mask = path if cfg.masks == "alpha" else masks.mask_file(path)
            mask_content = "" if cfg.masks == "alpha" else hashlib.sha256(mask.read_bytes()).hexdigest()
        rows.append((Row(path, prompt, is_prior=False, size=size, content=digest, name=name, mask=mask,
                         mask_content=mask_content), repeats))
    bar.close()
    # repeats as whole passes over the photos (a b c a b c), each photo in as many passes as it repeats
    return [row for copy in range(max(n for _, n in rows)) for row, n in rows if copy < n]


def fingerprint(instances: list[Row], classes: list[Row]) -> dict[str, dict[str, str]]:
    """What the run trains on, for resume to compare: each instance photo (by name) with its
    prompt, each class image, and each mask file (data.masks=files), as short content hashes."""
    def digest(row: Row) -> str:  # instance photos were hashed when checked; class images are read here
        content = row.content or hashlib.sha256(row.path.read_bytes()).hexdigest()
        return hashlib.sha256(f"{content}\n{row.prompt}".encode()).hexdigest()[:16]
    found = {"instance": {row.name or row.path.name: digest(row) for row in instances},
             "class": {row.path.name: digest(row) for row in classes}}
    mask_files = {masks.mask_file(Path(row.name or row.path.name)).as_posix(): row.mask_content[:16]
                  for row in instances if row.mask_content}
    return {**found, "mask": mask_files} if mask_files else found


def fingerprint_changes(before: dict, now: dict) -> list[str]:
    """The files added, removed or changed between two fingerprints, as short phrases."""
    changes = []
    for kind in ("instance", "class", "mask"):
        old, new = (before or {}).get(kind) or {}, now.get(kind) or {}
        if not isinstance(old, dict):
            old = {}
        changes += [f"{kind} {name} added" for name in sorted(set(new) - set(old))]
        changes += [f"{kind} {name} removed" for name in sorted(set(old) - set(new))]
        changes += [f"{kind} {name} changed" for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    return changes


def class_rows(paths: list[Path], class_prompt: str) -> list[Row]:
    return [Row(path, class_prompt, is_prior=True) for path in paths]


@dataclass
class Batch:
    """One micro-batch: instance rows first, then as many class rows, all of one size."""
    latents: torch.Tensor            # (B, 4, h, w), scaled by the VAE's scaling factor
    prompts: list[str]
    is_prior: torch.Tensor           # (B,) bool
    slots: list[tuple[str, int]]     # each row's (stream, position): the key of its random draws
    time_ids: torch.Tensor           # (B, 6) sizes and crop (SDXL's added conditioning; unused otherwise)
    dropped: torch.Tensor | None = None  # (B,) bool: rows whose caption was dropped (data.caption_dropout)
    masks: torch.Tensor | None = None    # (B, 1, h, w) in [0, 1], 1 = subject (data.masks); 1 on class rows


Key = tuple[Path, bool, tuple[int, int]]  # a cached latent: (image, mirrored?, size)
# images per VAE call when caching: one, on every device. A latent must not depend on which other
# images share its VAE call (a batch of another size can give other bits, and after a resume fewer
# images are left to encode), or a resumed run would not train on the numbers of an uninterrupted
# one. On the CPU it is also fastest: SD's VAE encoder took 1.31 s per 256 px image alone and 3.1 s
# per image in batches of 4 (2 cores, fp32); on a GPU caching is a small part of a run either way.
ENCODE_BATCH = {"cpu": 1}
DEFAULT_ENCODE_BATCH = 1


class LatentSource:
    """Turns rows into VAE latents, either from a cache (then the VAE can leave the accelerator)
    or by encoding on the fly. Both sample the latent distribution with the same CPU generator,
    so cached and uncached runs train on the same numbers. Cache entries are keyed by (image,
    mirrored?, size): with buckets a class image is cut to each instance bucket. The cache holds
    what the run will reach (DreamBoothBatches.reachable); a row beyond that (an update skipped
    and retried on a further batch) is encoded when it comes, with the VAE kept on the CPU. The
    photos in `masked` (data.masks) bring their loss mask, cut alike and averaged down to the
    latent grid, cached with the latent; every other row's mask is all ones."""

    def __init__(self, vae, cfg: DataConfig, device: torch.device, seed: int, masked=frozenset()) -> None:
        self.vae, self.cfg, self.device, self.seed = vae, cfg, device, seed
        self.masked = frozenset(masked)
        self.scaling_factor = vae.config.scaling_factor  # kept: the VAE itself is freed once cached
        self.shift_factor = getattr(vae.config, "shift_factor", None) or 0.0  # FLUX.1's VAE centres its latents
        self.cache: dict[Key, tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor | None]] = {}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def _cut(self, path: Path, size: tuple[int, int], crop: str, generator, flip: bool):
        """(3, H, W) pixels, size conditioning, and the (1, H, W) mask or None: one Placement for both."""
        image = load_rgb(path)
        placement = place(image.size, size, crop, generator, flip)
        mask = None
        if path in self.masked:
            mask = masks.to_tensor(placement.apply(masks.load(path, self.cfg.masks, image.size)))
        return to_pixels(placement.apply(image)), placement.conditioning, mask

    def _mask_latents(self, cut_masks: list, means: torch.Tensor) -> list:
        """Each row's mask on the latent grid (1, h, w), or None when the row has none."""
        return [None if mask is None else masks.to_latent_grid(mask, tuple(means.shape[-2:])) for mask in cut_masks]

    def augmentations(self, slots: list[tuple[str, int]]) -> tuple[list[torch.Generator], list[bool]]:
        """Each row's own random stream (keyed by its slot) and whether it is mirrored."""
        generators = [derived_generator(self.seed, f"augment-{stream}", position) for stream, position in slots]
        return generators, [self.cfg.flip and bool(torch.rand((), generator=g) < 0.5) for g in generators]

    def build_cache(self, keys: list[Key], progress=None) -> None:
        """Encode each (image, mirrored?, size) not cached yet, centre-cropped, in name order."""
        wanted = sorted(set(keys) - set(self.cache))
        batch_size = ENCODE_BATCH.get(torch.device(self.device).type, DEFAULT_ENCODE_BATCH)
        if wanted and getattr(self.vae, "device", self.device) != torch.device(self.device):  # kept on the CPU
            self.vae.to(self.device)
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]
            for size in sorted({size for _, _, size in chunk}):  # one VAE call per shape
                same = [item for item in chunk if item[2] == size]
                cut = [self._cut(path, size, "center", None, flip) for path, flip, _ in same]
                means, stds = self._encode(torch.stack([pixels for pixels, _, _ in cut]))
                grid_masks = self._mask_latents([mask for _, _, mask in cut], means)
                for index, item in enumerate(same):
                    self.cache[item] = (means[index], stds[index], cut[index][1], grid_masks[index])
            if progress:
                progress(min(start + batch_size, len(wanted)), len(wanted))

    def release(self, keep_on_cpu: bool) -> None:
        """After the cache is built: the VAE leaves the accelerator, kept on the CPU when a later
        row may still need encoding (or sampling needs it), freed otherwise."""
        self.vae = self.vae.to("cpu") if keep_on_cpu else None

    def latents(self, rows: list[Row], slots: list[tuple[str, int]], size: tuple[int, int]):
        """Latents (B, 4, h, w), size conditioning (B, 6) and masks (B, 1, h, w), None while
        data.masks=none, of rows cut to `size`. Each row's flip, crop and latent sample come from
        its own stream, keyed by the row's slot (stream, position in that stream): the same
        numbers whatever batch or process it lands in."""
        generators, flips = self.augmentations(slots)
        if self.cfg.cache_latents:
            keys = [(row.path, flip, size) for row, flip in zip(rows, flips)]
            missing = [key for key in keys if key not in self.cache]
            if missing:
                if self.vae is None:
                    raise RuntimeError(f"latent of {missing[0][0]} was not cached and the VAE is freed")
                was = getattr(self.vae, "device", self.device)
                self.build_cache(missing)
                if was != getattr(self.vae, "device", self.device):
                    self.vae.to(was)
            means, stds, geometry, grid_masks = zip(*(self.cache[key] for key in keys))
            mean, std = torch.stack(means), torch.stack(stds)
        else:
            cut = [self._cut(row.path, size, self.cfg.crop, g, flip) for row, flip, g in zip(rows, flips, generators)]
            mean, std = self._encode(torch.stack([pixels for pixels, _, _ in cut]))
            geometry, grid_masks = [g for _, g, _ in cut], self._mask_latents([m for _, _, m in cut], mean)
        row_masks = None if self.cfg.masks == "none" else \
            torch.stack([torch.ones((1, *mean.shape[-2:])) if m is None else m for m in grid_masks])
        sample = mean + std * torch.stack([torch.randn(m.shape, generator=g) for m, g in zip(mean, generators)])
        return (sample - self.shift_factor) * self.scaling_factor, torch.tensor(geometry, dtype=torch.float32), row_masks


class DreamBoothBatches:
    """Micro-batch k = B instance rows (+ B class rows with prior preservation) per process. Rows
    are a pure function of (seed, k, process): each stream walks through a fresh permutation per
    epoch, and the P processes take consecutive slices of the global micro-batch of P·B rows, so
    P processes at batch B see exactly the rows of one process at batch P·B. With buckets, each
    global micro-batch is one group of P·B instance rows from one bucket (buckets.epoch_groups),
    and its class rows are cut to that bucket's size."""

    def __init__(self, instances: list[Row], classes: list[Row], latent_source: LatentSource,
                 batch_size: int, seed: int, process_index: int = 0, num_processes: int = 1,
                 caption_dropout: float = 0.0, mask_dropout: float = 0.0) -> None:
        self.instances, self.classes = instances, classes
        self.caption_dropout, self.mask_dropout = caption_dropout, mask_dropout
        self.latent_source, self.batch_size, self.seed = latent_source, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.square = (latent_source.cfg.resolution, latent_source.cfg.resolution)
        self.bucketed = any(row.size for row in instances)
        self._orders: dict[tuple[str, int], list] = {}
        self.first_micro_step, self.first_row = 0, 0  # where this run's slicing starts (see resume_at)

    def sizes(self) -> list[tuple[int, int]]:
        """Every size a batch can have: what a latent cache must hold for each image."""
        return sorted({row.size for row in self.instances}) if self.bucketed else [self.square]

    def cache_items(self) -> list[tuple[Path, tuple[int, int]]]:
        """(image, size) pairs the run can ask for: instance photos in their buckets, class images
        in every bucket."""
        if not self.bucketed:
            return [(row.path, self.square) for row in self.instances + self.classes]
        return [(row.path, row.size) for row in self.instances] + \
            [(row.path, size) for row in self.classes for size in self.sizes()]

    def every_latent(self) -> list[Key]:
        """Every (image, mirrored?, size) any micro-batch can ask for."""
        flips = (False, True) if self.latent_source.cfg.flip else (False,)
        return sorted({(path, flip, size) for path, size in self.cache_items() for flip in flips})

    def reachable(self, micro_steps: range) -> list[Key]:
        """The latents this process's micro-batches in `micro_steps` ask for, found by drawing
        the rows and flips without encoding anything: a short run caches only those (6 steps of
        a 100-image class set need 6), a long one stops early once every latent is reached."""
        possible = set(self.every_latent())
        found: set[Key] = set()
        for micro_step in micro_steps:
            rows, slots, size = self._rows(micro_step)
            _, mirrored = self.latent_source.augmentations(slots)
            found.update((row.path, flip, size) for row, flip in zip(rows, mirrored))
            if len(found) == len(possible):
                break
        return sorted(found)

    def resume_at(self, micro_step: int, rows_done: int) -> None:
        """Continue the streams after `rows_done` rows, whatever process count consumed them."""
        self.first_micro_step, self.first_row = micro_step, rows_done

    def rows_done(self, micro_step: int) -> int:
        return self.first_row + (micro_step - self.first_micro_step) * self.num_processes * self.batch_size

    def positions(self, micro_step: int) -> range:
        start = self.rows_done(micro_step) + self.process_index * self.batch_size
        return range(start, start + self.batch_size)

    def _order(self, key: tuple[str, int], make) -> list:
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[1] >= key[1] - 1}
            self._orders[key] = make()
        return self._orders[key]

    def _shuffle(self, stream: str, epoch: int):
        return lambda name, n: torch.randperm(n, generator=derived_generator(self.seed, f"{stream}-{name}",
                                                                             epoch)).tolist()

    def _pick(self, rows: list[Row], stream: str, micro_step: int) -> list[tuple[Row, tuple[str, int]]]:
        picked = []
        for position in self.positions(micro_step):
            epoch, offset = divmod(position, len(rows))
            order = self._order((stream, epoch), lambda: torch.randperm(
                len(rows), generator=derived_generator(self.seed, stream, epoch)).tolist())
            picked.append((rows[order[offset]], (stream, position)))
        return picked

    def _pick_bucketed(self, micro_step: int) -> list[tuple[Row, tuple[str, int]]]:
        group = self.num_processes * self.batch_size
        sizes = [row.size for row in self.instances]
        index = self.rows_done(micro_step) // group        # the global micro-batch's group
        epoch, offset = divmod(index, buckets.group_count(sizes, group))
        groups = self._order(("instance-groups", epoch), lambda: buckets.epoch_groups(
            sizes, group, self._shuffle("instance", epoch)))
        mine = groups[offset][self.process_index * self.batch_size:(self.process_index + 1) * self.batch_size]
        first = index * group + self.process_index * self.batch_size
        return [(self.instances[row], ("instance", first + j)) for j, row in enumerate(mine)]

    def _drops_caption(self, row: Row, slot: tuple[str, int]) -> bool:
        """Caption dropout: an instance row's own stream decides, so resume and process count
        change nothing. Class rows keep their prompt: they anchor the class, not the subject."""
        if row.is_prior or not self.caption_dropout:
            return False
        stream, position = slot
        return bool(torch.rand((), generator=derived_generator(self.seed, f"caption-{stream}", position))
                    < self.caption_dropout)

    def _drops_mask(self, row: Row, slot: tuple[str, int]) -> bool:
        """Mask dropout (data.mask_dropout): the row trains this once on every pixel alike, drawn
        from a stream of its own like caption dropout's."""
        if row.is_prior or not self.mask_dropout:
            return False
        stream, position = slot
        return bool(torch.rand((), generator=derived_generator(self.seed, f"mask-{stream}", position))
                    < self.mask_dropout)

    def _rows(self, micro_step: int) -> tuple[list[Row], list[tuple[str, int]], tuple[int, int]]:
        """The rows of micro-batch k, their slots, and the size they are cut to."""
        if self.bucketed:
            picked = self._pick_bucketed(micro_step)
            size = picked[0][0].size
        else:
            picked, size = self._pick(self.instances, "instance", micro_step), self.square
        if self.classes:
            picked += self._pick(self.classes, "class", micro_step)
        return [row for row, _ in picked], [slot for _, slot in picked], size

    def __call__(self, micro_step: int) -> Batch:
        rows, slots, size = self._rows(micro_step)
        latents, time_ids, row_masks = self.latent_source.latents(rows, slots, size)
        dropped = [self._drops_caption(row, slot) for row, slot in zip(rows, slots)]
        prompts = [EMPTY_PROMPT if drop else row.prompt for row, drop in zip(rows, dropped)]
        if row_masks is not None and self.mask_dropout:
            unmasked = torch.tensor([self._drops_mask(row, slot) for row, slot in zip(rows, slots)])
            row_masks = torch.where(unmasked.view(-1, 1, 1, 1), torch.ones_like(row_masks), row_masks)
        return Batch(latents=latents, prompts=prompts, is_prior=torch.tensor([row.is_prior for row in rows]),
                     slots=slots, time_ids=time_ids, dropped=torch.tensor(dropped, dtype=torch.bool), masks=row_masks)
