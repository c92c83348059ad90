"""docs/JSON.md against what every command prints with --json: each always-present key is there, none is undocumented,
and `output` names what the command wrote."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli.cli.app import app
from tests.training_data import write_task

DOC = Path(__file__).resolve().parents[1] / "docs" / "JSON.md"
runner = CliRunner()


@functools.cache
def documented() -> dict[str, tuple[set[str], set[str]]]:
    """Per command: (keys present always, every documented key), from the doc's tables."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    command = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## `diffprune (\w+)`", line)
        if heading:
            command = heading.group(1)
            out[command] = (set(), set())
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if command and len(cells) >= 3:
            keys = set(re.findall(r"`(\w+)`", cells[0]))
            out[command][1].update(keys)
            if cells[1] == "always":
                out[command][0].update(keys)
    return out


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict[str, dict]:
    """Every command's --json document, run in order on a tiny model (keyed by a label)."""
    root = tmp_path_factory.mktemp("json")
    base = make_base(root / "base")
    ft = make_finetune(base, root / "ft")
    train, dev = write_task(root / "data")
    runs = {
        "train": ["train", "--train-file", train, "--validation-file", dev, "--model", base, "--sparsity", "2%",
                  "--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "-o", root / "trained"],
        "prune": ["prune", ft, "--base", base, "--sparsity", "5%", "-o", root / "ck"],
        "pack": ["pack", root / "ck", "-o", root / "a.diff"],
        "inspect": ["inspect", root / "a.diff"],
        "inspect-checkpoint": ["inspect", root / "ck"],
        "verify": ["verify", root / "a.diff", "--base", base],
        "apply": ["apply", base, root / "a.diff", "-o", root / "merged"],
        "merge": ["merge", root / "a.diff", root / "a.diff", "-o", root / "m.diff"],
        "pack-trained": ["pack", root / "trained", "-o", root / "t.diff"],
        "eval": ["eval", base, root / "t.diff", "--validation-file", dev],
    }
    docs = {}
    for label, args in runs.items():
        res = runner.invoke(app, [str(a) for a in args] + ["--json"])
        assert res.exit_code == 0, (label, res.output)
        docs[label] = json.loads(res.stdout)
    docs["paths"] = {"trained": str(root / "trained"), "ck": str(root / "ck"), "a.diff": str(root / "a.diff"),
                     "merged": str(root / "merged"), "m.diff": str(root / "m.diff")}
    return docs


@pytest.mark.parametrize("label", ["train", "prune", "pack", "inspect", "inspect-checkpoint", "verify", "apply",
                                   "merge", "eval"])
def test_every_key_is_documented_and_every_always_key_is_printed(printed, label):
    always, every = documented()[label.split("-")[0]]
    keys = set(printed[label])
    assert always - keys == set(), f"{label}: documented as always present but missing"
    assert keys - every == set(), f"{label}: printed but not in docs/JSON.md"


def test_the_doc_covers_every_report_command():
    assert set(documented()) == {"train", "prune", "pack", "apply", "inspect", "verify", "eval", "merge"}
    for command, (always, every) in documented().items():
        assert always and always <= every, command


def test_output_names_what_each_command_wrote_and_older_names_agree(printed):
    p = printed["paths"]
    assert printed["train"]["output"] == p["trained"]
    assert printed["prune"]["output"] == p["ck"] and Path(p["ck"]).is_dir()
    assert printed["pack"]["output"] == printed["pack"]["path"] == p["a.diff"]
    assert printed["apply"]["output"] == printed["apply"]["out"] == p["merged"]
    assert printed["merge"]["output"] == p["m.diff"]
    assert printed["inspect"]["path"] == p["a.diff"] and printed["inspect-checkpoint"]["path"] == p["ck"]


def test_prune_rows_name_the_tensor_as_inspect_does(printed):
    rows = printed["prune"]["tensors"]
    assert rows and all(r["tensor"] == r["name"] for r in rows)
    kept = {r["tensor"] for r in rows if r["kept"]}
    assert kept <= {r["tensor"] for r in printed["inspect-checkpoint"]["tensors"]}
