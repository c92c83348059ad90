"""Which repository files a benchmark run imported, and their content hashes: a cached run stays valid until one changes.

A run's cache entry records {path: hash} for every module of `diffcli/` and `bench/` its process imported (plus the
library modules the lane used to pack and score it, and the bench files that build its command and score it:
quality_v2.SCORING_CODE). A later lookup re-hashes those files only: a change to a file
the run never imported (the CLI's output, plots, another method) leaves its cell cached; a change to one it imported
retrains it. Hashes are taken when the run starts, so a file edited while it trains makes the cell stale, not wrong.

One exception, written by `bench/code_equivalence.py` only: a change that a check showed computes the same runs (both
commits ran the quick protocol of both tables, and every run's scores, history, bytes and .diff matched bit for bit) is
recorded in bench/results/code-equivalence.json as old hash → new hash per file, and an entry whose recorded hash
leads there counts as current. Tables say how many entries count that way.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOTS = ("diffcli", "bench")
# The measuring wrapper and this module decide nothing a run computes.
NOT_CODE = ("bench/measured.py", "bench/code_record.py", "bench/code_equivalence.py")
EQUIVALENCE = "bench/results/code-equivalence.json"  # checked changes: {old hash: new hash} per file
# Scratch, not code: lanes' worktrees and the GPU kit (its stand-in model package and carried wheels, which a run
# imports from bench/work/device-keep/site on the device machine).
SCRATCH = "bench/work/"


def _is_code(rel: str) -> bool:
    return rel not in NOT_CODE and not rel.startswith(SCRATCH)


def content_hash(data: bytes) -> str:
    """The hash a record keeps of a file's bytes: sha256, 16 hex digits."""
    return hashlib.sha256(data).hexdigest()[:16]


class Snapshot:
    """Content hashes of the repository's Python files, each re-read only when its size or mtime changed."""

    def __init__(self, root: Path, checked: bool = True):
        self.root = Path(root)
        self._memo: dict[str, tuple[tuple[int, int], str]] = {}
        self.same = equivalences(self.root / EQUIVALENCE) if checked else {}  # checked: use EQUIVALENCE

    def digest(self, rel: str) -> str | None:
        """sha256 (16 hex digits) of one file's bytes; None when it no longer exists."""
        f = self.root / rel
        try:
            st = f.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._memo.get(rel)
        if hit is None or hit[0] != stamp:
            hit = (stamp, content_hash(f.read_bytes()))
            self._memo[rel] = hit
        return hit[1]

    def library(self, roots: tuple[str, ...] = ROOTS) -> dict[str, str]:
        """Every Python file under `roots` with its hash (what a run could import)."""
        out = {}
        for top in roots:
            for f in sorted((self.root / top).rglob("*.py")):
                rel = f.relative_to(self.root).as_posix()
                if _is_code(rel):
                    out[rel] = self.digest(rel)
        return out

    def current(self, rel: str, h: str | None) -> bool:
        """Whether a file recorded with hash `h` is the file here now, or leads to it through checked changes."""
        now, seen = self.digest(rel), set()
        while h != now and (rel, h) in self.same and h not in seen:
            seen.add(h)
            h = self.same[(rel, h)]
        return h == now

    def stale(self, code: dict | None) -> list[str]:
        """The recorded files whose content differs now (all of them when nothing was recorded)."""
        if not code:
            return ["(no code recorded)"]
        return [rel for rel, h in sorted(code.items()) if _is_code(rel) and not self.current(rel, h)]

    def attested(self, code: dict | None) -> bool:
        """Current only through checked changes: some recorded file differs now, none is stale."""
        return bool(code) and not self.stale(code) and any(
            _is_code(rel) and self.digest(rel) != h for rel, h in code.items())


def equivalences(path: Path) -> dict[tuple[str, str], str]:
    """{(file, old hash): new hash} from the checks in `path` that found identical runs (none when it is absent)."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        out = {}
        for check in doc["checks"]:
            if check["result"] != "identical":
                continue
            for rel, (old, new) in check["files"].items():
                out[(str(rel), str(old))] = str(new)
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a broken record must not pass silently
        raise ValueError(f"{path}: not a code-equivalence record ({type(exc).__name__}: {exc})") from exc


def imported(root: Path, roots: tuple[str, ...] = ROOTS, extra: tuple[str, ...] = ()) -> list[str]:
    """Repository files (relative paths) of the modules this process has imported, plus `extra` paths."""
    root = Path(root).resolve()
    tops = tuple(root / t for t in roots)
    out = set()
    for path in [getattr(m, "__file__", None) for m in list(sys.modules.values())] + list(extra):
        if not path:
            continue
        p = Path(path).resolve()
        if any(p.is_relative_to(t) for t in tops) and p.suffix == ".py":
            rel = p.relative_to(root).as_posix()
            if _is_code(rel):
                out.add(rel)
    return sorted(out)


def record(at_start: dict[str, str], files: list[str], snap: Snapshot) -> dict[str, str]:
    """{file: hash} of the files a run imported, hashed as they were when it started (new files: as they are now)."""
    return {rel: at_start.get(rel) or snap.digest(rel) for rel in sorted(set(files))}


def digest_of(code: dict | None) -> str | None:
    """One short hash of a whole record, for tables (the record itself stays in the cache entry)."""
    if not code:
        return None
    return hashlib.sha256(repr(sorted(code.items())).encode()).hexdigest()[:12]
