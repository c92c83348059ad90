"""Atomic outputs: write beside the target, rename at the end, never clobber without force.

A temporary path is named `.<name>.tmp-<owner>-<random>` (a replaced output waits as `.<name>.old-<owner>-...`
for a moment), where <owner> says which process wrote it: a hash of the host name and of the boot id, the pid
and the process's start time. A run that is killed (SIGKILL, power loss) cannot remove its temporary; the next
run for the same destination on the same host removes those whose owner is provably gone (another boot, no such
process, or a pid reused by a younger process) and says where the ones it cannot judge are (another host).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, NamedTuple

from diffcli.errors import DiffpruneError, InvalidValueError, NotFoundError, OutputExistsError

log = logging.getLogger(__name__)

_OWNER = re.compile(r"(?P<host>[0-9a-f]{8})(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[A-Za-z0-9_]+")
_MAX_NAME = 150  # longer output names are shortened (with a hash) in temporary names, to stay under NAME_MAX


def _short(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


@lru_cache(maxsize=1)
def _host() -> str:
    return _short(socket.gethostname())


def _boot() -> str:
    """The kernel's boot id (Linux); pids and start times are only comparable within one boot."""
    try:
        return _short(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        return "0" * 8


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), 0 where unknown, None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@lru_cache(maxsize=1)
def _have_proc() -> bool:
    return Path("/proc/self/stat").exists()


def owner_tag(pid: int | None = None) -> str:
    """This process's (or `pid`'s, on this host and boot) owner tag for temporary names."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid) if _have_proc() else 0
    return f"{_host()}{_boot()}-{pid}-{start or 0}"


def _alive(pid: int, start: int) -> bool:
    if _have_proc():
        now = _start_time(pid)
        return now is not None and (start == 0 or now == 0 or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prefix(path: Path) -> str:
    name = path.name if len(path.name) <= _MAX_NAME else path.name[:_MAX_NAME] + "~" + _short(path.name)
    return f".{name}."


class Leftover(NamedTuple):
    """A temporary path beside an output, and whether its writer is gone (True), alive (False) or unknown (None)."""

    path: Path
    kind: str  # "tmp" (an unfinished output) or "old" (an output being replaced)
    dead: bool | None


def leftovers(path: str | Path) -> list[Leftover]:
    """The temporary paths of runs that wrote (or write) to `path`, with their owners' state."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    prefix = _prefix(path)
    found = []
    host, boot = _host(), _boot()
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    for name in names:
        if not name.startswith(prefix):
            continue
        kind, _, owner = name[len(prefix):].partition("-")
        if kind not in ("tmp", "old"):
            continue
        m = _OWNER.fullmatch(owner)
        if m is None:
            dead = None  # an older diffprune's random name: nobody can tell who wrote it
        elif m["host"] != host:
            dead = None
        elif m["boot"] != boot and boot != "0" * 8:
            dead = True
        else:
            dead = not _alive(int(m["pid"]), int(m["start"]))
        found.append(Leftover(parent / name, kind, dead))
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the temporary paths that killed runs left for `path` (never a live run's); return them.

    A dead run's `.old-` path is the previous output it was replacing: it goes back to `path` if `path` is missing.
    Leftovers whose owner cannot be judged (another host, an older diffprune) are only reported, as a warning.
    """
    path = Path(path)
    removed, unknown = [], []
    for item in leftovers(path):
        if item.dead is None:
            unknown.append(item.path)
        elif item.dead:
            try:
                if item.kind == "old" and not (path.exists() or path.is_symlink()):
                    os.replace(item.path, path)
                    log.warning("restored %s from %s, left by a killed run", path, item.path)
                    continue
                _remove(item.path)
            except FileNotFoundError:
                continue  # another run cleared it first
            except OSError as exc:
                log.warning("cannot remove %s, left by a killed run: %s", item.path, exc.strerror or exc)
                continue
            removed.append(item.path)
    if removed:
        log.info("removed %d temporary path%s left by killed runs: %s", len(removed), "s" if len(removed) > 1 else "",
                 ", ".join(str(p) for p in removed))
    if unknown:
        log.warning("%s: temporary path%s of a run on another host or an older diffprune, left in place "
                    "(remove them if no other run writes there)", ", ".join(str(p) for p in unknown),
                    "s" if len(unknown) > 1 else "")
    return removed


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless forced, before any work starts; clear what killed runs left for it."""
    if path.name in ("", ".", ".."):  # '.', '..', '/': no name to write beside and swap in
        raise InvalidValueError(f"{str(path)!r} names a folder you are in or above, not an output",
                                hint="name the output, e.g. -o out/")
    if path.exists() or path.is_symlink():
        _refuse_special(path)
        if not force:
            raise OutputExistsError(f"{path} already exists")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise NotFoundError(f"output folder {parent} does not exist")
    if not parent.is_dir():
        raise InvalidValueError(f"{parent} is not a folder, so {path} cannot be written")
    if not os.access(parent, os.W_OK | os.X_OK):  # before the work, not after it (train ran an epoch first)
        raise DiffpruneError(f"permission denied: cannot write {path} in {parent}")
    clean_stale(path)


def check_file_output(path: Path, force: bool) -> None:
    """check_output for a destination that must be a file: an existing folder is refused even with --force."""
    check_output(path, force)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder", hint="name a file path for the output")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_special(path: Path) -> None:
    """A device, pipe or socket (`-o /dev/null`), or a link to one (`/dev/stdout`), is never replaced, --force or not."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    link = stat.S_ISLNK(mode)
    if link:
        try:
            mode = path.stat().st_mode  # what the link names: a link to a device is refused like the device
        except OSError:  # a dangling link or a loop of links: replaced like a file
            return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidValueError(f"{path} {'links to' if link else 'is'} a device, pipe or socket, not a file or folder: "
                                "it is never replaced", hint="name a file or folder to write")


def _replace(tmp: Path, path: Path) -> None:
    """Move tmp over path; an existing path is removed only after the new one is complete."""
    _refuse_special(path)
    if path.is_file() and not path.is_symlink() and tmp.is_file():
        os.replace(tmp, path)  # atomic for a file over a file
    elif path.exists() or path.is_symlink():
        trash = path.with_name(f"{_prefix(path)}old-{owner_tag()}-{secrets.token_hex(4)}")
        os.replace(path, trash)
        os.replace(tmp, path)
        _remove(trash)
    else:
        os.replace(tmp, path)


def _usual_modes(tmp: Path) -> None:
    """Written files get the mode a plain open() gives (safetensors' writer makes them owner-only, 0600)."""
    mode = 0o666 & ~_umask()
    for f in ([tmp] if tmp.is_file() else tmp.rglob("*")):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def _temp_prefix(path: Path) -> tuple[str, str]:
    return f"{_prefix(path)}tmp-{owner_tag()}-", str(path.parent) if str(path.parent) else "."


@contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    check_output(path, force)
    prefix, parent = _temp_prefix(path)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual mode
    try:
        yield tmp
        _usual_modes(tmp)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    check_file_output(path, force)
    prefix, parent = _temp_prefix(path)
    fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        _usual_modes(tmp)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
