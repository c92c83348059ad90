"""Hard-concrete gate maths and the fused flat-buffer gate gradients of the L0 phase."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffcli.errors import InvalidValueError
from diffcli.gates import HardConcrete, expected_density, l0_penalty


def test_sampled_gate_lies_in_unit_interval_with_exact_zeros_and_ones():
    gate = HardConcrete()
    gen = torch.Generator().manual_seed(0)
    log_alpha = torch.linspace(-6, 6, 20000)
    z = gate.sample(log_alpha, gate.noise(log_alpha.shape, gen))
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    assert bool(((z >= 0) & (z <= 1)).all())
    assert 0 < int(((z > 0) & (z < 1)).sum()) < z.numel()


def test_deterministic_gate_values():
    gate = HardConcrete()
    la = torch.tensor([5.0, 0.0, -3.0, math.log(2.0)])
    z = gate.deterministic(la)
    # σ(5)·3 − 1.5 > 1 → 1;  σ(0)·3 − 1.5 = 0;  σ(log 2) = 2/3 → 0.5
    assert z.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.5], abs=1e-6)
    assert torch.equal(gate.deterministic(la), gate.deterministic(la))  # no sampling


def test_prob_nonzero_matches_monte_carlo_and_formula():
    gate = HardConcrete(l=-0.1, r=1.1, beta=2 / 3)
    la = torch.tensor([-1.0, 0.5, 2.0])
    expected = torch.sigmoid(la - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.allclose(gate.prob_nonzero(la), expected)
    gen = torch.Generator().manual_seed(1)
    draws = gate.sample(la.expand(200_000, 3), gate.noise((200_000, 3), gen))
    assert torch.allclose((draws > 0).float().mean(0), expected, atol=0.01)


def test_penalty_formula_plain_and_structured():
    gate = HardConcrete()  # l = −r → shift 0 → σ(log α)
    la = torch.tensor([5.0, 0.0, -2.0])
    lg = torch.tensor([1.0, 3.0])
    lam = 1.25e-7
    plain = l0_penalty(gate, la, None, lam)
    assert float(plain) == pytest.approx(lam * float(torch.sigmoid(la).sum()), rel=1e-6)
    both = l0_penalty(gate, la, lg, lam)
    assert float(both) == pytest.approx(lam * float(torch.sigmoid(la).sum() + torch.sigmoid(lg).sum()), rel=1e-6)
    # expected density of z·z_g: Σ_k p_g,k Σ_{i∈k} p_i / N, tensors of sizes 2 and 1
    p, pg = torch.sigmoid(la), torch.sigmoid(lg)
    want = (pg[0] * (p[0] + p[1]) + pg[1] * p[2]) / 3
    assert expected_density(gate, la, lg, [2, 1]) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("l,r,beta", [(0.1, 1.5, 1.0), (-1.5, 0.9, 1.0), (-1.5, 1.5, 0.0)])
def test_bad_gate_parameters_are_rejected(l, r, beta):
    with pytest.raises(InvalidValueError):
        HardConcrete(l, r, beta)


# ---------------------------------------------------------------------------------------------- fused gates

def _tiny_model(base, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2).eval()


def _gated(model, structured=True, seed=3):
    from diffcli.diffmodel import FlatParams, GatedDiff

    names = [n for n, _ in model.named_parameters() if not n.startswith("classifier")]
    flat = FlatParams(model, names, torch.device("cpu"))
    gd = GatedDiff(flat, HardConcrete(), log_alpha_init=5.0, structured=structured,
                   generator=torch.Generator().manual_seed(seed))
    return flat, gd, names


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 40, (4, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


def test_reparameterised_forward_equals_base_when_w_is_zero(tiny_base):
    ref = _tiny_model(tiny_base)
    model = _tiny_model(tiny_base)
    flat, gd, _ = _gated(model)
    gd.sample_()
    assert torch.equal(flat.theta, flat.theta0)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    gd.set_deterministic_()
    assert torch.equal(flat.theta, flat.theta0)


@pytest.mark.parametrize("structured,compiled", [(True, False), (False, False), (True, True)])
def test_fused_gate_gradients_match_autograd(tiny_base, structured, compiled, monkeypatch):
    """dL/dw, dL/dlog α and dL/dlog α_g from the hand-written flat passes (eager, or the torch.compile'd
    kernels used for big models) equal autograd on the plain formulas."""
    monkeypatch.setenv("DIFFPRUNE_COMPILE", "1" if compiled else "0")
    model = _tiny_model(tiny_base)
    flat, gd, names = _gated(model, structured)
    gate, lam = gd.gate, 3e-3
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # put gates in the interesting (non-saturated) region
        gd.w.copy_(torch.randn(flat.numel, generator=g) * 0.05)
        gd.log_alpha.copy_(torch.randn(flat.numel, generator=g) * 1.5 + 0.5)
        if structured:
            gd.group_log_alpha.copy_(torch.randn(len(names), generator=g) * 0.5 + 0.7)
    state = gd.generator.get_state()
    gd.sample_()
    flat.zero_grad()
    model(**_batch()).loss.backward()
    stats = gd.backward_(lam)
    assert (gd._kernels is not None) == compiled

    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    noise = gate.noise((flat.numel,), gen)
    w = gd.w.detach().clone().requires_grad_(True)
    la = gd.log_alpha.detach().clone().requires_grad_(True)
    z = gate.sample(la, noise)
    lg = None
    if structured:
        gnoise = gate.noise((len(names),), gen)
        lg = gd.group_log_alpha.detach().clone().requires_grad_(True)
        zg = gate.sample(lg, gnoise)
        z = z * torch.repeat_interleave(zg, torch.tensor(flat.sizes))
    theta = flat.theta0 + z * w
    params = {n: seg.view(s) for n, seg, s in zip(names, theta.split(flat.sizes), flat.shapes)}
    loss = torch.func.functional_call(model, params, args=(), kwargs=_batch()).loss
    (loss + l0_penalty(gate, la, lg, lam)).backward()

    assert _close(gd.w.grad, w.grad) and _close(gd.log_alpha.grad, la.grad)
    assert float(gd.w.grad.abs().sum()) > 0 and float(gd.log_alpha.grad.abs().sum()) > 0
    if structured:
        assert _close(gd.group_log_alpha.grad, lg.grad)
    assert stats["expected_density"] == pytest.approx(expected_density(gate, la, lg, flat.sizes), rel=1e-5)


def _close(got, want) -> bool:
    """Equal up to float32 summation order: 1e-4 relative, and 1e-6 of the gradient's largest entry absolute (an
    entry near zero is a difference of large terms, whose rounding no fixed atol bounds across CPUs)."""
    return torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_deterministic_delta_uses_eval_gates(tiny_base):
    model = _tiny_model(tiny_base)
    flat, gd, names = _gated(model)
    with torch.no_grad():
        gd.w.uniform_(-1, 1)
        gd.log_alpha.uniform_(-3, 3)
        gd.group_log_alpha.fill_(0.2)
    zg = gd.gate.deterministic(gd.group_log_alpha.detach())
    want = gd.gate.deterministic(gd.log_alpha.detach()) * torch.repeat_interleave(zg, torch.tensor(flat.sizes))
    assert torch.allclose(gd.delta(), want * gd.w.detach(), atol=1e-6)
    gd.set_deterministic_()
    assert torch.allclose(flat.theta, flat.theta0 + want * gd.w.detach(), atol=1e-6)
    assert gd.deterministic_density() == pytest.approx(float((want > 0).float().mean()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=12), st.integers(0, 2**31 - 1))
def test_segment_sums_match_per_tensor_sums(sizes, seed):
    from diffcli.diffmodel import SegmentSums

    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(sizes), generator=g)
    want = torch.stack([c.double().sum() for c in torch.split(flat, sizes)])
    got = SegmentSums(sizes, torch.device("cpu"))(flat)
    assert got.dtype == flat.dtype and got.shape == (len(sizes),)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
