"""kohya sd-scripts' dataset conventions, read as they are: the `N_trigger class/` repeat folders
of an image folder, and a dataset `.toml` (`--dataset_config`) turned into lora-booth's keys.
What has no lora-booth equivalent is refused with its key named, never silently dropped."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from ..io.errors import ConfigError

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")   # "10_sks dog": 10 repeats, "sks dog" the prompt
SIGNED_REPEAT_FOLDER = re.compile(r"^([+-]\d+)_(.+)$")
MAX_REPEATS = 10_000
MAX_TOML_BYTES = 1 * 2**20


def repeat_folders(folder: Path) -> list[tuple[Path, int, str]]:
    """(subfolder, repeats, prompt) for each `N_words` subfolder, in name order."""
    if not folder.is_dir():
        return []
    found = []
    for sub in sorted(folder.iterdir()):
        signed = SIGNED_REPEAT_FOLDER.match(sub.name)
        if signed and sub.is_dir():  # "-3_dog": kohya's pattern with a sign; skipping it would drop its photos
            raise ConfigError("data.instance_dir", f"{sub}: {signed.group(1)} repeats is outside 1 … {MAX_REPEATS}",
                              f"rename the folder, e.g. {signed.group(1).lstrip('+-') or '1'}_{signed.group(2)}")
        match = REPEAT_FOLDER.match(sub.name)
        if match and sub.is_dir():
            repeats = int(match.group(1))
            if not 1 <= repeats <= MAX_REPEATS:
                raise ConfigError("data.instance_dir", f"{sub}: {repeats} repeats is outside 1 … {MAX_REPEATS}",
                                  "rename the folder, e.g. 10_sks dog")
            found.append((sub, repeats, match.group(2).replace("_", " ").strip()))
    return found


# ------------------------------------------------------------------------------ dataset .toml

# kohya key → lora-booth key, with a conversion; None: a kohya key lora-booth reads itself
DATASET_KEYS = {
    "resolution": "data.resolution",
    "batch_size": "train.batch_size",
    "enable_bucket": "data.buckets",
    "bucket_reso_steps": "data.bucket_step",
}
SUBSET_KEYS = {
    "image_dir": None,          # data.instance_dir, or prior.class_dir with is_reg
    "class_tokens": None,       # data.instance_prompt, or prior.class_prompt with is_reg
    "is_reg": None,
    "num_repeats": None,        # data.repeats (class images: 1 only)
    "caption_extension": "data.caption_ext",
    "flip_aug": "data.flip",
    "random_crop": "data.crop",
    "caption_dropout_rate": "data.caption_dropout",
    "alpha_mask": "data.masks",  # true: the photos' alpha channel is the loss mask (sd-scripts' --masked_loss)
}
# keys lora-booth has no equivalent for: accepted only at kohya's default, which means "off"
OFF_BY_DEFAULT = {"shuffle_caption": False, "keep_tokens": 0, "color_aug": False, "caption_prefix": None,
                  "caption_suffix": None, "caption_tag_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
                  "token_warmup_step": 0, "bucket_no_upscale": False}


def _check_file(path: Path) -> str:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("dataset", f"{path} is not a regular file", "pass a kohya dataset .toml file")
        if info.st_size > MAX_TOML_BYTES:
            raise ConfigError("dataset", f"{path} is {info.st_size:,} bytes; a dataset config is at most "
                              f"{MAX_TOML_BYTES:,}", "pass the kohya dataset .toml")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("dataset", f"{path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError("dataset", f"cannot read {path}: {exc.strerror}", "check the path") from None


def read_dataset_toml(path: Path) -> dict[str, Any]:
    """A kohya dataset config as flat `section.key` values: one dataset, one subset of subject
    photos and at most one of class images (is_reg)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ConfigError("dataset", "needs Python 3.11 or later (tomllib)",
                          "set data.instance_dir, data.repeats, ... instead") from None
    text = _check_file(path)
    try:
        document = tomllib.loads(text)
    except RecursionError:  # lists nested thousands deep (a = [[[[…) exhaust the parser's stack
        raise ConfigError("dataset", f"{path} nests deeper than any dataset config", "flatten it") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("dataset", f"{path} is not valid TOML: {exc}", "fix the file") from None

    def where(key: str) -> str:
        return f"{path}: {key}"

    unknown = sorted(set(document) - {"general", "datasets"})
    if unknown:
        raise ConfigError(where(unknown[0]), "is not a section of a kohya dataset config", "use [general] and [[datasets]]")
    general = document.get("general", {})
    datasets = document.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or \
            not all(isinstance(d, dict) for d in datasets):
        raise ConfigError(where("datasets"), "must be [general] and [[datasets]] tables", "")
    if len(datasets) != 1:
        raise ConfigError(where("datasets"), f"holds {len(datasets)} datasets; lora-booth trains one per run",
                          "keep one [[datasets]] table (one resolution and batch size)")
    dataset = {**general, **datasets[0]}
    subsets = dataset.pop("subsets", [])
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        raise ConfigError(where("datasets.subsets"), "is missing", "add a [[datasets.subsets]] with image_dir")
    flat: dict[str, Any] = {}
    subset_defaults = {k: v for k, v in dataset.items() if k in SUBSET_KEYS or k in OFF_BY_DEFAULT}
    for key, value in dataset.items():
        if key in DATASET_KEYS:
            flat[DATASET_KEYS[key]] = _dataset_value(key, value, where)
        elif key not in SUBSET_KEYS and key not in OFF_BY_DEFAULT:
            raise ConfigError(where(key), "has no lora-booth equivalent",
                              "remove it; `lora-booth train --help` lists what can be set")
    instance = [{**subset_defaults, **s} for s in subsets if not {**subset_defaults, **s}.get("is_reg")]
    regular = [{**subset_defaults, **s} for s in subsets if {**subset_defaults, **s}.get("is_reg")]
    if len(instance) != 1:
        raise ConfigError(where("datasets.subsets"), f"has {len(instance)} subsets of subject photos; lora-booth "
                          "trains one subject folder", "keep one subset without is_reg (kohya's N_name folders "
                          "inside one image_dir also work)")
    if len(regular) > 1:
        raise ConfigError(where("datasets.subsets"), f"has {len(regular)} is_reg subsets",
                          "keep one folder of class images")
    flat.update(_subset(instance[0], False, where))
    if regular:
        flat.update(_subset(regular[0], True, where))
        # lora-booth flips and crops class rows as it does the photos: one setting for both, so a
        # class subset that sets its own, different value is refused (not set: it follows the photos)
        own = next(s for s in subsets if {**subset_defaults, **s}.get("is_reg"))
        for key in ("flip_aug", "random_crop"):
            if key in own and bool(own[key]) != bool(instance[0].get(key, False)):
                raise ConfigError(where(key), "differs between the subject photos and the class images; lora-booth "
                                  "applies one setting to both", f"set {key} the same on both subsets")
        if own.get("alpha_mask"):
            raise ConfigError(where("alpha_mask"), "is set on the class images; lora-booth never masks the loss of "
                              "class rows", "remove it from the is_reg subset")
        if regular[0].get("caption_dropout_rate") not in (None, 0, 0.0):
            raise ConfigError(where("caption_dropout_rate"), "is set on the class images; lora-booth drops captions "
                              "of subject photos only", "remove it from the is_reg subset")
    return flat


def _dataset_value(key: str, value, where):
    if key == "resolution" and isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(where(key), f"is {value}; lora-booth trains square images at one resolution",
                              "give one number, and data.buckets=true for other aspect ratios")
        return value[0]
    return value


def _subset(subset: dict, is_reg: bool, where) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in subset.items():
        if key in OFF_BY_DEFAULT:
            if value != OFF_BY_DEFAULT[key] and value not in ("", None):
                raise ConfigError(where(key), f"is {value!r}, which lora-booth has no equivalent for",
                                  f"remove it (or set it to {OFF_BY_DEFAULT[key]!r})")
        elif key not in SUBSET_KEYS:
            raise ConfigError(where(key), "has no lora-booth equivalent", "remove it")
        elif SUBSET_KEYS[key] and not is_reg:
            flat[SUBSET_KEYS[key]] = ("random" if value else "center") if key == "random_crop" else \
                ("alpha" if value else "none") if key == "alpha_mask" else value
    if not isinstance(subset.get("image_dir"), str) or not subset["image_dir"]:
        raise ConfigError(where("image_dir"), "is missing from a subset", "name the folder of images")
    repeats = subset.get("num_repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= MAX_REPEATS:
        raise ConfigError(where("num_repeats"), f"is {repeats!r}", f"give a whole number of repeats, 1 … {MAX_REPEATS}")
    if is_reg:
        if repeats != 1:
            raise ConfigError(where("num_repeats"), f"is {repeats} for the class images; lora-booth pairs each "
                              "subject row with one class image", "set num_repeats = 1 for is_reg")
        flat["prior.class_dir"] = subset["image_dir"]
        if subset.get("class_tokens"):
            flat["prior.class_prompt"] = subset["class_tokens"]
        return flat
    flat["data.instance_dir"] = subset["image_dir"]
    flat["data.repeats"] = repeats
    if subset.get("class_tokens"):
        flat["data.instance_prompt"] = subset["class_tokens"]
    return flat
