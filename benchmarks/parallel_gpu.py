"""The parallel code path on one GPU (notebooks/12_parallelism.ipynb): `parallelize` under NCCL with world size 1
against the plain model, on the 671B configuration cut to 2 layers (layer 0 dense, layer 1 MoE, 256 routed experts).

For BF16 and then FP8 weights (random N(0, init_std), activations BF16):
  - memory: the cut model alone, built on the GPU and cut by `parallelize`; `torch.cuda.memory_allocated` after the
    build (weights), after `setup_cache(1, seq_len)` (KV cache), and `max_memory_allocated` over a prefill of
    1 × seq_len tokens and one decoding step — against `plan_memory(args, 1, weights, 1, seq_len, reserve=0)`
    (target: within 10 %); also the device's used memory from `torch.cuda.mem_get_info` (CUDA context, NCCL and the
    allocator's cache included) against `plan_memory` with its default 2 GiB reserve;
  - speed, side by side in one process: the plain `Transformer` and a deep copy of it cut by `parallelize` (the same
    weights), prefill 1 × seq_len with last-position logits (median of `triton.testing.do_bench`) and decode batch 1
    on a cache of seq_len tokens (median ms per step, CUDA events), the two models alternated over `--rounds` rounds,
    each going first in every other round; the ratio plain time / parallel time (1.0: the parallel path costs
    nothing; target ≥ 0.97);
  - check: the two models' last-position logits (max abs difference, same argmax).

Run it as one process of a process group (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without them the
script sets a single-process group itself):

Usage:  torchrun --nproc-per-node 1 benchmarks/parallel_gpu.py --out benchmarks/results/parallel_h200.json
        python benchmarks/parallel_gpu.py --small --out /tmp/parallel_cpu.json    # tiny config, gloo: checks the script
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import cpu_name, gpu_warmup, median_ms, run_info, step_ms, write_record  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels  # noqa: E402
from dsv3_lite import ModelArgs, Transformer  # noqa: E402
from dsv3_lite.checkpoint import plan_memory  # noqa: E402
from dsv3_lite.parallel import init_distributed, parallelize  # noqa: E402

dsv3_lite.kernels.setup_triton()


def build(args: ModelArgs, device: str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """The plain model with random weights (FP8 ones quantised per 128×128 block), activations in `dtype`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            return Transformer(args).eval()
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def measure_memory(args: ModelArgs, seq_len: int) -> dict:
    """The cut model's memory on this GPU vs the planner."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = parallelize(build(args, "cuda", torch.bfloat16))
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    model.setup_cache(1, seq_len + 1)
    kv = torch.cuda.memory_allocated() - base - weights
    tokens = torch.randint(0, args.vocab_size, (1, seq_len), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.reset_peak_memory_stats()
    model(tokens, 0, last_only=True)
    model(tokens[:, :1], seq_len, last_only=True)        # one decoding step (FP8: keeps the BF16 copies of wkv_b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    free, total = torch.cuda.mem_get_info()
    plan = plan_memory(args.replace(max_seq_len=seq_len + 1), 1, args.dtype, 1, seq_len + 1, reserve=0)
    plan_reserve = plan_memory(args.replace(max_seq_len=seq_len + 1), 1, args.dtype, 1, seq_len + 1)
    del model
    torch.cuda.empty_cache()
    return {"weights_allocated": weights, "weights_planned": plan["weights"],
            "kv_allocated": kv, "kv_planned": plan["kv_cache"],
            "peak_allocated": peak, "total_planned": plan["total"],
            "planned_over_measured": round(plan["total"] / peak, 4),
            "device_used": total - free, "total_planned_with_reserve": plan_reserve["total"],
            "planned_with_reserve_over_device_used": round(plan_reserve["total"] / (total - free), 4)}


@torch.no_grad()
def measure_speed(args: ModelArgs, seq_len: int, device: str, dtype: torch.dtype, rounds: int, steps: int) -> dict:
    """Plain model vs its `parallelize`d copy, side by side: the same weights, the two alternated."""
    plain = build(args, device, dtype)
    cut = parallelize(copy.deepcopy(plain))
    tokens = torch.randint(0, args.vocab_size, (1, seq_len), device=device,
                           generator=torch.Generator(device).manual_seed(1))
    tok = tokens[:, :1]
    out = {}
    for m in (plain, cut):
        m.setup_cache(1, seq_len + 1)
    a, b = plain(tokens, 0, last_only=True).float(), cut(tokens, 0, last_only=True).float()
    out["check"] = {"max_abs_diff_last_logits": (a - b).abs().max().item(), "logits_scale": a.abs().max().item(),
                    "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all())}
    print("check:", out["check"], flush=True)
    prefill = {"plain": [], "parallel": []}
    decode = {"plain": [], "parallel": []}
    for i in range(rounds):
        order = (("plain", plain), ("parallel", cut))[:: 1 if i % 2 == 0 else -1]   # who goes first alternates
        for name, m in order:
            prefill[name].append(median_ms(lambda m=m: m(tokens, 0, last_only=True), device, rep_ms=300))
        for name, m in order:
            decode[name].append(step_ms(lambda m=m: m(tok, seq_len, last_only=True), steps, device))
    for task, ms in (("prefill", prefill), ("decode", decode)):
        p, c = statistics.median(ms["plain"]), statistics.median(ms["parallel"])
        out[task] = {"plain_ms": round(p, 3), "parallel_ms": round(c, 3), "speed_ratio": round(p / c, 4),
                     "rounds_plain_ms": [round(x, 3) for x in ms["plain"]],
                     "rounds_parallel_ms": [round(x, 3) for x in ms["parallel"]]}
        print(task, {k: v for k, v in out[task].items() if not k.startswith("rounds")}, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--small", action="store_true", help="tiny config on the CPU with gloo (checks the script)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    device = "cpu" if a.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("parallel_gpu.py: no CUDA GPU here; --small runs the tiny config on the CPU")
    r, W = init_distributed("gloo" if a.small else "nccl")
    if W != 1:
        raise SystemExit(f"parallel_gpu.py: world size {W}: this benchmark compares one rank with the plain model")
    if a.small:
        args = ModelArgs.preset("tiny", n_layers=2, n_dense_layers=1)
        a.seq_len, a.rounds, a.steps = 64, 2, 3
        dtype = torch.float32
    else:
        args = ModelArgs.preset("671B", n_layers=2, n_dense_layers=1)
        dtype = torch.bfloat16
        gpu_warmup()
    args = args.replace(max_batch_size=1, max_seq_len=max(a.seq_len + 1, args.original_seq_len))
    results = []
    for weights in ("bf16", "fp8"):
        w_args = args.replace(dtype=weights)
        row = {"weights": weights, "seq_len": a.seq_len}
        if device == "cuda":
            row["memory"] = measure_memory(w_args, a.seq_len)
            print(weights, "memory:", row["memory"], flush=True)
        row |= measure_speed(w_args, a.seq_len, device, dtype, a.rounds, a.steps)
        results.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    machine = {"gpu": torch.cuda.get_device_name() if device == "cuda" else None, "cpu": cpu_name(),
               "platform": platform.platform()}
    record = {**run_info(cuda=torch.version.cuda), "benchmark": "benchmarks/parallel_gpu.py", "machine": machine,
              "backend": torch.distributed.get_backend(), "world_size": W,
              "config": ("tiny preset" if a.small else "671B preset") + ", n_layers=2, n_dense_layers=1",
              "results": results}
    torch.distributed.destroy_process_group()
    write_record(a.out, record)


if __name__ == "__main__":
    main()
