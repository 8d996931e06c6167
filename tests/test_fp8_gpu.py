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
