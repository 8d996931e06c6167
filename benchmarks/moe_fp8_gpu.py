"""GPU benchmark of the grouped FP8 MoE GEMM (notebooks/08_fp8_kernels.ipynb): one call builds, checks and times.

1. One MoE layer's routed experts (256 experts, top-8, D = 7168, I = 2048), uniform random routing, at 4,096 and
   32,768 tokens:
   - check: `fp8_experts_grouped` against the per-expert FP8 path (`FP8Experts(impl="sorted")`, at the smaller size)
     and against the bf16 experts the FP8 weights were quantised from;
   - w1 alone (K = 7168 -> N = 2048): `fp8_grouped_gemm` (activations quantised, rows gathered in the kernel) vs bf16
     `torch._grouped_mm` on the same sorted rows (a bf16 per-expert loop where torch lacks it);
   - the whole routed-expert forward: grouped FP8 vs bf16 `experts_sorted` (grouped_mm) vs FP8 per expert;
   TFLOP/s count the real (token, expert) rows, not the padding; times are medians of `triton.testing.do_bench`.
2. The 671B preset cut to 2 layers (layer 0 dense, layer 1 MoE), random weights, one GPU: prefill 1 x 4096 (last
   logits, cache written) and decode batch 1 on a 4096-token cache, eager and replayed from `DecodeGraph`, for bf16
   and FP8 (FP8 experts run grouped; the FP8 model is the bf16 one converted by `use_fp8`, so the logits compare).
   The grouped forward is also run under `torch.cuda.set_sync_debug_mode("error")`.

Usage:  python benchmarks/moe_fp8_gpu.py [--out benchmarks/results/moe_fp8_h200.json]
        python benchmarks/moe_fp8_gpu.py --small --out /tmp/moe_fp8_cpu.json   # tiny shapes on CPU (interpreter)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from timing import gpu_warmup, median_ms, run_info, step_ms, write_record  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels  # noqa: E402

dsv3_lite.kernels.setup_triton()

import dsv3_lite.fp8 as F  # noqa: E402
import dsv3_lite.kernels.fp8 as KF  # noqa: E402
from dsv3_lite import ModelArgs, Transformer  # noqa: E402
from dsv3_lite.generation import DecodeGraph  # noqa: E402
from dsv3_lite.moe import Experts, MoE, experts_sorted  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{((a.double() - b.double()).norm() / b.double().norm()).item():.4g}")


def uniform_routing(N: int, E: int, k: int, device: str):
    """Each token picks k distinct experts uniformly at random; weights as a sigmoid gate would give (sum 2.5)."""
    idx = torch.rand(N, E, device=device).topk(k, dim=-1).indices                  # [N, k]
    w = torch.rand(N, k, device=device)
    return w / w.sum(-1, keepdim=True) * 2.5, idx


def grouped_mm_bf16(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bf16 sorted rows xs [P, K] times w[e].T per expert: `torch._grouped_mm`, else a per-expert loop."""
    from dsv3_lite.moe import grouped_linear
    return grouped_linear(xs, w, counts, counts.cumsum(0).to(torch.int32))


def layer_bench(n_tokens: int, E: int, k: int, D: int, I: int, device: str, check_sorted: bool) -> dict:
    """Routed experts of one MoE layer at n_tokens: checks, then TFLOP/s."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hp = Experts(E, D, I, init_std=0.006).to(device, dtype)
    q8 = F.FP8Experts(E, D, I, device=device)
    for name in ("w1", "w2", "w3"):                                  # quantise each expert with the Triton kernel
        for e in range(E):
            q, s = KF.weight_quant(getattr(hp, name)[e].detach().contiguous())
            getattr(q8, name)[e], getattr(q8, name + "_scale")[e] = q, s
    x = torch.randn(n_tokens, D, device=device, dtype=dtype)
    w, idx = uniform_routing(n_tokens, E, k, device)
    P = n_tokens * k
    out = {"tokens": n_tokens, "routed_rows": P}
    with torch.no_grad():
        grouped = q8(x, w, idx, impl="grouped")
        ref_hp = hp(x, w.to(dtype), idx)
        out["check"] = {"relative_error_vs_bf16_experts": rel(grouped, ref_hp)}
        if check_sorted:
            out["check"]["relative_error_vs_fp8_per_expert"] = rel(grouped, q8(x, w, idx, impl="sorted"))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                q8(x, w, idx, impl="grouped")
                out["check"]["no_host_sync"] = True
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # w1 alone: the GEMM the anchors measure
        block_m = KF.grouped_block_m(P, E)
        lay = KF.grouped_layout(idx, E, block_m)
        xq, xs = KF.act_quant(x)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        x_sorted = x[order // k]
        gemm_flop = 2 * P * I * D
        t_fp8 = median_ms(lambda: KF.fp8_grouped_gemm(xq, xs, q8.w1, q8.w1_scale, lay.tile_expert, rows=lay.rows),
                          device)
        t_bf16 = median_ms(lambda: grouped_mm_bf16(x_sorted, hp.w1, counts), device)
        t_swiglu = median_ms(lambda: KF.fp8_grouped_swiglu(xq, xs, q8.w1, q8.w1_scale, q8.w3, q8.w3_scale,
                                                           lay.tile_expert, lay.rows, round_bf16=True), device)
        h, h_s = KF.fp8_grouped_swiglu(xq, xs, q8.w1, q8.w1_scale, q8.w3, q8.w3_scale, lay.tile_expert, lay.rows)
        t_w2 = median_ms(lambda: KF.fp8_grouped_gemm(h, h_s, q8.w2, q8.w2_scale, lay.tile_expert), device)
        t_fwd = median_ms(lambda: q8(x, w, idx, impl="grouped"), device)
        t_fwd_bf16 = median_ms(lambda: experts_sorted(x, w.to(dtype), idx, hp.w1, hp.w2, hp.w3), device)
        t_fwd_sorted = median_ms(lambda: q8(x, w, idx, impl="sorted"), device) if check_sorted else None
    tf = lambda flop, ms: round(flop / ms / 1e9, 1)  # noqa: E731  TFLOP/s from FLOP and milliseconds
    out["block_m"] = block_m
    out["padded_rows"] = int(lay.rows.shape[0])
    out["w1_gemm"] = {"fp8_grouped_ms": round(t_fp8, 4), "fp8_grouped_tflops": tf(gemm_flop, t_fp8),
                      "bf16_grouped_mm_ms": round(t_bf16, 4), "bf16_grouped_mm_tflops": tf(gemm_flop, t_bf16),
                      "bf16_impl": "torch._grouped_mm" if KF.torch.cuda.is_available() and hasattr(
                          torch, "_grouped_mm") else "per-expert loop"}
    out["w1_w3_swiglu_quant"] = {"ms": round(t_swiglu, 4), "tflops": tf(2 * gemm_flop, t_swiglu)}
    out["w2_gemm"] = {"ms": round(t_w2, 4), "tflops": tf(gemm_flop, t_w2)}
    fwd_flop = 3 * gemm_flop
    out["expert_forward"] = {"fp8_grouped_ms": round(t_fwd, 4), "fp8_grouped_tflops": tf(fwd_flop, t_fwd),
                             "bf16_sorted_ms": round(t_fwd_bf16, 4), "bf16_sorted_tflops": tf(fwd_flop, t_fwd_bf16)}
    if t_fwd_sorted is not None:
        out["expert_forward"] |= {"fp8_per_expert_ms": round(t_fwd_sorted, 4),
                                  "fp8_per_expert_tflops": tf(fwd_flop, t_fwd_sorted)}
    out["speedup_fp8_grouped_over_bf16"] = {"w1_gemm": round(t_bf16 / t_fp8, 2),
                                            "expert_forward": round(t_fwd_bf16 / t_fwd, 2)}
    print(json.dumps(out), flush=True)
    return out


def grouped_model(model: Transformer) -> None:
    """Run every MoE layer's FP8 experts grouped."""
    for m in model.modules():
        if isinstance(m, MoE) and isinstance(m.experts, F.FP8Experts):
            m.impl = "grouped"


def slice_bench(args: ModelArgs, prefill: int, context: int, steps: int, device: str) -> dict:
    """Prefill and decode of the 2-layer slice, bf16 then the same weights in FP8 with grouped experts."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args).eval()
    finally:
        torch.set_default_dtype(old)
    tokens = torch.randint(0, args.vocab_size, (1, prefill), device=device)
    ctx = tokens[:, :context]
    tok = torch.randint(0, args.vocab_size, (1, 1), device=device)
    res, logits = {}, {}
    for name in ("bf16", "fp8 grouped"):
        if name != "bf16":
            F.use_fp8(model)
            grouped_model(model)
        r = {}
        with torch.inference_mode():
            model.setup_cache(1, max(prefill, context + 1))
            logits[name] = model(tokens, 0, last_only=True).float()
            ms = median_ms(lambda: model(tokens, 0, last_only=True), device)
            r[f"prefill 1x{prefill}"] = {"ms": round(ms, 3), "tokens_per_s": round(prefill / ms * 1e3, 1)}
            model(ctx, 0, last_only=True)
            ms = step_ms(lambda: model(tok, context, last_only=True), steps, device)
            r["decode batch 1 eager"] = {"ms_per_step": round(ms, 3), "tokens_per_s": round(1e3 / ms, 1)}
            if device == "cuda":
                eager = model(tok, context, last_only=True).float()
                graph = DecodeGraph(model, tok, context)
                r["graph vs eager step"] = rel(graph(tok, context).float(), eager)
                ms = step_ms(lambda graph=graph: graph(tok, context), steps, device)
                r["decode batch 1 CUDA graph"] = {"ms_per_step": round(ms, 3), "tokens_per_s": round(1e3 / ms, 1)}
                del graph
            model.reset_cache()
        res[name] = r
        print(name, json.dumps(r), flush=True)
    res["fp8 vs bf16 prefill last logits"] = rel(logits["fp8 grouped"], logits["bf16"])
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_fp8_h200.json")
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU (interpreter): checks the script")
    ap.add_argument("--skip-slice", action="store_true", help="only the MoE layer benchmark")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not a.small else "cpu"
    if a.small:
        E, k, D, I, sizes = 8, 2, 256, 128, (16, 48)
        args = ModelArgs.preset("tiny")
        prefill, context, steps = 32, 16, 3
    else:
        E, k, D, I, sizes = 256, 8, 7168, 2048, (4096, 32768)
        args = ModelArgs.preset("671B", n_layers=2, n_dense_layers=1)
        prefill, context, steps = 4096, 4096, 50
        gpu_warmup()
    args = args.replace(max_batch_size=1, max_seq_len=max(prefill, context + 1, args.original_seq_len),
                        dtype="bf16")
    layers = [layer_bench(n, E, k, D, I, device, check_sorted=i == 0) for i, n in enumerate(sizes)]
    torch.cuda.empty_cache() if device == "cuda" else None
    sl = None if a.skip_slice else slice_bench(args, prefill, context, steps, device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU run of --small)"
    out = {"benchmark": "benchmarks/moe_fp8_gpu.py" + (" --small" if a.small else ""),
           **run_info(cuda=torch.version.cuda),
           "machine": {"gpu": gpu, "device": device, "cpu": platform.processor() or platform.machine()},
           "config": {"experts": E, "topk": k, "dim": D, "moe_inter_dim": I, "routing": "uniform random",
                      "slice": "tiny" if a.small else "671B, n_layers=2, n_dense_layers=1"},
           "notes": "TFLOP/s count real routed rows (tokens x k), not padding; median of triton.testing.do_bench "
                    "(CPU: median of 3); decode: median of per-step CUDA-event timings; FP8 slice = the bf16 slice "
                    "converted by use_fp8, MoE experts impl='grouped'",
           "moe_layer": layers, "slice": sl}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    write_record(a.out, out)


if __name__ == "__main__":
    main()
