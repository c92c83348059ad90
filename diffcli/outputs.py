"""Atomic outputs: write beside the target, rename at the end, never clobber without force."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from diffcli.errors import InvalidValueError, OutputExistsError


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless forced, before any work starts."""
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputExistsError(f"{path} already exists")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InvalidValueError(f"output folder {parent} does not exist")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, path: Path) -> None:
    """Move tmp over path; an existing path is removed only after the new one is complete."""
    if path.exists() or path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        os.replace(tmp, path)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    check_output(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent if str(path.parent) else "."))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual mode
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    check_output(path, force)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder", hint="name a file path for the output")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
