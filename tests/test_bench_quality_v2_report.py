"""bench/quality_v2_report.py: each run's machine, cost, versions and command, and lrs chosen at a grid's end."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import load_bench
from tests.quality_v2_fakes import fake_suite

machines = load_bench("run_machines")

REPO = Path(__file__).resolve().parents[1]


def test_a_runs_command_is_shown_relative_to_the_checkout_that_ran_it():
    report = load_bench("quality_v2_report")
    cmd = ("python /work/wt-x/bench/measured.py /work/wt-x/bench/work/v2/full/runs/r/usage.json -m diffcli train "
           f"--data-dir /data/glue -o {REPO}/bench/work/v2/full/runs/r/ckpt")
    assert report._brief({"score": 1.0, "command": cmd})["command"] == (
        "python bench/measured.py bench/work/v2/full/runs/r/usage.json -m diffcli train --data-dir /data/glue "
        "-o bench/work/v2/full/runs/r/ckpt")


def test_report_letters_each_machine_and_marks_entries_without_one():
    """Train times from two machines must not read as one comparison: each run's row names its machine."""
    report = load_bench("quality_v2_report")
    fast = {"cpu": "CPU X", "cores": 2, "threads": 1, "gpu": None}
    slow = dict(fast, cpu="CPU Y")
    runs = {"a": {"finished": "2026-01-02", "machine": fast}, "b": {"finished": "2026-01-01"},
            "c": {"finished": "2026-01-03", "machine": slow}, "d": {"finished": "2026-01-04", "machine": dict(fast)}}
    doc = {"cells": {"rte": {m: {"42": {"status": "ok", "result": report._brief(r)}} for m, r in runs.items()}}}
    letters = machines.machine_letters(doc)
    assert letters == {None: "?", machines.machine_text(fast): "A", machines.machine_text(slow): "B"}
    legend = "\n".join(machines.machine_legend(letters))
    assert "- A: CPU X, 2 cores, 1 thread(s), no GPU" in legend and "- B: CPU Y" in legend
    assert "- ?: not recorded" in legend
    assert "?: not recorded" not in "\n".join(machines.machine_legend({machines.machine_text(fast): "A"}))
    # a run of an lr grid that no cell shows yet still gets its machine's letter, not '?'
    grid_only = {"cells": {}, "table": {"rte": {"basis": {"grid_cost": {"0.001": {
        "machine": machines.machine_text(slow), "finished": "2026-01-05", "train_seconds": 60.0}}}}}}
    assert machines.machine_letters(grid_only) == {machines.machine_text(slow): "A"}


def test_a_cells_train_time_is_averaged_per_machine_never_across_two(tmp_path, monkeypatch):
    """Seed 42 on a 3x slower machine and seeds 43, 44 here must read as two times, not their 45-min mean."""
    q, report, suite, _executed = fake_suite(tmp_path, monkeypatch)
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
    assert c["train_seconds_by_machine"] == [[machines.machine_text(fast), 26 * 60.0], [None, 80 * 60.0]]
    text = report.render(suite, {**doc, "environment": machines.environment(), "date": "d", "majority": {}}, ["cmd"])
    row = next(ln for ln in text.splitlines() if ln.startswith("| rte | full FT |"))
    assert "| 26.0 min (A); 80.0 min (?) |" in row and "44.0 min" not in row


def test_report_shows_every_runs_cost_entries_and_versions(tmp_path, monkeypatch):
    """Every run's time and memory (grid runs too), a diff's stored entries, the versions runs recorded."""
    q, report, suite, _executed = fake_suite(tmp_path, monkeypatch)
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
    text = report.render(suite, {**doc, "environment": machines.environment(), "date": "d", "majority": {}}, ["cmd"])
    assert f"Versions the runs recorded: python 3.11, torch 9.9 ({doc['progress']['finished']} runs)." in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| rte | random mask |"))
    assert "| 700 (0.35%) |" in row
    assert "rte 700 of k = 1,000 (0.35%)" in text
    seed_row = next(ln for ln in text.splitlines() if ln.startswith("| rte | full FT | 2 |"))
    assert "2002.00 MB RSS" in seed_row
    tuning = next(ln for ln in text.splitlines() if ln.startswith("- rte full FT:"))
    assert tuning.count("MB RSS") == len(suite.p.grid("full")) and "min ?" in tuning


def test_report_names_every_lr_chosen_at_an_end_of_its_grid():
    report = load_bench("quality_v2_report")
    q = load_bench("quality_v2")
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
    report = load_bench("quality_v2_report")
    cpu = {"cpu": "CPU X", "cores": 2, "threads": 1, "gpu": None}
    gpu = dict(cpu, gpu="NVIDIA H200")
    assert machines.device_of({"machine": gpu}) == "GPU" and machines.device_of({"machine": cpu}) == "CPU"
    assert machines.device_of(report._brief({"machine": gpu, "score": 1})) == "GPU"
    assert machines.device_of({"device": "cuda:0"}) == "GPU" and machines.device_of({"device": "cpu"}) == "CPU"
    assert machines.device_of({"score": 1}) == "?"

    def doc(cell_runs, grid_runs=()):
        return {"cells": {"rte": {"full": {str(i): {"status": "ok", "result": r} for i, r in enumerate(cell_runs)}}},
                "table": {"rte": {"full": {"grid_cost": {str(i): r for i, r in enumerate(grid_runs)}}}}}

    assert machines.task_devices(doc([{"machine": cpu}, {"device": "cpu"}]), "rte") == "CPU fp32"
    assert machines.task_devices(doc([{"machine": gpu}]), "rte") == "GPU bf16"
    assert machines.task_devices(doc([{"machine": gpu}], [{"machine": machines.machine_text(cpu)}]),
                               "rte") == "CPU fp32 + GPU bf16"
    assert machines.task_devices(doc([]), "rte") == "—"



def test_targets_averages_and_the_default_are_judged_only_on_every_seeds_runs(tmp_path, monkeypatch):
    q, report, suite, _ = fake_suite(tmp_path, monkeypatch)  # seeds 1, 2, 3
    first = q.Protocol(tasks=["rte"], methods=list(suite.p.methods), seeds=[1], data_dir=str(tmp_path))
    q.Suite(first, tmp_path / "work").lane(wait_s=0)  # the same store, every run of seed 1 only
    doc = report.assemble(suite)
    cell = doc["table"]["rte"]["dp-l0"]
    assert cell["n"] == 1 and cell["mean"] is not None  # the partial mean is shown ...
    assert all(v is None for v in doc["verdicts_on_means"].values())  # ... but judges nothing
    assert all(v is None for v in doc["verdicts_on_score_alone"].values())
    assert doc["default_mask"]["mask"] is None and set(doc["cheaper_masks_vs_l0"].values()) == {None}
    assert report.averages(doc["table"], ["rte"], suite.p.methods, 3) == ["—"] * len(suite.p.methods)
    # with one seed in the protocol the same runs are complete, and judged
    done = report.assemble(q.Suite(first, tmp_path / "work"))
    assert done["verdicts_on_means"]["avg_within_0.5_of_full"] is not None
    assert "—" not in report.averages(done["table"], ["rte"], ["full", "dp-l0", "lora-all"], 1)  # random: not run


def test_a_resumed_runs_partial_time_and_memory_stay_out_of_costs_and_estimates(tmp_path, monkeypatch):
    q, report, suite, _ = fake_suite(tmp_path, monkeypatch)
    whole = q.Suite._execute

    def resumed_seed_2(self, run, s, run_dir):  # the resumed run timed and measured only its last part
        out = whole(self, run, s, run_dir)
        return {**out, "resumed": True, "train_seconds": 0.25, "peak_rss_bytes": 9} if run.seed == 2 else out

    monkeypatch.setattr(q.Suite, "_execute", resumed_seed_2)
    suite.lane(wait_s=0)
    doc = report.assemble(suite)
    c = doc["table"]["rte"]["dp-l0"]
    assert c["n"] == 3 and c["resumed_runs"] == 1  # its score counts ...
    assert c["train_seconds"] == 1.0 and c["peak_rss_bytes"] == 1  # ... its cost does not
    assert "[1 resumed run(s) left out]" in machines.times_text(c, {None: "?"})
    assert 0.25 not in [sec for *_, sec, _n in suite.finished_times()]


def test_an_interim_average_covers_only_the_tasks_with_every_seed_and_judges_nothing(tmp_path, monkeypatch):
    q, report, suite, _ = fake_suite(tmp_path, monkeypatch)  # rte, seeds 1, 2, 3
    both = q.Protocol(tasks=["rte", "mrpc"], methods=list(suite.p.methods), seeds=[1, 2, 3], data_dir=str(tmp_path))
    suite.lane(wait_s=0)  # rte: every seed
    q.Suite(q.Protocol(tasks=["mrpc"], methods=list(suite.p.methods), seeds=[1], data_dir=str(tmp_path)),
            tmp_path / "work").lane(wait_s=0)  # mrpc: seed 1 only
    two = q.Suite(both, tmp_path / "work")
    doc = report.assemble(two)
    part = doc["interim"]
    assert part["tasks"] == ["rte"]
    ran = ["full", "dp-l0", "lora-all"]  # dp-random: the fake trainer lacks it, so it counts nowhere
    assert part["averages"] == {m: doc["table"]["rte"][m]["mean"] for m in ran}
    assert part["cheaper_masks_vs_l0"]["dp-random"] is None
    assert doc["default_mask"]["mask"] is None and all(v is None for v in doc["verdicts_on_means"].values())
    extra = {"environment": machines.environment(), "date": "d", "majority": {}}
    text = report.render(two, {**doc, **extra}, ["cmd"])
    row = [f"{doc['table']['rte'][m]['mean']:.2f}" if m in ran else "—" for m in both.methods]
    assert "| *interim: rte* | | | " + " | ".join(row) + " |" in text
    assert "while the others (mrpc) are short of runs" in text and "random mask —" in text
    assert "| **average** | | | " + " | ".join(["—"] * len(both.methods)) + " |" in text
    # every task complete: the average is judged and no interim line is left
    q.Suite(both, tmp_path / "work").lane(wait_s=0)
    done = report.assemble(two)
    assert done["interim"] is None and "*interim" not in report.render(two, {**done, **extra}, ["cmd"])
