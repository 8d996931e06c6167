"""GPU benchmark of the whole model (notebooks/07_model.ipynb, issue 5 item 6): dsv3_lite vs transformers.

The 671B preset cut to 2 layers (layer 0 dense, layer 1 MoE with 256 routed experts), random weights, bf16, one GPU.
Both models hold the same weights (ours are copied into transformers' `DeepseekV3ForCausalLM`), and both are asked
for the logits of the last position only (`last_only=True`; transformers: `logits_to_keep=1`), with the KV cache on:

  - check: last-position logits of a 256-token prompt, ours vs transformers (bf16, so a relative error);
  - prefill: one sequence of `--prefill-len` (4096) tokens, cache written -> tokens/s (median of
    `triton.testing.do_bench`);
  - decode: batch 1, one new token on a cache holding `--context` (4096) tokens -> ms per step (median over
    `--steps` steps timed with CUDA events; transformers' DynamicCache is cropped back to the context between steps,
    outside the timed region, so every step sees the same context). Ours twice: eager, and the same step captured
    once in a CUDA graph and replayed (`dsv3_lite.model.DecodeGraph`; the timed call copies the token and the position
    into the graph's buffers and replays); its logits are checked against the eager step's first;
  - generate: greedy `generate` of `--gen-tokens` (128) new tokens after a `--context`-token prompt, eager (twice:
    the second run shows whether eager decoding repeats itself bit for bit) and with `cuda_graph=True`; wall time
    including the prefill and, for the graph, its warm-up and capture; whether the tokens are the same.

Usage:  python benchmarks/model_gpu.py [--out benchmarks/results/model_h200.json]
        python benchmarks/model_gpu.py --small --out /tmp/model_gpu_cpu.json   # tiny config on CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_ms, run_info, step_ms  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.kernels  # noqa: E402
from dsv3_lite import ModelArgs, Transformer  # noqa: E402
from dsv3_lite.config import hf_param_name  # noqa: E402
from dsv3_lite.generation import DecodeGraph, generate  # noqa: E402

dsv3_lite.kernels.setup_triton()  # before transformers imports Triton (the CPU interpreter for --small)


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


def greedy_diagnosis(model: Transformer, prompt: torch.Tensor, n: int, device: str) -> dict:
    """Greedy decoding of `n` tokens after `prompt` [1, P] on a cache of P + n rows, three ways: int positions (what
    `generate` does eagerly), tensor positions without a graph (what the graph runs: attention over the whole cache,
    later rows masked), and the CUDA graph. Reports where the tokens first differ from the int path, the relative
    difference of the logits at the last step with identical inputs, and the top-1/top-2 logit gap where they part."""
    P = prompt.shape[1]
    modes = ["int", "tensor"] + (["graph"] if device == "cuda" else [])
    runs = {}
    for mode in modes:
        model.setup_cache(1, P + n)
        logits = model(prompt, 0, last_only=True)                                # [1, V]
        pos, graph, toks, steps = torch.zeros((), dtype=torch.long, device=prompt.device), None, [], []
        for i in range(n):
            steps.append(logits.clone())
            nxt = logits.argmax(-1, keepdim=True)                                 # [1, 1]
            toks.append(int(nxt))
            if mode == "int":
                logits = model(nxt, P + i, last_only=True)
            elif mode == "tensor":
                pos.fill_(P + i)
                logits = model(nxt, pos, last_only=True)
            else:
                graph = graph or DecodeGraph(model, nxt, P + i)
                logits = graph(nxt, P + i)
        del graph
        model.reset_cache()
        runs[mode] = (toks, steps)
    out = {}
    for mode in modes[1:]:
        toks, steps = runs[mode]
        ref_toks, ref_steps = runs["int"]
        diff = next((i for i, (x, y) in enumerate(zip(toks, ref_toks, strict=True)) if x != y), None)
        last_same = n - 1 if diff is None else diff                                # last step fed identical tokens
        rel = ((steps[last_same] - ref_steps[last_same]).norm() / ref_steps[last_same].norm()).item()
        entry = {"same_tokens_as_int_positions": diff is None, "first_difference_at": diff,
                 f"relative_logit_difference_at_step_{last_same}": float(f"{rel:.3g}"),
                 "bitwise_equal_logits_up_to_there": all(torch.equal(x, y) for x, y in
                                                         zip(steps[:last_same + 1], ref_steps, strict=False))}
        if diff is not None:
            top2 = ref_steps[diff].topk(2, dim=-1).values[0]
            entry["int_path_top2_logits_at_difference"] = [round(v, 5) for v in top2.tolist()]
        out[f"{mode} vs int positions"] = entry
    if "graph" in runs:
        out["graph vs tensor positions without a graph: same tokens"] = runs["graph"][0] == runs["tensor"][0]
        out["graph vs tensor positions without a graph: bitwise equal logits"] = all(
            torch.equal(x, y) for x, y in zip(runs["graph"][1], runs["tensor"][1], strict=True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/model_h200.json")
    ap.add_argument("--small", action="store_true", help="tiny config and short lengths (CPU check of the script)")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gen-tokens", type=int, default=128)
    a = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if a.small:
        a.prefill_len, a.context, a.steps, a.gen_tokens = 64, 64, 5, 8
        args = ModelArgs.preset("tiny")
    else:
        args = ModelArgs.preset("671B")
    seq = max(a.prefill_len, a.context + 1)
    args = args.replace(n_layers=2, n_dense_layers=1, max_batch_size=1,
                        max_seq_len=max(seq, a.context + a.gen_tokens, args.original_seq_len), dtype="bf16")
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
        ms_ours = step_ms(lambda: ours(tok, a.context, last_only=True), a.steps, device)
        ms_graph, graph_check = None, {}
        if device == "cuda":  # the same step as a CUDA graph (attends over the whole cache of seq = context + 1 rows)
            eager_logits = ours(tok, a.context, last_only=True).float()
            graph = DecodeGraph(ours, tok, a.context)
            graph_logits = graph(tok, a.context).float()
            graph_check = {"relative_l2_error_vs_eager_step": round(
                ((graph_logits - eager_logits).norm() / eager_logits.norm()).item(), 6),
                "bitwise_equal": bool(torch.equal(graph_logits, eager_logits)),
                "same_argmax": bool((graph_logits.argmax(-1) == eager_logits.argmax(-1)).all())}
            print("CUDA graph step vs eager step:", graph_check, flush=True)
            ms_graph = step_ms(lambda: graph(tok, a.context), a.steps, device)
            del graph
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
        ms_hf = step_ms(hf_step, a.steps, device, before=crop)
        if cache.get_seq_length() != a.context + 1:
            raise SystemExit(f"transformers' cache holds {cache.get_seq_length()} tokens, expected {a.context + 1}")
        for impl, ms in (("transformers", ms_hf), ("dsv3_lite", ms_ours), ("dsv3_lite + CUDA graph", ms_graph)):
            if ms is None:
                continue
            results.append({"task": f"decode batch 1, context {a.context}", "impl": impl, "ms_per_step": round(ms, 3),
                            "tokens_per_s": round(1e3 / ms, 1)})
            print(results[-1], flush=True)

        # 4. generate: greedy, a context-token prompt, gen_tokens new tokens; eager twice, then with the CUDA graph
        gen = {}
        prompt = ctx[0].tolist()
        runs = [("eager", False), ("eager, again", False)] + ([("CUDA graph", True)] if device == "cuda" else [])
        for name, flag in runs:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out_tokens = generate(ours, [prompt], a.gen_tokens, cuda_graph=flag)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            gen[name] = (time.perf_counter() - t0, out_tokens)
        generate_results = {"prompt_tokens": len(prompt), "new_tokens": a.gen_tokens}
        for name, (secs, out_tokens) in gen.items():
            diff = next((i for i, (x, y) in enumerate(zip(out_tokens, gen["eager"][1], strict=True)) if x != y), None)
            generate_results[name] = {"seconds": round(secs, 3), "new_tokens_per_s": round(a.gen_tokens / secs, 1),
                                      "same_tokens_as_eager": diff is None, "first_difference_at": diff}
        print("generate:", generate_results, flush=True)

        # 5. why graph and eager tokens can part: the same greedy loop three ways, with the step logits kept
        greedy_paths = greedy_diagnosis(ours, ctx, a.gen_tokens, device)
        print("greedy paths:", greedy_paths, flush=True)

    speedups, graph_speedups = {}, {}
    for r in results:
        if r["impl"] == "transformers":
            o = next(q for q in results if q["task"] == r["task"] and q["impl"] == "dsv3_lite")
            speedups[r["task"]] = round(o["tokens_per_s"] / r["tokens_per_s"], 2)
            g = next((q for q in results if q["task"] == r["task"] and q["impl"] == "dsv3_lite + CUDA graph"), None)
            if g is not None:
                graph_speedups[r["task"]] = {"over_transformers": round(g["tokens_per_s"] / r["tokens_per_s"], 2),
                                             "over_dsv3_lite_eager": round(g["tokens_per_s"] / o["tokens_per_s"], 2)}
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU run of --small)"
    out = {"benchmark": "benchmarks/model_gpu.py" + (" --small" if a.small else ""), **run_info(cuda=torch.version.cuda),
           "machine": {"gpu": gpu, "device": device, "cpu": platform.processor() or platform.machine()},
           "config": {"preset": "tiny" if a.small else "671B", "n_layers": 2, "n_dense_layers": 1,
                      "parameters": n_params, "dtype": str(dtype).removeprefix("torch."),
                      "attn_impl": args.attn_impl, "max_seq_len": args.max_seq_len, "transformers_attention": "sdpa",
                      "transformers_cache": "DynamicCache"},
           "notes": "random weights, the same in both models; last-position logits only on both sides; KV cache on; "
                    "prefill: median of triton.testing.do_bench; decode: median of per-step CUDA-event timings; "
                    "'dsv3_lite + CUDA graph': the same decode step captured once (DecodeGraph) and replayed, the "
                    "timed call including the copies of the token and position into the graph's buffers; "
                    "generate: wall time of greedy generate() including the prefill (and the graph's warm-up and "
                    "capture)",
           "check": check, "results": results, "speedup_dsv3_lite_over_transformers": speedups,
           "cuda_graph_check": graph_check, "speedup_dsv3_lite_cuda_graph": graph_speedups,
           "generate": generate_results, "greedy_paths": greedy_paths}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(speedups))


if __name__ == "__main__":
    main()
