"""Time one MLA layer at DeepSeek-V3's width (671B config) in BF16: naive vs absorbed, prefill and decode.

Notebook 04 (04_mla) shows the recorded numbers. What is measured, side by side in one run:

* prefill: one sequence of `--prefill-len` (4096) tokens, causal mask, cache written (inference prefill);
* decode: one step of `--batch` (64) sequences, one new token each, with `--context` (4096) tokens already in the cache
  (the cache is filled with random values of the right shape, as a prefill of 64 x 4096 tokens would leave it).

Timer: median of `triton.testing.do_bench` (L2 flushed between calls), after a warm-up call; random weights and data.
Before timing, both forms are checked against each other on a short input. The KV cache is the absorbed latent
cache [B, T, 512 + 64] or the naive per-head K/V cache [B, T, 128, 192 + 128], in BF16.

Usage:  python benchmarks/mla_gpu.py [--out benchmarks/results/mla_h200.json]
        python benchmarks/mla_gpu.py --small --out /tmp/mla_cpu.json   # the tiny config on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_ms, run_info  # noqa: E402  (benchmarks/timing.py)

from dsv3_lite.attention import MLA, causal_mask  # noqa: E402
from dsv3_lite.config import ModelArgs  # noqa: E402
from dsv3_lite.rope import precompute_freqs_cis  # noqa: E402


def bench(fn, device: str) -> float:
    """Median milliseconds of fn()."""
    return median_ms(fn, device, rep_ms=200)


def cache_mib(m: MLA) -> float:
    return sum(b.numel() * b.element_size() for b in m.buffers()) / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mla_h200.json")
    ap.add_argument("--small", action="store_true", help="tiny config and short lengths (CPU check of the script)")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = "tiny" if a.small else "671B"
    if a.small:
        a.prefill_len, a.batch, a.context = 64, 4, 64
    seq = max(a.prefill_len, a.context + 1)
    args = ModelArgs.preset(name, max_batch_size=a.batch, max_seq_len=seq)
    torch.manual_seed(0)
    mla = MLA(args).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in mla.parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[1] ** -0.5)  # unit-variance outputs, like trained weights roughly
    freqs = precompute_freqs_cis(args).to(device)

    # 1. check: naive == absorbed on a short causal input (BF16 on GPU: relative error)
    x = torch.randn(2, 32, args.dim, device=device, dtype=dtype)
    outs = {}
    with torch.inference_mode():
        mla.prefill_naive = False  # the absorbed einsums even from position 0, so the check compares two computations
        for impl in ("naive", "absorb"):
            mla.attn_impl = impl
            outs[impl] = mla(x, 0, freqs[:32], causal_mask(32, device=device)).float()
        mla.prefill_naive = True  # timed below as used: prefill through the fused naive path, decode absorbed
    rel_err = ((outs["naive"] - outs["absorb"]).norm() / outs["naive"].norm()).item()
    print(f"check: naive vs absorbed relative error {rel_err:.2e}", flush=True)
    assert rel_err < (2e-2 if dtype == torch.bfloat16 else 1e-5), rel_err

    results = []
    with torch.inference_mode():
        # 2. prefill 1 x prefill_len
        xp = torch.randn(1, a.prefill_len, args.dim, device=device, dtype=dtype)
        mask = causal_mask(a.prefill_len, device=device)
        for impl in ("naive", "absorb"):
            mla.attn_impl = impl
            mla.setup_cache(1, a.prefill_len)
            ms = bench(lambda: mla(xp, 0, freqs[:a.prefill_len], mask), device)
            results.append(dict(phase="prefill", form=impl, batch=1, tokens=a.prefill_len, ms=ms,
                                tokens_per_s=a.prefill_len / ms * 1e3, kv_cache_mib=cache_mib(mla)))
            print(results[-1], flush=True)
            mla.reset_cache()
            if device == "cuda":
                torch.cuda.empty_cache()
        # 3. decode: batch sequences, context cached, one new token each
        xd = torch.randn(a.batch, 1, args.dim, device=device, dtype=dtype)
        for impl in ("naive", "absorb"):
            mla.attn_impl = impl
            mla.setup_cache(a.batch, a.context + 1)
            for b in mla.buffers():
                b.normal_()  # what a prefill would leave: random values of the cached shapes
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = bench(lambda: mla(xd, a.context, freqs[a.context:a.context + 1], None), device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            results.append(dict(phase="decode", form=impl, batch=a.batch, context=a.context, ms=ms,
                                tokens_per_s=a.batch / ms * 1e3, kv_cache_mib=cache_mib(mla),
                                kv_read_gb_per_s=cache_mib(mla) * 2**20 * a.context / (a.context + 1) / ms / 1e6,
                                peak_gpu_gib=peak))
            print(results[-1], flush=True)
            mla.reset_cache()
            if device == "cuda":
                torch.cuda.empty_cache()

    by = {(r["phase"], r["form"]): r for r in results}
    dec = by[("decode", "naive")]["ms"] / by[("decode", "absorb")]["ms"]
    pre = by[("prefill", "absorb")]["ms"] / by[("prefill", "naive")]["ms"]
    note = (f"One MLA layer, {name} width, {str(dtype).removeprefix('torch.')}, naive form and absorbed prefill through F.scaled_dot_product_attention, absorbed decode through batched GEMMs over the latent cache. "
            f"Decode (batch {a.batch}, context {a.context}): absorbed is {dec:.1f}x faster than naive and caches "
            f"{by[('decode', 'naive')]['kv_cache_mib'] / by[('decode', 'absorb')]['kv_cache_mib']:.0f}x less. "
            f"Prefill (1x{a.prefill_len}): absorbed takes {pre:.2f}x the naive time"
            + (" (it does more FLOPs per key)." if pre > 1 else "."))
    print(note)
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    rec = dict(
        benchmark="mla_gpu", config=name, dtype=str(dtype).removeprefix("torch."), **run_info(cuda=torch.version.cuda),
        machine=dict(gpu=gpu, capability=list(torch.cuda.get_device_capability()) if device == "cuda" else None,
                     sm_count=torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else None),
        timer="median of triton.testing.do_bench (warmup 25 ms, rep 200 ms)" if device == "cuda" else "median of 3",
        check=dict(naive_vs_absorbed_rel_err=rel_err),
        shapes=dict(dim=args.dim, n_heads=args.n_heads, q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
                    qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
                    v_head_dim=args.v_head_dim),
        results=results, note=note)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
