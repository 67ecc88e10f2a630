"""Training curves: output_dir/metrics.jsonl always, TensorBoard and wandb when asked for
(log.to=tensorboard,wandb). Only the main process logs; the others get a log that writes nothing."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..io import atomic, manifest, untrusted
from ..config.sections import LOG_TARGETS, Config
from ..io.errors import ConfigError


def check_installed(cfg: Config) -> None:
    """Fail before any model loads when a tracker in log.to cannot be imported."""
    for target in cfg.log.to:
        if importlib.util.find_spec(LOG_TARGETS[target]) is None:
            extra = " (or pip install 'lora-booth[test]')" if target == "tensorboard" else ""
            raise ConfigError("log.to", f"has {target}, but the {target} package is not installed",
                              f"install it with `pip install {target}`{extra}, or drop {target} from log.to")


def tensorboard_dir(cfg: Config, out: Path) -> Path:
    return Path(cfg.log.dir).expanduser() if cfg.log.dir else out / "logs"


MAX_METRICS_BYTES = 512 * 2**20  # ≈ 2.5 million steps of records


def read_metrics(out: Path) -> list[dict]:
    """metrics.jsonl as records; a line cut short by a crash ends the list. The file is read back
    untrusted: each record is a mapping of an integer step (≥ 0) to numbers, else the error names
    the file and line."""
    path = out / "metrics.jsonl"
    records: list[dict] = []
    if not os.path.lexists(path):
        return records
    where = untrusted.shown_path(path)
    lines = untrusted.read_bytes(path, MAX_METRICS_BYTES).split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except RecursionError:
            raise untrusted.UntrustedFileError(f"{where}: line {number} nests deeper than a record of "
                                               "lora-booth") from None
        except ValueError:  # a record cut short: what a killed run leaves last, and only last
            if any(rest.strip() for rest in lines[number:]):
                raise untrusted.UntrustedFileError(
                    f"{where}: line {number} is not a JSON record ({line[:80].decode('utf-8', 'replace')!r}). "
                    "Remove that line, or the file, and report again.") from None
            break
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or \
                isinstance(record["step"], bool) or not 0 <= record["step"] <= untrusted.MAX_STEP or \
                not all(untrusted.is_number(value) and abs(value) < 2**63 if isinstance(value, int) else
                        untrusted.is_number(value) for value in record.values()):
            raise untrusted.UntrustedFileError(
                f"{where}: line {number} is {line[:80].decode('utf-8', 'replace')!r}, not a record lora-booth "
                "writes (a step ≥ 0 and numbers). Remove that line, or the file, and report again.")
        records.append(record)
    return records


def open_log(path: Path):
    """metrics.jsonl for appending: recorded as the run's first (a user's file of that name is
    refused), and never through a symlink planted in its place."""
    manifest.claim(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | manifest.NOFOLLOW, 0o666)
    except OSError as exc:
        raise atomic.write_error(path, exc) from None
    return open(fd, "a", encoding="utf-8")


class RunLog:
    """One record per optimizer step to every target; sample grids to the trackers that show images."""

    def __init__(self, cfg: Config, out: Path, main: bool) -> None:
        self.main = main
        # appended to: a resumed run continues the log (resume.truncate_metrics drops the steps it redoes)
        self.jsonl = open_log(out / "metrics.jsonl") if main else open(os.devnull, "a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        if not main:  # the trackers' packages were checked when the run started (recipe.run)
            return
        if "tensorboard" in cfg.log.to:
            from torch.utils.tensorboard import SummaryWriter

            atomic.make_dirs(tensorboard_dir(cfg, out))  # noted as the run's when created under output_dir
            self.tensorboard = SummaryWriter(str(tensorboard_dir(cfg, out)))
        if "wandb" in cfg.log.to:
            import wandb

            self.wandb = wandb.init(project=cfg.log.project, name=out.name, dir=str(out), config=cfg.to_dict())

    def scalars(self, step: int, record: dict) -> None:
        """record: {"step": N, name: number, ...}, as one line of metrics.jsonl."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()  # a crashed run keeps every finished step
        values = {f"{'validate' if name.startswith('val_') else 'train'}/{name}": value
                  for name, value in record.items() if name != "step"}
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, step: int, path: Path | None) -> None:
        """A sample grid PNG (samples/step-N.png), so progress shows next to the curves."""
        if path is None or not self.main:
            return
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
            self.tensorboard.add_image("samples", pixels, step, dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            # event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: this process's are the run's
            for path in Path(self.tensorboard.log_dir).glob(f"events.out.tfevents.*.{os.getpid()}.*"):
                manifest.note(path)
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
