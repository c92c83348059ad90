"""The store of a quality table's runs: one JSON entry per finished or failed run, what still counts, and moving a
row's entries aside when it changes kind of machine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import run_times
from run_cache import entry_task, read_entries

if TYPE_CHECKING:
    from quality_v2 import Run


class RunStore:
    """Entries of a suite (quality_v2.Suite) in its `store` folder; the suite gives `settings()` and `code` (the
    code_record.Snapshot entries are judged by)."""

    def stem(self, run: Run, s: dict) -> str:
        """A run's entry name: task, method, seed and lr, then a hash of all its settings (the cache key)."""
        key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
        return f"{run.task}-{run.method}-s{run.seed}-lr{run.lr:g}-{key}"

    def cached(self, run: Run) -> dict | None:
        s = self.settings(run)
        if s is None:
            return None
        return self._entry(self.store / f"{self.stem(run, s)}.json")

    def failed(self, run: Run) -> dict | None:
        s = self.settings(run)
        return None if s is None else self._entry(self.store / f"{self.stem(run, s)}.failed.json")

    def stale_entries(self) -> int:
        """Cached runs (finished or failed) that no longer count: a file their run imported has changed since."""
        return sum(bool(self.code.stale(e.get("code"))) for e in self._stored())

    def attested_entries(self) -> int:
        """Cached runs that count because their code changed only in checked ways (code_record.EQUIVALENCE)."""
        return sum(self.code.attested(e.get("code")) for e in self._stored())

    def _stored(self):
        """Every entry in the store (finished and failed runs), parsed; unreadable files are skipped."""
        for _, e in read_entries(self.store):
            yield e

    def _entry(self, path: Path) -> dict | None:
        """A cache entry, unless a file its run imported has changed since (then the run is due again)."""
        if not path.is_file():
            return None
        entry = json.loads(path.read_text())
        return None if self.code.stale(entry.get("code")) else entry

    def retired_dir(self) -> Path:
        """Where `retire` moves entries: beside the store, `<store>-retired/`."""
        return self.store.with_name(self.store.name + "-retired")

    def retire(self, tasks: list[str], gpu: bool) -> list[Path]:
        """Move the entries (finished and failed, with any file they kept) of `tasks` that trained on a GPU (`gpu`)
        or on CPU out of the store into `retired_dir()`, so lanes of the other kind can run those rows from the
        start and each row keeps to one kind. Nothing is deleted: moving them back undoes it. The entries moved."""
        moved, dest = [], self.retired_dir()
        for f, e in read_entries(self.store):
            unknown = "score" not in e and not e.get("machine") and not e.get("device")  # an older failed entry
            if entry_task(e) not in tasks or (run_times.on_gpu(e) != gpu and not unknown):  # unknown: tried again
                continue
            kept = e.get("kept_diff")
            try:  # lanes started together may all retire: the first one moves each file, the others skip it
                if kept and (self.store / kept).is_file():
                    (dest / kept).parent.mkdir(parents=True, exist_ok=True)
                    (self.store / kept).rename(dest / kept)
                dest.mkdir(parents=True, exist_ok=True)
                f.rename(dest / f.name)
            except FileNotFoundError:
                continue
            moved.append(dest / f.name)
        return moved

    def retired_entries(self) -> dict[str, dict[str, int]]:
        """{task: {"GPU" or "CPU": entries}} in `retired_dir()`, for the report."""
        out: dict[str, dict[str, int]] = {}
        for _, e in read_entries(self.retired_dir()):
            kinds = out.setdefault(entry_task(e), {})
            kind = "GPU" if run_times.on_gpu(e) else "CPU"
            kinds[kind] = kinds.get(kind, 0) + 1
        return out
