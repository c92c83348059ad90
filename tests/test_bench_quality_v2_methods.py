"""bench/quality_v2_methods.py: the methods table's equal-compute split, its sizing to matched bytes and its report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import load_bench


def _methods_suite(tmp_path, monkeypatch, basis_bytes=7000, lora_bytes=9000):
    """The methods table on instant fakes: basis's .diff is basis_bytes, LoRA's adapter lora_bytes; sizing faked."""
    q = load_bench("quality_v2")
    mt = load_bench("quality_v2_methods")
    report = load_bench("quality_v2_report")
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0", "swr", "basis"})
    monkeypatch.setattr(mt.MethodsSuite, "lora_bytes", lambda self, task: lora_bytes)
    sized = []

    def fake_fit(template, trainer, double, target):
        sized.append((Path(template).name, trainer, double, target))
        return {"budget": target // 2, "planned_bytes": target} if trainer == "swr" else \
            {"sparsity": f"{target / 1e7:g}", "planned_bytes": target}

    monkeypatch.setattr(mt.sizing, "fit_size", fake_fit)
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
    # too few epochs for three phases (--quick's 2): one scale epoch still, never 0 (the trainer's default of 3)
    assert mt.MethodsProtocol(epochs=2, l0_epochs=1).split("basis2@lora") == (1, 1)
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
    assert args["l0@basis"][args["l0@basis"].index("--sparsity") + 1] == "0.000805"  # oversized 1.15x, then trimmed
    assert s["l0@basis"]["fitted_sparsity"] == "0.0007"
    assert args["basis2@lora"][args["basis2@lora"].index("--sparsity") + 1] == "0.00126"  # basis+double: 1.4x
    assert s["basis2@lora"]["fitted_sparsity"] == "0.0009"
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


def test_a_lane_says_why_it_ends_even_with_nothing_to_run(tmp_path, monkeypatch, capsys):
    """Seeds that skip the tuning seed leave the sized methods waiting for a basis .diff no lane makes: the lane says
    so in its last line instead of ending silently."""
    q, mt, _, suite, executed, _ = _methods_suite(tmp_path, monkeypatch)
    suite.p.methods = ["l0@basis"]
    suite.p.seeds = [43]
    suite.lane(wait_s=0)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert executed == [] and last.startswith("lane ends: 0 run(s) trained")
    assert "rte l0@basis waits for the basis .diff bytes" in last and "first of --seeds (43)" in last
    suite.p.methods, suite.p.seeds = ["basis"], [42]
    suite.lane(wait_s=0)
    assert [m for m, _ in executed] == ["basis"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "lane ends: 1 run(s) trained; nothing else to run for these --tasks/--methods/--seeds")
    suite.p.methods = list(mt.METHODS)
    suite.lane(wait_s=0, hours=1e-9)  # nothing fits in the time left
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"lane ends: 0 run(s) trained; {len(mt.METHODS) - 1} run(s) left that would not finish before " \
        "the deadline or that other lanes hold"


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
    same_size = bytearray(kept.read_bytes())
    same_size[0] ^= 1
    kept.write_bytes(bytes(same_size))                     # another file of the very same size: its content tells
    assert suite.cached(ref) is None
    kept.write_bytes(b"an earlier basis run's file")      # not this entry's file
    assert suite.cached(ref) is None and suite.reference("rte") is None
    assert suite.waiting("rte", "l0@basis") == "the basis .diff bytes"
    assert [r.method for r in suite.plan()][:1] == ["basis"]
    kept.unlink()
    assert suite.cached(ref) is None
    assert suite.cached(q.Run("rte", "basis", 3e-3, 42)) is None  # never run; other basis runs need no file


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


def _template(tmp_path, tiny_base, tiny_finetune):
    """methods_sizing, a tiny 0.1% template file, and the bytes of that file with every entry emptied."""
    from diffcli import artifact, projection
    from diffcli.extract import extract_diff

    sizing = load_bench("methods_sizing")
    template = tmp_path / "t.diff"
    artifact.write(projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.001).diff, template)
    return sizing, template, sizing._packed(sizing._shared(artifact.load(template), keep_bases=False))


@pytest.mark.integration
def test_methods_sizing_fits_a_real_file_under_its_target(tmp_path, tiny_base, tiny_finetune):
    from diffcli import artifact

    mt, template, empty = _template(tmp_path, tiny_base, tiny_finetune)
    for trainer in ("l0", "swr"):
        target = empty + 3000
        got = mt.fit_size(template, trainer, False, target)
        assert got["planned_bytes"] <= target, trainer
        base = artifact.load(template)
        if trainer == "l0":  # the bisection is tight: 5% more entries no longer fit
            assert mt._packed(mt._synthetic_sparse(base, 1.05 * float(got["sparsity"]), False)) > target - 200
        else:
            assert 0 < got["budget"] and mt._packed(mt._synthetic_swr(base, base.budget_numel)) > target
            # the budget is what the chosen units cost (the plateau's bottom), not the bisection's last value
            assert mt._swr_cost(base, got["budget"]) == got["budget"]
            assert mt._packed(mt._synthetic_swr(base, got["budget"])) == got["planned_bytes"]


@pytest.mark.integration
def test_methods_table_trims_an_l0_file_over_its_target_and_leaves_others(tmp_path, tiny_base, tiny_finetune):
    from diffcli import artifact, projection
    from diffcli.extract import extract_diff

    mt = load_bench("quality_v2_methods")
    diff = projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff
    size = len(artifact.pack(diff, "fp16"))
    suite = mt.MethodsSuite(mt.MethodsProtocol(), tmp_path)
    target = size - 400
    fitted, info = suite.fit({"dp_method": "l0", "target_bytes": target}, diff, size)
    assert len(artifact.pack(fitted, "fp16")) <= target < size and fitted.nnz < diff.nnz
    assert info["trimmed"]["from_bytes"] == size and info["trimmed"]["from_nnz"] == diff.nnz
    assert info["trimmed"]["to_nnz"] == fitted.nnz
    fitted, info = suite.fit({"dp_method": "basis", "target_bytes": target}, diff, size)  # basis+double: trimmed too
    assert len(artifact.pack(fitted, "fp16")) <= target and info["trimmed"]["to_nnz"] == fitted.nnz
    for s in ({"dp_method": "swr", "target_bytes": target}, {"dp_method": "l0", "target_bytes": size},
              {"dp_method": "basis"}):  # swr is never cut; a file within its target or without one is kept
        assert suite.fit(s, diff, size) == (diff, {})



def test_every_seeds_trim_overshoot_and_dropped_delta_is_listed():
    mt = load_bench("quality_v2_methods")

    def cell(result):
        return {"result": result}

    s = {"lr": 1e-3, "target_bytes": 1000}
    doc = {"cells": {"rte": {
        "l0@lora": {"42": cell({"bytes": 990, "settings": s, "trimmed": {"from_bytes": 1100, "from_nnz": 200,
                                                                       "to_nnz": 180}}),
                    "43": cell({"bytes": 999, "settings": s})},
        "swr@lora": {"42": cell(None), "44": cell({"bytes": 1050, "settings": s})},
        "basis2@lora": {"43": cell({"bytes": 140, "settings": s, "best_epoch": 0})},
        "basis": {"42": cell({"bytes": 140, "settings": {"lr": 1e-3}, "best_epoch": 0})}}}}
    lines = mt.size_flags(doc, ["rte"], ["basis", "l0@lora", "swr@lora", "basis2@lora"], [42, 43, 44])
    assert lines[2:-1] == [
        "- rte l0 @ LoRA bytes seed 42 (lr 0.001): trimmed from 1,100 B, 10.0% of its entries",
        "- rte swr @ LoRA bytes seed 44 (lr 0.001): over the target by 50 B (105.0%)",
        "- rte basis+double @ LoRA bytes seed 43 (lr 0.001): sparse δ dropped (scales only, 14.0% of the target)"]
    assert mt.best_epoch("basis", {"best_epoch": 0}) == "—" and mt.best_epoch("basis2@lora", {"best_epoch": 0}) == 0


@pytest.mark.integration
def test_sizing_refuses_a_target_no_swr_unit_fits_and_never_reports_an_empty_trim(tmp_path, tiny_base, tiny_finetune):
    from diffcli import artifact, projection
    from diffcli.extract import extract_diff

    sizing, template, empty = _template(tmp_path, tiny_base, tiny_finetune)
    with pytest.raises(ValueError, match="no swr unit fits"):  # was budget 0, which train refuses after the memo
        sizing.fit_size(template, "swr", False, empty)
    diff = projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff
    size = len(artifact.pack(diff, "fp16"))
    head_only = len(artifact.pack(projection.project(diff, 0.0).diff, "fp16"))
    # a target below what the head and header alone take: nothing to trim, the file stays as trained (shown 'over')
    assert sizing.fit_to_target({"dp_method": "basis", "target_bytes": head_only - 50}, diff, size) == (diff, {})
