"""`inspect --plot`: heatmaps of where diffs spend their budget, the files they write, and bad inputs."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli import artifact
from diffcli.cli.app import app
from diffcli.plot import cells, figure
from diffcli.report import inspect

runner = CliRunner()


@pytest.fixture(scope="module")
def diffs(tmp_path_factory):
    """Two packed diffs of one tiny random BERT finetune, at 2% and 10%."""
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    root = tmp_path_factory.mktemp("plot")
    base = make_base(root / "base")
    ft = make_finetune(base, root / "ft")
    full = extract_diff(str(base), str(ft))
    paths = []
    for name, s in (("a.diff", 0.02), ("b.diff", 0.10)):
        artifact.write(project(full, s).diff, root / name)
        paths.append(root / name)
    return paths


def _panels(fig) -> list:
    return [ax for ax in fig.axes if (ax.get_gid() or "").startswith("panel-")]


def _fails(res, code: int, text: str) -> None:
    assert res.exit_code == code, (res.stdout, res.stderr)
    assert res.stdout == "" and res.stderr.startswith("error:") and res.stderr.count("\n") == 1
    assert text in res.stderr and "Traceback" not in res.stderr


def test_png_for_two_diffs(diffs, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "where.png"
    res = runner.invoke(app, ["inspect", *map(str, diffs), "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stderr and res.stdout.count("per layer") == 2
    fig = figure([inspect(p) for p in diffs])
    assert len(_panels(fig)) == 2
    w, h = fig.get_size_inches() * fig.dpi
    pixels = imread(out)
    assert pixels.shape[:2] == (round(h), round(w))
    assert pixels.std() > 0.05  # not a blank canvas
    one = figure([inspect(diffs[0])])
    assert len(_panels(one)) == 1 and one.get_size_inches()[0] < fig.get_size_inches()[0]
    assert [p.name for p in tmp_path.iterdir()] == ["where.png"]  # no temporary file left behind


def test_svg_has_one_group_per_panel_and_is_reproducible(diffs, tmp_path):
    out, again = tmp_path / "where.svg", tmp_path / "again.svg"
    for target in (out, again):
        res = runner.invoke(app, ["inspect", *map(str, diffs), "--plot", str(target), "--plot-by", "bytes", "-q"])
        assert res.exit_code == 0, res.output
        assert res.stdout == ""
    root = ET.parse(out).getroot()
    ids = {el.get("id") for el in root.iter()}
    assert {"panel-1", "panel-2"} <= ids and "panel-3" not in ids
    assert float(root.get("width").removesuffix("pt")) > float(root.get("height").removesuffix("pt")) / 4
    assert out.read_bytes() == again.read_bytes()


def test_json_with_several_inputs_is_one_list(diffs, tmp_path):
    res = runner.invoke(app, ["inspect", *map(str, diffs), "--json", "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert isinstance(data, list) and [d["path"] for d in data] == list(map(str, diffs))
    assert data[0]["totals"]["nnz"] < data[1]["totals"]["nnz"]
    single = json.loads(runner.invoke(app, ["inspect", str(diffs[0]), "--json"]).stdout)
    assert isinstance(single, dict) and single["totals"] == data[0]["totals"]


def test_cells_sum_every_record_kind_by_role():
    """Density is Σnnz/Σnumel of whatever records a cell holds, whatever their kind (future kinds included)."""
    report = {"path": "x.diff", "size_bytes": 10, "totals": {"density": 0.01, "budget_numel": 300, "params": 54},
              "tensors": [
                  {"tensor": "encoder.layer.0.attention.self.query.weight", "kind": "sparse", "nnz": 3, "numel": 100,
                   "bytes": 7},
                  {"tensor": "encoder.layer.0.attention.self.query.bias", "kind": "sparse", "nnz": 0, "numel": 10,
                   "bytes": 0},
                  {"tensor": "encoder.layer.0.intermediate.dense.weight", "kind": "lowrank", "nnz": 40, "numel": 200,
                   "bytes": 80},
                  {"tensor": "encoder.layer.0.output.LayerNorm.weight", "kind": "sparse", "nnz": 1, "numel": 10,
                   "bytes": 2},
                  {"tensor": "encoder.layer.0.output.LayerNorm.bias", "kind": "dense-diff", "nnz": 10, "numel": 10,
                   "bytes": 40},
                  {"tensor": "classifier.weight", "kind": "extra", "nnz": 64, "numel": 64, "bytes": 256}]}
    grid = cells(report)
    assert grid[("layer 0", "query")].value("density") == 0.03
    assert grid[("layer 0", "bias")].value("density") == 0.0
    assert grid[("layer 0", "FFN in")].value("density") == 0.2 and grid[("layer 0", "FFN in")].kinds == {"lowrank"}
    norm = grid[("layer 0", "LayerNorm")]
    assert (norm.nnz, norm.numel, norm.value("bytes"), norm.kinds) == (11, 20, 42.0, {"sparse", "dense-diff"})
    fig = figure([report, report], by="density")
    (a, b) = _panels(fig)
    assert [t.get_text() for t in a.get_yticklabels()] == ["layer 0", "head"]
    assert [t.get_text() for t in a.get_xticklabels()] == ["query", "FFN in", "LayerNorm", "bias", "other"]
    texts = {t.get_text() for t in a.texts}
    assert {"3.0%", "20%", "55%", "100%", "0"} <= texts
    assert "lowrank" in a.get_title() and "extra" in a.get_title()
    assert "54 update parameters (18.000% of 300 entries)" in a.get_title()


def test_a_basis_cell_counts_kept_scales_against_the_matrix_entries():
    """A basis record's numel counts bases: the matrix's own record covers the entries, so 21 kept scales of a
    2080-entry matrix are 1% of it (not 21 / 2112); a basis record alone falls back to kept / bases."""
    ffn_in, ffn_out = "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"
    report = {"path": "b.diff", "size_bytes": 10, "totals": {"density": 0.0, "budget_numel": 2080, "params": 37},
              "tensors": [{"tensor": ffn_in, "kind": "sparse", "nnz": 0, "numel": 2080, "bytes": 0},
                          {"tensor": ffn_in, "kind": "basis", "nnz": 21, "numel": 32, "bytes": 84},
                          {"tensor": ffn_out, "kind": "basis", "nnz": 16, "numel": 32, "bytes": 64}]}
    grid = cells(report)
    assert grid[("layer 0", "FFN in")].value("density") == 21 / 2080
    assert grid[("layer 0", "FFN in")].kinds == {"sparse", "basis"}
    assert grid[("layer 0", "FFN out")].value("density") == 0.5
    (a,) = _panels(figure([report], by="density"))
    assert "37 update parameters (1.779% of 2,080 entries)" in a.get_title()


def test_figure_refuses_nothing_to_plot_and_unknown_measure():
    from diffcli.errors import InvalidValueError

    empty = {"path": "e.diff", "size_bytes": 0, "totals": {"density": 0.0, "budget_numel": 0}, "tensors": []}
    with pytest.raises(InvalidValueError, match="no tensors"):
        figure([empty])
    with pytest.raises(InvalidValueError, match="nothing to plot"):
        figure([])
    with pytest.raises(InvalidValueError, match="--plot-by"):
        figure([empty], by="nnz")


def test_existing_output_needs_force(diffs, tmp_path):
    out = tmp_path / "p.png"
    out.write_bytes(b"keep me")
    _fails(runner.invoke(app, ["inspect", str(diffs[0]), "--plot", str(out)]), 6, "already exists")
    assert out.read_bytes() == b"keep me"
    res = runner.invoke(app, ["inspect", str(diffs[0]), "--plot", str(out), "--force", "-q"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, code, text", [
    (["--plot", "{tmp}/p.jpg"], 2, "plot format"),
    (["--plot", "{tmp}/p"], 2, "plot format"),
    (["--plot", "{tmp}/p.png", "--plot-by", "colour"], 2, "--plot-by"),
    (["--plot-by", "bytes"], 2, "only apply with --plot"),
    (["--force"], 2, "only apply with --plot"),
    (["--plot", "{tmp}/no/such/folder/p.png"], 3, "does not exist"),  # not found (it was 2)
])
def test_bad_plot_arguments(diffs, tmp_path, args, code, text):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    _fails(runner.invoke(app, ["inspect", str(diffs[0]), *args, "--json"]), code, text)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_input_writes_no_plot(diffs, tmp_path):
    out = tmp_path / "p.png"
    _fails(runner.invoke(app, ["inspect", str(diffs[0]), str(tmp_path / "nope.diff"), "--plot", str(out)]),
           3, "does not exist")
    bad = tmp_path / "bad.diff"
    bad.write_bytes(b"DIFFPRUN" + b"\0" * 20)
    _fails(runner.invoke(app, ["inspect", str(diffs[0]), str(bad), "--plot", str(out)]), 4, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.diff"]


def test_without_matplotlib_says_how_to_install(diffs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    _fails(runner.invoke(app, ["inspect", str(diffs[0]), "--plot", str(tmp_path / "p.png")]), 1,
           "pip install 'diffprune[plot]'")
    assert list(tmp_path.iterdir()) == []


def test_a_file_name_with_dollar_signs_is_drawn_as_it_is_not_as_mathtext(diffs, tmp_path):
    import shutil

    odd = tmp_path / "price$_$x$.diff"
    shutil.copy(diffs[0], odd)
    out = tmp_path / "p.png"
    res = runner.invoke(app, ["inspect", str(odd), "--plot", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0
    (panel,) = _panels(figure([inspect(odd)]))
    assert panel.get_title().startswith("price$_$x$.diff\n")
