"""DiffBank: exact task switching on one shared encoder, per-task heads, base checks and misuse errors."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from conftest import make_base, make_finetune
from diffcli import checkpoint
from diffcli.bank import DiffBank
from diffcli.diff import Diff
from diffcli.errors import BaseMismatchError, InvalidValueError
from diffcli.extract import extract_diff
from diffcli.projection import project


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    base = make_base(root / "base")
    diffs = {}
    for name, seed, labels in (("a", 1, 2), ("b", 2, 3)):
        ft = make_finetune(base, root / f"ft_{name}", seed=seed, num_labels=labels)
        diffs[name] = project(extract_diff(str(base), str(ft)), 0.05).diff
        checkpoint.save(diffs[name], root / f"{name}.ckpt")
    return root, base, diffs


def _batch():
    torch.manual_seed(0)
    return {"input_ids": torch.randint(5, 40, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point()
                                                 else a[k], b[k].view(-1).view(torch.uint8)
                                                 if b[k].is_floating_point() else b[k]) for k in a)


def test_logits_match_the_applied_folder(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from diffcli.applying import apply_to_folder

    root, base, diffs = setup
    bank = DiffBank(str(base), device="cpu")
    bank.add("a", root / "a.ckpt")
    bank.add("b", root / "b.ckpt")
    batch = _batch()
    for name, labels in (("a", 2), ("b", 3), ("a", 2)):
        out = tmp_path / f"merged_{name}"
        if not out.exists():
            apply_to_folder(str(base), diffs[name], out)
        ref = AutoModelForSequenceClassification.from_pretrained(out).eval()
        with bank.use(name) as model, torch.no_grad():
            got = model(**batch).logits
            assert got.shape == (3, labels)
            assert model.config.num_labels == labels
        with torch.no_grad():
            torch.testing.assert_close(got, ref(**batch).logits, rtol=0, atol=1e-6)


def test_any_switch_sequence_restores_the_base_bit_for_bit(setup):
    root, base, diffs = setup
    bank = DiffBank(str(base), device="cpu")
    original = _snapshot(bank.encoder)
    bank.add("a", diffs["a"])
    bank.add("b", diffs["b"])
    with bank.use("a"):
        applied_a = _snapshot(bank.encoder)
    assert not _bit_equal(applied_a, original)  # the diff really changed the encoder
    rng = random.Random(0)
    for _ in range(40):
        choice = rng.choice(["a", "b", "reset"])
        if choice == "reset":
            bank.reset()
            assert bank.active is None
            assert _bit_equal(_snapshot(bank.encoder), original)
        else:
            with bank.use(choice):
                assert bank.active == choice
                if choice == "a":
                    assert _bit_equal(_snapshot(bank.encoder), applied_a)
    bank.reset()
    assert _bit_equal(_snapshot(bank.encoder), original)


def test_tasks_share_one_encoder_and_hold_only_their_diff(setup):
    root, base, diffs = setup
    bank = DiffBank(str(base), device="cpu")
    bank.add("a", diffs["a"])
    bank.add("b", diffs["b"])
    with bank.use("a") as ma:
        pass
    with bank.use("b") as mb:
        pass
    assert ma is not mb
    assert ma.base_model is bank.encoder and mb.base_model is bank.encoder
    assert ma.classifier.weight.shape[0] == 2 and mb.classifier.weight.shape[0] == 3
    enc = bank.encoder_nbytes()
    for name in ("a", "b"):
        held = bank.task_nbytes(name)
        assert held >= diffs[name].nnz * 12  # int64 position + float32 value per entry
        assert held < 0.3 * enc


def test_diff_with_bare_encoder_names_applies_to_the_task_model(setup):
    root, base, diffs = setup
    d = diffs["a"]
    bare = Diff({k.removeprefix("bert."): v for k, v in d.tensors.items()}, d.extras, d.config, d.base_ref,
                d.base_fingerprint, d.meta)
    bank = DiffBank(str(base), device="cpu")
    bank.add("prefixed", d)
    bank.add("bare", bare)
    batch = _batch()
    with torch.no_grad():
        with bank.use("prefixed") as m:
            want = m(**batch).logits
        with bank.use("bare") as m:
            got = m(**batch).logits
    assert torch.equal(got, want)


def test_nesting_same_task_is_fine_and_another_is_refused(setup):
    root, base, diffs = setup
    bank = DiffBank(str(base), device="cpu")
    bank.add("a", diffs["a"])
    bank.add("b", diffs["b"])
    with bank.use("a") as outer:
        with bank.use("a") as inner:
            assert inner is outer
        with pytest.raises(InvalidValueError, match="inside `bank.use\\('a'\\)`"):
            with bank.use("b"):
                pass
        assert bank.active == "a"
        with pytest.raises(InvalidValueError, match="in use"):
            bank.reset()
    with bank.use("b"):
        assert bank.active == "b"


def test_bad_inputs(setup, tmp_path):
    root, base, diffs = setup
    bank = DiffBank(str(base), device="cpu")
    bank.add("a", diffs["a"])
    with pytest.raises(InvalidValueError, match="already in the bank"):
        bank.add("a", diffs["b"])
    with pytest.raises(InvalidValueError, match="no task 'zzz'"):
        with bank.use("zzz"):
            pass
    # a diff made on another base
    other = make_base(tmp_path / "other", seed=5)
    foreign = project(extract_diff(str(other), str(make_finetune(other, tmp_path / "ft_o"))), 0.05).diff
    with pytest.raises(BaseMismatchError, match="another base"):
        bank.add("foreign", foreign)
    # a head that does not fit the config's number of labels
    d = diffs["b"]
    misfit = replace(d, config={**d.config, "num_labels": 2,
                                "id2label": {"0": "x", "1": "y"}, "label2id": {"x": 0, "y": 1}})
    with pytest.raises(BaseMismatchError, match="head does not fit"):
        bank.add("misfit", misfit)
    # no head at all
    headless = replace(d, extras={})
    with pytest.raises(InvalidValueError, match="no task head"):
        bank.add("headless", headless)
    assert bank.tasks == ["a"]


def test_encoder_extras_go_through_apply_and_revert(tmp_path):
    """A base saved without a pooler: the finetune's pooler is an extra that lands in the shared encoder."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertModel

    from conftest import tiny_config, write_vocab
    from diffcli.applying import apply_to_folder

    torch.manual_seed(0)
    base = tmp_path / "nopool"
    BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(base)
    write_vocab(base)
    diff = project(extract_diff(str(base), str(make_finetune(base, tmp_path / "ft"))), 0.05).diff
    assert any("pooler" in k for k in diff.extras)
    bank = DiffBank(str(base), device="cpu")
    original = _snapshot(bank.encoder)
    bank.add("t", diff)
    apply_to_folder(str(base), diff, tmp_path / "merged")
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = _batch()
    with bank.use("t") as model, torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=0, atol=1e-6)
    bank.reset()
    assert _bit_equal(_snapshot(bank.encoder), original)


def test_moving_the_encoder_behind_the_banks_back_is_refused(setup):
    root, base, diffs = setup
    bank = DiffBank(str(base), device="cpu")
    bank.add("a", diffs["a"])
    bank.add("b", diffs["b"])
    with bank.use("a"):
        pass
    bank.encoder.double()  # re-cast: parameters no longer alias the bank's flat buffers
    with pytest.raises(InvalidValueError, match="moved or re-cast"):
        with bank.use("b"):
            pass


def test_default_device_is_the_shared_pick_cuda_when_present(setup, monkeypatch):
    import diffcli.prediction as prediction

    _root, base, _diffs = setup
    calls = []

    def spy():
        calls.append(1)
        return torch.device("cpu")

    monkeypatch.setattr(prediction, "pick_device", spy)
    bank = DiffBank(str(base))
    assert calls == [1] and bank.device == torch.device("cpu")
    assert all(p.device == bank.device for p in bank.encoder.parameters())
    assert DiffBank(str(base), device="cpu").device == torch.device("cpu") and calls == [1]


@pytest.mark.parametrize("values", ["int4", "ternary"])
def test_quantized_files_add_in_float32_through_apply_and_the_bank(setup, tmp_path, values):
    """A quantized .diff dequantizes to float32 on load; apply and the bank add it to the base in float32."""
    from safetensors.torch import load_file

    from diffcli import artifact
    from diffcli.applying import apply_to_folder

    root, base, diffs = setup
    packed = tmp_path / f"a-{values}.diff"
    artifact.write(diffs["a"], packed, values=values)
    loaded = artifact.load(packed)
    name, td = next((n, t) for n, t in sorted(loaded.tensors.items()) if t.nnz and t.dtype == "float32")
    assert td.values.dtype == torch.float32
    err = artifact.read_header(packed)["values"]["max_abs_error"]
    assert 0 < err and torch.allclose(td.values, diffs["a"].tensors[name].sparse().values, rtol=0, atol=err * 1.0001)
    out = tmp_path / "merged"
    apply_to_folder(str(base), packed, out)
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    base_w = {}
    for shard in base.glob("*.safetensors"):
        base_w.update(load_file(shard))
    expected = (base_w[td.base_name].float() + td.dense()).to(base_w[td.base_name].dtype)
    key = next(k for k in merged if k.endswith(td.base_name))
    assert torch.equal(merged[key], expected)
    bank = DiffBank(str(base), device="cpu")
    bank.add("q", packed)
    with bank.use("q"):
        state = bank.encoder.state_dict()
        bank_key = next(k for k in state if td.base_name.endswith(k) or k.endswith(td.base_name))
        assert torch.equal(state[bank_key], expected)


@pytest.mark.parametrize("base_dtype, head_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_head_saved_in_another_dtype_runs_in_the_shared_encoders(tmp_path, base_dtype, head_dtype):
    """A finetune saved in bf16 on an fp32 base (or the reverse): the head is cast to the encoder's dtype, so the
    task model runs, and scores as the applied folder loaded in that dtype (the head's cast is the only rounding)."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, BertModel

    from diffcli.applying import apply_to_folder
    from conftest import write_vocab

    base = make_base(tmp_path / "base32")
    if base_dtype != torch.float32:
        BertModel.from_pretrained(base).to(base_dtype).save_pretrained(tmp_path / "base")
        write_vocab(tmp_path / "base")
        base = tmp_path / "base"
    ft = BertForSequenceClassification.from_pretrained(make_finetune(base, tmp_path / "ft32"), dtype=torch.float32)
    ft.to(head_dtype).save_pretrained(tmp_path / "ft")
    write_vocab(tmp_path / "ft")
    diff = project(extract_diff(str(base), str(tmp_path / "ft")), 0.05).diff
    assert diff.extras["classifier.weight"].dtype == head_dtype
    bank = DiffBank(str(base), device="cpu")
    bank.add("t", diff)
    apply_to_folder(str(base), diff, tmp_path / "merged")
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=base_dtype).eval()
    with bank.use("t") as model, torch.no_grad():
        assert model.classifier.weight.dtype == base_dtype
        got = model(**_batch()).logits
        want = ref(**_batch()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
