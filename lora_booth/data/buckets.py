"""Aspect-ratio buckets: instead of cutting every photo square, each goes to the bucket — a size
of about resolution² pixels with sides that are multiples of `step` — nearest its own aspect
ratio, and every micro-batch is drawn from one bucket (tensors in a batch share a shape)."""
from __future__ import annotations

import math
from collections import Counter

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, step: int, max_ratio: float) -> list[Size]:
    """Every (w, h) with sides multiples of `step`, w·h ≤ resolution² and as large as the step
    allows, and long side / short side ≤ max_ratio. Always holds the square."""
    area = resolution * resolution
    sizes = set()
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_ratio + 1e-9:
            sizes.add((width, height))
    sizes.add((resolution, resolution))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are
    equally far from square); ties go to the larger bucket, then the wider one."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 9), -s[0] * s[1], -s[0]))


def describe(sizes_of_rows: list[Size]) -> str:
    """One line per bucket used: its size and how many rows it holds."""
    counts = Counter(sizes_of_rows)
    return ", ".join(f"{w}×{h}: {n}" for (w, h), n in sorted(counts.items()))


def group_count(sizes_of_rows: list[Size], group: int) -> int:
    """Groups of `group` rows per epoch: each bucket's rows fill ⌈n / group⌉ groups."""
    return sum(-(-n // group) for n in Counter(sizes_of_rows).values())


def epoch_groups(sizes_of_rows: list[Size], group: int, shuffle) -> list[list[int]]:
    """One epoch as groups of row indices, every group inside one bucket. `shuffle(name, n)` gives
    a permutation of range(n) for a named stream. A bucket's last group is topped up from the
    start of its own shuffled order, so no photo is dropped when a bucket holds fewer rows than a
    group (3 photos, 3 different shapes, batch 2 is a normal DreamBooth set)."""
    by_bucket: dict[Size, list[int]] = {}
    for index, size in enumerate(sizes_of_rows):
        by_bucket.setdefault(size, []).append(index)
    groups = []
    for size in sorted(by_bucket):
        members = by_bucket[size]
        order = [members[i] for i in shuffle(f"{size[0]}x{size[1]}", len(members))]
        for start in range(0, len(order), group):
            chunk = order[start:start + group]
            while len(chunk) < group:
                chunk.append(order[(len(chunk) - (len(order) - start)) % len(order)])
            groups.append(chunk)
    return [groups[i] for i in shuffle("groups", len(groups))]
