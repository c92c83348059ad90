"""bench/quality_v2.py: lr tuning, seed aggregation and target counts (unit), and one tiny end-to-end run."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[1]
_load = load_bench
rep = _load("quality_v2_rules")


# ----------------------------------------------------------------------------------------------- lr tuning
def test_choose_lr_waits_for_the_whole_grid_and_never_picks_a_failed_run():
    grid = (1e-3, 3e-3, 1e-2)
    assert rep.choose_lr(grid, {1e-3: 50.0, 3e-3: 70.0}) is None          # 1e-2 not done yet
    assert rep.choose_lr(grid, {1e-3: 50.0, 3e-3: None, 1e-2: 40.0}) == 1e-3  # 3e-3 failed
    assert rep.choose_lr(grid, {1e-3: None, 3e-3: None, 1e-2: None}) is None
    assert rep.choose_lr(grid, {1e-2: 60.0, 3e-3: 60.0, 1e-3: 55.0}) == 3e-3  # tie: the one listed first


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=5))
def test_choose_lr_picks_the_first_best_score(scores):
    grid = tuple(10.0 ** -(i + 1) for i in range(len(scores)))
    chosen = rep.choose_lr(grid, dict(zip(reversed(grid), reversed(scores))))
    assert chosen == grid[scores.index(max(scores))]


# ----------------------------------------------------------------------------------------------- aggregation
@given(st.lists(st.one_of(st.none(), st.floats(-100, 100)), max_size=6))
def test_mean_std_over_the_seeds_that_finished(values):
    mean, std, n = rep.mean_std(values)
    vals = [v for v in values if v is not None]
    assert n == len(vals)
    if not vals:
        assert mean is None and std is None
    else:
        assert math.isclose(mean, statistics.mean(vals), abs_tol=1e-9)
        assert (std is None) == (len(vals) < 2)
        if std is not None:
            assert math.isclose(std, statistics.stdev(vals), abs_tol=1e-9)


def _scores(dp: dict, **others) -> dict:
    tasks = list(dp)
    out = {t: {"dp-l0": dp[t]} for t in tasks}
    for m, vals in others.items():
        for t in tasks:
            out[t][m.replace("_", "-")] = vals[t]
    return out


def test_verdicts_follow_the_issue_targets():
    tasks = ["rte", "mrpc", "stsb", "cola"]
    dp = {"rte": 60.0, "mrpc": 80.0, "stsb": 85.0, "cola": 30.0}
    # full is 0.4 ahead on average, 1.0 at most per task: both full-FT targets pass.
    full = {"rte": 61.0, "mrpc": 80.6, "stsb": 85.0, "cola": 30.0}
    lora_qv = {"rte": 59.0, "mrpc": 81.0, "stsb": 84.0, "cola": 29.0}   # dp wins 3 of 4, and on average
    lora_all = {"rte": 50.0, "mrpc": 70.0, "stsb": 70.0, "cola": 20.0}  # the worse LoRA: not the one compared
    bitfit = {"rte": 61.0, "mrpc": 81.0, "stsb": 84.0, "cola": 29.0}    # dp wins only 2 of 4
    rnd = {"rte": 59.0, "mrpc": 79.0, "stsb": 84.0, "cola": 29.5}       # L0 0.875 ahead: < 1 pt
    v = rep.verdicts(_scores(dp, full=full, lora_qv=lora_qv, lora_all=lora_all, bitfit=bitfit, dp_random=rnd), tasks)
    assert v == {"avg_within_0.5_of_full": True, "no_task_below_1.5": True, "ahead_of_better_lora": True,
                 "ahead_of_bitfit": False, "l0_1pt_over_random": False}
    # One task 2 points below full: the per-task target fails, the average (−0.5) still passes.
    full2 = dict(full, rte=62.0, mrpc=80.0)
    v2 = rep.verdicts(_scores(dp, full=full2), tasks)
    assert v2["no_task_below_1.5"] is False and v2["avg_within_0.5_of_full"] is True
    assert v2["ahead_of_bitfit"] is None  # no BitFit cell: no verdict


def test_ahead_of_targets_need_equal_or_fewer_stored_bytes_when_sizes_are_known():
    """The issue's "ahead of LoRA and BitFit at equal or fewer stored bytes": a bigger .diff wins on score only."""
    tasks = ["rte", "mrpc"]
    dp, bitfit = {"rte": 62.0, "mrpc": 81.0}, {"rte": 56.0, "mrpc": 80.0}
    lora_qv, lora_all = {"rte": 60.0, "mrpc": 80.0}, {"rte": 61.0, "mrpc": 80.5}
    scores = _scores(dp, bitfit=bitfit, lora_qv=lora_qv, lora_all=lora_all)
    sizes = {t: {"dp-l0": 295_000, "bitfit": 59_000, "lora-qv": 152_000, "lora-all": 266_000} for t in tasks}
    assert rep.verdicts(scores, tasks)["ahead_of_bitfit"] is True                       # on score alone
    v = rep.verdicts(scores, tasks, sizes=sizes)
    assert v["ahead_of_bitfit"] is False                                               # 295 kB against 59 kB
    assert v["ahead_of_better_lora"] is True      # lora-all is matched to the dp-l0 file: its budget is equal bytes
    # a mask in dp-l0's place is held to the budget LoRA all-linear was matched to (dp-l0's file), not to its own
    big = {t: dict(sizes[t], **{"dp-magnitude": 310_000, "dp-fisher": 215_000}) for t in tasks}
    both = {t: dict(scores[t], **{"dp-magnitude": dp[t], "dp-fisher": dp[t]}) for t in tasks}
    assert rep.verdicts(both, tasks, main="dp-magnitude", sizes=big)["ahead_of_better_lora"] is False
    assert rep.verdicts(both, tasks, main="dp-fisher", sizes=big)["ahead_of_better_lora"] is True
    # LoRA q,v better and smaller than the .diff: ahead on score is not ahead at equal bytes
    qv = _scores(dp, bitfit=bitfit, lora_qv={"rte": 61.5, "mrpc": 80.9}, lora_all={"rte": 50.0, "mrpc": 70.0})
    assert rep.verdicts(qv, tasks)["ahead_of_better_lora"] is True
    assert rep.verdicts(qv, tasks, sizes=sizes)["ahead_of_better_lora"] is False
    ratios = rep.bytes_ratios(scores, sizes, tasks)
    assert ratios["ahead_of_better_lora"] == ("lora-all", 295_000 / 266_000)
    assert ratios["ahead_of_bitfit"] == ("bitfit", 295_000 / 59_000)
    # one task's size missing: no byte verdict, the score verdict stands
    gap = {"rte": sizes["rte"], "mrpc": dict(sizes["mrpc"], bitfit=None)}
    assert rep.verdicts(scores, tasks, sizes=gap)["ahead_of_bitfit"] is True
    assert rep.bytes_ratios(scores, gap, tasks)["ahead_of_bitfit"] == ("bitfit", None)


def _mask_means(l0: float, rnd: float, mag: float, fisher: float) -> dict:
    """One task's means where full FT, LoRA and BitFit sit at 60, 58, 58, 55 (so a mask at >= 59.5 meets all)."""
    return {"rte": {"full": 60.0, "lora-qv": 58.0, "lora-all": 58.0, "bitfit": 55.0, "dp-l0": l0, "dp-random": rnd,
                    "dp-magnitude": mag, "dp-fisher": fisher}}


def test_the_table_picks_the_default_mask_by_the_issues_rule():
    tasks = ["rte"]
    # L0 1.5 pt over random, no cheaper mask within 0.5: L0 stays
    d = rep.default_mask(_mask_means(62.0, 60.5, 61.0, 61.4), tasks)
    assert d["mask"] == "dp-l0" and d["l0_over_random"] is True
    # Fisher within 0.5 of L0 and meeting the targets: the cheapest such mask wins (random is not within 0.5)
    d = rep.default_mask(_mask_means(62.0, 60.5, 61.8, 61.6), tasks)
    assert d["mask"] == "dp-fisher" and d["as_good_as_l0"] == {"dp-random": False, "dp-magnitude": True,
                                                                "dp-fisher": True}
    # L0 under 1 pt over random: the cheapest mask that meets the targets, here random itself
    d = rep.default_mask(_mask_means(62.0, 61.2, 59.0, 59.0), tasks)
    assert d["mask"] == "dp-random" and "not 1 pt ahead" in d["why"]
    # no mask meets the targets (all far below full FT): the cheapest within 0.5 of the best average
    d = rep.default_mask(_mask_means(50.0, 49.6, 49.0, 49.8), tasks)
    assert d["mask"] == "dp-random" and not any(d["meets_targets"].values())
    # a byte verdict can decide it: the Fisher file larger than LoRA all-linear's fails "ahead of the better LoRA"
    sizes = {"rte": {"dp-l0": 290, "dp-random": 230, "dp-magnitude": 310, "dp-fisher": 400, "lora-qv": 150,
                     "lora-all": 300, "bitfit": 59}}
    d = rep.default_mask(_mask_means(62.0, 60.5, 61.8, 61.6), tasks, sizes)
    assert d["meets_targets"]["dp-fisher"] is False
    # a missing cell: undecided
    means = _mask_means(62.0, 60.5, 61.0, 61.4)
    means["rte"]["dp-fisher"] = None
    assert rep.default_mask(means, tasks)["mask"] is None


def test_pass_counts_count_only_seeds_with_every_cell():
    per_seed = {42: {k: True for k, _ in rep.TARGETS}, 43: {k: False for k, _ in rep.TARGETS},
                44: {k: None for k, _ in rep.TARGETS}}
    per_seed[43]["ahead_of_bitfit"] = True
    counts = rep.pass_counts(per_seed)
    assert counts["avg_within_0.5_of_full"] == (1, 2)
    assert counts["ahead_of_bitfit"] == (2, 2)


def test_verdicts_need_every_task():
    scores = {"rte": {"dp-l0": 60.0, "full": 59.0}, "mrpc": {"dp-l0": 80.0, "full": None}}
    assert rep.verdicts(scores, ["rte", "mrpc"])["avg_within_0.5_of_full"] is None
    assert rep.cheaper_masks({"rte": {"dp-l0": 60.0, "dp-random": 58.5}}, ["rte"])["dp-random"] == -1.5


# ----------------------------------------------------------------------------------------------- commands
def test_every_diffprune_method_gets_the_same_total_epochs_and_one_command_builder(tmp_path):
    q = _load("quality_v2")
    p = q.Protocol(epochs=8, l0_epochs=5, data_dir=str(tmp_path))
    assert {m: p.split(m) for m in q.DIFFPRUNE} == {"dp-l0": (5, 3), "dp-magnitude": (5, 3), "dp-random": (0, 8),
                                                    "dp-fisher": (0, 8)}
    suite = q.Suite(p, tmp_path / "work")
    s = suite.settings(q.Run("rte", "dp-random", 1e-3, 42))
    args = q.diffprune_args(s, tmp_path / "ckpt", str(tmp_path), with_method_flag=True)
    # train refuses --epochs for random/fisher (they have no first phase): the builder must not pass it
    assert "--epochs" not in args and args[args.index("--fixmask-epochs") + 1] == "8"
    assert args[args.index("--method") + 1] == "random" and args[args.index("--fixmask-lr") + 1] == "0.001"
    l0 = q.diffprune_args(suite.settings(q.Run("rte", "dp-l0", 1e-3, 42)), tmp_path / "c", "d", with_method_flag=False)
    assert "--method" not in l0  # before feat/methods, l0 is the trainer's only behaviour
    assert l0[l0.index("--epochs") + 1] == "5" and l0[l0.index("--fixmask-epochs") + 1] == "3"
    # lora-all waits for the dp-l0 .diff it is matched to
    assert suite.settings(q.Run("rte", "lora-all", 1e-3, 42)) is None
    # the lr is part of the key; the seed too
    a, b = (suite.stem(r, suite.settings(r)) for r in (q.Run("rte", "full", 5e-5, 42), q.Run("rte", "full", 5e-5, 43)))
    assert a != b


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.integration
def test_quick_protocol_runs_every_kind_and_reports_missing_cells(tmp_path: Path, monkeypatch):
    pytest.importorskip("peft")
    from tests.conftest import make_base
    from tests.test_bench_quality_smoke import _tiny_rte

    q = _load("quality_v2")
    base = make_base(tmp_path / "base")
    glue = _tiny_rte(tmp_path / "glue")
    work, results = tmp_path / "work", tmp_path / "results"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--quick", "--tasks", "rte,mrpc", "--model", str(base), "--data-dir", str(glue), "--quick-train", "24",
            "--quick-eval", "12", "--epochs", "2", "--l0-epochs", "1", "--work-dir", str(work),
            "--results-dir", str(results)]
    assert q.main(argv) == 0
    doc = json.loads((results / "quality-v2-quick.json").read_text())
    assert doc["protocol"]["quick"] and doc["protocol"]["tasks"] == ["rte"]  # no MRPC folder: left out
    available = set(doc["trainer_methods"])
    for m in q.METHODS:
        c = doc["cells"]["rte"][m]["42"]
        if m in q.DIFFPRUNE and q.DIFFPRUNE[m] not in available:
            assert c["status"] == "not run (method unavailable)", m
            continue
        assert c["status"] == "ok", (m, c)
        r = c["result"]
        assert 0.0 <= r["score"] <= 100.0 and r["bytes"] > 0 and r["train_seconds"] > 0, m
        assert r["peak_rss_bytes"] > 0, m
        assert ", 1 thread(s), " in r["machine"], (m, r["machine"])  # OMP_NUM_THREADS=1 reached the run
    cells = {m: doc["cells"]["rte"][m]["42"]["result"] for m in ("full", "bitfit", "head", "lora-all", "dp-l0")}
    # bytes are file sizes: the head < BitFit < full; LoRA all-linear fits in the .diff's bytes
    assert cells["head"]["bytes"] < cells["bitfit"]["bytes"] < cells["full"]["bytes"]
    assert cells["lora-all"]["bytes"] <= cells["dp-l0"]["bytes"] or cells["lora-all"]["lora_rank"] == 1
    assert cells["dp-l0"]["l0_density_path"] and cells["dp-l0"]["density"] < 0.0051
    text = (results / "quality-v2-quick.md").read_text()
    assert "QUICK PROTOCOL" in text and "| rte |" in text and "## Targets" in text
    # a run's cache key is the code it ran: a baseline no method's or trainer's code, an l0 run not swr's or basis's
    full = json.loads(next((work / "quick").glob("rte-full-*[0-9a-f].json")).read_text())["code"]
    assert "bench/baselines.py" in full and "diffcli/tasks.py" in full
    assert not [f for f in full if f.startswith("diffcli/methods/") or f in ("diffcli/training.py",
                                                                            "diffcli/artifact.py")]
    l0 = json.loads(next((work / "quick" / "runs").glob("rte-dp-l0-*/usage.json")).read_text())["imported"]
    assert "diffcli/methods/l0.py" in l0 and "diffcli/cli/cmd_train.py" in l0
    assert not {"diffcli/methods/swr.py", "diffcli/methods/basis.py", "diffcli/cli/cmd_inspect.py"} & set(l0)

    # A rerun trains nothing; the report of an empty cache marks every cell missing.
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if "runs" not in p.parts}
    assert q.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if "runs" not in p.parts} == stamps
    empty = argv[:-4] + ["--work-dir", str(tmp_path / "empty"), "--results-dir", str(results), "--report-only"]
    assert q.main(empty) == 0
    doc = json.loads((results / "quality-v2-quick.json").read_text())
    assert doc["cells"]["rte"]["full"]["42"] == {"status": "lr tuning: 0/1 done", "result": None}
    assert doc["cells"]["rte"]["lora-all"]["42"]["status"] == "waiting (needs the dp-l0 .diff bytes)"
    assert all(v is None for v in doc["verdicts_on_means"].values())
    assert "—" in (results / "quality-v2-quick.md").read_text()


# ----------------------------------------------------------------------------------------------- the lane's plan
def _fake_suite(tmp_path, monkeypatch, fail=()):
    """A Suite whose runs are instant fakes: score = 100·lr·1000 + seed/100, bytes 5000 (dp) or 3000."""
    q = _load("quality_v2")
    report = _load("quality_v2_report")
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0"})
    executed = []

    def fake(self, run, s, run_dir):
        executed.append((run.method, run.lr, run.seed, s.get("match_bytes")))
        if (run.method, run.lr) in fail:
            raise RuntimeError("exit 1: boom")
        return {"score": 100 * run.lr * 1000 + run.seed / 100, "bytes": 5000 if run.method == "dp-l0" else 3000,
                "train_seconds": 1.0, "peak_rss_bytes": 1}

    monkeypatch.setattr(q.Suite, "_execute", fake)
    p = q.Protocol(tasks=["rte"], methods=["full", "dp-l0", "lora-all", "dp-random"], seeds=[1, 2, 3],
                   data_dir=str(tmp_path))
    return q, report, q.Suite(p, tmp_path / "work"), executed


def test_lane_tunes_on_the_first_seed_then_runs_the_others_at_the_chosen_lr(tmp_path, monkeypatch):
    q, report, suite, executed = _fake_suite(tmp_path, monkeypatch)
    suite.lane(wait_s=0)
    first = [e for e in executed if e[2] == 1]
    assert sorted((m, lr) for m, lr, _, _ in first) == sorted(
        (m, lr) for m in ("full", "dp-l0", "lora-all") for lr in q.LR_GRID[m])
    # the highest lr scores best here: seeds 2 and 3 run only there
    later = sorted((m, lr, seed) for m, lr, seed, _ in executed if seed != 1)
    assert later == sorted((m, q.LR_GRID[m][-1], seed) for m in ("full", "dp-l0", "lora-all") for seed in (2, 3))
    # lora-all is matched to the dp-l0 .diff of seed 1 at the middle lr, on every seed
    assert {mb for m, _, _, mb in executed if m == "lora-all"} == {5000}
    assert not any(m == "dp-random" for m, *_ in executed)  # not in the trainer yet
    doc = report.assemble(suite)
    cell = doc["table"]["rte"]["full"]
    assert cell["n"] == 3 and cell["lr"] == 1e-4 and math.isclose(cell["mean"], 10.02)
    assert doc["cells"]["rte"]["dp-random"]["2"]["status"] == "not run (method unavailable)"
    assert doc["pass_counts"]["avg_within_0.5_of_full"] == (3, 3)  # dp-l0 (3e-3 → 300) far above full
    assert doc["pass_counts"]["l0_1pt_over_random"] == (0, 0)
    assert doc["progress"] == {"finished": 3 * (3 + 2), "failed": 0, "planned": 3 * (3 + 2), "stale": 0,
                               "unmatched": 0, "hours_left": 0.0, "hours_left_low": 0.0}
    executed.clear()
    suite.lane(wait_s=0)  # everything cached: nothing runs again
    assert executed == []


def test_lora_all_keeps_its_runs_when_a_retrained_dp_l0_diff_gives_the_same_rank(tmp_path, monkeypatch):
    """The .diff bytes decide only lora-all's rank: a dp-l0 file a few bytes off must not retrain it; another rank
    must, and the runs of the old rank are then counted as matching no run."""
    q, report, suite, executed = _fake_suite(tmp_path, monkeypatch)
    monkeypatch.setattr(q.Suite, "lora_all_rank", lambda self, task, b: b // 1000)
    suite.lane(wait_s=0)
    ref = next(suite.work.glob("rte-dp-l0-s1-lr0.001-*.json"))

    def retrain_reference(nbytes):
        entry = json.loads(ref.read_text())
        ref.write_text(json.dumps({**entry, "bytes": nbytes}))
        fresh = q.Suite(suite.p, suite.work)
        executed.clear()
        return fresh

    fresh = retrain_reference(5004)  # same rank (5): every lora-all run still counts
    assert fresh.settings(q.Run("rte", "lora-all", 1e-3, 1))["match_bytes"] == 5000
    assert report.assemble(fresh)["progress"]["unmatched"] == 0
    fresh.lane(wait_s=0)
    assert executed == []
    fresh = retrain_reference(6000)  # another rank: lora-all trains again, matched to the new file
    assert fresh.settings(q.Run("rte", "lora-all", 1e-3, 1))["match_bytes"] == 6000
    assert report.assemble(fresh)["progress"]["unmatched"] == 5  # 3 lrs of seed 1, seeds 2 and 3
    fresh.lane(wait_s=0)
    assert sorted(e for e in executed if e[0] == "lora-all") == sorted(
        [("lora-all", lr, 1, 6000) for lr in q.LR_GRID["lora-all"]]
        + [("lora-all", q.LR_GRID["lora-all"][-1], seed, 6000) for seed in (2, 3)])


def test_a_failed_run_is_recorded_not_retried_and_never_chosen(tmp_path, monkeypatch):
    q, report, suite, executed = _fake_suite(tmp_path, monkeypatch, fail={("full", 1e-4)})
    suite.lane(wait_s=0)
    assert suite.chosen_lr("rte", "full") == 5e-5  # the best lr that did not fail
    assert list(suite.work.glob("rte-full-s1-lr0.0001-*.failed.json"))
    assert not list(suite.work.glob("*.lock"))
    n = len(executed)
    suite.lane(wait_s=0)
    assert len(executed) == n
    doc = report.assemble(suite)
    assert doc["table"]["rte"]["full"]["grid"]["0.0001"] is None  # shown as 'failed' in the tuning list
    assert doc["progress"]["failed"] == 1
    assert "0.0001 → failed" in report.render(suite, {**doc, "environment": report.environment(), "date": "d",
                                                      "majority": {}}, ["cmd"])


def test_a_lane_with_hours_takes_only_runs_expected_to_end_in_time(tmp_path, monkeypatch):
    q, report, suite, executed = _fake_suite(tmp_path, monkeypatch)
    real = q.Suite._execute

    def slow(self, run, s, run_dir):
        return {**real(self, run, s, run_dir), "train_seconds": 7200.0, "task": run.task, "method": run.method}

    monkeypatch.setattr(q.Suite, "_execute", slow)
    suite.lane(wait_s=0, hours=1.0)   # the first run has no record to go by; after it, every rte run looks 2 h long
    assert executed == [("full", q.LR_GRID["full"][1], 1, None)]
    assert suite.expected_seconds(q.Run("rte", "dp-l0", 1e-3, 1)) == 7200.0
    assert report.assemble(suite)["progress"]["hours_left"] == 14 * 2.0  # 15 planned runs, one done, each 2 h
    suite.lane(wait_s=0, hours=1.9)
    assert len(executed) == 1
    suite.lane(wait_s=0, hours=3.0)   # 2 h fit in 3: the lane goes on (its fake runs take no real time)
    assert len(executed) == 3 * (3 + 2)


def test_a_lane_judges_a_runs_time_by_this_machine_first(tmp_path, monkeypatch):
    """A run measured on a 3x slower machine must not keep a lane here from a run that fits (nor a fast one elsewhere
    make it start one that does not)."""
    q, _report, suite, _executed = _fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    monkeypatch.setattr(q, "_this_machine", lambda: q._machine_key(here))
    entries = [{"task": "rte", "method": "full", "train_seconds": 4800.0, "machine": dict(here, cpu="CPU S")},
               {"task": "rte", "method": "full", "train_seconds": 1500.0, "machine": dict(here, threads=1)},
               {"task": "rte", "method": "bitfit", "train_seconds": 2500.0},
               {"task": "mrpc", "method": "head", "train_seconds": 900.0, "machine": here}]
    monkeypatch.setattr(q.Suite, "_stored", lambda self: entries)
    monkeypatch.setattr(suite.code, "stale", lambda code: False)  # these fake entries name no code
    suite._task_work = {}  # no figures to scale other tasks' runs by: they count as they are
    assert suite.expected_seconds(q.Run("rte", "full", 1e-4, 42)) == 1500.0      # here, not the slow machine's
    assert suite.expected_seconds(q.Run("rte", "bitfit", 1e-3, 42)) == 2500.0    # none here: any machine's
    assert suite.expected_seconds(q.Run("rte", "lora-qv", 1e-3, 42)) == 1500.0   # the task's, here first
    assert suite.expected_seconds(q.Run("rte", "head", 1e-3, 42)) == 900.0       # the method's on another task
    assert suite.expected_seconds(q.Run("stsb", "full", 1e-3, 42)) == 1500.0     # the method's, here
    entries[1]["machine"] = dict(here, cpu="CPU F")
    assert suite.expected_seconds(q.Run("rte", "full", 1e-4, 42)) == 4800.0      # nothing here: the longest


def test_a_cpu_lane_does_not_judge_a_run_by_a_gpu_runs_minutes(tmp_path, monkeypatch):
    """Entries made on a lent GPU machine take a minute where a CPU lane takes half an hour: a CPU lane goes by them
    only when no CPU run tells it anything."""
    q, _report, suite, _executed = _fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    gpu = {"cpu": "CPU G", "cores": 16, "gpu": "NVIDIA H200"}
    monkeypatch.setattr(q, "_this_machine", lambda: q._machine_key(here))
    suite._task_work = {}
    entries = [{"task": "rte", "method": "bitfit", "train_seconds": 60.0, "machine": gpu},
               {"task": "rte", "method": "full", "train_seconds": 50.0, "device": "cuda"},   # no machine: its device
               {"task": "rte", "method": "full", "train_seconds": 1500.0, "machine": dict(here, cpu="CPU O")},
               {"task": "rte", "method": "head", "train_seconds": 900.0}]                   # CPU, machine unknown
    monkeypatch.setattr(q.Suite, "_stored", lambda self: entries)
    monkeypatch.setattr(suite.code, "stale", lambda code: False)
    assert [n for *_, n in suite.finished_times()] == [0, 0, 1, 1]
    assert suite.expected_seconds(q.Run("rte", "full", 1e-4, 42)) == 1500.0
    assert suite.expected_seconds(q.Run("rte", "bitfit", 1e-3, 42)) == 1500.0   # the task's CPU runs, not 60 s
    del entries[2:]
    assert suite.expected_seconds(q.Run("rte", "bitfit", 1e-3, 42)) == 60.0     # nothing but GPU runs: those


def test_a_task_without_runs_is_estimated_from_other_tasks_scaled_by_steps_and_tokens(tmp_path, monkeypatch):
    """MRPC's first run must not be judged by RTE's time as it is (MRPC has 1.5x RTE's steps): the estimate is the
    range between the step and the token ratios, the lane goes by its high end, the report shows both."""
    q, report, suite, _executed = _fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    monkeypatch.setattr(q, "_this_machine", lambda: q._machine_key(here))
    suite._task_work = {"rte": {"steps": 100, "tokens": 1000}, "mrpc": {"steps": 150, "tokens": 900},
                        "cola": {"steps": 300, "tokens": 600}}
    entries = [{"task": "rte", "method": "full", "train_seconds": 1000.0, "machine": here},
               {"task": "rte", "method": "head", "train_seconds": 400.0, "machine": here}]
    monkeypatch.setattr(q.Suite, "_stored", lambda self: entries)
    monkeypatch.setattr(suite.code, "stale", lambda code: False)
    assert suite.scale("rte", "mrpc") == (0.9, 1.5) and suite.scale("mrpc", "mrpc") == (1.0, 1.0)
    assert suite.expected_range(q.Run("mrpc", "full", 1e-4, 42)) == (900.0, 1500.0)
    assert suite.expected_seconds(q.Run("cola", "head", 1e-4, 42)) == 1200.0     # 400 s x 3 (steps)
    assert suite.expected_range(q.Run("cola", "bitfit", 1e-4, 42)) == (600.0, 3000.0)  # any run: the longest
    assert suite.expected_range(q.Run("rte", "bitfit", 1e-4, 42)) == (1000.0, 1000.0)  # its task's: as it is
    assert suite.scale("rte", "stsb") == (1.0, 1.0)  # no figures for a task: unscaled
    suite.p.tasks = ["rte", "mrpc"]
    doc = report.assemble(suite)
    assert doc["progress"]["hours_left_low"] < doc["progress"]["hours_left"]
    assert report._hours_left(doc["progress"]) == (f"{doc['progress']['hours_left_low']:g}–"
                                                   f"{doc['progress']['hours_left']:g}")


def test_task_work_counts_steps_and_the_tokens_of_randomly_padded_batches(tmp_path):
    """Dynamic padding of random batches computes on each batch's longest example; backward counts twice."""
    tw = _load("task_work")
    assert tw.padded_tokens([5] * 64, 32) == 5 * 64
    assert tw.padded_tokens([1] * 31 + [100], 32) == 100 * 32       # one long example pads its whole batch
    mixed = [1] * 32 + [100] * 32
    assert 32 * 100 < tw.padded_tokens(mixed, 32) <= 64 * 100        # shuffled: both batches hold a long one
    assert tw.epoch_work([10] * 33, [4, 6], 32) == {"train_examples": 33, "steps": 2, "tokens": 3 * 330 + 10}


def test_task_work_measures_a_real_glue_folder_and_leaves_out_a_task_without_data(tiny_base):
    from diffcli import example_data

    tw = _load("task_work")
    work = tw.measure(["rte", "mrpc"], str(example_data.ROOT), str(tiny_base), 128, 32)
    assert set(work) == {"rte"}  # the bundled example set has RTE only
    assert work["rte"]["train_examples"] == 300 and work["rte"]["steps"] == 10
    assert work["rte"]["tokens"] > 3 * 300 * 8  # pairs of sentences, many tokens each


def test_a_suite_measures_task_work_in_a_subprocess_once_and_keeps_it_in_the_work_folder(tmp_path, tiny_base,
                                                                                          monkeypatch):
    from diffcli import example_data

    q = _load("quality_v2")
    p = q.Protocol(tasks=["rte"], model=str(tiny_base), data_dir=str(example_data.ROOT))
    work = q.Suite(p, tmp_path / "work").task_work()
    assert work["rte"]["steps"] == 10 and work["rte"]["tokens"] > 0
    assert json.loads((tmp_path / "work" / "task-work.json").read_text())["work"] == work

    def no_subprocess(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(q.subprocess, "run", no_subprocess)
    assert q.Suite(p, tmp_path / "work").task_work() == work           # read back, not measured again
    other = q.Protocol(tasks=["rte"], model=str(tiny_base), data_dir=str(tmp_path / "nowhere"))
    assert q.Suite(other, tmp_path / "work").task_work() == {}          # no data: no figures, no process


def test_a_runs_command_is_shown_relative_to_the_checkout_that_ran_it():
    report = _load("quality_v2_report")
    cmd = ("python /work/wt-x/bench/measured.py /work/wt-x/bench/work/v2/full/runs/r/usage.json -m diffcli train "
           f"--data-dir /data/glue -o {REPO}/bench/work/v2/full/runs/r/ckpt")
    assert report._brief({"score": 1.0, "command": cmd})["command"] == (
        "python bench/measured.py bench/work/v2/full/runs/r/usage.json -m diffcli train --data-dir /data/glue "
        "-o bench/work/v2/full/runs/r/ckpt")


# ----------------------------------------------------------------------------------------------- the code a run used
def _code_suite(tmp_path, monkeypatch, imports=("diffcli/train.py",), fail=False):
    """A Suite over a repository of three files whose fake runs import `imports`; the partial each run saw."""
    q = _load("quality_v2")
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0"})
    root = tmp_path / "repo"
    for rel in ("diffcli/train.py", "diffcli/plot.py", "bench/baselines.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    executed = []

    def fake(self, run, s, run_dir):
        executed.append(((run.method, run.lr), (run_dir / "ckpt.partial").is_dir()))
        if fail:
            (run_dir / "usage.json").write_text(json.dumps({"imported": list(imports)}))
            raise RuntimeError("exit 1: boom")
        return {"score": 50.0 + run.lr, "bytes": 10, "train_seconds": 1.0, "imported": list(imports)}

    monkeypatch.setattr(q.Suite, "_execute", fake)
    p = q.Protocol(quick=True, tasks=["rte"], methods=["full", "dp-l0"], seeds=[1], data_dir=str(tmp_path))
    return q, q.Suite(p, tmp_path / "work", code_root=root), root, executed


def _touch(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_cached_run_is_retrained_when_a_file_it_imported_changes_and_only_then(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch)
    suite.lane(wait_s=0)
    assert len(executed) == 2
    entry = suite.cached(q.Run("rte", "full", q.LR_GRID["full"][1], 1))
    assert set(entry["code"]) == {"diffcli/train.py"}  # a baseline: what its process imported, nothing else
    dp = suite.cached(q.Run("rte", "dp-l0", q.LR_GRID["dp-l0"][1], 1))
    assert set(dp["code"]) >= {"diffcli/train.py", *q.SCORING_CODE}  # a diffprune run: and the lane's scoring
    executed.clear()
    _touch(root / "diffcli/plot.py", "x = 1\n")      # a file no run imported: every cell stays cached
    (root / "diffcli/new.py").write_text("y = 2\n")
    suite.lane(wait_s=0)
    assert executed == []
    assert suite.stale_entries() == 0
    _touch(root / "diffcli/train.py", "z = 3\n")     # a file every run imported: every cell is due again
    assert suite.cached(q.Run("rte", "full", q.LR_GRID["full"][1], 1)) is None
    assert suite.stale_entries() == 2
    report = _load("quality_v2_report")
    doc = report.assemble(suite)
    text = report.render(suite, {**doc, "environment": report.environment(), "date": "d", "majority": {}}, ["cmd"])
    assert "2 cached runs left out: code they imported has changed since" in text
    suite.lane(wait_s=0)
    assert len(executed) == 2
    executed.clear()
    suite.lane(wait_s=0)
    assert executed == []
    (root / "diffcli/train.py").unlink()               # a file that is gone counts as changed
    assert suite.plan() and len(suite.plan()) == 2


def test_a_failure_is_retried_after_the_code_it_ran_changes(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch, fail=True)
    suite.lane(wait_s=0)
    assert len(executed) == 2 and len(list(suite.work.glob("*.failed.json"))) == 2
    suite.lane(wait_s=0)
    assert len(executed) == 2                          # recorded, not retried
    _touch(root / "diffcli/plot.py", "w = 4\n")  # not imported by the failed runs
    suite.lane(wait_s=0)
    assert len(executed) == 2
    _touch(root / "diffcli/train.py", "fix = 1\n")
    suite.lane(wait_s=0)
    assert len(executed) == 4


def test_an_interrupted_run_resumes_only_under_the_library_code_it_started_with(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch)
    run = q.Run("rte", "dp-l0", q.LR_GRID["dp-l0"][1], 1)
    run_dir = suite.work / "runs" / suite.stem(run, suite.settings(run))
    # started with today's library, then interrupted: it resumes
    (run_dir / "ckpt.partial").mkdir(parents=True)
    lib = {k: v for k, v in suite.code.library().items() if k.startswith("diffcli/")}
    (run_dir / "code-start.json").write_text(json.dumps(lib))
    assert suite.run_one(run) and executed[-1] == (("dp-l0", run.lr), True)
    # started under other code (or before the mark existed): the partial is dropped, the run starts over
    for mark in ({**lib, "diffcli/train.py": "0" * 16}, None):
        (suite.work / f"{suite.stem(run, suite.settings(run))}.json").unlink()
        (run_dir / "ckpt.partial").mkdir(exist_ok=True)
        if mark is None:
            (run_dir / "code-start.json").unlink()
        else:
            (run_dir / "code-start.json").write_text(json.dumps(mark))
        assert suite.run_one(run) and executed[-1] == (("dp-l0", run.lr), False)
        assert not (run_dir / "ckpt.partial").exists()


def test_measured_records_the_repository_files_a_run_imported(tmp_path):
    import subprocess

    usage = tmp_path / "usage.json"
    script = tmp_path / "run.py"
    script.write_text("import diffcli.metrics\n")
    subprocess.run([sys.executable, str(REPO / "bench" / "measured.py"), str(usage), str(script)], check=True,
                   cwd=REPO)
    written = json.loads(usage.read_text())
    got = written["imported"]
    assert "diffcli/metrics.py" in got and "diffcli/__init__.py" in got
    assert written["machine"]["cores"] == os.cpu_count() and written["machine"]["cpu"]
    assert "diffcli/artifact.py" not in got and "bench/measured.py" not in got
    subprocess.run([sys.executable, str(REPO / "bench" / "measured.py"), str(usage), "-m", "diffcli", "--help"],
                   check=True, cwd=REPO, capture_output=True)
    got = json.loads(usage.read_text())["imported"]
    assert "diffcli/__main__.py" in got and "diffcli/cli/app.py" in got


def test_report_letters_each_machine_and_marks_entries_without_one():
    """Train times from two machines must not read as one comparison: each run's row names its machine."""
    report = _load("quality_v2_report")
    fast = {"cpu": "CPU X", "cores": 2, "threads": 1, "gpu": None}
    slow = dict(fast, cpu="CPU Y")
    runs = {"a": {"finished": "2026-01-02", "machine": fast}, "b": {"finished": "2026-01-01"},
            "c": {"finished": "2026-01-03", "machine": slow}, "d": {"finished": "2026-01-04", "machine": dict(fast)}}
    doc = {"cells": {"rte": {m: {"42": {"status": "ok", "result": report._brief(r)}} for m, r in runs.items()}}}
    letters = report.machine_letters(doc)
    assert letters == {None: "?", report.machine_text(fast): "A", report.machine_text(slow): "B"}
    legend = "\n".join(report.machine_legend(letters))
    assert "- A: CPU X, 2 cores, 1 thread(s), no GPU" in legend and "- B: CPU Y" in legend
    assert "- ?: not recorded" in legend
    assert "?: not recorded" not in "\n".join(report.machine_legend({report.machine_text(fast): "A"}))
    # a run of an lr grid that no cell shows yet still gets its machine's letter, not '?'
    grid_only = {"cells": {}, "table": {"rte": {"basis": {"grid_cost": {"0.001": {
        "machine": report.machine_text(slow), "finished": "2026-01-05", "train_seconds": 60.0}}}}}}
    assert report.machine_letters(grid_only) == {report.machine_text(slow): "A"}


def test_a_cells_train_time_is_averaged_per_machine_never_across_two(tmp_path, monkeypatch):
    """Seed 42 on a 3x slower machine and seeds 43, 44 here must read as two times, not their 45-min mean."""
    q, report, suite, _executed = _fake_suite(tmp_path, monkeypatch)
    fast = {"cpu": "CPU F", "cores": 2, "threads": 1, "gpu": None}
    minutes = {1: 80, 2: 24, 3: 28}  # per seed (full finetuning's chosen lr here is the grid's highest)
    real = q.Suite._execute

    def timed(self, run, s, run_dir):
        out = real(self, run, s, run_dir)
        if run.seed == 1:
            return {**out, "train_seconds": 60.0 * minutes[1]}  # entries from before runs recorded a machine
        return {**out, "train_seconds": 60.0 * minutes[run.seed], "machine": fast}

    monkeypatch.setattr(q.Suite, "_execute", timed)
    suite.lane(wait_s=0)
    doc = report.assemble(suite)
    c = doc["table"]["rte"]["full"]
    assert c["train_seconds_by_machine"] == [[report.machine_text(fast), 26 * 60.0], [None, 80 * 60.0]]
    text = report.render(suite, {**doc, "environment": report.environment(), "date": "d", "majority": {}}, ["cmd"])
    row = next(ln for ln in text.splitlines() if ln.startswith("| rte | full FT |"))
    assert "| 26.0 min (A); 80.0 min (?) |" in row and "44.0 min" not in row


def test_report_shows_every_runs_cost_entries_and_versions(tmp_path, monkeypatch):
    """Every run's time and memory (grid runs too), a diff's stored entries, the versions runs recorded."""
    q, report, suite, _executed = _fake_suite(tmp_path, monkeypatch)
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0", "random"})
    real = q.Suite._execute

    def more(self, run, s, run_dir):
        out = real(self, run, s, run_dir)
        extra = {"peak_rss_bytes": int(2e9 + 1e6 * run.seed), "versions": {"python": "3.11", "torch": "9.9"}}
        if run.method == "dp-random":  # 700 of k = 1000 stored (N = 200,000 at 0.5%)
            extra.update(nnz=700, density=700 / 200_000)
        return {**out, **extra}

    monkeypatch.setattr(q.Suite, "_execute", more)
    suite.lane(wait_s=0)
    doc = report.assemble(suite)
    assert doc["run_versions"] == [["python 3.11, torch 9.9", doc["progress"]["finished"]]]
    text = report.render(suite, {**doc, "environment": report.environment(), "date": "d", "majority": {}}, ["cmd"])
    assert f"Versions the runs recorded: python 3.11, torch 9.9 ({doc['progress']['finished']} runs)." in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| rte | random mask |"))
    assert "| 700 (0.35%) |" in row
    assert "rte 700 of k = 1,000 (0.35%)" in text
    seed_row = next(ln for ln in text.splitlines() if ln.startswith("| rte | full FT | 2 |"))
    assert "2002.00 MB RSS" in seed_row
    tuning = next(ln for ln in text.splitlines() if ln.startswith("- rte full FT:"))
    assert tuning.count("MB RSS") == len(suite.p.grid("full")) and "min ?" in tuning


def test_measured_runs_the_checkouts_own_code_not_another_copy_on_the_path(tmp_path):
    """A lane in a second worktree must train (and record) that worktree's library, not an installed or other copy."""
    import os
    import subprocess

    other = tmp_path / "other" / "diffcli"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise SystemExit('imported another copy of diffcli')\n")
    usage = tmp_path / "usage.json"
    script = tmp_path / "run.py"
    script.write_text("import diffcli.metrics\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "other")}
    for args in ([str(script)], ["-m", "diffcli", "--help"]):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "measured.py"), str(usage), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "diffcli/__init__.py" in json.loads(usage.read_text())["imported"]


def test_finished_runs_live_in_the_store_so_a_fresh_checkout_resumes_from_them(tmp_path, monkeypatch):
    q, report, suite, executed = _fake_suite(tmp_path, monkeypatch)
    store = tmp_path / "results" / "quality-v2-runs"
    suite = q.Suite(suite.p, tmp_path / "work", store=store)
    suite.lane(wait_s=0)
    n = len(executed)
    assert n and len(list(store.glob("*.json"))) == n and not list((tmp_path / "work").glob("*.json"))
    fresh = q.Suite(suite.p, tmp_path / "another-machine", store=store)  # no run folders, same entries
    assert fresh.plan() == []
    fresh.lane(wait_s=0)
    assert len(executed) == n
    assert report.assemble(fresh)["progress"]["finished"] == n


def test_the_full_protocol_keeps_its_entries_under_the_results_folder(tmp_path, monkeypatch):
    q = _load("quality_v2")
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0"})
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    results = tmp_path / "results"
    argv = ["--tasks", "rte", "--methods", "head", "--data-dir", str(tmp_path / "glue"), "--results-dir", str(results),
            "--work-dir", str(tmp_path / "work"), "--report-only"]
    proto = q.protocol_from(q.parse_args(argv))
    suite = q.Suite(proto, tmp_path / "elsewhere", store=results / "quality-v2-runs")
    run = q.Run("rte", "head", q.LR_GRID["head"][1], 42)
    code = {"bench/scoring.py": suite.code.digest("bench/scoring.py")}
    (results / "quality-v2-runs").mkdir(parents=True)
    (results / "quality-v2-runs" / f"{suite.stem(run, suite.settings(run))}.json").write_text(json.dumps(
        {"score": 61.0, "bytes": 1000, "train_seconds": 2.0, "peak_rss_bytes": 1, "code": code}))
    assert q.main(argv) == 0
    assert json.loads((results / "quality-v2.json").read_text())["progress"]["finished"] == 1


# ----------------------------------------------------------------------------------------------- the methods table
def _methods_suite(tmp_path, monkeypatch, basis_bytes=7000, lora_bytes=9000):
    """The methods table on instant fakes: basis's .diff is basis_bytes, LoRA's adapter lora_bytes; sizing faked."""
    q = _load("quality_v2")
    mt = _load("quality_v2_methods")
    report = _load("quality_v2_report")
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0", "swr", "basis"})
    monkeypatch.setattr(mt.MethodsSuite, "lora_bytes", lambda self, task: lora_bytes)
    sized = []

    def fake_fit(template, trainer, double, target):
        sized.append((Path(template).name, trainer, double, target))
        return {"budget": target // 2, "planned_bytes": target} if trainer == "swr" else \
            {"sparsity": f"{target / 1e7:g}", "planned_bytes": target}

    monkeypatch.setattr(mt, "fit_size", fake_fit)
    executed = []

    def fake(self, run, s, run_dir):
        executed.append((run.method, s))
        run_dir.mkdir(parents=True, exist_ok=True)
        size = basis_bytes if run.method == "basis" else s["target_bytes"] - 1
        (run_dir / "rte.diff").write_bytes(f"a {run.method} file".encode().ljust(size, b"."))  # its entry's bytes
        return {"score": 50.0 + len(executed), "bytes": size, "train_seconds": 60.0, "peak_rss_bytes": 2e9,
                "diff_path": str(run_dir / "rte.diff"), "nnz": 10, "params": 10}

    monkeypatch.setattr(q.Suite, "_execute", fake)
    p = mt.MethodsProtocol(quick=True, tasks=["rte"], methods=list(mt.METHODS), seeds=[42], epochs=4, l0_epochs=2,
                           data_dir=str(tmp_path), max_train_samples=16, max_eval_samples=16)
    return q, mt, report, mt.MethodsSuite(p, tmp_path / "work"), executed, sized


def test_methods_table_splits_equal_compute_and_builds_each_methods_command(tmp_path, monkeypatch):
    q, mt, _, suite, _, _ = _methods_suite(tmp_path, monkeypatch)
    p = suite.p
    for m in mt.METHODS:  # E epochs in all; basis+double's two fixed phases both count
        first, fixed = p.split(m)
        assert first + (2 if m in mt.DOUBLE else 1) * fixed == p.epochs and first >= 1 and fixed >= 1, m
    assert p.split("basis2@lora") == (2, 1) and p.split("l0@basis") == (2, 2)
    assert mt.MethodsProtocol(epochs=5, l0_epochs=2).split("basis2@lora") == (3, 1)  # parity: the rest goes first
    basis = q.diffprune_args(suite.settings(q.Run("rte", "basis", 1e-3, 42)), tmp_path / "c", "d", True)
    # basis alone: no --sparsity (train turns double pruning on when it is given), no --budget (default keep-bases)
    assert "--sparsity" not in basis and "--budget" not in basis and basis[basis.index("--method") + 1] == "basis"
    assert basis[basis.index("--epochs") + 1] == "2" and basis[basis.index("--fixmask-epochs") + 1] == "2"
    # every sized method waits for the basis run: no settings, no command yet
    assert all(suite.settings(q.Run("rte", m, 1e-3, 42)) is None for m in mt.METHODS if m != "basis")
    assert suite.waiting("rte", "swr@lora") == "the basis .diff bytes" and suite.waiting("rte", "basis") is None


def test_methods_table_runs_basis_first_then_sizes_every_run_to_its_target(tmp_path, monkeypatch):
    q, mt, report, suite, executed, sized = _methods_suite(tmp_path, monkeypatch)
    assert [r.method for r in suite.plan()] == ["basis"]  # nothing else is ready before B_basis is known
    suite.lane(wait_s=0)
    assert [m for m, _ in executed] == list(mt.METHODS)  # basis, then the table's order
    s = {m: st for m, st in executed}
    assert {m: s[m]["target_bytes"] for m in mt.METHODS if m != "basis"} == {
        "l0@basis": 7000, "swr@basis": 7000, "l0@lora": 9000, "swr@lora": 9000, "basis2@lora": 9000}
    # each sizing read the basis run's .diff as its template; basis+double keeps its basis records
    assert {t for t, *_ in sized} == {"rte.diff"} and ("rte.diff", "basis", True, 9000) in sized
    args = {m: q.diffprune_args(s[m], tmp_path / "c", "d", True) for m in s}
    assert args["swr@lora"][args["swr@lora"].index("--budget") + 1] == "4500" and "--sparsity" not in args["swr@lora"]
    assert args["l0@basis"][args["l0@basis"].index("--sparsity") + 1] == "0.000875"  # oversized 1.25x, then trimmed
    assert s["l0@basis"]["fitted_sparsity"] == "0.0007" and args["basis2@lora"][args["basis2@lora"].index("--sparsity") + 1] == "0.0009"
    assert args["basis2@lora"][args["basis2@lora"].index("--method") + 1] == "basis"
    assert "--sparsity" in args["basis2@lora"] and args["basis2@lora"][args["basis2@lora"].index("--epochs") + 1] == "2"
    n = len(sized)
    executed.clear()
    suite.lane(wait_s=0)  # all cached; the sizes are memoised on disk, so a new process does not redo them
    assert executed == [] and len(sized) == n
    fresh = mt.MethodsSuite(suite.p, suite.work)
    assert fresh.settings(q.Run("rte", "l0@lora", 1e-3, 42)) == s["l0@lora"] and len(sized) == n
    # a later session: other scratch, same entries; a size not memoised yet is fitted to the kept basis file
    kept = list((suite.store / "refs").glob("*.diff"))
    assert [k.read_bytes()[:13] for k in kept] == [b"a basis file."] and kept[0].stat().st_size == 7000
    shutil.rmtree(suite.work / "runs")
    for memo in (suite.store / "sizes").glob("size-rte-swr@lora-*.json"):
        memo.unlink()
    later = mt.MethodsSuite(suite.p, tmp_path / "later-scratch", store=suite.store)
    assert later.settings(q.Run("rte", "swr@lora", 1e-3, 42)) == s["swr@lora"]
    assert sized[-1] == (kept[0].name, "swr", False, 9000)


def test_a_reference_basis_run_whose_file_is_gone_or_another_runs_is_run_again(tmp_path, monkeypatch):
    """Every sized run is fitted to the reference basis file: an entry without it (a device run that did not bring
    its refs/ back, over an earlier run's kept copy) must not size runs from the wrong file."""
    q, mt, _, suite, executed, _ = _methods_suite(tmp_path, monkeypatch)
    ref = q.Run("rte", "basis", 1e-3, 42)
    suite.run_one(ref)
    hit = suite.cached(ref)
    kept = suite.store / hit["kept_diff"]
    assert hit["bytes"] == kept.stat().st_size == 7000
    shutil.rmtree(suite.work / "runs")                    # the run folder is scratch: the kept copy serves
    assert suite.cached(ref) is not None and suite.settings(q.Run("rte", "l0@basis", 1e-3, 42)) is not None
    kept.write_bytes(b"an earlier basis run's file")      # not this entry's file
    assert suite.cached(ref) is None and suite.reference("rte") is None
    assert suite.waiting("rte", "l0@basis") == "the basis .diff bytes"
    assert [r.method for r in suite.plan()][:1] == ["basis"]
    kept.unlink()
    assert suite.cached(ref) is None
    assert suite.cached(q.Run("rte", "basis", 3e-3, 42)) is None  # never run; other basis runs need no file


def test_report_names_every_lr_chosen_at_an_end_of_its_grid():
    report = _load("quality_v2_report")
    q = _load("quality_v2")
    p = q.Protocol(tasks=["rte", "stsb"], methods=["full", "dp-l0", "head"])
    table = {"rte": {"full": {"lr": 5e-5}, "dp-l0": {"lr": 3e-3}, "head": {"lr": None}},
             "stsb": {"full": {"lr": 2e-5}, "dp-l0": {"lr": 1e-3}, "head": {"lr": 1e-2}}}
    labels = {"full": "full FT", "dp-l0": "L0", "head": "head"}
    assert report.grid_edges(p, table, labels) == [
        "rte L0 (0.003, highest tried)", "stsb full FT (2e-05, lowest tried)", "stsb head (0.01, highest tried)"]
    table = {t: {m: {**c, "grid": {}} for m, c in by_m.items()} for t, by_m in table.items()}
    text = "\n".join(report.tuning(p, table, labels))
    assert "Chosen at an end of its grid" in text and "rte L0 (0.003, highest tried)" in text


def test_report_names_the_kind_of_machine_each_tasks_runs_trained_on():
    report = _load("quality_v2_report")
    cpu = {"cpu": "CPU X", "cores": 2, "threads": 1, "gpu": None}
    gpu = dict(cpu, gpu="NVIDIA H200")
    assert report.device_of({"machine": gpu}) == "GPU" and report.device_of({"machine": cpu}) == "CPU"
    assert report.device_of(report._brief({"machine": gpu, "score": 1})) == "GPU"
    assert report.device_of({"device": "cuda:0"}) == "GPU" and report.device_of({"device": "cpu"}) == "CPU"
    assert report.device_of({"score": 1}) == "?"

    def doc(cell_runs, grid_runs=()):
        return {"cells": {"rte": {"full": {str(i): {"status": "ok", "result": r} for i, r in enumerate(cell_runs)}}},
                "table": {"rte": {"full": {"grid_cost": {str(i): r for i, r in enumerate(grid_runs)}}}}}

    assert report.task_devices(doc([{"machine": cpu}, {"device": "cpu"}]), "rte") == "CPU fp32"
    assert report.task_devices(doc([{"machine": gpu}]), "rte") == "GPU bf16"
    assert report.task_devices(doc([{"machine": gpu}], [{"machine": report.machine_text(cpu)}]),
                               "rte") == "CPU fp32 + GPU bf16"
    assert report.task_devices(doc([]), "rte") == "—"


def test_methods_table_renders_with_missing_cells(tmp_path, monkeypatch):
    q, mt, report, suite, executed, _ = _methods_suite(tmp_path, monkeypatch)
    env = {"machine": "m", "python": "3", "packages": {}, "commit": "c"}

    def render():
        doc = report.assemble(suite)
        return doc, mt.render(suite, {**doc, "environment": env, "date": "d", "majority": {"rte": 47.3}}, ["cmd"])

    doc, text = render()  # empty cache: every cell says why it is missing
    assert doc["cells"]["rte"]["basis"]["42"]["status"] == "lr tuning: 0/1 done"
    assert doc["cells"]["rte"]["l0@lora"]["42"]["status"] == "waiting (needs the basis .diff bytes)"
    assert "QUICK PROTOCOL" in text and "waiting (needs the basis .diff bytes)" in text
    suite.run_one(q.Run("rte", "basis", 1e-3, 42))
    suite.run_one(q.Run("rte", "swr@basis", 1e-3, 42))
    monkeypatch.setattr(q.Suite, "_execute", lambda *a: (_ for _ in ()).throw(RuntimeError("exit 2: boom")))
    suite.run_one(q.Run("rte", "l0@lora", 1e-3, 42))
    doc, text = render()
    row = next(ln for ln in text.splitlines() if ln.startswith("| rte |"))
    assert row.count("| 51.00 (1)") == 1 and "failed (every lr)" in row and "lr tuning: 0/1 done" in row
    assert "| rte | swr @ B_basis | 0.001 | 7.0 kB | --budget 3500 | 6,999 B | 10 | 52.00 |" in text and "100.0% of the target" in text
    assert "| rte | basis (own size) | 0.001 | — | --keep-bases 0.5 | 7,000 B |" in text
    assert "## Failed runs" in text and "boom" in text


@pytest.mark.integration
def test_methods_sizing_fits_a_real_file_under_its_target(tmp_path, tiny_base, tiny_finetune):
    from diffcli import artifact, projection
    from diffcli.extract import extract_diff

    mt = _load("quality_v2_methods")
    template = tmp_path / "t.diff"
    artifact.write(projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.001).diff, template)
    empty = mt._packed(mt._shared(artifact.load(template), keep_bases=False))
    for trainer in ("l0", "swr"):
        target = empty + 3000
        got = mt.fit_size(template, trainer, False, target)
        assert got["planned_bytes"] <= target, trainer
        base = artifact.load(template)
        if trainer == "l0":  # the bisection is tight: 5% more entries no longer fit
            assert mt._packed(mt._synthetic_sparse(base, 1.05 * float(got["sparsity"]), False)) > target - 200
        else:
            assert 0 < got["budget"] and mt._packed(mt._synthetic_swr(base, base.budget_numel)) > target


@pytest.mark.integration
def test_methods_table_trims_an_l0_file_over_its_target_and_leaves_others(tmp_path, tiny_base, tiny_finetune):
    from diffcli import artifact, projection
    from diffcli.extract import extract_diff

    mt = _load("quality_v2_methods")
    diff = projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff
    size = len(artifact.pack(diff, "fp16"))
    suite = mt.MethodsSuite(mt.MethodsProtocol(), tmp_path)
    target = size - 400
    fitted, info = suite.fit({"dp_method": "l0", "target_bytes": target}, diff, size)
    assert len(artifact.pack(fitted, "fp16")) <= target < size and fitted.nnz < diff.nnz
    assert info["trimmed"]["from_bytes"] == size and info["trimmed"]["from_nnz"] == diff.nnz
    for s in ({"dp_method": "swr", "target_bytes": target}, {"dp_method": "l0", "target_bytes": size},
              {"dp_method": "basis"}):  # swr is never cut; a file within its target or without one is kept
        assert suite.fit(s, diff, size) == (diff, {})
