"""bench/quality_v2.py: each method's command, one tiny end-to-end run, the lane's plan and the run times it goes by."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import load_bench
from tests.quality_v2_fakes import fake_suite

machines = load_bench("run_machines")


def test_every_diffprune_method_gets_the_same_total_epochs_and_one_command_builder(tmp_path):
    q = load_bench("quality_v2")
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


@pytest.mark.integration
def test_quick_protocol_runs_every_kind_and_reports_missing_cells(tmp_path: Path, monkeypatch):
    pytest.importorskip("peft")
    from tests.conftest import make_base
    from tests.test_bench_quality_smoke import _tiny_rte

    q = load_bench("quality_v2")
    base = make_base(tmp_path / "base", max_position_embeddings=128)  # the protocol trains at length 128
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


def test_lane_tunes_on_the_first_seed_then_runs_the_others_at_the_chosen_lr(tmp_path, monkeypatch):
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch)
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
    assert doc["progress"].pop("other_kind") in ("CPU", "GPU")  # the kind this machine is not
    assert doc["progress"] == {"finished": 3 * (3 + 2), "failed": 0, "planned": 3 * (3 + 2), "stale": 0, "attested": 0,
                               "unmatched": 0, "retired": {}, "hours_left": 0.0, "hours_left_low": 0.0,
                               "by_task": {"rte": {"runs_left": 0, "hours": None, "hours_other_kind": None}}}
    executed.clear()
    suite.lane(wait_s=0)  # everything cached: nothing runs again
    assert executed == []


def test_lora_all_keeps_its_runs_when_a_retrained_dp_l0_diff_gives_the_same_rank(tmp_path, monkeypatch):
    """The .diff bytes decide only lora-all's rank: a dp-l0 file a few bytes off must not retrain it; another rank
    must, and the runs of the old rank are then counted as matching no run."""
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch)
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
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch, fail={("full", 1e-4)})
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
    assert "0.0001 → failed" in report.render(suite, {**doc, "environment": machines.environment(), "date": "d",
                                                      "majority": {}}, ["cmd"])


def test_finished_runs_live_in_the_store_so_a_fresh_checkout_resumes_from_them(tmp_path, monkeypatch):
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch)
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
    q = load_bench("quality_v2")
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


def _run_times(q):
    """The run_times module the loaded quality_v2 estimates with (the one to patch)."""
    return sys.modules[q.RunTimes.__module__]


def test_a_lane_with_hours_takes_only_runs_expected_to_end_in_time(tmp_path, monkeypatch):
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch)
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
    q, _report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    rt = _run_times(q)
    monkeypatch.setattr(rt, "this_machine", lambda: rt.machine_key(here))
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
    """Entries made on a lent GPU machine take a minute where a CPU lane takes half an hour: a CPU lane never goes by
    them; with no CPU run to go by, its estimate is unknown (the report's "? h here"), not a GPU's minutes."""
    q, _report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    gpu = {"cpu": "CPU G", "cores": 16, "gpu": "NVIDIA H200"}
    rt = _run_times(q)
    monkeypatch.setattr(rt, "this_machine", lambda: rt.machine_key(here))
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
    assert suite.expected_seconds(q.Run("rte", "bitfit", 1e-3, 42)) is None     # nothing but GPU runs: unknown


def test_the_report_gives_each_tasks_runs_left_at_this_machines_pace_and_at_the_other_kinds(tmp_path, monkeypatch):
    """A CPU machine's report must not plan a GPU task by CPU hours alone: per task, the runs left and one lane's
    hours here and at the pace of the GPU runs alone (from those runs only)."""
    q, report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    rt = _run_times(q)
    monkeypatch.setattr(rt, "this_machine", lambda: rt.machine_key(here))
    suite._task_work = {}
    entries = [{"task": "rte", "method": "full", "train_seconds": 1440.0, "machine": here},
               {"task": "rte", "method": "full", "train_seconds": 72.0, "machine": dict(here, gpu="NVIDIA H200")}]
    monkeypatch.setattr(q.Suite, "_stored", lambda self: entries)
    monkeypatch.setattr(suite.code, "stale", lambda code: False)
    doc = report.assemble(suite)
    left = doc["progress"]["by_task"]["rte"]
    assert left["runs_left"] == 3 * 5  # full, dp-l0, lora-all (the fake trainer has no random mask): 3 lrs + 2 seeds
    assert left["hours"] == [6.0, 6.0] and left["hours_other_kind"] == [0.3, 0.3]  # 15 × 1440 s; 15 × 72 s
    assert doc["progress"]["other_kind"] == "GPU"
    text = report.render(suite, {**doc, "environment": machines.environment(), "date": "d", "majority": {}}, ["cmd"])
    assert "rte 15 runs (6 h here; GPU 0.3 h)" in text
    cpu = entries.pop(0)  # only the GPU run: this CPU machine's pace is unknown, not the GPU's
    only_gpu = report.assemble(suite)["progress"]
    assert only_gpu["by_task"]["rte"]["hours"] is None and only_gpu["by_task"]["rte"]["hours_other_kind"] == [0.3, 0.3]
    assert report.left_by_task(only_gpu) == "rte 15 runs (? h here; GPU 0.3 h)"
    entries.insert(0, cpu)
    entries.pop()  # no GPU run: no GPU pace to give
    assert report.assemble(suite)["progress"]["by_task"]["rte"]["hours_other_kind"] is None


def test_a_task_without_runs_is_estimated_from_other_tasks_scaled_by_steps_and_tokens(tmp_path, monkeypatch):
    """MRPC's first run must not be judged by RTE's time as it is (MRPC has 1.5x RTE's steps): the estimate is the
    range between the step and the token ratios, the lane goes by its high end, the report shows both."""
    q, report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    rt = _run_times(q)
    monkeypatch.setattr(rt, "this_machine", lambda: rt.machine_key(here))
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


def test_a_task_with_runs_of_other_methods_is_scaled_by_their_measured_ratios(tmp_path, monkeypatch):
    """CoLA's first mask run must not be judged by MRPC's time times CoLA's 2.3x steps (3 h, so no lane ever took it)
    when CoLA's other methods show it runs at 0.8x MRPC's pace: the ratios measured on methods both tasks ran."""
    q, _report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    here = {"cpu": "CPU H", "cores": 2, "gpu": None}
    rt = _run_times(q)
    monkeypatch.setattr(rt, "this_machine", lambda: rt.machine_key(here))
    suite._task_work = {"mrpc": {"steps": 100, "tokens": 1000}, "cola": {"steps": 233, "tokens": 670}}
    entries = [{"task": "mrpc", "method": "dp-l0", "train_seconds": 3000.0, "machine": here},
               {"task": "mrpc", "method": "full", "train_seconds": 2000.0, "machine": here},
               {"task": "mrpc", "method": "full", "train_seconds": 2500.0, "machine": here},
               {"task": "mrpc", "method": "head", "train_seconds": 1000.0, "machine": here},
               {"task": "cola", "method": "full", "train_seconds": 2000.0, "machine": here},
               {"task": "cola", "method": "head", "train_seconds": 500.0, "machine": here},
               {"task": "cola", "method": "head", "train_seconds": 9000.0, "machine": dict(here, gpu="NVIDIA H200")}]
    monkeypatch.setattr(q.Suite, "_stored", lambda self: entries)
    monkeypatch.setattr(suite.code, "stale", lambda code: False)
    done = suite.finished_times()
    margin = _run_times(q).LOAD_MARGIN
    assert suite.scale("mrpc", "cola", done) == (0.5, 0.8 * margin)  # head 500/1000, full 2000/2500 (longest each)
    assert suite.expected_range(q.Run("cola", "dp-l0", 1e-3, 42)) == (1500.0, 3000.0 * 0.8 * margin)
    assert suite.scale("mrpc", "cola") == (0.67, 2.33)              # no runs given: the work figures
    entries[1]["machine"] = entries[2]["machine"] = dict(here, cpu="CPU S")  # MRPC's full runs on a slower machine:
    assert suite.scale("mrpc", "cola", suite.finished_times()) == (0.5, 0.5 * margin)  # not divided by CoLA's here
    del entries[4:6]                                                # CoLA's CPU runs gone: a GPU run is no ratio
    assert suite.expected_seconds(q.Run("cola", "dp-l0", 1e-3, 42)) == 3000.0 * 2.33


def test_task_work_counts_steps_and_the_tokens_of_randomly_padded_batches(tmp_path):
    """Dynamic padding of random batches computes on each batch's longest example; backward counts twice."""
    tw = load_bench("task_work")
    assert tw.padded_tokens([5] * 64, 32) == 5 * 64
    assert tw.padded_tokens([1] * 31 + [100], 32) == 100 * 32       # one long example pads its whole batch
    mixed = [1] * 32 + [100] * 32
    assert 32 * 100 < tw.padded_tokens(mixed, 32) <= 64 * 100        # shuffled: both batches hold a long one
    assert tw.epoch_work([10] * 33, [4, 6], 32) == {"train_examples": 33, "steps": 2, "tokens": 3 * 330 + 10}


def test_task_work_measures_a_real_glue_folder_and_leaves_out_a_task_without_data(tiny_base):
    from diffcli import example_data

    tw = load_bench("task_work")
    work = tw.measure(["rte", "mrpc"], str(example_data.ROOT), str(tiny_base), 128, 32)
    assert set(work) == {"rte"}  # the bundled example set has RTE only
    assert work["rte"]["train_examples"] == 300 and work["rte"]["steps"] == 10
    assert work["rte"]["tokens"] > 3 * 300 * 8  # pairs of sentences, many tokens each


def test_a_suite_measures_task_work_in_a_subprocess_once_and_keeps_it_in_the_work_folder(tmp_path, tiny_base,
                                                                                          monkeypatch):
    from diffcli import example_data

    q = load_bench("quality_v2")
    p = q.Protocol(tasks=["rte"], model=str(tiny_base), data_dir=str(example_data.ROOT))
    work = q.Suite(p, tmp_path / "work").task_work()
    assert work["rte"]["steps"] == 10 and work["rte"]["tokens"] > 0
    assert json.loads((tmp_path / "work" / "task-work.json").read_text())["work"] == work

    def no_subprocess(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(_run_times(q).subprocess, "run", no_subprocess)
    assert q.Suite(p, tmp_path / "work").task_work() == work           # read back, not measured again
    other = q.Protocol(tasks=["rte"], model=str(tiny_base), data_dir=str(tmp_path / "nowhere"))
    assert q.Suite(other, tmp_path / "work").task_work() == {}          # no data: no figures, no process



def test_lora_all_budget_is_the_largest_file_that_buys_it_no_higher_rank(tmp_path, monkeypatch):
    _q, _report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    budget = suite.lora_all_budget("rte", 3)
    assert suite.lora_all_rank("rte", budget) == 3 and suite.lora_all_rank("rte", budget + 1) == 4


def test_lora_all_is_matched_to_the_chosen_lrs_diff_when_the_middle_lr_run_failed(tmp_path, monkeypatch):
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch, fail=[("dp-l0", 1e-3)])
    g = q.LR_GRID["dp-l0"]
    assert g[len(g) // 2] == 1e-3  # the reference lr is the one that fails
    suite.lane(wait_s=0)
    lora = [e for e in executed if e[0] == "lora-all"]
    assert lora and all(b == 5000 for *_, b in lora)  # the chosen lr's .diff bytes (the fake's 5000)
    assert report.assemble(suite)["cells"]["rte"]["lora-all"]["3"]["status"] == "ok"


def test_a_lane_leaves_a_task_whose_runs_trained_on_the_other_kind_of_machine(tmp_path, monkeypatch):
    """A GPU session must not add bf16 GPU seeds to a task whose runs trained in fp32 on CPU lanes (or the reverse):
    each task's methods are compared on one kind of machine unless --mixed-machines says otherwise."""
    q, _report, suite, executed = fake_suite(tmp_path, monkeypatch)
    rt = _run_times(q)
    first = q.Protocol(tasks=["rte"], methods=list(suite.p.methods), seeds=[1], data_dir=str(tmp_path))
    q.Suite(first, tmp_path / "work").lane(wait_s=0)  # seed 1 on this (CPU) machine: entries record no GPU
    assert suite.other_kind_tasks() == [] and suite.plan()
    monkeypatch.setattr(rt, "this_machine", lambda: ("CPU G", 16, "NVIDIA H200"))
    assert suite.other_kind_tasks() == ["rte"] and suite.plan() == []
    executed.clear()
    suite.lane(wait_s=0)
    assert executed == []
    suite.mixed_machines = True
    assert suite.plan()


def test_retiring_a_task_moves_only_its_other_kind_entries_aside_and_the_row_restarts_on_this_kind(tmp_path,
                                                                                                 monkeypatch):
    """A row stuck on a kind of machine no session gets moves to this kind: its other-kind entries go to
    <store>-retired/ (kept, not deleted), the lane then runs the row from its first run, and the report says how
    many were retired; entries of other tasks stay where they are."""
    q, report, suite, executed = fake_suite(tmp_path, monkeypatch)
    rt = _run_times(q)
    first = q.Protocol(tasks=["rte"], methods=list(suite.p.methods), seeds=[1], data_dir=str(tmp_path))
    q.Suite(first, tmp_path / "work").lane(wait_s=0)  # seed 1's grid on this (CPU) machine
    on_cpu = sorted(f.name for f in suite.store.glob("*.json"))
    assert on_cpu
    other = suite.store / "mrpc-full-s1-lr2e-05-0000000000.json"  # another task's CPU entry stays
    other.write_text(json.dumps({"task": "mrpc", "settings": {"task": "mrpc"}, "score": 1.0,
                                 "machine": {"cpu": "CPU C", "cores": 2, "gpu": None}}))
    monkeypatch.setattr(rt, "this_machine", lambda: ("CPU G", 16, "NVIDIA H200"))  # now a GPU session
    assert suite.other_kind_tasks() == ["rte"] and suite.plan() == []

    assert suite.retire(["rte"], gpu=True) == []  # they trained on CPU
    moved = suite.retire(["rte"], gpu=False)
    assert sorted(f.name for f in moved) == on_cpu
    assert sorted(f.name for f in suite.retired_dir().glob("*.json")) == on_cpu
    assert other.is_file() and suite.retired_dir() == suite.store.with_name(suite.store.name + "-retired")
    assert suite.other_kind_tasks() == [] and suite.plan()
    assert suite.retire(["rte"], gpu=False) == []  # nothing left to move
    progress = report.assemble(suite)["progress"]
    assert progress["retired"] == {"rte": {"CPU": len(on_cpu)}} and progress["retired_to"] == "work-retired"
    assert report._retired(progress["retired"]) == f"{len(on_cpu)} CPU runs of rte"
    executed.clear()
    suite.lane(wait_s=0)
    assert ("full", 5e-05, 1, None) in executed  # the row's first run again, on this kind


def test_retiring_moves_the_diff_an_entry_kept_beside_it(tmp_path, monkeypatch):
    """A methods-table basis entry keeps its .diff under refs/ (the runs sized to it read it): it moves with it."""
    _q, _report, suite, _executed = fake_suite(tmp_path, monkeypatch)
    suite.store.mkdir(parents=True, exist_ok=True)
    (suite.store / "refs").mkdir()
    (suite.store / "refs" / "rte-basis-s1.diff").write_bytes(b"DIFFPRUN")
    entry = suite.store / "rte-basis-s1-lr0.001-0000000000.json"
    entry.write_text(json.dumps({"task": "rte", "settings": {"task": "rte"}, "score": 1.0, "device": "cpu",
                                 "kept_diff": "refs/rte-basis-s1.diff"}))
    assert suite.retire(["rte"], gpu=False) == [suite.retired_dir() / entry.name]
    assert not entry.exists() and not (suite.store / "refs" / "rte-basis-s1.diff").exists()
    assert (suite.retired_dir() / "refs" / "rte-basis-s1.diff").read_bytes() == b"DIFFPRUN"


def test_a_failed_run_records_its_machine_and_retiring_moves_failures_of_unknown_kind(tmp_path, monkeypatch):
    """A failed entry says where it failed, so retiring by kind can tell; an older one that does not is moved with
    the row (its lr is tried again on the new kind rather than counted as failed there)."""
    q, _report, suite, _executed = fake_suite(tmp_path, monkeypatch, fail={("full", 5e-05)})
    first = q.Protocol(tasks=["rte"], methods=["full"], seeds=[1], data_dir=str(tmp_path))
    q.Suite(first, tmp_path / "work").lane(wait_s=0)
    failed = list(suite.store.glob("*.failed.json"))
    assert len(failed) == 1 and json.loads(failed[0].read_text())["machine"]["cores"]
    old = suite.store / "rte-full-s2-lr5e-05-0000000000.failed.json"
    old.write_text(json.dumps({"settings": {"task": "rte"}, "error": "RuntimeError: boom"}))
    moved = {f.name for f in suite.retire(["rte"], gpu=True)}  # this machine is a CPU: only the unknown one moves
    assert moved == {old.name} and failed[0].is_file()
