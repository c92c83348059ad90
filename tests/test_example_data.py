"""Where `--task rte` data comes from: an explicit folder (never a fallback), the hub, else the bundled example set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcli import checkpoint, data_sources, example_data, tasks
from diffcli.cli.app import app
from diffcli.errors import HubUnavailableError, NotFoundError
from diffcli.data_sources import load_task

REPO = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--sparsity", "2%",
        "--max-train-samples", "16", "--max-eval-samples", "16"]


@pytest.fixture
def offline(monkeypatch):
    """No GLUE_DIR, and the hub fails as it does without network."""
    import datasets

    def unreachable(*_a, **_k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)


def test_the_example_set_is_balanced_disjoint_and_licensed():
    data = load_task("rte", data_dir=example_data.ROOT)
    assert len(data.train) == 300 and len(data.eval["validation"]) == 100
    for split in (data.train, data.eval["validation"]):
        assert set(Counter(e.label for e in split).values()) == {len(split) // 2}
        assert len(set(e.texts for e in split)) == len(split)
    assert not {e.texts[0] for e in data.train} & {e.texts[0] for e in data.eval["validation"]}
    readme = (example_data.ROOT / "README.md").read_text()
    assert "CC0-1.0" in readme and example_data.LICENCE == "CC0-1.0"


def test_the_example_set_is_package_data():
    """pyproject ships the files, so a non-editable install has them too."""
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffcli"]
    package = REPO / "diffcli"
    shipped = {p for g in globs for p in package.glob(g)}
    assert {p for p in example_data.ROOT.rglob("*") if p.is_file()} <= shipped


def test_offline_without_a_data_dir_falls_back_to_the_example_set_and_names_it(offline):
    data = load_task("rte", max_train_samples=10)
    assert data.source["kind"] == "example" and data.source["licence"] == "CC0-1.0"
    assert "not GLUE" in data.source["name"] and "Couldn't reach" in data.source["why"]
    assert len(data.train) == 10 and len(data.eval["validation"]) == 100


def test_offline_tasks_without_an_example_still_say_the_hub_is_unreachable(offline):
    with pytest.raises(HubUnavailableError, match="cannot load GLUE task cola"):
        load_task("cola")


@pytest.mark.parametrize("how", ["--data-dir", "GLUE_DIR"])
def test_an_explicit_missing_folder_never_falls_back(offline, monkeypatch, tmp_path, how):
    missing = tmp_path / "no-glue"
    if how == "GLUE_DIR":
        monkeypatch.setenv("GLUE_DIR", str(missing))
    with pytest.raises(NotFoundError, match=f"GLUE data folder not found: {missing} \\(from {how}\\)"):
        load_task("rte", data_dir=missing if how == "--data-dir" else None)


def test_a_glue_folder_and_files_name_their_source(tmp_path):
    data = load_task("rte", data_dir=example_data.ROOT)
    assert data.source == {"kind": "glue-dir", "path": str(example_data.ROOT),
                           "name": f"GLUE folder {example_data.ROOT}"}
    dev = example_data.ROOT / "RTE" / "dev.tsv"
    data = load_task("rte", validation_file=dev, need_train=False)
    assert data.source["kind"] == "files" and str(dev) in data.source["name"]


def test_the_hub_is_named_when_it_answers(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    fake = tasks.TaskData(tasks.task_spec("rte"), [], {"validation": []})
    monkeypatch.setattr(data_sources, "_load_from_hub", lambda *a, **k: fake)
    assert load_task("rte").source["kind"] == "hub"


def test_train_offline_uses_the_example_set_and_says_so(offline, tmp_path, tiny_base):
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(app, ["train", "--task", "rte", "--model", str(tiny_base), *FAST, "-o", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["data"]["kind"] == "example" and summary["data"]["path"] == str(example_data.ROOT)
    assert "warning: training on the example set bundled with diffprune" in result.stderr
    assert checkpoint.load(out).meta["data"]["source"]["kind"] == "example"


def test_train_with_a_missing_data_dir_exits_3_and_writes_nothing(offline, tmp_path, tiny_base):
    result = CliRunner().invoke(app, ["train", "--task", "rte", "--data-dir", str(tmp_path / "nope"),
                                      "--model", str(tiny_base), *FAST, "-o", str(tmp_path / "ckpt")])
    assert result.exit_code == 3
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: GLUE data folder not found"), result.stderr
    assert not (tmp_path / "ckpt").exists()


def test_really_offline_process_uses_the_example_set(tmp_path):
    """A fresh process with the hub switched off and an empty cache: what a new user's offline machine does."""
    env = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = "from diffcli.data_sources import load_task; print(load_task('rte', need_train=False).source['kind'])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "example"
