"""RMSNorm forward on one GPU: the course's Triton kernel vs PyTorch, side by side in one run.

Shapes: the three DeepSeek-V3 norm widths (N = 7168 block norms, 1536 q_norm, 512 kv_norm), rows M from a decode
step to a long prefill, bf16. Timing: median of `triton.testing.do_bench` (it flushes L2 between calls), random data,
everything checked for correctness before it is timed. Bandwidth counts the bytes that must move: read x, write y.

Usage: python benchmarks/rmsnorm_gpu.py [--out benchmarks/results/rmsnorm_h200.json]
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from timing import median_ms, run_info  # noqa: E402  (benchmarks/timing.py)

from dsv3_lite.kernels.rmsnorm import rms_norm_triton  # noqa: E402
from dsv3_lite.norm import rms_norm_ref  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rmsnorm_h200.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("rmsnorm_gpu.py needs a CUDA GPU")

    compiled = torch.compile(rms_norm_ref, dynamic=True)
    results = []
    for N in (7168, 1536, 512):
        for M in (1, 64, 512, 4096, 16384):
            x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            ref = rms_norm_ref(x, w)
            got = rms_norm_triton(x, w)
            torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2)  # bf16 resolution; rounding order may differ
            bytes_moved = 2 * M * N * x.element_size()
            row = {"M": M, "N": N, "max_abs_diff_vs_eager": float((got.float() - ref.float()).abs().max()),
                   "bit_identical_fraction": float((got == ref).float().mean())}
            for key, fn in [("triton", lambda: rms_norm_triton(x, w)),
                            ("F_rms_norm", lambda: F.rms_norm(x, (N,), w, 1e-6)),
                            ("eager", lambda: rms_norm_ref(x, w)),
                            ("compiled", lambda: compiled(x, w))]:
                ms = median_ms(fn, "cuda", rep_ms=100)
                row[f"{key}_us"] = round(ms * 1e3, 2)
                row[f"{key}_GBps"] = round(bytes_moved / (ms * 1e-3) / 1e9, 1)
            results.append(row)
            print(json.dumps(row))
    rec = {
        "benchmark": "RMSNorm forward, bf16, eps 1e-6",
        "method": "median of triton.testing.do_bench(warmup=25 ms, rep=100 ms), random N(0,1) data, "
                  "GB/s = 2*M*N*2 bytes / time; all providers timed in the same process",
        **run_info(cuda=torch.version.cuda),
        "machine": {"gpu": torch.cuda.get_device_name(), "host": platform.node(), "cpu": platform.processor()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
