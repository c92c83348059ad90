"""Typed errors raised by the library; the CLI maps each class to a message, hint and exit code."""

from __future__ import annotations


class DiffpruneError(Exception):
    """Base class of every error the library raises on purpose."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InvalidValueError(DiffpruneError):
    """A parameter value makes no sense (a sparsity of 150%, an unknown metric name)."""


class NotFoundError(DiffpruneError):
    """A path, model or tensor the user named does not exist."""


class FormatError(DiffpruneError):
    """A diff artifact or checkpoint is corrupt, truncated or not allowed by the spec."""


class ChecksumError(FormatError):
    """A section's checksum does not match its bytes."""


class UnsupportedVersionError(FormatError):
    """The file was written by a newer (or unknown) format version."""


class BaseMismatchError(DiffpruneError):
    """The diff was made on another base model (fingerprint, names or shapes differ)."""


class OutputExistsError(DiffpruneError):
    """The output path exists and --force was not given."""


class DataError(DiffpruneError):
    """Task data is missing, empty, or has missing columns or unknown labels."""


class ThresholdNotMetError(DiffpruneError):
    """An evaluation metric fell below a --min threshold."""


class HubUnavailableError(DiffpruneError):
    """A hub download was needed but the hub cannot be reached."""
