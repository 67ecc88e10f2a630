"""`lora-booth train --help`: the keys most runs set, then every section, each key with its default,
type, alias and the docstring under its field, wrapped to the terminal."""
from __future__ import annotations

import dataclasses
import typing

from .keys import field_docs
from .loading import preset_names
from .sections import ALIASES, SECTIONS


def _type_name(kind) -> str:
    if typing.get_origin(kind) is typing.Union:
        inner = next(a for a in typing.get_args(kind) if a is not type(None))
        return f"{_type_name(inner)} or empty"
    if typing.get_origin(kind) is typing.Literal:
        return "|".join(map(str, typing.get_args(kind)))
    return {tuple: "list", bool: "bool", int: "int", float: "float", str: "text"}.get(kind, str(kind))


# what most runs set, shown first by `train --help` (each with its short alias where it has one)
COMMON_KEYS = ("model.source", "data.instance_dir", "data.instance_prompt", "prior.class_prompt", "save.output_dir",
               "train.max_steps", "optim.lr", "lora.rank", "lora.text_encoder", "data.resolution",
               "prior.num_class_images", "sample.every", "save.checkpoint_every", "train.resume")


def _wrapped(text: str, indent: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(40, width), initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False) or [indent]


def _key_lines(key: str, cls, name: str, aliases: dict, width: int) -> list[str]:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, tuple):
        default = ",".join(default)
    short = f"  (also: {aliases[key]})" if key in aliases else ""
    kind = _type_name(typing.get_type_hints(cls)[name])
    return [f"  {key} = {default!r}  <{kind}>{short}", *_wrapped(field_docs(cls).get(name, ""), "      ", width)]


def train_help(width: int | None = None) -> str:
    """The dozen keys most people set first, then every section; wrapped to the terminal."""
    import shutil

    width = width or shutil.get_terminal_size((100, 24)).columns
    aliases = {full: short for short, full in ALIASES.items()}
    lines = ["usage: lora-booth train [preset=NAME] [config=FILE.yaml] [dataset=KOHYA.toml] [key=value ...]", "",
             *_wrapped("Layers, later wins: defaults ← preset=NAME ← config=FILE.yaml (or a kohya dataset=FILE.toml) "
                       "← key=value. Presets: " + ", ".join(preset_names()) + " (lora-booth presets shows what each "
                       "sets). List values: a,b or [a, b] or [\"a, b\", \"c\"].", "", width), "",
             "Most runs set these:"]
    for key in COMMON_KEYS:
        section, name = key.split(".", 1)
        lines += _key_lines(key, SECTIONS[section], name, aliases, width)
    lines.append("")
    for section, cls in SECTIONS.items():
        lines += _wrapped(f"[{section}] {cls.__doc__.strip()}", "", width)
        for f in dataclasses.fields(cls):
            lines += _key_lines(f"{section}.{f.name}", cls, f.name, aliases, width)
        lines.append("")
    return "\n".join(lines)
