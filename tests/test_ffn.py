"""SwiGLU FFN (notebooks/05_ffn.ipynb): equal to transformers' DeepseekV3MLP, the formula, gradients, bad sizes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lite.ffn import MLP

DeepseekV3MLP = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3").DeepseekV3MLP


def _hf_copy(ours: MLP) -> torch.nn.Module:
    cfg = SimpleNamespace(hidden_size=ours.dim, intermediate_size=ours.inter_dim, hidden_act="silu")
    hf = DeepseekV3MLP(cfg).to(ours.w1.weight.dtype)
    hf.load_state_dict({"gate_proj.weight": ours.w1.weight, "up_proj.weight": ours.w3.weight,
                        "down_proj.weight": ours.w2.weight})
    return hf


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 9), D=st.integers(1, 40), I=st.integers(1, 70), seed=st.integers(0, 99))
def test_equals_transformers_float32(B, S, D, I, seed):
    torch.manual_seed(seed)
    ours = MLP(D, I)
    x = torch.randn(B, S, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _hf_copy(ours)(x), atol=1e-6, rtol=1e-5)


def test_equals_transformers_bfloat16_bitwise():
    torch.manual_seed(0)
    ours = MLP(96, 257).bfloat16()
    x = torch.randn(2, 13, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), _hf_copy(ours)(x))


def test_formula_and_names():
    """w1 is the gate (inside SiLU), w3 the value, w2 maps back: swapping w1 and w3 changes the result."""
    torch.manual_seed(1)
    m = MLP(8, 5)
    x = torch.randn(4, 8)
    w1, w2, w3 = m.w1.weight, m.w2.weight, m.w3.weight
    with torch.no_grad():
        torch.testing.assert_close(m(x), (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T)
        assert not torch.allclose(m(x), (F.silu(x @ w3.T) * (x @ w1.T)) @ w2.T)
    assert [n for n, _ in m.named_parameters()] == ["w1.weight", "w2.weight", "w3.weight"]
    assert sum(p.numel() for p in m.parameters()) == 3 * 8 * 5


def test_gradcheck_float64():
    torch.manual_seed(2)
    m = MLP(5, 7).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("dim, inter_dim, field", [(0, 4, "dim"), (4, -1, "inter_dim"), (4.0, 4, "dim")])
def test_bad_sizes_name_the_field(dim, inter_dim, field):
    with pytest.raises(ValueError, match=rf"{field} = .* must be a positive integer"):
        MLP(dim, inter_dim)
