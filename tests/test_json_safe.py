"""--json output and checkpoint metadata stay strict JSON when a diverged run's metrics are NaN or infinite."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from diffcli.json_safe import finite


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_finite_replaces_every_non_finite_float_at_any_depth():
    data = {"loss": math.nan, "splits": [{"ppl": math.inf}, (1.5, -math.inf)], "n": 3, "s": "nan"}
    assert finite(data) == {"loss": None, "splits": [{"ppl": None}, [1.5, None]], "n": 3, "s": "nan"}


def test_json_mode_prints_null_for_nan_and_infinity(capsys):
    from diffcli.cli.output import Output

    Output(json_mode=True).result({"loss": float("nan"), "perplexity": math.inf, "np": np.float32("nan"),
                                   "t": torch.tensor(float("inf")), "ok": 0.5})
    assert _strict(capsys.readouterr().out) == {"loss": None, "perplexity": None, "np": None, "t": None, "ok": 0.5}


def test_a_checkpoint_with_nan_metrics_is_strict_json_and_packs(tmp_path):
    from diffcli import artifact, checkpoint
    from diffcli.diff import Diff, TensorDiff

    td = TensorDiff("w", (4,), "float32", "0" * 32, torch.tensor([0.5]), torch.tensor([1]))
    diff = Diff({"w": td}, {}, {"model_type": "bert"}, "base", "sha256:" + "f" * 64,
                {"results": {"best": {"loss": math.nan, "perplexity": math.inf}}})
    checkpoint.save(diff, tmp_path / "ckpt")
    meta = _strict((tmp_path / "ckpt" / checkpoint.META_FILE).read_text())["meta"]
    assert meta["results"]["best"] == {"loss": None, "perplexity": None}
    artifact.write(checkpoint.load(tmp_path / "ckpt"), tmp_path / "x.diff")
    assert artifact.load(tmp_path / "x.diff").meta["results"]["best"]["loss"] is None


def test_perplexity_of_a_nan_loss_is_nan_not_infinity():
    from diffcli.metrics import lm_scores

    scores = lm_scores(math.nan, 10)
    assert math.isnan(scores["loss"]) and math.isnan(scores["perplexity"])
    assert lm_scores(7000.0, 1)["perplexity"] == math.inf
