"""MLA (notebook 04): parity with transformers' DeepseekV3Attention, naive == absorbed, KV-cache decoding, errors."""

import pytest
import torch

from dsv3_lite.attention import MLA, causal_mask, kv_cache_per_token
from dsv3_lite.config import ModelArgs, official_param_name
from dsv3_lite.rope import precompute_freqs_cis

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402

TINY = ModelArgs.preset("tiny", dim=64, n_heads=3, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=8,
                        qk_rope_head_dim=6, v_head_dim=10, max_seq_len=64, original_seq_len=16)


def _pair(a: ModelArgs, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**a.to_hf_config())
    cfg._attn_implementation = "eager"
    hf = hf_ds.DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    ours = MLA(a)
    ours.load_state_dict({official_param_name(k): v for k, v in hf.state_dict().items()})
    return hf, ours, hf_ds.DeepseekV3RotaryEmbedding(cfg)


def _hf(hf, rotary, x):
    pos = torch.arange(x.shape[1])[None]
    return hf(x, position_embeddings=rotary(x, pos), attention_mask=causal_mask(x.shape[1])[None, None])[0]


def _decode(m: MLA, a: ModelArgs, x: torch.Tensor, steps: list[int]) -> torch.Tensor:
    freqs = precompute_freqs_cis(a)
    m.setup_cache(x.shape[0], a.max_seq_len)
    outs, pos = [], 0
    with torch.no_grad():
        for n in steps:
            outs.append(m(x[:, pos:pos + n], pos, freqs[pos:pos + n], causal_mask(n, pos) if n > 1 else None))
            pos += n
    m.reset_cache()
    return torch.cat(outs, 1)


@pytest.mark.parametrize("q_lora", [24, 0])
@pytest.mark.parametrize("yarn", [True, False])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_parity_with_transformers(q_lora, yarn, impl):
    a = TINY.replace(q_lora_rank=q_lora, max_seq_len=64 if yarn else 16, attn_impl=impl)
    assert a.yarn_enabled == yarn
    hf, ours, rotary = _pair(a)
    x = torch.randn(2, 11, a.dim)
    with torch.no_grad():
        ref = _hf(hf, rotary, x)
        y = ours(x, 0, precompute_freqs_cis(a)[:11], causal_mask(11))
    assert (y - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_decode_matches_transformers_full_pass(impl):
    a = TINY.replace(attn_impl=impl)
    hf, ours, rotary = _pair(a, seed=1)
    x = torch.randn(3, 10, a.dim)
    with torch.no_grad():
        ref = _hf(hf, rotary, x)
    y = _decode(ours, a, x, [4, 1, 2, 1, 2])  # prefill, single steps, and multi-token chunks on a non-empty cache
    assert (y - ref).abs().max().item() <= 1e-5


def test_decode_matches_transformers_dynamic_cache():
    """HF's own cached decoding (DynamicCache) against ours, step by step."""
    a = TINY.replace(attn_impl="absorb")
    hf, ours, rotary = _pair(a, seed=2)
    cache = transformers.DynamicCache(config=transformers.DeepseekV3Config(**a.to_hf_config()))
    x = torch.randn(2, 7, a.dim)
    freqs = precompute_freqs_cis(a)
    ours.setup_cache(2, 16)
    with torch.no_grad():
        for pos, n in [(0, 3), (3, 1), (4, 3)]:
            xs = x[:, pos:pos + n]
            mask = causal_mask(n, pos)
            ref = hf(xs, position_embeddings=rotary(xs, torch.arange(pos, pos + n)[None]),
                     attention_mask=mask[None, None], cache=cache)[0]
            y = ours(xs, pos, freqs[pos:pos + n], mask)
            assert (y - ref).abs().max().item() <= 1e-5


def test_naive_equals_absorbed_prefill_and_decode():
    torch.manual_seed(3)
    a = TINY
    m = MLA(a)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    x = torch.randn(2, 9, a.dim)
    f = precompute_freqs_cis(a)[:9]
    outs = {}
    for impl in ("naive", "absorb"):
        m.attn_impl = impl
        with torch.no_grad():
            outs[impl] = m(x, 0, f, causal_mask(9))
            outs[impl + "_decode"] = _decode(m, a, x, [1] * 9)
    for k in ("absorb", "naive_decode", "absorb_decode"):
        assert torch.allclose(outs[k], outs["naive"], atol=1e-5, rtol=1e-5), k


def test_fused_paths_equal_absorbed_einsums():
    """The fused SDPA path (naive form; absorbed form from position 0) equals the absorbed einsums forced everywhere,
    with tensor masks, mask='causal', batch masks, and a multi-token chunk after a prefill (start_pos > 0)."""
    torch.manual_seed(5)
    a = TINY
    m = MLA(a, attn_impl="absorb")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    x = torch.randn(2, 11, a.dim)
    f = precompute_freqs_cis(a)[:11]
    bmask = causal_mask(11).expand(2, 11, 11).clone()
    bmask[1, :, 0] = float("-inf")  # sequence 1 may not see token 0 (left padding)
    bmask[1, 0, 0] = 0.0
    with torch.no_grad():
        m.prefill_naive = False
        ref = {k: m(x, 0, f, mk) for k, mk in (("causal", causal_mask(11)), ("batch", bmask), ("none", None))}
        m.prefill_naive = True
        fused = {"causal": m(x, 0, f, "causal"), "batch": m(x, 0, f, bmask), "none": m(x, 0, f, None)}
        m.attn_impl = "naive"
        fused_naive = m(x, 0, f, "causal")
        chunks = _decode(m, a, x, [4, 3, 4])  # naive cache, SDPA with [S, start_pos + S] masks
        m.attn_impl = "absorb"
        chunks_abs = _decode(m, a, x, [4, 3, 4])  # absorbed: fused prefill, then einsums over the latent cache
    for k in ref:
        assert torch.allclose(fused[k], ref[k], atol=1e-5, rtol=1e-5), k
    for name, y in (("naive causal", fused_naive), ("naive chunks", chunks), ("absorb chunks", chunks_abs)):
        assert torch.allclose(y, ref["causal"], atol=1e-5, rtol=1e-5), name


def test_batch_mask_and_no_mask():
    """[B, S, T] masks work; mask=None lets every query see every key (non-causal)."""
    torch.manual_seed(4)
    m = MLA(TINY)
    x = torch.randn(2, 5, TINY.dim)
    f = precompute_freqs_cis(TINY)[:5]
    with torch.no_grad():
        y2 = m(x, 0, f, causal_mask(5))
        y3 = m(x, 0, f, causal_mask(5).expand(2, 5, 5))
        full = m(x, 0, f, None)
    assert torch.equal(y2, y3)
    assert torch.allclose(full[:, -1], y2[:, -1], atol=1e-6)  # the last query sees everything either way
    assert not torch.allclose(full[:, 0], y2[:, 0], atol=1e-4)


def test_no_cache_at_construction_and_training_gradients():
    big = MLA(ModelArgs.preset("16B", dim=256, n_heads=2))  # a 16B-sized max_seq_len, no cache allocated
    assert big.cache_shape is None and len(list(big.buffers())) == 0
    m = MLA(TINY)
    x = torch.randn(2, 6, TINY.dim, requires_grad=True)
    m(x, 0, precompute_freqs_cis(TINY)[:6], causal_mask(6)).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    assert "kv_cache" not in m.state_dict()


def test_cache_dtype_and_layout():
    m = MLA(TINY).to(torch.bfloat16)
    m.setup_cache(2, 8)
    assert m.kv_cache.shape == (2, 8, TINY.kv_lora_rank) and m.pe_cache.shape == (2, 8, TINY.qk_rope_head_dim)
    assert m.kv_cache.dtype == torch.bfloat16
    m.attn_impl = "naive"
    m.setup_cache(1, 4)
    assert m.k_cache.shape == (1, 4, TINY.n_heads, TINY.qk_head_dim) and m.kv_cache is None


def test_causal_mask():
    m = causal_mask(2, 3)
    assert m.shape == (2, 5)
    assert torch.equal(torch.isinf(m), torch.tensor([[False] * 4 + [True], [False] * 5]))
    with pytest.raises(ValueError, match="seq_len=0"):
        causal_mask(0)


def test_kv_cache_per_token_v3():
    kv = kv_cache_per_token(ModelArgs.preset("671B"))
    assert kv["MLA absorbed cache"] == 35136
    assert kv["MHA"] == 1998848
    assert kv["MLA naive cache"] == 2498560
    assert round(kv["MLA absorbed cache"] / kv["MHA"] * 100, 2) == 1.76


def test_bad_construction_and_cache_sizes():
    """What MLA itself refuses: an unknown form and a cache beyond ModelArgs' limits. The calling contract (positions,
    cache, batch, form, gradients) is checked once per step by Transformer: tests/test_model.py."""
    a = TINY.replace(max_seq_len=16, max_batch_size=2)
    m = MLA(a)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        m.setup_cache(batch_size=3)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m.setup_cache(seq_len=17)
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        MLA(a, attn_impl="flash")
    f = precompute_freqs_cis(a)
    with torch.no_grad(), pytest.raises(ValueError, match=r"freqs_cis.shape=\(4, 3\)"):   # from apply_rotary_emb
        m(torch.randn(1, 3, a.dim), 0, f[:4])


# ---- start_pos as a 0-dim device tensor (one-token absorbed steps; what CUDA graphs capture, notebook 07)
@pytest.mark.parametrize("q_lora", [24, 0])
def test_tensor_start_pos_equals_int(q_lora):
    a = TINY.replace(q_lora_rank=q_lora, max_batch_size=3)
    _, m, _ = _pair(a, seed=3)
    freqs = precompute_freqs_cis(a)
    x = torch.randn(2, 11, a.dim)
    pos = torch.tensor(0)
    outs = {}
    for kind in ("int", "tensor"):
        m.setup_cache(3, 16)  # more rows and sequences than used: the masked rows and the batch slice are exercised
        with torch.no_grad():
            steps = [m(x[:, :4], 0, freqs[:4], causal_mask(4))]
            for p in range(4, 11):
                pos.fill_(p)
                steps.append(m(x[:, p:p + 1], p, freqs[p:p + 1]) if kind == "int"
                             else m(x[:, p:p + 1], pos, freqs.index_select(0, pos.view(1))))
        outs[kind] = (torch.cat(steps, 1), m.kv_cache.clone(), m.pe_cache.clone())
        m.reset_cache()
    for got, want in zip(outs["tensor"], outs["int"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert outs["tensor"][1][:, 11:].abs().sum() == 0  # rows after the last step untouched


def test_cache_sizes_must_be_ints():
    m = MLA(TINY.replace(max_seq_len=16, max_batch_size=2))
    for kw, message in ((dict(batch_size=1.5), "MLA.setup_cache: batch_size=1.5 is not allowed: it must be an int"),
                        (dict(seq_len=True), "MLA.setup_cache: seq_len=True is not allowed: it must be an int"),
                        (dict(seq_len="8"), "MLA.setup_cache: seq_len='8' is not allowed: it must be an int")):
        with pytest.raises(ValueError, match=message):
            m.setup_cache(**kw)
    assert m.cache_shape is None
