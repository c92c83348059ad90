"""The train pipeline on tiny models: projection budget, fixed mask, checkpoint, reproducibility, resume, controller."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from diffcli import checkpoint
from diffcli.errors import InvalidValueError, OutputExistsError
from diffcli.trained_diff import fill_budget as _fill_budget
from diffcli.trained_diff import project as _project
from diffcli.training import (DensityController, L0Trainer, TrainOptions, build_task_model, fisher_diagonal,
                              partial_dir, train)
from diffcli.weights import WeightStore, tensor_digest
from tests.training_data import write_task


def _spec():
    from diffcli.tasks import TaskSpec

    return TaskSpec("custom", ("sentence",), "label", ("0", "1"), ("accuracy",), "accuracy")


def _opts(**kw) -> TrainOptions:
    base = dict(method="l0", epochs=1, fixmask_epochs=1, batch_size=8, sparsity=0.02, lr=1e-3, fixmask_lr=1e-3, seed=5)
    base.update(kw)
    return TrainOptions(**base)


def _run(tmp_path: Path, base: Path, out: str, **kw):
    train_file, dev_file = write_task(tmp_path / "data")
    cb = kw.pop("on_epoch_end", None)
    resume = kw.pop("resume", False)
    return train(train_file=str(train_file), validation_file=str(dev_file), model=str(base),
                 output=tmp_path / out, options=_opts(**kw), resume=resume, on_epoch_end=cb)


def _same_diff(a, b) -> bool:
    if set(a.tensors) != set(b.tensors) or set(a.extras) != set(b.extras):
        return False
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        if not torch.equal(ta.values, tb.values) or ta.is_dense != tb.is_dense:
            return False
        if not ta.is_dense and not torch.equal(ta.indices, tb.indices):
            return False
    return all(torch.equal(a.extras[n], b.extras[n]) for n in a.extras)


def test_projection_keeps_exactly_round_s_n_largest_entries(tiny_base):
    from diffcli.diffmodel import FlatParams

    tm = build_task_model(tiny_base, _spec(), seed=0)
    flat = FlatParams(tm.model, tm.gated, torch.device("cpu"))
    delta = torch.randn(flat.numel, generator=torch.Generator().manual_seed(0))
    index, values, info = _project(tm, flat, delta, 0.013)
    k = round(0.013 * flat.numel)
    assert index.numel() == k == info["kept"] == info["k"]
    assert bool((index[1:] > index[:-1]).all())
    assert torch.equal(values, delta[index])
    threshold = delta.abs()[index].min()
    outside = torch.ones(flat.numel, dtype=torch.bool)
    outside[index] = False
    assert float(delta.abs()[outside].max()) <= float(threshold)


def test_budget_is_filled_when_the_gates_closed_below_it(tiny_base):
    tm = build_task_model(tiny_base, _spec(), seed=0)
    trainer = L0Trainer(tm.model, tm.gated, tm.head, _opts(structured=False), torch.device("cpu"), total_steps=1)
    gd, n = trainer.gd, trainer.flat.numel
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gd.w.copy_(torch.randn(n, generator=g))
        gd.log_alpha.copy_(torch.randn(n, generator=g) - 6.0)  # nearly all gates closed
    delta = gd.delta()
    index, values, info = _project(tm, trainer.flat, delta, 0.05)
    assert info["kept"] == int((delta != 0).sum()) < info["k"]
    score = gd.gate.prob_nonzero(gd.log_alpha.detach()).mul_(gd.w.detach()).abs_()  # --fill gates
    full, vals, filled = _fill_budget(score.clone(), index, values, info["k"] - info["kept"])
    assert filled == info["k"] - info["kept"] and full.numel() == info["k"]
    assert bool((full[1:] > full[:-1]).all())
    assert torch.equal(vals, delta[full])  # projected values kept, new entries start at 0
    new = full[delta[full] == 0]
    rest = torch.ones(n, dtype=torch.bool)
    rest[full] = False
    assert float(score[new].min()) >= float(score[rest].max())


def test_fisher_diagonal_sums_squared_batch_gradients(tiny_base):
    from diffcli.diffmodel import FlatParams

    tm = build_task_model(tiny_base, _spec(), seed=0)
    flat = FlatParams(tm.model, tm.gated, torch.device("cpu"))
    params = dict(tm.model.named_parameters())
    head = [params[n] for n in tm.head]
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(5, 90, (4, 7), generator=g),
                "attention_mask": torch.ones(4, 7, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(3)]
    tm.model.train()
    got = fisher_diagonal(tm.model, flat, head, iter(batches), torch.device("cpu"))
    assert tm.model.training and not flat.grad.any()  # mode restored, gradients cleared
    tm.model.eval()  # the same sums, by autograd one batch at a time
    want = torch.zeros(flat.numel)
    for b in batches:
        grads = torch.autograd.grad(tm.model(**b).loss, flat.params)
        want += torch.cat([x.reshape(-1) for x in grads]) ** 2
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-12)
    assert int((got > 0).sum()) > flat.numel // 2


def test_fisher_fill_tops_up_the_budget_from_the_gradients(tmp_path, tiny_base):
    # gates start shut (σ(−4)·3 − 1.5 < 0), so the L0 phase keeps next to nothing and the fill supplies the mask
    summary = _run(tmp_path, tiny_base, "f", fixmask_epochs=0, log_alpha_init=-4.0, fill="fisher", fill_samples=16)
    proj = summary["after_projection"]
    assert proj["fill"] == "fisher" and proj["filled"] > 0
    assert proj["kept"] + proj["filled"] == proj["k"] == round(0.02 * summary["budget_numel"])
    hp = checkpoint.load(tmp_path / "f").meta["hyperparameters"]
    assert hp["fill"] == "fisher" and hp["fill_samples"] == 16
    for bad in ({"fill": "random"}, {"fill_samples": 0}):
        with pytest.raises(InvalidValueError, match="--fill"):
            _opts(**bad).validate()


def test_fixed_mask_phase_changes_only_the_kept_entries(tiny_base):
    from diffcli.diffmodel import FlatParams, MaskedDiff

    tm = build_task_model(tiny_base, _spec(), seed=0)
    flat = FlatParams(tm.model, tm.gated, torch.device("cpu"))
    index = torch.sort(torch.randperm(flat.numel, generator=torch.Generator().manual_seed(1))[:300]).values
    md = MaskedDiff(flat, index, torch.zeros(300))
    opt = torch.optim.AdamW([md.values], lr=1e-2)
    ids = torch.randint(5, 40, (6, 10), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        flat.zero_grad()
        tm.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1] * 3)).loss.backward()
        md.backward_()
        assert torch.equal(md.values.grad, flat.grad[index])
        opt.step()
        md.write_()
    changed = (flat.theta != flat.theta0).nonzero().flatten()
    assert changed.numel() > 0 and set(changed.tolist()) <= set(index.tolist())
    assert torch.equal(flat.theta[index], flat.theta0[index] + md.values.detach())


def test_one_epoch_train_writes_a_complete_checkpoint(tmp_path, tiny_base):
    summary = _run(tmp_path, tiny_base, "out")
    diff = checkpoint.load(tmp_path / "out")
    assert diff.nnz == round(0.02 * diff.budget_numel) == summary["nnz"]
    assert all(not t.is_dense for t in diff.tensors.values())
    assert sorted(diff.extras) == ["classifier.bias", "classifier.weight"]  # the new head, dense
    store = WeightStore(tiny_base)
    for td in diff.tensors.values():
        assert td.digest == tensor_digest(store[td.base_name])
    hp = diff.meta["hyperparameters"]
    assert set(hp) == {f.name for f in fields(TrainOptions)}
    assert hp["sparsity"] == 0.02 and hp["structured"] is True and hp["l0_lambda"] == 1.25e-7
    assert diff.config["architectures"] == ["BertForSequenceClassification"]
    assert diff.config["num_labels"] == 2 if "num_labels" in diff.config else len(diff.config["id2label"]) == 2
    for key in ("after_l0", "after_projection", "after_fixmask"):
        assert "accuracy" in summary[key]["metrics"]["validation"]
    assert summary["after_projection"]["kept"] == diff.nnz
    assert not partial_dir(tmp_path / "out").exists()


def test_fixmask_start_w_restarts_kept_entries_from_the_raw_learned_w(tmp_path, tiny_base):
    # gates started near the stretch's zero (σ(0.5)·3 − 1.5 ≈ 0.37) so that ẑ < 1 after a short run
    _run(tmp_path, tiny_base, "d", fixmask_epochs=0, log_alpha_init=0.5)
    _run(tmp_path, tiny_base, "w", fixmask_epochs=0, log_alpha_init=0.5, fixmask_start="w")
    d, w = checkpoint.load(tmp_path / "d"), checkpoint.load(tmp_path / "w")
    assert d.meta["hyperparameters"]["fixmask_start"] == "delta"
    assert w.meta["hyperparameters"]["fixmask_start"] == "w"
    assert w.meta["results"]["projection"]["start"] == "w"
    changed = 0
    for name, td in d.tensors.items():
        tw = w.tensors[name]
        assert torch.equal(td.indices, tw.indices)  # the same mask
        # δ = ẑ·ẑ_g·w with gates in [0, 1]: same sign, never larger, 0 where the budget fill added the entry
        assert torch.all(td.values.abs() <= tw.values.abs() * (1 + 1e-6))
        assert torch.all(td.values * tw.values >= 0)
        changed += int((td.values != tw.values).sum())
    assert changed > 0
    with pytest.raises(InvalidValueError, match="--fixmask-start"):
        _opts(fixmask_start="zero").validate()


def test_training_is_reproducible_on_cpu(tmp_path, tiny_base):
    _run(tmp_path, tiny_base, "a")
    _run(tmp_path, tiny_base, "b")
    assert _same_diff(checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b"))
    _run(tmp_path, tiny_base, "c", seed=6)
    assert not _same_diff(checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "c"))


@pytest.mark.parametrize("stop_at", [("l0", 1), ("fixmask", 1)])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_base, stop_at):
    kw = dict(epochs=2, fixmask_epochs=2)
    _run(tmp_path, tiny_base, "full", **kw)

    def interrupt(phase, epoch):
        if (phase, epoch) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_base, "cut", on_epoch_end=interrupt, **kw)
    assert not (tmp_path / "cut").exists()  # nothing that looks complete
    assert (partial_dir(tmp_path / "cut") / "state.json").is_file()
    state = json.loads((partial_dir(tmp_path / "cut") / "state.json").read_text())
    assert (state["phase"], state["epochs_done"]) == stop_at
    with pytest.raises(OutputExistsError):  # a fresh start would silently discard it
        _run(tmp_path, tiny_base, "cut", **kw)
    with pytest.raises(InvalidValueError):  # other options than the interrupted run
        _run(tmp_path, tiny_base, "cut", resume=True, **{**kw, "lr": 2e-3})
    _run(tmp_path, tiny_base, "cut", resume=True, **kw)
    assert _same_diff(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut"))
    assert not partial_dir(tmp_path / "cut").exists()


def test_resume_refuses_other_data_and_takes_a_state_that_predates_the_check(tmp_path, tiny_base):
    """A custom task is `custom` whatever its files: the examples themselves must match to resume."""
    from tests.training_data import write_task

    kw = dict(epochs=2, fixmask_epochs=1)

    def interrupt(phase, epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_base, "cut", on_epoch_end=interrupt, **kw)
    train_file, dev_file = write_task(tmp_path / "data")
    other = tmp_path / "other.csv"
    lines = train_file.read_text().splitlines()
    other.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # the same rows, another order
    for files, limit, needle in (((other, dev_file), None, "same counts but other content"),
                                 ((train_file, dev_file), 8, "its examples")):
        with pytest.raises(InvalidValueError, match=needle):
            train(train_file=str(files[0]), validation_file=str(files[1]), model=str(tiny_base), output=tmp_path / "cut",
                  options=_opts(**kw), resume=True, max_train_samples=limit)
    state_file = partial_dir(tmp_path / "cut") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["examples"]["train"] > 8 and len(state["data"]["sha256"]) == 64
    del state["data"]  # written by an earlier diffprune: resumed as before
    state_file.write_text(json.dumps(state))
    _run(tmp_path, tiny_base, "cut", resume=True, **kw)
    _run(tmp_path, tiny_base, "full", **kw)
    assert _same_diff(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut"))


def test_resume_names_other_text_fields_and_takes_a_state_whose_fields_were_misrecorded(tmp_path, tiny_base):
    """The state records the columns it read: another --text-fields is named as such, not as "other content"."""
    rows = ["a,b,label", *(f"w{i} good,x{i} bad,{i % 2}" for i in range(24))]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:9]) + "\n")
    kw = dict(epochs=2, fixmask_epochs=1)

    def go(fields, out, **more):
        return train(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv"),
                     model=str(tiny_base), output=tmp_path / out, options=_opts(**kw), text_fields=fields, **more)

    def interrupt(phase, epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        go(["a"], "cut", on_epoch_end=interrupt)
    state_file = partial_dir(tmp_path / "cut") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["text_fields"] == ["a"] and state["data"]["identity"] == 2
    with pytest.raises(InvalidValueError, match=r"its text fields \['a'\] \(now \['a', 'b'\]\)"):
        go(["a", "b"], "cut", resume=True)
    del state["data"]["identity"]  # written before the fields were recorded right: their record is not compared
    state["data"]["text_fields"] = ["a", "b", "label"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(InvalidValueError, match="same counts but other content"):  # the rows still are
        go(["a", "b"], "cut", resume=True)
    go(["a"], "cut", resume=True)
    go(["a"], "full")
    assert _same_diff(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut"))


def test_the_data_is_digested_once_per_run_not_at_every_save(tmp_path, tiny_base, monkeypatch):
    """Once per run, a resumed one included: its check before training digests it, and the saves reuse that."""
    from diffcli import trainloop, training

    calls = []
    real = trainloop.data_identity
    for module in (trainloop, training):
        monkeypatch.setattr(module, "data_identity", lambda data: calls.append(1) or real(data))
    _run(tmp_path, tiny_base, "out", epochs=2, fixmask_epochs=2)
    assert len(calls) == 1

    def interrupt(phase, epoch):
        if (phase, epoch) == ("l0", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_base, "cut", epochs=2, fixmask_epochs=2, on_epoch_end=interrupt)
    calls.clear()
    _run(tmp_path, tiny_base, "cut", epochs=2, fixmask_epochs=2, resume=True)
    assert len(calls) == 1


def test_resume_of_lm_data_does_not_depend_on_how_its_path_is_spelled(tmp_path, monkeypatch):
    """LM and tagged rows record where they were read (path as typed, line): the data check hashes their content."""
    from test_task_types import write_lm
    from tiny_lms import make_gpt2

    base = make_gpt2(tmp_path / "gpt2")
    write_lm(tmp_path / "lm.jsonl")
    monkeypatch.chdir(tmp_path)
    opts = TrainOptions(method="random", sparsity=0.05, fixmask_epochs=2, batch_size=4)

    def interrupt(phase, epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(task_type="causal-lm", train_file="lm.jsonl", validation_file="lm.jsonl", model=str(base),
              output=tmp_path / "ck", options=opts, on_epoch_end=interrupt)
    full = str(tmp_path / "lm.jsonl")
    train(task_type="causal-lm", train_file=full, validation_file=full, model=str(base), output=tmp_path / "ck",
          options=opts, resume=True)
    assert checkpoint.load(tmp_path / "ck").nnz > 0


def test_a_resume_record_with_a_key_this_version_lacks_is_refused_in_one_line():
    from diffcli.train_state import check_resume_source

    data = {"examples": {"train": 4}, "sha256": "0" * 64}
    check_resume_source({"task": "t", "model": "m", "data": data}, "t", "m", Path("w"), data)
    with pytest.raises(InvalidValueError, match="its vocab 'new' \\(now None\\)"):
        check_resume_source({"task": "t", "model": "m", "data": {**data, "vocab": "new"}}, "t", "m", Path("w"), data)


def test_density_controller_schedule_and_direction():
    c = DensityController(target=0.01, lam0=1e-7, rate=0.1, warmup_steps=100, start=0.9)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert c.scheduled(0) == pytest.approx(0.9)
    assert logit(c.scheduled(50)) == pytest.approx((logit(0.9) + logit(0.01)) / 2)
    assert c.scheduled(100) == c.scheduled(1000) == pytest.approx(0.01)
    c.update(100, 0.5)
    lam = c.lam
    assert c.update(101, 0.5) > lam  # too dense and not falling → push harder
    lam = c.lam
    assert c.update(102, 0.05) < lam  # falling much faster than needed → ease off
    c.update(103, 0.001)
    lam = c.lam
    assert c.update(104, 0.001) < lam  # too sparse and not rising → ease off
    off = DensityController(target=0.01, lam0=1e-7, rate=0.1, warmup_steps=0, enabled=False)
    assert off.update(0, 0.9) == 1e-7


def _l0_density(tiny_base, controller: bool, steps: int = 120) -> tuple[float, float]:
    tm = build_task_model(tiny_base, _spec(), seed=0)
    opts = _opts(sparsity=0.05, controller=controller, lr=1e-3, alpha_lr=0.2)
    trainer = L0Trainer(tm.model, tm.gated, tm.head, opts, torch.device("cpu"), total_steps=steps)
    g = torch.Generator().manual_seed(0)
    tm.model.train()
    for _ in range(steps):
        ids = torch.randint(5, 45, (8, 12), generator=g)
        labels = (ids == 36).any(1).long()
        stats = trainer.step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return stats["expected_density"], trainer.gd.deterministic_density()


def test_controller_drives_expected_density_to_the_target(tiny_base):
    expected, deterministic = _l0_density(tiny_base, controller=True)
    assert 0.05 / 2 <= expected <= 0.05 * 1.5
    assert 0.05 / 2 <= deterministic <= 0.05 * 1.5
    expected_off, _ = _l0_density(tiny_base, controller=False)
    assert expected_off > 0.3  # the paper's fixed λ leaves the gates far denser


def test_too_few_l0_steps_for_the_schedule_says_where_the_gates_stop_and_the_epochs_needed(tmp_path, tiny_base):
    from diffcli.training import Reporter

    train_file, dev_file = write_task(tmp_path / "data")
    infos: list[str] = []
    warnings: list[str] = []
    rep = Reporter(info=infos.append, warn=warnings.append)
    common = dict(train_file=str(train_file), validation_file=str(dev_file), model=str(tiny_base), reporter=rep)

    def schedule_lines() -> list[str]:
        return [line for line in infos if "the gates need about" in line]

    # alpha_lr 0.05: log α must travel ~10 in logit space at 0.025 per step, ~380 steps; one tiny epoch has far fewer.
    train(output=tmp_path / "a", options=_opts(alpha_lr=0.05), **common)
    [line] = schedule_lines()
    assert warnings == []  # expected on small data, not a warning
    need = int(line.split("--epochs ")[1].split()[0])
    assert need > 1
    stop = float(line.split("stop near ")[1].split("%")[0]) / 100
    assert 0.02 < stop < 0.99  # between the start (~0.99) and the 2% target
    infos.clear()
    # A fast enough log α learning rate fits the schedule into the same steps: nothing said.
    train(output=tmp_path / "b", options=_opts(alpha_lr=50.0), **common)
    assert schedule_lines() == []
