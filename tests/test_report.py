"""`inspect`'s report: layer groups, and user text printed as it is (no Rich markup), whole names when piped."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from diffcli.cli.app import app
from diffcli.report import layer_of

runner = CliRunner()


@pytest.mark.parametrize("name, group", [
    ("bert.encoder.layer.3.attention.self.query.weight", "layer 03"),
    ("model.encoder.layers.0.fc1.weight", "layer 00"),
    ("model.decoder.layers.0.fc1.weight", "decoder layer 00"),       # BART's two stacks stay apart
    ("decoder.block.1.layer.2.DenseReluDense.wo.weight", "decoder layer 01"),
    ("classification_head.out_proj.weight", "classification_head"),  # one group, not 'dense' and 'out_proj'
    ("classification_head.dense.bias", "classification_head"),
    ("bert.embeddings.word_embeddings.weight", "embeddings"),
])
def test_layer_groups(name, group):
    assert layer_of(name) == group


@pytest.fixture
def packed(tiny_base, tiny_finetune, tmp_path):
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "5%", "-o",
                               str(tmp_path / "ck"), "-q"]).exit_code == 0
    assert runner.invoke(app, ["pack", str(tmp_path / "ck"), "-o", str(tmp_path / "a.diff"), "-q"]).exit_code == 0
    return tmp_path / "a.diff"


@pytest.mark.parametrize("name", ["rte[seed1].diff", "runs[/v1].diff", "[bold]x.diff"])
def test_a_path_with_brackets_is_printed_as_it_is(packed, name):
    """Rich read '[seed1]' as a style (it vanished) and '[/v1]' as a closing tag (exit 70)."""
    odd = packed.parent / name
    odd.parent.mkdir(exist_ok=True)
    shutil.copy(packed, odd)
    res = runner.invoke(app, ["inspect", str(odd)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith(str(odd))


def test_a_piped_per_tensor_table_keeps_whole_tensor_names(packed):
    """Off a terminal Rich takes 80 columns: names were cut with '…' and rows could not be told apart."""
    import json

    res = runner.invoke(app, ["inspect", str(packed), "-t"])
    assert res.exit_code == 0 and "…" not in res.stdout
    names: list[str] = []
    for line in res.stdout.splitlines():  # a folded name continues in the next line's first cell
        cells = line.split("│")
        if len(cells) > 3 and cells[1].strip() not in ("", "tensor"):
            if cells[2].strip():
                names.append(cells[1].strip())
            elif names:
                names[-1] += cells[1].strip()
    tensors = [r["tensor"] for r in json.loads(runner.invoke(app, ["inspect", str(packed), "--json"]).stdout)["tensors"]]
    assert set(tensors) <= set(names)
