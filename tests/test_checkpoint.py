"""Sizing, layout and reading of checkpoints (notebooks/11_checkpoints.ipynb): the memory planner against the tiny
model's real allocations and the published 671B numbers, the activation meter, the published layout as an index,
checkpoints written in that layout, read by our loaders (whole, truncated, streamed) and by transformers."""

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_lite import ModelArgs, Transformer
from dsv3_lite.checkpoint import (
    GB,
    activation_bytes,
    checkpoint_config,
    checkpoint_layout,
    checkpoint_tensors,
    kv_cache_bytes,
    load_hf_checkpoint,
    load_mtp,
    load_plan,
    model_weights,
    peak_live_bytes,
    plan_memory,
    random_tensor,
    shard_file,
    weight_bytes,
    write_random_checkpoint,
)
from dsv3_lite.config import param_counts
from dsv3_lite.fp8 import FP8

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelArgs.preset("tiny")
V3 = ModelArgs.preset("671B")
# the published deepseek-ai/DeepSeek-V3 download: tensors and bytes of tensor data in its 163 shards' headers
PUBLISHED_TENSORS, PUBLISHED_BYTES, PUBLISHED_SHARDS = 91_991, 688_574_839_360, 163


# --- the planner ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_weight_bytes_equal_what_the_tiny_model_holds(dtype):
    """Parameters and buffers (FP8 scales, routing biases) of a BF16 model, to the byte; the tiny FP8 model keeps its
    narrow projections (input 96 and 64, not multiples of 128) in BF16, as use_fp8 does, and so does the planner."""
    model = Transformer(TINY.replace(dtype=dtype)).to(torch.bfloat16)
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    planned = weight_bytes(TINY, weights=dtype)
    assert planned["total"] == held
    assert planned["params"] == param_counts(TINY)["total"]


def test_kv_cache_bytes_equal_what_setup_cache_allocates():
    model = Transformer(TINY).to(torch.bfloat16)
    for batch, seq_len in ((1, 512), (3, 100)):
        model.setup_cache(batch, seq_len)
        allocated = sum(t.nbytes for layer in model.layers for t in (layer.attn.kv_cache, layer.attn.pe_cache))
        assert allocated == kv_cache_bytes(TINY, batch=batch, seq_len=seq_len)
    assert kv_cache_bytes(V3, seq_len=4096) == 61 * 4096 * 576 * 2
    assert kv_cache_bytes(V3, seq_len=4096, mtp=True) == 62 * 4096 * 576 * 2
    assert kv_cache_bytes(V3, 8, batch=8, seq_len=4096, parallel="ep") == kv_cache_bytes(V3, seq_len=4096)


def test_peak_live_bytes_counts_new_storages_and_frees():
    def steps():
        a = torch.ones(1000)                  # 4000 bytes
        b = a.view(10, 100) * 2               # a view costs nothing; the product 4000 more
        del a
        c = torch.zeros(500, dtype=torch.float64)   # a freed: 4000 + 4000
        return b.sum() + c.sum()              # + a 4-byte and an 8-byte sum, then their float64 total
    _, peak = peak_live_bytes(steps)
    assert peak == 4000 + 4000 + 4 + 8 + 8
    weight = torch.randn(64, 64)              # made before: its views are not counted
    _, peak = peak_live_bytes(lambda: weight.T[:8])
    assert peak == 0


@pytest.mark.parametrize("changes, phase", [({}, "dense_ffn"), ({"n_dense_layers": 0}, "moe"),
                                           ({"n_heads": 16}, "attention")])
def test_activation_estimate_within_10_percent_of_the_measured_peak(changes, phase):
    """BF16 forward passes of three tiny variants whose peaks sit in the dense FFN, the MoE and the attention."""
    args = TINY.replace(**changes)
    model = Transformer(args).to(torch.bfloat16).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, measured = peak_live_bytes(model, tokens, last_only=True)
    estimate = activation_bytes(args, weights="bf16", batch=2, seq_len=64)
    assert abs(estimate["peak"] / measured - 1) < 0.10
    assert max(("attention", "dense_ffn", "moe"), key=lambda p: estimate.get(p, 0)) == phase


def test_671B_weights_equal_the_published_sizes():
    one = weight_bytes(V3)
    assert one["params"] == param_counts(V3)["total"] == 671_026_419_200
    with_mtp = weight_bytes(V3, mtp=True)
    assert with_mtp["params"] - one["params"] == param_counts(V3)["mtp"]
    copies = 2 * 2 * V3.vocab_size * V3.dim          # the MTP layer's embed_tokens and shared_head.head (BF16)
    assert with_mtp["total"] + copies == PUBLISHED_BYTES
    assert sum(math.prod(w.shape) * w.count for w in model_weights(V3)) == one["params"]


def test_671B_on_8_gpus_is_one_eighth_of_the_split_part_plus_the_replicated_part():
    """Every tensor the official split cuts divides exactly (tolerance 0), scales included."""
    one, eight = weight_bytes(V3), weight_bytes(V3, world_size=8)
    assert eight["total"] == (one["total"] - eight["replicated"]) // 8 + eight["replicated"]
    assert 1.1 * GB < eight["replicated"] < 1.2 * GB          # wq_a, wkv_a, norms, routers: 1.14 GB
    assert eight["params"] * 8 > one["params"]               # replicated parameters are counted on every rank
    assert weight_bytes(V3, 8, parallel="tp")["total"] == eight["total"]   # 1/8 of each expert = every 8th expert
    assert weight_bytes(V3, 8, parallel="ep")["total"] > eight["total"] + 15 * GB   # attention etc. replicated
    bf16 = weight_bytes(V3, 8, weights="bf16")
    assert bf16["total"] == (weight_bytes(V3, weights="bf16")["total"] - bf16["replicated"]) // 8 + bf16["replicated"]


def test_plan_memory_table_and_totals():
    fits = {}
    for weights in ("fp8", "bf16"):
        for W in (1, 2, 4, 8, 16):
            p = plan_memory(V3, W, weights)
            assert p["total"] == p["weights"] + p["kv_cache"] + p["activations"] + p["workspace"]
            fits[weights, W] = p["total"] <= 141 * GB, p["total"] <= 80 * GB
    assert [W for (w, W), (h200, _) in fits.items() if h200 and w == "fp8"] == [8, 16]
    assert [W for (w, W), (_, small) in fits.items() if small] == [16]          # FP8 on 16 cards of 80 GB
    assert [W for (w, W), (h200, _) in fits.items() if h200 and w == "bf16"] == [16]
    p = plan_memory(V3, 8, batch=8, seq_len=16384)                           # the official runtime limits
    assert p["kv_cache"] == 8 * 16384 * 576 * 2 * 61
    assert plan_memory(V3, reserve=0)["workspace"] == 8 * 16384 * 32 + 61 * 32768 * 512 * 2   # RoPE + wkv_b copies
    assert plan_memory(V3, weights="bf16", reserve=0)["workspace"] == 8 * 16384 * 32


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=3), "world_size = 3 is not allowed: it must divide n_routed_experts = 256"),
    (dict(world_size=256), "it must divide n_heads = 128"),
    (dict(world_size=64, parallel="tp"), "would be cut to \\(288, 7168\\), across its 128×128 scale blocks"),
    (dict(world_size=0), "world_size = 0 is not allowed: it must be a positive int"),
    (dict(weights="fp16"), "weights = 'fp16' is not allowed"),
    (dict(parallel="dp"), "parallel = 'dp' is not allowed: choose one of"),
    (dict(batch=9), "batch = 9 is not allowed: at most ModelArgs.max_batch_size = 8"),
    (dict(seq_len=16385), "seq_len = 16385 is not allowed: at most ModelArgs.max_seq_len = 16384"),
    (dict(world_size=2, parallel="ep", batch=True), "batch = True is not allowed"),
])
def test_plan_memory_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_memory(V3, **kwargs)


def test_tiny_fp8_cut_through_scale_blocks_is_refused():
    assert weight_bytes(TINY, 2, "bf16")["total"] < weight_bytes(TINY)["total"]
    with pytest.raises(ValueError, match="o_proj.weight \\(256, 128\\) would be cut to \\(256, 64\\)"):
        weight_bytes(TINY, 2, "fp8")


# --- the published layout, as an index ---------------------------------------------------------------------------------

def test_671B_layout_equals_the_published_download():
    layout = checkpoint_layout(V3, n_shards=PUBLISHED_SHARDS)
    assert len(layout.tensors) == PUBLISHED_TENSORS and layout.total_size == PUBLISHED_BYTES
    assert layout.files()[0] == "model-00001-of-000163.safetensors" == shard_file(1, 163)
    assert layout.files()[-1] == "model-00163-of-000163.safetensors"
    assert layout.shards == sorted(layout.shards) and set(layout.shards) == set(range(1, 164))   # contiguous, none empty
    index = layout.index()
    assert index["metadata"]["total_size"] == PUBLISHED_BYTES and len(index["weight_map"]) == PUBLISHED_TENSORS
    specs = {t.name: t for t in layout.tensors}
    fp8 = [n for n, t in specs.items() if t.dtype == FP8]
    assert len(fp8) == 45_808 and all(specs[n + "_scale_inv"].dtype == torch.float32 for n in fp8)
    scale = specs["model.layers.5.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert scale.shape == (5, 56)                                # 576 rows = 4.5 blocks, counted with a ceiling
    assert specs["model.layers.60.mlp.experts.255.down_proj.weight"].shape == (7168, 2048)
    assert specs["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert specs["model.layers.3.mlp.gate.weight"].dtype == torch.bfloat16
    mtp = {n.removeprefix("model.layers.61.") for n in specs if n.startswith("model.layers.61.")}
    assert {"embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
            "shared_head.head.weight", "mlp.experts.255.gate_proj.weight_scale_inv"} <= mtp and len(mtp) == 1564
    assert specs["model.layers.61.eh_proj.weight"].dtype == torch.bfloat16
    assert not any(n.startswith("model.layers.62.") for n in specs)


def test_layout_options_and_bad_shard_counts():
    assert checkpoint_layout(V3).n_shards == math.ceil(PUBLISHED_BYTES / (5 * GB))        # 5 GB shards by default
    no_mtp = checkpoint_tensors(V3, with_mtp=False)
    assert len(no_mtp) == PUBLISHED_TENSORS - 1564
    assert all(t.dtype == torch.bfloat16 for t in checkpoint_tensors(TINY) if not t.name.endswith("bias"))
    for n in (0, -1, 2.5, True, len(checkpoint_tensors(TINY)) + 1):
        with pytest.raises(ValueError, match="checkpoint_layout: n_shards = .* is not allowed"):
            checkpoint_layout(TINY, n_shards=n)
    with pytest.raises(ValueError, match="would leave a shard empty"):
        checkpoint_layout(TINY, n_shards=100)      # the 1 MB embedding alone is ten shards' share


# --- checkpoints written in that layout --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    out = {}
    for dtype in ("fp8", "bf16"):
        args = TINY.replace(dtype=dtype)
        out[dtype] = (root / dtype, args, write_random_checkpoint(args, root / dtype, n_shards=3, seed=1))
    return out


def _digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_written_files_follow_the_layout(written, dtype):
    from safetensors import safe_open

    path, args, layout = written[dtype]
    assert sorted(f.name for f in path.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", *(shard_file(k, 3) for k in (1, 2, 3))])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    config = json.loads((path / "config.json").read_text())
    assert config == checkpoint_config(args)
    assert ("quantization_config" in config) == (dtype == "fp8")
    if dtype == "fp8":
        assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": [128, 128]}
    stored, total = {}, 0
    for file in layout.files():
        with safe_open(path / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                stored[name] = t
                total += t.nbytes
                assert index["weight_map"][name] == file
    assert sorted(stored) == sorted(index["weight_map"]) and index["metadata"]["total_size"] == total
    for spec in layout.tensors:
        assert (stored[spec.name].dtype, tuple(stored[spec.name].shape)) == (spec.dtype, spec.shape)
    n = args.n_layers
    for extra in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head"):
        assert f"model.layers.{n}.{extra}.weight" in stored
    assert torch.equal(stored[f"model.layers.{n}.embed_tokens.weight"], stored["model.embed_tokens.weight"])
    assert torch.equal(stored[f"model.layers.{n}.shared_head.head.weight"], stored["lm_head.weight"])
    expert = "model.layers.1.mlp.experts.7.down_proj.weight"
    if dtype == "fp8":
        assert stored[expert].dtype == FP8 and stored[expert + "_scale_inv"].shape == (2, 1)      # [256, 128]
        assert stored["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape == (2, 1)       # [192, 96]
    else:
        assert stored[expert].dtype == torch.bfloat16 and expert + "_scale_inv" not in stored


def test_written_weights_depend_only_on_seed_and_name(written, tmp_path):
    from safetensors.torch import load_file

    path, args, layout = written["fp8"]
    write_random_checkpoint(args, tmp_path / "again", n_shards=3, seed=1)
    assert _digest(tmp_path / "again") == _digest(path)                        # the same files, byte for byte
    write_random_checkpoint(args, tmp_path / "one", n_shards=1, seed=1)
    one = load_file(tmp_path / "one" / shard_file(1, 1))
    three = {k: v for f in layout.files() for k, v in load_file(path / f).items()}
    assert one.keys() == three.keys() and all(torch.equal(one[k].view(torch.uint8), three[k].view(torch.uint8))
                                              for k in one)                    # the shard count changes no value
    head = random_tensor("lm_head.weight", (args.vocab_size, args.dim), seed=1, std=args.init_std)
    assert torch.equal(head.to(torch.bfloat16), one["lm_head.weight"])          # regenerated from its name alone
    assert torch.equal(random_tensor("x", (3,), seed=5), random_tensor("x", (3,), seed=5))
    assert not torch.equal(random_tensor("x", (3,), seed=5), random_tensor("y", (3,), seed=5))
    assert not torch.equal(random_tensor("x", (3,), seed=5), random_tensor("x", (3,), seed=6))


def test_write_refuses_a_folder_in_use(written):
    path, args, _ = written["bf16"]
    with pytest.raises(ValueError, match="write_random_checkpoint: path = .* is not allowed: give a new or empty"):
        write_random_checkpoint(args, path)
    assert not list(path.glob(".*.tmp*"))                               # no temporary shard left behind


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_our_loaders_read_the_written_checkpoint(written, dtype, capsys):
    from safetensors.torch import load_file

    path, args, layout = written[dtype]
    stored = {k: v for f in layout.files() for k, v in load_file(path / f).items()}
    tokens = torch.randint(0, args.vocab_size, (1, 9))
    for load_dtype in ("fp8", torch.float32) if dtype == "fp8" else (torch.float32,):
        model = load_mtp(load_hf_checkpoint(path, dtype=load_dtype), path)
        with torch.no_grad():
            assert model(tokens).isfinite().all()
        wo = model.layers[0].attn.wo
        if load_dtype == "fp8" and dtype == "fp8":     # kept as stored, bit for bit
            assert torch.equal(wo.weight.view(torch.uint8),
                               stored["model.layers.0.self_attn.o_proj.weight"].view(torch.uint8))
            assert torch.equal(wo.scale, stored["model.layers.0.self_attn.o_proj.weight_scale_inv"])
        assert torch.equal(model.mtp.layers[0].eh_proj.weight.float(),
                           stored[f"model.layers.{args.n_layers}.eh_proj.weight"].float())
    assert "skipped 44 tensors of layer(s) [4]" in capsys.readouterr().out


def test_transformers_reads_the_written_bf16_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transformers import DeepseekV3ForCausalLM

    write_random_checkpoint(TINY, tmp_path / "main", with_mtp=False)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "main", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_hf_checkpoint(tmp_path / "main", dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (2, 11))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4
    # with the MTP layer: transformers' main model skips only `model.layers.61.*` by name, so the tiny model's
    # layer 4 shows up as unexpected, and nothing else does
    write_random_checkpoint(TINY, tmp_path / "mtp")
    _, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "mtp", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"]
    assert all(k.startswith(f"model.layers.{TINY.n_layers}.") for k in info["unexpected_keys"])


# --- streaming and truncated loading ------------------------------------------------------------------------------------

def _layer(name):
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def test_load_plan_of_the_671B_index_reads_only_the_first_layers():
    weight_map = checkpoint_layout(V3, n_shards=PUBLISHED_SHARDS).index()["weight_map"]
    plan = load_plan(weight_map, 4)
    assert [g for g, _ in plan] == ["embed", "layer 0", "layer 1", "layer 2", "layer 3", "head"]
    planned = [k for _, names in plan for k in names]
    wanted = [k for k in weight_map if _layer(k) is None or _layer(k) < 4]
    assert sorted(planned) == sorted(wanted) and len(planned) == len(set(planned))
    assert sorted(dict(plan)["head"]) == ["lm_head.weight", "model.norm.weight"]
    assert len(dict(plan)["layer 3"]) == 2 * 3 * 256 + 2 * 3 + 2 * 5 + 2 + 2 + 2     # experts, shared, attention, ...
    for _, names in plan:                                      # names sorted by shard: files are read front to back
        assert [weight_map[k] for k in names] == sorted(weight_map[k] for k in names)
    assert len({weight_map[k] for k in planned}) < 10          # a handful of the 163 shards
    assert all(_layer(k) is None or _layer(k) < 61 for k in load_plan(weight_map, 61)[-1][1])   # MTP layer 61 left out


class _CountingSafeOpen:
    """safe_open that records the name of every tensor read (installed over safetensors.safe_open)."""
    read: list = []
    real = None

    def __init__(self, *args, **kwargs):
        self.f = _CountingSafeOpen.real(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def get_tensor(self, key):
        _CountingSafeOpen.read.append(key)
        return self.f.get_tensor(key)


@pytest.fixture
def counting(monkeypatch):
    import safetensors

    _CountingSafeOpen.read, _CountingSafeOpen.real = [], safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", _CountingSafeOpen)
    return _CountingSafeOpen.read


@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncated_load_reads_exactly_the_needed_tensors_from_a_partial_download(written, tmp_path, k, counting,
                                                                                  capsys):
    path, args, _ = written["fp8"]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {k2 for k2 in index if _layer(k2) is None or _layer(k2) < k}
    part = tmp_path / "part"
    part.mkdir()
    for f in ("config.json", "model.safetensors.index.json", *sorted({index[n] for n in needed})):
        (part / f).symlink_to(path / f)
    model = load_hf_checkpoint(part, dtype=torch.float32, n_layers=k)
    assert sorted(counting) == sorted(needed)                   # each needed tensor once, nothing else
    assert model.args.n_layers == k and len(model.layers) == k
    if k < args.n_layers:
        assert f"read layers 0 … {k - 1} of {args.n_layers}" in capsys.readouterr().out
    full = load_hf_checkpoint(path, dtype=torch.float32)
    whole = full.state_dict()
    for name, t in model.state_dict().items():                  # the same numbers as the whole model's first k layers
        assert torch.equal(t, whole[name]), name


def test_truncated_model_is_the_whole_model_cut_after_k_layers(written):
    path, args, _ = written["bf16"]
    full = load_hf_checkpoint(path, dtype=torch.float32)
    two = load_hf_checkpoint(path, dtype=torch.float32, n_layers=2)
    full.layers = full.layers[:2]                              # the same model, by hand
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(two(tokens), full(tokens))


def test_loading_closes_each_layers_shards(written, monkeypatch):
    from dsv3_lite import checkpoint

    opened, path = [], written["fp8"][0]
    release = checkpoint._Shards.release

    def spy(self):
        opened.append(len(self.handles))
        release(self)

    monkeypatch.setattr(checkpoint._Shards, "release", spy)
    load_hf_checkpoint(path, dtype=torch.float32)
    assert len(opened) == 1 + TINY.n_layers + 1 and max(opened) <= 2   # embed, 4 layers, head; at most 2 files open


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures resident memory through /proc (Linux)")
def test_peak_host_memory_is_one_layer_not_the_checkpoint(tmp_path):
    out = tmp_path / "load_memory.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_memory.py"), "--out", str(out)], check=True,
                   capture_output=True, cwd=ROOT)
    r = json.loads(out.read_text())["result"]
    assert r["bound_bytes"] == int(1.5 * (r["largest_layer_bytes"] + r["embedding_bytes"]))
    assert r["checkpoint_bytes"] > 3 * r["bound_bytes"]        # a whole-checkpoint load could not pass unnoticed
    assert r["streaming_extra_bytes"] <= r["bound_bytes"]
    assert r["load_file_extra_bytes"] > r["checkpoint_bytes"]   # the meter sees a load that holds the checkpoint


def test_progress_bar_counts_bytes(written, capsys):
    path, _, layout = written["bf16"]
    load_hf_checkpoint(path, dtype=torch.float32, progress=False)
    assert capsys.readouterr().err == ""                        # small checkpoints: quiet by default too
    load_hf_checkpoint(path, dtype=torch.float32, progress=True)
    err = capsys.readouterr().err
    main = sum(t.nbytes for t in layout.tensors if (_layer(t.name) or 0) < TINY.n_layers)
    assert "load_hf_checkpoint: 100%" in err and f"{main / 1e6:.2f}M/{main / 1e6:.2f}M" in err


def test_load_mtp_with_the_main_load(written):
    path, args, _ = written["bf16"]
    one = load_hf_checkpoint(path, dtype=torch.float32, mtp=True)
    two = load_mtp(load_hf_checkpoint(path, dtype=torch.float32), path)
    assert one.state_dict().keys() == two.state_dict().keys()
    assert all(torch.equal(t, two.state_dict()[n]) for n, t in one.state_dict().items())


def test_loader_bad_input(written, tmp_path):
    from safetensors.torch import load_file, save_file

    path, args, layout = written["fp8"]
    for bad in (0, 5, True, "2", 1.0):
        with pytest.raises(ValueError, match=re.escape(f"n_layers = {bad!r} is not allowed: an int in [1, 4]")):
            load_hf_checkpoint(path, n_layers=bad)
    with pytest.raises(ValueError, match="mtp=True with n_layers = 2 is not allowed"):
        load_hf_checkpoint(path, n_layers=2, mtp=True)
    part = tmp_path / "part"
    part.mkdir()
    for f in ("config.json", "model.safetensors.index.json", shard_file(1, 3)):
        (part / f).symlink_to(path / f)
    with pytest.raises(FileNotFoundError, match=re.escape(f"names shards that are not in {part}: ")
                       + ".*" + re.escape("(they hold tensors the load needs)")):
        load_hf_checkpoint(part)
    cfg = json.loads((path / "config.json").read_text())
    state = {k: v for f in layout.files() for k, v in load_file(path / f).items()}
    wo = "model.layers.0.self_attn.o_proj.weight"
    for name, change, message in [
        ("scale", {wo + "_scale_inv": torch.ones(3, 3)}, f"{wo}_scale_inv in "),
        ("noscale", {wo + "_scale_inv": None}, f"{wo} is FP8 but {wo}_scale_inv is missing"),
        ("int", {"model.norm.weight": torch.ones(TINY.dim, dtype=torch.int32)},
         "model.norm.weight in model.safetensors: dtype torch.int32, a floating-point dtype is allowed"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        changed = {k: v for k, v in (state | change).items() if v is not None}
        save_file(changed, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg))
        for dtype in ("fp8", torch.float32):
            with pytest.raises(ValueError, match=re.escape(message)):
                load_hf_checkpoint(folder, dtype=dtype)
