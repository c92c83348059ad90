"""`eval` and `DiffBank` for token classification and causal LMs: same numbers as the applied model, the
lower-is-better gate (`--min perplexity<=X`), bank generation with two diffs, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_base
from diffcli import artifact, task_types
from diffcli.cli.app import app
from diffcli.extract import extract_diff
from diffcli.projection import project
from test_task_types import write_lm, write_tagged
from tiny_lms import BOS, make_gpt2, nudge

runner = CliRunner()


def _make_diff(kind_name, base, data, root, name, seed, meta=True):
    kind = task_types.get(kind_name)
    tm = kind.build(base, data, seed=0)
    nudge(tm.model, seed=seed, scale=0.2)
    tm.model.save_pretrained(root / f"ft_{name}")
    diff = project(extract_diff(str(base), str(root / f"ft_{name}")), 0.3).diff
    if meta:
        diff.meta.update({"task": name, "task_type": kind_name})
    artifact.write(diff, root / f"{name}.diff", values="fp32")
    return root / f"{name}.diff"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tteval")
    bert, gpt2 = make_base(root / "bert"), make_gpt2(root / "gpt2")
    tagged, lm = write_tagged(root / "ner.jsonl"), write_lm(root / "lm.jsonl")
    ner = _make_diff("token-classification", bert, task_types.get("token-classification").load("ner", train_file=tagged),
                     root, "ner", 1)
    lm_data = task_types.get("causal-lm").load("lm", train_file=lm)
    a = _make_diff("causal-lm", gpt2, lm_data, root, "a", 1)
    b = _make_diff("causal-lm", gpt2, lm_data, root, "b", 2, meta=False)  # type from its architecture alone
    return {"root": root, "bert": bert, "gpt2": gpt2, "tagged": tagged, "lm": lm, "ner": ner, "a": a, "b": b}


def _merged(env, base, diff, name):
    from diffcli.applying import apply_to_folder

    out = env["root"] / f"merged_{name}"
    if not out.exists():
        apply_to_folder(str(base), diff, out)
    return out


def _eval(*args):
    res = runner.invoke(app, ["eval", *map(str, args)])
    return res


def test_token_classification_eval_matches_the_applied_model(env):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from diffcli import token_tasks

    res = _eval(env["bert"], env["ner"], "--validation-file", env["tagged"], "--json", "--min", "f1>=0")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["task"] == "ner" and report["task_type"] == "token-classification"
    merged = _merged(env, env["bert"], env["ner"], "ner")
    model = AutoModelForTokenClassification.from_pretrained(merged)
    data = token_tasks.load("ner", None, env["tagged"], labels=list(model.config.id2label.values()), need_train=False)
    want = token_tasks.evaluate(model, AutoTokenizer.from_pretrained(merged), data.eval["validation"], data.spec,
                                max_seq_length=128, batch_size=64)
    assert report["metrics"] == {"validation": want}
    assert set(want) == {"precision", "recall", "f1", "accuracy"}


def test_causal_lm_eval_matches_the_applied_model_and_gates_perplexity(env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffcli import lm_tasks

    res = _eval(env["gpt2"], env["a"], "--validation-file", env["lm"], "--json", "--min", "perplexity<=1e6")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    merged = _merged(env, env["gpt2"], env["a"], "a")
    model = AutoModelForCausalLM.from_pretrained(merged)
    rows = lm_tasks.read_lm(env["lm"])
    want = lm_tasks.evaluate(model, AutoTokenizer.from_pretrained(merged), rows, None, max_seq_length=128,
                             batch_size=64)
    assert report["metrics"]["validation"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert report["passed"] and report["thresholds"] == {"perplexity": 1e6}

    fail = _eval(env["gpt2"], env["a"], "--validation-file", env["lm"], "--min", "perplexity<=1.5")
    assert fail.exit_code == 8
    assert fail.stderr.strip().startswith("error: quality gate failed for a: perplexity ")
    assert "> 1.5" in fail.stderr and len(fail.stderr.strip().splitlines()) == 1
    human = _eval(env["gpt2"], env["b"], "--validation-file", env["lm"], "--min", "loss<=100")
    assert human.exit_code == 0, human.output
    assert "perplexity=" in human.stdout and "gate passed (loss<=100)" in human.stdout


@pytest.mark.parametrize("args, needle", [
    (["--min", "perplexity=12"], "perplexity is lower is better"),
    (["--min", "perplexity>=12"], "perplexity is lower is better"),
    (["--min", "accuracy<=0.5"], "accuracy is higher is better"),
    (["--min", "perplexity<=0.5"], "can never be met"),
])
def test_thresholds_in_the_wrong_direction(env, args, needle):
    res = _eval(env["gpt2"], env["root"] / "missing.diff", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_accuracy_form_still_works(env):
    from diffcli.quality_gate import parse_thresholds

    assert parse_thresholds(["accuracy=0.6", "f1>=60%", "perplexity<=12", "loss <= 2.5"]) == {
        "accuracy": 0.6, "f1": 0.6, "perplexity": 12.0, "loss": 2.5}


@pytest.mark.parametrize("which, rows, code, needle", [
    ("ner", [{"tokens": ["paris"], "tags": ["B-CITY"]}], 7, "tag 'B-CITY' is not in the label set of the model's head"),
    ("ner", [{"words": ["paris"], "tags": ["O"]}], 7, "no 'tokens' field"),
    ("a", [{"prompt": "say", "completion": ""}], 7, "empty completion"),
    ("a", [{"question": "say"}], 7, "needs a 'text' field or 'prompt' and 'completion'"),
])
def test_bad_eval_data(env, tmp_path, which, rows, code, needle):
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = env["bert"] if which == "ner" else env["gpt2"]
    res = _eval(base, env[which], "--validation-file", path)
    assert res.exit_code == code, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""


def test_task_type_the_diff_was_not_made_for(env):
    res = _eval(env["gpt2"], env["a"], "--validation-file", env["lm"], "--task-type", "token-classification")
    assert res.exit_code == 2
    assert "the diff was made for causal-lm, not token-classification" in res.stderr


def test_task_type_the_architecture_cannot_serve(env, tmp_path):
    from diffcli.sources import load_diff

    diff = load_diff(env["ner"])
    diff.config.pop("architectures")
    diff.meta["task_type"] = "causal-lm"  # a BERT diff that claims to be a causal LM
    artifact.write(diff, tmp_path / "odd.diff", values="fp32")
    res = _eval(env["bert"], tmp_path / "odd.diff", "--validation-file", env["lm"])
    assert res.exit_code == 2, res.output
    assert "'bert' is a bidirectional encoder: it cannot serve --task-type causal-lm" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bank_generates_with_each_diff(env):
    from transformers import AutoModelForCausalLM

    from diffcli.bank import DiffBank

    bank = DiffBank(str(env["gpt2"]), device="cpu")
    base_state = {k: v.clone() for k, v in bank.encoder.state_dict().items()}
    bank.add("a", env["a"])
    bank.add("b", env["b"])
    prompt = torch.tensor([[BOS, 5, 9, 12]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    outs = {}
    for name in ("a", "b", "a"):
        got = bank.generate(name, prompt, **kw)
        merged = AutoModelForCausalLM.from_pretrained(_merged(env, env["gpt2"], env[name], name)).eval()
        assert torch.equal(got, merged.generate(prompt, **kw)), name
        outs[name] = got
    assert not torch.equal(outs["a"], outs["b"])  # the two diffs really differ
    assert bank.active == "a"
    bank.reset()
    assert all(torch.equal(base_state[k], v) for k, v in bank.encoder.state_dict().items())


def test_bank_refuses_generate_for_a_classifier(env):
    from diffcli.bank import DiffBank

    bank = DiffBank(str(env["bert"]), device="cpu")
    bank.add("ner", env["ner"])
    with pytest.raises(task_types.InvalidValueError, match="cannot generate"):
        bank.generate("ner", torch.tensor([[2, 5]]))


def test_llama_tasks_share_the_base_lm_head(tmp_path):
    """An untied LM head the base stores is held once; each task's δ on it is applied at its switch."""
    from transformers import AutoModelForCausalLM

    from diffcli.applying import apply_to_folder
    from diffcli.bank import DiffBank
    from tiny_lms import make_llama

    base = make_llama(tmp_path / "llama")
    data = task_types.get("causal-lm").load("lm", train_file=write_lm(tmp_path / "lm.jsonl"))
    paths = {n: _make_diff("causal-lm", base, data, tmp_path, n, seed) for n, seed in (("x", 1), ("y", 2))}
    bank = DiffBank(str(base), device="cpu")
    for n, p in paths.items():
        bank.add(n, p)
    with bank.use("x") as mx:
        head_x = mx.lm_head.weight.data_ptr()
    with bank.use("y") as my:
        assert my.lm_head.weight.data_ptr() == head_x
    ids = torch.tensor([[BOS, 5, 9, 12, 7]])
    for n in ("x", "y", "x"):
        apply_to_folder(str(base), paths[n], tmp_path / f"m_{n}", force=True)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"m_{n}").eval()
        with torch.no_grad(), bank.use(n) as model:
            assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5), n


def test_a_llama_basis_diff_scaling_the_untied_lm_head_loads_into_the_bank(tmp_path):
    """basis scales Llama's untied lm_head, which the base folder holds and the bare encoder does not: the bank
    refused the diff ('no tensor lm_head.weight') that apply rebuilds; now it resolves it from the folder."""
    from transformers import AutoModelForCausalLM

    from diffcli import DiffPruner, checkpoint
    from diffcli.applying import apply_to_folder
    from diffcli.bank import DiffBank
    from tiny_lms import make_llama

    base = make_llama(tmp_path / "llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    ids = torch.randint(4, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    pruner = DiffPruner(model, str(base), method="basis", keep_bases=0.5, total_steps=2)
    model.train()
    for _ in range(2):
        pruner.begin()
        model(**batch).loss.backward()
        pruner.finish()
    pruner.project()
    pruner.start_fixed(2)
    for _ in range(2):
        model(**batch).loss.backward()
        pruner.fixed_step()
    diff = pruner.export()
    assert "lm_head.weight" in diff.bases
    checkpoint.save(diff, tmp_path / "ckpt")
    apply_to_folder(str(base), tmp_path / "ckpt", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    bank = DiffBank(str(base), device="cpu")
    bank.add("story", tmp_path / "ckpt")
    with torch.no_grad(), bank.use("story") as m:
        assert torch.allclose(m(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(task_types.InvalidValueError, match="no task 'other'"):
        bank.meta("other")  # every per-task accessor: one clear error, not a KeyError
    with pytest.raises(task_types.InvalidValueError, match="no task 'other'"):
        bank.task_nbytes("other")
