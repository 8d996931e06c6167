"""CPU benchmark of the whole model (notebooks/07_model.ipynb, issue 5 item 6): dsv3_lite vs transformers.

Side by side in one run, same tiny configuration (dim 256, 4 layers of which 1 dense, 16 routed experts top-4 in 4
groups, 8 heads, q_lora 128, kv_lora 64, vocab 2048), float32, 2 threads:
  - training: forward + backward (cross-entropy) on a 16 x 256 batch -> tokens/s
  - greedy decoding: batch 1, 16-token prompt, 64 new tokens with the KV cache -> new tokens/s
Best of `--repeats` timed runs after one warm-up (the machine is shared; the best run is the least disturbed).
Usage: python benchmarks/model_cpu.py [--repeats 3] [--out benchmarks/results/model_cpu.json]
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from dsv3_lite import ModelArgs, Transformer
from dsv3_lite.model import generate

ARGS = ModelArgs.preset("tiny").replace(
    vocab_size=2048, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=8,
    n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, n_shared_experts=1,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    max_seq_len=512, original_seq_len=128, max_batch_size=16)


def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**ARGS.to_hf_config()))
    ours = Transformer(ARGS)
    x = torch.randint(0, ARGS.vocab_size, (a.batch, a.seq))
    prompt = torch.randint(0, ARGS.vocab_size, (1, 16))

    def train_ours():
        logits = ours(x)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()

    def train_hf():
        hf(input_ids=x, labels=x).loss.backward()

    def decode_ours():
        generate(ours, prompt.tolist(), max_new_tokens=a.new_tokens)

    def decode_hf():
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)

    results = []
    ours.train(), hf.train()
    for name, fn in (("transformers", train_hf), ("dsv3_lite", train_ours)):
        t = best(fn, a.repeats)
        results.append({"task": f"train fwd+bwd {a.batch}x{a.seq}", "impl": name, "seconds": round(t, 4),
                        "tokens_per_s": round(a.batch * a.seq / t, 1)})
        print(results[-1], flush=True)
    ours.eval(), hf.eval()
    for name, fn in (("transformers", decode_hf), ("dsv3_lite", decode_ours)):
        t = best(fn, a.repeats)
        results.append({"task": f"greedy decode batch 1, prompt 16, {a.new_tokens} new", "impl": name,
                        "seconds": round(t, 4), "tokens_per_s": round(a.new_tokens / t, 1)})
        print(results[-1], flush=True)
    speedups = {r["task"]: round(next(q["tokens_per_s"] for q in results if q["task"] == r["task"]
                                      and q["impl"] == "dsv3_lite") / r["tokens_per_s"], 2)
                for r in results if r["impl"] == "transformers"}
    out = {"benchmark": "benchmarks/model_cpu.py", "date": datetime.date.today().isoformat(),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                      "torch.set_num_threads(2); shared with other users (best of repeats)",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "config": {k: getattr(ARGS, k) for k in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers",
                                                     "n_dense_layers", "n_heads", "n_routed_experts",
                                                     "n_activated_experts", "n_expert_groups", "n_limited_groups",
                                                     "n_shared_experts", "q_lora_rank", "kv_lora_rank",
                                                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                                     "attn_impl")},
           "notes": "float32; transformers defaults (sdpa attention, experts_implementation grouped_mm); "
                    f"best of {a.repeats} after a warm-up",
           "results": results, "speedup_dsv3_lite_over_transformers": speedups}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(speedups))


if __name__ == "__main__":
    main()
