"""The memory planner against measured memory (notebooks/11_checkpoints.ipynb): `plan_memory` vs what the model
really allocates, on one device.

On a CUDA GPU (the default): the 671B configuration cut to 2 layers (layer 0 dense, layer 1 MoE with 256 routed
experts), random weights, FP8 and then BF16, for several prefill sizes:
  - weights: `torch.cuda.memory_allocated()` once the model is built (the allocator rounds every tensor up to 512
    bytes; the RoPE table, 4 MB, is counted in the planner's workspace) and the exact bytes of its parameters and
    buffers, vs `plan_memory(...)["weights"]`;
  - KV cache: the increase of `memory_allocated` made by `setup_cache(batch, seq_len)`, vs `kv_cache_bytes`;
  - activations: `torch.cuda.max_memory_allocated()` during one prefill of batch × seq_len tokens (cache on,
    last-position logits, after a warm-up pass on the same tokens so that Triton's autotuning is not measured) minus
    what was allocated before it, vs `activation_bytes(...)["peak"]` (the estimate's target: within 10 %); also the
    device-independent count `peak_live_bytes` of the same pass, which misses scratch space inside kernels;
  - FP8 only: the BF16 copies of `wkv_b` that the first absorbed decoding step keeps, vs the planner's share of them.
With `--device cpu`: the tiny configuration and two variants on the CPU; weights and KV cache from the tensors
themselves, activations from `peak_live_bytes` (BF16 only: an FP8 model on a CPU runs the reference path, which
dequantises weights on every call, not what the estimate describes).

Usage:  python benchmarks/memory_plan.py --out benchmarks/results/memory_plan_h200.json
        python benchmarks/memory_plan.py --device cpu --out benchmarks/results/memory_plan_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import cpu_name, run_info, write_record  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels  # noqa: E402
from dsv3_lite import ModelArgs, Transformer  # noqa: E402
from dsv3_lite.checkpoint import activation_bytes, kv_cache_bytes, peak_live_bytes, plan_memory, weight_bytes  # noqa: E402

dsv3_lite.kernels.setup_triton()


def build(args: ModelArgs, device: str) -> Transformer:
    """The model with random N(0, init_std) weights, activations in BF16 (FP8 weights quantised per 128×128 block)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return Transformer(args).eval()
    finally:
        torch.set_default_dtype(old)


def held_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


def cache_bytes(model: Transformer) -> int:
    return sum(t.nbytes for layer in model.layers for t in (layer.attn.kv_cache, layer.attn.pe_cache))


@torch.no_grad()
def measure_gpu(args: ModelArgs, weights: str, shapes: list[tuple[int, int]]) -> list[dict]:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = build(args.replace(dtype=weights), "cuda")
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated() - before
    held = held_bytes(model)                                 # parameters and buffers, before any cache exists
    plan_w = weight_bytes(args, weights=weights)["total"]
    rope = model.freqs_cis(torch.device("cuda")).nbytes
    out = []
    for batch, seq_len in shapes:
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(0))
        model.setup_cache(batch, seq_len)
        model(tokens, 0, last_only=True)                     # warm-up: kernels compiled and autotuned
        model.reset_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        model.setup_cache(batch, seq_len)
        kv = torch.cuda.memory_allocated() - base
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logits = model(tokens, 0, last_only=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del logits
        _, live = peak_live_bytes(model, tokens, 0, last_only=True)
        model.reset_cache()
        est = activation_bytes(args, weights=weights, batch=batch, seq_len=seq_len)
        row = {"weights": weights, "batch": batch, "seq_len": seq_len,
               "weights_planned": plan_w, "weights_held": held, "weights_allocated": allocated - rope,
               "kv_planned": kv_cache_bytes(args, batch=batch, seq_len=seq_len), "kv_allocated": kv,
               "activations_planned": est["peak"], "activations_measured": peak, "activations_live_bytes": live,
               "activation_phases_planned": est}
        out.append(row)
        print(f"{weights:4} {batch}x{seq_len:<6} weights {allocated / 1e9:6.2f} GB (planned {plan_w / 1e9:6.2f}) | "
              f"kv {kv / 1e6:7.1f} MB (planned {row['kv_planned'] / 1e6:7.1f}) | activations {peak / 1e9:5.2f} GB, "
              f"planned {est['peak'] / 1e9:5.2f} (ratio {est['peak'] / peak:.3f}), live bytes {live / 1e9:5.2f}",
              flush=True)
    if weights == "fp8":                                     # absorbed decoding keeps a BF16 copy of each FP8 wkv_b
        model.setup_cache(1, 2)
        first = torch.randint(0, args.vocab_size, (1, 1), device="cuda")
        model(first, 0, last_only=True)
        base = torch.cuda.memory_allocated()
        model(first, 1, last_only=True)
        copies = torch.cuda.memory_allocated() - base
        planned = plan_memory(args, weights="fp8", reserve=0)["workspace"] - rope
        out[-1] |= {"wkv_b_copies_planned": planned, "wkv_b_copies_allocated": copies}
        print(f"wkv_b copies after one decoding step: {copies / 1e6:.1f} MB (planned {planned / 1e6:.1f})")
    del model
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def measure_cpu(variants: dict[str, ModelArgs], shapes: list[tuple[int, int]]) -> list[dict]:
    out = []
    for name, args in variants.items():
        for weights in ("bf16", "fp8"):
            model = build(args.replace(dtype=weights), "cpu")
            held = held_bytes(model)                         # parameters and buffers, before any cache exists
            for batch, seq_len in shapes:
                model.setup_cache(batch, seq_len)
                row = {"config": name, "weights": weights, "batch": batch, "seq_len": seq_len,
                       "weights_planned": weight_bytes(args, weights=weights)["total"], "weights_held": held,
                       "kv_planned": kv_cache_bytes(args, batch=batch, seq_len=seq_len), "kv_allocated": cache_bytes(model)}
                model.reset_cache()
                if weights == "bf16":
                    tokens = torch.randint(0, args.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
                    _, live = peak_live_bytes(model, tokens, last_only=True)
                    est = activation_bytes(args, weights=weights, batch=batch, seq_len=seq_len)
                    row |= {"activations_planned": est["peak"], "activations_live_bytes": live,
                            "activation_phases_planned": est}
                out.append(row)
                ratio = f", activations planned / measured {row['activations_planned'] / live:.3f}" if weights == "bf16" else ""
                print(f"{name:9} {weights:4} {batch}x{seq_len:<4} weights equal: {row['weights_planned'] == row['weights_held']}, "
                      f"KV equal: {row['kv_planned'] == row['kv_allocated']}{ratio}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args()
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("memory_plan.py: no CUDA GPU here; use --device cpu for the tiny configuration")
        args = ModelArgs.preset("671B", n_layers=2, n_dense_layers=1)
        shapes = [(1, 4096), (4, 4096), (1, 16384)]
        results = [row for weights in ("fp8", "bf16") for row in measure_gpu(args, weights, shapes)]
        machine = {"gpu": torch.cuda.get_device_name(), "cpu": cpu_name(), "platform": platform.platform()}
        config = "671B preset, n_layers=2, n_dense_layers=1 (layer 0 dense, layer 1 MoE, 256 routed experts)"
    else:
        tiny = ModelArgs.preset("tiny")
        variants = {"tiny": tiny, "all MoE": tiny.replace(n_dense_layers=0), "16 heads": tiny.replace(n_heads=16)}
        results = measure_cpu(variants, [(1, 512), (4, 256), (8, 64)])
        machine = {"gpu": None, "cpu": cpu_name(), "threads": torch.get_num_threads(), "platform": platform.platform()}
        config = "tiny preset; 'all MoE': n_dense_layers=0; '16 heads': n_heads=16"
    record = {**run_info(cuda=torch.version.cuda), "benchmark": "benchmarks/memory_plan.py", "machine": machine,
              "config": config, "results": results}
    write_record(a.out, record)


if __name__ == "__main__":
    main()
