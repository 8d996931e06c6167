"""Kernel configurations of the grouped FP8 MoE GEMM on one GPU (notebooks/08_fp8_kernels.ipynb, `fp8_grouped_gemm`,
`fp8_grouped_swiglu`): rows per tile (the layout's BLOCK_M), warps and pipeline stages, timed for the routed experts
of one DeepSeek-V3 MoE layer (256 experts, top-8, 7168 → 2048, random uniform routing) at `--tokens` tokens.

For each of the three launches of the expert forward (w1 alone, as the anchors measure it; w1 and w3 with SwiGLU and
the FP8 quantisation of h; w2) it times every configuration (median of `triton.testing.do_bench`) and reports
TFLOP/s over the real (token, expert) rows, not the padding. The chosen configuration is then the default of
`_grouped_config` and `grouped_block_m`; benchmarks/NOTES.md records the run.

Usage:  python benchmarks/moe_fp8_configs.py --out benchmarks/results/moe_fp8_configs_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from timing import cpu_name, gpu_warmup, median_ms, run_info, write_record  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels  # noqa: E402

dsv3_lite.kernels.setup_triton()

import dsv3_lite.kernels.fp8 as KF  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_fp8_configs.py: no CUDA GPU here")
    gpu_warmup()
    E, k, D, I = 256, 8, 7168, 2048
    torch.manual_seed(0)

    def experts(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """E experts' FP8 weights [E, n_out, n_in] and scales, quantised one expert at a time (one [E·n_out, n_in]
        call would pass 2³¹ elements, past the int32 offsets of `weight_quant`)."""
        q = [KF.weight_quant(torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.006) for _ in range(E)]
        return torch.stack([w for w, _ in q]), torch.stack([s for _, s in q])

    (w1, w1_s), (w3, w3_s), (w2, w2_s) = experts(I, D), experts(I, D), experts(D, I)
    default = KF._grouped_config
    results = []
    for n in a.tokens:
        idx = torch.rand(n, E, device="cuda").topk(k, dim=-1).indices
        x = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
        xq, xs = KF.act_quant(x)
        P = n * k
        for block_m, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
            lay = KF.grouped_layout(idx, E, block_m)
            tiles = int((lay.tile_expert >= 0).sum())
            KF._grouped_config = lambda bm, sw, w=warps, s=stages: dict(BLOCK_N=128, num_warps=w, num_stages=s)
            row = {"tokens": n, "block_m": block_m, "num_warps": warps, "num_stages": stages,
                   "computed_rows": tiles * block_m, "real_rows": P}
            try:
                t1 = median_ms(lambda: KF.fp8_grouped_gemm(xq, xs, w1, w1_s, lay.tile_expert, rows=lay.rows), "cuda")
                tsw = median_ms(lambda: KF.fp8_grouped_swiglu(xq, xs, w1, w1_s, w3, w3_s, lay.tile_expert, lay.rows),
                                "cuda")
                h, h_s = KF.fp8_grouped_swiglu(xq, xs, w1, w1_s, w3, w3_s, lay.tile_expert, lay.rows)
                t2 = median_ms(lambda: KF.fp8_grouped_gemm(h, h_s, w2, w2_s, lay.tile_expert), "cuda")
                flop = 2 * P * I * D
                row |= {"w1_ms": round(t1, 4), "w1_tflops": round(flop / t1 / 1e9, 1),
                        "swiglu_ms": round(tsw, 4), "swiglu_tflops": round(2 * flop / tsw / 1e9, 1),
                        "w2_ms": round(t2, 4), "w2_tflops": round(flop / t2 / 1e9, 1),
                        "forward_gemms_ms": round(tsw + t2, 4)}
            except Exception as e:  # a configuration that does not compile (shared memory) is recorded as such
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                KF._grouped_config = default
            results.append(row)
            print(json.dumps(row), flush=True)
    record = {**run_info(cuda=torch.version.cuda), "benchmark": "benchmarks/moe_fp8_configs.py",
              "machine": {"gpu": torch.cuda.get_device_name(), "cpu": cpu_name(), "platform": platform.platform()},
              "config": f"{E} experts, top-{k}, dim {D} -> {I}, random uniform routing", "results": results}
    write_record(a.out, record)


if __name__ == "__main__":
    main()
