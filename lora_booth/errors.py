"""Errors that users cause and can fix. The CLI prints these without a traceback;
any other exception is a bug and keeps its own."""
from __future__ import annotations


class LoraBoothError(Exception):
    """Base class: a message that says what is wrong, where, and what to do."""


class ConfigError(LoraBoothError):
    def __init__(self, key: str, problem: str, fix: str = "", source: str = "") -> None:
        where = f" (from {source})" if source else ""
        message = f"'{key}'{where} {problem}"
        if fix:
            message += f". {fix[0].upper()}{fix[1:]}"
        super().__init__(message)
        self.key = key


class ConfigErrors(ConfigError):
    """Every problem found in the settings at once: a new user fixes them in one edit, not one run
    each. Its key is the first problem's."""

    def __init__(self, problems: list[ConfigError], note: str = "") -> None:
        LoraBoothError.__init__(self, "\n".join(
            [f"{len(problems)} problems in the settings:" if len(problems) > 1 else str(problems[0])]
            + ([f"  - {problem}" for problem in problems] if len(problems) > 1 else []) + ([note] if note else [])))
        self.key = problems[0].key
        self.problems = problems


class DataError(LoraBoothError):
    """A file or folder of training data that cannot be used."""


class ModelError(LoraBoothError):
    """A base model that cannot be found, read or trained."""


class CheckpointError(LoraBoothError):
    """A checkpoint that is missing, damaged or from another run."""


class WriteError(DataError):
    """A file lora-booth writes could not be written (disk full, permission, read-only)."""
