"""The one place that maps library errors to a one-line message, a hint and an exit code."""

from __future__ import annotations

from diffcli import errors as E

# Documented in README.md ("Exit codes"). Order matters: subclasses before their parents.
EXIT_CODES: list[tuple[type[BaseException], int, str | None]] = [
    (E.InvalidValueError, 2, None),
    (E.NotFoundError, 3, None),
    (E.ChecksumError, 4, "the file is corrupt; pack it again from its checkpoint"),
    (E.UnsupportedVersionError, 4, "upgrade diffprune to read this file"),
    (E.FormatError, 4, None),
    (E.BaseMismatchError, 5, "pass the base the diff was made on, or --force to apply anyway"),
    (E.OutputExistsError, 6, "pass --force to overwrite it"),
    (E.DataError, 7, None),
    (E.ThresholdNotMetError, 8, None),
    (E.HubUnavailableError, 9, "pass a local model folder, or go online"),
    (E.DiffpruneError, 1, None),
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


def classify(exc: BaseException) -> tuple[int, str, str | None]:
    """Return (exit code, message, hint) for an exception raised under a command."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted", None
    for cls, code, default_hint in EXIT_CODES:
        if isinstance(exc, cls):
            hint = getattr(exc, "hint", None) or default_hint
            return code, str(exc), hint
    if isinstance(exc, MemoryError) or _torch_out_of_memory(exc):
        return 1, "out of memory", "try a smaller --batch-size or a machine with more memory"
    if isinstance(exc, OSError):
        # Disk full, permission denied and friends: the OS message is the clearest line.
        return 1, f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", None
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc}", "please report this with DIFFPRUNE_DEBUG=1 output"


def _torch_out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures (CPU: a RuntimeError naming the bytes; cuda: torch.OutOfMemoryError), by name: the
    CLI never imports torch to classify an error."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))
