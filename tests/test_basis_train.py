"""`train --method basis` on a tiny random BERT: train → pack → verify → apply → the trained model, double
pruning in one file, a tampered base refused through the probe, and bad input refused before training."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from diffcli import artifact, checkpoint
from diffcli.cli.app import app
from diffcli.errors import InvalidValueError
from tests.training_data import write_task

FAST = ["--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--basis-lr", "1e-2"]


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One basis run and one double-pruning run on the same tiny base and data."""
    from conftest import make_base

    root = tmp_path_factory.mktemp("basis-train")
    base = make_base(root / "base")
    train, dev = write_task(root / "data")
    data = ["--train-file", str(train), "--validation-file", str(dev), "--model", str(base)]
    basis = json.loads(run("train", *data, "--method", "basis", "--keep-bases", "0.5", *FAST,
                           "-o", str(root / "basis"), "--json").stdout)
    with pytest.MonkeyPatch.context() as mp:  # every later epoch scores higher: the sparse phase's last one is kept
        calls = iter(range(10**6))
        rising(mp, calls)
        double = json.loads(run("train", *data, "--method", "basis", "--sparsity", "2%", *FAST,
                                "-o", str(root / "double"), "--json").stdout)
    return {"root": root, "base": base, "train": train, "dev": dev, "data": data, "basis": basis, "double": double}


def _logits(folder, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _in_memory_logits(base, diff, texts):
    """base + diff through the library's in-memory apply (scales from the checkpoint's float32 values)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffcli.applying import apply_
    from diffcli.bank import task_config

    model = AutoModelForSequenceClassification.from_pretrained(base, config=task_config(diff)).eval()
    apply_(model, diff)
    batch = AutoTokenizer.from_pretrained(base)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def rising(mp, calls) -> None:
    """Make every epoch score higher than the last, wherever the best epoch is chosen."""
    for where in ("diffcli.fixmask", "diffcli.trainloop", "diffcli.methods.basis"):  # trainloop: Run.keep_if_best
        mp.setattr(f"{where}.main_score", lambda spec, results: float(next(calls)))


TEXTS = ["the movie is good", "a bad cat", "not good yes", "dog"]


def test_basis_train_pack_verify_apply_reproduces_the_trained_model(trained):
    root, base = trained["root"], trained["base"]
    diff = checkpoint.load(root / "basis")
    summary = trained["basis"]
    total = summary["bases"]["total"]
    # every non-embedding 2-D weight of the tiny BERT: 2 layers × (4 of 32×32 + 2 of 32×64) + the pooler
    assert summary["bases"]["matrices"] == len(diff.bases) == 2 * 6 + 1 and total == 2 * 6 * 32 + 32
    assert sum(bs.nkept for bs in diff.bases.values()) == summary["bases"]["kept"] == round(0.5 * total)
    assert not any("embeddings" in n for n in diff.bases) and all(td.nnz == 0 for td in diff.tensors.values())
    assert diff.nnz == summary["bases"]["kept"] == summary["nnz"]  # the stored parameters: the kept scales alone
    assert diff.meta["method"] == "basis-scaling" and diff.meta["method_options"]["keep_bases"] == 0.5

    packed = root / "basis.diff"
    run("pack", str(root / "basis"), "-o", str(packed), "--values", "fp32")
    verified = json.loads(run("verify", str(packed), "--base", str(base), "--json").stdout)
    assert any("basis probes of 13 matrices" in c for c in verified["checks"])
    inspected = json.loads(run("inspect", str(packed), "--json").stdout)
    assert inspected["totals"]["params"] == round(0.5 * total)
    applied = json.loads(run("apply", str(base), str(packed), "-o", str(root / "merged"), "--json").stdout)
    assert applied["basis_probe_error"] < 1e-9

    got = _logits(root / "merged", TEXTS)
    assert torch.allclose(got, _in_memory_logits(base, diff, TEXTS), atol=1e-5)
    # the rebuilt model scores what the trainer's best epoch scored
    result = json.loads(run("eval", str(base), str(packed), "--validation-file", str(trained["dev"]),
                            "--text-fields", "sentence", "--label-field", "label", "--json").stdout)
    assert result["metrics"]["validation"] == summary["after_fixmask"]["metrics"]["validation"]


def test_basis_embeddings_adds_the_embedding_tables_and_they_rebuild_from_the_base(trained, tmp_path):
    """--basis-embeddings (off by default, METHODS.md): the word, position and token-type tables get scales too,
    and `apply` rebuilds them from the base's SVD, as `eval` and the in-memory apply do."""
    base = trained["base"]
    summary = json.loads(run("train", *trained["data"], "--method", "basis", "--keep-bases", "0.5",
                             "--basis-embeddings", *FAST, "-o", str(tmp_path / "ckpt"), "--json").stdout)
    diff = checkpoint.load(tmp_path / "ckpt")
    tables = sorted(n for n in diff.bases if "embeddings" in n)
    assert [n.split(".")[-2] for n in tables] == ["position_embeddings", "token_type_embeddings", "word_embeddings"]
    assert summary["bases"]["matrices"] == len(diff.bases) == 2 * 6 + 1 + 3
    assert diff.meta["method_options"]["basis_embeddings"] is True
    assert any(float(diff.bases[n].values.abs().max()) > 0 for n in tables)  # the tables' scales moved from 1
    packed = tmp_path / "e.diff"
    run("pack", str(tmp_path / "ckpt"), "-o", str(packed), "--values", "fp32")
    applied = json.loads(run("apply", str(base), str(packed), "-o", str(tmp_path / "merged"), "--json").stdout)
    assert applied["basis_probe_error"] < 1e-9
    assert torch.allclose(_logits(tmp_path / "merged", TEXTS), _in_memory_logits(base, diff, TEXTS), atol=1e-5)


def test_double_pruning_puts_both_kinds_in_one_file(trained):
    root, base = trained["root"], trained["base"]
    diff = checkpoint.load(root / "double")
    assert diff.bases and diff.nnz == round(0.02 * diff.budget_numel) + sum(bs.nkept for bs in diff.bases.values())
    assert trained["double"]["method_options"]["double_prune"] is True
    packed = root / "double.diff"
    run("pack", str(root / "double"), "-o", str(packed))
    header = artifact.read_header(packed)
    kinds = {r[0] for r in header["records"]}
    assert {"sparse", "basis", "dense"} <= kinds
    back = artifact.load(packed)
    assert back.nnz == diff.nnz and sorted(back.bases) == sorted(diff.bases)
    inspected = json.loads(run("inspect", str(packed), "--json").stdout)
    assert inspected["totals"]["params"] == diff.nnz == header["nnz"]  # fp16 codes no scale to 0 here
    run("apply", str(base), str(packed), "-o", str(root / "merged2"))
    got = _logits(root / "merged2", TEXTS)
    assert torch.allclose(got, _in_memory_logits(base, back, TEXTS), atol=1e-5)


def test_a_tampered_base_is_refused_through_the_probe(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    packed = tmp_path / "b.diff"
    run("pack", str(trained["root"] / "basis"), "-o", str(packed))
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in trained["base"].iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tampered / "model.safetensors"))
    state["encoder.layer.0.attention.output.dense.weight"].mul_(1.001)
    save_file(state, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["apply", str(tampered), str(packed), "-o", str(tmp_path / "out"), "--force"])
    assert result.exit_code == 5 and "probe" in result.stderr, result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["eval", str(tampered), str(packed), "--validation-file", str(trained["dev"]),
                                      "--text-fields", "sentence", "--label-field", "label"])
    assert result.exit_code == 5


@pytest.mark.parametrize("extra, message", [
    (["--method", "basis", "--keep-bases", "0"], "--keep-bases"),
    (["--method", "basis", "--keep-bases", "1.5"], "--keep-bases"),
    (["--method", "basis", "--keep-bases", "nan"], "--keep-bases"),
    (["--method", "basis", "--alpha-lr", "0.1"], "does not take --alpha-lr"),
    (["--method", "basis", "--structured"], "does not take --structured"),
    (["--keep-bases", "0.3"], "--method magnitude does not take --keep-bases (taken by --method basis)"),
    (["--basis-embeddings"], "--method magnitude does not take --basis-embeddings"),
    (["--method", "basis", "--basis-lr", "-1"], "--basis-lr"),
    (["--method", "lora"], "unknown --method"),
    (["--method", "basis", "--budget", "lots"], "--budget"),
    (["--method", "basis", "--budget", "0"], "--budget"),
    (["--method", "basis", "--budget", "200%"], "--budget"),
    (["--method", "basis", "--budget", "10", "--sparsity", "1%"], "must exceed the 242 sparse entries"),
    (["--method", "basis", "--budget", "100", "--keep-bases", "0.5"], "give one of them"),
])
def test_bad_input_exits_2_before_training(trained, tmp_path, extra, message):
    result = CliRunner().invoke(app, ["train", *trained["data"], *extra, "-o", str(tmp_path / "ck")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.partial").exists()


def test_basis_on_a_base_without_matrices_is_refused():
    from diffcli.methods import get_method
    from diffcli.train_options import TrainOptions

    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    embedding_only = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    opts = TrainOptions(method="basis")
    for m in (model, embedding_only):
        names = [n for n, _ in m.named_parameters()]
        stub = SimpleNamespace(tm=SimpleNamespace(model=m, gated=names), opts=opts, dev=torch.device("cpu"))
        with pytest.raises(InvalidValueError, match="needs 2-D weights"):
            get_method("basis").setup(stub)


def test_pruning_keeps_the_most_important_bases_and_the_rebuild_starts_at_the_base():
    """a = 1 writes θ₀ exactly; prune_ keeps the top importances globally; dL/da matches autograd."""
    from diffcli.diffmodel import FlatParams
    from diffcli.methods.basis import BasisScaling

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 5))
    names = ["0.weight", "1.weight"]
    flat = FlatParams(model, names, torch.device("cpu"))
    bs = BasisScaling(flat, names, torch.device("cpu"))
    before = flat.theta.clone()
    bs.write_()
    assert torch.equal(flat.theta, before) and bs.nbases == 8
    x = torch.randn(3, 6)
    with torch.no_grad():
        bs.a.add_(torch.randn(8) * 0.1)
    bs.write_()
    flat.zero_grad()
    model(x).square().sum().backward()
    bs.backward_(accumulate=True)
    # autograd through the reparametrisation itself
    a = bs.a.detach().clone().requires_grad_(True)
    h = x
    for j, (name, sl, shape, u, s, vh) in enumerate(bs.mats):
        w = flat.theta0[sl].view(shape) + (u * ((a[bs.bounds[j]:bs.bounds[j + 1]] - 1) * s)) @ vh
        h = h @ w.T + dict(model.named_parameters())[name.replace("weight", "bias")]
    h.square().sum().backward()
    assert torch.allclose(bs.a.grad, a.grad, atol=1e-5)
    want = torch.argsort(bs.importance, descending=True)[:3]
    bs.prune_(3)
    assert sorted(torch.nonzero(bs.alive).flatten().tolist()) == sorted(want.tolist())
    assert int((bs.a != 0).sum()) == 3


def test_double_pruning_resumes_on_the_scaled_model(tmp_path, tiny_base):
    """Interrupted in the sparse phase, --resume rebuilds the scaled model and gives the uninterrupted diff."""
    from diffcli.training import TrainOptions, train

    train_file, dev = write_task(tmp_path / "data")
    opts = dict(method="basis", double_prune=True, sparsity=0.02, epochs=1, fixmask_epochs=2, batch_size=8,
                basis_lr=1e-2)

    def go(out: str, **kw):
        return train(train_file=str(train_file), validation_file=str(dev), model=str(tiny_base),
                     output=tmp_path / out, options=TrainOptions(**opts), **kw)

    def interrupt(phase, epoch):
        if (phase, epoch) == ("fixmask", 1):
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:  # later epochs score higher: the sparse δ is kept
        calls = iter(range(10**6))
        rising(mp, calls)
        go("full")
        with pytest.raises(KeyboardInterrupt):
            go("cut", on_epoch_end=interrupt)
        go("cut", resume=True)
    full, cut = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut")
    assert full.nnz == cut.nnz > 0 and sorted(full.bases) == sorted(cut.bases)
    for name, td in full.tensors.items():
        assert torch.allclose(td.dense(), cut.tensors[name].dense(), atol=1e-6), name
    for name, bs in full.bases.items():
        assert torch.equal(bs.values, cut.bases[name].values) and bs.probe == cut.bases[name].probe


def test_budget_caps_scales_plus_sparse_entries(tmp_path, tiny_base):
    from diffcli.training import TrainOptions, train

    train_file, dev = write_task(tmp_path / "data")
    out = tmp_path / "ck"
    summary = train(train_file=str(train_file), validation_file=str(dev), model=str(tiny_base), output=out,
                    options=TrainOptions(method="basis", budget="300", double_prune=True, sparsity=0.005,
                                         epochs=1, fixmask_epochs=1, batch_size=8))
    diff = checkpoint.load(out)
    sparse = round(0.005 * diff.budget_numel)
    assert summary["bases"]["kept"] == sum(bs.nkept for bs in diff.bases.values()) == 300 - sparse
    assert diff.nnz == summary["nnz"] <= 300  # nnz counts the kept scales too, as the packed header does


def test_torchrun_two_processes_train_basis_with_double_pruning(tmp_path, tiny_base):
    """Under DDP every rank scales, prunes and picks the same bases; rank 0 alone writes one checkpoint."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train_file, dev = write_task(tmp_path / "data", n_train=64)
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffcli", "train", "--train-file", str(train_file), "--validation-file", str(dev),
           "--model", str(tiny_base), "--method", "basis", "--sparsity", "2%", "--fill-samples", "32", *FAST,
           "--device", "cpu", "-o", str(out), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["world_size"] == 2 and summary["bases"]["kept"] == round(0.5 * summary["bases"]["total"])
    diff = checkpoint.load(out)
    assert sum(bs.nkept for bs in diff.bases.values()) == summary["bases"]["kept"]
    packed = tmp_path / "b.diff"
    run("pack", str(out), "-o", str(packed))
    run("verify", str(packed), "--base", str(tiny_base))


def test_the_library_pruner_takes_basis_and_refuses_a_foreign_flag_with_one_line(tiny_base):
    """basis runs through the library too (tests/test_api_methods.py trains it); its flags are checked as train's."""
    from transformers import AutoModelForSequenceClassification

    from diffcli.api import DiffPruner

    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=2)
    pruner = DiffPruner(model, tiny_base, method="basis", keep_bases=0.25)
    assert pruner.method_state.keep == round(0.25 * pruner.method_state.nbases)
    with pytest.raises(InvalidValueError, match="--method basis does not take --alpha-lr"):
        DiffPruner(model, tiny_base, method="basis", alpha_lr=0.1)


# Dev scores by the epoch just trained (`Run.epoch` notes it): the kept scales' best epoch is the first (so the
# resumed run must restore its snapshot), the sparse phase rises (so double pruning keeps δ). Anything else: 0.
SCRIPTED = {("basis-fixed", 1): 2.0, ("basis-fixed", 2): 1.0, ("basis-fixed", 3): 1.5,
            **{("fixed-mask", e): 10.0 + e for e in (1, 2)}}


def scripted_scores(mp) -> None:
    from diffcli.trainloop import Run

    current = [None]
    epoch = Run.epoch

    def noted(self, label, i, epochs, seed, step):
        current[0] = (label, i + 1)
        return epoch(self, label, i, epochs, seed, step)

    mp.setattr(Run, "epoch", noted)
    for where in ("diffcli.fixmask", "diffcli.trainloop", "diffcli.methods.basis"):
        mp.setattr(f"{where}.main_score", lambda spec, results: SCRIPTED.get(current[0], 0.0))


@pytest.fixture(scope="module")
def resume_task(tmp_path_factory):
    """A base, data and the uninterrupted runs (one per double-pruning setting, made when first asked for)."""
    from conftest import make_base

    root = tmp_path_factory.mktemp("basis-resume")
    return {"root": root, "base": make_base(root / "base"), "data": write_task(root / "data"), "full": {}}


def _basis_run(task, out: str, double: bool, **kw):
    from diffcli.training import TrainOptions, train

    train_file, dev = task["data"]
    opts = TrainOptions(method="basis", epochs=2, fixmask_epochs=3, batch_size=8, basis_lr=1e-2, fixmask_lr=1e-2,
                        keep_bases=0.5, seed=3, **(dict(double_prune=True, sparsity=0.02) if double else {}))
    with pytest.MonkeyPatch.context() as mp:
        scripted_scores(mp)
        return train(train_file=str(train_file), validation_file=str(dev), model=str(task["base"]),
                     output=task["root"] / out, options=opts, **kw)


@pytest.mark.parametrize("stop_at, double", [(("basis", 1), False), (("basis-fixed", 1), False),
                                             (("basis", 2), True), (("basis-fixed", 1), True),
                                             (("basis-fixed", 3), True)])
def test_basis_resume_after_interruption_matches_the_uninterrupted_run(resume_task, stop_at, double):
    """Interrupted after an epoch of the scale phase or of the kept scales' fixed phase (the last one included),
    --resume gives the uninterrupted checkpoint bit for bit: the same steps on the same restored values."""
    from diffcli.training import partial_dir

    if double not in resume_task["full"]:
        _basis_run(resume_task, f"full-{double}", double)
        resume_task["full"][double] = checkpoint.load(resume_task["root"] / f"full-{double}")
    out = f"cut-{stop_at[0]}-{stop_at[1]}-{double}"

    def interrupt(phase, epoch):
        if (phase, epoch) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _basis_run(resume_task, out, double, on_epoch_end=interrupt)
    state = json.loads((partial_dir(resume_task["root"] / out) / "state.json").read_text())
    assert (state["phase"], state["epochs_done"]) == stop_at
    _basis_run(resume_task, out, double, resume=True)
    full, cut = resume_task["full"][double], checkpoint.load(resume_task["root"] / out)
    assert full.meta["results"]["bases"]["best"]["epoch"] == 1  # the scripted best: the snapshot before epochs 2, 3
    assert (full.nnz > sum(bs.nkept for bs in full.bases.values())) == double  # double pruning kept a sparse δ
    assert sorted(full.bases) == sorted(cut.bases) and full.extras.keys() == cut.extras.keys()
    for name, bs in full.bases.items():
        got = cut.bases[name]
        assert torch.equal(bs.kept, got.kept) and torch.equal(bs.values, got.values) and bs.probe == got.probe, name
    for name, td in full.tensors.items():
        assert torch.equal(td.dense(), cut.tensors[name].dense()), name
    for name, t in full.extras.items():
        assert torch.equal(t, cut.extras[name]), name
    for key in ("history", "results"):  # every epoch's loss and metrics, the pruning and the best epochs
        assert cut.meta[key] == full.meta[key], key
