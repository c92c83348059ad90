"""`prune` end to end: extraction from a full finetune, checkpoint round trip, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffcli import checkpoint
from diffcli.cli.app import app
from diffcli.extract import extract_diff
from diffcli.weights import WeightStore

runner = CliRunner()


def test_extract_matches_prefixed_names_and_keeps_head_dense(tiny_base, tiny_finetune):
    diff = extract_diff(str(tiny_base), str(tiny_finetune))
    base, ft = WeightStore(tiny_base), WeightStore(tiny_finetune)
    assert set(diff.extras) == {"classifier.weight", "classifier.bias"}
    assert all(name.startswith("bert.") for name in diff.tensors)
    assert len(diff.tensors) == len(base.names())
    for name, td in diff.tensors.items():
        assert torch.allclose(base[td.base_name] + td.dense(), ft[name], atol=1e-6)
    assert diff.budget_numel == sum(int(t.numel()) for _, t in base.items())
    assert diff.config["architectures"] == ["BertForSequenceClassification"]


def test_checkpoint_round_trip(tiny_base, tiny_finetune, tmp_path):
    diff = extract_diff(str(tiny_base), str(tiny_finetune))
    diff.meta["task"] = "rte"
    checkpoint.save(diff, tmp_path / "ck")
    back = checkpoint.load(tmp_path / "ck")
    assert back.base_fingerprint == diff.base_fingerprint and back.meta["task"] == "rte"
    for name, td in diff.tensors.items():
        assert torch.equal(back.tensors[name].dense(), td.dense())
    for name, t in diff.extras.items():
        assert torch.equal(back.extras[name], t)


def test_prune_cli_from_full_finetune(tiny_base, tiny_finetune, tmp_path):
    out = tmp_path / "ck"
    res = runner.invoke(app, ["prune", str(tiny_finetune), "--base", str(tiny_base), "--sparsity", "1%", "-o", str(out),
                              "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    diff = checkpoint.load(out)
    assert diff.nnz == report["kept"] == report["k"] == round(0.01 * diff.budget_numel)
    assert {g["layer"] for g in report["layers"]} >= {"embeddings", "layer 00", "layer 01", "pooler"}
    # re-projecting the checkpoint to a smaller budget works without --base
    res = runner.invoke(app, ["prune", str(out), "--sparsity", "0.002", "-o", str(tmp_path / "ck2")])
    assert res.exit_code == 0, res.output
    assert checkpoint.load(tmp_path / "ck2").nnz == round(0.002 * diff.budget_numel)
    assert "kept" in res.stdout


def test_prune_cli_per_tensor_scope(tiny_base, tiny_finetune, tmp_path):
    res = runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "5%", "--scope", "per-tensor",
                              "-o", str(tmp_path / "ck"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["tensors"]
    big = [r for r in rows if r["numel"] >= 1000]
    assert all(abs(r["kept"] - 0.05 * r["numel"]) <= 1 for r in big)


@pytest.mark.parametrize("args,code,needle", [
    (["--sparsity", "150%"], 2, "sparsity"),
    (["--sparsity", "abc"], 2, "sparsity"),
    (["--sparsity", "1%", "--scope", "per-layer"], 2, "scope"),
])
def test_prune_cli_bad_values(tiny_base, tiny_finetune, tmp_path, args, code, needle):
    out = tmp_path / "ck"
    res = runner.invoke(app, ["prune", str(tiny_finetune), "--base", str(tiny_base), "-o", str(out), *args])
    assert res.exit_code == code
    assert needle in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not out.exists()


def test_prune_cli_missing_and_existing(tiny_base, tiny_finetune, tmp_path):
    res = runner.invoke(app, ["prune", str(tmp_path / "missing"), "-s", "1%", "-o", str(tmp_path / "o")])
    assert res.exit_code == 3 and "does not exist" in res.stderr
    res = runner.invoke(app, ["prune", str(tiny_finetune), "-s", "1%", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--base" in res.stderr
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "1%", "-o", str(existing)])
    assert res.exit_code == 6 and "--force" in res.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    res = runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "1%", "-o", str(existing), "--force"])
    assert res.exit_code == 0 and checkpoint.is_checkpoint(existing) and not (existing / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_prune_shape_change_becomes_extra(tiny_base, tmp_path):
    from tests.conftest import make_base

    other = make_base(tmp_path / "wide", vocab_size=130)  # resized embeddings
    diff = extract_diff(str(tiny_base), str(other))
    assert "embeddings.word_embeddings.weight" in diff.extras
    assert "embeddings.word_embeddings.weight" not in diff.tensors


def test_corrupt_checkpoint_is_a_format_error(tiny_base, tiny_finetune, tmp_path):
    out = tmp_path / "ck"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "1%", "-o", str(out)]).exit_code == 0
    data = (out / checkpoint.TENSOR_FILE).read_bytes()
    (out / checkpoint.TENSOR_FILE).write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["prune", str(out), "-s", "0.5%", "-o", str(tmp_path / "o2")])
    assert res.exit_code == 4 and "corrupt" in res.stderr
    (out / checkpoint.META_FILE).write_text("{not json")
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 4 and res.stderr.startswith("error:")


def test_checkpoint_with_another_digest_algorithm_is_unsupported(tiny_base, tiny_finetune, tmp_path):
    out = tmp_path / "ck"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "1%", "-o", str(out)]).exit_code == 0
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    meta["base"]["digest"] = "sha256"
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 4 and "'sha256'" in res.stderr


def test_prune_against_a_base_that_shares_no_tensor_is_a_wrong_base(tiny_base, tmp_path):
    """A diff of nothing (the whole model as extras) would verify on every base: refused, exit 5, nothing written."""
    from transformers import GPT2Config, GPT2Model

    other = tmp_path / "gpt2"
    GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(other)
    res = runner.invoke(app, ["prune", str(tiny_base), "--base", str(other), "-s", "1%", "-o", str(tmp_path / "o")])
    assert res.exit_code == 5 and res.stderr.startswith("error:") and "matches a tensor of base" in res.stderr
    assert "--base" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("edit", [
    lambda m: m.update(tensors="oops"),                                                # a string for the tensor map
    lambda m: m.update(tensors=[1, 2]),                                                # a list for it
    lambda m: next(iter(m["tensors"].values())).update(dtype="float99"),               # a dtype torch has not
    lambda m: m.update(config=[1, 2]),                                                 # pack wrote a file verify refused
    lambda m: m.update(config="x"),
    lambda m: m.update(meta="x"),                                                      # --plot left its PNG behind
    lambda m: m["extras"]["classifier.bias"].update(shape=[3, 3]),                     # apply built a model that
    lambda m: m["extras"]["classifier.bias"].update(dtype="float16"),                  # from_pretrained refused
], ids=["tensors-str", "tensors-list", "unknown-dtype", "config-list", "config-str", "meta-str", "extra-shape",
        "extra-dtype"])
def test_a_malformed_checkpoint_header_is_corrupt_for_every_reader(tiny_base, tiny_finetune, tmp_path, edit):
    """These reached exit 70 (AttributeError) or exit 2 (or exit 0 with a model `from_pretrained` refuses, or a file
    `verify` refuses): a checkpoint is the user's file, its damage is exit 4, and nothing is written."""
    out = tmp_path / "ck"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "1%", "-o", str(out)]).exit_code == 0
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    edit(meta)
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    written = [tmp_path / n for n in ("x.diff", "merged", "pruned", "sum", "heat.png")]
    for args in (["inspect", str(out)], ["pack", str(out), "-o", str(written[0])],
                 ["apply", str(tiny_base), str(out), "-o", str(written[1])],
                 ["prune", str(out), "-s", "1%", "-o", str(written[2])],
                 ["merge", str(out), str(out), "-o", str(written[3])],
                 ["inspect", str(out), "--plot", str(written[4])]):
        res = runner.invoke(app, args)
        assert res.exit_code == 4, (args, res.output)
        assert res.stderr.startswith("error:") and "Traceback" not in res.output
    assert not [p for p in written if p.exists()]


@pytest.mark.parametrize("hp,needle", [("x", "meta.hyperparameters is a str, not an object"),
                                       ({"values": "bogus"}, "hyperparameters.values 'bogus' is no value format")])
def test_a_corrupt_training_record_is_exit_4_for_pack_not_a_crash_or_a_flag_never_passed(tiny_base, tiny_finetune,
                                                                                          tmp_path, hp, needle):
    """hyperparameters "x" crashed pack (exit 70); values "bogus" blamed a --values the user never passed (exit 2)."""
    from diffcli import artifact

    out = tmp_path / "ck"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "1%", "-o", str(out)]).exit_code == 0
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    meta["meta"]["hyperparameters"] = hp
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    packed = tmp_path / "packed.diff"  # a packed file's meta is free-form: it verifies, and pack reads the record
    artifact.write(checkpoint.load(out), packed)
    for source in (out, packed):
        res = runner.invoke(app, ["pack", str(source), "-o", str(tmp_path / "again.diff")])
        assert res.exit_code == 4 and needle in res.stderr and "Traceback" not in res.output, res.output
    assert not (tmp_path / "again.diff").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_finetune_is_refused_not_pruned_to_nothing(tiny_base, tiny_finetune, tmp_path, bad):
    """One NaN made the top-k threshold NaN: prune kept 0 of k entries and exited 0 (Inf: pack failed later)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_finetune.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    name = next(n for n in weights if n.endswith("query.weight"))
    weights[name][0, 0] = bad
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for scope in ("global", "per-tensor"):
        res = runner.invoke(app, ["prune", str(broken), "-b", str(tiny_base), "-s", "5%", "--scope", scope,
                                  "-o", str(tmp_path / "o")])
        assert res.exit_code == 4 and "NaN or infinite" in res.stderr and "Traceback" not in res.output
        assert not (tmp_path / "o").exists()


def test_prune_re_projects_a_packed_diff_as_it_does_its_checkpoint(tiny_base, tiny_finetune, tmp_path):
    """A .diff was refused with a hint to pass --base (for a full finetune, which it is not)."""
    ck = tmp_path / "ck"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "5%", "-o", str(ck)]).exit_code == 0
    assert runner.invoke(app, ["pack", str(ck), "-o", str(tmp_path / "a.diff"), "--values", "fp32"]).exit_code == 0
    for src, out in ((ck, "from-ck"), (tmp_path / "a.diff", "from-diff")):
        res = runner.invoke(app, ["prune", str(src), "-s", "1%", "-o", str(tmp_path / out), "-q"])
        assert res.exit_code == 0, res.output
    a, b = checkpoint.load(tmp_path / "from-ck"), checkpoint.load(tmp_path / "from-diff")
    assert a.nnz == b.nnz == round(0.01 * a.budget_numel)
    assert all(torch.equal(a.tensors[n].values, b.tensors[n].values) for n in a.tensors)
    res = runner.invoke(app, ["prune", str(tmp_path / "a.diff"), "-b", str(tiny_base), "-s", "1%", "-o",
                              str(tmp_path / "x")])
    assert res.exit_code == 2 and "is a diff; --base is only for full finetuned models" in res.stderr


def test_the_allocation_title_gives_the_share_kept_and_the_share_asked(tiny_base, tmp_path):
    """A diff with fewer nonzeros than k keeps all of them: the title said the requested share as if kept."""
    from tests.conftest import make_finetune

    ft = make_finetune(tiny_base, tmp_path / "ft", scale=0.0)  # δ = 0 except the new head: nothing to keep
    res = runner.invoke(app, ["prune", str(ft), "-b", str(tiny_base), "-s", "5%", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.stdout.split())
    assert "(0.0000%; --sparsity 5.0000%, global)" in flat and "fewer than k" in flat
