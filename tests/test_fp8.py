"""Tests of dsv3_lite.kernels.fp8: the FP8 quantisers, the block-scaled GEMM and FP8Linear.

On a CPU the Triton kernels run through the Triton interpreter (small shapes: it executes one program at a time);
on a CUDA GPU the same tests run the compiled kernels. Quantisers must match the PyTorch references bit for bit;
the GEMM must match a float64 product of the dequantised operands up to float32 summation order.
"""

import re

import pytest
import torch

from dsv3_lite.kernels import HAS_TRITON
from dsv3_lite.kernels import fp8 as F

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiled on a GPU or the interpreter on a CPU)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# float32-output GEMM vs float64: summation order only in the interpreter; compiled on Hopper the FP8 tensor cores add
# the 128 products of one K step with fewer mantissa bits (measured 1.27e-4 for our kernel and cuBLAS alike on an H200:
# benchmarks/results/fp8_gemm_round3_h200.json), then the kernel promotes to float32
TOL32 = 1e-6 if DEV == "cpu" else 5e-4


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def dequant_a(a, a_s):
    return a.double() * a_s.double().repeat_interleave(128, -1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_e4m3_rounding_helpers():
    """pow2_ceil is exact; the reference quantiser saturates at 448 and keeps the sign of zero."""
    s = torch.tensor([0.3, 0.25, 3.0, 1e-4 / 448, 2.0 ** -20])
    p = F.pow2_ceil(s)
    assert torch.equal(p, torch.tensor([0.5, 0.25, 4.0, 2.0 ** -22, 2.0 ** -20]))
    x = torch.tensor([[-0.0] + [1.0] * 126 + [-448.0]])
    y, sc = F.act_quant_ref(x)
    assert sc.item() == 1.0 and y.float()[0, -1].item() == -448.0 and torch.signbit(y.float()[0, 0])


@pytest.mark.parametrize("shape,dtype,fmt", [
    ((1, 128), torch.float32, None),
    ((37, 384), torch.bfloat16, None),
    ((3, 5, 256), torch.float32, "ue8m0"),
    ((130, 512), torch.float16, None),
    ((2, 128), torch.bfloat16, "ue8m0"),
])
def test_act_quant_matches_reference_bits(shape, dtype, fmt):
    x = (torch.randn(shape) * 4).to(dtype).to(DEV)
    zero_tile = x.numel() > 128
    if zero_tile:
        x.view(-1, shape[-1])[0, :128] = 0.0                # an all-zero tile takes the 1e-4 floor
    x.view(-1)[5] = -0.0
    y, s = F.act_quant(x, scale_fmt=fmt)
    y_ref, s_ref = F.act_quant_ref(x, scale_fmt=fmt)
    assert y.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (*shape[:-1], shape[-1] // 128)
    assert same_bits(y, y_ref) and torch.equal(s, s_ref)
    if zero_tile:
        assert s.view(-1, shape[-1] // 128)[0, 0].item() == pytest.approx(1e-4 / 448 if fmt is None else 2.0 ** -22)
    if fmt == "ue8m0":
        assert torch.equal(s, F.pow2_ceil(s))
    back = y.float() * s.repeat_interleave(128, -1)
    assert rel(back, x.double()) < 0.04                     # e4m3 rounding: ≈ 2.6% on Gaussian data


def test_act_quant_outlier_tile_is_isolated():
    """A huge value spoils only its own 1×128 tile."""
    x = torch.randn(4, 512, device=DEV)
    x[2, 300] = 1e6
    y, s = F.act_quant(x)
    back = y.float() * s.repeat_interleave(128, -1)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[2, 256:384] = False
    assert rel(back[mask], x[mask].double()) < 0.04


@pytest.mark.parametrize("N,K", [(576, 384), (130, 200), (1, 128), (256, 1000)])
def test_weight_quant_and_dequant_match_reference(N, K):
    w = torch.randn(N, K, device=DEV) * 0.05
    w_q, w_s = F.weight_quant(w)
    w_q_ref, w_s_ref = F.weight_quant_ref(w)
    assert w_s.shape == (-(-N // 128), -(-K // 128))
    assert same_bits(w_q, w_q_ref) and torch.equal(w_s, w_s_ref)
    deq = F.weight_dequant(w_q, w_s, dtype=torch.float32)
    assert torch.equal(deq, F.weight_dequant_ref(w_q, w_s, dtype=torch.float32))
    assert rel(deq, w.double()) < 0.04
    assert F.weight_dequant(w_q, w_s).dtype == torch.bfloat16


@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (37, 576, 384), (130, 384, 256), (300, 128, 128)])
def test_fp8_gemm_irregular_shapes(M, N, K):
    x, w = torch.randn(M, K, device=DEV), torch.randn(N, K, device=DEV)
    (a, a_s), (b, b_s) = F.act_quant(x), F.weight_quant(w)
    ref64 = dequant_a(a, a_s) @ F.weight_dequant_ref(b, b_s, dtype=torch.float64).T
    c32 = F.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    assert c32.shape == (M, N) and c32.dtype == torch.float32
    assert rel(c32, ref64) < TOL32                          # only the accumulation differs
    assert rel(F.fp8_gemm_ref(a, a_s, b, b_s, torch.float32), ref64) < 1e-6
    c16 = F.fp8_gemm(a, a_s, b, b_s)
    assert c16.dtype == torch.bfloat16 and rel(c16, ref64) < 8e-3
    assert 0.02 < rel(c32, x.double() @ w.double().T) < 0.06   # FP8 rounding of both operands: ≈ 3.7%


def test_fp8_gemm_leading_dims_and_empty():
    x, w = torch.randn(2, 3, 256, device=DEV), torch.randn(128, 256, device=DEV)
    (a, a_s), (b, b_s) = F.act_quant(x), F.weight_quant(w)
    c = F.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    assert c.shape == (2, 3, 128)
    assert rel(c, dequant_a(a, a_s) @ F.weight_dequant_ref(b, b_s, dtype=torch.float64).T) < TOL32
    e, e_s = F.act_quant(torch.randn(0, 256, device=DEV))
    assert F.fp8_gemm(e, e_s, b, b_s).shape == (0, 128)


@pytest.mark.parametrize("cfg", [
    dict(BLOCK_M=32, BLOCK_N=256),                                  # weight scales as a vector (2 blocks per tile)
    dict(BLOCK_M=64, BLOCK_N=64, SPLIT_K=3),                        # split-K with float32 atomics
    dict(kernel="tma", BLOCK_M=64, BLOCK_N=128, programs=2),        # TMA descriptors, persistent grid
    dict(kernel="tma", BLOCK_M=32, BLOCK_N=64, DEFER=True),
    dict(kernel="tma", BLOCK_M=32, BLOCK_N=128, HALVES=True),
])
def test_gemm_kernel_variants(cfg):
    if DEV == "cpu" and cfg.get("kernel") == "tma" and not F.INTERPRET:
        pytest.skip("TMA descriptors need sm_90 or the interpreter")
    a, a_s = F.act_quant(torch.randn(70, 384, device=DEV))
    b, b_s = F.weight_quant(torch.randn(320, 384, device=DEV))
    ref = dequant_a(a, a_s) @ F.weight_dequant_ref(b, b_s, dtype=torch.float64).T
    assert rel(F._launch_gemm(a, a_s, b, b_s, torch.float32, cfg), ref) < TOL32


def test_gluon_kernel_compiles_for_hopper():
    """The Gluon GEMM runs only on an sm_90 GPU, which CI lacks: compile it for sm_90a on the CPU instead (Triton's
    front end, its MLIR passes and ptxas all run on the host), so a Triton upgrade that breaks it fails here."""
    gl = pytest.importorskip("triton.experimental.gluon.language", reason="this Triton has no Gluon dialect")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(block, dtype, name):
        return f"tensordesc<{name}[{block[0]}, {block[1]}],{gl.NVMMASharedLayout.get_default_for(block, dtype)!r}>"

    sig = {"a_desc": desc([64, 128], gl.float8e4nv, "fp8e4nv"), "b_desc": desc([128, 128], gl.float8e4nv, "fp8e4nv"),
           "c_desc": desc([64, 128], gl.bfloat16, "bf16"), "A_s": "*fp32", "B_s": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "GROUP_M": "constexpr", "STAGES": "constexpr", "NUM_PROGRAMS": "constexpr",
           "MATH_REGS": "constexpr"}
    consts = {"GROUP_M": 8, "STAGES": 4, "NUM_PROGRAMS": 132, "MATH_REGS": F.GLUON_MATH_REGS}
    src = GluonASTSource(F._gluon_gemm_kernel(), sig, {(list(sig).index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 128})
    ptx = k.asm["ptx"]
    assert k.asm["cubin"]                                                 # ptxas accepted it
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 3 * 4  # 3 groups x 4 k32 steps
    assert re.search(rf"setmaxnreg\.inc\.sync\.aligned\.u32\s+{F.GLUON_MATH_REGS};", ptx)  # math groups' registers
    assert k.metadata.num_warps == 4 + 3 * 4                             # loader + three math warp groups
    assert k.metadata.shared <= 227 * 1024                               # fits an sm_90 SM's shared memory


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_fp8_linear_fused_equals_two_step(fmt):
    x = torch.randn(5, 7, 256, device=DEV)
    w_q, w_s = F.weight_quant(torch.randn(192, 256, device=DEV))
    two = F.fp8_gemm(*F.act_quant(x, scale_fmt=fmt), w_q, w_s, out_dtype=torch.float32)
    assert torch.allclose(F.fp8_linear(x, w_q, w_s, scale_fmt=fmt), two, rtol=1e-6, atol=1e-5)
    assert torch.allclose(F.fp8_linear(x, w_q, w_s, scale_fmt=fmt, fused=True), two, rtol=1e-6, atol=1e-5)


def test_fp8linear_layer():
    lin = torch.nn.Linear(512, 576, bias=True).to(DEV)
    layer = F.FP8Linear.from_linear(lin)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale.shape == (5, 4)
    x = torch.randn(3, 11, 512, device=DEV)
    with torch.no_grad():
        y, y_lin = layer(x), lin(x)
    assert y.shape == (3, 11, 576) and y.dtype == torch.float32
    assert rel(y, y_lin.double()) < 0.06
    # the PyTorch reference path (used without a GPU) and the kernels agree up to summation order
    ref = F.fp8_gemm_ref(*F.act_quant_ref(x), layer.weight, layer.scale, torch.float32) + layer.bias
    assert rel(y, ref.double()) < TOL32
    # from_fp8 wraps checkpoint tensors without copying them through bf16
    again = F.FP8Linear.from_fp8(layer.weight, layer.scale)
    assert again.weight is layer.weight and set(again.state_dict()) == {"weight", "scale"}
    # casting the model to bf16 must not touch the FP8 weight or its float32 scales
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert torch.allclose(layer.dequantize(torch.float32), F.weight_dequant_ref(layer.weight, layer.scale,
                                                                                dtype=torch.float32))


def _bad(call, *needles):
    with pytest.raises(ValueError) as err:
        call()
    for n in needles:
        assert n in str(err.value), str(err.value)


def test_bad_input_is_refused():
    torch.set_default_device(DEV)   # every tensor below on the kernels' device (CPU tensors: see the next test)
    try:
        _bad_inputs()
    finally:
        torch.set_default_device(None)


def test_cpu_tensors_on_a_gpu_machine_are_refused():
    """Compiled kernels cannot read host memory: a clear error instead of Triton's 'Pointer argument' message."""
    if DEV == "cpu":
        pytest.skip("on a machine without a GPU the kernels run CPU tensors through the interpreter")
    _bad(lambda: F.act_quant(torch.randn(4, 256)), "act_quant", "x.device", "cpu", "CUDA tensor")
    a, a_s = F.act_quant(torch.randn(4, 256, device=DEV))
    b, b_s = F.weight_quant(torch.randn(128, 256, device=DEV))
    _bad(lambda: F.fp8_gemm(a.cpu(), a_s.cpu(), b.cpu(), b_s.cpu()), "fp8_gemm", "a.device", "CUDA tensor")


def _bad_inputs():
    a, a_s = F.act_quant(torch.randn(4, 256))
    b, b_s = F.weight_quant(torch.randn(128, 256))
    _bad(lambda: F.act_quant(torch.randn(4, 200)), "act_quant", "200", "multiple of 128")
    _bad(lambda: F.act_quant(torch.randn(256, 4).t()), "act_quant", "contiguous")
    _bad(lambda: F.act_quant(torch.randn(4, 256), scale_fmt="e8m0"), "scale_fmt", "'ue8m0'")
    _bad(lambda: F.act_quant(torch.randn(4, 256), block_size=64), "block_size", "64")
    _bad(lambda: F.act_quant(torch.ones(4, 256, dtype=torch.int32)), "x.dtype", "int32")
    _bad(lambda: F.weight_quant(torch.randn(2, 3, 128)), "w.dim()", "3")
    _bad(lambda: F.weight_dequant(b, b_s[:, :1]), "s.shape", "(1, 1)")
    _bad(lambda: F.weight_dequant(b.float(), b_s), "w.dtype", "float8_e4m3fn")
    _bad(lambda: F.fp8_gemm(a.float(), a_s, b, b_s), "fp8_gemm", "a.dtype")
    _bad(lambda: F.fp8_gemm(a, a_s.bfloat16(), b, b_s), "a_s.dtype", "bfloat16")
    _bad(lambda: F.fp8_gemm(a, a_s[:, :1].contiguous(), b, b_s), "a_s.shape", "(4, 1)")
    _bad(lambda: F.fp8_gemm(a, a_s, b, b_s[:, :1].contiguous()), "b_s.shape", "(1, 1)")
    _bad(lambda: F.fp8_gemm(a, a_s, b, b_s.t().contiguous()), "b_s.shape")
    _bad(lambda: F.fp8_gemm(a, a_s, b.float(), b_s), "b.dtype")
    _bad(lambda: F.fp8_gemm(a, a_s, *F.weight_quant(torch.randn(128, 384))), "b.shape[1]", "384", "K = 256")
    _bad(lambda: F.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float16), "out_dtype")
    big_b = torch.zeros(128, 200, dtype=torch.float8_e4m3fn)
    _bad(lambda: F.fp8_gemm(torch.zeros(4, 200, dtype=torch.float8_e4m3fn), torch.ones(4, 1), big_b,
                            torch.ones(1, 2)), "K", "200", "multiple of 128")
    _bad(lambda: F.fp8_linear(torch.randn(4, 256).t(), b, b_s), "contiguous")
    _bad(lambda: F.FP8Linear(200, 64), "in_features", "200")
    _bad(lambda: F.FP8Linear.from_fp8(b, b_s.double()), "b_s.dtype")
