"""Training and decoding on the CPU: the targets of notebook 10 (issue 7, item 6), measured in one run.

1. Training tokens/s of `dsv3_lite` vs transformers' `DeepseekV3ForCausalLM` on the same `tiny` config, same batch,
   same AdamW, float32, measured side by side (steps alternate between the two so machine load hits both alike).
   Target: ours >= 1.5x.
2. Validation loss in nats per character after <= `--minutes` (default 10) of training on the bundled Shakespeare
   (`dsv3-lite train` settings), with the curve. Target: <= 1.88 (nanoGPT's CPU Shakespeare run, character level).
3. Greedy decoding tokens/s, self-speculative (MTP drafts) vs plain, on the model trained in 2. Target: >= 1.5x.

Usage: python benchmarks/train_cpu.py [--minutes 10] [--threads 2]   -> benchmarks/results/train_cpu.json
The machine's load average is recorded before and after: on a shared machine re-run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import run_info

import dsv3_lite.kernels

dsv3_lite.kernels.setup_triton()  # before transformers imports Triton (the CPU interpreter)

ROOT = Path(__file__).resolve().parents[1]


def train_speed(threads: int, batch_size: int, seq_len: int, steps: int) -> dict:
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from dsv3_lite.config import ModelArgs
    from dsv3_lite.train import TrainConfig, Trainer

    transformers.utils.logging.set_verbosity_error()
    cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len, steps=1000, warmup=10, eval_every=10 ** 6,
                      ckpt_every=10 ** 6)
    ours_full = Trainer(cfg)                                                   # next token + MTP + balance + bias
    ours_main = Trainer(dataclasses.replace(cfg, model={"n_mtp_layers": 0}, balance_alpha=0.0))  # like-for-like
    args = ModelArgs.preset("tiny")
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**args.to_hf_config())).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(0)
    from dsv3_lite.data.tokens import sample_windows

    def hf_step():
        x, y = sample_windows(ours_main.train_tokens, batch_size, seq_len, g)
        logits = hf(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        hf_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    runs = {"dsv3_lite (next token only)": ours_main.train_step, "transformers DeepseekV3ForCausalLM": hf_step,
            "dsv3_lite (next token + MTP + balance loss + bias update)": ours_full.train_step}
    times = {k: [] for k in runs}
    for i in range(steps + 2):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i >= 2:                                                          # 2 warm-up steps each
                times[name].append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    out = {name: {"median_step_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t),
                  "steps_timed": len(t)} for name, t in times.items()}
    ours, ref = out["dsv3_lite (next token only)"], out["transformers DeepseekV3ForCausalLM"]
    return {"config": "tiny", "batch_size": batch_size, "seq_len": seq_len, "dtype": "float32", "threads": threads,
            "hf_attn_implementation": hf.config._attn_implementation,
            "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "results": out, "speedup_vs_transformers": ours["tokens_per_s"] / ref["tokens_per_s"],
            "target_speedup": 1.5, "met": ours["tokens_per_s"] / ref["tokens_per_s"] >= 1.5}


def train_for(minutes: float, out_dir: Path) -> tuple[object, dict]:
    from dsv3_lite.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=10 ** 6, warmup=30, eval_every=50, eval_batches=8, ckpt_every=10 ** 6)
    trainer = Trainer(cfg, out_dir)
    start = time.monotonic()
    trainer.train(minutes=minutes, fit_schedule=True)          # as `dsv3-lite train --minutes`
    wall = time.monotonic() - start
    h = trainer.history
    cpt = trainer.chars_per_token
    every = max(1, len(h["main"]) // 100)
    res = {"minutes_budget": minutes, "wall_s": wall, "steps": trainer.step,
           "tokens_seen": trainer.tokens_seen, "config": dataclasses.asdict(cfg), "val_chars_per_token": cpt,
           "final_val_nats_per_token": h["val"][-1], "final_val_nats_per_char": h["val"][-1] / cpt,
           "target_nats_per_char": 1.88, "met": h["val"][-1] / cpt <= 1.88,
           "curve": {"val_step": h["val_step"], "val_nats_per_token": h["val"],
                     "val_nats_per_char": [v / cpt for v in h["val"]],
                     "train_step": h["step"][::every], "train_nats_per_token": h["main"][::every]}}
    return trainer, res


def decoding(model, n_tokens: int) -> dict:
    from dsv3_lite.data.corpus import shakespeare, shakespeare_tokenizer, train_val_split
    from dsv3_lite.speculative import compare_decoding

    tok = shakespeare_tokenizer()
    _, val = train_val_split(shakespeare())
    prompts = [val[i:i + 200] for i in (0, 50_000, 120_000)]
    rows = []
    for p in prompts:
        ids = tok.encode(p)[:48]
        rows.append(compare_decoding(model, ids, max_new_tokens=n_tokens, repeats=5))
    mean = lambda k: statistics.fmean(r[k] for r in rows)
    speedup = mean("speculative_tok_s") / mean("plain_tok_s")
    parts = step_costs(model, 150)
    a = mean("acceptance_rate")
    bound = (1 + a) * parts["main_1_token_ms"] / (parts["main_2_tokens_ms"] + parts["mtp_step_ms"])
    return {"prompts": len(rows), "new_tokens": n_tokens, "greedy": True, "per_prompt": rows,
            "plain_tok_s": mean("plain_tok_s"), "speculative_tok_s": mean("speculative_tok_s"),
            "speedup": speedup, "acceptance_rate": mean("acceptance_rate"),
            "all_identical_to_plain": all(r["same_tokens"] for r in rows), "target_speedup": 1.5,
            "met": speedup >= 1.5, "step_costs": parts,
            "expected_speedup_from_step_costs": bound,
            "why": "a speculative step = one main forward of 2 tokens + one MTP block and yields 1 + acceptance "
                   "tokens; plain decoding = one main forward of 1 token per token. With 4 main layers the MTP "
                   "block adds ~1/4 of a forward (V3: 1/61), so even 100% acceptance gives at most "
                   "2 * main_1 / (main_2 + mtp)"}


def step_costs(model, start_pos: int, repeats: int = 30) -> dict:
    """Best-of-`repeats` milliseconds of the pieces of a decoding step, alternated: main forward of 1 and of 2
    tokens with the KV cache, and one MTP draft step (1 pair)."""
    from dsv3_lite.speculative import mtp_draft_step

    model.setup_cache(1, start_pos + 4)
    with torch.no_grad():
        model(torch.zeros(1, start_pos, dtype=torch.long), 0)   # fill the cache up to start_pos, as a prompt would
    attn = model.mtp.layers[0].block.attn
    attn.setup_cache(1, start_pos + 4)
    h = torch.zeros(1, 1, model.args.dim)
    fns = {"main_1_token_ms": lambda: model(torch.tensor([[5]]), start_pos, last_only=True),
           "main_2_tokens_ms": lambda: model.head(model.hidden(torch.tensor([[5, 6]]), start_pos)),
           "mtp_step_ms": lambda: model.head(mtp_draft_step(model, h, torch.tensor([[7]]), start_pos)[:, -1])}
    best = dict.fromkeys(fns, float("inf"))
    try:
        with torch.no_grad():
            for _ in range(repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    finally:
        model.reset_cache()
        attn.reset_cache()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("DSV3_LITE_CACHE", str(Path(tempfile.gettempdir()) / "dsv3_lite_bench_cache"))

    result = {"benchmark": "train_cpu", **run_info(),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": a.threads},
              "loadavg_start": os.getloadavg()}
    t0 = time.time()
    result["train_speed"] = train_speed(a.threads, 16, 128, a.speed_steps)
    print(json.dumps(result["train_speed"], indent=1))
    result["loadavg_after_speed"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        trainer, result["val_loss"] = train_for(a.minutes, Path(d))
    print({k: v for k, v in result["val_loss"].items() if k not in ("curve", "config")})
    result["loadavg_after_training"] = os.getloadavg()
    result["decoding"] = decoding(trainer.model.eval(), 200)
    print({k: v for k, v in result["decoding"].items() if k != "per_prompt"})
    result["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.time() - t0
    result["note"] = ("load averages above the core count mean other processes shared the CPU; compare the "
                      "side-by-side ratios, and re-run on a quiet machine for absolute numbers")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
