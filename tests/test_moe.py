"""DeepSeekMoE (notebooks/06_moe.ipynb): gate and MoE equal to transformers, dispatch paths equal, balancing pieces."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv3_lite.moe as moe_mod
from dsv3_lite.config import ModelArgs
from dsv3_lite.moe import (
    Experts,
    Gate,
    MoE,
    expert_load,
    experts_loop,
    experts_sorted,
    sequence_balance_loss,
    update_bias,
)

hf_v3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
hf_v2 = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
from transformers import DeepseekV3Config  # noqa: E402

TINY = ModelArgs.preset("tiny")


def _sorted(weights, indices):
    order = indices.argsort(-1)
    return weights.gather(1, order), indices.gather(1, order)


def _args(E, G, M, k, shared=1, **kw):
    return TINY.replace(n_routed_experts=E, n_expert_groups=G, n_limited_groups=M, n_activated_experts=k,
                        n_shared_experts=shared, **kw)


ROUTINGS = [(8, 4, 2, 2), (16, 1, 1, 4), (64, 8, 4, 8), (12, 3, 1, 3), (32, 8, 3, 5)]


@pytest.mark.parametrize("E, G, M, k", ROUTINGS)
def test_gate_equals_transformers_router(E, G, M, k):
    torch.manual_seed(E + G)
    args = _args(E, G, M, k, dim=48)
    ours = Gate(args)
    hf = hf_v3.DeepseekV3TopkRouter(DeepseekV3Config(**args.to_hf_config()))
    with torch.no_grad():
        ours.weight.normal_(std=0.1)
        ours.bias.copy_(torch.randn(E) * 0.3 - 0.4)  # negative biased scores: the -inf group mask matters
        hf.weight.copy_(ours.weight)
        hf.e_score_correction_bias.copy_(ours.bias)
        x = torch.randn(301, 48)
        w, i = _sorted(*ours(x))
        _, w_hf, i_hf = hf(x)
        w_hf, i_hf = _sorted(w_hf, i_hf)
    assert torch.equal(i, i_hf)
    torch.testing.assert_close(w, w_hf, atol=1e-6, rtol=1e-6)


def test_softmax_gate_equals_transformers_v2_router():
    args = TINY.replace(score_func="softmax", gate_bias=False, route_scale=16.0, n_routed_experts=16,
                        n_expert_groups=4, n_limited_groups=2, n_activated_experts=3, dim=40)
    torch.manual_seed(0)
    ours = Gate(args)
    assert ours.bias is None
    hf = hf_v2.DeepseekV2TopkRouter(SimpleNamespace(
        num_experts_per_tok=3, num_experts=16, hidden_size=40, routed_scaling_factor=16.0,
        topk_method="group_limited_greedy", n_group=4, topk_group=2))
    with torch.no_grad():
        ours.weight.normal_(std=0.2)
        hf.weight.copy_(ours.weight)
        x = torch.randn(200, 40)
        w, i = _sorted(*ours(x))
        _, w_hf, i_hf = hf(x)
        w_hf, i_hf = _sorted(w_hf, i_hf)
    assert torch.equal(i, i_hf)
    torch.testing.assert_close(w, w_hf)
    assert not torch.allclose(w.sum(-1), torch.full((200,), 16.0))  # softmax weights are not renormalised


def test_group_limit_and_unbiased_weights():
    """Chosen experts lie in at most n_limited_groups groups; weights = route_scale * s / sum(s) over the chosen."""
    args = _args(64, 8, 3, 6, dim=32)
    torch.manual_seed(3)
    gate = Gate(args)
    with torch.no_grad():
        gate.bias.normal_(std=0.5)
        x = torch.randn(500, 32)
        w, i = gate(x)
        s = gate.scores(x)
    assert max(torch.unique(row // 8).numel() for row in i) <= 3
    chosen = s.gather(1, i)
    torch.testing.assert_close(w, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    # the bias changes the selection but not the formula of the weights
    assert not torch.equal(i.sort(-1).values, s.topk(6, -1).indices.sort(-1).values)


def test_bias_stays_float32_and_follows_device():
    gate = Gate(TINY)
    with torch.no_grad():
        gate.bias.fill_(2.0 + 1e-3)
    gate = gate.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.bias.dtype == torch.float32
    assert gate.bias[0].item() == pytest.approx(2.001, abs=1e-7)
    with torch.device("meta"):
        m = MoE(TINY)
    m.to_empty(device="cpu")
    assert m.gate.bias.device.type == "cpu" and m.gate.bias.dtype == torch.float32


@pytest.mark.parametrize("E, G, M, k, shared", [(8, 4, 2, 2, 1), (16, 1, 1, 4, 2), (64, 8, 4, 8, 2), (12, 3, 2, 3, 0)])
def test_moe_equals_transformers(E, G, M, k, shared):
    args = _args(E, G, M, k, shared=max(shared, 1), dim=64, moe_inter_dim=24)
    torch.manual_seed(E)
    ours = MoE(args)
    cfg = DeepseekV3Config(**args.to_hf_config())
    cfg._experts_implementation = "eager"
    hf = hf_v3.DeepseekV3MoE(cfg)
    with torch.no_grad():
        ours.gate.weight.normal_(std=0.1)
        ours.gate.bias.normal_(std=0.1)
        hf.gate.weight.copy_(ours.gate.weight)
        hf.gate.e_score_correction_bias.copy_(ours.gate.bias)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], 1))
        hf.experts.down_proj.copy_(ours.experts.w2)
        for a, b in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            getattr(hf.shared_experts, b).weight.copy_(getattr(ours.shared_experts, a).weight)
        x = torch.randn(2, 37, 64)
        torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)


def test_no_shared_experts():
    m = MoE(TINY.replace(n_shared_experts=0))
    assert m.shared_experts is None
    x = torch.randn(3, TINY.dim)
    with torch.no_grad():
        w, i = m.gate(x)
        torch.testing.assert_close(m(x), experts_loop(x, w, i, m.experts.w1, m.experts.w2, m.experts.w3))


@settings(max_examples=20, deadline=None)
@given(N=st.integers(1, 70), E=st.integers(1, 20), k=st.integers(1, 4), D=st.integers(1, 24), I=st.integers(1, 24),
       seed=st.integers(0, 999), fallback=st.booleans())
def test_sorted_dispatch_equals_loop(N, E, k, D, I, seed, fallback):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    idx = torch.rand(N, E, generator=g).topk(k, -1).indices
    w = torch.rand(N, k, generator=g)
    w1, w3, w2 = torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g), torch.randn(E, D, I, generator=g)
    ok = moe_mod._grouped_mm_ok
    try:
        if fallback:
            moe_mod._grouped_mm_ok = lambda a, w: False
        torch.testing.assert_close(experts_sorted(x, w, idx, w1, w2, w3), experts_loop(x, w, idx, w1, w2, w3),
                                   atol=1e-4, rtol=1e-4)
    finally:
        moe_mod._grouped_mm_ok = ok


def test_sorted_dispatch_gradients_equal_loop():
    g = torch.Generator().manual_seed(5)
    N, E, k, D, I = 33, 16, 4, 24, 20
    x = torch.randn(N, D, generator=g)
    idx = torch.rand(N, E, generator=g).topk(k, -1).indices
    leaves = [x, torch.rand(N, k, generator=g), torch.randn(E, I, D, generator=g), torch.randn(E, D, I, generator=g),
              torch.randn(E, I, D, generator=g)]
    for t in leaves:
        t.requires_grad_()
    x, w, w1, w2, w3 = leaves
    ga = torch.autograd.grad(experts_loop(x, w, idx, w1, w2, w3).pow(2).sum(), leaves)
    gb = torch.autograd.grad(experts_sorted(x, w, idx, w1, w2, w3).pow(2).sum(), leaves)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_expert_load_and_bias_update():
    load = expert_load(torch.tensor([[0, 2], [2, 3], [2, 0]]), 5)
    assert load.tolist() == [2, 0, 3, 1, 0]
    bias = torch.zeros(5)
    update_bias(bias, load, gamma=1e-3)  # mean load 1.2
    assert bias.tolist() == pytest.approx([-1e-3, 1e-3, -1e-3, 1e-3, 1e-3])
    update_bias(bias, torch.full((5,), 4), gamma=1e-3)  # balanced: no change
    assert bias.tolist() == pytest.approx([-1e-3, 1e-3, -1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match=r"bias.shape = \(5,\) must equal load.shape = \(4,\)"):
        update_bias(bias, torch.ones(4))


def test_bias_updates_balance_a_skewed_stream():
    args = _args(16, 4, 2, 2, dim=32)
    torch.manual_seed(0)
    gate = Gate(args)
    with torch.no_grad():
        gate.weight.normal_(std=0.15)
    drift, g = torch.randn(32), torch.Generator().manual_seed(0)
    vio = []
    for _ in range(250):
        _, idx = gate(torch.randn(1024, 32, generator=g) + drift)
        load = expert_load(idx, 16)
        vio.append((load.max() / load.float().mean() - 1).item())
        update_bias(gate.bias, load, gamma=1e-3)
    assert vio[0] > 1.0 and sum(vio[-30:]) / 30 < 0.3


def test_sequence_balance_loss_against_equations():
    torch.manual_seed(0)
    B, T, E, k = 3, 11, 8, 2
    s = torch.rand(B, T, E, requires_grad=True)
    idx = s.detach().topk(k, -1).indices
    loss = sequence_balance_loss(s, idx, alpha=1e-4)
    ref = 0.0
    for b in range(B):  # eqs. 17-20 written as loops
        for i in range(E):
            f = E / (k * T) * sum(int(i in idx[b, t].tolist()) for t in range(T))
            P = sum((s[b, t, i] / s[b, t].sum()).item() for t in range(T)) / T
            ref += 1e-4 * f * P / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert s.grad.abs().sum() > 0
    uniform = sequence_balance_loss(torch.full((1, 16, 8), 0.3), torch.arange(32).remainder(8).view(1, 16, 2))
    assert uniform.item() == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="must be \\[B, T, E\\]"):
        sequence_balance_loss(torch.rand(4, 8), torch.zeros(4, 2, dtype=torch.long))


def test_bad_input():
    # Gate and MoE do not re-check their input on every call: the model checks its tokens once, at the boundary
    # (Transformer.hidden, tests/test_model.py)
    with pytest.raises(ValueError, match="impl = 'fast' is not allowed"):
        Experts(4, 8, 8)(torch.randn(2, 8), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), impl="fast")


@pytest.mark.parametrize("N, E, k", [(1, 16, 4), (3, 8, 2), (2, 64, 8)])
def test_experts_few_equals_loop_and_is_used_for_decoding(N, E, k, monkeypatch):
    from dsv3_lite.moe import experts_few
    g = torch.Generator().manual_seed(N + E)
    ex = Experts(E, 24, 40, init_std=0.1)
    x, w = torch.randn(N, 24, generator=g), torch.rand(N, k, generator=g)
    i = torch.rand(N, E, generator=g).topk(k, dim=-1).indices
    ref = experts_loop(x, w, i, ex.w1, ex.w2, ex.w3)
    assert (experts_few(x, w, i, ex.w1, ex.w2, ex.w3) - ref).abs().max().item() < 1e-5
    calls = []
    monkeypatch.setattr(moe_mod, "experts_few", lambda *a: calls.append(1) or experts_loop(*a))
    with torch.no_grad():
        ex(x, w, i)
    ex(x, w, i)                       # with gradients: the sorted dispatch
    assert calls == [1]
