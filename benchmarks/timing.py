"""Timing helper shared by the benchmark scripts: median of `triton.testing.do_bench` on CUDA (it flushes L2 between
calls, shared/reference/gpu_anchors.md §11), median of three wall-clock runs on CPU (for the scripts' --small checks)."""

import time


def median_ms(fn, device: str, rep_ms: int = 200) -> float:
    """Median milliseconds of fn(), after one warm-up call (compilation and autotuning excluded)."""
    fn()
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]
