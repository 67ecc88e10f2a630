"""The rows of a run: one instance or class image with its prompt, its random streams, and the
fingerprint that tells a resumed run its photos changed."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import buckets, masks
from ..config.sections import IMAGE_SUFFIXES, DataConfig
from ..io.errors import DataError
from ..io.progress import Progress
from .files import caption_for, image_sources, load_rgb, read_caption, resolve_dir


def derived_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """An independent, reproducible random stream for (seed, purpose, position)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


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
