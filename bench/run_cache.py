"""A benchmark's cache of finished runs on disk: atomic writes, and lock files so parallel lanes never train one run twice."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def claim(cache: Path) -> Path | None:
    """A lock file next to a run's cache entry, so parallel invocations never train the same run twice.

    Returns the lock path, or None when a live process holds it (a stale lock of a dead process is taken over).
    """
    lock = cache.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    return None


def file_size(path: Path) -> int | None:
    """A file's size in bytes; None when there is no such file."""
    return path.stat().st_size if path.is_file() else None


def kept_copy_fits(entry: dict, size_of) -> bool:
    """Whether a finished run's kept .diff (`kept_diff`, relative to its store; `size_of(rel)` gives its size or
    None) is the run's own file, by its recorded `bytes`: runs sized from a reference depend on that very file."""
    kept = entry.get("kept_diff")
    return bool(kept) and size_of(kept) == entry.get("bytes")


def read_entries(folder: Path) -> Iterator[tuple[Path, dict]]:
    """(path, parsed entry) of every JSON entry in a store folder, sorted by name; unreadable files are skipped."""
    for f in sorted(folder.glob("*.json")):
        try:
            yield f, json.loads(f.read_text())
        except (OSError, ValueError):
            continue


def entry_task(entry: dict) -> str | None:
    """The task an entry ran: its settings' task, else the entry's own (older entries)."""
    return (entry.get("settings") or {}).get("task", entry.get("task"))
