"""The README and docs/ stay true to the code: the configuration reference is the schema's own
output, every key a command in the docs uses exists, every relative link lands, and the README
stays a short front door."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from lora_booth.cli import VERB_KEYS, VERBS
from lora_booth.config.sections import LAYER_KEYS, SECTIONS
from lora_booth.config.loading import PRESET_ALIASES, preset_names
from lora_booth.config.keys import canonical_key
from lora_booth.io.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
# `lora.rank` and `train.max_steps=1200`, not `lora_booth.train`, `tools/train.py` or `to_out.0`
SECTION_KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([A-Za-z_]\w*)")
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "png", "txt", "safetensors", "bin", "ckpt", "html",
                 "toml", "sh"}
COMMAND = re.compile(r"(?:\blora-booth|-m lora_booth)[ \t]+([A-Za-z_]+)")
COMMAND_END = re.compile(r"\s#|&&|;|\s\|\s")
PLACEHOLDERS = {"key", "section.key"}   # `key=value` as the docs explain the syntax


def load_generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_code(text: str) -> tuple[list[str], str]:
    """(code: fenced blocks with continuation lines joined, and inline spans), prose without code."""
    blocks = [match.group(2).replace("\\\n", " ") for match in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    spans = [match.group(2) for match in INLINE.finditer(prose)]
    return blocks + spans, INLINE.sub("", prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def pairs(command: str) -> list[tuple[str, str]]:
    """The key=value words of one command line; `[n=4]` is an optional key in a usage line."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return [tuple(word.strip("[]").lstrip("-").split("=", 1)) for word in words if "=" in word]


def key_problem(verb: str, key: str, value: str) -> str | None:
    if key in PLACEHOLDERS:
        return None
    if verb in ("train", "plan"):
        if key == "preset":
            known = {*preset_names(), *PRESET_ALIASES, "auto", ""}   # `preset=` alone names the key
            return None if value in known or value.isupper() else f"preset={value} names no preset"
        if key in LAYER_KEYS:
            return None
        try:
            canonical_key(key, "the docs")
        except ConfigError as error:
            return str(error)
        return None
    if key not in VERB_KEYS.get(verb, {}):
        return f"'{key}' is not a key of `lora-booth {verb}`"
    return None


def lone_pairs(span: str) -> list[tuple[str, str]] | None:
    """A code span that is nothing but train keys (`rank=32 max_steps=1200`): its pairs. Python
    (`relative_step=False`, calls) and kohya metadata (`ss_*`) are not lora-booth keys."""
    words = span.split()
    if not words or "(" in span or not all(re.fullmatch(r"[a-z][\w.]*=\S*", word) for word in words):
        return None
    found = [tuple(word.split("=", 1)) for word in words]
    if any(value in ("True", "False", "None") or key.startswith("ss_") for key, value in found):
        return None
    return found


def problems_in(page: Path) -> tuple[list[str], int]:
    code, _ = split_code(page.read_text(encoding="utf-8"))
    problems, checked = [], 0
    any_verb_key = {key for keys in VERB_KEYS.values() for key in keys}
    for chunk in code:
        for section, name in SECTION_KEY.findall(chunk):
            if name in FILE_SUFFIXES:
                continue
            checked += 1
            try:
                canonical_key(f"{section}.{name}", "the docs")
            except ConfigError as error:
                problems.append(f"{page.name}: `{section}.{name}`: {error}")
        for line in chunk.splitlines():
            for match in COMMAND.finditer(line):
                verb = match.group(1)
                if verb.isupper():  # `lora-booth VERB --help`
                    continue
                if verb not in VERBS:
                    problems.append(f"{page.name}: `lora-booth {verb}` is not a verb")
                    continue
                rest = line[match.end():]
                end = COMMAND_END.search(rest)
                for key, value in pairs(rest[:end.start()] if end else rest):
                    checked += 1
                    problem = key_problem(verb, key, value)
                    if problem:
                        problems.append(f"{page.name}: `lora-booth {verb} … {key}={value}`: {problem}")
        if "\n" not in chunk and not COMMAND.search(chunk):
            for key, value in lone_pairs(chunk) or []:
                if key.split(".")[0] in SECTIONS:  # checked above, as `section.key`
                    continue
                checked += 1
                if key_problem("train", key, value) and key not in any_verb_key:
                    problems.append(f"{page.name}: `{key}={value}` is neither a train key nor a key of any verb")
    return problems, checked


def test_configuration_reference_is_generated_from_the_schema():
    page = ROOT / "docs" / "configuration.md"
    expected = load_generator().reference()
    assert page.is_file() and page.read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is not the output of tools/config_reference.py: "
        "run `python tools/config_reference.py > docs/configuration.md`")


def test_every_config_key_in_the_docs_exists():
    problems, checked = [], 0
    for page in PAGES:
        found, count = problems_in(page)
        problems += found
        checked += count
    assert not problems, "\n".join(problems)
    assert checked > 200, f"only {checked} keys found in the docs: is the code-span parser broken?"


def test_the_key_check_catches_typos(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `lora.rnak=8`, then\n\n```bash\nlora-booth train preset=8gbb max_step=10 \\\n"
                    "    output_dir=out/\nlora-booth merge lora=a.safetensors:1 in=x\n```\n\n"
                    "and `rank=8 max_setps=9`; `relative_step=False` and `tools/train.py` are fine.\n",
                    encoding="utf-8")
    problems, _ = problems_in(page)
    text = "\n".join(problems)
    for wrong in ("lora.rnak", "preset=8gbb", "max_step=10", "in=x", "max_setps=9"):
        assert wrong in text, (wrong, text)
    assert len(problems) == 5, text


def test_every_relative_link_resolves():
    problems = []
    for page in PAGES:
        _, prose = split_code(page.read_text(encoding="utf-8"))
        for target in LINK.findall(prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{page.relative_to(ROOT)}: {target}: no heading #{anchor} in {resolved.name}")
    assert not problems, "\n".join(problems)


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


@pytest.mark.parametrize("command", [
    "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . && "
    ".venv/bin/lora-booth train preset=demo output_dir=out/",
])
def test_readme_keeps_the_demo_command(command):
    assert f"\n{command}\n" in README.read_text(encoding="utf-8")


def test_readme_runs_the_tests_the_way_ci_does():
    """.ci/run runs the README's test command: the two must stay the same command."""
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"\n{ci_command}\n" in README.read_text(encoding="utf-8"), ci_command
