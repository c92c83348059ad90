"""`train --task-type`: every method on tiny BERT/GPT-2/Llama with data written here; the loss falls, the library
(`DiffPruner` in a plain loop) gives the CLI's diff for the same seed, `apply` → `AutoModelFor...` gives the
in-memory model's outputs, and bad input exits with its code before training starts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_base
from diffcli import checkpoint, task_types
from diffcli.cli.app import app
from test_task_types import TAGGED, write_lm, write_tagged
from tiny_lms import make_gpt2, make_llama

FAST = ["--fixmask-epochs", "1", "--batch-size", "2", "--fixmask-lr", "2e-2", "--sparsity", "20%",
        "--max-seq-length", "32"]
METHOD = {"fisher": ["--method", "fisher", "--fill-samples", "4"], "random": ["--method", "random"],
          "magnitude": ["--method", "magnitude", "--epochs", "1", "--lr", "1e-2"],
          "l0": ["--method", "l0", "--epochs", "1", "--lr", "1e-2", "--no-structured"],
          "swr": ["--method", "swr", "--epochs", "1", "--lr", "1e-2", "--rank", "2"],
          "basis": ["--method", "basis", "--epochs", "1", "--basis-lr", "1e-2"]}
CASES = {"token-classification": ("bert", write_tagged, "AutoModelForTokenClassification"),
         "causal-lm": ("gpt2", write_lm, "AutoModelForCausalLM")}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("wire")
    return {"bert": make_base(root / "bert"), "gpt2": make_gpt2(root / "gpt2"), "llama": make_llama(root / "llama")}


def _train(tmp_path, base, kind_name, writer, *extra: str, name: str = "out"):
    data = writer(tmp_path / "d.jsonl")
    out = tmp_path / name
    args = ["train", "--task-type", kind_name, "--task", "t", "--train-file", str(data), "--validation-file",
            str(data), "--model", str(base), *FAST, *extra, "-o", str(out), "--json"]
    return CliRunner().invoke(app, args), out, data


@pytest.mark.parametrize("method", ["l0", "fisher", "random", "magnitude", "swr", "basis"])
@pytest.mark.parametrize("kind_name", list(CASES))
def test_every_method_trains_every_task_type(bases, tmp_path, kind_name, method):
    base, writer, auto = CASES[kind_name]
    result, out, _ = _train(tmp_path, bases[base], kind_name, writer, *METHOD[method], "--fixmask-epochs", "3")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["task_type"] == kind_name
    diff = checkpoint.load(out)
    assert diff.meta["task_type"] == kind_name
    # the tensors' entries within the --sparsity budget (Diff.nnz also counts basis scales, as the header does)
    assert sum(td.nnz for td in diff.tensors.values()) <= round(0.2 * diff.budget_numel)
    fixed = [h["loss"] for h in diff.meta["history"] if h["phase"] == "fixmask"]
    assert fixed[-1] < fixed[0], fixed  # the loss falls over the fixed-mask epochs
    if kind_name == "causal-lm":  # GPT-2's LM head is the tied embedding: never stored as a dense extra
        assert diff.extras == {} and "lm_head.weight" not in diff.tensors


def test_llama_causal_lm_trains(bases, tmp_path):
    result, out, _ = _train(tmp_path, bases["llama"], "causal-lm", write_lm, "--method", "random",
                            "--fixmask-epochs", "2")
    assert result.exit_code == 0, result.output
    diff = checkpoint.load(out)
    assert "lm_head.weight" in diff.tensors and diff.extras == {}  # Llama's own (untied) head is diffed


def _library_diff(base, kind_name, data_file, method: str, seed: int = 42):
    """The same run as `_train(..., --method method)` through the public API in a plain loop."""
    from diffcli import DiffPruner

    kind = task_types.get(kind_name)
    data = kind.load("t", train_file=data_file, validation_file=data_file)
    tm = kind.build(base, data, seed)
    ds = kind.encode(data.train, tm.tokenizer, data.spec, 32)
    model = tm.model

    def batches(data_seed: int):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(data_seed)).tolist()
        return [ds.collate([ds[i] for i in order[j:j + 2]]) for j in range(0, len(order), 2)]

    extra = {"fill_samples": 4} if method == "fisher" else {}
    pruner = DiffPruner(model, base, method=method, sparsity=0.2, seed=seed, fixmask_lr=2e-2, max_seq_length=32,
                        batch_size=2, **extra)
    torch.manual_seed(seed)  # dropout, as train seeds it
    pruner.choose_mask(batches(seed + 2)[:2])
    steps = batches(seed + 1)
    pruner.start_fixed(total_steps=len(steps))
    model.train()
    for batch in steps:
        model(**batch).loss.backward()
        pruner.fixed_step()
    return pruner.export()


def _more_tagged(path):
    return write_tagged(path, TAGGED * 4)


@pytest.mark.parametrize("kind_name, base, writer, method", [("causal-lm", "gpt2", write_lm, "random"),
                                                             ("causal-lm", "llama", write_lm, "fisher"),
                                                             ("token-classification", "bert", _more_tagged, "fisher")])
def test_library_and_cli_give_the_same_diff(bases, tmp_path, kind_name, base, writer, method):
    result, out, data = _train(tmp_path, bases[base], kind_name, writer, *METHOD[method])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["after_fixmask"]["epoch"] == 1  # the trained epoch is the one written
    cli = checkpoint.load(out)
    lib = _library_diff(bases[base], kind_name, data, method)
    assert cli.tensors.keys() == lib.tensors.keys() and cli.extras.keys() == lib.extras.keys()
    for name, td in cli.tensors.items():
        assert torch.equal(td.indices, lib.tensors[name].indices), name
        assert torch.equal(td.values, lib.tensors[name].values), name
    for name, t in cli.extras.items():
        assert torch.equal(t, lib.extras[name]), name


@pytest.mark.parametrize("kind_name", list(CASES))
def test_apply_loads_with_the_auto_class_and_matches(bases, tmp_path, kind_name):
    import transformers

    from diffcli.applying import apply_to_folder

    base, writer, auto = CASES[kind_name]
    result, out, data = _train(tmp_path, bases[base], kind_name, writer, "--method", "random")
    assert result.exit_code == 0, result.output
    diff = checkpoint.load(out)
    merged = tmp_path / "merged"
    apply_to_folder(str(bases[base]), diff, merged)
    loaded = getattr(transformers, auto).from_pretrained(str(merged)).eval()
    kind = task_types.get(kind_name)
    tdata = kind.load("t", train_file=data)
    tm = kind.build(bases[base], tdata, 0)  # the base, with the diff's head and δ written in place
    state = dict(tm.model.named_parameters())
    with torch.no_grad():
        for name, td in diff.tensors.items():
            if name in state:
                state[name].view(-1)[td.indices] += td.values.to(state[name].dtype)
        for name, t in diff.extras.items():
            state[name].copy_(t)
    ds = kind.encode(tdata.train, tm.tokenizer, tdata.spec, 32)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        expected = tm.model.eval()(**batch).logits
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _fails(tmp_path, base, kind_name, rows_file, *extra):
    out = tmp_path / "bad"
    args = ["train", "--task-type", kind_name, "--task", "t", "--train-file", str(rows_file), "--validation-file",
            str(rows_file), "--model", str(base), *FAST, *extra, "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert not out.exists() and not (tmp_path / "bad.partial").exists()
    assert "Traceback" not in result.output
    return result


def test_bad_input_exits_before_training(bases, tmp_path):
    lm = write_lm(tmp_path / "lm.jsonl")
    r = _fails(tmp_path, bases["bert"], "causal-lm", lm)
    assert r.exit_code == 2 and "bidirectional encoder: it cannot serve --task-type causal-lm" in r.output
    r = _fails(tmp_path, bases["gpt2"], "seq2seq", lm)
    assert r.exit_code == 2 and "unknown task type 'seq2seq'" in r.output
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"words": ["a"], "labels": ["O"]}) + "\n")
    r = _fails(tmp_path, bases["bert"], "token-classification", missing)
    assert r.exit_code == 7 and "tokens" in r.output, r.output
    tagged = write_tagged(tmp_path / "t.jsonl")
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"tokens": ["john", "sat"], "tags": ["B-XYZ", "O"]}) + "\n")
    r = CliRunner().invoke(app, ["train", "--task-type", "token-classification", "--task", "t", "--train-file",
                                 str(tagged), "--validation-file", str(outside), "--model", str(bases["bert"]),
                                 *FAST, "-o", str(tmp_path / "bad")])
    assert r.exit_code == 7 and "B-XYZ" in r.output, r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "say", "completion": ""}) + "\n")
    r = _fails(tmp_path, bases["gpt2"], "causal-lm", empty)
    assert r.exit_code == 7 and "completion" in r.output, r.output
    r = _fails(tmp_path, bases["gpt2"], "causal-lm", lm, "--text-fields", "text")
    assert r.exit_code == 2 and "--text-fields applies only to --task-type sequence-classification" in r.output


def test_readme_task_type_train_examples_run(tmp_path, monkeypatch):
    """The README's `train --task-type` lines, on tiny local models and data written here (shortened runs)."""
    import re
    import shlex
    from pathlib import Path

    from test_token_tasks import write_conll

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = re.findall(r"^diffprune (train --task-type .*)$", readme, flags=re.M)
    assert len(lines) == 2
    monkeypatch.chdir(tmp_path)
    make_base(tmp_path / "my-bert")
    make_gpt2(tmp_path / "my-gpt2")
    write_conll(tmp_path / "train.conll", TAGGED)
    write_conll(tmp_path / "dev.conll", TAGGED[:2])
    write_lm(tmp_path / "train.jsonl")
    write_lm(tmp_path / "dev.jsonl")
    for line in lines:
        args = shlex.split(line) + ["--fixmask-epochs", "1", "--batch-size", "2", "--max-seq-length", "32"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (line, result.output)
        out = args[args.index("-o") + 1]
        assert checkpoint.load(tmp_path / out).meta["task_type"] == args[args.index("--task-type") + 1]


def test_trains_pruner_in_a_plain_loop_gives_the_cli_l0_diff(bases, tmp_path):
    """l0: `train`'s own pruner (`DiffPruner.for_task_model`, flat buffers) driven by hand = the CLI's diff."""
    from diffcli import DiffPruner
    from diffcli.train_options import TrainOptions

    result, out, data = _train(tmp_path, bases["gpt2"], "causal-lm", write_lm, *METHOD["l0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["after_fixmask"]["epoch"] == 1
    kind = task_types.get("causal-lm")
    tdata = kind.load("t", train_file=data, validation_file=data)
    tm = kind.build(bases["gpt2"], tdata, 42)
    ds = kind.encode(tdata.train, tm.tokenizer, tdata.spec, 32)

    def batches(data_seed: int):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(data_seed)).tolist()
        return [ds.collate([ds[i] for i in order[j:j + 2]]) for j in range(0, len(order), 2)]

    opts = TrainOptions(method="l0", epochs=1, lr=1e-2, structured=False, fixmask_epochs=1, batch_size=2, fixmask_lr=2e-2,
                        sparsity=0.2, max_seq_length=32)
    steps = batches(42)  # the L0 epoch's order (seed), then the fixed epoch's (seed + 1)
    pruner = DiffPruner.for_task_model(tm, opts, torch.device("cpu"), len(steps), base_ref=str(bases["gpt2"]),
                                       flat=True)
    torch.manual_seed(42)
    tm.model.train()
    for batch in steps:
        pruner.begin()
        tm.model(**batch).loss.backward()
        pruner.finish()
    pruner.project()
    fixed = batches(43)
    pruner.start_fixed(total_steps=len(fixed))
    for batch in fixed:
        tm.model(**batch).loss.backward()
        pruner.fixed_step()
    lib, cli = pruner.export(), checkpoint.load(out)
    for name, td in cli.tensors.items():
        assert torch.equal(td.indices, lib.tensors[name].indices) and torch.equal(td.values, lib.tensors[name].values)


@pytest.mark.parametrize("method", ["l0", "fisher", "random", "magnitude"])
@pytest.mark.parametrize("kind_name, base, writer, auto", [
    ("token-classification", "bert", write_tagged, "AutoModelForTokenClassification"),
    ("causal-lm", "gpt2", write_lm, "AutoModelForCausalLM")])
def test_diffpruner_every_method_every_type_rebuilds_the_in_memory_model(bases, tmp_path, method, kind_name, base,
                                                                          writer, auto):
    import transformers

    from diffcli import DiffPruner
    from diffcli.applying import apply_to_folder

    kind = task_types.get(kind_name)
    data = kind.load("t", train_file=writer(tmp_path / "d.jsonl"))
    tm = kind.build(bases[base], data, 0)
    ds = kind.encode(data.train, tm.tokenizer, data.spec, 32)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    model = tm.model.train()
    opts = {"l0": dict(lr=1e-2, structured=False), "magnitude": dict(lr=1e-2)}.get(method, {})
    pruner = DiffPruner(model, bases[base], method=method, sparsity=0.2, fixmask_lr=2e-2, total_steps=4, **opts)
    if method == "l0":
        for _ in range(4):
            pruner.begin()
            model(**batch).loss.backward()
            pruner.finish()
        pruner.project()
    else:
        if method == "magnitude":  # your own dense steps; the mask ranks where they moved the model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for _ in range(2):
                opt.zero_grad()
                model(**batch).loss.backward()
                opt.step()
        pruner.choose_mask([batch])
    pruner.start_fixed(total_steps=8)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        pruner.fixed_step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    diff = pruner.export()
    apply_to_folder(str(bases[base]), diff, tmp_path / "merged")
    loaded = getattr(transformers, auto).from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=1e-5, atol=1e-5)


def test_trained_causal_lm_diff_packs_and_evaluates_with_its_gate(bases, tmp_path):
    """train → pack → eval: the diff's recorded task type picks the metric; `--min perplexity<=...` gates on it."""
    result, out, data = _train(tmp_path, bases["gpt2"], "causal-lm", write_lm, "--method", "random")
    assert result.exit_code == 0, result.output
    packed = tmp_path / "story.diff"
    assert CliRunner().invoke(app, ["pack", str(out), "-o", str(packed), "--values", "fp32"]).exit_code == 0
    ok = CliRunner().invoke(app, ["eval", str(bases["gpt2"]), str(packed), "--validation-file", str(data),
                                  "--min", "perplexity<=1000", "--json"])
    assert ok.exit_code == 0, ok.output
    assert "perplexity" in ok.stdout
    missed = CliRunner().invoke(app, ["eval", str(bases["gpt2"]), str(packed), "--validation-file", str(data),
                                      "--min", "perplexity<=1.0001"])
    assert missed.exit_code == 8, missed.output
