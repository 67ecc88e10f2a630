"""A run folder read back for its report: the resolved config, metrics, sample grids and counts."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import yaml

from ..config.loading import from_dict
from ..config.sections import Config
from ..io.errors import DataError, LoraBoothError
from ..model import checkpoint
from .logs import read_metrics
from .sample import BASE_GRID


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}). Delete it or write it again.") from None


@dataclasses.dataclass
class Grid:
    """samples/step-N.png (or base.png): one row per prompt, one column per seed."""
    path: Path
    step: int | None       # None: the base model without adapters
    prompts: list[str]
    seed: str
    columns: int
    tile_width: int        # px of one image in the PNG
    settings: str          # sample.grid_settings: grids with equal settings compare image by image

    @property
    def layout(self) -> tuple:
        return self.settings, tuple(self.prompts), self.columns

    def tiles(self) -> list[list[str]]:
        """Each image as a JPEG data URI, small ones enlarged by whole pixels (up to 4×)."""
        from PIL import Image

        with Image.open(self.path) as sheet:
            sheet = sheet.convert("RGB")
            width, height = sheet.width // self.columns, sheet.height // len(self.prompts)
            factor = max(1, min(4, TILE // width))
            rows = []
            for r in range(len(self.prompts)):
                row = []
                for c in range(self.columns):
                    tile = sheet.crop((c * width, r * height, (c + 1) * width, (r + 1) * height))
                    if factor > 1:
                        tile = tile.resize((width * factor, height * factor), Image.NEAREST)
                    elif width > TILE:
                        tile = tile.resize((TILE, round(height * TILE / width)), Image.LANCZOS)
                    row.append(jpeg_uri(tile))
                rows.append(row)
        return rows


def read_grid(path: Path) -> Grid | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            info, size = dict(image.info), image.size
    except OSError:
        return None
    prompts = [p for p in str(info.get("prompts", "")).splitlines() if p] or ["(prompt not recorded)"]
    named = str(info.get("num", ""))
    # older grids name no column count: their images are square
    columns = int(named) if named.isdigit() and int(named) > 0 else max(1, size[0] // (size[1] // len(prompts)))
    step = int(re.sub(r"\D", "", path.stem) or 0) if path.name != BASE_GRID else None
    return Grid(path, step, prompts, str(info.get("seed", "?")), columns, size[0] // columns,
                str(info.get("settings", "")))


@dataclasses.dataclass
class Run:
    """What the page says about one output folder, read from its files."""
    out: Path
    records: list[dict]
    summary: dict | None       # run.json
    results: dict | None       # eval.json
    config_text: str
    cfg: Config | None
    grids: list[Grid]          # oldest first
    base: Grid | None

    @property
    def name(self) -> str:
        return self.out.resolve().name

    def comparable(self) -> list[Grid]:
        """The grids drawn with the newest grid's prompts and seeds: the ones the slider steps through."""
        return [g for g in self.grids if g.layout == self.grids[-1].layout]

    def base_for(self, grid: Grid) -> Grid | None:
        return self.base if self.base and self.base.settings and self.base.settings == grid.settings else None


def read_run(out: Path) -> Run:
    out = Path(out)
    if not out.is_dir():
        raise DataError(f"{out}: no such folder. Point `lora-booth report` at a training output_dir.")
    records = read_metrics(out)
    config_path = out / "config.yaml"
    if not records and not config_path.exists():
        raise DataError(f"{out}: no metrics.jsonl or config.yaml here. Point `lora-booth report` at a training "
                        "output_dir.")
    text = config_path.read_text(encoding="utf-8") if config_path.exists() else ""
    try:
        cfg = from_dict(yaml.safe_load(text) or {}) if text else None
    except (LoraBoothError, yaml.YAMLError, AttributeError):  # written by another version: shown as text only
        cfg = None
    grids = [g for g in map(read_grid, sorted((out / "samples").glob("step-*.png"))) if g]
    return Run(out, records, read_json(out / "run.json"), read_json(out / "eval.json"), text, cfg, grids,
               read_grid(out / "samples" / BASE_GRID) if (out / "samples" / BASE_GRID).is_file() else None)


def trained_counts(out: Path) -> tuple[int, int] | None:
    """(instance photos, class images) as the newest checkpoint's data fingerprint lists them."""
    folders = checkpoint.folders(out)
    try:
        data = json.loads((folders[-1] / "state.json").read_text(encoding="utf-8"))["data"] if folders else None
        return (len(data["instance"]), len(data["class"])) if data else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


TILE = 256          # px: the most a sample image keeps inside the page; the full PNGs stay in samples/


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def jpeg_uri(image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg")
