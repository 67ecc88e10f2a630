"""Keys and values: the `--help` text read from each field's docstring, aliases and the nearest key
for a typo, and a `key=value` string turned into the field's type (or an error naming key and source)."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import typing
from functools import lru_cache
from typing import Any, Literal

from ..io.errors import ConfigError
from .sections import ALIASES, LAYER_KEYS, SECTIONS


@lru_cache(maxsize=None)
def field_docs(section: type) -> dict[str, str]:
    """The docstring under each field (PEP 257 attribute docstrings), read from the source."""
    tree = ast.parse(inspect.getsource(section))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def all_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field_type(key: str) -> Any:
    section, name = key.split(".", 1)
    return typing.get_type_hints(SECTIONS[section])[name]


def _suggest(key: str) -> str:
    candidates = all_keys() + list(ALIASES) + list(LAYER_KEYS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # "rnak" should still find "lora.rank"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[near[0]]] if near else []
    if close:
        return f"did you mean '{close[0]}'?"
    return "run `lora-booth train --help` for the list of keys"


def canonical_key(key: str, source: str) -> str:
    key = key.strip().replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key in all_keys():
        return key
    raise ConfigError(key, "is not a known key", _suggest(key), source)


def shown(value: Any, limit: int = 120) -> str:
    """A value as an error message may print it: its repr, cut short (a YAML alias can expand to
    gigabytes, and printing it was the expensive part)."""
    text = repr(value) if not isinstance(value, (dict, list, tuple)) else f"a {type(value).__name__} of {len(value)} items"
    return text if len(text) <= limit else text[:limit] + "…"


def coerce(key: str, value: Any, source: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or fail naming the key."""
    kind = _field_type(key)
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in choices:
            near = difflib.get_close_matches(str(text), [str(c) for c in choices], n=1)
            hint = f"did you mean '{near[0]}'?" if near else ""
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, not {shown(value)}", hint, source)
        return text
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(key, f"must be true or false, not {shown(value)}", "", source)
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, not {shown(value)}", "", source)
        try:
            number = kind(value) if kind is float else int(str(value).strip(), 10) if isinstance(value, str) else value
            if kind is int and isinstance(number, float):
                if not number.is_integer():
                    raise ValueError
                number = int(number)
            number = kind(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(key, f"must be {'an integer' if kind is int else 'a number'}, not {shown(value)}",
                              "", source) from None
        if kind is float and not math.isfinite(number):  # nan passes every comparison a range check makes
            raise ConfigError(key, f"must be a finite number, not {shown(value)}", "", source)
        return number
    if kind is tuple:
        items = value if isinstance(value, (list, tuple)) else list_items(key, str(value), source)
        if any(isinstance(item, (dict, list, tuple)) for item in items):
            raise ConfigError(key, f"must be a list of words or texts, not {shown(value)}", "", source)
        return tuple(str(item).strip() for item in items if item is not None and str(item).strip())
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"must be a text value, not {shown(value)}", "", source)
        return "" if value is None else str(value)
    raise TypeError(f"no coercion for {kind} ({key})")


def list_items(key: str, text: str, source: str = "") -> list:
    """A list value from the command line: `a,b` or the list syntax `[a, b]` / `["a, with comma", "b"]`
    (YAML flow, which includes JSON); brackets are never taken as part of the first item."""
    stripped = text.strip()
    if not (stripped.startswith("[") or stripped.endswith("]")):
        return stripped.split(",")
    import yaml

    try:
        items = yaml.safe_load(stripped)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list):
        raise ConfigError(key, f"is {shown(text)}, which is not a list", 'write it as [a, b] or ["a, b", "c"] '
                          "(quote items that contain commas), or as a,b", source)
    return items
