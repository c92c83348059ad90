"""`diffprune train` under torchrun: two CPU processes (gloo), DistributedDataParallel, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diffcli import checkpoint
from tests.training_data import write_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("extra", [[], ["--fill", "fisher", "--log-alpha-init", "-4", "--fill-samples", "32"]],
                         ids=["gates", "fisher-fill"])
def test_torchrun_two_processes_write_one_complete_checkpoint(tmp_path, tiny_base, extra):
    train, dev = write_task(tmp_path / "data", n_train=64)
    out, exits = tmp_path / "ckpt", tmp_path / "exits"
    exits.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "ddp_exit_probe.py"), str(exits),  # `diffprune` itself, plus an exit record
           "train", "--method", "l0", "--train-file", str(train), "--validation-file", str(dev),
           "--model", str(tiny_base), "--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8",
           "--sparsity", "2%", "--lr", "1e-3", "--device", "cpu", "-o", str(out), "--json", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert summary["world_size"] == 2
    diff = checkpoint.load(out)
    assert diff.nnz == summary["nnz"]
    assert diff.meta["world_size"] == 2
    assert sorted(diff.extras) == ["classifier.bias", "classifier.weight"]
    # one writer: no second checkpoint, no leftover work folder or temporary folder next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ckpt", "data", "exits"]
    assert sorted(p.name for p in out.iterdir()) == ["diff.safetensors", "diffprune.json"]
    # each rank left its process group before Python's teardown (else gloo's threads may abort it: SIGABRT)
    assert [json.loads((exits / f"rank-{r}.json").read_text()) for r in (0, 1)] == [{"joined_at_exit": False}] * 2
    proj = summary["after_projection"]
    if extra:  # the gates start shut: the Fisher, summed over both ranks' batches, supplies the mask
        assert proj["fill"] == "fisher" and proj["filled"] > 0
        assert proj["kept"] + proj["filled"] == round(0.02 * diff.budget_numel) >= diff.nnz
    else:
        assert proj["kept"] == diff.nnz == round(0.02 * diff.budget_numel)


def test_more_processes_than_gpus_is_a_clear_error_before_joining(monkeypatch):
    import torch
    import torch.distributed as dist

    from diffcli.errors import InvalidValueError
    from diffcli.dist import init_dist as _init_dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append(1))
    for rank in ("0", "1"):  # every rank refuses, so none is left waiting for the other
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(InvalidValueError, match=r"--nproc_per_node 1 .*--device cpu"):
            _init_dist(None)
    assert joined == []


def test_swr_under_torchrun_every_rank_trains_the_same_units_and_rank_0_writes_one_checkpoint(tmp_path, tiny_base):
    train, dev = write_task(tmp_path / "data", n_train=64)
    out, ranks = tmp_path / "ckpt", tmp_path / "ranks.json"
    budget = 3000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "swr_ddp_ranks.py"), str(ranks), "train", "--train-file", str(train),
           "--validation-file", str(dev), "--model", str(tiny_base), "--method", "swr", "--rank", "4", "--budget",
           str(budget), "--alpha-lr", "0.2", "--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8",
           "--lr", "1e-3", "--device", "cpu", "-o", str(out), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert summary["world_size"] == 2 and summary["method"] == "swr"
    diff = checkpoint.load(out)
    assert diff.meta["world_size"] == 2 and sorted(diff.extras) == ["classifier.bias", "classifier.weight"]
    chosen = [u for u in diff.meta["units"] if u["chosen"]]
    assert chosen and sum(u["cost"] for u in chosen) <= budget and diff.nnz <= budget
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ckpt", "data", "ranks.json"]  # one writer
    assert sorted(p.name for p in out.iterdir()) == ["diff.safetensors", "diffprune.json"]
    # same gate noise and A init on every rank, and dL/dθ averaged by DDP before the factors', gates' and head's
    # steps: the ranks saw different batches (different losses) yet hold the same tensors bit for bit
    record = json.loads(ranks.read_text())
    assert record["after_choice"]["same"] and record["after_fixed"]["same"], record
    assert record["after_choice"]["chosen"] == [i for i, u in enumerate(diff.meta["units"]) if u["chosen"]]
    assert record["fixed_losses"][0] != record["fixed_losses"][1]


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_rank_exits_after_its_handlers_without_interpreter_teardown(monkeypatch, world):
    """Under torchrun `main` runs the exit handlers, flushes and os._exits with the command's code; alone, sys.exit."""
    import atexit

    from diffcli.cli import app

    calls = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        calls.append(("os._exit", code))
        raise Exited

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(sys, "argv", ["diffprune", "inspect", "no-such.diff"])
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append(("handlers",)))
    monkeypatch.setattr(os, "_exit", fake_exit)
    if world == "2":
        with pytest.raises(Exited):
            app.main()
        assert calls == [("handlers",), ("os._exit", 3)]  # handlers first, then the command's own exit code
    else:
        with pytest.raises(SystemExit) as exc:
            app.main()
        assert exc.value.code == 3 and calls == []
