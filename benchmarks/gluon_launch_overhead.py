"""Host time per call of the warp-specialised Gluon FP8 GEMM (which, after its first call, launches the compiled kernel
directly) beside the `tl` TMA kernel, both through `fp8_gemm(..., config=...)`; and the GPU rate of each with
`do_bench` (host time counts when it starves the GPU) and with CUDA-graph replay (host time left out).

Needs an sm_90 GPU. Every results file starts with `timing.run_info()` (git commit, dirty tree, date, versions).
Usage: python benchmarks/gluon_launch_overhead.py [--out benchmarks/results/gluon_launch_overhead_h200.json]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from timing import run_info  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels.fp8 as KF  # noqa: E402

SHAPES = [(2048, 32768, 512), (4096, 7168, 2048), (4096, 1536, 7168), (4096, 18432, 7168)]   # M, N, K
TL = dict(kernel="tma", BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, programs=264)  # the tl kernel
GLUON = dict(kernel="gluon", num_stages=4)


def host_us(fn, calls=200):
    """Host microseconds per call, launches queued without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return round(us, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gluon_launch_overhead_h200.json")
    args = ap.parse_args()
    if not KF.gluon_available():
        raise SystemExit("gluon_launch_overhead.py needs an sm_90 (Hopper) GPU with Triton's Gluon dialect")
    from triton.testing import do_bench, do_bench_cudagraph
    rec = {"benchmark": "benchmarks/gluon_launch_overhead.py (see its docstring)", **run_info(cuda=torch.version.cuda),
           "machine": {"gpu": torch.cuda.get_device_name(), "host_cpu": platform.processor() or platform.machine()},
           "rows": []}
    torch.manual_seed(0)
    for M, N, K in SHAPES:
        a, a_s = KF.act_quant(torch.randn(M, K, device="cuda"))
        b, b_s = KF.weight_quant(torch.randn(N, K, device="cuda"))
        flops = 2.0 * M * N * K
        runs = {"gluon_direct": lambda: KF.fp8_gemm(a, a_s, b, b_s, config=GLUON),
                "tl": lambda: KF.fp8_gemm(a, a_s, b, b_s, config=TL)}
        row = {"M": M, "N": N, "K": K, "host_us": {name: host_us(fn) for name, fn in runs.items()}}
        for name, fn in runs.items():
            ms, graph_ms = (do_bench(fn, warmup=25, rep=100, return_mode="median"),
                            do_bench_cudagraph(fn, rep=100, return_mode="median"))
            row[name] = {"do_bench_tflops": round(flops / ms / 1e9, 1), "graph_tflops": round(flops / graph_ms / 1e9, 1)}
        rec["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
