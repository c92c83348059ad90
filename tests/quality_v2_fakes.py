"""A quality-v2 Suite on instant fake runs, shared by the bench tests of its lanes, report and store."""

from __future__ import annotations

from tests.conftest import load_bench


def fake_suite(tmp_path, monkeypatch, fail=()):
    """A Suite whose runs are instant fakes: score = 100·lr·1000 + seed/100, bytes 5000 (dp) or 3000."""
    q = load_bench("quality_v2")
    report = load_bench("quality_v2_report")
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

