"""The rare-token check of `train` (how each tokenizer splits the trigger, and a warning for a poor
one), made as the instance prompt is typed. Only for a base model already on this machine as a
folder: a check as you type must never start a download."""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer

from .. import families
from ..config.sections import Config
from ..data import trigger
from ..families.tiny import TINY_NAMES
from ..model import loading as models


LOADING = threading.Lock()   # checks run in the server's thread pool: one load of a tokenizer at a time


@lru_cache(maxsize=8)
def _tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenizer(folder: Path):
    with LOADING:
        return _tokenizer(folder)


def notes(cfg: Config) -> list[str]:
    """What train would print about the trigger, warnings included; [] when the base is not a local folder."""
    source = cfg.model.source.strip()
    if source not in ("toyworld", *TINY_NAMES) and not Path(source).expanduser().is_dir():
        return []
    info = models.locate(cfg.model)
    folders = [info.path / families.base.TOKENIZERS.get(part, "") for part in families.family(info.family).text_parts]
    tokenizers = [tokenizer(folder) for folder in folders if folder != info.path and folder.is_dir()]
    lines: list[str] = []
    trigger.check(tokenizers, cfg, report=lines.append)
    return lines
