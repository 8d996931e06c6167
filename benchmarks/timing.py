"""Helpers shared by the benchmark scripts: `median_ms`, the median of `triton.testing.do_bench` on CUDA (it flushes L2
between calls) or of three wall-clock runs on CPU (for the scripts' --small checks); `step_ms`, the median of single
calls timed with CUDA events (decode steps, which must not be repeated back to back without a reset); `gpu_warmup`,
run before the first timing so a cold GPU's clocks do not slow the first rows; `cpu_name`, the CPU model recorded
with CPU results; `run_info`, what every results file records about the run (git commit, uncommitted changes, date,
versions); `write_record`, the results file itself."""

import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def step_ms(step, n: int, device: str, before=None) -> float:
    """Median milliseconds of step() over n calls, each timed alone: CUDA events on a GPU, the wall clock on a CPU.
    before(), if given, runs before each call, untimed."""
    import torch

    times = []
    for _ in range(n):
        if before is not None:
            before()
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_warmup(seconds: float = 2.0) -> None:
    """Keep the GPU busy with bf16 matrix products for `seconds` (a freshly started H200 timed its first shape up to
    1.5x slower than later ones: benchmarks/NOTES.md, the three-warp-group GEMM)."""
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


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(**versions: str | None) -> dict:
    """The fields every results JSON starts with, so a number can be traced to the code that produced it:

    commit   the git commit of the checkout (`git show <commit>:<path>` recovers the script and the kernels);
    dirty    True if files differed from that commit (tracked changes, or untracked files outside
             benchmarks/results/): the code measured is then not exactly the commit's; None outside a git checkout;
    date     UTC date and time of the run;
    versions Python, PyTorch, Triton and transformers as installed (None if absent), plus `versions` given here
             (e.g. cuda=torch.version.cuda).
    """
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    installed = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed[name] = None
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": installed | versions}


def write_record(path: Path | None, record: dict) -> None:
    """Write a results record as indented JSON at `path` (its folder created), and say where; nothing without a
    path."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print("wrote", path)
