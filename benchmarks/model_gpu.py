"""GPU benchmark of the whole model (notebooks/07_model.ipynb, issue 5 item 6): dsv3_lite vs transformers.

The 671B preset cut to 2 layers (layer 0 dense, layer 1 MoE with 256 routed experts), random weights, bf16, one GPU.
Both models hold the same weights (ours are copied into transformers' `DeepseekV3ForCausalLM`), and both are asked
for the logits of the last position only (`last_only=True`; transformers: `logits_to_keep=1`), with the KV cache on:

  - check: last-position logits of a 256-token prompt, ours vs transformers (bf16, so a relative error);
  - prefill: one sequence of `--prefill-len` (4096) tokens, cache written -> tokens/s (median of
    `triton.testing.do_bench`, reference/gpu_anchors.md §11);
  - decode: batch 1, one new token on a cache holding `--context` (4096) tokens -> ms per step (median over
    `--steps` steps timed with CUDA events; transformers' DynamicCache is cropped back to the context between steps,
    outside the timed region, so every step sees the same context).

Usage:  python benchmarks/model_gpu.py [--out benchmarks/results/model_h200.json]
        python benchmarks/model_gpu.py --small --out /tmp/model_gpu_cpu.json   # tiny config on CPU: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite  # noqa: E402,F401  (before transformers: Triton interpreter switch on CPU)
from dsv3_lite import ModelArgs, Transformer  # noqa: E402
from dsv3_lite.config import hf_param_name  # noqa: E402


def build_models(args: ModelArgs, device: str, dtype: torch.dtype):
    """Ours with random N(0, init_std) weights, and transformers' model holding exactly the same weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ours = Transformer(args).eval()
            cfg = DeepseekV3Config(**args.to_hf_config())
            cfg._attn_implementation = "sdpa"
            hf = DeepseekV3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    hf_params = dict(hf.named_parameters()) | dict(hf.named_buffers())
    with torch.no_grad():
        for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
            if name.endswith("ffn.experts.w2"):
                hf_params[name.replace("layers.", "model.layers.").replace("ffn.experts.w2", "mlp.experts.down_proj")
                          ].copy_(t)
            elif name.endswith("ffn.experts.w1"):
                w3 = dict(ours.named_parameters())[name[:-1] + "3"]
                hf_params[name.replace("layers.", "model.layers.").replace("ffn.experts.w1", "mlp.experts.gate_up_proj")
                          ].copy_(torch.cat([t, w3], dim=1))  # [E, 2I, D]: gate rows, then up rows
            elif name.endswith("ffn.experts.w3"):
                continue
            else:
                hf_params[hf_param_name(name)].copy_(t)
    return ours, hf


def cuda_ms(fn, device: str) -> float:
    """Median milliseconds of fn() (do_bench on CUDA; median of 3 on CPU)."""
    return median_ms(fn, device, rep_ms=300)


def step_ms(step, before, n: int, device: str) -> float:
    """Median milliseconds of step() over n calls; before() runs between calls, untimed."""
    times = []
    for _ in range(n):
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/model_h200.json")
    ap.add_argument("--small", action="store_true", help="tiny config and short lengths (CPU check of the script)")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if a.small:
        a.prefill_len, a.context, a.steps = 64, 64, 5
        args = ModelArgs.preset("tiny")
    else:
        args = ModelArgs.preset("671B")
    seq = max(a.prefill_len, a.context + 1)
    args = args.replace(n_layers=2, n_dense_layers=1, max_batch_size=1, max_seq_len=max(seq, args.original_seq_len),
                        dtype="bf16")
    torch.manual_seed(0)
    ours, hf = build_models(args, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"2-layer slice of {'tiny' if a.small else '671B'}: {n_params / 1e9:.2f}B parameters, {dtype}, {device}",
          flush=True)
    results, check = [], {}
    with torch.inference_mode():
        # 1. check: the same last-position logits
        x = torch.randint(0, args.vocab_size, (1, 256 if not a.small else 32), device=device)
        ours.setup_cache(1, x.shape[1])
        lo = ours(x, 0, last_only=True).float()  # [1, V]
        ours.reset_cache()
        lh = hf(input_ids=x, use_cache=True, logits_to_keep=1).logits[:, -1].float()  # [1, V]
        rel = ((lo - lh).norm() / lh.norm()).item()
        check = {"prompt_tokens": x.shape[1], "relative_l2_error_last_logits": round(rel, 5),
                 "same_argmax": bool((lo.argmax(-1) == lh.argmax(-1)).all())}
        print("check:", check, flush=True)
        if rel > (0.05 if dtype == torch.bfloat16 else 1e-4):
            if dtype != torch.bfloat16:
                raise SystemExit(f"ours and transformers disagree: relative error {rel:.3g}")
            print(f"WARNING: relative error {rel:.3g} is large for bf16 rounding", flush=True)

        # 2. prefill 1 x prefill_len, last-position logits, cache written
        tokens = torch.randint(0, args.vocab_size, (1, a.prefill_len), device=device)
        ours.setup_cache(1, seq)
        ms_ours = cuda_ms(lambda: ours(tokens, 0, last_only=True), device)
        ms_hf = cuda_ms(lambda: hf(input_ids=tokens, use_cache=True, logits_to_keep=1), device)
        for impl, ms in (("transformers", ms_hf), ("dsv3_lite", ms_ours)):
            results.append({"task": f"prefill 1x{a.prefill_len}", "impl": impl, "ms": round(ms, 3),
                            "tokens_per_s": round(a.prefill_len / ms * 1e3, 1)})
            print(results[-1], flush=True)

        # 3. decode: batch 1, one token on a cache of `context` tokens
        ctx = tokens[:, :a.context] if a.context <= a.prefill_len else torch.randint(
            0, args.vocab_size, (1, a.context), device=device)
        tok = torch.randint(0, args.vocab_size, (1, 1), device=device)
        ours(ctx, 0, last_only=True)  # fills positions [0, context)
        ms_ours = step_ms(lambda: ours(tok, a.context, last_only=True), lambda: None, a.steps, device)
        ours.reset_cache()
        cache = hf(input_ids=ctx, use_cache=True, logits_to_keep=1).past_key_values
        pos = torch.tensor([a.context], device=device)

        def hf_step():
            hf(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos[None], use_cache=True,
               logits_to_keep=1)

        def crop():  # back to `context` tokens (a negative crop removes tokens: same meaning in transformers 4.x-5.x)
            extra = cache.get_seq_length() - a.context
            if extra > 0:
                cache.crop(-extra)

        hf_step()
        ms_hf = step_ms(hf_step, crop, a.steps, device)
        if cache.get_seq_length() != a.context + 1:
            raise SystemExit(f"transformers' cache holds {cache.get_seq_length()} tokens, expected {a.context + 1}")
        for impl, ms in (("transformers", ms_hf), ("dsv3_lite", ms_ours)):
            results.append({"task": f"decode batch 1, context {a.context}", "impl": impl, "ms_per_step": round(ms, 3),
                            "tokens_per_s": round(1e3 / ms, 1)})
            print(results[-1], flush=True)

    speedups = {}
    for r in results:
        if r["impl"] == "transformers":
            o = next(q for q in results if q["task"] == r["task"] and q["impl"] == "dsv3_lite")
            speedups[r["task"]] = round(o["tokens_per_s"] / r["tokens_per_s"], 2)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU run of --small)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = {"benchmark": "benchmarks/model_gpu.py" + (" --small" if a.small else ""),
           "date": datetime.date.today().isoformat(),
           "machine": {"gpu": gpu, "device": device, "cpu": platform.processor() or platform.machine()},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
                        "python": platform.python_version(), "cuda": torch.version.cuda},
           "config": {"preset": "tiny" if a.small else "671B", "n_layers": 2, "n_dense_layers": 1,
                      "parameters": n_params, "dtype": str(dtype).removeprefix("torch."),
                      "attn_impl": args.attn_impl, "transformers_attention": "sdpa",
                      "transformers_cache": "DynamicCache"},
           "notes": "random weights, the same in both models; last-position logits only on both sides; KV cache on; "
                    "prefill: median of triton.testing.do_bench; decode: median of per-step CUDA-event timings",
           "check": check, "results": results, "speedup_dsv3_lite_over_transformers": speedups}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(speedups))


if __name__ == "__main__":
    main()
