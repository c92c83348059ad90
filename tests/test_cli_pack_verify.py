"""`diffprune pack` and `diffprune verify` end to end: outputs, exit codes, one-line errors, no leftovers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli import artifact, checkpoint
from diffcli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    root = tmp_path_factory.mktemp("clipack")
    base = make_base(root / "base")
    ft = make_finetune(base, root / "ft")
    diff = project(extract_diff(str(base), str(ft)), 0.05).diff
    huge = project(extract_diff(str(base), str(ft)), 0.05).diff
    name = next(n for n, t in huge.tensors.items() if t.nnz)
    huge.tensors[name].values = huge.tensors[name].values.clone()
    huge.tensors[name].values[0] = 1e6  # beyond fp16
    nanhead = project(extract_diff(str(base), str(ft)), 0.05).diff
    nanhead.extras["classifier.bias"] = torch.tensor([0.5, float("nan")])  # a diverged head
    bad = root / "bad_ckpt"
    bad.mkdir()
    (bad / checkpoint.META_FILE).write_text("{not json")
    return {"base": base, "diff": diff, "ckpt": checkpoint.save(diff, root / "ckpt"),
            "huge": checkpoint.save(huge, root / "huge_ckpt"), "bad": bad,
            "nanhead": checkpoint.save(nanhead, root / "nanhead_ckpt"), "other": make_base(root / "other", seed=4)}


def _one_error_line(res, code: int, text: str) -> None:
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_pack_human_output_and_file(setup, tmp_path):
    out = tmp_path / "d.diff"
    res = runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    assert "wrote" in res.stdout and "smaller than the dense fp32 diff" in res.stdout
    assert "max abs cast error" in res.stdout and "values fp16" in res.stdout
    back = artifact.load(out)
    assert back.nnz == setup["diff"].nnz and back.base_fingerprint == setup["diff"].base_fingerprint
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_pack_json_and_fp32_is_exact(setup, tmp_path):
    out = tmp_path / "d.diff"
    res = runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(out), "--values", "fp32", "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["bytes"] == out.stat().st_size and report["max_abs_error"] == 0 and report["values"] == "fp32"
    assert report["ratio"] == pytest.approx(report["dense_fp32_bytes"] / report["bytes"])
    back = artifact.load(out)
    for name, td in setup["diff"].tensors.items():
        assert torch.equal(back.tensors[name].dense(), td.dense())


def test_pack_to_stdout_keeps_stdout_binary(setup):
    res = runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", "-"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout_bytes[:8] == b"DIFFPRUN"
    assert artifact.loads(res.stdout_bytes).nnz == setup["diff"].nnz
    assert "wrote stdout" in res.stderr
    _one_error_line(runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", "-", "--json"]), 2, "--json")


def test_repacking_a_packed_file(setup, tmp_path):
    a, b = tmp_path / "a.diff", tmp_path / "b.diff"
    assert runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(a), "--values", "fp32", "-q"]).exit_code == 0
    res = runner.invoke(app, ["pack", str(a), "-o", str(b), "--values", "fp32", "-q"])
    assert res.exit_code == 0 and res.stdout == "", res.stderr
    assert a.read_bytes() == b.read_bytes()


def test_pack_refuses_existing_output_unless_forced(setup, tmp_path):
    out = tmp_path / "d.diff"
    out.write_bytes(b"keep me")
    _one_error_line(runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(out)]), 6, "already exists")
    assert out.read_bytes() == b"keep me"
    assert runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(out), "--force", "-q"]).exit_code == 0
    assert out.read_bytes()[:8] == b"DIFFPRUN"


def test_pack_to_a_folder_is_refused_before_the_checkpoint_is_read(setup, tmp_path, monkeypatch):
    from diffcli import packing

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep").write_text("x")
    monkeypatch.setattr(packing, "load_diff", lambda *a, **k: pytest.fail("the checkpoint was read first"))
    _one_error_line(runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(folder), "--force"]), 6, "is a folder")
    assert [p.name for p in folder.iterdir()] == ["keep"]


@pytest.mark.parametrize("case, code, text", [
    ("missing", 3, "does not exist"),
    ("bad", 4, "not valid JSON"),
    ("huge", 2, "fp16 range"),
    ("nanhead", 2, "extra 'classifier.bias' holds NaN or infinite values"),  # as a NaN δ; it was packed
    ("values", 2, "fp8"),
    ("nofolder", 3, "does not exist"),  # not found, as the README documents (it was 2)
    ("model", 4, "is a folder but not a diff checkpoint"),  # as inspect and verify say of it: exit 4, not 2
])
def test_pack_failures_leave_nothing_behind(setup, tmp_path, case, code, text):
    src = {"missing": str(tmp_path / "nope"), "bad": str(setup["bad"]), "huge": str(setup["huge"]),
           "nanhead": str(setup["nanhead"]), "model": str(setup["base"])}.get(case, str(setup["ckpt"]))
    out = tmp_path / ("sub/d.diff" if case == "nofolder" else "d.diff")
    args = ["pack", src, "-o", str(out)] + (["--values", "fp8"] if case == "values" else [])
    _one_error_line(runner.invoke(app, args), code, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verify_ok_with_and_without_base(setup, tmp_path):
    out = tmp_path / "d.diff"
    artifact.write(setup["diff"], out)
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.stderr
    assert "OK" in res.stdout and "section checksums" in res.stdout and "base not checked" in res.stdout
    res = runner.invoke(app, ["verify", str(out), "--base", str(setup["base"]), "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["base_tensors_checked"] == len(setup["diff"].tensors) and report["nnz"] == setup["diff"].nnz
    assert any("fingerprint" in c for c in report["checks"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.diff"]  # verify writes nothing


def test_verify_failures(setup, tmp_path):
    out = tmp_path / "d.diff"
    artifact.write(setup["diff"], out)
    _one_error_line(runner.invoke(app, ["verify", str(out), "--base", str(setup["other"])]), 5, "differ")
    _one_error_line(runner.invoke(app, ["verify", str(tmp_path / "nope.diff")]), 3, "does not exist")
    _one_error_line(runner.invoke(app, ["verify", str(tmp_path)]), 4, "folder")
    _one_error_line(runner.invoke(app, ["verify", str(out), "--base", str(tmp_path / "nobase")]), 3, "nobase")
    data = bytearray(out.read_bytes())
    data[-3] ^= 0x10
    corrupt = tmp_path / "c.diff"
    corrupt.write_bytes(bytes(data))
    _one_error_line(runner.invoke(app, ["verify", str(corrupt)]), 4, "checksum mismatch")
    corrupt.write_bytes(out.read_bytes()[:100])
    _one_error_line(runner.invoke(app, ["verify", str(corrupt)]), 4, "truncated")
    corrupt.write_bytes(out.read_bytes()[:8] + b"\x09\x00" + out.read_bytes()[10:])
    _one_error_line(runner.invoke(app, ["verify", str(corrupt)]), 4, "version 9")


@pytest.mark.parametrize("values", ["fp16", "int8", "int4", "ternary"])
def test_pack_values_and_inspect_bytes_split(setup, tmp_path, values):
    out = tmp_path / "d.diff"
    res = runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(out), "--values", values, "--json"])
    assert res.exit_code == 0, res.stderr
    packed = json.loads(res.stdout)
    assert packed["values"] == values and packed["version"] == 2 and packed["max_rel_error"] >= 0
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    split = report["bytes"]
    assert set(split) == {"header", "positions", "values", "dense"}
    assert sum(split.values()) == out.stat().st_size == report["size_bytes"]
    assert split["header"] == packed["header_bytes"] and split["positions"] == packed["index_bytes"]
    assert split["values"] == packed["values_bytes"] and split["dense"] == packed["extras_bytes"]
    diff = setup["diff"]
    assert report["totals"]["params"] == diff.nnz and report["totals"]["extras_numel"] == diff.extras_numel
    q = report["quantizer"]
    assert q["quantizer"] == values and q["max_abs_error"] == packed["max_abs_error"]
    assert (q["block"] is None) == (values == "fp16")
    back = artifact.load(out)
    for name, td in diff.tensors.items():  # dequantized to float32, within the recorded error
        assert back.tensors[name].values.dtype == torch.float32
        assert torch.allclose(back.tensors[name].dense(), td.dense(), rtol=0, atol=q["max_abs_error"] * (1 + 1e-6))
    human = runner.invoke(app, ["inspect", str(out)])
    assert human.exit_code == 0 and f"values: {values}" in human.stdout and "max rel error" in human.stdout
    assert "bytes: header" in human.stdout


def test_inspect_a_version_1_file(setup, tmp_path):
    out = tmp_path / "v1.diff"
    res = runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(out), "--format-version", "1", "-q"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert report["format_version"] == 1 and sum(report["bytes"].values()) == out.stat().st_size
    assert report["totals"]["params"] == setup["diff"].nnz and report["quantizer"]["max_rel_error"] is None
    _one_error_line(runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(tmp_path / "x.diff"),
                                        "--format-version", "1", "--values", "int8"]), 2, "version 1")
    _one_error_line(runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(tmp_path / "x.diff"),
                                        "--values", "fp16", "--block", "8"]), 2, "--block")
    _one_error_line(runner.invoke(app, ["pack", str(setup["ckpt"]), "-o", str(tmp_path / "x.diff"),
                                        "--values", "int8", "--block", "0"]), 2, "--block")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.diff"]
