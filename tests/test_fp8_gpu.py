"""FP8 inference on a CUDA GPU: the compiled Triton kernels inside the model (`FP8Linear`, `FP8Experts`) against the
PyTorch reference path that a CPU runs, with the same FP8 weights.

Skipped without a CUDA GPU (CI has none); run on the H200 with
`python -m pytest -o addopts="" tests/test_fp8_gpu.py tests/test_fp8.py` (test_fp8.py then runs compiled too).
"""

import pytest
import torch
from test_fp8 import INF, NAN, same_fp8, same_values  # the CPU tests' NaN-aware comparisons

import dsv3_lite.kernels.fp8 as KF
from dsv3_lite import ModelArgs, Transformer, generate
from dsv3_lite.fp8 import FP8Experts, FP8Linear, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref
from dsv3_lite.kernels import triton_mode
from dsv3_lite.moe import Experts

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_mode() == "compiled"),
                                reason="needs a CUDA GPU with Triton (the CPU path is tested in test_fp8/test_model)")

# every matrix input width a multiple of 128, so every linear and the experts are FP8
ARGS = ModelArgs.preset("tiny", dtype="fp8").replace(dim=256, inter_dim=512, moe_inter_dim=128, q_lora_rank=128,
                                                     kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                                     v_head_dim=32)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp8_experts_compiled_equals_reference_path():
    torch.manual_seed(0)
    f8 = FP8Experts.from_experts(Experts(8, 256, 128, init_std=0.05))
    x, w = torch.randn(37, 256), torch.rand(37, 2)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(37)])
    with torch.no_grad():
        ref = f8(x, w, idx)                                   # CPU: PyTorch reference products
        got = f8.cuda()(x.cuda(), w.cuda(), idx.cuda())        # GPU: fp8_gemm per expert
        got_bf16 = f8(x.cuda().bfloat16(), w.cuda(), idx.cuda())
    assert got.dtype == torch.float32 and got_bf16.dtype == torch.bfloat16
    print("FP8Experts cuda vs reference:", rel(got.cpu(), ref), "bf16:", rel(got_bf16.cpu(), ref))
    # Same quantised input; the H200's FP8 tensor cores add each 128-wide K step with fewer mantissa bits than float32
    # (1.27e-4 for our GEMM and cuBLAS alike), and the hidden state h is quantised again before w2, where that
    # difference moves some elements to the neighbouring e4m3 value (measured on an H200: 1.7e-3 here, 3.6e-3 for
    # the experts inside the model below).
    assert rel(got.cpu(), ref) < 5e-3
    assert rel(got_bf16.cpu(), ref) < 0.05                    # bf16 activations and outputs


def test_fp8_model_compiled_equals_reference_path():
    torch.manual_seed(0)
    cpu = Transformer(ARGS).eval()
    torch.manual_seed(0)
    f32 = Transformer(ARGS.replace(dtype="bf16")).eval()      # same seed: the weights FP8 was quantised from
    gpu = Transformer(ARGS).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    fp8_modules = {n: m for n, m in cpu.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    assert len(fp8_modules) > 20 and any(isinstance(m, FP8Experts) for m in fp8_modules.values())
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: inputs.setdefault(n, (args, out)) and None)
             for n, m in fp8_modules.items()]
    x = torch.randint(0, ARGS.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, exact = cpu(x), f32(x)
        for h in hooks:
            h.remove()
        # every FP8 module, compiled on the GPU, on the input its CPU twin saw: same output up to the accumulation
        worst = {}
        for n, (args, out) in inputs.items():
            got = gpu.get_submodule(n)(*(a.cuda() for a in args))
            worst[type(fp8_modules[n]).__name__] = max(worst.get(type(fp8_modules[n]).__name__, 0.0),
                                                       rel(got.cpu(), out))
        logits = gpu(x.cuda()).cpu()
        gpu.setup_cache(2, 33)
        steps = torch.cat([gpu(x[:, :20].cuda(), 0)] + [gpu(x[:, p:p + 1].cuda(), p) for p in range(20, 33)], 1)
        gpu.reset_cache()
    print("worst module difference, cuda vs reference path:", worst)
    assert worst["FP8Linear"] < 5e-4 and worst["FP8Experts"] < 5e-3
    # End to end the two paths differ by as much as FP8 itself (about 3%): every linear re-quantises its input, and
    # a 1e-4 difference moves some elements to the neighbouring e4m3 value, which the next quantisation amplifies
    # (on a CPU, scaling each FP8Linear output by 1 + 1e-4·N(0, 1) moves these logits by 3%). Both stay within the
    # FP8 budget of the unquantised model: 2^-4 relative.
    print("logits vs the float32 model: cuda", rel(logits, exact), "reference path", rel(ref, exact),
          "cached decode", rel(steps.cpu(), exact), "| cuda vs reference path", rel(logits, ref))
    assert rel(ref, exact) < 0.0625 and rel(logits, exact) < 0.0625 and rel(steps.cpu(), exact) < 0.0625
    out = generate(gpu, [[1, 2, 3], [4, 5]], max_new_tokens=8)
    assert [len(o) for o in out] == [8, 8]


gluon = pytest.mark.skipif(not KF.gluon_available(), reason="the Gluon kernel needs an sm_90 (Hopper) GPU")
GLUON = dict(kernel="gluon", num_stages=4)


def _ref(a, a_s, b, b_s):
    return (a.double() * a_s.double().repeat_interleave(128, -1)) @ weight_dequant_ref(b, b_s, dtype=torch.float64).T


@gluon
@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (193, 128, 128), (300, 576, 384), (2049, 7168, 2048),
                                   (4100, 1536, 7168)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gluon_gemm_irregular_shapes(M, N, K, out_dtype):
    """M not a multiple of the 192-row tile, N not a multiple of 128 (576 = wkv_a): zero-filled loads, clipped stores."""
    torch.manual_seed(0)
    a, a_s = KF.act_quant(torch.randn(M, K, device="cuda"))
    b, b_s = KF.weight_quant(torch.randn(N, K, device="cuda"))
    got = KF.fp8_gemm(a, a_s, b, b_s, out_dtype, config=GLUON)
    assert got.dtype == out_dtype and got.shape == (M, N)
    # float32: the FP8 tensor cores' in-step accumulation (1.3e-4, as cuBLAS); bf16: one more rounding (~3e-3)
    assert rel(got, _ref(a, a_s, b, b_s)) < (5e-4 if out_dtype == torch.float32 else 5e-3)


@gluon
def test_gluon_is_a_candidate_for_large_m_only():
    def kernels(M, N, fused=False):
        return [c.get("kernel") for c in KF.gemm_candidates(M, N, 2048, fused)]
    assert "gluon" in kernels(4096, 7168) and "gluon" in kernels(513, 576)
    assert "gluon" not in kernels(512, 7168)              # small M: the tl kernels' smaller tiles fill the GPU
    assert "gluon" not in kernels(4096, 7168, fused=True)  # fused act_quant exists only in the tl kernel
    assert "gluon" not in kernels(4096, 100)              # C's rows must be 16-byte aligned for the TMA store
    a, a_s = KF.act_quant(torch.randn(4096, 2048, device="cuda"))
    b, b_s = KF.weight_quant(torch.randn(7168, 2048, device="cuda"))
    got = KF.fp8_gemm(a, a_s, b, b_s, torch.float32)      # whichever kernel the autotuner picked
    chosen = KF.tuned_config(4096, 7168, 2048)
    print("autotuned:", chosen)
    assert chosen in KF.gemm_candidates(4096, 7168, 2048)
    assert rel(got, _ref(a, a_s, b, b_s)) < 5e-4


# NaN and inf on the GPU: the compiled kernels against the references run on the same CUDA tensors. A tile or block
# with a NaN has a NaN scale and quantises to NaN; one with ±inf an infinite scale, NaN at the ±inf and ±0 elsewhere.


def _spoil(t, n, g):
    """Put NaN, +inf and -inf at n random places each of t (in place); returns t."""
    flat = t.view(-1)
    for v in (NAN, INF, -INF):
        flat[torch.randint(0, flat.numel(), (n,), generator=g)] = v
    return t


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_compiled_quantisers_propagate_nan_and_inf_like_the_reference(fmt):
    g = torch.Generator().manual_seed(0)
    x = _spoil(torch.randn(333, 7168, generator=g) * 4, 40, g).bfloat16().cuda()
    y, s = KF.act_quant(x, scale_fmt=fmt)
    y_ref, s_ref = act_quant_ref(x, scale_fmt=fmt)
    assert s.isnan().any() and s.isinf().any() and same_fp8(y, y_ref) and same_values(s, s_ref)
    w = _spoil(torch.randn(576, 7168, generator=g) * 0.02, 3, g).cuda()
    q, qs = KF.weight_quant(w)
    q_ref, qs_ref = weight_quant_ref(w)
    assert qs.isnan().any() and same_fp8(q, q_ref) and same_values(qs, qs_ref)
    for dtype in (torch.float32, torch.bfloat16):
        assert same_values(KF.weight_dequant(q, qs, dtype=dtype), weight_dequant_ref(q, qs, dtype=dtype))


def _nan_gemm_inputs(M, N, K):
    """Activations with a NaN in row 1 and -inf in row 3 (quantised by the reference); a NaN weight in row N - 7."""
    x = torch.randn(M, K, device="cuda")
    x[1, K - 5], x[3, 7] = NAN, -INF
    b, b_s = KF.weight_quant(torch.randn(N, K, device="cuda"))
    b.view(torch.uint8)[N - 7, 10] = 0x7F
    expected = torch.zeros(M, N, dtype=torch.bool, device="cuda")
    expected[[1, 3]], expected[:, N - 7] = True, True
    return x, (*act_quant_ref(x), b, b_s), expected


@pytest.mark.parametrize("M,N,K", [(5, 200, 384), (300, 576, 384)])
def test_compiled_gemm_puts_nan_where_the_reference_does(M, N, K):
    x, (a, a_s, b, b_s), expected = _nan_gemm_inputs(M, N, K)
    ref = fp8_gemm_ref(a, a_s, b, b_s, torch.float32)
    assert torch.equal(ref.isnan(), expected)
    for cfg in KF.gemm_candidates(M, N, K):                 # every kernel the autotuner may pick for this shape
        assert torch.equal(KF.fp8_gemm(a, a_s, b, b_s, torch.float32, config=cfg).isnan(), expected), cfg
    assert torch.equal(KF.fp8_linear(x, b, b_s, fused=True).isnan(), expected)


@gluon
def test_gluon_gemm_puts_nan_where_the_reference_does():
    x, (a, a_s, b, b_s), expected = _nan_gemm_inputs(1000, 576, 512)
    assert torch.equal(KF.fp8_gemm(a, a_s, b, b_s, torch.float32, config=GLUON).isnan(), expected)


def test_fp8_layers_compiled_keep_nan_like_the_reference_path():
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(torch.nn.Linear(512, 576))
    f8 = FP8Experts.from_experts(Experts(8, 256, 128, init_std=0.05))
    x, xe = torch.randn(4, 512), torch.randn(37, 256)
    x[2, 100], xe[5, 3] = NAN, INF
    w, idx = torch.rand(37, 2), torch.stack([torch.randperm(8)[:2] for _ in range(37)])
    with torch.no_grad():
        ref, ref_e = layer(x), f8(xe, w, idx)                                  # CPU: the reference path
        got, got_e = layer.cuda()(x.cuda()).cpu(), f8.cuda()(xe.cuda(), w.cuda(), idx.cuda()).cpu()
    assert ref.isnan().all(-1).tolist() == [False, False, True, False] and torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(ref_e.isnan().any(-1), torch.arange(37) == 5) and torch.equal(got_e.isnan(), ref_e.isnan())


# Offsets past 2^31 elements: operands a few rows beyond what an int32 element offset reaches, and the rows at the end
# compared with the references run on those rows alone (a wrapped offset reads and writes elsewhere, or faults).
# One launch per kernel; the largest buffers are float32 outputs of 8.6 GB.

LIMIT = 2**31
K_BIG = 7168
M_BIG = LIMIT // K_BIG + 64                    # 299,657 rows: the last 64 reach past 2^31 (in M·K, and M·N for N = 7168)
N_BIG = 128 * (LIMIT // (128 * K_BIG) + 2)     # 299,776 rows, 2342 blocks: the last one past 2^31, the one before across
SIMPLE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4)


@pytest.fixture(scope="module")
def big_x():
    """x [M_BIG, 7168] bf16 (4.3 GB) and its act_quant (a [M_BIG, 7168] fp8, a_s [M_BIG, 56])."""
    x = torch.randn(M_BIG, K_BIG, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > LIMIT and (M_BIG - 64) * K_BIG < LIMIT
    return (x, *KF.act_quant(x))


@pytest.fixture(scope="module")
def big_w():
    """w [N_BIG, 7168] bf16 (4.3 GB) and its weight_quant (q [N_BIG, 7168] fp8, s [2342, 56])."""
    w = torch.randn(N_BIG, K_BIG, device="cuda", dtype=torch.bfloat16)
    assert w.numel() > LIMIT and (N_BIG - 256) * K_BIG < LIMIT
    return (w, *KF.weight_quant(w))


def test_act_quant_past_2_31_elements(big_x):
    x, a, a_s = big_x
    a_ref, s_ref = act_quant_ref(x[-128:])                  # the last 128 rows: 64 before the limit, 64 past it
    assert same_fp8(a[-128:], a_ref) and same_values(a_s[-128:], s_ref)


def test_weight_quant_and_dequant_past_2_31_elements(big_w):
    w, q, s = big_w
    q_ref, s_ref = weight_quant_ref(w[-256:])                # the last two 128-row blocks: across the limit, past it
    assert same_fp8(q[-256:], q_ref) and same_values(s[-2:], s_ref)
    d = KF.weight_dequant(q, s, dtype=torch.float32)          # [N_BIG, 7168], 8.6 GB
    assert same_values(d[-256:], weight_dequant_ref(q[-256:], s[-2:], dtype=torch.float32))


@pytest.mark.parametrize("config", [
    SIMPLE,
    dict(BLOCK_M=64, BLOCK_N=128, SPLIT_K=2, num_warps=4, num_stages=4),      # float32 atomics into C
    dict(kernel="tma", BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, programs=264),
    pytest.param(GLUON, marks=gluon),
], ids=["simple", "split_k", "tma", "gluon"])
def test_fp8_gemm_past_2_31_elements_of_a_and_c(big_x, config):
    """A [M_BIG, 7168] @ B [7168, 7168].T: both A and C have more than 2^31 elements."""
    _, a, a_s = big_x
    b, b_s = KF.weight_quant(torch.randn(K_BIG, K_BIG, device="cuda"))
    c = KF.fp8_gemm(a, a_s, b, b_s, torch.float32, config=config)
    assert rel(c[-128:], _ref(a[-128:], a_s[-128:], b, b_s)) < 5e-4


def test_fp8_linear_fused_past_2_31_elements(big_x):
    """The fused kernel quantises rows of a bf16 A [M_BIG, 7168] itself."""
    x = big_x[0]
    b, b_s = KF.weight_quant(torch.randn(K_BIG, K_BIG, device="cuda"))
    y = KF.fp8_linear(x, b, b_s, fused=True, config=SIMPLE)                    # [M_BIG, 7168] bf16
    assert rel(y[-128:], _ref(*act_quant_ref(x[-128:]), b, b_s)) < 5e-3


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
    dict(kernel="tma", BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
    pytest.param(GLUON, marks=gluon),
], ids=["simple", "tma", "gluon"])
def test_fp8_gemm_past_2_31_elements_of_b(big_w, config):
    """A [64, 7168] @ B [N_BIG, 7168].T: the weight has more than 2^31 elements (an LM-head-like shape)."""
    _, q, s = big_w
    a, a_s = KF.act_quant(torch.randn(64, K_BIG, device="cuda"))
    c = KF.fp8_gemm(a, a_s, q, s, torch.float32, config=config)               # [64, N_BIG]
    assert rel(c[:, -256:], _ref(a, a_s, q[-256:], s[-2:])) < 5e-4


def test_grouped_gemm_past_2_31_elements(big_x):
    """Two row tiles at the end of a padded C [M_pad, 7168] past 2^31 elements, gathering the last rows of A
    [M_BIG, 7168]; every earlier tile has expert -1 and does nothing."""
    _, a, a_s = big_x
    BM, E = 64, 2
    T = LIMIT // (BM * K_BIG) + 2                              # 4683 tiles: M_pad = 299,712 rows
    w, w_s = (torch.stack(t) for t in zip(*[KF.weight_quant(torch.randn(K_BIG, K_BIG, device="cuda"))
                                            for _ in range(E)], strict=True))   # [2, 7168, 7168] fp8
    tile_expert = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    tile_expert[-E:] = torch.arange(E, dtype=torch.int32)
    rows = torch.zeros(T * BM, dtype=torch.int32, device="cuda")
    rows[-E * BM:] = torch.arange(M_BIG - E * BM, M_BIG, dtype=torch.int32)   # the last rows of A, across the limit
    assert (T - E) * BM * K_BIG < LIMIT < T * BM * K_BIG
    c = KF.fp8_grouped_gemm(a, a_s, w, w_s, tile_expert, torch.float32, rows=rows)   # [M_pad, 7168]
    for e in range(E):                                         # tile T - E + e: expert e, A's rows r
        r = slice(M_BIG - (E - e) * BM, M_BIG - (E - e - 1) * BM)
        got = c[(T - E + e) * BM:(T - E + e + 1) * BM]
        assert rel(got, _ref(a[r], a_s[r], w[e], w_s[e])) < 5e-4, e


def test_fp8_gemm_compiles_once_per_bucket():
    """Row counts of one M bucket (65, 96 and 100 round up to 128; 96 a multiple of 16, the others not) run the same
    compiled kernel: M is not specialised (`do_not_specialize`), so a new prompt length needs no new compile."""
    N, K = 384, 512
    b, b_s = KF.weight_quant(torch.randn(N, K, device="cuda"))
    cfg = KF.gemm_candidates(100, N, K)[0]
    kernel = KF._fp8_gemm_kernel
    for M in (65, 96, 100):
        a, a_s = KF.act_quant(torch.randn(M, K, device="cuda"))
        got = KF.fp8_gemm(a, a_s, b, b_s, torch.float32, config=cfg)
        assert rel(got, fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < 5e-4
        if M == 65:
            compiled = sum(len(cache[0]) for cache in kernel.device_caches.values())
    assert sum(len(cache[0]) for cache in kernel.device_caches.values()) == compiled
    def act_quant_variants():
        return sum(len(cache[0]) for cache in KF._act_quant_kernel.device_caches.values())
    KF.act_quant(torch.randn(33, K, device="cuda"))
    before = act_quant_variants()
    for M in (48, 50, 1):   # act_quant: any row count, the same compiled kernel
        x = torch.randn(M, K, device="cuda")
        y, s = KF.act_quant(x)
        y_ref, s_ref = act_quant_ref(x)
        assert same_fp8(y, y_ref) and torch.equal(s, s_ref)
    assert act_quant_variants() == before
