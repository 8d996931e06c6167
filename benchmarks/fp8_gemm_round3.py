"""Round 3 of the FP8 GEMM kernel exploration (benchmarks/fp8_gemm_notes.md has rounds 1-2): two ideas, one run.

1. More programs per SM. The promoted kernel (`acc += dot(a, b) * scale`) waits for each `wgmma` before its
   float32 FMAs; rounds 1-2 ran one 8-warp program per SM (164-168 registers), so nothing filled that gap. Here:
   a register cap (`maxnreg=128`) so two 8-warp programs fit, and the deferred rescale on 64x128 tiles with 4 warps
   (three products of 32 registers each), 2-3 programs per SM.
2. The rescaled accumulator ("fast accumulation"): keep `acc` in units of the current K step's scale and let the
   tensor core add into it, `acc = dot(a_k, b_k, acc * s_{k-1} / s_k)`, times `s_last` at the end. No second
   128x128 float32 tile (half the registers: 128x256 tiles fit), but the tensor core then accumulates across the
   whole K in its reduced-precision adder, which is what DeepSeek-V3 §3.3.2 avoids by promoting every 128. Its
   float32-output error against a float64 product is measured beside the promoted kernels' to show the price.

Prints one line per shape; writes JSON (machine, versions, date) to --out.
Usage: python benchmarks/fp8_gemm_round3.py [--m 4096] [--out benchmarks/results/fp8_gemm_round3_h200.json]
On a CPU (no CUDA) `--check` runs the kernels once through the Triton interpreter on small shapes.
"""

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8_gemm_gpu import SHAPES, cublas_blockwise  # noqa: E402  (benchmarks/fp8_gemm_gpu.py)
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

from dsv3_lite.kernels import fp8 as F8  # noqa: E402  (first: Triton interpreter switch on CPU)
from dsv3_lite.kernels import tl, triton  # noqa: E402
from dsv3_lite.kernels.fp8 import _tile_coords  # noqa: E402


@triton.jit
def _rescaled_acc_kernel(a_desc, A_s, b_desc, B_s, C, M, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    """acc_k = dot(a_k, b_k) + acc_{k-1} * s_{k-1}/s_k; C = acc_last * s_last (s = a_s[m] * b_s[n // 128])."""
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    nkb = K // BLOCK_K
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.where(offs_m < M, offs_m, 0)
        rn = tl.where(offs_n < N, offs_n, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sa_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
        sb_prev = tl.full((BLOCK_N,), 1.0, tl.float32)
        for kb in range(nkb):
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            sa = tl.load(A_s + rm * nkb + kb)                      # [BLOCK_M]
            sb = tl.load(B_s + (rn // BLOCK_K) * nkb + kb)         # [BLOCK_N]
            acc = tl.dot(a, b.T, acc * ((sa_prev / sa)[:, None] * (sb_prev / sb)[None, :]))
            sa_prev, sb_prev = sa, sb
        acc = acc * (sa_prev[:, None] * sb_prev[None, :])
        tl.store(C + offs_m[:, None] * N + offs_n[None, :], acc.to(C.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def launch(a, a_s, b, b_s, out_dtype, cfg):
    """One variant: 'promoted' = the course kernel (`_fp8_gemm_tma_kernel`), 'rescaled' = the kernel above."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = a.shape
    N = b.shape[0]
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    c = a.new_empty(M, N, dtype=out_dtype)
    tiles = F8._cdiv(M, BM) * F8._cdiv(N, BN)
    n_prog = min(tiles, cfg["programs"]) if cfg.get("programs") else tiles
    opts = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
    a_desc = TensorDescriptor.from_tensor(a, [BM, 128])
    b_desc = TensorDescriptor.from_tensor(b, [BN, 128])
    if cfg["kernel"] == "rescaled":
        k = _rescaled_acc_kernel[(n_prog,)](a_desc, a_s, b_desc, b_s, c, M, N, K, BLOCK_M=BM, BLOCK_N=BN,
                                            BLOCK_K=128, GROUP_M=8, NUM_PROGRAMS=n_prog, **opts)
    else:
        k = F8._fp8_gemm_tma_kernel[(n_prog,)](a_desc, a_s, b_desc, b_s, c, M, N, K, BLOCK_M=BM, BLOCK_N=BN,
                                               BLOCK_K=128, GROUP_M=8, NUM_PROGRAMS=n_prog,
                                               DEFER=cfg.get("DEFER", False), HALVES=False, **opts)
    return c, getattr(k, "n_regs", None), getattr(k, "n_spills", None)


VARIANTS = {  # programs: per SM (multiplied by the SM count); None = one program per tile
    "promoted_128x128_s3_x2 (course best)": dict(kernel="promoted", BLOCK_M=128, BLOCK_N=128, num_warps=8,
                                                   num_stages=3, programs=2),
    "promoted_128x128_s3_x2_maxnreg128": dict(kernel="promoted", BLOCK_M=128, BLOCK_N=128, num_warps=8,
                                              num_stages=3, programs=2, maxnreg=128),
    "promoted_128x128_s2_x2_maxnreg128": dict(kernel="promoted", BLOCK_M=128, BLOCK_N=128, num_warps=8,
                                              num_stages=2, programs=2, maxnreg=128),
    "deferred_64x128_w4_s4_x2": dict(kernel="promoted", DEFER=True, BLOCK_M=64, BLOCK_N=128, num_warps=4,
                                     num_stages=4, programs=2),
    "deferred_64x128_w4_s3_x3": dict(kernel="promoted", DEFER=True, BLOCK_M=64, BLOCK_N=128, num_warps=4,
                                     num_stages=3, programs=3),
    "deferred_128x128_s3_x2_maxnreg128": dict(kernel="promoted", DEFER=True, BLOCK_M=128, BLOCK_N=128,
                                              num_warps=8, num_stages=3, programs=2, maxnreg=128),
    "rescaled_128x128_s4_x1": dict(kernel="rescaled", BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4,
                                   programs=1),
    "rescaled_128x128_s3_x2": dict(kernel="rescaled", BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3,
                                   programs=2),
    "rescaled_128x256_s3_x1": dict(kernel="rescaled", BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3,
                                   programs=1),
    "rescaled_128x256_s3": dict(kernel="rescaled", BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
}


def rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def check_cpu():
    """Interpreter run on small shapes: both kernels against the float64 product of the dequantised operands."""
    torch.manual_seed(0)
    for M, N, K in ((70, 256, 384), (129, 384, 256)):
        x, w = torch.randn(M, K), torch.randn(N, K)
        aq, a_s = F8.act_quant_ref(x)
        bq, b_s = F8.weight_quant_ref(w)
        ref = (aq.double() * a_s.double().repeat_interleave(128, -1)) @ (
            F8.weight_dequant_ref(bq, b_s, dtype=torch.float64)).T
        for name in ("rescaled", "promoted"):
            out, _, _ = launch(aq, a_s, bq, b_s, torch.float32,
                               dict(kernel=name, BLOCK_M=64, BLOCK_N=128, num_warps=4, programs=None))
            err = rel(out, ref)
            print(f"interpreter M={M} N={N} K={K} {name}: rel err vs float64 {err:.2e}")
            assert err < 1e-5, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="4096")
    ap.add_argument("--check", action="store_true", help="CPU: interpreter correctness check only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp8_gemm_round3_h200.json")
    args = ap.parse_args()
    if args.check or not torch.cuda.is_available():
        return check_cpu()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rec = {"benchmark": "benchmarks/fp8_gemm_round3.py: FP8 GEMM kernel variants, round 3 (see its docstring)",
           "method": "median of triton.testing.do_bench(warmup=25 ms, rep=100 ms; L2 flushed), bf16 output timed; "
                     "err_bf16: relative Frobenius error of the bf16 output vs float64 product of the dequantised "
                     "operands; err_fp32: the same with float32 output (accumulation error alone)",
           "machine": {"gpu": torch.cuda.get_device_name(), "sms": sms},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version()},
           "date": datetime.date.today().isoformat(), "variants": VARIANTS, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for M in map(int, args.m.split(",")):
        for layer, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            aq, a_s = F8.act_quant(x)
            bq, b_s = F8.weight_quant(w)
            rows = torch.cat([torch.arange(128, device="cuda"), torch.arange(M - 128, M, device="cuda")])
            a64 = aq[rows].double() * a_s[rows].double().repeat_interleave(128, -1)
            ref = a64 @ F8.weight_dequant(bq, b_s, dtype=torch.float32).double().T     # [256, N]
            row = {"M": M, "layer": layer, "N": N, "K": K}
            flops = 2.0 * M * N * K

            def timed(name, fn, fn32=None):
                try:
                    out = fn()
                    res = {"err_bf16": round(rel(out[rows], ref), 6)}
                    if fn32 is not None:
                        res["err_fp32"] = float(f"{rel(fn32()[rows], ref):.3e}")
                    ms = median_ms(fn, "cuda", rep_ms=100)
                    res.update(us=round(ms * 1e3, 2), tflops=round(flops / (ms * 1e-3) / 1e12, 1))
                except Exception as err:  # one failing variant must not lose the run
                    res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                row[name] = res

            timed("bf16", lambda: x @ w.t())
            timed("cublas_bw", lambda: cublas_blockwise(aq, a_s, bq, b_s),
                  lambda: cublas_blockwise(aq, a_s, bq, b_s, torch.float32))
            for vname, v in VARIANTS.items():
                cfg = dict(v, programs=v["programs"] * sms if v.get("programs") else None)
                timed(vname, lambda cfg=cfg: launch(aq, a_s, bq, b_s, torch.bfloat16, cfg)[0],
                      lambda cfg=cfg: launch(aq, a_s, bq, b_s, torch.float32, cfg)[0])
                if "error" not in row[vname]:
                    _, regs, spills = launch(aq, a_s, bq, b_s, torch.bfloat16, cfg)
                    row[vname].update(n_regs=regs, n_spills=spills)
            rec["rows"].append(row)
            print("ROW", M, layer, json.dumps({k: (v.get("tflops"), v.get("err_fp32"), v.get("n_regs"))
                                               if "error" not in v else v["error"]
                                               for k, v in row.items() if isinstance(v, dict)}), flush=True)
            args.out.write_text(json.dumps(rec, indent=1) + "\n")
            torch.cuda.empty_cache()
    names = ["bf16", "cublas_bw", *VARIANTS]
    for M in sorted({r["M"] for r in rec["rows"]}):
        rs = [r for r in rec["rows"] if r["M"] == M]
        g = {n: round(math.exp(sum(math.log(r[n]["tflops"]) for r in rs) / len(rs)), 1)
             for n in names if all("tflops" in r[n] for r in rs)}
        rec.setdefault("geomean_tflops", {})[str(M)] = g
        print("GEOMEAN", M, json.dumps(g, indent=1))
    args.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
