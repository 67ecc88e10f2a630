"""A run folder read back for its report: the resolved config, metrics, sample grids and counts."""
from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
from pathlib import Path

import yaml

from ..config.loading import from_dict
from ..config.sections import Config
from ..io import untrusted
from ..io.errors import DataError, LoraBoothError
from ..model import checkpoint
from .logs import read_metrics
from .sample import BASE_GRID

MAX_JSON_BYTES = 16 * untrusted.MiB    # run.json and eval.json are a few KiB
MAX_CONFIG_BYTES = 1 * untrusted.MiB   # as for any config file
MAX_STATE_BYTES = 64 * untrusted.MiB   # a checkpoint's state.json: its optimizer layout grows with the adapter
# what each file's keys must hold when present: anything else is refused with the file and key named
RUN_FIELDS = {"steps": (int,), "steps_this_run": (int,), "seconds": (float,), "peak_memory_bytes": (float,),
              "peak_memory_of": (str,), "device": (str,)}
EVAL_FIELDS = {"protocol": (str,), "scores": (dict,)}
MAX_GRID_BYTES = 256 * untrusted.MiB


def read_json(path: Path, fields: dict | None = None) -> dict | None:
    """A JSON file of the run folder (run.json, eval.json): untrusted, so checked for kind, size and types."""
    if not os.path.lexists(path):
        return None
    data = untrusted.read_json(path, MAX_JSON_BYTES)
    untrusted.check_fields(data, fields or {}, untrusted.shown_path(path))
    if isinstance(data.get("scores"), dict):
        for name, value in data["scores"].items():
            if not untrusted.is_number(value):
                raise DataError(f"{untrusted.shown_path(path)}: score {str(name)[:60]!r} is {str(value)[:60]!r}, "
                                "not a number. Run `lora-booth eval` again to rewrite it.")
    return data


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
    """A sample grid and the layout its PNG text records, or None for a file that is no readable
    grid (a pipe or folder in its place is never opened; a layout that does not fit the image is
    not believed)."""
    from PIL import Image

    try:
        untrusted.check_regular(path, MAX_GRID_BYTES)
        with Image.open(path) as image:
            info, size = dict(image.info), image.size
    except (OSError, ValueError, DataError, Image.DecompressionBombError):
        return None
    prompts = [p for p in str(info.get("prompts", "")).splitlines() if p] or ["(prompt not recorded)"]
    if len(prompts) > max(1, size[1]):  # more rows than pixels: the text is not this image's
        prompts = prompts[:1]
    named = str(info.get("num", ""))
    # older grids name no column count: their images are square
    columns = int(named) if named.isdigit() and 0 < int(named) <= size[0] else \
        max(1, size[0] // max(1, size[1] // len(prompts)))
    columns = min(columns, max(1, size[0]))
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
    text = untrusted.clean_text(untrusted.read_text(config_path, MAX_CONFIG_BYTES)) \
        if os.path.lexists(config_path) else ""
    try:
        cfg = from_dict(yaml.safe_load(text) or {}) if text else None
    except (LoraBoothError, yaml.YAMLError, AttributeError, TypeError, ValueError, RecursionError):
        cfg = None  # written by another version, or not by lora-booth: shown as text only
    grids = [g for g in map(read_grid, sorted((out / "samples").glob("step-*.png"))) if g]
    return Run(out, records, read_json(out / "run.json", RUN_FIELDS), read_json(out / "eval.json", EVAL_FIELDS),
               text, cfg, grids, read_grid(out / "samples" / BASE_GRID)
               if os.path.lexists(out / "samples" / BASE_GRID) else None)


def trained_counts(out: Path) -> tuple[int, int] | None:
    """(instance photos, class images) as the newest checkpoint's data fingerprint lists them."""
    folders = checkpoint.folders(out)
    try:
        data = untrusted.read_json(folders[-1] / "state.json", MAX_STATE_BYTES)["data"] if folders else None
        return (len(data["instance"]), len(data["class"])) if data else None
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None


TILE = 256          # px: the most a sample image keeps inside the page; the full PNGs stay in samples/


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def jpeg_uri(image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg")
