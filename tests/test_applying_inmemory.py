"""apply_/revert_ on live models: correct result, bit-for-bit undo, name prefixes, heads, refusals."""

from __future__ import annotations

import random

import pytest

from conftest import make_base, make_finetune
from diffcli import applying
from diffcli.applying import apply_, apply_to_folder, revert_
from diffcli.errors import BaseMismatchError, FormatError, InvalidValueError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One base, three task diffs (two pruned, one dense), a bare-encoder diff and a misfit base."""
    import torch
    from transformers import BertModel

    from diffcli.extract import extract_diff
    from diffcli.projection import project

    root = tmp_path_factory.mktemp("inmem")
    base = make_base(root / "base")
    diffs = []
    for seed, density in ((1, 0.01), (2, 0.05), (3, None)):
        ft = make_finetune(base, root / f"ft{seed}", seed=seed)
        d = extract_diff(str(base), str(ft))
        diffs.append(project(d, density).diff if density else d)
    torch.manual_seed(7)  # a finetune of the bare encoder: target names carry no `bert.` prefix
    bare = BertModel.from_pretrained(base)
    with torch.no_grad():
        for p in bare.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    bare.save_pretrained(root / "bare_ft")
    bare_diff = project(extract_diff(str(base), str(root / "bare_ft")), 0.02).diff
    return {"root": root, "base": base, "diffs": diffs, "bare_diff": bare_diff,
            "three": make_finetune(base, root / "ft3labels", seed=4, num_labels=3),
            "misfit": make_base(root / "misfit", intermediate_size=48)}


def _cls(folder, **kw):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(folder, **kw).eval()


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits_equal(model, snap) -> bool:
    """Exact equality of every state tensor, comparing raw bytes (so -0.0 ≠ +0.0 and shapes must agree)."""
    import torch

    state = model.state_dict()
    if set(state) != set(snap):
        return False
    for k, v in state.items():
        w = snap[k]
        if v.shape != w.shape or v.dtype != w.dtype:
            return False
        if not torch.equal(v.contiguous().view(-1).view(torch.uint8), w.contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def _logits(model):
    import torch

    ids = torch.tensor([[2, 10, 20, 30, 40, 3], [2, 5, 6, 7, 3, 0]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).logits


def test_apply_matches_folder_apply_and_revert_is_exact(env, tmp_path):
    import torch

    model = _cls(env["base"], num_labels=2)
    snap = _snapshot(model)
    for diff in env["diffs"]:
        handle = apply_(model, diff)
        apply_to_folder(env["base"], diff, tmp_path / "out", force=True)
        torch.testing.assert_close(_logits(model), _logits(_cls(tmp_path / "out")), rtol=0, atol=0)
        assert not _bits_equal(model, snap)
        revert_(model, handle)
        assert _bits_equal(model, snap)


def test_random_apply_revert_sequences_restore_bits(env):
    """Stacks of diffs applied (check=False on top of one another) and reverted in LIFO order."""
    model = _cls(env["base"], num_labels=2)
    snaps = [_snapshot(model)]
    stack = []
    rng = random.Random(0)
    for _step in range(40):
        if stack and (len(stack) >= 3 or rng.random() < 0.5):
            revert_(model, stack.pop())
            snaps.pop()
            assert _bits_equal(model, snaps[-1])
        else:
            diff = rng.choice(env["diffs"] + [env["bare_diff"]])  # prefixed and bare target names mixed
            stack.append(apply_(model, diff, check=not stack))
            snaps.append(_snapshot(model))
    while stack:
        revert_(model, stack.pop())
    assert _bits_equal(model, snaps[0])


def test_check_refuses_a_model_that_is_not_the_base(env):
    model = _cls(env["base"], num_labels=2)
    handle = apply_(model, env["diffs"][0])
    snap = _snapshot(model)
    with pytest.raises(BaseMismatchError, match=r"tensors differ from the base the diff was made on, first "):
        apply_(model, env["diffs"][1])
    assert _bits_equal(model, snap)  # refused before touching anything
    revert_(model, handle)


def test_bare_encoder_model_with_prefixed_diff(env):
    """The live model is a bare BertModel; the diff's names carry `bert.` and it has a classifier head."""
    from transformers import BertModel

    model = BertModel.from_pretrained(env["base"]).eval()
    snap = _snapshot(model)
    diff = env["diffs"][0]
    with pytest.raises(BaseMismatchError, match="no tensor for the diff's extra classifier"):
        apply_(model, diff)
    assert _bits_equal(model, snap)
    handle = apply_(model, diff, strict=False)
    assert sorted(handle.skipped) == ["classifier.bias", "classifier.weight"]
    assert handle.names["bert.encoder.layer.0.output.dense.weight"] == "encoder.layer.0.output.dense.weight"
    td = diff.tensors["bert.encoder.layer.0.output.dense.weight"]
    base_w = snap["encoder.layer.0.output.dense.weight"]
    assert bool((model.encoder.layer[0].output.dense.weight.detach().reshape(-1)[td.indices]
                 == (base_w.reshape(-1)[td.indices] + td.values)).all())
    revert_(model, handle)
    assert _bits_equal(model, snap)


def test_classification_model_with_bare_diff(env):
    """The live model prefixes `bert.`; the diff was made on a bare encoder."""
    import torch

    model = _cls(env["base"], num_labels=2)
    snap = _snapshot(model)
    diff = env["bare_diff"]
    handle = apply_(model, diff)
    assert handle.names["encoder.layer.1.attention.self.key.weight"] == "bert.encoder.layer.1.attention.self.key.weight"
    for name, td in diff.tensors.items():
        key = handle.names[name]
        want = (snap[key].float() + td.dense()).to(snap[key].dtype)
        assert torch.equal(model.state_dict()[key], want), key
    assert torch.equal(model.classifier.weight, snap["classifier.weight"])  # no extras: head untouched
    revert_(model, handle)
    assert _bits_equal(model, snap)


def test_head_with_other_label_count_is_replaced_wholesale(env):
    from diffcli.extract import extract_diff

    model = _cls(env["base"], num_labels=2)
    snap = _snapshot(model)
    diff3 = extract_diff(str(env["base"]), str(env["three"]))
    handle = apply_(model, diff3)
    assert tuple(model.classifier.weight.shape) == (3, 32) and _logits(model).shape == (2, 3)
    revert_(model, handle)
    assert tuple(model.classifier.weight.shape) == (2, 32)
    assert _bits_equal(model, snap)


def test_shape_misfit_is_refused_untouched(env):
    model = _cls(env["misfit"], num_labels=2)
    snap = _snapshot(model)
    with pytest.raises(BaseMismatchError, match=r"has shape \[48\], diff expects \[64\]"):
        apply_(model, env["diffs"][0], check=False)
    assert _bits_equal(model, snap)


def test_failure_midway_rolls_back(env, monkeypatch):
    model = _cls(env["base"], num_labels=2)
    snap = _snapshot(model)

    def broken(p, t):
        raise RuntimeError("device lost")

    monkeypatch.setattr(applying, "_load_extra", broken)  # every δ is applied before the head fails
    with pytest.raises(RuntimeError, match="device lost"):
        apply_(model, env["diffs"][0])
    assert _bits_equal(model, snap)


def test_nan_in_diff_is_refused_untouched(env):
    import copy

    model = _cls(env["base"], num_labels=2)
    snap = _snapshot(model)
    diff = copy.copy(env["diffs"][0])
    diff.tensors = dict(diff.tensors)
    name = "bert.encoder.layer.1.output.dense.weight"
    td = copy.copy(diff.tensors[name])
    td.values = td.values.clone()
    td.values[-1] = float("inf")
    diff.tensors[name] = td
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        apply_(model, diff)
    assert _bits_equal(model, snap)


def test_fp16_model_overflow_rolls_back(env):
    import copy

    import torch

    model = _cls(env["base"], num_labels=2).half()
    snap = _snapshot(model)
    diff = copy.copy(env["diffs"][1])
    diff.tensors = dict(diff.tensors)
    name = list(diff.tensors)[-1]  # the last δ overflows fp16, after the others were applied
    td = copy.copy(diff.tensors[name])
    td.values = torch.full_like(td.values, 1e6)
    diff.tensors[name] = td
    with pytest.raises(InvalidValueError, match="overflows float16"):
        apply_(model, diff, check=False)
    assert _bits_equal(model, snap)


def test_revert_misuse(env):
    model = _cls(env["base"], num_labels=2)
    other = _cls(env["base"], num_labels=2)
    handle = apply_(model, env["diffs"][0])
    with pytest.raises(InvalidValueError, match="another model"):
        revert_(other, handle)
    revert_(model, handle)
    with pytest.raises(InvalidValueError, match="already reverted"):
        revert_(model, handle)
