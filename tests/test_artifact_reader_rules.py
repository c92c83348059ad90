"""Rules every reader keeps: numbers beyond a double, reserved and repeated names, and paths that are not regular
files are refused with one line, exit 4, nothing written."""

from __future__ import annotations

import json

import pytest

from diffcli import artifact
from diffcli.errors import FormatError
from diff_bytes import build, build2, split, split2, with_golden_bases
from test_artifact import golden_diff

VALID = artifact.pack(golden_diff(), version=1)
V2 = artifact.pack(golden_diff(), "int4")  # a block quantizer: the scales stream is in use


# ------------------------------------------------------------------------------------------ numbers beyond a double

BIG = 10**400  # a JSON integer no double holds
LONG_FLOAT = "0." + "0" * 4998 + "1"  # a float literal of 5000 digits


def _cli_exit(args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from diffcli.cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stderr


@pytest.mark.parametrize("mutate", [
    lambda h: h["values"].update(max_abs_error=BIG),
    lambda h: h["values"].update(max_rel_error=-BIG),
    lambda h: h["meta"].update(x=BIG),
    lambda h: h["config"].update(x=[BIG]),
    lambda h: h.update(nnz=BIG),
])
def test_v2_integers_beyond_a_double_are_a_format_error(mutate, tmp_path, tiny_base):
    header, payload = split2(V2)
    mutate(header)
    data = build2(header, payload)
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(data)
    path = tmp_path / "big.diff"
    path.write_bytes(data)
    for args in (["verify", path], ["inspect", path], ["apply", tiny_base, path, "-o", tmp_path / "out"]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "JSON" in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_v2_a_basis_probe_beyond_a_double_is_a_format_error():
    header, payload = split2(artifact.pack(with_golden_bases(golden_diff())))
    rec = next(r for r in header["records"] if r[0] == "basis")
    rec[5][0] = BIG
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(build2(header, payload))
    rec[5][0] = 2**64  # an integer a double holds but int64 does not: a finite probe number, read as a float
    assert artifact.loads(build2(header, payload)).bases[rec[1]].probe[0] == float(2**64)


def test_float_literals_of_over_4300_digits_are_a_format_error():
    header, payload = split2(V2)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    for literal in (LONG_FLOAT, "1." + "0" * 4300, "1" + "0" * 4301 + "e-4300"):
        with pytest.raises(FormatError, match="JSON"):
            artifact.loads(build2({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{literal},'.encode())))
    ok = "1." + "0" * 4298  # 4299 digits: within the limit
    assert artifact.loads(build2({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{ok},'.encode()))
                          ).meta["x"] == 1.0
    assert artifact.loads(build2({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{2**1023},'.encode()))
                          ).meta["x"] == 2**1023


def test_v1_numbers_beyond_a_double_are_a_format_error():
    header, payload = split(VALID)
    header["max_abs_error"] = BIG
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(build(header, payload))
    header, payload = split(VALID)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    for lit in (str(BIG), LONG_FLOAT, str(-2**1024)):
        with pytest.raises(FormatError, match="JSON"):
            artifact.loads(build({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{lit},'.encode())))


# ------------------------------------------------------------------------------------------ reserved and repeated names

def _renamed2(data: bytes, old: str, new: str) -> bytes:
    header, payload = split2(data)
    for r in header["records"]:
        if r[1] == old:
            r[1] = new
    header["records"].sort(key=lambda r: (r[1], r[0] == "basis"))
    return build2(header, payload)


@pytest.mark.parametrize("old", ["classifier.bias", "bert.encoder.w", "bert.empty"])
def test_v2_a_record_named_like_the_safetensors_metadata_key_is_refused(old, tmp_path, tiny_base):
    """apply wrote such a tensor over the safetensors header's `__metadata__` entry: a broken file, exit 0."""
    data = _renamed2(artifact.pack(golden_diff()), old, "__metadata__")
    with pytest.raises(FormatError, match="__metadata__"):
        artifact.loads(data)
    path = tmp_path / "meta.diff"
    path.write_bytes(data)
    for args in (["verify", path], ["inspect", path], ["apply", tiny_base, path, "-o", tmp_path / "out"]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "__metadata__" in err, (args, err)
    assert not (tmp_path / "out").exists()
    header, payload = split2(artifact.pack(golden_diff()))
    next(r for r in header["records"] if r[1] == old or r[0] == "sparse")[2] = "__metadata__"  # as a base name
    with pytest.raises(FormatError, match="__metadata__"):
        artifact.loads(build2(header, payload))


def test_v1_a_tensor_or_extra_named_like_the_safetensors_metadata_key_is_refused():
    for kind, old in (("extras", "classifier.bias"), ("tensors", "bert.encoder.w")):
        header, payload = split(VALID)
        header[kind]["__metadata__"] = header[kind].pop(old)  # refused before any section is placed or read
        with pytest.raises(FormatError, match="__metadata__"):
            artifact.loads(build(header, payload))
    header, payload = split(VALID)
    header["tensors"]["bert.encoder.w"]["base"] = "__metadata__"
    with pytest.raises(FormatError, match="__metadata__"):
        artifact.loads(build(header, payload))


def test_a_writer_refuses_the_safetensors_metadata_key_as_a_name():
    from diffcli.errors import InvalidValueError

    diff = golden_diff()
    diff.extras["__metadata__"] = diff.extras.pop("classifier.bias")
    for version in (1, 2):
        with pytest.raises(InvalidValueError, match="__metadata__"):
            artifact.pack(diff, version=version)
    diff = golden_diff()
    diff.tensors["__metadata__"] = diff.tensors.pop("bert.encoder.w")
    with pytest.raises(InvalidValueError, match="__metadata__"):
        artifact.pack(diff)


def _one_base_twice(header: dict, a: str, b: str) -> None:
    """Record b names record a's base tensor (and copies its digest): two records, one base tensor."""
    ra = next(r for r in header["records"] if r[0] != "dense" and r[1] == a)
    rb = next(r for r in header["records"] if r[0] != "dense" and r[1] == b)
    rb[2], rb[5] = ra[2] if ra[2] is not None else ra[1], ra[5]


def test_v2_two_records_on_one_base_tensor_are_refused():
    header, payload = split2(V2)
    _one_base_twice(header, "bert.encoder.w", "bert.empty")
    with pytest.raises(FormatError, match="'encoder.w'.*two records|two records.*'encoder.w'"):
        artifact.loads(build2(header, payload))


def test_v1_two_tensors_on_one_base_tensor_are_refused():
    header, payload = split(VALID)
    header["tensors"]["bert.empty"]["base"] = header["tensors"]["bert.encoder.w"]["base"]
    with pytest.raises(FormatError, match="'encoder.w'"):
        artifact.loads(build(header, payload))


def test_a_writer_refuses_two_tensors_on_one_base_tensor():
    from diffcli.errors import InvalidValueError

    diff = golden_diff()
    td = diff.tensors["bert.empty"]
    diff.tensors["bert.empty"] = type(td).zeros("encoder.w", td.shape, td.dtype, td.digest)
    for version in (1, 2):
        with pytest.raises(InvalidValueError, match="'encoder.w'"):
            artifact.pack(diff, version=version)


def test_verify_base_and_apply_agree_on_a_file_with_one_base_tensor_twice(tmp_path, tiny_base, tiny_finetune):
    """verify --base counted the shared base tensor's digest twice (exit 5) while apply counted it once (exit 0)."""
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    diff = project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff
    header, payload = split2(artifact.pack(diff))
    q, k = (next(n for n in diff.tensors if n.endswith(f"layer.0.attention.self.{m}.weight")) for m in ("query", "key"))
    _one_base_twice(header, q, k)
    path = tmp_path / "twice.diff"
    path.write_bytes(build2(header, payload))
    for args in (["verify", path, "--base", tiny_base], ["apply", tiny_base, path, "-o", tmp_path / "out"],
                 ["apply", tiny_base, path, "-o", tmp_path / "out", "--force"]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "two records" in err, (args, err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ not a regular file

@pytest.fixture
def fifo(tmp_path):
    """A named pipe that would give a valid file's bytes to whoever reads it (as `<(cat x.diff)` does)."""
    import os
    import threading

    path = tmp_path / "pipe.diff"
    os.mkfifo(path)

    def feed():
        try:
            with open(path, "wb") as fh:  # blocks until a reader opens the pipe
                fh.write(V2)
        except OSError:
            pass

    threading.Thread(target=feed, daemon=True).start()
    yield path
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # release the feeder if nobody read the pipe
    try:
        while os.read(fd, 1 << 16):
            pass
    except BlockingIOError:
        pass
    os.close(fd)


@pytest.mark.parametrize("special", ["fifo", "/dev/null", "/dev/zero"])
def test_a_path_that_is_not_a_regular_file_is_refused_by_every_reader(special, request, tmp_path, tiny_base):
    """verify read /dev/zero until memory ran out; a pipe verified (exit 0) where inspect found it 'too short'."""
    from pathlib import Path

    path = request.getfixturevalue("fifo") if special == "fifo" else Path(special)
    if not path.exists():
        pytest.skip(f"{path} does not exist here")
    for call in (artifact.load, artifact.read_header, artifact.verify):
        with pytest.raises(FormatError, match="not a regular file"):
            call(path)
    out = tmp_path / "out"
    for args in (["verify", path], ["inspect", path], ["apply", tiny_base, path, "-o", out],
                 ["eval", tiny_base, path, "--task", "sst2"], ["merge", path, path, "-o", out],
                 ["prune", path, "-s", "1%", "-o", out], ["pack", path, "-o", out]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "not a regular file" in err, (args, err)
    assert not out.exists()
