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


# ------------------------------------------------------------------------------------------ text from the file

def _rewritten(packed, tmp_path, mutate, name: str = "odd.diff"):
    """`packed` with its header changed by `mutate` (header digest fixed)."""
    from diff_bytes import build2, split2

    header, payload = split2(packed.read_bytes())
    mutate(header)
    header["records"].sort(key=lambda r: (r[1], r[0] == "basis"))
    path = tmp_path / name
    path.write_bytes(build2(header, payload))
    return path


def _rename_record(old: str, new: str):
    def mutate(h):
        next(r for r in h["records"] if r[1] == old)[1] = new
    return mutate


@pytest.mark.parametrize("mutate, shown", [
    (lambda h: h["meta"].update(task="rte [/bold] x"), "rte [/bold] x"),
    (lambda h: h["meta"].update(metrics={"acc[/x]": 1}), "acc[/x]"),
    (lambda h: h["config"].update(model_type="[/x]"), "model_type=[/x]"),
    (lambda h: h["config"].update(id2label=5), "id2label=5"),
    (lambda h: h["config"].update(id2label="[/x]", num_labels="[/n]"), "num_labels=[/n]"),
    (lambda h: h["config"].pop("num_labels", None) or h["config"].update(id2label=[1, 2, 3]), "num_labels=3"),
    (lambda h: h["base"].update(ref="[/red]"), "base: [/red]"),
    (lambda h: h.update(producer="me [/p]"), "by me [/p]"),
    (lambda h: h["meta"].update(units=[1, "x", None]), "units: 0 of 0 chosen"),
    (lambda h: h["meta"].update(units=[{"chosen": True, "cost": "lots", "probability": "high"}]), "lots"),
    (lambda h: h["meta"].update(units=[{"chosen": True, "cost": 10**30, "probability": [1], "tensor": "w[/t]",
                                        "kind": "[/k]"}]), "w[/t]"),
    (_rename_record("classifier.weight", "classifier.weight[/]"), "classifier.weight[/]"),
])
def test_text_from_the_file_is_printed_as_it_is(packed, tmp_path, mutate, shown):
    """Rich read the file's strings as markup (exit 70 half-way); wrong types in config or units crashed."""
    path = _rewritten(packed, tmp_path, mutate)
    for args in (["inspect", str(path), "--tensors"], ["inspect", str(path), "--json"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and res.stderr == "", (args, res.output)
    assert shown in runner.invoke(app, ["inspect", str(path), "--tensors"]).stdout


def test_a_progress_status_with_brackets_is_shown_as_it_is():
    """apply's bar showed each tensor name as markup: '[/x]' raised after the model was written (exit 70)."""
    import io

    from rich.console import Console

    from diffcli.cli.output import Output

    out = Output()
    out.err = Console(file=io.StringIO(), force_terminal=True, width=200)
    assert out.show_bars
    with out.progress("apply [/d]", total=None) as bar:
        bar.advance(1, "classifier.weight[/x]")
        bar.advance(1, "[bold]w")
    text = out.err.file.getvalue()
    assert "classifier.weight[/x]" in text or "[bold]w" in text


def test_apply_on_a_terminal_with_a_bracketed_tensor_name(packed, tiny_base, tmp_path, monkeypatch):
    from diffcli.cli.output import Output

    monkeypatch.setattr(Output, "show_bars", property(lambda self: True))
    path = _rewritten(packed, tmp_path, _rename_record("classifier.weight", "classifier.weight[/x]"))
    res = runner.invoke(app, ["apply", str(tiny_base), str(path), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and (tmp_path / "out" / "config.json").exists()


def test_merge_prints_bracketed_names_as_they_are(packed, tmp_path):
    a = tmp_path / "a[bold]z.diff"
    shutil.copy(packed, a)
    b = _rewritten(packed, tmp_path, _rename_record("classifier.bias", "classifier.bias[/y]"), "b.diff")
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "m.diff")])
    assert res.exit_code == 0, res.output
    assert "a[bold]z.diff" in res.stdout and "classifier.bias[/y]" in res.stdout
