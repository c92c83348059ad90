"""`diffprune apply` end to end: exit codes, one-line messages, nothing left behind on failure."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli import checkpoint
from diffcli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    root = tmp_path_factory.mktemp("cliapply")
    base = make_base(root / "base")
    ft = make_finetune(base, root / "ft")
    diff = project(extract_diff(str(base), str(ft)), 0.02).diff
    ckpt = checkpoint.save(diff, root / "diff_ckpt")
    nan = extract_diff(str(base), str(ft))
    nan.extras["classifier.bias"] = nan.extras["classifier.bias"].clone()
    nan.extras["classifier.bias"][0] = float("nan")
    from diffcli import artifact

    artifact.write(diff, root / "task.diff", values="fp32")
    artifact.write(diff, root / "task16.diff")
    return {"base": base, "ft": ft, "ckpt": ckpt, "nan": checkpoint.save(nan, root / "nan_ckpt"),
            "packed": root / "task.diff", "packed16": root / "task16.diff",
            "other": make_base(root / "other", seed=9), "misfit": make_base(root / "misfit", hidden_size=16)}


def _one_error_line(res, code: int, text: str) -> None:
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_apply_json_report_and_loadable_folder(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "model"
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["shards"] == 1 and report["fingerprint_ok"] is True and report["warnings"] == []
    assert report["tensors"] == len(checkpoint.load(setup["ckpt"]).tensors) + 2
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_packed_diff_gives_the_same_model(setup, tmp_path):
    """A .diff packed with fp32 values rebuilds the very bytes; fp16 values only round the δ."""
    import torch

    from diffcli.weights import WeightStore

    for name, src in (("ck", "ckpt"), ("p32", "packed"), ("p16", "packed16")):
        res = runner.invoke(app, ["apply", str(setup["base"]), str(setup[src]), "-o", str(tmp_path / name), "-q"])
        assert res.exit_code == 0, res.stderr
    ck, p32, p16 = (WeightStore(tmp_path / n) for n in ("ck", "p32", "p16"))
    assert set(ck.names()) == set(p32.names()) == set(p16.names())
    for n in ck.names():
        assert torch.equal(ck[n], p32[n]), n
        torch.testing.assert_close(ck[n], p16[n], rtol=0, atol=1e-4)


def test_apply_human_output_and_shards(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", str(tmp_path / "m"),
                              "--max-shard-size", "30KB"])
    assert res.exit_code == 0, res.stderr
    n = len(list((tmp_path / "m").glob("model-*.safetensors")))
    assert n > 1 and f"{n} shards" in res.stdout and "wrote" in res.stdout
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()


def test_quiet_prints_nothing(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", str(tmp_path / "m"), "-q"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""


def test_wrong_base_exit_5_and_nothing_written(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["other"]), str(setup["ckpt"]), "-o", str(tmp_path / "m")])
    _one_error_line(res, 5, "diff does not fit base:")
    assert "--force" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_force_wrong_base_warns_and_writes(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["other"]), str(setup["ckpt"]), "-o", str(tmp_path / "m"), "--force"])
    assert res.exit_code == 0, res.stderr
    assert "warning: applied anyway (--force)" in res.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_shape_misfit_exit_5_even_with_force(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["misfit"]), str(setup["ckpt"]), "-o", str(tmp_path / "m"), "-f"])
    _one_error_line(res, 5, "has shape [")
    assert "diff expects [" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_exit_6_untouched(setup, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "x").write_text("keep")
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", str(out)])
    _one_error_line(res, 6, "already exists")
    assert [p.name for p in out.iterdir()] == ["x"] and (out / "x").read_text() == "keep"


def test_missing_inputs_exit_3(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["base"]), str(tmp_path / "nope.diff"), "-o", str(tmp_path / "m")])
    _one_error_line(res, 3, "does not exist")
    res = runner.invoke(app, ["apply", str(tmp_path / "nobase"), str(setup["ckpt"]), "-o", str(tmp_path / "m")])
    _one_error_line(res, 3, "does not exist")
    assert not (tmp_path / "m").exists()


def test_bad_options_exit_2(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", str(tmp_path / "m"),
                              "--max-shard-size", "huge"])
    _one_error_line(res, 2, "size 'huge'")
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", str(tmp_path / "m"),
                              "--dtype", "int8"])
    _one_error_line(res, 2, "dtype 'int8'")
    assert not (tmp_path / "m").exists()


def test_a_float16_overflow_is_the_dtype_asked_not_a_corrupt_diff(setup, tmp_path):
    """Exit 4 said the diff was corrupt; it is fine in float32, and the hint says so."""
    from diffcli.extract import extract_diff

    big = extract_diff(str(setup["base"]), str(setup["ft"]))
    name = next(iter(big.tensors))
    big.tensors[name].values.mul_(0).add_(1e6)
    ckpt = checkpoint.save(big, tmp_path / "big")
    res = runner.invoke(app, ["apply", str(setup["base"]), str(ckpt), "-o", str(tmp_path / "m"), "--dtype", "float16"])
    _one_error_line(res, 2, f"{name!r} overflows float16")
    assert "--dtype float32" in res.stderr and not (tmp_path / "m").exists()
    res = runner.invoke(app, ["apply", str(setup["base"]), str(ckpt), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output


def test_a_base_that_is_no_folder_nor_hub_id_is_not_found_not_the_hub_down(setup, tmp_path, monkeypatch):
    """'my base' (a typo'd path) said "cannot download ... go online" (exit 9): no network fixes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref in ("my base", "org/na me"):
        res = runner.invoke(app, ["apply", ref, str(setup["ckpt"]), "-o", str(tmp_path / "m")])
        _one_error_line(res, 3, f"{ref!r} is no folder here and no valid hub model id")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("out", [".", ".."])
def test_an_output_of_dot_or_dot_dot_is_refused_before_the_work(setup, tmp_path, monkeypatch, out):
    """-o . --force did all the work, then crashed (exit 70) at the final rename."""
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["ckpt"]), "-o", out, "--force"])
    _one_error_line(res, 2, f"{out!r} names a folder you are in or above")
    assert list(work.iterdir()) == []


def test_nan_in_diff_exit_4(setup, tmp_path):
    res = runner.invoke(app, ["apply", str(setup["base"]), str(setup["nan"]), "-o", str(tmp_path / "m")])
    _one_error_line(res, 4, "classifier.bias")
    assert list(tmp_path.iterdir()) == []
