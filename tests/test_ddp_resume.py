"""`train --resume` after an interrupted torchrun run (two CPU processes, gloo): every rank restores its own RNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diffcli.cli.app import app
from tests.conftest import make_base
from tests.training_data import write_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def _torchrun(args: list[str], stop: str | None = None) -> subprocess.CompletedProcess:
    entry = [os.path.join(REPO, "tests", "ddp_interrupt_ranks.py"), stop] if stop else ["-m", "diffcli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=240)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The train arguments (tiny model, dropout on) and the checkpoint of their uninterrupted 2-process run."""
    root = tmp_path_factory.mktemp("ddp_resume")
    train, dev = write_task(root / "data", n_train=64)
    base = make_base(root / "base")
    args = ["train", "--method", "l0", "--train-file", str(train), "--validation-file", str(dev), "--model", str(base),
            "--epochs", "2",
            "--fixmask-epochs", "2", "--batch-size", "8", "--sparsity", "2%", "--lr", "1e-3", "--device", "cpu",
            "--json"]
    full = _torchrun([*args, "-o", str(root / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    return args, root / "full"


@pytest.mark.parametrize("stop", ["l0:1", "fixmask:1"])
def test_resumed_two_process_run_writes_the_uninterrupted_checkpoint_bit_for_bit(tmp_path, uninterrupted, stop,
                                                                                  monkeypatch):
    from safetensors.torch import load_file

    import diffcli.weights

    args, full = uninterrupted
    cut, work = tmp_path / "cut", tmp_path / "cut.partial"
    stopped = _torchrun([*args, "-o", str(cut)], stop=stop)
    assert stopped.returncode != 0 and not cut.exists(), stopped.stderr[-3000:]
    state = json.loads((work / "state.json").read_text())
    assert (state["phase"], state["epochs_done"], state["world_size"]) == (stop.split(":")[0], 1, 2)
    saved = load_file(str(work / "state.safetensors"))  # each rank's dropout stream; rank 0's also as one process's
    assert saved["rng/cpu"].equal(saved["rng/cpu/0"]) and not saved["rng/cpu/0"].equal(saved["rng/cpu/1"])

    # another number of processes: one line, nothing trained, the work folder kept, refused before the model is read
    with monkeypatch.context() as m:
        m.setattr(diffcli.weights, "resolve_model", lambda *a, **k: pytest.fail("the base model was read"))
        one = CliRunner().invoke(app, [*args, "-o", str(cut), "--resume"])
    assert one.exit_code == 2 and "error: the interrupted run at" in one.stderr, one.output
    assert "with 2 processes, now 1" in one.stderr and "--nproc_per_node 2" in one.stderr
    assert "Traceback" not in one.output and one.stdout == "" and (work / "state.json").is_file()

    resumed = _torchrun([*args, "-o", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (cut / "diff.safetensors").read_bytes() == (full / "diff.safetensors").read_bytes()
    assert json.loads((cut / "diffprune.json").read_text()) == json.loads((full / "diffprune.json").read_text())
    assert not work.exists()


def test_each_rank_takes_its_own_rng_states_and_a_one_process_folder_reads_as_before():
    import torch

    from diffcli.dist import Dist
    from diffcli.train_state import gather_rng, own_rng

    states = {f"rng/{s}/{r}": torch.full((4,), 10 * r + i, dtype=torch.uint8)
              for i, s in enumerate(["cpu", "gate"]) for r in range(3)}
    saved = {"rng/cpu": states["rng/cpu/0"], "rng/gate": states["rng/gate/0"], "opt_w/0/step": torch.tensor(3.0),
             **states}
    for rank in range(3):
        mine = own_rng(saved, rank)
        assert sorted(mine) == ["opt_w/0/step", "rng/cpu", "rng/gate"]
        assert mine["rng/cpu"].equal(states[f"rng/cpu/{rank}"]) and mine["rng/gate"].equal(states[f"rng/gate/{rank}"])
    one = {"rng/cpu": states["rng/cpu/1"], "opt_w/0/step": torch.tensor(3.0)}  # written by one process
    assert own_rng(one, 0) == one
    # one process adds nothing, and drops per-rank states carried over from a loaded folder
    assert gather_rng(saved, Dist(), torch.device("cpu")).keys() == {"rng/cpu", "rng/gate", "opt_w/0/step"}


@pytest.mark.parametrize(("was", "now", "hint"), [(2, 1, "torchrun --nproc_per_node 2"),
                                                  (1, 2, "one process (without torchrun)")])
def test_resuming_with_another_number_of_processes_is_refused(tmp_path, was, now, hint):
    from diffcli.errors import InvalidValueError
    from diffcli.train_state import check_resume_world

    with pytest.raises(InvalidValueError, match=f"with {was} processes, now {now}") as err:
        check_resume_world({"world_size": was}, now, tmp_path)
    assert hint in err.value.hint
    check_resume_world({"world_size": now}, now, tmp_path)
    check_resume_world({}, now, tmp_path)  # a folder from before the world size was recorded: not checked
