"""Host time per call of the Gluon FP8 GEMM: launched through Triton's JIT on every call, or (as `_launch_gluon` does
after the first call) as the compiled kernel directly; beside the course's `tl` TMA kernel. Also the GPU rate with
`do_bench` (host time counts when it starves the GPU) and with CUDA-graph replay (host time left out).

Needs an sm_90 GPU. Usage: python benchmarks/gluon_launch_overhead.py [--out benchmarks/results/gluon_launch_overhead_h200.json]
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from dsv3_lite.kernels import fp8 as F8  # noqa: E402

SHAPES = [(2048, 32768, 512), (4096, 7168, 2048), (4096, 1536, 7168), (4096, 18432, 7168)]   # M, N, K
TL = dict(kernel="tma", BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, programs=264)  # the tl kernel
GLUON = dict(kernel="gluon", BLOCK_M=F8.GLUON_GROUPS * F8.GLUON_ROWS, BLOCK_N=F8.BLOCK, num_stages=4)


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
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gluon_launch_overhead_h200.json")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench, do_bench_cudagraph
    rec = {"benchmark": "benchmarks/gluon_launch_overhead.py (see its docstring)",
           "machine": {"gpu": torch.cuda.get_device_name(), "host_cpu": platform.processor() or platform.machine()},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
           "date": datetime.date.today().isoformat(), "rows": []}
    torch.manual_seed(0)
    for M, N, K in SHAPES:
        a, a_s = F8.act_quant(torch.randn(M, K, device="cuda"))
        b, b_s = F8.weight_quant(torch.randn(N, K, device="cuda"))
        flops = 2.0 * M * N * K

        def gluon():
            return F8._launch_gemm(a, a_s, b, b_s, torch.bfloat16, GLUON)

        def gluon_jit():                      # forget the compiled kernel: every call binds through the JIT
            F8._GLUON_COMPILED.clear()
            return gluon()

        def tl():
            return F8._launch_gemm(a, a_s, b, b_s, torch.bfloat16, TL)

        row = {"M": M, "N": N, "K": K,
               "host_us": {"gluon_jit_every_call": host_us(gluon_jit), "gluon_direct": host_us(gluon),
                           "tl": host_us(tl)}}
        for name, fn in (("gluon_direct", gluon), ("tl", tl)):
            row[name] = {"do_bench_tflops": round(flops / do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e9, 1),
                         "graph_tflops": round(flops / do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e9, 1)}
        rec["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
