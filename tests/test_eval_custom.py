"""`eval` of a diff trained on the user's own files gives the numbers `train` recorded on the same dev file: a
regression stays a regression where the dev scores are whole numbers, and the columns are the ones trained on."""

from __future__ import annotations

import csv
import json
import random

import pytest
from typer.testing import CliRunner

from conftest import make_base
from diffcli import checkpoint
from diffcli.cli.app import app

runner = CliRunner()
WORDS = "the a is not good bad movie cat dog yes no".split()


def _write(path, n, seed, score):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence1", "sentence2", "score"])
        for _ in range(n):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(5)), " ".join(rng.choice(WORDS) for _ in range(3)),
                        score(rng)])
    return path


def _train(tmp_path, base, train, dev, *flags):
    out = tmp_path / "ck"
    res = runner.invoke(app, ["train", "--train-file", str(train), "--validation-file", str(dev), "--model", str(base),
                              "--method", "random", "--sparsity", "5%", "--fixmask-epochs", "1", "--batch-size", "8",
                              *flags, "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return out, checkpoint.load(out).meta["results"]["best"]["metrics"]["validation"]


def _eval(base, ck, dev, *flags):
    res = runner.invoke(app, ["eval", str(base), str(ck), "--validation-file", str(dev), *flags, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["metrics"]["validation"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("evalcustom") / "bert")


def test_a_regression_diff_scores_a_dev_file_of_whole_numbers(tmp_path, base):
    train = _write(tmp_path / "train.csv", 40, 0, lambda r: round(r.uniform(0, 5), 2))
    dev = _write(tmp_path / "dev.csv", 12, 1, lambda r: r.randint(0, 5))  # whole numbers: read alone, 6 classes
    ck, recorded = _train(tmp_path, base, train, dev, "--label-field", "score")
    assert set(recorded) >= {"pearson", "spearmanr"}
    assert _eval(base, ck, dev, "--label-field", "score") == pytest.approx(recorded)


def test_eval_reads_the_columns_the_diff_was_trained_on(tmp_path, base):
    """Trained on sentence1 alone of a file that also has sentence2: eval's own guess would be the pair."""
    train = _write(tmp_path / "train.csv", 40, 0, lambda r: round(r.uniform(0, 5), 2))
    dev = _write(tmp_path / "dev.csv", 12, 1, lambda r: round(r.uniform(0, 5), 2))
    ck, recorded = _train(tmp_path, base, train, dev, "--text-fields", "sentence1", "--label-field", "score")
    assert checkpoint.load(ck).meta["data"]["text_fields"] == ["sentence1"]
    assert _eval(base, ck, dev) == pytest.approx(recorded)
    pair = _eval(base, ck, dev, "--text-fields", "sentence1,sentence2")  # a flag still overrides the record
    assert pair != pytest.approx(recorded)
