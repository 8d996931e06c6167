"""Host memory of loading a checkpoint (notebooks/11_checkpoints.ipynb): `load_hf_checkpoint`, which streams layer by
layer, next to the plain way (`safetensors.torch.load_file` on every shard, then `load_state_dict`).

Writes a checkpoint of the tiny configuration widened to 32 routed experts of width 512 and 6 layers (about 25 MB per
MoE layer in BF16), in 12 shards, with `write_random_checkpoint`. Each way of loading runs in a fresh Python process
that loads to the CPU in BF16; the process reports its peak resident set size (`ru_maxrss`) and its resident size just
before the load (`/proc/self/statm`), after building one small model on the meta device (the first model a
process builds loads code and tables, about 150 MB, which is not the load's). The extra memory of a load is peak − before − the bytes of the model's own
parameters and buffers: what the load needs beyond the model it fills. The bound the loader promises:
extra ≤ 1.5 × (largest layer + embedding), the bytes of the checkpoint's tensors. Linux only (`/proc`).

Usage:  python benchmarks/load_memory.py --out benchmarks/results/load_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import cpu_name, run_info, write_record  # noqa: E402  (benchmarks/timing.py)

from dsv3_lite import ModelArgs  # noqa: E402
from dsv3_lite.checkpoint import _layer_of, write_random_checkpoint  # noqa: E402

ARGS = ModelArgs.preset("tiny").replace(n_layers=6, n_routed_experts=32, moe_inter_dim=512, n_activated_experts=4,
                                        n_expert_groups=1, n_limited_groups=1)
N_SHARDS = 12

CHILD = r"""
import json, os, resource, sys
import torch
from safetensors.torch import load_file
from dsv3_lite.checkpoint import load_hf_checkpoint
from dsv3_lite.config import ModelArgs
from dsv3_lite.model import Transformer, from_hf_state_dict

torch.set_num_threads(1)
how, folder = sys.argv[1], sys.argv[2]
args = ModelArgs.from_hf_config(json.load(open(os.path.join(folder, "config.json"))))
with torch.device("meta"):
    Transformer(ModelArgs.preset("tiny"))        # warm-up: the first model built loads code and tables (~150 MB)
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if how == "load_hf_checkpoint":
    model = load_hf_checkpoint(folder, dtype=torch.bfloat16, progress=False)
else:
    torch.set_default_dtype(torch.bfloat16)
    model = Transformer(args)
    state = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, f)))
    model.load_state_dict(from_hf_state_dict(state, args.n_layers))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"before": before, "peak": peak, "model_bytes": held}))
"""


def extra_bytes(folder: Path, how: str) -> dict:
    """Run one load in a fresh process; its peak resident memory beyond what it had before and the model's bytes."""
    out = subprocess.run([sys.executable, "-c", CHILD, how, str(folder)], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r | {"extra": r["peak"] - r["before"] - r["model_bytes"]}


def measure(folder: Path) -> dict:
    layout = write_random_checkpoint(ARGS, folder, n_shards=N_SHARDS, with_mtp=False)
    layers: dict[int, int] = {}
    for t in layout.tensors:
        if _layer_of(t.name) is not None:
            layers[_layer_of(t.name)] = layers.get(_layer_of(t.name), 0) + t.nbytes
    embedding = next(t.nbytes for t in layout.tensors if t.name == "model.embed_tokens.weight")
    stream, whole = extra_bytes(folder, "load_hf_checkpoint"), extra_bytes(folder, "load_file")
    return {"largest_layer_bytes": max(layers.values()), "embedding_bytes": embedding,
            "checkpoint_bytes": layout.total_size, "bound_bytes": int(1.5 * (max(layers.values()) + embedding)),
            "streaming_extra_bytes": stream["extra"], "load_file_extra_bytes": whole["extra"],
            "model_bytes": stream["model_bytes"], "streaming": stream, "load_file": whole}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp) / "ckpt")
    import torch
    record = {**run_info(), "benchmark": "benchmarks/load_memory.py",
              "machine": {"cpu": cpu_name(), "platform": platform.platform(), "torch_threads": 1},
              "config": f"tiny preset, n_layers=6, 32 routed experts of width 512, BF16, {N_SHARDS} shards",
              "torch": torch.__version__, "result": result}
    print(json.dumps(result, indent=2))
    write_record(a.out, record)


if __name__ == "__main__":
    main()
