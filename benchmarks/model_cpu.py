"""CPU benchmark of the whole model (notebooks/07_model.ipynb, issue 5 item 6): dsv3_lite vs transformers.

Side by side in one process, same tiny configuration (dim 256, 4 layers of which 1 dense, 16 routed experts top-4 in 4
groups, 8 heads, q_lora 128, kv_lora 64, vocab 2048), float32; `--threads 1,2` runs decoding once per thread count
(torch.set_num_threads) and training with the largest:
  - training: forward + backward (cross-entropy) on a 16 x 256 batch -> tokens/s
  - greedy decoding: batch 1, 16-token prompt, 64 new tokens with the KV cache -> new tokens/s. transformers runs
    `generate` with an explicit GenerationConfig (do_sample=False, use_cache=True, exactly 64 new tokens, no EOS,
    an attention mask) and its default DynamicCache; ours runs `dsv3_lite.model.generate`.
On a machine shared with other jobs absolute times drift by 2-4x between minutes: after one warm-up, the two
implementations are timed alternately for `--repeats` rounds, and the speed-up reported is the median of the
per-round ratios (each round's two runs are seconds apart); tokens/s are the medians over rounds.
No torch.compile on either side (eager against eager).
Usage: python benchmarks/model_cpu.py [--repeats 7] [--threads 1,2] [--no-train] [--out benchmarks/results/model_cpu.json]
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from timing import run_info
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

from dsv3_lite import ModelArgs, Transformer
from dsv3_lite.generation import generate

ARGS = ModelArgs.preset("tiny").replace(
    vocab_size=2048, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=8,
    n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, n_shared_experts=1,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    max_seq_len=512, original_seq_len=128, max_batch_size=16)


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each fn, measured in turn for `repeats` rounds after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts for decoding; training uses the max")
    ap.add_argument("--no-train", action="store_true", help="decoding only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_cpu.json")
    a = ap.parse_args()
    threads = [int(t) for t in str(a.threads).split(",")]
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**ARGS.to_hf_config()))
    ours = Transformer(ARGS)
    x = torch.randint(0, ARGS.vocab_size, (a.batch, a.seq))
    prompt = torch.randint(0, ARGS.vocab_size, (1, 16))
    gen_cfg = GenerationConfig(do_sample=False, use_cache=True, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, eos_token_id=None, pad_token_id=0)

    def train_ours():
        logits = ours(x)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()

    def train_hf():
        hf(input_ids=x, labels=x).loss.backward()

    def decode_ours():
        new = generate(ours, prompt.tolist(), max_new_tokens=a.new_tokens)
        assert len(new[0]) == a.new_tokens

    def decode_hf():
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg)
        assert out.shape[1] == prompt.shape[1] + a.new_tokens

    load_before = os.getloadavg()
    results, speedups, loads = [], {}, {}
    tasks = [] if a.no_train else [(f"train fwd+bwd {a.batch}x{a.seq}, {max(threads)} threads", max(threads),
                                    a.batch * a.seq, train_hf, train_ours, True)]
    tasks += [(f"greedy decode batch 1, prompt 16, {a.new_tokens} new, {n} thread{'s' * (n > 1)}", n, a.new_tokens,
               decode_hf, decode_ours, False) for n in threads]
    for task, n_threads, n_tokens, fn_hf, fn_ours, training in tasks:
        torch.set_num_threads(n_threads)
        ours.train(training), hf.train(training)
        loads[task] = [round(os.getloadavg()[0], 2)]
        times = alternate({"transformers": fn_hf, "dsv3_lite": fn_ours}, a.repeats)
        loads[task].append(round(os.getloadavg()[0], 2))
        for name, ts in times.items():
            med = statistics.median(ts)
            results.append({"task": task, "threads": n_threads, "impl": name, "median_seconds": round(med, 4),
                            "min_seconds": round(min(ts), 4), "tokens_per_s": round(n_tokens / med, 1)})
            print(results[-1], flush=True)
        ratios = [h / o for h, o in zip(times["transformers"], times["dsv3_lite"], strict=True)]
        speedups[task] = {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
                          "max": round(max(ratios), 2)}
        print(task, speedups[task], flush=True)
    out = {"benchmark": "benchmarks/model_cpu.py", **run_info(),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                      f"torch.set_num_threads({'/'.join(map(str, threads))}); "
                      + ("other jobs were running (see loadavg)" if max(load_before[0], os.getloadavg()[0]) > 1.5
                         else "quiet (1-minute load average <= 1.5 before and after)"),
           "loadavg_before_after": [[round(v, 2) for v in load_before], [round(v, 2) for v in os.getloadavg()]],
           "loadavg_1min_per_task_before_after": loads,
           "config": {k: getattr(ARGS, k) for k in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers",
                                                     "n_dense_layers", "n_heads", "n_routed_experts",
                                                     "n_activated_experts", "n_expert_groups", "n_limited_groups",
                                                     "n_shared_experts", "q_lora_rank", "kv_lora_rank",
                                                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                                     "attn_impl")},
           "notes": "float32; eager on both sides (no torch.compile); "
                    "transformers defaults (sdpa attention, experts_implementation grouped_mm, DynamicCache); "
                    f"{a.repeats} alternating rounds after a warm-up; speed-up = median of per-round time ratios, "
                    "robust to other jobs on the machine; absolute tokens/s are not",
           "results": results, "speedup_dsv3_lite_over_transformers": speedups}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(speedups))


if __name__ == "__main__":
    main()
