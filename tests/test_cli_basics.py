"""The CLI shell: fast --help without heavy imports, --version, python -m, one-line usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from diffcli import __version__
from diffcli.cli.app import app, run

runner = CliRunner()


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from diffcli.cli.app import run; rc = run(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_subcommand_help_does_not_import_heavy_libraries():
    from diffcli.cli import commands

    for name in commands.names():
        code = (f"import sys; from diffcli.cli.app import run; run(['{name}', '--help']); "
                "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == "[]", name


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.stdout


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "diffcli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and __version__ in res.stdout


def test_usage_errors_are_one_line(capsys):
    assert run(["prune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert run(["no-such-command"]) == 2
    assert run(["inspect", "x", "--bogus-flag"]) == 2


def test_inspect_missing_file_json_mode_keeps_stdout_clean(tmp_path):
    res = runner.invoke(app, ["inspect", str(tmp_path / "nope.diff"), "--json"])
    assert res.exit_code == 3 and res.stdout == "" and "does not exist" in res.stderr


def test_inspect_checkpoint_json(tiny_base, tiny_finetune, tmp_path):
    ck = tmp_path / "ck"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "2%", "-o", str(ck)]).exit_code == 0
    res = runner.invoke(app, ["inspect", str(ck), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["kind"] == "checkpoint"
    assert rep["totals"]["nnz"] == round(0.02 * rep["totals"]["budget_numel"])
    assert rep["totals"]["extras"] == 2
    assert sum(g["nnz"] for g in rep["layers"]) == rep["totals"]["nnz"] + rep["totals"]["extras_numel"]
    human = runner.invoke(app, ["inspect", str(ck), "--tensors"])
    assert human.exit_code == 0 and "per layer" in human.stdout and "classifier.weight" in human.stdout


def test_help_texts_hold_no_rich_markup_tags():
    """Rich reads `[word...]` in a help text as a markup tag and drops it (eval's --max-seq-length lost its default)."""
    import re

    import click
    import typer

    top = typer.main.get_command(app)
    ctx = click.Context(top)
    tag = re.compile(r"(?<!\\)\[[a-zA-Z/#@][^\]]*\]")
    found = []
    for name in top.list_commands(ctx):
        sub = top.get_command(ctx, name)
        texts = [("help", sub.help or "")] + [(p.name, getattr(p, "help", None) or "") for p in sub.params]
        found += [f"{name} {what}: {text}" for what, text in texts if tag.search(text)]
    assert found == []
    res = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "250"})
    assert "or the model's positions if fewer" in res.stdout


def test_a_closed_stdout_is_refused_before_any_work_when_the_result_goes_there(tmp_path):
    """`apply ... --json >&-` wrote the model, then crashed (exit 70) printing its report to the closed stdout; human
    output to a closed stdout is lost, as it always was, and the command still runs."""
    import os

    def run(*args):
        return subprocess.run([sys.executable, "-m", "diffcli", *args], stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.close(1))

    missing = str(tmp_path / "none.diff")
    for args in (["inspect", missing, "--json"], ["pack", missing, "-o", "-"], ["pack", missing, "--output=-"]):
        res = run(*args)
        assert res.returncode == 1, args
        assert res.stderr.splitlines() == ["error: standard output is closed, and --json or -o - writes the result "
                                           "there (hint: redirect it instead, e.g. >/dev/null)"], args
    res = run("inspect", missing)  # no data for stdout: the command runs, and its own error is the one line
    assert res.returncode == 3 and "does not exist" in res.stderr and "standard output" not in res.stderr
    assert run("--version").returncode == 0
