"""`diffprune merge`: the merged .diff packs, verifies and applies; overlap report; refusals with exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli import artifact, checkpoint
from diffcli.cli.app import app
from diffcli.extract import extract_diff
from diffcli.projection import project
from diffcli.weights import WeightStore

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_base(root / "base")
    diffs = []
    for seed, labels in ((1, 2), (2, 2), (3, 3)):
        d = project(extract_diff(str(base), str(make_finetune(base, root / f"ft{seed}", seed=seed,
                                                              num_labels=labels))), 0.2).diff
        artifact.write(d, root / f"d{seed}.diff", values="fp32")
        diffs.append(d)
    other = make_base(root / "other", seed=9)
    foreign = project(extract_diff(str(other), str(make_finetune(other, root / "fto"))), 0.2).diff
    checkpoint.save(foreign, root / "foreign.ckpt")
    return root, base, diffs


def test_merged_diff_packs_verifies_and_applies(env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root, base, diffs = env
    out = tmp_path / "m.diff"
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "d2.diff"), "-o", str(out),
                              "--weights", "0.5,0.25", "--values", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["output"] == str(out) and report["method"] == "sum"
    assert [i["weight"] for i in report["inputs"]] == [0.5, 0.25]
    assert report["totals"]["shared"] > 0 and report["totals"]["union"] > report["totals"]["shared"]
    assert {g["layer"] for g in report["layers"]} >= {"embeddings", "layer 00", "layer 01"}

    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    merged = artifact.load(out)
    assert merged.base_fingerprint == diffs[0].base_fingerprint
    assert merged.nnz == report["totals"]["nnz"]

    res = runner.invoke(app, ["apply", str(base), str(out), "-o", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")  # loads cleanly
    applied, b = WeightStore(tmp_path / "model"), WeightStore(base)
    for name, td in diffs[0].tensors.items():
        expect = b[td.base_name] + 0.5 * td.dense() + 0.25 * diffs[1].tensors[name].dense()
        torch.testing.assert_close(applied[name], expect, rtol=0, atol=1e-6)
    for name, t in diffs[0].extras.items():  # extras rule "first"
        assert torch.equal(applied[name], t)


def test_ties_to_a_checkpoint_folder_with_human_report(env, tmp_path):
    root, _, _ = env
    out = tmp_path / "ties.ckpt"
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "d2.diff"), str(root / "d3.diff"),
                              "-o", str(out), "--method", "ties"])
    assert res.exit_code == 0, res.output
    assert "sign conflicts" in res.stdout and "dropped" in res.stdout
    merged = checkpoint.load(out)
    assert merged.meta["merge"]["method"] == "ties"
    assert merged.config.get("num_labels", 2) == 2  # first input's head


def test_different_bases_are_refused(env, tmp_path):
    root, _, _ = env
    out = tmp_path / "x.diff"
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "foreign.ckpt"), "-o", str(out)])
    assert res.exit_code == 5
    assert "another base" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_classifier_and_a_tagger_of_one_base_merge_and_the_result_verifies_on_it(env, tmp_path):
    """The tagger has no pooler, so its fingerprint differs from the classifier's; one base made both, so they merge
    (with or without --base) and the merged file verifies against that base."""
    from transformers import BertForTokenClassification

    from conftest import write_vocab

    root, base, _ = env
    torch.manual_seed(3)
    tagger = BertForTokenClassification.from_pretrained(base, num_labels=5)
    with torch.no_grad():
        for p in tagger.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tagger.save_pretrained(tmp_path / "ft_tag")
    write_vocab(tmp_path / "ft_tag")
    tag = project(extract_diff(str(base), str(tmp_path / "ft_tag")), 0.2).diff
    checkpoint.save(tag, tmp_path / "tag.ckpt")
    cls = artifact.load(root / "d1.diff")
    assert not any("pooler" in td.base_name for td in tag.tensors.values())
    assert tag.base_fingerprint != cls.base_fingerprint
    for extra in ([], ["--base", str(base)]):
        out = tmp_path / f"m{len(extra)}.diff"
        res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(tmp_path / "tag.ckpt"), "-o", str(out),
                                  *extra])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["verify", str(out), "--base", str(base)])
        assert res.exit_code == 0, res.output


def test_a_base_the_diffs_were_not_made_on_is_refused_whatever_they_hold(env, tmp_path):
    """--base is checked against every input, not only when basis records need it: a wrong one is never ignored."""
    root, base, _ = env
    out = tmp_path / "x.diff"
    args = ["merge", str(root / "d1.diff"), str(root / "d2.diff"), "-o", str(out), "--base"]
    res = runner.invoke(app, [*args, str(root / "other")])
    assert res.exit_code == 5, res.output
    assert f"{root / 'd1.diff'} was made on another base than {root / 'other'}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()
    res = runner.invoke(app, [*args, str(base), "--json"])
    assert res.exit_code == 0, res.output
    assert "basis_probe_error" not in json.loads(res.stdout) and out.exists()  # no basis record: no probe error


@pytest.mark.parametrize("args, code, needle", [
    (["--weights", "1"], 2, "1 weights for 2 diffs"),
    (["--method", "mean"], 2, "method 'mean'"),
    (["--values", "fp8"], 2, "--values 'fp8'"),
    (["--density", "1.5", "--method", "ties"], 2, "density"),
])
def test_bad_options(env, tmp_path, args, code, needle):
    root, _, _ = env
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "d2.diff"), "-o", str(tmp_path / "m.diff"),
                              *args])
    assert res.exit_code == code, res.output
    assert needle in res.stderr
    assert not (tmp_path / "m.diff").exists()


def test_values_is_refused_for_a_checkpoint_folder_not_silently_ignored(env, tmp_path):
    root, _, _ = env
    ins = [str(root / "d1.diff"), str(root / "d2.diff")]
    for values in ("bogus", "int4", "fp16"):  # each exited 0 and wrote float32 values, the flag unread
        res = runner.invoke(app, ["merge", *ins, "-o", str(tmp_path / "m"), "--values", values])
        assert res.exit_code == 2 and "--values packs an OUT.diff" in res.stderr, res.output
        assert not (tmp_path / "m").exists()
    assert runner.invoke(app, ["merge", *ins, "-o", str(tmp_path / "m")]).exit_code == 0
    assert runner.invoke(app, ["merge", *ins, "-o", str(tmp_path / "m.diff")]).exit_code == 0  # fp16 by default
    assert artifact.load(tmp_path / "m.diff") is not None


@pytest.mark.parametrize("name", ["m", "m.diff"])
def test_weights_that_overflow_float32_are_refused_for_any_output(env, tmp_path, name):
    """-w 1e300,1 wrote a folder of Inf that apply and pack then refused; the .diff output was refused."""
    root, _, _ = env
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "d2.diff"), "-o", str(tmp_path / name),
                              "-w", "1e300,1"])
    assert res.exit_code == 2 and "is not finite: the weights" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_non_finite_input_is_named_not_blamed_on_the_weights(env, tmp_path):
    """A diverged run's checkpoint (one NaN) must not read as weights that overflow: the input and tensor are named."""
    root, _, diffs = env
    bad = diffs[0]
    name = next(n for n, td in bad.tensors.items() if td.values.numel())
    saved = bad.tensors[name].values.clone()
    try:
        bad.tensors[name].values[0] = float("nan")
        checkpoint.save(bad, tmp_path / "nan")
    finally:
        bad.tensors[name].values.copy_(saved)
    res = runner.invoke(app, ["merge", str(tmp_path / "nan"), str(root / "d2.diff"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and f"diff {name!r} holds NaN or infinite values" in res.stderr, res.output
    assert str(tmp_path / "nan") in res.stderr and "weights" not in res.stderr and not (tmp_path / "m").exists()


def test_heads_of_different_shapes_cannot_be_averaged(env, tmp_path):
    root, _, _ = env
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "d3.diff"), "-o", str(tmp_path / "m.diff"),
                              "--extras", "mean"])
    assert res.exit_code == 2
    assert "cannot average extra" in res.stderr


def test_existing_output_and_single_input(env, tmp_path):
    root, _, _ = env
    out = tmp_path / "m.diff"
    out.write_bytes(b"keep")
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), str(root / "d2.diff"), "-o", str(out)])
    assert res.exit_code == 6 and out.read_bytes() == b"keep"
    res = runner.invoke(app, ["merge", str(root / "d1.diff"), "-o", str(tmp_path / "n.diff")])
    assert res.exit_code == 2 and "at least two" in res.stderr


def test_a_merge_of_a_diff_trained_for_int4_is_read_and_packed_as_stored(env, tmp_path):
    """The first input's `train --values int4` no longer travels into the merge: no training saw the merged δ as
    int4, so readers took it re-quantized (apply, eval, DiffBank) and pack chose int4 without a word."""
    from diffcli.sources import load_diff

    root, _, diffs = env
    trained = artifact.load(root / "d1.diff")
    trained.meta["hyperparameters"] = {"values": "int4", "fixmask_lr": 1e-3}
    checkpoint.save(trained, tmp_path / "qat.ckpt")
    requantized, stored = load_diff(tmp_path / "qat.ckpt"), load_diff(tmp_path / "qat.ckpt", as_trained=False)
    assert any(not torch.equal(requantized.tensors[n].dense(), td.dense()) for n, td in stored.tensors.items())
    res = runner.invoke(app, ["merge", str(tmp_path / "qat.ckpt"), str(root / "d2.diff"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    merged = checkpoint.load(tmp_path / "m")
    assert merged.meta["hyperparameters"] == {"fixmask_lr": 1e-3}  # the rest of the provenance stays
    as_read = load_diff(tmp_path / "m")
    assert all(torch.equal(as_read.tensors[n].dense(), td.dense()) for n, td in merged.tensors.items())
    packed = runner.invoke(app, ["pack", str(tmp_path / "m"), "-o", str(tmp_path / "m.diff"), "--json"])
    assert packed.exit_code == 0 and json.loads(packed.stdout)["values"] == "fp16" and "warning" not in packed.stderr
