"""`train --method swr`: units, the knapsack under the budget, bad input (exit 2), and one end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffcli import checkpoint
from diffcli.cli.app import app
from diffcli.errors import InvalidValueError
from diffcli.methods.swr import Unit, choose, parse_budget, plan_units
from tests.training_data import write_task

runner = CliRunner()
FAST = ["--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--lr", "1e-3"]


def test_units_low_rank_where_factors_are_smaller_dense_elsewhere():
    units = {u.name: u for u in plan_units({"q": (32, 32), "emb": (120, 32), "tt": (2, 32), "b": (32,),
                                            "conv": (4, 2, 3)}, 8)}
    assert (units["q"].kind, units["q"].cost) == ("lowrank", 8 * 64)
    assert (units["emb"].kind, units["emb"].cost) == ("lowrank", 8 * 152)
    assert (units["tt"].kind, units["tt"].cost) == ("dense", 64)  # rank 8 > 2: a dense δ is smaller
    assert (units["b"].kind, units["b"].cost) == ("dense", 32)
    assert (units["conv"].kind, units["conv"].cost) == ("dense", 24)
    assert plan_units({"q": (32, 32)}, 16)[0].kind == "dense"  # 16·64 = 32·32: factors no smaller
    with pytest.raises(InvalidValueError, match="--rank 33 exceeds the smaller dimension of every matrix"):
        plan_units({"q": (32, 32), "emb": (120, 32)}, 33)


def test_choice_follows_probability_and_never_exceeds_the_budget():
    units = [Unit("a", (10, 10), "lowrank", 40), Unit("b", (10,), "dense", 10), Unit("c", (10, 10), "lowrank", 40),
             Unit("d", (5,), "dense", 5)]
    assert choose(units, [0.9, 0.8, 0.7, 0.1], 55) == [True, True, False, True]  # c does not fit, d does
    assert choose(units, [0.9, 0.8, 0.7, 0.1], 4) == [False] * 4
    assert choose(units, [0.5] * 4, 55) == [True, True, False, True]  # ties: cheaper first, then by name (a before c)
    torch.manual_seed(0)
    for _ in range(50):
        costs = torch.randint(1, 100, (12,)).tolist()
        us = [Unit(str(i), (c,), "dense", c) for i, c in enumerate(costs)]
        budget = int(torch.randint(1, 400, ()).item())
        picked = choose(us, torch.rand(12).tolist(), budget)
        assert sum(c for c, p in zip(costs, picked) if p) <= budget


@pytest.mark.parametrize("text, want", [("100000", ("count", 100000.0)), ("0.5%", ("fraction", 0.005)),
                                        (" 12 ", ("count", 12.0)), (None, None)])
def test_parse_budget(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("text", ["abc", "1.5", "0%", "150%", "-3", "", "9" * 400])
def test_parse_budget_refuses_nonsense(text):
    with pytest.raises(InvalidValueError, match="--budget"):
        parse_budget(text)


@pytest.fixture
def data(tmp_path):
    return write_task(tmp_path / "data")


@pytest.mark.parametrize("args, message", [
    (["--method", "swr", "--budget", "0"], "--budget 0 gives 0 parameters"),
    (["--method", "swr", "--budget", "99999999"], "must lie in 1.."),
    (["--method", "swr", "--budget", "150%"], "percentage in (0, 100]"),
    (["--method", "swr", "--budget", "lots"], "is not a parameter count"),
    (["--method", "swr", "--rank", "0"], "--rank must be an integer ≥ 1"),
    (["--method", "swr", "--rank", "33"], "--rank 33 exceeds the smaller dimension"),
    (["--rank", "4"], "--method magnitude does not take --rank (taken by --method swr)"),
    (["--budget", "1000"], "--method magnitude does not take --budget"),
    (["--method", "swr", "--fill", "fisher"], "--method swr does not take --fill (taken by --method l0)"),
    (["--method", "swr", "--structured"], "--method swr does not take --structured"),
    (["--method", "nope"], "unknown --method 'nope'"),
])
def test_bad_input_is_one_line_exit_2_before_training(tmp_path, tiny_base, data, args, message):
    train, dev = data
    out = tmp_path / "ckpt"
    res = runner.invoke(app, ["train", "--train-file", str(train), "--validation-file", str(dev), "--model",
                              str(tiny_base), *FAST, *args, "-o", str(out)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert "Traceback" not in res.output and "epoch" not in res.output
    assert not out.exists() and not (tmp_path / "ckpt.partial").exists()


def test_swr_end_to_end_train_pack_verify_apply(tmp_path, tiny_base, data):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from diffcli.applying import apply_
    from diffcli.weights import WeightStore

    train, dev = data
    ckpt, packed, merged = tmp_path / "ckpt", tmp_path / "swr.diff", tmp_path / "merged"
    budget = 3000
    res = runner.invoke(app, ["train", "--train-file", str(train), "--validation-file", str(dev), "--model",
                              str(tiny_base), *FAST, "--method", "swr", "--rank", "4", "--budget", str(budget),
                              "--alpha-lr", "0.2", "-o", str(ckpt), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["method"] == "swr" and summary["method_options"]["rank"] == 4
    diff = checkpoint.load(ckpt)
    units = diff.meta["units"]
    assert len(units) == len(diff.tensors) - sum(1 for t in diff.tensors if "position_ids" in t)
    assert all(0 <= u["probability"] <= 1 and u["cost"] > 0 for u in units)
    chosen = [u for u in units if u["chosen"]]
    assert chosen and sum(u["cost"] for u in chosen) <= budget
    assert diff.nnz <= budget  # stored update parameters never exceed the cap
    for u in units:
        td = diff.tensors[u["tensor"]]
        if not u["chosen"]:
            assert td.nnz == 0
        elif u["kind"] == "lowrank":
            assert td.is_lowrank and td.factors[0].shape[1] == 4
        else:
            assert not td.is_lowrank and td.nnz <= u["cost"]
    assert any(u["kind"] == "lowrank" for u in chosen)

    assert runner.invoke(app, ["pack", str(ckpt), "-o", str(packed), "--values", "fp32"]).exit_code == 0
    res = runner.invoke(app, ["verify", str(packed), "--base", str(tiny_base)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(packed), "--json"])
    report = json.loads(res.stdout)
    assert report["totals"]["params"] == diff.nnz <= budget
    res = runner.invoke(app, ["inspect", str(packed)])
    assert res.exit_code == 0 and f"{len(chosen)} of {len(units)} chosen" in res.stdout
    assert runner.invoke(app, ["apply", str(tiny_base), str(packed), "-o", str(merged)]).exit_code == 0

    rebuilt = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert type(rebuilt) is BertForSequenceClassification  # the base architecture, no adapter modules
    reference = BertForSequenceClassification.from_pretrained(tiny_base, num_labels=2).eval()
    apply_(reference, diff)  # the in-memory model: base + B·A / δ from the checkpoint, head loaded
    store = WeightStore(tiny_base)
    state = rebuilt.state_dict()
    for u in chosen:  # W' = W + B·A exactly (float32 base, float32 factors)
        td = diff.tensors[u["tensor"]]
        assert torch.equal(state[u["tensor"]], store[td.base_name].float() + td.dense())
    batch = {"input_ids": torch.randint(5, 40, (3, 9), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, reference(**batch).logits)
    best = summary["after_fixmask"]["metrics"]["validation"]
    res = runner.invoke(app, ["eval", str(tiny_base), str(packed), "--validation-file", str(dev), "--json"])
    assert res.exit_code == 0, res.output  # in memory (DiffBank): the numbers of the training run's best epoch
    report = json.loads(res.stdout)
    got = report["metrics"] if "accuracy" in report["metrics"] else next(iter(report["metrics"].values()))
    assert got["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9)


def test_a_budget_every_unit_fits_chooses_all_without_a_penalty(tmp_path, tiny_base, data):
    train, dev = data
    out = tmp_path / "ckpt"
    res = runner.invoke(app, ["train", "--train-file", str(train), "--validation-file", str(dev), "--model",
                              str(tiny_base), "--epochs", "1", "--fixmask-epochs", "0", "--batch-size", "16",
                              "--method", "swr", "--budget", "100%", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "every unit fits the budget" in res.stderr + res.stdout
    diff = checkpoint.load(out)
    assert all(u["chosen"] for u in diff.meta["units"])
    assert diff.meta["results"]["best"]["epoch"] == 0


def test_the_library_pruner_takes_swr_and_refuses_a_foreign_flag_with_one_clear_error(tiny_base):
    """swr runs through the library too (tests/test_api_methods.py trains it); its flags are checked as train's."""
    from transformers import BertForSequenceClassification

    from diffcli.api import DiffPruner

    model = BertForSequenceClassification.from_pretrained(tiny_base, num_labels=2)
    pruner = DiffPruner(model, str(tiny_base), method="swr", rank=4, budget="3000")
    assert pruner.phase.budget == 3000 and {u.kind for u in pruner.phase.units} == {"lowrank", "dense"}
    with pytest.raises(InvalidValueError, match="--method swr does not take --fill"):
        DiffPruner(model, str(tiny_base), method="swr", fill="fisher")


def _swr_run(tmp_path, base, out: str, **kw):
    from diffcli.training import TrainOptions, train

    train_file, dev_file = write_task(tmp_path / "data")
    cb, resume = kw.pop("on_epoch_end", None), kw.pop("resume", False)
    opts = TrainOptions(**{**dict(method="swr", epochs=2, fixmask_epochs=2, batch_size=8, lr=1e-3, fixmask_lr=1e-2,
                                  rank=4, budget="3000", alpha_lr=0.2, seed=5), **kw})
    return train(train_file=str(train_file), validation_file=str(dev_file), model=str(base), output=tmp_path / out,
                 options=opts, resume=resume, on_epoch_end=cb)


def _stored(diff) -> dict[str, torch.Tensor]:
    """Every stored tensor of a diff: B and A of low-rank records, positions and values of sparse ones, the head."""
    out = {f"extra/{n}": t for n, t in diff.extras.items()}
    for name, td in diff.tensors.items():
        if td.is_lowrank:
            out[f"{name}/B"], out[f"{name}/A"] = td.factors
        else:
            out[f"{name}/values"] = td.values
            if td.indices is not None:
                out[f"{name}/indices"] = td.indices
    return out


@pytest.mark.parametrize("stop_at", [("gated", 1), ("fixmask", 1)])
def test_swr_resume_after_interruption_matches_the_uninterrupted_run(tmp_path, tiny_base, stop_at):
    from diffcli.errors import OutputExistsError
    from diffcli.training import partial_dir

    _swr_run(tmp_path, tiny_base, "full")

    def interrupt(phase, epoch):
        if (phase, epoch) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _swr_run(tmp_path, tiny_base, "cut", on_epoch_end=interrupt)
    assert not (tmp_path / "cut").exists()
    state = json.loads((partial_dir(tmp_path / "cut") / "state.json").read_text())
    assert (state["phase"], state["epochs_done"]) == stop_at
    with pytest.raises(OutputExistsError):  # a fresh start would silently discard it
        _swr_run(tmp_path, tiny_base, "cut")
    with pytest.raises(InvalidValueError, match="--rank"):  # other options than the interrupted run
        _swr_run(tmp_path, tiny_base, "cut", resume=True, **{"rank": 2})
    _swr_run(tmp_path, tiny_base, "cut", resume=True)
    assert not partial_dir(tmp_path / "cut").exists()
    full, cut = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut")
    a, b = _stored(full), _stored(cut)
    assert a.keys() == b.keys() and any(k.endswith("/B") for k in a)
    for key in a:  # bit for bit: the same steps on the same values, optimiser and RNG states restored exactly
        assert torch.equal(a[key], b[key]), key
    for key in ("units", "history"):
        assert cut.meta[key] == full.meta[key], key
    assert cut.meta["results"] == full.meta["results"]


def test_swr_best_snapshot_round_trips_through_the_resumable_state():
    from diffcli.methods.swr import snapshot_from, snapshot_tensors

    g = torch.Generator().manual_seed(0)
    best = {"factors": {0: [torch.randn(3, 2, generator=g), torch.randn(2, 5, generator=g)],
                        11: [torch.randn(7, generator=g)]},
            "head": {"classifier.weight": torch.randn(2, 4, generator=g), "classifier.bias": torch.zeros(2)}}
    back = snapshot_from({**snapshot_tensors(best), "swr/log_alpha": torch.zeros(3), "opt_m/0/step": torch.ones(())})
    assert back["factors"].keys() == best["factors"].keys() and back["head"].keys() == best["head"].keys()
    for i, f in best["factors"].items():
        assert len(back["factors"][i]) == len(f) and all(torch.equal(x, y) for x, y in zip(f, back["factors"][i]))
    assert all(torch.equal(best["head"][n], back["head"][n]) for n in best["head"])


def _swr_pruner(tiny_base, **kw):
    """A library pruner of `--method swr` on the tiny base (dropout off, so two passes over a batch agree)."""
    from transformers import BertForSequenceClassification

    from diffcli.api import DiffPruner

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_base, num_labels=2).eval()
    pruner = DiffPruner(model, str(tiny_base), method="swr", **{"rank": 2, "budget": "3000", **kw})
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 30, (4, 9), generator=g),
             "attention_mask": torch.ones(4, 9, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
    return model, pruner, batch


def test_the_surrogate_gives_autograd_gradients_of_the_factors_and_the_gates(tiny_base):
    """METHODS.md (swr): dL/dB, dL/dA, dL/dδ and dL/dz from dL/dθ via Σ_u z_u·⟨Δ_u, G_u⟩, ⟨B·A, G⟩ = ⟨B, G·Aᵀ⟩,
    equal autograd through θ = θ₀ + z·Δ; B (and δ) start nonzero here, so A's gradient is not trivially 0."""
    from torch.func import functional_call

    model, pruner, batch = _swr_pruner(tiny_base)
    tr = pruner.phase
    every = list(range(len(tr.units)))
    with torch.no_grad():
        for f in tr.factors:
            f[0].normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    z = torch.linspace(0.1, 0.9, len(tr.units))
    tr.write_(z.tolist(), every)
    tr.flat.zero_grad()
    model(**batch).loss.backward()
    zs = z.clone().requires_grad_(True)
    tr.surrogate(zs, every).backward()
    got = [t.grad.clone() for t in tr.every] + [zs.grad]

    leaves = [[t.detach().clone().requires_grad_(True) for t in f] for f in tr.factors]
    za = z.clone().requires_grad_(True)
    params = {}
    for i, (name, shape, a, b) in enumerate(zip(tr.flat.names, tr.flat.shapes, tr.flat.offsets, tr.flat.offsets[1:])):
        delta = leaves[i][0] @ leaves[i][1] if len(leaves[i]) == 2 else leaves[i][0]
        params[name] = tr.flat.theta0[a:b].view(shape) + za[i] * delta.reshape(shape)
    functional_call(model, params, args=(), kwargs=batch).loss.backward()
    want = [t.grad for f in leaves for t in f] + [za.grad]
    assert {u.kind for u in tr.units} == {"lowrank", "dense"} and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(float(t.grad.abs().sum()) > 0 for f in tr.factors if len(f) == 2 for t in f[1:])  # dL/dA tested


def test_the_multiplier_pulls_the_expected_cost_to_the_budget(tiny_base):
    """swr's λ (the l0 method's DensityController on E[cost] = Σ_u P(z_u ≠ 0)·c_u) rises while the expected cost is
    over its schedule and falls once it is under: the cost comes down to the budget, which the same λ₀ without the
    controller does not reach in the same steps."""
    def run(**kw):
        model, pruner, batch = _swr_pruner(tiny_base, budget="300", alpha_lr=0.2, total_steps=60, **kw)
        tr = pruner.phase
        start, path = tr.expected_density() * tr.n, []
        for _ in range(80):
            pruner.begin()
            model(**batch).loss.backward()
            path.append(pruner.finish())
        return tr, start, path

    tr, start, path = run()
    assert start > 10 * tr.budget and not tr.fits_all                 # every unit on at first: far over the cap
    lams, costs = [p["lambda"] for p in path], [p["expected_cost"] for p in path]
    top = lams.index(max(lams))
    assert lams[top] > 100 * lams[0] and costs[top] > tr.budget         # λ rose while the cost was over
    assert min(costs) <= tr.budget                                      # the cost came down to the budget
    assert lams[-1] < lams[top] / 100 and costs[-1] < tr.budget         # under it, λ eased off again
    _, _, fixed = run(controller=False)
    assert fixed[-1]["lambda"] == fixed[0]["lambda"]
    assert min(p["expected_cost"] for p in fixed) > 2 * tr.budget
