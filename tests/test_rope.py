"""RoPE and YaRN (notebook 03): frequencies and rotations against transformers' DeepSeek-V3 code."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lite.config import ModelArgs
from dsv3_lite.rope import apply_rotary_emb, precompute_freqs_cis, rope_frequencies, yarn_correction_range

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402


def _hf_rotary(a: ModelArgs):
    return hf_ds.DeepseekV3RotaryEmbedding(transformers.DeepseekV3Config(**a.to_hf_config()))


def test_v3_correction_range_and_ramp():
    """YaRN for V3 (s = 40, β_fast = 32, β_slow = 1): low = floor(10.47) = 10, high = ceil(22.51) = 23; pairs <= 10
    kept, >= 23 divided by 40."""
    assert yarn_correction_range(32, 1, 64, 10000.0, 4096) == (10, 23)
    v3 = ModelArgs.preset("671B")
    ratio = rope_frequencies(v3.replace(max_seq_len=4096)) / rope_frequencies(v3)
    assert torch.allclose(ratio[:11], torch.ones(11))
    assert torch.allclose(ratio[23:], torch.full((9,), 40.0))
    assert ((ratio[11:23] > 1) & (ratio[11:23] < 40)).all()


def test_yarn_only_when_max_seq_len_exceeds_original():
    v3 = ModelArgs.preset("671B")
    plain = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert torch.equal(rope_frequencies(v3.replace(max_seq_len=4096)), plain)
    assert not torch.equal(rope_frequencies(v3), plain)


@pytest.mark.parametrize("name, max_seq_len", [("671B", None), ("671B", 4096), ("16B", None), ("tiny", None),
                                               ("tiny", 128)])
def test_frequencies_match_transformers(name, max_seq_len):
    a = ModelArgs.preset(name) if max_seq_len is None else ModelArgs.preset(name, max_seq_len=max_seq_len)
    rot = _hf_rotary(a)
    assert rot.attention_scaling == 1.0
    assert (rot.inv_freq - rope_frequencies(a)).abs().max().item() < 1e-7


@pytest.mark.parametrize("start", [0, 37, 400])
def test_rotation_matches_transformers_interleave(start):
    a = ModelArgs.preset("tiny")
    S, d = 9, a.qk_rope_head_dim
    q, k = torch.randn(2, S, a.n_heads, d), torch.randn(2, S, 1, d)
    cos, sin = _hf_rotary(a)(q, torch.arange(start, start + S)[None])
    q_hf, k_hf = hf_ds.apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    f = precompute_freqs_cis(a)[start:start + S]
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # HF returns pairs de-interleaved
    assert torch.allclose(apply_rotary_emb(q, f).transpose(1, 2)[..., perm], q_hf, atol=1e-5)
    assert torch.allclose(apply_rotary_emb(k, f).transpose(1, 2)[..., perm], k_hf, atol=1e-5)
    # rotate_half on interleaved data is a different function (the trap the interleave avoids)
    q_half, _ = hf_ds.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    if start:
        assert not torch.allclose(q_half, q_hf, atol=1e-2)


def test_v3_long_positions_match_transformers():
    """The full V3 table against transformers' cos/sin. Within the 4K pre-training context they agree to 1e-5; far out
    (100k) the ~2e-9 float32 difference of a blended frequency (official vs HF formula) times the position gives
    angle differences of a few 1e-4, which bounds the tolerance there."""
    a = ModelArgs.preset("671B", max_seq_len=163840)
    for positions, atol in [([0, 1, 17, 4095, 4096], 1e-5), ([100_000, 163_839], 1e-3)]:
        pos = torch.tensor([positions])
        cos, sin = _hf_rotary(a)(torch.zeros(1), pos)
        f = precompute_freqs_cis(a)[pos[0]]
        assert torch.allclose(f.real, cos[0, :, :32], atol=atol) and torch.allclose(f.imag, sin[0, :, :32], atol=atol)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 400), shift=st.integers(0, 100), dist=st.integers(0, 10))
def test_scores_depend_only_on_distance(m, shift, dist):
    a = ModelArgs.preset("tiny")
    f = precompute_freqs_cis(a)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float32), torch.randn(1, 1, 1, 16, generator=g)

    def score(i, j):
        return (apply_rotary_emb(q, f[i:i + 1]) * apply_rotary_emb(k, f[j:j + 1])).sum().item()

    assert math.isclose(score(m, m + dist), score(m + shift, m + shift + dist), abs_tol=1e-4)


def test_apply_keeps_dtype_shape_and_norm():
    a = ModelArgs.preset("tiny")
    f = precompute_freqs_cis(a)[5:12]
    x = torch.randn(3, 7, 2, 16)
    y = apply_rotary_emb(x, f)
    assert y.shape == x.shape and torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert apply_rotary_emb(x.bfloat16(), f).dtype == torch.bfloat16
    assert apply_rotary_emb(torch.randn(3, 7, 16), f).shape == (3, 7, 16)  # [B, S, d_R] works too
    assert torch.equal(precompute_freqs_cis(a)[0], torch.ones(8, dtype=torch.complex64))


def test_bad_inputs():
    a = ModelArgs.preset("tiny")
    f = precompute_freqs_cis(a)
    with pytest.raises(ValueError, match="S = freqs_cis.shape"):
        apply_rotary_emb(torch.randn(1, 5, 2, 16), f[:4])
    with pytest.raises(ValueError, match="d_R = 2"):
        apply_rotary_emb(torch.randn(1, 4, 2, 14), f[:4])
    with pytest.raises(ValueError, match="seq_len=0"):
        precompute_freqs_cis(a, seq_len=0)
