"""Block-scaled FP8 GEMM on one GPU: the course's Triton kernels vs bf16 cuBLAS and cuBLAS block-scaled FP8.

Shapes: nine DeepSeek-V3 linear shapes N×K (`SHAPES`) at M = 64, 128, 512, 2048, 4096, 16384. FP8 operands are
quantised from the same random bf16 data as the bf16 baseline: activations per 1×128 tile, weights per 128×128 block
(our `act_quant`/`weight_quant`).

Providers, all timed in one process with the median of `triton.testing.do_bench` (it flushes L2 before each call):
  bf16        x @ W.t() in bf16 (cuBLAS through PyTorch)
  cublas_bw   torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128 / BlockWise128x128 (DeepSeek's recipe)
  fp8_gemm    dsv3_lite.kernels.fp8.fp8_gemm on pre-quantised operands (autotuned per M bucket, warmed up first)
  aq_gemm     act_quant + fp8_gemm (activation quantisation on every call)
  linear      fp8_linear(fused=True): both in one kernel, for M <= 512
For M <= 512 also: the GPU time from CUDA-graph replays (no host overhead) and `host_us`, the host time of one eager
call (Python, argument checks and the kernel launch) for bf16, cuBLAS block-scaled, fp8_gemm and act_quant.
Every provider is checked before it is timed: relative Frobenius error against a float32 GEMM of the dequantised
operands (only accumulation order and the bf16 output differ: ~3e-3) and against the unquantised product (~0.037).

--explore also times every configuration the autotuner chooses from (`gemm_candidates`) at M = 64 and 4096, each
run with `fp8_gemm(..., config=...)`. The record of the experiments that led to these kernels is benchmarks/NOTES.md.

Every results file starts with `timing.run_info()`: the git commit measured and whether the tree was dirty.

Usage: python benchmarks/fp8_gemm_gpu.py [--explore] [--out benchmarks/results/fp8_gemm_h200.json]
"""

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from timing import gpu_warmup, median_ms, run_info  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels.fp8 as KF  # noqa: E402
from dsv3_lite.fp8 import FP8, act_quant_ref, weight_quant_ref  # noqa: E402

SHAPES = {  # name: (N, K)
    "wq_a": (1536, 7168), "wq_b": (24576, 1536), "wkv_b": (32768, 512), "wo": (7168, 16384),
    "dense_w13": (18432, 7168), "dense_w2": (7168, 18432), "expert_w1": (2048, 7168), "expert_w2": (7168, 2048),
    "head": (129280, 7168),
}
MS = (64, 128, 512, 2048, 4096, 16384)


def cublas_blockwise(aq, a_s, bq, b_s, out_dtype=torch.bfloat16):
    """cuBLAS block-scaled FP8 through PyTorch, in the layout it accepts on sm_90 (scales of A column-major)."""
    try:
        from torch.nn.functional import ScalingType, scaled_mm
    except ImportError:   # older PyTorch: the private spelling infers the recipe from the scale shapes
        return torch._scaled_mm(aq, bq.t(), scale_a=a_s.t().contiguous().t(), scale_b=b_s.t(), out_dtype=out_dtype)
    return scaled_mm(aq, bq.t(), a_s.t().contiguous().t(), ScalingType.BlockWise1x128,
                     b_s.t(), ScalingType.BlockWise128x128, output_dtype=out_dtype)


def rel(x, ref):
    return float((x.float() - ref).norm() / ref.norm())


class Case:
    """Operands of one (M, N, K) and the float32 references for the rows that are checked."""

    def __init__(self, M, N, K):
        self.M, self.N, self.K = M, N, K
        self.x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        self.w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        self.aq, self.a_s = KF.act_quant(self.x)
        self.bq, self.b_s = KF.weight_quant(self.w)
        rows = torch.arange(M, device="cuda") if M <= 512 else torch.cat(
            [torch.arange(256, device="cuda"), torch.arange(M - 256, M, device="cuda")])
        self.rows = rows
        # weight copies for graph timing of small M: together at least 3x the 60 MB L2
        self.copies = min(16, max(1, math.ceil(180e6 / (N * K)))) if M <= 512 else 1
        self.w_copies = [self.w] + [self.w.clone() for _ in range(self.copies - 1)]
        self.bq_copies = [self.bq] + [self.bq.clone() for _ in range(self.copies - 1)]
        self.bs_copies = [self.b_s] + [self.b_s.clone() for _ in range(self.copies - 1)]
        b32 = KF.weight_dequant(self.bq, self.b_s, dtype=torch.float32)
        a32 = self.aq.view(torch.uint8)[rows].view(FP8).float() * self.a_s[rows].repeat_interleave(128, -1)
        self.ref_deq = a32 @ b32.T                                     # [rows, N] fp32
        self.ref_exact = self.x[rows].float() @ self.w.float().T
        del b32, a32

    def errors(self, out):
        o = out[self.rows]
        if not torch.isfinite(o).all():
            return {"err_vs_dequant": float("nan"), "err_vs_exact": float("nan")}
        return {"err_vs_dequant": round(rel(o, self.ref_deq), 6), "err_vs_exact": round(rel(o, self.ref_exact), 5)}

    def flops(self):
        return 2.0 * self.M * self.N * self.K

    def fp8_bytes(self):   # FP8 operands + fp32 scales + bf16 output
        M, N, K = self.M, self.N, self.K
        return M * K + N * K + 4 * (M * K // 128 + math.ceil(N / 128) * K // 128) + 2 * M * N


def graph_us(fn, copies=1, trials=5, reps=10):
    """GPU time per call without host overhead: `copies` calls captured in one CUDA graph, replayed; median of
    `trials`. With copies > 1 each call reads its own copy of the weights, so L2 (60 MB) cannot hold them."""
    fns = [lambda i=i: fn(i) for i in range(copies)]
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * copies))
    return sorted(times)[len(times) // 2]


def host_us(fn, calls=200, trials=5):
    """Host time per eager call: `calls` calls back to back, no synchronisation inside the loop, median of `trials`.
    The launches are asynchronous, so while the GPU keeps up (the queue never fills in 200 calls) the loop's wall time
    is the Python + launch time per call; the GPU's own time is measured separately (graph_us)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return round(sorted(times)[trials // 2], 2)


def fn_copy(fn, case, i):
    """Call fn with the weights of copy i swapped in (the closures read case.w / case.bq / case.b_s)."""
    case.w, case.bq, case.b_s = case.w_copies[i], case.bq_copies[i], case.bs_copies[i]
    try:
        return fn()
    finally:
        case.w, case.bq, case.b_s = case.w_copies[0], case.bq_copies[0], case.bs_copies[0]


def bench(fn, case, out_check=True, graph=False):
    """Check, then time: do_bench median (host overhead included when it exceeds the L2 flush), and with
    graph=True also the CUDA-graph time with rotated weight copies (the kernel's own time)."""
    res = {}
    try:
        out = fn()
        torch.cuda.synchronize()
        if out_check:
            res.update(case.errors(out))
        del out
        ms = median_ms(fn, "cuda", rep_ms=100)
        res["us"] = round(ms * 1e3, 2)
        res["tflops"] = round(case.flops() / (ms * 1e-3) / 1e12, 1)
        if graph:
            us = graph_us(lambda i: fn_copy(fn, case, i), copies=case.copies)
            res["graph_us"] = round(us, 2)
            res["graph_tflops"] = round(case.flops() / (us * 1e-6) / 1e12, 1)
    except Exception as err:  # record and carry on: one failing provider must not lose the run
        res["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        traceback.print_exc()
    return res


def explore(log):
    """Time every candidate configuration of the autotuner on each shape, at a decode and a prefill size."""
    rows = []
    for M in (64, 4096):
        for name, (N, K) in SHAPES.items():
            case = Case(M, N, K)
            row = {"M": M, "layer": name, "N": N, "K": K,
                   "cublas_bw": bench(lambda: cublas_blockwise(case.aq, case.a_s, case.bq, case.b_s), case,
                                      graph=M <= 512),
                   "candidates": []}
            for cfg in KF.gemm_candidates(M, N, K):
                r = bench(lambda cfg=cfg: KF.fp8_gemm(case.aq, case.a_s, case.bq, case.b_s, config=cfg), case,
                          graph=M <= 512)
                row["candidates"].append({"config": cfg, **r})
            rows.append(row)
            print("EXPLORE", json.dumps({"M": M, "layer": name, "cublas": row["cublas_bw"].get("tflops"),
                                         "candidates": [(c["config"], c.get("tflops"), c.get("graph_tflops"))
                                                        for c in row["candidates"]]}), flush=True)
            log["candidates"] = rows
            case = None  # free the GPU memory before the next shape
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp8_gemm_h200.json")
    ap.add_argument("--explore", action="store_true", help="also time every candidate configuration of the autotuner")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemm_gpu.py needs a CUDA GPU (sm_90 for cuBLAS block-scaled FP8)")
    torch.backends.cuda.matmul.allow_tf32 = False                   # float32 references in float32
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rec = {
        "benchmark": "block-scaled FP8 GEMM C[M,N] = A[M,K] @ B[N,K].T, bf16 output, DeepSeek-V3 linear shapes",
        "method": "median of triton.testing.do_bench(warmup=25 ms, rep=100 ms; L2 flushed before each call), "
                  "torch.randn bf16 data, FP8 operands quantised from it (1x128 activation tiles, 128x128 weight "
                  "blocks, scale = max(amax, 1e-4)/448); TFLOP/s = 2MNK/time; all providers in one process; errors "
                  "are relative Frobenius norms on checked rows (all rows for M <= 512, first and last 256 otherwise)",
        **run_info(cuda=torch.version.cuda),
        "machine": {"gpu": torch.cuda.get_device_name(), "sms": sms, "host": platform.node(),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability()))},
    }
    print(json.dumps(rec, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.out.write_text(json.dumps(rec, indent=1) + "\n")

    # act_quant / weight_quant on the GPU give the same bits as the PyTorch references
    x = torch.randn(333, 7168, device="cuda", dtype=torch.bfloat16) * 5
    y, s = KF.act_quant(x)
    yr, sr = act_quant_ref(x)
    wq, ws = KF.weight_quant(x[:300, :1000].contiguous())
    wqr, wsr = weight_quant_ref(x[:300, :1000])
    rec["quantiser_bit_exact"] = {"act_quant": bool(torch.equal(y.view(torch.uint8), yr.view(torch.uint8))
                                                    and torch.equal(s, sr)),
                                  "weight_quant": bool(torch.equal(wq.view(torch.uint8), wqr.view(torch.uint8))
                                                       and torch.equal(ws, wsr))}
    print("quantisers bit-exact vs PyTorch:", rec["quantiser_bit_exact"], flush=True)

    if args.explore:
        t0 = time.time()
        explore(rec)
        rec["explore_seconds"] = round(time.time() - t0, 1)
        save()

    results = []
    gpu_warmup()
    for M in map(int, args.ms.split(",")):
        for name, (N, K) in SHAPES.items():
            case = Case(M, N, K)
            # warm up: compile and autotune this M bucket before anything is timed
            small = M <= 512
            for fused in (False, True) if small else (False,):
                KF.fp8_linear(case.x, case.bq, case.b_s, fused=fused)
            KF.fp8_gemm(case.aq, case.a_s, case.bq, case.b_s)
            row = {"M": M, "layer": name, "N": N, "K": K,
                   "bf16": bench(lambda: case.x @ case.w.t(), case, graph=small),
                   "cublas_bw": bench(lambda: cublas_blockwise(case.aq, case.a_s, case.bq, case.b_s), case,
                                      graph=small),
                   "fp8_gemm": bench(lambda: KF.fp8_gemm(case.aq, case.a_s, case.bq, case.b_s), case, graph=small),
                   "aq_gemm": bench(lambda: KF.fp8_gemm(*KF.act_quant(case.x), case.bq, case.b_s), case,
                                    graph=small),
                   "linear_fused": bench(lambda: KF.fp8_linear(case.x, case.bq, case.b_s, fused=True), case,
                                         graph=small) if small else {},
                   "act_quant": bench(lambda: KF.act_quant(case.x), case, out_check=False, graph=small)}
            if small:   # decode sizes: host time per eager call, where it can exceed the GPU time
                row["host_us"] = {
                    "bf16": host_us(lambda: case.x @ case.w.t()),
                    "cublas_bw": host_us(lambda: cublas_blockwise(case.aq, case.a_s, case.bq, case.b_s)),
                    "fp8_gemm": host_us(lambda: KF.fp8_gemm(case.aq, case.a_s, case.bq, case.b_s)),
                    "act_quant": host_us(lambda: KF.act_quant(case.x))}
            row["config"] = KF.tuned_config(M, N, K)
            row["config_fused"] = KF.tuned_config(M, N, K, fused=True)
            if M <= 128:
                for k in ("bf16", "cublas_bw", "fp8_gemm", "linear_fused"):
                    if "graph_us" in row[k]:
                        nbytes = 2 * (M * K + N * K + M * N) if k == "bf16" else case.fp8_bytes()
                        row[k]["graph_TBps"] = round(nbytes / (row[k]["graph_us"] * 1e-6) / 1e12, 2)
            results.append(row)
            print("ROW", json.dumps({k: (v.get("tflops"), v.get("err_vs_dequant")) if isinstance(v, dict) and
                                     "tflops" in v else v for k, v in row.items()}), flush=True)
            rec["results"] = results
            save()
            case = None  # free the GPU memory before the next shape
            torch.cuda.empty_cache()

    summary = {}
    for M in sorted({r["M"] for r in results}):
        rs = [r for r in results if r["M"] == M]
        g = {}
        for k in ("bf16", "cublas_bw", "fp8_gemm", "aq_gemm", "linear_fused"):
            for unit in ("tflops", "graph_tflops"):
                vals = [r[k].get(unit) for r in rs]
                if all(v for v in vals):
                    g[k if unit == "tflops" else k + "_graph"] = round(
                        math.exp(sum(math.log(v) for v in vals) / len(vals)), 1)
        for sfx in ("", "_graph"):
            if "fp8_gemm" + sfx in g and "cublas_bw" + sfx in g:
                g["fp8_gemm_over_cublas_bw" + sfx] = round(g["fp8_gemm" + sfx] / g["cublas_bw" + sfx], 3)
                g["fp8_gemm_over_bf16" + sfx] = round(g["fp8_gemm" + sfx] / g["bf16" + sfx], 3)
        if all("host_us" in r for r in rs):
            g["host_us_median"] = {k: sorted(r["host_us"][k] for r in rs)[len(rs) // 2] for k in rs[0]["host_us"]}
        summary[str(M)] = g
    rec["geomean_tflops"] = summary
    save()
    print("SUMMARY", json.dumps(summary, indent=1))
    print(f"{'M':>6} {'layer':>10} | {'bf16':>6} {'cuBLAS':>6} {'ours':>6} {'aq+ours':>7} {'fused':>6} | ours/cuBLAS"
          " (graph TFLOP/s where measured)")
    for r in results:
        t = {k: r[k].get("graph_tflops", r[k].get("tflops", float("nan")))
             for k in ("bf16", "cublas_bw", "fp8_gemm", "aq_gemm", "linear_fused")}
        print(f"{r['M']:>6} {r['layer']:>10} | {t['bf16']:>6.0f} {t['cublas_bw']:>6.0f} {t['fp8_gemm']:>6.0f} "
              f"{t['aq_gemm']:>7.0f} {t['linear_fused']:>6.0f} | {t['fp8_gemm'] / t['cublas_bw']:.2f}")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
