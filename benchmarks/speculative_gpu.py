"""GPU benchmark of self-speculative decoding's step (notebooks/09_mtp.ipynb): the cost of verifying two tokens.

Each step of `speculative_generate` feeds the main model two tokens [x, d] (the last token and the MTP draft) and runs
MTP module 1 on the new (hidden state, token) pairs to draft again. On a GPU decoding is bound by reading weights, so
two tokens cost less than two steps; how much less decides the speed-up. Measured on the 671B preset cut to 2 layers
(layer 0 dense, layer 1 MoE, full width, random weights) with its MTP module, batch 1, on a 4096-token cache, in bf16
and in FP8 (the same weights converted by `use_fp8`, experts grouped), each step captured in a CUDA graph:

  step_1   model(tokens [1, 1]) -> last logits              (the plain decode step)
  verify_2 model.head(model.hidden(tokens [1, 2]))            (logits at both positions)
  draft    model.head(mtp_draft_step(model, h [1, 2], ...))   (MTP module 1 on two pairs, the accepted case)
  head_1, head_2: the head alone on 1 and 2 positions

The graphs are captured at a fixed position (context 4096) and replayed there: the same GPU work as a step of a
generation loop, which would also need the position on the device for the two-token step. Check: the verify graph's
logits at its first position equal the one-token step's (same token, same cache).

From them, for the full 61-layer model: a layer's cost per step is (slice − head) / 2, the full step is 61 layers +
head, and the speed-up at second-token acceptance p (the paper reports 85-90 %) is
(1 + p) · full(1) / (full(2) + draft): (1 + p) tokens per step, each step one verify and one draft.

Usage:  python benchmarks/speculative_gpu.py [--out benchmarks/results/speculative_h200.json]
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

from timing import gpu_warmup, run_info, step_ms, write_record  # noqa: E402  (benchmarks/timing.py)

import dsv3_lite.fp8 as F  # noqa: E402
from dsv3_lite.config import ModelArgs  # noqa: E402
from dsv3_lite.model import Transformer  # noqa: E402
from dsv3_lite.moe import MoE  # noqa: E402
from dsv3_lite.mtp import add_mtp  # noqa: E402
from dsv3_lite.speculative import mtp_draft_step  # noqa: E402

ACCEPTANCE = (0.85, 0.90)   # the DeepSeek-V3 technical report: second-token acceptance 85-90 %


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm()), 6)


def graph(fn):
    """Capture fn() in a CUDA graph after warm-up on a side stream; return (graph, its static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def measure(model: Transformer, context: int, steps: int) -> dict:
    """Time the graphs of one model (its KV caches set up and filled with `context` tokens)."""
    V = model.args.vocab_size
    mtp_attn = model.mtp.layers[0].block.attn
    model.setup_cache(1, context + 4)
    mtp_attn.setup_cache(1, context + 4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ctx = torch.randint(0, V, (1, context), device="cuda", generator=gen)
    h_ctx = model.hidden(ctx, 0)                                                   # prefill: main cache written
    mtp_draft_step(model, h_ctx[:, :-1], ctx[:, 1:], 0)                            # MTP cache written
    tok2 = torch.randint(0, V, (1, 2), device="cuda", generator=gen)               # [x, d]
    h2 = model.hidden(tok2, context)                                               # [1, 2, D]
    nxt = torch.randint(0, V, (1, 2), device="cuda", generator=gen)                # the tokens after x and d
    fns = {"step_1": lambda: model(tok2[:, :1], context, last_only=True),          # [1, V]
           "verify_2": lambda: model.head(model.hidden(tok2, context)),            # [1, 2, V]
           "draft": lambda: model.head(mtp_draft_step(model, h2, nxt, context)[:, -1]),
           "head_1": lambda: model.head(h2[:, :1]),
           "head_2": lambda: model.head(h2)}
    res, outs = {}, {}
    for name, fn in fns.items():
        g, outs[name] = graph(fn)
        res[name + "_ms"] = round(step_ms(g.replay, steps, "cuda"), 4)
        del g
    res["verify first position vs step_1"] = rel(outs["verify_2"][:, 0], outs["step_1"])
    model.reset_cache()
    mtp_attn.reset_cache()
    return res


def full_model(r: dict, n_layers: int = 61) -> dict:
    """The full model's step costs from the slice's: 2 layers + head -> n_layers layers + head."""
    out = {}
    for s in (1, 2):
        t = r["step_1_ms"] if s == 1 else r["verify_2_ms"]
        layer = (t - r[f"head_{s}_ms"]) / 2
        out[f"full_step_{s}_ms"] = round(n_layers * layer + r[f"head_{s}_ms"], 3)
    out["full_verify_over_step"] = round(out["full_step_2_ms"] / out["full_step_1_ms"], 3)
    for p in ACCEPTANCE:
        out[f"speedup_at_{int(p * 100)}"] = round((1 + p) * out["full_step_1_ms"]
                                                  / (out["full_step_2_ms"] + r["draft_ms"]), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculative_h200.json")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("speculative_gpu.py needs a CUDA GPU (CUDA graphs)")
    gpu_warmup()
    args = ModelArgs.preset("671B", n_layers=2, n_dense_layers=1).replace(
        max_batch_size=1, max_seq_len=max(a.context + 4, 4096), dtype="bf16")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = add_mtp(Transformer(args).eval())
    finally:
        torch.set_default_dtype(old)
    res = {}
    for name in ("bf16", "fp8"):
        if name == "fp8":
            F.use_fp8(model)
            for m in model.modules():
                if isinstance(m, MoE) and isinstance(m.experts, F.FP8Experts):
                    m.impl = "grouped"
        with torch.inference_mode():
            r = measure(model, a.context, a.steps)
        r["slice_verify_over_step"] = round(r["verify_2_ms"] / r["step_1_ms"], 3)
        r["slice_draft_over_step"] = round(r["draft_ms"] / r["step_1_ms"], 3)
        r.update(full_model(r))
        res[name] = r
        print(name, json.dumps(r), flush=True)
    out = {"benchmark": "benchmarks/speculative_gpu.py", **run_info(cuda=torch.version.cuda),
           "machine": {"gpu": torch.cuda.get_device_name(), "cpu": platform.processor() or platform.machine()},
           "config": {"slice": "671B, n_layers=2, n_dense_layers=1, + MTP module 1", "batch": 1,
                      "context": a.context, "acceptance": list(ACCEPTANCE)},
           "notes": "median of per-replay CUDA-event timings of graphs captured at a fixed position; full-model "
                    "numbers extrapolate the slice: layer = (slice step - head) / 2, full = 61 layers + head; "
                    "speed-up = (1 + p) * full_step_1 / (full_step_2 + draft)",
           "results": res, "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    write_record(a.out, out)


if __name__ == "__main__":
    main()
