"""Training rows → batches: flips, caption dropout, the cached VAE latents. Every random choice is
a function of (seed, micro-step), so a resumed run sees exactly the rows the uninterrupted run
would have seen."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import buckets, masks
from ..config.sections import DataConfig
from .crops import place, to_pixels
from .files import load_rgb
from .rows import Row, derived_generator

EMPTY_PROMPT = ""  # a dropped caption; what the UNet then hears is the family's unconditional input (text.py)


@dataclass
class Batch:
    """One micro-batch: instance rows first, then as many class rows, all of one size."""
    latents: torch.Tensor            # (B, 4, h, w), scaled by the VAE's scaling factor
    prompts: list[str]
    is_prior: torch.Tensor           # (B,) bool
    slots: list[tuple[str, int]]     # each row's (stream, position): the key of its random draws
    sizes: torch.Tensor              # (B, 6) original size, crop top-left, target size; the family reads what it needs
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

    def __init__(self, vae, cfg: DataConfig, device: torch.device, seed: int, masked=frozenset(), *, codec) -> None:
        self.vae, self.cfg, self.device, self.seed = vae, cfg, device, seed
        self.masked = frozenset(masked)
        # how the family's VAE encodes and normalises (families/latents.py); kept: the VAE itself
        # is freed once cached
        self.codec = codec
        self.cache: dict[Key, tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor | None]] = {}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.codec.distribution(self.vae, pixels.to(self.device))
        return mean.float().cpu(), std.float().cpu()

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
        return self.codec.normalize(sample), torch.tensor(geometry, dtype=torch.float32), row_masks


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
        latents, sizes, row_masks = self.latent_source.latents(rows, slots, size)
        dropped = [self._drops_caption(row, slot) for row, slot in zip(rows, slots)]
        prompts = [EMPTY_PROMPT if drop else row.prompt for row, drop in zip(rows, dropped)]
        if row_masks is not None and self.mask_dropout:
            unmasked = torch.tensor([self._drops_mask(row, slot) for row, slot in zip(rows, slots)])
            row_masks = torch.where(unmasked.view(-1, 1, 1, 1), torch.ones_like(row_masks), row_masks)
        return Batch(latents=latents, prompts=prompts, is_prior=torch.tensor([row.is_prior for row in rows]),
                     slots=slots, sizes=sizes, dropped=torch.tensor(dropped, dtype=torch.bool), masks=row_masks)
