"""Training methods (`train --method`): the registry, the mask methods, end to end on a tiny BERT, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffcli import checkpoint
from diffcli.cli.app import app
from diffcli.errors import InvalidValueError
from diffcli.methods import CATALOG, SHARED_OPTIONS, all_methods, get_method
from diffcli.training import TrainOptions, partial_dir, train
from tests.training_data import write_task

MASKS = ("fisher", "random", "magnitude")
COMMON = ["--sparsity", "2%", "--fixmask-epochs", "1", "--batch-size", "8", "--fixmask-lr", "1e-2"]
PER_METHOD = {"l0": ["--epochs", "1", "--lr", "1e-3"], "fisher": ["--fill-samples", "16"], "random": [],
              "magnitude": ["--epochs", "1", "--lr", "1e-3"]}


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _opts(method: str, **kw) -> TrainOptions:
    base = dict(method=method, fixmask_epochs=1, batch_size=8, sparsity=0.02, fixmask_lr=1e-2, seed=5)
    base.update(kw)
    return TrainOptions(**base)


def _run(tmp_path, base, out: str, method: str, **kw):
    train_file, dev_file = write_task(tmp_path / "data")
    cb = kw.pop("on_epoch_end", None)
    resume = kw.pop("resume", False)
    return train(train_file=str(train_file), validation_file=str(dev_file), model=str(base),
                 output=tmp_path / out, options=_opts(method, **kw), resume=resume, on_epoch_end=cb)


def test_every_method_says_what_it_does_and_owns_its_options():
    fields = set(TrainOptions.__dataclass_fields__)
    methods = all_methods()
    assert list(methods) == list(CATALOG) and set(methods) >= {"l0", *MASKS, "swr", "basis"}
    owned = set(SHARED_OPTIONS)
    for name, m in methods.items():
        d = m.describe()
        assert d["name"] == name and all(d[k] for k in ("reparametrizes", "penalises", "fixed_phase", "to_diff"))
        assert set(m.options) <= fields and not set(m.options) & set(SHARED_OPTIONS)
        owned |= set(m.options)
    assert owned == fields  # every option is shared or belongs to a method
    with pytest.raises(InvalidValueError, match="unknown --method 'lora'"):
        get_method("lora")


def test_a_run_imports_its_own_methods_code_and_no_other_commands():
    """What a benchmark run imports keys its cache: an l0 run must not depend on swr's, basis's or inspect's code."""
    import subprocess
    import sys

    code = ("import sys; from diffcli.cli.app import run; from diffcli.methods import get_method; "
            "rc = run(['train', '--help']); get_method('l0'); "
            "print(sorted(m for m in sys.modules if m.startswith(('diffcli.methods.', 'diffcli.cli.cmd_'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])
    assert "diffcli.methods.l0" in loaded and "diffcli.cli.cmd_train" in loaded
    assert not {"diffcli.methods.swr", "diffcli.methods.basis", "diffcli.methods.fixed_masks",
                "diffcli.cli.cmd_inspect", "diffcli.cli.cmd_merge", "diffcli.cli.cmd_apply"} & set(loaded)
    assert get_method("basis").name == "basis"  # asked for: imported then


def test_an_option_of_another_method_is_refused_by_the_library():
    with pytest.raises(InvalidValueError, match=r"--method random does not take --epochs \(taken by --method "
                                                r"l0/magnitude/swr/basis\)"):
        _opts("random", epochs=1).validate()
    with pytest.raises(InvalidValueError, match="--alpha-lr"):
        _opts("fisher", alpha_lr=0.1).validate()
    _opts("magnitude", epochs=1, lr=1e-3).validate()  # its own options are fine


@pytest.mark.parametrize("method", ["l0", *MASKS])
def test_train_pack_apply_gives_the_trained_model(tmp_path, tiny_base, method):
    """train --method X → pack → apply: the rebuilt model is base + diff, and scores what train reported."""
    from transformers import AutoModelForSequenceClassification

    from diffcli import artifact
    from diffcli.weights import WeightStore

    train_file, dev_file = write_task(tmp_path / "data")
    ckpt, packed, merged = tmp_path / "ckpt", tmp_path / "t.diff", tmp_path / "merged"
    result = _cli("train", "--train-file", str(train_file), "--validation-file", str(dev_file), "--model",
                  str(tiny_base), "--method", method, *COMMON, *PER_METHOD[method], "-o", str(ckpt), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    diff = checkpoint.load(ckpt)
    k = round(0.02 * diff.budget_numel)
    assert summary["method"] == method and summary["after_projection"]["k"] == k
    assert summary["after_projection"]["kept"] == k  # the mask holds exactly k entries
    assert diff.nnz <= k  # entries that never moved (zero gradient) are not stored
    assert diff.nnz > 0 or summary["after_fixmask"]["epoch"] == 0  # the best epoch may be the start (δ = 0)
    assert diff.meta["hyperparameters"]["method"] == method
    assert diff.meta["method"] == get_method(method).meta_name
    assert diff.meta["method_options"] == summary["method_options"]
    assert set(diff.meta["method_options"]) == set(get_method(method).options)
    for args in (["pack", str(ckpt), "-o", str(packed), "--values", "fp32"],
                 ["apply", str(tiny_base), str(packed), "-o", str(merged)]):
        assert _cli(*args).exit_code == 0
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    state, base, packed_diff = model.state_dict(), WeightStore(tiny_base), artifact.load(packed)
    for name, td in packed_diff.tensors.items():
        assert torch.equal(state[name], base[td.base_name] + td.dense()), name
    # the applied model scores on the dev data what train reported for its best epoch
    ev = _cli("eval", str(tiny_base), str(packed), "--validation-file", str(dev_file), "--text-fields", "sentence",
              "--label-field", "label", "--json")
    assert ev.exit_code == 0, ev.output
    got = json.loads(ev.stdout)["metrics"]
    want = summary["after_fixmask"]["metrics"]
    assert got.keys() == want.keys()
    for split in want:
        for metric, value in want[split].items():
            assert got[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)


def _mask(tmp_path, base, out, method, **kw) -> torch.Tensor:
    """The flat positions the fixed phase trained (from the resumable state after the mask's choice)."""
    from diffcli.train_state import load_state

    def stop(phase, epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, base, out, method, on_epoch_end=stop, **kw)
    tensors, state = load_state(partial_dir(tmp_path / out))
    assert state["phase"] == "fixmask" and state["record"]["projection"]["mask"] == method
    return tensors["mask/index"]


def test_random_mask_is_seeded_sorted_and_exactly_k(tmp_path, tiny_base):
    a = _mask(tmp_path, tiny_base, "a", "random")
    b = _mask(tmp_path, tiny_base, "b", "random")
    c = _mask(tmp_path, tiny_base, "c", "random", seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a[1:] > a[:-1]).all()) and a.numel() == c.numel()


def test_fisher_mask_is_the_top_k_of_the_fisher_diagonal_at_the_base(tmp_path, tiny_base):
    from diffcli.diffmodel import FlatParams
    from diffcli.dist import Dist
    from diffcli.fisher import fisher_diagonal
    from diffcli.task_types import build_task_model
    from diffcli.data_sources import load_task
    from diffcli.tasks import encode
    from diffcli.trainloop import loader

    index = _mask(tmp_path, tiny_base, "f", "fisher", fill_samples=16)
    train_file, dev_file = write_task(tmp_path / "data")
    data = load_task(train_file=str(train_file), validation_file=str(dev_file))
    tm = build_task_model(tiny_base, data.spec, seed=5)
    flat = FlatParams(tm.model, tm.gated, torch.device("cpu"))
    params = dict(tm.model.named_parameters())
    batches = loader(encode(data.train, tm.tokenizer, 128), 8, 5 + 2, 0, Dist())
    score = fisher_diagonal(tm.model, flat, [params[n] for n in tm.head], [b for _, b in zip(range(2), batches)],
                            torch.device("cpu"))
    outside = torch.ones(flat.numel, dtype=torch.bool)
    outside[index] = False
    # the mask ranks bfloat16 sums (8-bit mantissa): equal to float32's ranking up to their rounding
    assert float(score[index].min()) >= float(score[outside].max()) * (1 - 2 ** -6)
    assert float(score[index].mean()) > 10 * float(score[outside].mean())


@pytest.mark.parametrize("method", ["fisher", "random"])
def test_mask_methods_never_build_n_sized_flat_buffers(tmp_path, tiny_base, monkeypatch, method):
    """On one process the fixed phase keeps δ and AdamW at the k kept entries (SparseDiffTrainer), no FlatParams."""
    from diffcli import diffmodel

    def refuse(*a, **k):
        raise AssertionError("FlatParams built")

    monkeypatch.setattr(diffmodel, "FlatParams", refuse)
    monkeypatch.setattr(diffmodel, "MaskedDiff", refuse)
    summary = _run(tmp_path, tiny_base, "s", method, fixmask_epochs=1)
    assert summary["after_projection"]["kept"] == summary["after_projection"]["k"]


def test_a_run_the_device_cannot_hold_stops_first_naming_the_methods_that_fit(tmp_path, tiny_base, monkeypatch):
    from diffcli import memory_estimate
    from diffcli.task_types import build_task_model
    from diffcli.data_sources import load_task
    from diffcli.training import memory_needs

    train_file, dev_file = write_task(tmp_path / "data")
    data = load_task(train_file=str(train_file), validation_file=str(dev_file))
    tm = build_task_model(tiny_base, data.spec, seed=0)
    # the run's own length: the default 128 cut to the tiny model's 64 positions
    needs = memory_needs(tm, TrainOptions(sparsity=0.02, batch_size=8, max_seq_length=64), torch.device("cpu"))
    assert needs["fisher"] == needs["random"] < needs["magnitude"] < needs["l0"]
    free = (needs["magnitude"] + needs["l0"]) // 2
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: free)
    monkeypatch.setattr("diffcli.training._rss", lambda: 0)
    out = tmp_path / "ckpt"
    result = _cli("train", "--method", "l0", "--train-file", str(train_file), "--validation-file", str(dev_file),
                  "--model", str(tiny_base), "--sparsity", "2%", "--batch-size", "8", "-o", str(out))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --method l0 needs about") and "is free" in line
    assert "--method fisher needs about" in line and "--method magnitude needs about" in line
    assert not out.exists() and not partial_dir(out).exists()


def test_magnitude_mask_starts_from_the_dense_runs_largest_deltas(tmp_path, tiny_base):
    summary = _run(tmp_path, tiny_base, "m", "magnitude", epochs=1, lr=1e-3, fixmask_epochs=0)
    proj = summary["after_projection"]
    assert proj["mask"] == "magnitude" and proj["kept"] == proj["k"] and proj["dense_epochs"] == 1
    diff = checkpoint.load(tmp_path / "m")  # no fixed-mask epoch: the diff is the projected dense δ
    assert diff.nnz == proj["k"] and [e["phase"] for e in diff.meta["history"]] == ["dense"]


def test_resume_of_a_mask_method_matches_the_uninterrupted_run(tmp_path, tiny_base):
    kw = dict(fixmask_epochs=2)
    _run(tmp_path, tiny_base, "full", "fisher", **kw)

    def interrupt(phase, epoch):
        if (phase, epoch) == ("fixmask", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_base, "cut", "fisher", on_epoch_end=interrupt, **kw)
    _run(tmp_path, tiny_base, "cut", "fisher", resume=True, **kw)
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut")
    for name, ta in a.tensors.items():
        assert torch.equal(ta.values, b.tensors[name].values), name


@pytest.mark.parametrize("args, needle", [
    (["--method", "lora"], "unknown --method 'lora'"),
    (["--method", "random", "--epochs", "2"], "--method random does not take --epochs"),
    (["--method", "fisher", "--alpha-lr", "0.1", "--structured"], "does not take --alpha-lr (taken by --method l0/swr), "
                                                                  "--structured (taken by --method l0) (hint: "),
    (["--method", "random", "--fill-samples", "8"], "--fill-samples (taken by --method l0/fisher/basis)"),
])
def test_bad_method_flags_exit_2_before_any_work(tmp_path, tiny_base, args, needle):
    train_file, dev_file = write_task(tmp_path / "data")
    out = tmp_path / "ckpt"
    result = _cli("train", "--train-file", str(train_file), "--validation-file", str(dev_file), "--model",
                  str(tiny_base), *args, "-o", str(out))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.parametrize("method", ["fisher", "magnitude"])
def test_mask_methods_under_torchrun_write_one_complete_checkpoint(tmp_path, tiny_base, method):
    import os
    import subprocess
    import sys

    train_file, dev_file = write_task(tmp_path / "data", n_train=64)
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffcli",
           "train", "--train-file", str(train_file), "--validation-file", str(dev_file), "--model", str(tiny_base),
           "--method", method, *COMMON, *PER_METHOD[method], "--device", "cpu", "-o", str(out), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    diff = checkpoint.load(out)
    assert summary["world_size"] == 2 and summary["method"] == method
    assert summary["after_projection"]["kept"] == round(0.02 * diff.budget_numel) >= diff.nnz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ckpt", "data"]  # one writer, no leftovers


def test_a_resume_ignores_options_its_method_does_not_take_and_checks_the_rest(tmp_path, tiny_base):
    """A random-mask run whose record holds other values of options it never uses (another version's defaults)
    resumes; a changed option it does take is still refused."""
    def interrupt(phase, epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    _run(tmp_path, tiny_base, "full", "random", fixmask_epochs=2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_base, "cut", "random", fixmask_epochs=2, on_epoch_end=interrupt)
    state_file = partial_dir(tmp_path / "cut") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["options"]["epochs"] == 3  # a method without a first phase records the pre-table default
    state["options"].update(epochs=7, alpha_lr=0.1)  # options of other methods, at other values
    state_file.write_text(json.dumps(state))
    with pytest.raises(InvalidValueError, match=r"--fixmask-lr 0.01 \(now 0.02\)"):
        _run(tmp_path, tiny_base, "cut", "random", fixmask_epochs=2, fixmask_lr=2e-2, resume=True)
    _run(tmp_path, tiny_base, "cut", "random", fixmask_epochs=2, resume=True)
    full, cut = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut")
    assert all(torch.equal(full.tensors[n].values, cut.tensors[n].values) for n in full.tensors)
