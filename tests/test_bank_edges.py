"""`eval` and `DiffBank` at their edges: a diff that resizes the embeddings (evaluated as `apply` rebuilds it), a
quiet load of a base folder with an LM head, hints that name no flag eval lacks, and a NaN δ named by its tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_base, make_finetune
from diffcli import task_types
from diffcli.bank import DiffBank, SharedEncoderError
from diffcli.cli.app import app
from test_task_types import write_lm
from tiny_lms import make_gpt2, make_llama, nudge, write_tokenizer

runner = CliRunner()


def _cli(*args):
    """The installed CLI in a subprocess: transformers' own log handler writes to the real stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # conftest quiets transformers; a user's shell does not
    return subprocess.run([sys.executable, "-m", "diffcli", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """A GPT-2 finetune that added a token (resize_token_embeddings, as for a new pad token), pruned against its base."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("resized")
    base = make_gpt2(root / "gpt2")
    model = GPT2LMHeadModel.from_pretrained(base)
    model.resize_token_embeddings(65)
    nudge(model)
    model.save_pretrained(root / "ft")
    write_tokenizer(root / "ft", bos=False)
    res = runner.invoke(app, ["prune", str(root / "ft"), "--base", str(base), "--sparsity", "5%", "-o",
                              str(root / "ck"), "--quiet"])
    assert res.exit_code == 0, res.output
    return {"base": base, "ck": root / "ck", "dev": write_lm(root / "dev.jsonl"), "root": root}


def test_a_bank_refuses_a_resized_encoder_with_its_own_error(resized):
    bank = DiffBank(resized["base"])
    with pytest.raises(SharedEncoderError, match=r"resizes transformer\.wte\.weight from \[64, 32\] in the base "
                                                 r"to \[65, 32\]: the bank's tasks share one encoder") as err:
        bank.add("lm", resized["ck"])
    assert "apply" in err.value.hint and "--force" not in err.value.hint


def test_eval_of_a_resized_encoder_gives_the_applied_models_numbers(resized):
    res = runner.invoke(app, ["eval", str(resized["base"]), str(resized["ck"]), "--validation-file",
                              str(resized["dev"]), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["metrics"]
    out = resized["root"] / "applied"
    assert runner.invoke(app, ["apply", str(resized["base"]), str(resized["ck"]), "-o", str(out), "--quiet"]).exit_code == 0
    from transformers import AutoModelForCausalLM

    from diffcli.evaluation import evaluate

    kind = task_types.get("causal-lm")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.get_input_embeddings().weight.shape[0] == 65
    want = evaluate(model, kind.tokenizer(resized["base"]), kind.load(validation_file=resized["dev"], need_train=False),
                    max_seq_length=64)
    assert got["validation"] == pytest.approx(want["validation"])
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("diffprune-eval-*"))  # the rebuilt model is gone


def test_the_fallback_evaluates_with_the_bank_freed(resized, monkeypatch):
    """One model in memory at a time: the bank's encoder is gone before the rebuilt model is loaded."""
    import gc
    import weakref

    from diffcli import quality_gate

    banks, alive = [], []
    init, evaluate_applied = DiffBank.__init__, quality_gate._evaluate_applied

    def record(self, *args, **kw):
        init(self, *args, **kw)
        banks.append(weakref.ref(self))

    def check(*args, **kw):
        gc.collect()
        alive.append(banks[0]() is not None)
        return evaluate_applied(*args, **kw)

    monkeypatch.setattr(DiffBank, "__init__", record)
    monkeypatch.setattr(quality_gate, "_evaluate_applied", check)
    quality_gate.evaluate_diff(str(resized["base"]), resized["ck"], validation_file=resized["dev"])
    assert alive == [False]


def test_quiet_eval_prints_nothing_for_a_base_with_an_lm_head(tmp_path):
    """The bare encoder does not take a Llama base's untied lm_head: transformers' load report stays unprinted."""
    from transformers import LlamaForCausalLM

    base = make_llama(tmp_path / "llama")
    nudge(LlamaForCausalLM.from_pretrained(base)).save_pretrained(tmp_path / "ft")
    write_tokenizer(tmp_path / "ft", bos=True)
    assert _cli("prune", tmp_path / "ft", "--base", base, "--sparsity", "5%", "-o", tmp_path / "ck", "--quiet").returncode == 0
    proc = _cli("eval", base, tmp_path / "ck", "--validation-file", write_lm(tmp_path / "dev.jsonl"), "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bankbert")
    base = make_base(root / "bert")
    make_finetune(base, root / "ft")
    assert runner.invoke(app, ["prune", str(root / "ft"), "--base", str(base), "--sparsity", "5%", "-o",
                               str(root / "ck"), "--quiet"]).exit_code == 0
    (root / "dev.csv").write_text("sentence,label\nthe cat is good,1\na bad movie,0\n")
    return {"base": base, "ck": root / "ck", "dev": root / "dev.csv", "root": root}


def test_eval_on_another_base_hints_at_the_base_not_at_force(bert, tmp_path):
    res = runner.invoke(app, ["eval", str(make_gpt2(tmp_path / "gpt2")), str(bert["ck"]), "--validation-file",
                              str(bert["dev"])])
    assert res.exit_code == 5, res.output
    assert "does not fit base" in res.stderr and "use the base it was made on" in res.stderr
    assert "--force" not in res.stderr


def test_eval_names_the_tensor_holding_nan(bert, tmp_path):
    import shutil

    ck = tmp_path / "ck_nan"
    shutil.copytree(bert["ck"], ck)
    tensors = load_file(ck / "diff.safetensors")
    key = next(k for k in sorted(tensors) if k.startswith("sparse.values/") and tensors[k].numel() > 3)
    tensors[key] = tensors[key].clone()
    tensors[key][0] = float("nan")
    save_file(tensors, ck / "diff.safetensors")
    res = runner.invoke(app, ["eval", str(bert["base"]), str(ck), "--validation-file", str(bert["dev"])])
    name = key.removeprefix("sparse.values/")
    assert res.exit_code == 4, res.output
    assert f"diff values of {name!r} are not finite" in res.stderr and "flat" not in res.stderr


def test_a_head_holding_nan_is_refused_by_eval_bank_and_prune_as_apply_refuses_it(tmp_path):
    """eval passed a --min gate on a head with a NaN bias (apply: exit 4), and prune kept it for pack to find."""
    from diffcli import checkpoint
    from diffcli.errors import FormatError
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    base = make_base(tmp_path / "base")
    diff = project(extract_diff(str(base), str(make_finetune(base, tmp_path / "ft", scale=0.05))), 0.1).diff
    diff.meta["task"] = "sst2"
    head = next(k for k in diff.extras if k.endswith("classifier.bias"))
    diff.extras[head] = diff.extras[head].clone()
    diff.extras[head][0] = float("nan")
    ckpt = tmp_path / "nan.ckpt"
    checkpoint.save(diff, ckpt)  # a checkpoint takes any values; pack refuses it
    dev = tmp_path / "dev.csv"
    dev.write_text("sentence,label\na good one,1\nnot good,0\n")
    res = runner.invoke(app, ["eval", str(base), str(ckpt), "--validation-file", str(dev), "--min", "accuracy=0"])
    assert res.exit_code == 4, res.output
    assert "'classifier.bias' has non-finite values" in res.stderr and "gate passed" not in res.output
    with pytest.raises(FormatError, match="non-finite"):
        DiffBank(str(base)).add("nan", ckpt)
    res = runner.invoke(app, ["prune", str(ckpt), "-s", "5%", "-o", str(tmp_path / "pruned")])
    assert res.exit_code == 4 and "non-finite" in res.stderr, res.output
    assert not (tmp_path / "pruned").exists()
    res = runner.invoke(app, ["apply", str(base), str(ckpt), "-o", str(tmp_path / "applied")])
    assert res.exit_code == 4 and "non-finite" in res.stderr, res.output  # what eval and prune now agree with


def test_a_config_value_of_the_wrong_type_is_one_line_exit_2_not_an_internal_error(tmp_path):
    from diffcli import checkpoint
    from diffcli.extract import extract_diff

    base = make_base(tmp_path / "base")
    diff = extract_diff(str(base), str(make_finetune(base, tmp_path / "ft")))
    diff.meta["task"] = "sst2"
    diff.config["num_labels"] = "two"
    checkpoint.save(diff, tmp_path / "ck")
    dev = tmp_path / "dev.csv"
    dev.write_text("sentence,label\na good one,1\nnot good,0\n")
    res = runner.invoke(app, ["eval", str(base), str(tmp_path / "ck"), "--validation-file", str(dev)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: cannot build a config for model type 'bert'") and "internal" not in res.stderr
