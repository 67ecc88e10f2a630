"""The layers of a config: defaults ← preset ← user YAML (`config=`) ← kohya dataset TOML ← `key=value`,
read with bounds (files from elsewhere are untrusted), each value remembered with its source."""
from __future__ import annotations

import difflib
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from ..io.errors import ConfigError, ConfigErrors
from . import kohya_dataset as kohya_data
from .checks import validate
from .keys import canonical_key, coerce, shown
from .sections import LAYER_KEYS, SECTIONS, Config


def _flatten(data: dict, source: str, problems: list[ConfigError] | None = None) -> dict[str, Any]:
    """A YAML mapping with sections (`lora: {rank: 8}`), dotted keys or aliases → {canonical key: value}.
    With `problems`, an unknown key is added there and the rest of the file still read."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        try:
            if key in SECTIONS and isinstance(value, dict):
                for inner, inner_value in value.items():
                    try:
                        flat[canonical_key(f"{key}.{inner}", source)] = inner_value
                    except ConfigError as problem:
                        if problems is None:
                            raise
                        problems.append(problem)
            elif key in LAYER_KEYS:
                raise ConfigError(key, "cannot be set inside a config file", "pass it on the command line", source)
            else:
                flat[canonical_key(key, source)] = value
        except ConfigError as problem:
            if problems is None:
                raise
            problems.append(problem)
    return flat


def presets_dir() -> Path:
    # presets/ lives at the top of the repository; a wheel installs it as lora_booth/presets
    installed = Path(__file__).parents[1] / "presets"
    return installed if installed.is_dir() else Path(__file__).parents[2] / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


MAX_CONFIG_BYTES = 1 * 2**20
MAX_YAML_NODES = 100_000  # what the file means once every alias is expanded: a few hundred for real configs


def _expanded_size(root) -> int:
    """Values in the YAML document with every alias expanded, computed on the shared node graph
    (aliases are references there), so a 'billion laughs' file is measured, never expanded."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that contains itself counts once
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        else:
            total = 1
        sizes[id(node)] = min(total, 10 * MAX_YAML_NODES)
        return sizes[id(node)]
    return 0 if root is None else size(root)


def _read_yaml(path: Path, what: str) -> dict:
    """A config file is untrusted input: a regular file, at most 1 MiB, few aliases, safe YAML."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(what, f"{path} is not a regular file (a pipe, device or folder)", "pass a .yaml file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(what, f"{path} is {info.st_size:,} bytes; a config file is at most "
                              f"{MAX_CONFIG_BYTES:,}", "pass the YAML file of your settings")
        text = path.read_text(encoding="utf-8")
        expanded = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if expanded > MAX_YAML_NODES:
            raise ConfigError(what, f"{path} expands to {expanded:,} YAML values through its aliases (at most "
                              f"{MAX_YAML_NODES:,})", "write the values out instead of nesting anchors")
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(what, f"{path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(what, f"{path} nests deeper than any config", "flatten it") from None
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror}", "check the path") from None
    except yaml.YAMLError as exc:
        raise ConfigError(what, f"{path} is not valid YAML: {exc}", "fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(what, f"{path} must hold a mapping of keys to values", "")
    return data


PRESET_ALIASES = {"tiny": "demo"}   # the demo's name before it had its own


# what a demo preset brings along besides settings: its subject and its base. Your own photos
# (instance_dir from a config file or the command line) drop all of them, so no toy star ends up
# in your prompts, samples or model card, and you name your base model yourself.
DEMO_SUBJECT_KEYS = ("model.source", "data.instance_dir", "data.instance_prompt", "prior.class_prompt",
                     "sample.prompts")


def read_preset(name: str) -> dict[str, Any]:
    name = PRESET_ALIASES.get(name, name)
    path = presets_dir() / f"{name}.yaml"
    # a preset is a name of the shipped folder, never a path: `../x` would read any .yaml on the disk
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name) or not path.is_file():
        near = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"choose one of {', '.join(preset_names())}"
        raise ConfigError("preset", f"names no preset called {name!r}", hint)
    return _flatten(_read_yaml(path, "preset"), f"preset {name}")


def resolve(args: dict[str, str] | list[tuple[str, str]], check_paths: bool = False) -> tuple[Config, dict[str, str]]:
    """Build the config from `key=value` pairs (in order). Returns it and where each non-default value came from.
    Every problem found is reported in one ConfigErrors; check_paths=True adds whether the photo folder
    exists (train's own check; `plan` and the planner's trials need no photos)."""
    pairs = list(args.items()) if isinstance(args, dict) else list(args)
    layers: list[tuple[str, dict[str, Any]]] = []
    overrides: dict[str, Any] = {}
    if any(key == "preset" and value == "auto" for key, value in pairs):
        # the planner picks it (planning/presets.py), which sits above the config layer
        raise ConfigError("preset", "is auto, which the planner resolves",
                          "call lora_booth.resolve (or the lora-booth command), which picks the preset first")
    presets = [value for key, value in pairs if key == "preset"]
    if len(presets) > 1:
        raise ConfigError("preset", f"is given {len(presets)} times ({', '.join(presets)})",
                          "name one preset; set other keys one by one on top of it")
    datasets = [value for key, value in pairs if key == "dataset"]
    if len(datasets) > 1:  # kohya's trainer reads one --dataset_config; a second would silently win
        raise ConfigError("dataset", f"is given {len(datasets)} times ({', '.join(map(shown, datasets))})",
                          "pass one kohya dataset .toml per run")
    problems: list[ConfigError] = []  # every one is reported, in one message
    for key, value in pairs:
        try:
            if key == "preset":
                layers.insert(0, (f"preset {value}", read_preset(value)))
            elif key == "config":
                path = Path(value).expanduser()
                layers.append((str(path), _flatten(_read_yaml(path, "config"), str(path), problems)))
            elif key == "dataset":  # a kohya dataset .toml
                path = Path(value).expanduser()
                layers.append((str(path), kohya_data.read_dataset_toml(path)))
            else:
                overrides[canonical_key(key, "the command line")] = value
        except ConfigError as problem:
            problems.append(problem)
    dropped: dict[str, str] = {}  # demo subject key → the preset that set it
    if any("data.instance_dir" in flat for source, flat in layers if not source.startswith("preset ")) or \
            "data.instance_dir" in overrides:
        dropped = {k: source for source, flat in layers if source.startswith("preset ") for k in flat
                   if k in DEMO_SUBJECT_KEYS and k != "data.instance_dir"}
        layers = [(source, {k: v for k, v in flat.items() if k not in DEMO_SUBJECT_KEYS})
                  if source.startswith("preset ") else (source, flat) for source, flat in layers]
    run_folder = _run_folder(overrides.get("train.resume", ""))
    if run_folder is not None:  # resume=out/: the run's own config.yaml, continued where it stands
        saved = _flatten(_read_yaml(run_folder / "config.yaml", "train.resume"), f"{run_folder / 'config.yaml'}")
        layers.insert(1 if presets else 0, (f"{run_folder / 'config.yaml'}", saved))
        overrides.update({"train.resume": "latest", "save.output_dir": str(run_folder)})
    layers.append(("the command line", overrides))
    values: dict[str, tuple[Any, str]] = {}
    for source, flat in layers:
        for key, value in flat.items():
            try:
                values[key] = (coerce(key, value, source), source)
            except ConfigError as problem:
                problems.append(problem)
    values.update(_prompts_from_folder_names(values))
    cfg = Config()
    for key, (value, _) in values.items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    sources = {key: source for key, (_, source) in values.items()}
    try:
        validate(cfg, sources, check_paths=check_paths)
    except ConfigErrors as found:  # a key already reported as wrong is not reported again as missing
        reported = {problem.key for problem in problems}
        problems += [problem for problem in found.problems if problem.key not in reported]
    if problems:
        raise ConfigErrors(problems, _dropped_note(dropped, {problem.key for problem in problems}))
    cfg.origins = sources  # family_defaults fills the family-dependent keys no layer set
    return cfg, sources


def _dropped_note(dropped: dict[str, str], wrong: set[str]) -> str:
    """Why a demo preset's subject keys are missing: your own photos leave its toy subject behind."""
    missing = [key for key in dropped if key in wrong]
    if not missing:
        return ""
    preset = dropped[missing[0]]
    return (f"Note: {preset} sets {', '.join(dropped)} for its own toy subject. With your own photos "
            f"(data.instance_dir) these are dropped, so the toy subject ends up in none of your prompts, samples "
            f"or model card: set {', '.join(missing)} for your subject (model=toyworld trains the demo's small "
            f"base on your photos).")


def _prompts_from_folder_names(values: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """kohya's layout names the prompt in the folder (`10_sks dog/`): with one such folder and no
    prompt given, that is the prompt, as in kohya."""
    found = {}
    for prompt_key, dir_key in (("data.instance_prompt", "data.instance_dir"), ("prior.class_prompt", "prior.class_dir")):
        folder = values.get(dir_key, ("", ""))[0]
        if folder and not values.get(prompt_key, ("", ""))[0] and isinstance(folder, str) \
                and not folder.startswith("builtin:"):
            named = kohya_data.repeat_folders(Path(folder).expanduser())
            if len(named) == 1:
                found[prompt_key] = (named[0][2], f"the folder name {named[0][0].name!r}")
    return found


def _run_folder(resume: Any) -> Path | None:
    """A run's output folder (it holds the config.yaml lora-booth wrote) rather than one checkpoint."""
    if not isinstance(resume, str) or resume.strip() in ("", "latest"):
        return None
    folder = Path(resume).expanduser()
    if (folder / "config.yaml").is_file() and not (folder / "state.json").is_file():
        return folder
    return None


def from_dict(data: dict) -> Config:
    """A saved config.yaml back into a Config (validated)."""
    cfg = Config()
    flat = _flatten(data, "saved config")
    for key, value in flat.items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, coerce(key, value, "saved config"))
    validate(cfg, {})
    cfg.origins = {key: "saved config" for key in flat}
    return cfg
