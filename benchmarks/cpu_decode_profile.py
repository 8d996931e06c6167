"""Where a batch-1 CPU decode step of the tiny model goes (notebooks/07_model.ipynb, issue 5): the whole step, the
time inside the matrix products (`aten::mm`/`addmm`/`bmm`, torch.profiler), and how fast this CPU streams weights
through a matrix-vector product compared with a plain reduction over the same bytes.

One thread, float32, the config of benchmarks/model_cpu.py. The weight-streaming test cycles through ~50 MB of
distinct matrices so that they come from L3/DRAM, as a decode step's weights do. Results are machine-specific (they
explain benchmarks/results/model_cpu.json on the machine it was measured on).
Usage: python benchmarks/cpu_decode_profile.py [--out benchmarks/results/cpu_decode_profile.json]
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from model_cpu import ARGS
from timing import cpu_name, run_info

from dsv3_lite import Transformer


def per_call_us(fns, reps=3):
    """Mean microseconds per call over `reps` passes through the list of zero-argument callables."""
    for f in fns:
        f()
    t0 = time.perf_counter()
    for _ in range(reps):
        for f in fns:
            f()
    return (time.perf_counter() - t0) / (reps * len(fns)) * 1e6


def stream(shape, total_bytes=50e6):
    """GB/s of F.linear(x, W) and of W.sum() over distinct matrices W of `shape` (float32) totalling ~50 MB."""
    n = max(2, int(total_bytes // (shape[0] * shape[1] * 4)))
    ws = [torch.randn(*shape) for _ in range(n)]
    x = torch.randn(1, shape[1])
    nbytes = shape[0] * shape[1] * 4
    lin = per_call_us([lambda w=w: F.linear(x, w) for w in ws])
    red = per_call_us([lambda w=w: w.sum() for w in ws])
    return {"shape": list(shape), "linear_us": round(lin, 1), "linear_GBps": round(nbytes / lin / 1e3, 1),
            "sum_us": round(red, 1), "sum_GBps": round(nbytes / red / 1e3, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_decode_profile.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    model.setup_cache(1, 128)
    x = torch.randint(0, ARGS.vocab_size, (1, 1))
    with torch.no_grad():
        model(torch.randint(0, ARGS.vocab_size, (1, 16)), 0)
        step = lambda: model(x, 16, last_only=True)  # noqa: E731
        times = []
        for _ in range(20):
            step()
        for _ in range(200):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        step_ms = sorted(times)[len(times) // 2]
        with torch.profiler.profile() as prof:
            for _ in range(50):
                step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm_", "aten::addmm", "aten::bmm",
                                                              "aten::baddbmm"))
    calls = sum(e.count for e in ev if e.key.startswith("aten::")) / 50
    rec = {"benchmark": "benchmarks/cpu_decode_profile.py", **run_info(),
           "machine": {"cpu": cpu_name(), "threads": 1,
                       "cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)},
           "decode_step_ms_median": round(step_ms, 2),
           "matrix_product_share_of_profiled_cpu_time": round(mm / total, 2),
           "aten_ops_per_step_profiled_incl_nested": round(calls),
           "weight_streaming": [stream((128, 256)), stream((768, 256)), stream((2048, 256))],
           "notes": "the profiler slows the step; the share of time in matrix products is measured under it. "
                    "weight_streaming: F.linear(x [1, K], W [N, K]) and W.sum() over ~50 MB of distinct float32 "
                    "matrices, one thread"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
