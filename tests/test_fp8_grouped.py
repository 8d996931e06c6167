"""Grouped FP8 MoE GEMM (notebooks/08_fp8_kernels.ipynb): `grouped_layout`, `fp8_grouped_gemm`,
`fp8_grouped_swiglu` and `fp8_experts_grouped` of dsv3_lite.kernels.fp8, and `FP8Experts(impl="grouped")`.

On a CPU the kernels run through the Triton interpreter (small shapes), on a CUDA GPU compiled. The grouped GEMM must
give, row by row, what `fp8_gemm` gives on each expert alone; the grouped expert forward what the per-expert
`FP8Experts` path gives; and nothing in the grouped path may read a device value on the host.
"""

import sys
from pathlib import Path

import pytest
import torch

import dsv3_lite.fp8 as F
import dsv3_lite.kernels.fp8 as KF
from dsv3_lite.kernels import triton_mode
from dsv3_lite.moe import Experts, MoE

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL32 = 1e-6 if DEV == "cpu" else 5e-4        # float32 GEMM vs float64, as in tests/test_fp8.py
BM = 32 if DEV == "cpu" else 64               # rows per tile (the interpreter runs one program at a time)
# per-expert fp8_gemm with the grouped kernel's tile shape: on a GPU 16-row and 64-row tiles use different tensor-core
# instructions, whose FP8 sums inside one 128-wide step round differently (1e-7 against 1e-4 relative error)
SAME_TILES = None if DEV == "cpu" else dict(BLOCK_M=BM, BLOCK_N=128, SPLIT_K=1, num_warps=4, num_stages=4)
pytestmark = pytest.mark.skipif(triton_mode() == "unavailable",
                                reason="needs Triton (compiled on a GPU or the interpreter on a CPU)")


def routing(N, E, k, hot=None, empty=(), seed=0):
    """indices [N, k] of distinct experts per token; `hot` is in every token's list; experts in `empty` in none."""
    g = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(E) if e not in empty and e != hot]
    rows = []
    for _ in range(N):
        pick = [allowed[j] for j in torch.randperm(len(allowed), generator=g)[:k - (hot is not None)].tolist()]
        rows.append(([hot] if hot is not None else []) + pick)
    return torch.tensor(rows, dtype=torch.long, device=DEV)


def stacked_weights(E, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = zip(*[KF.weight_quant(torch.randn(N, K, generator=g).to(DEV)) for _ in range(E)], strict=True)
    return torch.stack(q), torch.stack(s)


def test_layout_example_and_bound():
    """The documented example, then random routings: every pair lands in a tile of its own expert, padding rows
    stay inside their expert's tiles, and the tile count never passes the bound."""
    lay = KF.grouped_layout(torch.tensor([[2, 0], [2, 3], [2, 0]]), 4, 2)
    assert lay.tile_expert.tolist() == [0, 2, 2, 3, -1]
    assert lay.rows.tolist() == [0, 2, 0, 1, 2, 0, 1, 0, 0, 0] and lay.dest.tolist() == [[2, 0], [3, 6], [4, 1]]
    for seed, (N, E, k, bm) in enumerate([(1, 256, 8, 64), (7, 5, 3, 4), (50, 8, 2, 16), (3, 3, 3, 1)]):
        idx = routing(N, E, k, seed=seed).cpu()
        lay = KF.grouped_layout(idx, E, bm)
        T = lay.tile_expert.shape[0]
        assert T == (N * k + min(E, N * k) * (bm - 1)) // bm and lay.rows.shape == (T * bm,)
        assert torch.equal(lay.tile_expert[lay.dest // bm].long(), idx)            # each pair in its expert's tile
        assert torch.equal(lay.rows[lay.dest].long(), torch.arange(N)[:, None].expand(N, k))   # reads its token
        assert len(set(lay.dest.flatten().tolist())) == N * k                     # no two pairs share a row
        used = (lay.tile_expert >= 0).sum().item()
        counts = torch.bincount(idx.flatten(), minlength=E)
        assert used == ((counts + bm - 1) // bm).sum().item() and (lay.tile_expert[used:] == -1).all()


@pytest.mark.parametrize("case, N, E, k, n_out, K", [
    ("empty experts", 9, 6, 2, 256, 256),          # experts 1 and 4 get no token; 18 rows, no full tile
    ("one expert takes every token", 40, 4, 1, 128, 128),   # 40 rows: a full tile and a partial one
    ("k > 1, N not a multiple of 128", 13, 5, 3, 200, 384),   # a partial column tile
])
def test_grouped_gemm_equals_per_expert_fp8_gemm(case, N, E, k, n_out, K):
    hot = 2 if "one expert" in case else None
    idx = routing(N, E, k, hot=hot, empty=(1, 4) if "empty" in case else ())
    if hot is not None:
        assert (idx == hot).all()
    w, w_s = stacked_weights(E, n_out, K)
    xq, xs = KF.act_quant(torch.randn(N, K, device=DEV))
    lay = KF.grouped_layout(idx, E, BM)
    g = torch.rand(lay.rows.shape[0], device=DEV)
    got = KF.fp8_grouped_gemm(xq, xs, w, w_s, lay.tile_expert, torch.float32, rows=lay.rows)
    weighted = KF.fp8_grouped_gemm(xq, xs, w, w_s, lay.tile_expert, torch.bfloat16, rows=lay.rows, row_weight=g)
    for e in range(E):
        t, j = torch.where(idx == e)
        if t.numel() == 0:
            continue
        r = lay.dest[t, j]
        ref = KF.fp8_gemm(xq[t], xs[t], w[e], w_s[e], torch.float32, config=SAME_TILES)
        exact = (xq[t].double() * xs[t].double().repeat_interleave(128, -1)) @ \
            F.weight_dequant_ref(w[e], w_s[e], dtype=torch.float64).T
        assert torch.allclose(got[r], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (case, e)
        assert ((got[r].double() - exact).norm() / exact.norm()).item() < TOL32, (case, e)
        assert torch.allclose(weighted[r].float(), (ref * g[r, None]).bfloat16().float(), rtol=1e-2, atol=1e-3)
    # the same rows already in padded order (what w2 reads): no gather
    a_pad, s_pad = xq[lay.rows.long()], xs[lay.rows.long()]
    again = KF.fp8_grouped_gemm(a_pad, s_pad, w, w_s, lay.tile_expert, torch.float32)
    assert torch.equal(again[lay.dest], got[lay.dest])


def test_grouped_swiglu_equals_quantised_reference():
    """silu(x w1ᵀ) ⊙ (x w3ᵀ) quantised per 1×128 tile in the GEMM epilogue = act_quant_ref of the float32 reference
    (a few values may sit on the other side of an e4m3 rounding boundary after a different summation order)."""
    N, E, k, D, I = 11, 5, 2, 256, 256
    idx = routing(N, E, k, empty=(3,))
    (w1, s1), (w3, s3) = stacked_weights(E, I, D, seed=1), stacked_weights(E, I, D, seed=3)
    xq, xs = KF.act_quant(torch.randn(N, D, device=DEV))
    lay = KF.grouped_layout(idx, E, BM)
    h, h_s = KF.fp8_grouped_swiglu(xq, xs, w1, s1, w3, s3, lay.tile_expert, lay.rows)
    assert h.dtype == torch.float8_e4m3fn and h_s.shape == (lay.rows.shape[0], I // 128)
    for e in set(idx.flatten().tolist()):
        t, j = torch.where(idx == e)
        r = lay.dest[t, j]
        a1, a3 = (F.fp8_gemm_ref(xq[t], xs[t], w[e], s[e], torch.float32) for w, s in ((w1, s1), (w3, s3)))
        ref_q, ref_s = F.act_quant_ref(torch.nn.functional.silu(a1) * a3)
        assert torch.allclose(h_s[r], ref_s, rtol=1e-5 if DEV == "cpu" else 2e-3)   # GPU: tensor-core sums
        same = (h[r].view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
        assert same > (0.99 if DEV == "cpu" else 0.9), (e, same)
        deq, ref = h[r].float() * h_s[r].repeat_interleave(128, -1), ref_q.float() * ref_s.repeat_interleave(128, -1)
        # GPU: the tensor cores' FP8 sums (1e-4) move more of h across e4m3 rounding boundaries (one step: 6-12 %)
        assert ((deq - ref).norm() / ref.norm()).item() < (1e-2 if DEV == "cpu" else 2e-2)


@pytest.mark.parametrize("N, E, k, D, I, dtype, fmt, hot, empty", [
    (9, 6, 2, 256, 256, torch.float32, None, None, (1, 4)),
    (40, 4, 1, 128, 128, torch.float32, None, 0, ()),                 # one expert takes every token
    (13, 8, 3, 128, 256, torch.bfloat16, "ue8m0", None, (7,)),
    (1, 16, 4, 128, 128, torch.float32, None, None, ()),              # decode: one token
])
def test_grouped_forward_equals_sorted_fp8_experts(N, E, k, D, I, dtype, fmt, hot, empty):
    torch.manual_seed(N)
    ref_layer = F.FP8Experts.from_experts(Experts(E, D, I, init_std=0.05), scale_fmt=fmt).to(DEV)
    layer = F.FP8Experts(E, D, I, scale_fmt=fmt, device=DEV)
    layer.load_state_dict(ref_layer.state_dict())
    x, w = torch.randn(N, D, device=DEV).to(dtype), torch.rand(N, k, device=DEV)
    idx = routing(N, E, k, hot=hot, empty=empty, seed=N)
    with torch.no_grad():
        ref = ref_layer(x, w, idx, impl="sorted")
        got = layer(x, w, idx, impl="grouped")
    assert got.shape == ref.shape and got.dtype == dtype

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    if dtype == torch.float32:
        # summation order, and the rare e4m3 rounding of h it flips; on a GPU the two paths may also use different
        # tensor-core instructions (16- or 64-row tiles), which round the FP8 sums differently (1e-7 against 1e-4)
        assert rel(got, ref) < (1e-3 if DEV == "cpu" else 1e-2)
    else:
        # bf16 rounds the products and h before h is quantised, and a changed tile maximum moves every e4m3 value of
        # its tile: both bf16 paths land 2-4% from the float32 forward (seed to seed), the grouped one no further.
        with torch.no_grad():
            exact = ref_layer(x.float(), w, idx, impl="sorted")
        assert rel(ref, exact) < 0.05 and rel(got, exact) < 0.05 and rel(got, ref) < 0.06


def test_grouped_forward_of_no_tokens_and_impl_choice(monkeypatch):
    layer = F.FP8Experts.from_experts(Experts(4, 128, 128, init_std=0.05)).to(DEV)
    out = layer(torch.randn(0, 128, device=DEV), torch.rand(0, 2, device=DEV),
                torch.zeros(0, 2, dtype=torch.long, device=DEV), impl="grouped")
    assert out.shape == (0, 128)
    calls = []
    monkeypatch.setattr(F.FP8Experts, "_grouped", lambda self, *a: calls.append("grouped") or a[0])
    layer(torch.randn(3, 128, device=DEV), torch.rand(3, 2, device=DEV), routing(3, 4, 2), impl="grouped")
    assert calls == ["grouped"]
    with pytest.raises(ValueError, match="impl = 'fast' is not allowed: choose 'sorted', 'loop' or 'grouped'"):
        layer(torch.randn(3, 128, device=DEV), torch.rand(3, 2, device=DEV), routing(3, 4, 2), impl="fast")


def test_moe_layer_runs_the_grouped_path():
    """A whole MoE layer of the tiny configuration in FP8 with `impl = "grouped"`: close to the sorted path."""
    from dsv3_lite.config import ModelArgs
    torch.manual_seed(0)
    moe = MoE(ModelArgs.preset("tiny")).to(DEV)
    F.use_fp8(moe)
    grouped = F.FP8Experts(moe.experts.n_experts, moe.experts.dim, moe.experts.inter_dim, device=DEV)
    grouped.load_state_dict(moe.experts.state_dict())
    x = torch.randn(2, 5, 256, device=DEV)
    with torch.no_grad():
        ref = moe(x)
        moe.experts, moe.impl = grouped, "grouped"
        got = moe(x)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3


# calls that read a device value on the host (they wait for the GPU and cannot be captured in a CUDA graph)
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_SYNCING_OPS = ("nonzero", "bincount", "unique", "masked_select", "repeat_interleave")   # data-dependent shapes


def test_grouped_path_reads_nothing_on_the_host(monkeypatch):
    """On a CPU there is no sync to detect, so the test forbids what would be one on a GPU: every host read of a
    tensor from the grouped code (the Triton interpreter's own copies are allowed) and every operation whose output
    shape depends on the data."""
    ours = {Path(m.__file__).resolve() for m in (KF, F)}

    def guard(name, original):
        def call(*args, **kwargs):
            if Path(sys._getframe(1).f_code.co_filename).resolve() in ours:
                raise AssertionError(f"host read: {name} called by the grouped path")
            return original(*args, **kwargs)
        return call

    layer = F.FP8Experts.from_experts(Experts(6, 128, 128, init_std=0.05)).to(DEV)
    x, w, idx = torch.randn(7, 128, device=DEV), torch.rand(7, 2, device=DEV), routing(7, 6, 2, empty=(2,))
    with torch.no_grad():
        ref = layer(x, w, idx, impl="sorted")
        for name in _HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        for name in _SYNCING_OPS:
            for owner in (torch, torch.Tensor):
                if hasattr(owner, name):
                    monkeypatch.setattr(owner, name, guard(name, getattr(owner, name)))
        got = layer(x, w, idx, impl="grouped")
        with pytest.raises(AssertionError, match="host read: bincount"):    # the guard does catch the sorted path
            layer(x, w, idx, impl="sorted")
    monkeypatch.undo()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3


def test_bad_grouped_operands_are_refused():
    w, w_s = stacked_weights(2, 128, 128)
    xq, xs = KF.act_quant(torch.randn(4, 128, device=DEV))
    lay = KF.grouped_layout(routing(4, 2, 1), 2, BM)
    with pytest.raises(ValueError, match=r"tile_expert.dtype = torch.int64"):
        KF.fp8_grouped_gemm(xq, xs, w, w_s, lay.tile_expert.long(), rows=lay.rows)
    with pytest.raises(ValueError, match=r"w_s.shape = \(2, 1, 2\)"):
        KF.fp8_grouped_gemm(xq, xs, w, torch.ones(2, 1, 2, device=DEV), lay.tile_expert, rows=lay.rows)
    with pytest.raises(ValueError, match="must divide the padded rows"):
        KF.fp8_grouped_gemm(xq, xs, w, w_s, lay.tile_expert, rows=lay.rows[:-1])
    with pytest.raises(ValueError, match=r"a.shape\[1\] \(K\) = 128"):
        KF.fp8_grouped_gemm(xq, xs, *stacked_weights(2, 128, 256), lay.tile_expert, rows=lay.rows)
    w200, s200 = stacked_weights(2, 200, 128)
    with pytest.raises(ValueError, match=r"w1.shape\[1\] \(I\) = 200"):
        KF.fp8_grouped_swiglu(xq, xs, w200, s200, w200, s200, lay.tile_expert, lay.rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sync detection and CUDA graphs)")
def test_grouped_forward_syncs_nothing_and_is_captured_in_a_cuda_graph():
    layer = F.FP8Experts.from_experts(Experts(16, 256, 256, init_std=0.05)).cuda()
    x, w, idx = torch.randn(4, 256, device="cuda"), torch.rand(4, 4, device="cuda"), routing(4, 16, 4)
    with torch.no_grad():
        eager = layer(x, w, idx, impl="grouped")                    # compiles outside the checks
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x, w, idx, impl="grouped")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, w, idx, impl="grouped")
        idx.copy_(routing(4, 16, 4, seed=1))                        # new routing, same shapes: replay
        graph.replay()
        assert torch.equal(out, layer(x, w, idx, impl="grouped")) and not torch.equal(out, eager)
