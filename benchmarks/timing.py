"""Helpers shared by the benchmark scripts: `median_ms`, the median of `triton.testing.do_bench` on CUDA (it flushes L2
between calls, shared/reference/gpu_anchors.md §11) or of three wall-clock runs on CPU (for the scripts' --small
checks); `gpu_warmup`, run before the first timing so a cold GPU's clocks do not slow the first rows; `cpu_name`, the
CPU model recorded with CPU results."""

import platform
import time
from pathlib import Path


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


def gpu_warmup(seconds: float = 2.0) -> None:
    """Keep the GPU busy with bf16 matrix products for `seconds` (a freshly started H200 timed its first shape up to
    1.5x slower than later ones: benchmarks/fp8_gemm_notes.md, round 6)."""
    import torch

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            x @ x
        torch.cuda.synchronize()


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
