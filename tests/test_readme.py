"""The README's library example runs as written (on the bundled MiniLM with two random diffs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _random_task_diff(num_labels: int, seed: int):
    import torch

    from diffcli.extract import diff_between
    from diffcli.projection import project
    from diffcli.weights import WeightStore, load_config, resolve_model

    folder = resolve_model("minilm")
    store = WeightStore(folder)
    g = torch.Generator().manual_seed(seed)
    target = {f"bert.{n}": t + torch.randn(t.shape, generator=g) * 0.01 for n, t in store.items()
              if t.is_floating_point()}
    hidden = load_config(folder)["hidden_size"]
    target["classifier.weight"] = torch.randn(num_labels, hidden, generator=g) * 0.02
    target["classifier.bias"] = torch.zeros(num_labels)
    config = {**load_config(folder), "architectures": ["BertForSequenceClassification"],
              "id2label": {str(i): f"L{i}" for i in range(num_labels)},
              "label2id": {f"L{i}": i for i in range(num_labels)}}
    return project(diff_between(store, target, config=config, base_ref="minilm"), 0.005).diff


@pytest.mark.integration
def test_readme_bank_example_runs(tmp_path, monkeypatch, capsys):
    from diffcli import artifact

    artifact.write(_random_task_diff(2, 0), tmp_path / "rte.diff")
    artifact.write(_random_task_diff(3, 1), tmp_path / "mnli.diff")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "DiffBank" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["rte", "mnli", "rte"]


@pytest.mark.integration
def test_readme_training_api_examples_run(tmp_path, monkeypatch, capsys):
    """The own-loop DiffPruner example, then the Trainer callback example (it reuses the first one's data)."""
    from diffcli import checkpoint
    from diffcli.projection import budget

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    own = next(b for b in blocks if "DiffPruner(" in b)
    hf = next(b for b in blocks if "DiffPruningCallback(" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(own, "README.md", "exec"), scope)
    exec(compile(hf, "README.md", "exec"), scope)
    for name in ("own-loop", "trainer"):
        diff = checkpoint.load(tmp_path / name)
        assert 0 < diff.nnz <= budget(0.005, diff.budget_numel)
        assert sorted(diff.extras) == ["classifier.bias", "classifier.weight"]


@pytest.mark.integration
def test_readme_swr_and_basis_api_example_runs(tmp_path, monkeypatch, capsys):
    """The swr/basis own-loop example (it continues the first training example): both diffs save and pack."""
    from diffcli import artifact, checkpoint

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    own = next(b for b in blocks if "DiffPruner(" in b)
    methods = next(b for b in blocks if 'method="swr"' in b or '("swr"' in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(own, "README.md", "exec"), scope)
    exec(compile(methods, "README.md", "exec"), scope)
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "swr" in printed and "basis" in printed
    swr, basis = checkpoint.load(tmp_path / "own-loop-swr"), checkpoint.load(tmp_path / "own-loop-basis")
    assert any(td.is_lowrank for td in swr.tensors.values()) and 0 < swr.nnz <= round(0.01 * swr.budget_numel)
    scales = sum(bs.nkept for bs in basis.bases.values())
    assert scales > 0 and basis.nnz - scales == round(0.001 * basis.budget_numel)
    for diff in (swr, basis):
        assert artifact.loads(artifact.pack(diff, "fp32")).nnz == diff.nnz


def test_the_readmes_benchmark_progress_is_the_committed_tables():
    """A figure the README quotes comes from a results file: the runs each table holds, as its JSON counts them."""
    import json

    text = " ".join(README.read_text(encoding="utf-8").split())
    results = README.parent / "bench" / "results"
    quality = json.loads((results / "quality-v2.json").read_text())["progress"]
    methods = json.loads((results / "methods-v2.json").read_text())["progress"]
    held = re.search(r"`bench/results/quality-v2\.md`.*? it holds (\d+) of its (\d+) runs", text)
    counted = re.search(r"`bench/results/methods-v2\.md`\); so far (\d+) of its (\d+) full-protocol runs", text)
    assert held and counted, "the README's quality paragraph no longer says how many runs each table holds"
    assert (int(held[1]), int(held[2])) == (quality["finished"], quality["planned"])
    assert (int(counted[1]), int(counted[2])) == (methods["finished"], methods["planned"])


QUALITY_ROWS = {"full finetuning": "full", "LoRA q,v r=8": "lora-qv", "LoRA all-linear (.diff bytes)": "lora-all",
                "BitFit": "bitfit", "head only": "head", "diffprune 0.5%, L0 mask (`--method l0`)": "dp-l0",
                "diffprune 0.5%, magnitude mask (the default)": "dp-magnitude",
                "diffprune 0.5%, random mask": "dp-random", "diffprune 0.5%, Fisher mask": "dp-fisher"}
TRAINER = {"dp-l0": "l0", "dp-magnitude": "magnitude", "dp-random": "random", "dp-fisher": "fisher"}


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def test_the_readmes_quality_table_and_the_trainers_default_are_the_committed_tables():
    """Every score and file size the README's quality table quotes is the JSON's, and `train`'s default method is the
    mask the table's rule chose: when a rerun changes the verdict, this fails until the default follows it."""
    import json
    import statistics

    from diffcli.train_options import TrainOptions

    report = json.loads((README.parent / "bench" / "results" / "quality-v2.json").read_text())
    table, tasks = report["table"], ("rte", "mrpc", "stsb", "cola")
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in QUALITY_ROWS:
            rows[QUALITY_ROWS[cells[0]]] = cells[1:]
    assert set(rows) == set(QUALITY_ROWS.values()), "the README's quality table lost a method"
    for method, cells in rows.items():
        means = [table[t][method]["mean"] for t in tasks]
        want = [f"{m:.2f}" for m in means] + [f"{statistics.mean(means):.2f}", _size(table["rte"][method]["bytes"])]
        assert cells == want, (method, cells, want)
    chosen = report["default_mask"]["mask"]
    assert chosen in TRAINER and TrainOptions().method == TRAINER[chosen]
    assert "mask (the default)" in next(k for k, v in QUALITY_ROWS.items() if v == chosen)
    text = " ".join(README.read_text(encoding="utf-8").split())
    mag, l0 = table["cola"]["dp-magnitude"], table["cola"]["dp-l0"]
    [(_, m_s), *_] = mag["train_seconds_by_machine"]
    [(_, l_s), *_] = l0["train_seconds_by_machine"]
    cost = (f"it trained in {m_s / 60:.1f} min at {mag['peak_rss_bytes'] / 1e6:.2f} MB peak RSS against the L0 mask's "
            f"{l_s / 60:.1f} min and {l0['peak_rss_bytes'] / 1e6:.2f} MB")
    assert cost in text, cost
    gpu = (f"it peaked at {table['stsb']['dp-magnitude']['cuda_peak_allocated'] / 1e6:.2f} MB of cuda memory against "
           f"{table['stsb']['dp-l0']['cuda_peak_allocated'] / 1e6:.2f} MB")
    assert gpu in text, gpu
    gaps = report["cheaper_masks_vs_l0"]
    assert f"the magnitude mask {abs(gaps['dp-magnitude']):.2f} pt behind" in text
    assert f"{abs(gaps['dp-random']):.2f} pt on the average" in text and f"{abs(gaps['dp-fisher']):.2f} pt behind L0" in text
