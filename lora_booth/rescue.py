"""When the run folder's disk is full at a checkpoint (the final one above all, which with
save.checkpoint_every=0 is the only one): the trained state is kept by writing the checkpoint
to another place with room, and the message says exactly what survived and where. Nothing here
trains or retries a step; it only decides where the state can still go and what to tell."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from . import checkpoint
from .tiny import cache_root

FOLDER = "rescued"


def locations(out: Path) -> list[Path]:
    """Places for a checkpoint that could not be written in `out`: lora-booth's cache folder
    (LORA_BOOTH_CACHE), then the system's temporary folder; each gets a folder per run folder,
    so two runs never mix their rescued states."""
    real = os.path.realpath(out)
    run = f"{Path(real).name[:60]}-{hashlib.sha256(real.encode()).hexdigest()[:10]}"
    places = [cache_root() / FOLDER / run, Path(tempfile.gettempdir()) / "lora-booth-rescued" / run]
    return [place for place in places if not _inside(Path(os.path.realpath(place)), Path(real))]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def save_elsewhere(out: Path, write, report) -> tuple[Path | None, list[str]]:
    """Try `write(folder)` (a checkpoint.save into `folder`) at each rescue location in turn; the
    checkpoint folder written, or None, with why each place failed."""
    failures = []
    for place in locations(out):
        try:
            return write(place / "checkpoints"), failures
        except Exception as exc:  # noqa: BLE001 - any failure here only means: try the next place
            failures.append(f"{place}: {str(exc)[:200]}")
    return None, failures


def what_survived(out: Path, step: int, final: bool, rescued: Path | None) -> str:
    """The truth about the trained state after a checkpoint of `step` failed in `out`."""
    if rescued is not None:
        then = "writes the run's files without training again" if final else "continues the training"
        return (f"The trained state of step {step} was saved to {rescued} instead. Free space in {out}, then "
                f"repeat the command with train.resume={rescued}: it {then} (delete {rescued} afterwards).")
    intact = checkpoint.folders(out)
    if intact:
        newest = intact[-1]
        return (f"Nothing of step {step} could be saved anywhere; the newest checkpoint on disk is {newest} "
                f"(step {int(newest.name[len(checkpoint.PREFIX):])}). Free space and continue with "
                "resume=latest.")
    return (f"Nothing of step {step} could be saved anywhere, and this run has no earlier checkpoint "
            "(save.checkpoint_every=0 or not reached yet): its training is lost. Free space, run again, and "
            "keep save.checkpoint_every above 0 to keep checkpoints along the way.")
