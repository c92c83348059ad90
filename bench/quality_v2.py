"""Quality v2 (issue 11): diffprune 0.5% against tuned baselines at equal compute, on the full GLUE train/dev sets.

Every method gets E epochs in all (diffprune's phases count together), its best dev epoch, and the same number of
learning rates, tuned on the first seed and kept for the others. Each (task, method, lr, seed) is one process,
cached under a hash of its settings; the entry records the code that trained it (every repository file the run
imported: code_record.py) and is retrained only when one of those files changes. The full protocol keeps its entries in
bench/results/quality-v2-runs/ (tracked: the table fills over several sessions and machines, a fresh checkout resumes
where the last one stopped); checkpoints, logs and locks stay in bench/work/v2/. Background lanes resume and several
lanes share the work (lock files). The table is assembled from whatever is cached.

    python bench/quality_v2.py                      # one lane of the full protocol (start several: they share)
    python bench/quality_v2.py --jobs 8             # cuda: 8 runs at a time
    python bench/quality_v2.py --hours 2.5          # a lane that starts no run it cannot finish within 2.5 h
    bench/quality_lanes.sh 2 15:10                  # 2 such lanes, from a frozen worktree of HEAD, until 15:10
    python bench/quality_v2.py --report-only        # assemble bench/results/quality-v2.md/json from the cache
    python bench/quality_v2.py --quick --tasks rte  # smoke check: capped data, one seed, one lr per method
    python bench/quality_v2.py --table methods      # issue 10: l0, swr, basis at matched bytes (quality_v2_methods.py)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import code_record  # noqa: E402
import quality_v2_rules as rules  # noqa: E402
import run_times  # noqa: E402
from run_store import RunStore  # noqa: E402
from run_times import RunTimes  # noqa: E402
from run_cache import claim, read_entries  # noqa: E402
from run_cache import write_json_atomic as _write_json_atomic  # noqa: E402
import dp_run  # noqa: E402
from dp_run import diffprune_args  # noqa: E402
from scoring import majority_score  # noqa: E402

TASKS = ("rte", "mrpc", "stsb", "cola")
TASK_FOLDERS = {"rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA"}
BASELINES = {"full": "full", "lora-qv": "lora", "lora-all": "lora-all", "bitfit": "bitfit", "head": "head"}
DIFFPRUNE = {"dp-l0": "l0", "dp-random": "random", "dp-magnitude": "magnitude", "dp-fisher": "fisher"}
METHODS = tuple(BASELINES) + tuple(DIFFPRUNE)
LABELS = {"full": "full FT", "lora-qv": "LoRA q,v r=8", "lora-all": "LoRA all-linear (.diff bytes)",
          "bitfit": "BitFit", "head": "head only", "dp-l0": "diffprune L0", "dp-random": "random mask",
          "dp-magnitude": "magnitude mask", "dp-fisher": "Fisher mask"}
# Learning rates tried per method (3 each; diffprune's is its fixed-mask lr). --quick tries the middle one only.
LR_GRID = {"full": (2e-5, 5e-5, 1e-4), "lora-qv": (5e-4, 1e-3, 2e-3), "lora-all": (5e-4, 1e-3, 2e-3),
           "bitfit": (1e-3, 3e-3, 1e-2), "head": (1e-3, 3e-3, 1e-2),
           **{m: (3e-4, 1e-3, 3e-3) for m in DIFFPRUNE}}
# What a diffprune entry records beside the library modules it imported: the lane's command and scoring code
# (dp_run.py; scoring.py loads the model it scores with, from baselines.py).
SCORING_CODE = ("bench/scoring.py", "bench/baselines.py", "bench/dp_run.py")
_rank_lock = threading.Lock()  # lora-all's rank, worked out once per (task, bytes) by one thread at a time


@dataclass
class Protocol:
    """Everything that defines the table; recorded in the results file."""

    quick: bool = False
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44])
    epochs: int = 8          # E: passes over the train set for every method
    l0_epochs: int = 5       # dp-l0's L0 epochs and dp-magnitude's dense epochs; the rest are fixed-mask epochs
    sparsity: str = "0.5%"
    model: str = "minilm"
    data_dir: str = ""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int = 32
    max_seq_length: int = 128

    def grid(self, method: str) -> tuple[float, ...]:
        g = LR_GRID[method]
        return (g[len(g) // 2],) if self.quick else g

    def split(self, method: str) -> tuple[int, int]:
        """(first-phase epochs, fixed-mask epochs) of a diffprune method: E in all, whatever the mask costs."""
        first = self.l0_epochs if DIFFPRUNE[method] in ("l0", "magnitude") else 0
        return first, self.epochs - first


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    lr: float
    seed: int


def baseline_args(s: dict, out: Path, data_dir: str) -> list[str]:
    """The `bench/baselines.py` arguments of one baseline run (trained tensors stored and scored as fp16)."""
    cmd = [str(REPO / "bench" / "baselines.py"), BASELINES[s["method"]], s["task"], "--out", str(out),
           "--data-dir", data_dir, "--model", s["model"], "--epochs", str(s["epochs"]), "--seed", str(s["seed"]),
           "--lr", f"{s['lr']:g}", "--batch-size", str(s["batch_size"]), "--max-seq-length", str(s["max_seq_length"]),
           "--store", "fp16-trained"]
    if s.get("match_bytes"):
        cmd += ["--match-bytes", str(s["match_bytes"])]
    if s["max_train_samples"]:
        cmd += ["--max-train-samples", str(s["max_train_samples"])]
    if s["max_eval_samples"]:
        cmd += ["--max-eval-samples", str(s["max_eval_samples"])]
    return cmd


_help_text: str | None = None


def trainer_methods() -> set[str]:
    """The diffprune methods `diffprune train` offers: l0 always; the others once it has --method and names them."""
    global _help_text
    if _help_text is None:
        proc = subprocess.run([sys.executable, "-m", "diffcli", "train", "--help"], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, "COLUMNS": "400", "NO_COLOR": "1"})
        _help_text = proc.stdout
    line = next((ln for ln in _help_text.splitlines() if "--method " in ln), "")  # one line at COLUMNS=400
    return {"l0"} | {m for m in (*DIFFPRUNE.values(), "swr", "basis") if m in line}


class Suite(RunStore, RunTimes):
    """The protocol, its cache of finished runs, and the order runs become ready in."""

    scoring_code = SCORING_CODE  # bench files a diffprune entry records beside the library modules it imported
    mixed_machines = False  # let a lane add runs to a task whose runs trained on the other kind of machine

    def __init__(self, proto: Protocol, work: Path, code_root: Path = REPO, store: Path | None = None):
        self.p = proto
        self.work = work  # run folders (checkpoints, logs) and locks: this machine's scratch
        self.store = Path(store) if store is not None else work  # finished and failed runs' entries
        self.code = code_record.Snapshot(code_root)
        self._task_work: dict | None = None  # task_work(), read or measured when first needed
        self._ranks: dict[tuple[str, int], int] = {}  # lora_all_rank()
        self._rank_models: dict[str, object] = {}
        self._match: dict[tuple[str, int], int] = {}  # match_bytes()

    # -------------------------------------------------------------------------------- settings and cache
    def settings(self, run: Run) -> dict | None:
        """A run's settings (the cache key); None while it waits for what it depends on (lora-all: the .diff bytes)."""
        p = self.p
        s = {"task": run.task, "method": run.method, "lr": run.lr, "seed": run.seed, "model": p.model,
             "epochs": p.epochs, "batch_size": p.batch_size, "max_seq_length": p.max_seq_length,
             "max_train_samples": p.max_train_samples, "max_eval_samples": p.max_eval_samples}
        if run.method in DIFFPRUNE:
            first, fix = p.split(run.method)
            s.update(dp_method=DIFFPRUNE[run.method], first_epochs=first, fixmask_epochs=fix, sparsity=p.sparsity,
                     values="fp16")
        else:
            s.update(store="fp16-trained")
            if run.method == "lora-all":
                ref = self.diff_bytes(run.task)
                if ref is None:
                    return None
                s["match_bytes"] = self.match_bytes(run.task, ref)
        return s

    def waiting(self, task: str, method: str) -> str | None:
        """What a run of `method` waits for before its settings exist (None: nothing)."""
        return "the dp-l0 .diff bytes" if method == "lora-all" and self.diff_bytes(task) is None else None

    def is_diffprune(self, method: str) -> bool:
        return method in DIFFPRUNE

    def fit(self, s: dict, diff, packed_bytes: int) -> tuple[object, dict]:
        """The diff to score, fitted to a byte target if the table has one (here: as trained), and what was done."""
        return diff, {}

    def match_bytes(self, task: str, ref: int) -> int:
        """The bytes lora-all's settings name: the dp-l0 .diff's, or those earlier lora-all runs of the task were
        matched to when they give the same rank. The bytes decide nothing but the rank, so a dp-l0 run retrained
        into a file a few bytes off does not retrain LoRA at the rank it already has."""
        if (task, ref) not in self._match:
            earlier = sorted({st["match_bytes"] for e in self._stored() for st in [e.get("settings")]
                              if isinstance(st, dict) and st.get("task") == task and st.get("method") == "lora-all"
                              and st.get("match_bytes") and not self.code.stale(e.get("code"))})
            same = [b for b in earlier if b == ref] or [b for b in earlier
                                                       if self.lora_all_rank(task, b) == self.lora_all_rank(task, ref)]
            self._match[(task, ref)] = same[0] if same else ref
        return self._match[(task, ref)]

    def lora_all_rank(self, task: str, match_bytes: int) -> int:
        """The rank a lora-all run matched to `match_bytes` trains at, worked out as the run does (baselines.py)."""
        from baselines import match_rank

        with _rank_lock:
            if (task, match_bytes) not in self._ranks:
                tm, cfg = self._lora_all_probe(task, match_bytes)
                self._ranks[(task, match_bytes)] = match_rank(tm.model, cfg, tm.head)[0]
            return self._ranks[(task, match_bytes)]

    def lora_all_budget(self, task: str, rank: int) -> int:
        """lora-all's equal bytes at `rank`: the largest file that buys it no higher rank (one byte under rank + 1's
        file), so a .diff at most this big gives LoRA all-linear no more than it had (rules.MATCHED)."""
        from baselines import lora_file_bytes, lora_shapes

        with _rank_lock:
            tm, cfg = self._lora_all_probe(task, 1)
            return lora_file_bytes(lora_shapes(tm.model, cfg, tm.head), rank + 1) - 1

    def _lora_all_probe(self, task: str, match_bytes: int):
        """The task's model (built once) and a lora-all config matched to `match_bytes`, as baselines.py makes them."""
        from baselines import BaselineConfig, linear_modules

        from diffcli import tasks, weights
        from diffcli.task_types import build_task_model

        if task not in self._rank_models:
            self._rank_models[task] = build_task_model(weights.resolve_model(self.p.model), tasks.task_spec(task), 0)
        tm = self._rank_models[task]
        cfg = BaselineConfig(method="lora-all", task=task, model=self.p.model, match_bytes=match_bytes,
                             store="fp16-trained")
        cfg.lora_targets = tuple(linear_modules(tm.model, tm.head))
        return tm, cfg

    def diff_bytes(self, task: str) -> int | None:
        """The .diff file size lora-all is matched to: dp-l0 at the first seed and the middle fixed-mask lr (at its
        chosen lr if that run failed, so LoRA is not left waiting for a run that never comes)."""
        g = LR_GRID["dp-l0"]
        middle = Run(task, "dp-l0", g[len(g) // 2], self.p.seeds[0])
        hit = self.cached(middle)
        if hit is None and self.failed(middle) is not None:
            chosen = self.chosen_lr(task, "dp-l0")
            hit = None if chosen is None else self.cached(Run(task, "dp-l0", chosen, self.p.seeds[0]))
        return hit["bytes"] if hit else None

    def unmatched_entries(self) -> int:
        """Entries of current code that no run of the protocol names as it stands: a run sized from a reference that
        is gone or changed (lora-all's dp-l0 .diff, the methods table's basis .diff). They count again if it returns."""
        p, stems = self.p, set()
        for task in p.tasks:
            for m in p.methods:
                for lr in p.grid(m):
                    for seed in p.seeds:
                        run = Run(task, m, lr, seed)
                        s = self.settings(run) if self.available(m) else None
                        if s is not None:
                            stems.add(self.stem(run, s))
        n = 0
        for f, e in read_entries(self.store):
            stem = f.name[:-len(".failed.json")] if f.name.endswith(".failed.json") else f.stem
            n += stem not in stems and not self.code.stale(e.get("code"))
        return n

    def available(self, method: str) -> bool:
        return method not in DIFFPRUNE or DIFFPRUNE[method] in trainer_methods()

    # -------------------------------------------------------------------------------- tuning and the plan
    def grid_scores(self, task: str, method: str) -> dict:
        """First-seed score per lr: a float, None for a failed run; lrs not done yet are absent."""
        out = {}
        for lr in self.p.grid(method):
            run = Run(task, method, lr, self.p.seeds[0])
            hit = self.cached(run)
            if hit is not None:
                out[lr] = hit["score"]
            elif self.failed(run) is not None:
                out[lr] = None
        return out

    def chosen_lr(self, task: str, method: str) -> float | None:
        return rules.choose_lr(self.p.grid(method), self.grid_scores(task, method))

    def plan(self) -> list[Run]:
        """Runs whose dependencies are met and that are neither cached nor failed, in the order to run them: task
        by task (smallest first), the first seed's grid (every method's middle lr first), then the other seeds."""
        order: list[Run] = []
        first = self.p.seeds[0]
        for task in self.p.tasks:
            for pick_middle in (True, False):
                for m in self.p.methods:
                    g = self.p.grid(m)
                    order += [Run(task, m, lr, first) for lr in g if (lr == g[len(g) // 2]) == pick_middle]
            for m in self.p.methods:
                lr = self.chosen_lr(task, m)
                if lr is not None:
                    order += [Run(task, m, lr, seed) for seed in self.p.seeds[1:]]
        other = set() if self.mixed_machines else set(self.other_kind_tasks())
        return [r for r in order if r.task not in other and self.available(r.method) and self.settings(r) is not None
                and self.cached(r) is None and self.failed(r) is None]

    def other_kind_tasks(self) -> list[str]:
        """Tasks whose finished runs all trained on the other kind of machine (CPU here on a GPU, or the reverse):
        a lane leaves them, so each task's methods are compared on one kind (`mixed_machines` overrides)."""
        here = run_times.this_machine()
        gpu = bool(here and here[2])
        return [t for t, kinds in self.task_kinds().items() if t in self.p.tasks and gpu not in kinds]

    # -------------------------------------------------------------------------------- running
    def run_one(self, run: Run) -> bool:
        """Train one run in its own process (unless another lane holds it); cache its result or its failure."""
        s = self.settings(run)
        stem = self.stem(run, s)
        lock = claim(self.work / f"{stem}.json")
        if lock is None:
            return False
        try:
            if self.cached(run) is not None or self.failed(run) is not None:  # finished while we looked
                return False
            print(f"running: {stem}", flush=True)
            run_dir = self.work / "runs" / stem
            at_start = self.code.library()
            self._drop_partial_of_other_code(run_dir, at_start)
            try:
                result = self._execute(run, s, run_dir)
            except Exception as exc:  # noqa: BLE001 - recorded, the lane goes on with the next run
                print(f"FAILED: {stem}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                _write_json_atomic(self.store / f"{stem}.failed.json",
                                   {"settings": s, "error": f"{type(exc).__name__}: {exc}"[-3000:],
                                    "machine": run_times.machine_here(),
                                    "code": self._used_code(run_dir, at_start, None, self.is_diffprune(run.method)),
                                    "finished": _now()})
                return True
            result.update(settings=s, code=self._used_code(run_dir, at_start, result.pop("imported", None),
                                                           self.is_diffprune(run.method)), finished=_now())
            result.update(self.keep(run, result, run_dir))
            _write_json_atomic(self.store / f"{stem}.json", result)
            print(f"done: {stem}: score {result['score']:.2f}, {result['train_seconds'] / 60:.1f} min", flush=True)
            return True
        finally:
            lock.unlink(missing_ok=True)

    def keep(self, run: Run, result: dict, run_dir: Path) -> dict:
        """Files a later session needs from a finished run, copied beside the entries; what to add to its entry."""
        return {}

    def _used_code(self, run_dir: Path, at_start: dict, imported: list | None, diffprune: bool) -> dict:
        """The files the run's process imported, plus (a diffprune run) the library modules this lane packed and
        scored it with; every file of the library when the run's process left no record (a failure before it wrote
        one). A baseline scores itself: its process's imports are all it used."""
        if imported is None:
            usage = run_dir / "usage.json"
            imported = json.loads(usage.read_text()).get("imported") if usage.is_file() else None
        if imported is None:
            return at_start
        lane = code_record.imported(self.code.root, roots=("diffcli",)) + list(self.scoring_code) if diffprune else []
        return code_record.record(at_start, list(imported) + lane, self.code)

    def _drop_partial_of_other_code(self, run_dir: Path, at_start: dict) -> None:
        """An interrupted run resumes only under the library code it started with; otherwise it starts over."""
        mark = run_dir / "code-start.json"
        library = {k: v for k, v in at_start.items() if k.startswith("diffcli/")}
        partial = run_dir / "ckpt.partial"
        if partial.is_dir() and (not mark.is_file() or json.loads(mark.read_text()) != library):
            print(f"  the interrupted run in {run_dir.name} used other code: starting it over", flush=True)
            shutil.rmtree(partial)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(mark, library)

    def _execute(self, run: Run, s: dict, run_dir: Path) -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        usage = run_dir / "usage.json"
        usage.unlink(missing_ok=True)
        data_dir = self.p.data_dir
        if self.is_diffprune(run.method):
            ckpt = run_dir / "ckpt"
            resumed = (run_dir / "ckpt.partial").is_dir()
            args = diffprune_args(s, ckpt, data_dir, with_method_flag="--method " in (_help_text or ""))
        else:
            resumed = False
            args = baseline_args(s, run_dir / "out", data_dir)
        cmd = [sys.executable, str(REPO / "bench" / "measured.py"), str(usage)] + args
        t0 = time.perf_counter()
        with (run_dir / "log.txt").open("w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(run_dir / 'log.txt').read_text()[-1500:]}")
        out = json.loads(proc.stdout)
        mem = json.loads(usage.read_text()) if usage.is_file() else {}
        if self.is_diffprune(run.method):
            result = self._score_diff(s, ckpt, out, run_dir)
        else:
            result = {k: v for k, v in out.items() if k not in ("settings",)}
        result.update(method=run.method, task=run.task, train_seconds=seconds, resumed=resumed,
                      peak_rss_bytes=mem.get("peak_rss_bytes"), cuda_peak_allocated=mem.get("cuda_peak_allocated"),
                      machine=mem.get("machine"), versions=mem.get("versions"), imported=mem.get("imported"),
                      command=" ".join(shlex.quote(c) for c in ["python"] + cmd[1:]))
        return result

    def _score_diff(self, s: dict, ckpt: Path, summary: dict, run_dir: Path) -> dict:
        return dp_run.score_diff(s, ckpt, summary, run_dir, self.p.data_dir, self.fit)

    def lane(self, jobs: int = 1, wait_s: float = 30.0, hours: float | None = None) -> None:
        """Take ready runs until none is left; wait while other lanes hold runs that later ones depend on.

        hours: take no run that is not expected to finish within that many hours of the lane's start (a session or
        a machine lease ends there; an unfinished run is lost, a cheaper one that fits still runs).
        """
        stop_at = None if hours is None else time.time() + 3600 * hours
        trained: list[Run] = []

        def fits(run: Run, done: list) -> bool:
            expected = self.expected_seconds(run, done) if stop_at is not None else None
            return expected is None or time.time() + expected <= stop_at

        def worker() -> None:
            while True:
                if stop_at is not None and time.time() >= stop_at:
                    return
                done = self.finished_times() if stop_at is not None else []  # read the store once per look
                ready = [r for r in self.plan() if fits(r, done)]
                took = next((r for r in ready if self.run_one(r)), None)
                if took is not None:
                    trained.append(took)
                    continue
                if not ready and not self.others_running():
                    return
                time.sleep(wait_s)

        threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        print(self.end_note(len(trained)), flush=True)

    def end_note(self, trained: int) -> str:
        """Why a lane stopped, in one line: so a lane whose filters leave it nothing to run does not end silently."""
        left = self.plan()
        waits = sorted({f"{t} {m} waits for {w}" for t in self.p.tasks for m in self.p.methods
                        if self.available(m) for w in [self.waiting(t, m)] if w})
        parts = [f"lane ends: {trained} run(s) trained"]
        if left:
            parts.append(f"{len(left)} run(s) left that would not finish before the deadline or that other lanes hold")
        parts += waits
        if not left and not waits:
            parts.append("nothing else to run for these --tasks/--methods/--seeds")
        if waits and self.p.seeds[0] != Protocol().seeds[0]:
            parts.append(f"lrs are tuned on the first of --seeds ({self.p.seeds[0]}), and what the others wait "
                         "for is made at that seed")
        return "; ".join(parts)

    def others_running(self) -> bool:
        """Whether a live process holds a run's lock (its result may make more runs ready)."""
        for lock in self.work.glob("*.lock"):
            try:
                os.kill(int(lock.read_text().strip() or 0), 0)
                return True
            except (ValueError, ProcessLookupError, FileNotFoundError):
                continue
            except PermissionError:
                return True
        return False


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ CLI
def present_tasks(tasks: list[str], data_dir: str) -> list[str]:
    """The tasks whose GLUE folder is under the data folder (the others are left out of the table)."""
    return [t for t in tasks if (Path(data_dir) / TASK_FOLDERS.get(t, t.upper())).is_dir()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", choices=("quality", "methods"), default="quality",
                    help="quality: diffprune vs baselines (issue 11); methods: l0/swr/basis at matched bytes (issue 10)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", help="default: every method of the table")
    ap.add_argument("--quick", action="store_true", help="capped data, one seed, one lr: a smoke check")
    ap.add_argument("--quick-train", type=int, default=256, help="--quick: train examples per task")
    ap.add_argument("--quick-eval", type=int, default=256, help="--quick: dev examples per task")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--epochs", type=int, help="E, epochs of every method (default 8; --quick 2)")
    ap.add_argument("--l0-epochs", type=int, help="dp-l0's L0 (and dp-magnitude's dense) epochs (default 5; --quick 1)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "glue"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time in this process (one process per run)")
    ap.add_argument("--report-only", action="store_true", help="only assemble the table from the cache")
    ap.add_argument("--hours", type=float, help="take only runs expected to end within this many hours "
                    "(the longest finished run of the same task and method): before a session or lease ends")
    ap.add_argument("--no-report", action="store_true", help="run, but do not rewrite bench/results")
    ap.add_argument("--mixed-machines", action="store_true",
                    help="also run tasks whose runs trained on the other kind of machine (CPU vs GPU)")
    for kind in ("gpu", "cpu"):
        ap.add_argument(f"--retire-{kind}-runs", metavar="TASKS",
                        help=f"first move these tasks' entries made on {kind.upper()} to <store>-retired/, so lanes of "
                        "the other kind run their rows from the start (a row keeps to one kind of machine)")
    ap.add_argument("--work-dir", default=str(REPO / "bench" / "work" / "v2"),
                    help="run folders (checkpoints, logs) and locks")
    ap.add_argument("--store-dir", help="finished runs' entries (default: the full protocol's tracked "
                    "bench/results/{quality,methods}-v2-runs/, so the table fills across sessions; --quick: the work dir)")
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    return ap.parse_args(argv)


def protocol_from(args: argparse.Namespace) -> Protocol:
    import quality_v2_methods as mt

    known, cls = (tuple(mt.METHODS), mt.MethodsProtocol) if args.table == "methods" else (METHODS, Protocol)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in (args.methods or ",".join(known)).split(",") if m.strip()]
    bad = [m for m in methods if m not in known]
    if bad:
        raise SystemExit(f"error: unknown method(s) {', '.join(bad)} (hint: choose from {', '.join(known)})")
    if "lora-all" in methods and "dp-l0" not in methods:
        raise SystemExit("error: lora-all needs dp-l0 (hint: its rank is matched to dp-l0's .diff bytes)")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    epochs = args.epochs or (2 if args.quick else 8)
    l0 = args.l0_epochs if args.l0_epochs is not None else (1 if args.quick else 5)
    if not 0 < l0 < epochs:
        raise SystemExit(f"error: --l0-epochs {l0} must leave fixed-mask epochs of --epochs {epochs} (hint: 0 < l0 < E)")
    return cls(quick=args.quick, tasks=present_tasks(tasks, args.data_dir), methods=methods,
                    seeds=seeds[:1] if args.quick else seeds, epochs=epochs, l0_epochs=l0, model=args.model,
                    data_dir=args.data_dir, max_train_samples=args.quick_train if args.quick else None,
                    max_eval_samples=args.quick_eval if args.quick else None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    proto = protocol_from(args)
    if not proto.tasks:
        print(f"error: no task data under {args.data_dir} (hint: --data-dir or $GLUE_DIR)", file=sys.stderr)
        return 3
    import quality_v2_methods as mt

    table = mt.MethodsSuite if args.table == "methods" else Suite
    work = Path(args.work_dir) / ("quick" if proto.quick else "full")
    store = args.store_dir or (None if proto.quick else Path(args.results_dir) / f"{args.table}-v2-runs")
    suite = table(proto, work, store=store)
    trainer_methods()
    suite.mixed_machines = args.mixed_machines
    for gpu, tasks in ((True, args.retire_gpu_runs), (False, args.retire_cpu_runs)):
        if tasks:
            moved = suite.retire([t.strip() for t in tasks.split(",") if t.strip()], gpu)
            print(f"retired {len(moved)} {'GPU' if gpu else 'CPU'} entries to {suite.retired_dir()}", flush=True)
    if not args.report_only:
        left = suite.other_kind_tasks() if not args.mixed_machines else []
        if left:
            print(f"leaving {', '.join(left)}: their runs trained on the other kind of machine (CPU or GPU); "
                  "a task's methods are compared on one kind (--mixed-machines adds to them anyway)", flush=True)
        suite.lane(jobs=args.jobs, hours=args.hours)
    if args.no_report:
        return 0
    shown, skip = [], False  # the table's command: what makes it, not this call's one-off moves
    for a in argv:
        if not skip and a not in ("--report-only", "--no-report") and not a.startswith("--retire-"):
            shown.append(a)
        skip = a in ("--retire-gpu-runs", "--retire-cpu-runs")
    cmd = " ".join(["python bench/quality_v2.py"] + [shlex.quote(a) for a in shown])
    commands = ["# lanes (each a background process; they share the cache):", f"OMP_NUM_THREADS=1 {cmd} --no-report",
                "# what the CPU lanes ran: N lanes, one thread each, from a frozen worktree of the commit, none",
                "# starting a run it cannot finish by the deadline (the line above with --hours and --store-dir):",
                'bench/quality_lanes.sh 2 "YYYY-MM-DD HH:MM"' + (" --table methods" if args.table == "methods" else ""),
                "# on a lent GPU machine (bench/device_kit.py prepares the two carries):",
                "bash bench/device_lanes.sh stage1; bash bench/device_lanes.sh stage2 SECONDS QJOBS MJOBS",
                "# the table:", f"{cmd} --report-only"]
    import quality_v2_report as report  # it imports this module
    import run_machines

    doc = {"date": _dt.date.today().isoformat(), "protocol": asdict(proto), "environment": run_machines.environment(),
           "lr_grids": {m: list(proto.grid(m)) for m in proto.methods},
           "trainer_methods": sorted(trainer_methods()), "commands": commands,
           "majority": {t: _floor(t, proto) for t in proto.tasks}}
    doc.update(report.assemble(suite))
    text = (mt.render if args.table == "methods" else report.render)(suite, doc, commands)
    stem = ("methods-v2" if args.table == "methods" else "quality-v2") + ("-quick" if proto.quick else "")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.md").write_text(text)
    _write_json_atomic(results / f"{stem}.json", doc)
    print(text)
    return 0


def _floor(task: str, p: Protocol) -> float | None:
    try:
        return majority_score(task, p.data_dir, p.max_train_samples, p.max_eval_samples)
    except Exception:  # noqa: BLE001 - the floor is informative only
        return None


if __name__ == "__main__":
    import quality_v2  # one copy of this module, shared with quality_v2_report

    raise SystemExit(quality_v2.main())
