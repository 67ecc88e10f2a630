"""A run as the studio receives it (a JSON object of the CLI's train keys) → the `lora-booth train`
command line that runs it, checked first by the CLI's own loader, with the CLI's own messages.
Paths must lie in the workspace; where the run writes is the studio's choice, not the request's."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import yaml

from ..config.keys import canonical_key
from ..config.sections import SECTIONS
from ..data.files import BUILTIN_PREFIX
from ..families.tiny import TINY_NAMES
from ..io.errors import ConfigError, ConfigErrors, LoraBoothError
from ..planning import presets
from . import trigger_check
from .workspace import Workspace

# keys whose value is a path the run reads: relative to the workspace, and never outside it
PATH_KEYS = ("model.source", "model.single_file_config", "data.instance_dir", "prior.class_dir", "log.dir")
# the studio decides where a run writes and when it resumes; config= and dataset= read files the
# studio has not checked (the YAML box is the studio's config file)
STUDIO_KEYS = {"save.output_dir": "the studio gives each run its folder runs/run-<id>/",
               "train.resume": "stopped and interrupted runs resume from their page (POST /api/runs/{id}/resume)",
               "save.overwrite": "the studio never writes over a run's files",
               "config": "put the settings in the request itself (or the YAML box)",
               "dataset": "upload the photos as a dataset and set instance_dir=datasets/<name>"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MAX_KEYS = 200
MAX_YAML_CHARS = 64 * 1024


@dataclass
class Checked:
    arguments: list[str]     # key=value words of `lora-booth train`, without output_dir and resume
    max_steps: int
    summary: list[str]       # each non-default setting and its source, as the CLI prints them
    trigger: list[str]       # how the tokenizers split the trigger word, and train's warnings about it
    processes: int = 1       # launch.processes: the studio signals (save now, sample now) one process only
    draws_samples: bool = True  # sample.num > 0: "sample now" has grids to draw


def command_value(key: str, value) -> str:
    """A JSON value as the CLI would read it from `key=value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, (str, int, float)) and not isinstance(item, bool)
                                       for item in value):
        return json.dumps(value)  # the CLI's list syntax, [a, b] in YAML flow (JSON)
    raise ConfigError(key, f"must be a text, number, true/false or a list of texts, not a {type(value).__name__}")


def contained(workspace: Workspace, key: str, value: str) -> str:
    """The value a path key gets on the command line: an absolute path inside the workspace."""
    if value.startswith(BUILTIN_PREFIX) and key in ("data.instance_dir", "prior.class_dir"):
        return value                          # the sample sets inside the package
    if key == "model.source":
        if value in ("toyworld", *TINY_NAMES):
            return value
        segments = value.split("/")
        if HUB_ID.fullmatch(value) and "." not in segments and ".." not in segments \
                and not (workspace.root / value).exists():
            return value                      # a hub id, read from the model cache
    if not value:
        return value
    try:
        return str(workspace.user_path(value, key))
    except LoraBoothError as error:
        raise ConfigError(key, f"is {value[:120]!r}: {str(error).split(': ', 1)[-1]}") from None


def arguments_for(workspace: Workspace, request: dict) -> list[str]:
    if not isinstance(request, dict):
        raise ConfigError("request", "must be a JSON object of train keys, e.g. {\"preset\": \"demo\"}")
    if len(request) > MAX_KEYS:
        raise ConfigError("request", f"has {len(request)} keys; a run has at most {MAX_KEYS}")
    arguments, problems = [], []
    for key, value in flattened(request).items():
        try:
            key = str(key)
            canonical = key if key in ("preset", "config", "dataset") else canonical_key(key, "the request")
            if canonical in STUDIO_KEYS:
                raise ConfigError(key, "is set by the studio", STUDIO_KEYS[canonical])
            text = command_value(key, value)
            if canonical in PATH_KEYS:
                text = contained(workspace, canonical, text)
            arguments.append(f"{key}={text}")
        except ConfigError as problem:
            problems.append(problem)
    if problems:
        raise ConfigErrors(problems)
    return arguments


def check(workspace: Workspace, request: dict, with_trigger: bool = False) -> Checked:
    """The CLI's resolve on the request's keys, photo folder included; a ConfigError otherwise."""
    arguments = arguments_for(workspace, request)
    pairs = [tuple(word.split("=", 1)) for word in arguments]
    cfg, sources = presets.resolve(pairs + [("output_dir", str(workspace.runs / "run-new"))], check_paths=True)
    summary = [f"{key} = {getattr(getattr(cfg, key.split('.')[0]), key.split('.', 1)[1])!r}   ({source})"
               for key, source in sorted(sources.items()) if key != "save.output_dir"]
    return Checked(arguments, cfg.train.max_steps, summary, trigger_check.notes(cfg) if with_trigger else [],
                   cfg.launch.processes or 1, cfg.sample.num > 0)


def command(workspace: Workspace, run_id: int, arguments: list[str], resume: bool) -> list[str]:
    """The words after `lora-booth`: the same recipe as the CLI, the run's own folder, resume when asked."""
    return ["train", *arguments, f"output_dir={workspace.run_dir(run_id)}", *(["resume=latest"] if resume else [])]


def flattened(keys: dict) -> dict:
    """`{"lora": {"rank": 8}}` → `{"lora.rank": 8}`, as the CLI reads a config file's sections."""
    flat = {}
    for key, value in keys.items():
        if str(key) in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[str(key)] = value
    return flat


def merged_keys(fields: dict, yaml_text: str) -> dict:
    """The new-run page's common fields, then the keys of its YAML box (sections or dotted keys) over them."""
    if len(yaml_text) > MAX_YAML_CHARS:
        raise ConfigError("yaml", f"is {len(yaml_text):,} characters; at most {MAX_YAML_CHARS:,}")
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(yaml_text, Loader=yaml.SafeLoader)):
            raise ConfigError("yaml", "uses an alias (*name)", "write the values out")
        data = yaml.safe_load(yaml_text) if yaml_text.strip() else {}
    except yaml.YAMLError as error:
        raise ConfigError("yaml", f"is not valid YAML: {str(error)[:300]}", "fix the text in the box") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("yaml", "must be a mapping of keys to values, e.g. `lora: {rank: 8}` or `max_steps: 400`")
    return {**{str(k): v for k, v in fields.items() if v not in ("", None)}, **flattened(data)}


def first_lines(error: BaseException) -> list[str]:
    """An error's problems, one message each (ConfigErrors holds several)."""
    if isinstance(error, ConfigErrors) and len(error.problems) > 1:
        return [str(problem) for problem in error.problems] + ([str(error).splitlines()[-1]]
                                                              if str(error).splitlines()[-1].startswith("Note") else [])
    return [str(error)]

