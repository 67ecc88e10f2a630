"""The DreamBooth rates of a set of toy-world images, read by the classical detectors: how often the
subject shows, and whether class-prompt images keep the class shape, its colours, and off the subject."""
from __future__ import annotations

import numpy as np

from . import detector, subject, world


# The trigger sits where the world's captions put a colour ("a photo of a red star"): the toy text
# encoder learnt to ignore the word after "of" (always "a"/"an" in pretraining), so
# "a photo of sks star" encodes almost exactly like "a photo of a star" and cannot be told apart.
TRIGGER_PROMPT = "a photo of a sks star"
CLASS_PROMPT = "a photo of a star"
CLASS_SHAPE = "star"


def subject_hit_rate(images) -> float:
    return float(np.mean([subject.is_subject(image) for image in images])) if len(images) else 0.0


def class_stats(images, shape: str = CLASS_SHAPE) -> dict:
    """Shape correctness, colour diversity and drift to the subject of class-prompt samples."""
    detections = [detector.detect(image) for image in images]
    colours = [d.colour for d in detections if d.colour is not None]
    counts = {c: colours.count(c) for c in world.COLOURS if c in colours}
    n = max(len(detections), 1)
    return {
        "shape": sum(d.shape == shape for d in detections) / n,
        "distinct_colours": len(counts),
        "colour_counts": counts,
        "drift": subject_hit_rate(images),
    }
