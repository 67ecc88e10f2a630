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


class DataError(LoraBoothError):
    """A file or folder of training data that cannot be used."""


class ModelError(LoraBoothError):
    """A base model that cannot be found, read or trained."""


class CheckpointError(LoraBoothError):
    """A checkpoint that is missing, damaged or from another run."""


class AdapterError(LoraBoothError):
    """A file that is not a LoRA adapter lora-booth can read, or one that does not fit a model."""


class WriteError(DataError):
    """A file lora-booth writes could not be written (disk full, permission, read-only)."""
