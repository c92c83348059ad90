"""`diffprune eval`: same numbers as evaluating the `apply` output, --min gate exit codes, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli import artifact
from diffcli.cli.app import app
from diffcli.extract import extract_diff
from diffcli.projection import project

runner = CliRunner()

# The same sentence under both labels: no model can score 1.0, so --min accuracy=1 always fails.
ROWS = [("the movie is good", 1), ("the movie is bad", 0), ("a cat is not a dog", 0), ("yes the dog", 1),
        ("the cat is good", 1), ("the cat is good", 0), ("no . not good", 0), ("a good movie , yes", 1)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = make_base(root / "base")
    diff = project(extract_diff(str(base), str(make_finetune(base, root / "ft", scale=0.05))), 0.1).diff
    diff.meta["task"] = "sst2"
    artifact.write(diff, root / "sst2.diff", values="fp32")
    data = root / "dev.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{y}\n" if "," not in s else f'"{s}",{y}\n' for s, y in ROWS))
    return root, base, diff, data


def _eval(env, *extra):
    root, base, _, data = env
    return runner.invoke(app, ["eval", str(base), str(root / "sst2.diff"), "--validation-file", str(data), *extra])


def test_eval_matches_the_applied_model(env, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffcli.applying import apply_to_folder
    from diffcli.evaluation import evaluate
    from diffcli.data_sources import load_task

    root, base, diff, data = env
    res = _eval(env, "--task", "sst2", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    apply_to_folder(str(base), root / "sst2.diff", tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = evaluate(model, tok, load_task("sst2", validation_file=data, need_train=False))
    assert report["metrics"] == want
    assert report["task"] == "sst2" and report["examples"] == {"validation": len(ROWS)}
    assert report["passed"] is True and report["failures"] == []


def test_task_comes_from_the_diff_meta_and_human_output(env):
    res = _eval(env)
    assert res.exit_code == 0, res.output
    assert "sst2" in res.stdout and "accuracy=" in res.stdout


def test_min_threshold_gate(env):
    ok = _eval(env, "--min", "accuracy=0.0")
    assert ok.exit_code == 0, ok.output
    assert "gate passed" in ok.stdout
    res = _eval(env, "--min", "accuracy=1", "--json")
    assert res.exit_code == 8
    report = json.loads(res.stdout)  # the metrics are still printed for the CI log
    assert report["passed"] is False and report["failures"][0]["metric"] == "accuracy"
    (check,) = report["checks"]
    assert check == {"split": "validation", "metric": "accuracy", "op": ">=", "bound": 1.0,
                     "value": report["metrics"]["validation"]["accuracy"], "passed": False}
    assert report["failures"][0]["bound"] == report["failures"][0]["min"] == 1.0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: quality gate failed for sst2: accuracy")


@pytest.mark.parametrize("args, needle", [
    (["--min", "bogus=0.5"], "unknown metric 'bogus'"),
    (["--min", "accuracy"], "not METRIC=VALUE"),
    (["--min", "accuracy=90"], "did you mean 0.9"),
    (["--min", "accuracy=high"], "not a number"),
    (["--min", "accuracy=150%"], "is outside [-1, 1]"),
    (["--min", "perplexity<=inf"], "is not a finite number"),
    (["--min", "accuracy=nan"], "is not a finite number"),
])
def test_bad_thresholds_fail_before_any_work(env, args, needle):
    root, base, _, data = env
    res = runner.invoke(app, ["eval", str(base), str(root / "missing.diff"), "--task", "sst2", *args])
    assert res.exit_code == 2, res.output  # 2, not 3: the missing diff was never opened
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_metric_the_task_does_not_report(env):
    res = _eval(env, "--min", "f1=0.5")
    assert res.exit_code == 2
    assert "has no f1" in res.stderr


def test_a_glue_folder_beside_a_dev_file_is_refused_not_ignored(env, tmp_path):
    res = _eval(env, "--data-dir", str(tmp_path))
    assert res.exit_code == 2, res.output
    assert "--data-dir reads a GLUE folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_head_that_does_not_fit_the_task(env, tmp_path):
    _, _, _, data = env
    mnli = tmp_path / "mnli.csv"
    mnli.write_text("premise,hypothesis,label\nthe cat,the dog,0\nyes,no,2\n")
    root, base, _, _ = env
    res = runner.invoke(app, ["eval", str(base), str(root / "sst2.diff"), "--task", "mnli",
                              "--validation-file", str(mnli)])
    assert res.exit_code == 2
    assert "head predicts 2 labels but task mnli has 3" in res.stderr


def test_diff_for_another_base(env, tmp_path):
    root, _, _, data = env
    other = make_base(tmp_path / "other", seed=7)
    res = runner.invoke(app, ["eval", str(other), str(root / "sst2.diff"), "--validation-file", str(data)])
    assert res.exit_code == 5
    assert "another base" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # the message names the file the user passed (not the task) and the base the diff records (eval has no bank)
    assert f"{root / 'sst2.diff'} was made on another base than {other}" in res.stderr
    assert f"use the base it was made on ({env[2].base_ref})" in res.stderr and "bank" not in res.stderr


def test_no_task_recorded_and_none_given(env, tmp_path):
    root, base, diff, _ = env
    diff2 = project(diff, 0.1).diff
    diff2.meta.pop("task")
    artifact.write(diff2, tmp_path / "anon.diff", values="fp32")
    res = runner.invoke(app, ["eval", str(base), str(tmp_path / "anon.diff")])
    assert res.exit_code == 2
    assert "records no task" in res.stderr


@pytest.mark.integration
def test_eval_on_minilm_and_glue_rte_matches_apply(tmp_path):
    """Bundled MiniLM (bare names) + a random 0.5% diff, scored on real RTE dev rows, both ways."""
    from conftest import GLUE_DIR

    if not (GLUE_DIR / "RTE" / "dev.tsv").is_file():
        pytest.skip("GLUE RTE data not present")
    import sys
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffcli.applying import apply_to_folder
    from diffcli.evaluation import evaluate
    from diffcli.data_sources import load_task
    from diffcli.weights import resolve_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_bank import make_diff  # the benchmark's random-diff maker, on MiniLM

    diff = make_diff(resolve_model("minilm"), 2, seed=0)
    diff.meta["task"] = "rte"
    artifact.write(diff, tmp_path / "rte.diff", values="fp32")
    res = runner.invoke(app, ["eval", "minilm", str(tmp_path / "rte.diff"), "--data-dir", str(GLUE_DIR),
                              "--max-eval-samples", "24", "--json"])
    assert res.exit_code == 0, res.output
    apply_to_folder("minilm", tmp_path / "rte.diff", tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = evaluate(model, tok, load_task("rte", data_dir=GLUE_DIR, max_eval_samples=24, need_train=False))
    assert json.loads(res.stdout)["metrics"] == want


def test_a_percentage_above_100_gets_no_did_you_mean_hint(env):
    root, base, _, _ = env
    res = runner.invoke(app, ["eval", str(base), str(root / "missing.diff"), "--task", "sst2", "--min", "accuracy=150%"])
    assert res.exit_code == 2 and "did you mean" not in res.stderr


def test_a_metric_that_is_not_a_number_meets_no_bound():
    """A diverged model (loss NaN, perplexity inf) fails every --min: NaN compares False both ways."""
    from diffcli.errors import ThresholdNotMetError
    from diffcli.quality_gate import enforce, missed

    for metric, bound in (("loss", 2.0), ("perplexity", 12.0), ("accuracy", 0.5), ("matthews_correlation", -1.0)):
        assert missed(metric, float("nan"), bound)
        assert missed(metric, float("inf"), bound) and missed(metric, float("-inf"), bound)
    assert not missed("loss", 1.5, 2.0) and not missed("accuracy", 0.5, 0.5)
    report = {"task": "lm", "metrics": {"validation": {}}, "failures": [
        {"split": "validation", "metric": "loss", "value": float("nan"), "op": "<=", "bound": 2.0, "min": 2.0}]}
    with pytest.raises(ThresholdNotMetError, match="loss is nan, which meets no bound"):
        enforce(report)


@pytest.mark.parametrize("problem_type", ["regression", None])
def test_a_custom_regression_diff_is_scored_on_float_labels(tmp_path, problem_type):
    """A one-output head's config carries id2label {0: LABEL_0} (transformers fills it in): eval took it for a
    one-class classifier and refused every float label (exit 7), so no custom regression diff could be scored."""
    base = make_base(tmp_path / "base")
    diff = project(extract_diff(str(base), str(make_finetune(base, tmp_path / "ft", num_labels=1))), 0.1).diff
    diff.config["id2label"] = {"0": "LABEL_0"}
    diff.config["problem_type"] = problem_type  # as train writes it, and as a config that never said
    artifact.write(diff, tmp_path / "reg.diff", values="fp32")
    data = tmp_path / "reg.csv"
    data.write_text("sentence,label\nthe movie is good,3.5\nthe cat,1.2\nno . not good,0.7\na good movie,2.25\n")
    res = runner.invoke(app, ["eval", str(base), str(tmp_path / "reg.diff"), "--validation-file", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["metrics"]["validation"]) >= {"pearson", "spearmanr"}
