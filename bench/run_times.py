"""How long a benchmark run will take, from the runs already finished: a lane starts no run it cannot finish."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import measured
from run_cache import entry_task, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
# A ratio measured on one method's runs, applied to another's under another load (lanes share the cores with other
# work): CoLA's first mask runs took up to 1.22x the time their measured ratio gave.
LOAD_MARGIN = 1.25


def machine_key(m: dict | None) -> tuple | None:
    """What makes two runs' times comparable: the CPU, its cores and the GPU (threads are one per lane)."""
    return None if not m else (m.get("cpu"), m.get("cores"), m.get("gpu"))


@functools.lru_cache(maxsize=None)
def machine_here() -> dict:
    """measured.machine() of the machine this process runs on (its GPU too, when torch sees one)."""
    try:
        import torch
    except ImportError:
        torch = None
    return measured.machine(torch)


def this_machine() -> tuple | None:
    """machine_key of the machine this process runs on."""
    return machine_key(machine_here())


def on_gpu(entry: dict) -> bool:
    """Whether a run trained on a GPU: its machine has one, or (an entry without its machine) its device was cuda."""
    key = machine_key(entry.get("machine"))
    return bool(key and key[2]) or str(entry.get("device") or "").startswith("cuda")


class RunTimes:
    """Run-time estimates for a suite (quality_v2.Suite): its store's finished runs, scaled between tasks by their
    work per epoch. The suite gives `p` (the protocol), `work`, `code`, `_stored()` and `_task_work`."""

    def finished_times(self) -> list[tuple[str, str, float, int]]:
        """(task, method, wall seconds, nearness) of every finished run that still counts; nearness 2: it ran on
        this machine, 1: on another of the same kind (GPU or CPU), 0: on the other kind (a GPU run's minutes say
        nothing of a CPU lane's hours). A resumed run is left out: its time is its last part's only."""
        here = this_machine()
        here_gpu = bool(here and here[2])

        def nearness(e: dict) -> int:
            if machine_key(e.get("machine")) == here:
                return 2
            return 1 if on_gpu(e) == here_gpu else 0

        return [(e.get("task"), e.get("method"), e["train_seconds"], nearness(e))
                for e in self._stored()
                if isinstance(e.get("train_seconds"), (int, float)) and not e.get("resumed")
                and not self.code.stale(e.get("code"))]

    def task_kinds(self) -> dict[str, set[bool]]:
        """The kinds of machine (True: a GPU) each task's finished runs of current code trained on."""
        kinds: dict[str, set[bool]] = {}
        for e in self._stored():
            if "score" in e and not e.get("error") and not self.code.stale(e.get("code")):
                kinds.setdefault(entry_task(e), set()).add(on_gpu(e))
        return kinds

    def task_work(self) -> dict[str, dict]:
        """Each task's epoch in optimizer steps and padded tokens (bench/task_work.py, run once in its own process
        so this lane imports nothing it would record; kept in the work folder); {} when the data is not at hand."""
        if self._task_work is None:
            p = self.p
            key = {"data_dir": str(Path(p.data_dir).resolve()) if p.data_dir else "", "model": p.model,
                   "max_seq_length": p.max_seq_length, "batch_size": p.batch_size, "tasks": sorted(p.tasks),
                   "max_train_samples": p.max_train_samples, "max_eval_samples": p.max_eval_samples}
            path = self.work / "task-work.json"
            try:
                kept = json.loads(path.read_text())
            except (OSError, ValueError):
                kept = {}
            if kept.get("key") == key:
                self._task_work = kept["work"]
            elif not p.data_dir or not Path(p.data_dir).is_dir():
                self._task_work = {}
            else:
                cmd = [sys.executable, str(REPO / "bench" / "task_work.py"), *p.tasks, "--data-dir", p.data_dir,
                       "--model", p.model, "--max-seq-length", str(p.max_seq_length),
                       "--batch-size", str(p.batch_size)]
                cmd += ["--max-train-samples", str(p.max_train_samples)] if p.max_train_samples else []
                cmd += ["--max-eval-samples", str(p.max_eval_samples)] if p.max_eval_samples else []
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
                    self._task_work = json.loads(proc.stdout) if proc.returncode == 0 else {}
                except (subprocess.TimeoutExpired, ValueError):  # an estimate only: without it, times go unscaled
                    self._task_work = {}
                if self._task_work:
                    self.work.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(path, {"key": key, "work": self._task_work})
        return self._task_work

    def scale(self, src: str, dst: str, done: list | None = None) -> tuple[float, float]:
        """(low, high) factor from a run time on task src to one on dst: the least and LOAD_MARGIN x the greatest
        ratio dst/src of the longest runs of the methods both tasks have finished on this machine (`done`:
        finished_times), else the ratios of their steps and of their padded tokens per epoch (task_work.py: a time
        that is a positive mix of the two lies between them); (1, 1) for the same task or without figures."""
        if src == dst:
            return 1.0, 1.0
        seen = self.observed_ratios(src, dst, done or [])
        if seen:
            return min(seen), LOAD_MARGIN * max(seen)
        work = self.task_work()
        a, b = work.get(src), work.get(dst)
        if not a or not b or not a.get("steps") or not a.get("tokens"):
            return 1.0, 1.0
        ratios = (b["steps"] / a["steps"], b["tokens"] / a["tokens"])
        return min(ratios), max(ratios)

    @staticmethod
    def observed_ratios(src: str, dst: str, done: list) -> list[float]:
        """dst/src of each method's longest run on both tasks, both on this machine (another machine's times differ
        ~3x): CoLA's short sentences make its 2.3x MRPC's steps take 0.5-0.9x MRPC's time, which no work figure says."""
        longest: dict[tuple[str, str], float] = {}
        for t, m, sec, n in done:
            if n == 2 and t in (src, dst) and sec > 0:
                longest[t, m] = max(sec, longest.get((t, m), 0.0))
        return [longest[dst, m] / longest[src, m] for t, m in longest if t == src and (dst, m) in longest]

    def expected_range(self, run, done: list | None = None) -> tuple[float, float] | None:
        """A run's likely wall time, (low, high): the longest finished run of its task and method, else of its
        method on other tasks (scaled by `scale`), else of its task, else any run (scaled); at each step a run on
        this machine first (machines differ ~3x in speed), else on one of its kind (GPU or CPU). None when only runs
        of the other kind are known: a GPU run's minutes are no estimate of a CPU lane's hours (~20x), nor the
        reverse, so an unknown time is said to be unknown."""
        done = self.finished_times() if done is None else done
        levels = (lambda t, m: t == run.task and m == run.method, lambda t, m: m == run.method,
                  lambda t, m: t == run.task, lambda t, m: True)
        for same in levels:
            for near in (2, 1):
                times = [(sec, t) for t, m, sec, n in done if same(t, m) and n >= near]
                if times:
                    factor = {t: self.scale(t, run.task, done) for t in {t for _, t in times}}  # once per task
                    return (max(sec * factor[t][0] for sec, t in times), max(sec * factor[t][1] for sec, t in times))
        return None

    def expected_seconds(self, run, done: list | None = None) -> float | None:
        """The high end of `expected_range`: a lane that trusts it does not start a run it cannot finish."""
        got = self.expected_range(run, done)
        return None if got is None else got[1]
