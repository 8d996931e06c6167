"""Tensor and expert parallelism (`dsv3_lite.parallel`, notebook 12) on CPU processes joined with gloo.

The multi-process tests start few process groups (`parallel.launch`, one per world size) and make many checks inside
each: the cut model gives the single-process logits for a whole sequence, through the KV cache and for the MTP
module, with BF16-format and FP8 weights; each rank's part of a checkpoint (a transformers folder, or the per-rank
files of `dsv3-lite convert`) gives the logits of `load_hf_checkpoint`; the all-to-all MoE equals the all-reduce one.
Bad input (world sizes that do not divide, FP8 cuts through scale blocks, ranks with different configs, conversions
for another world size, missing rank files, a lost rank) gets an error that names it. Every collective has a timeout,
so a dead rank fails the test instead of hanging it.
"""

import copy
import json
import time

import pytest
import torch

from dsv3_lite import checkpoint, parallel
from dsv3_lite.checkpoint import load_hf_checkpoint, write_random_checkpoint
from dsv3_lite.config import ModelArgs
from dsv3_lite.fp8 import FP8Linear
from dsv3_lite.model import Transformer
from dsv3_lite.moe import MoE

TINY = ModelArgs.preset("tiny")          # W = 4 divides its heads (4), experts (8), vocabulary and FFN widths
# FP8 weights cut on whole 128×128 blocks up to W = 4: per rank wq_b 8/W·192 rows, wkv_b 8/W·256, wo 8/W·128 columns,
# dense w1/w3 512/W rows, shared expert 4·128/W
FP8_ARGS = TINY.replace(dtype="fp8", n_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, inter_dim=512, n_shared_experts=4)
TIMEOUT = 60.0                           # seconds a collective may wait before it fails


# ---- workers, run on every rank by parallel.launch ---------------------------------------------------------------

@torch.no_grad()
def _fp8_layer_errors(seed: int = 0) -> dict[str, float]:
    """|cut FP8 layer − whole FP8 layer| on the same inputs, for the embedding, an attention, a dense FFN, a MoE and
    the head of the FP8 model."""
    torch.manual_seed(seed)
    model = Transformer(FP8_ARGS).eval()
    x = torch.randn(2, 5, FP8_ARGS.dim, generator=torch.Generator().manual_seed(seed))
    freqs = model.freqs_cis(x.device)[:5]
    tokens = torch.arange(10).view(2, 5) * 197 % FP8_ARGS.vocab_size
    parts = {"embed": lambda: model.embed(tokens), "attn": lambda: model.layers[0].attn(x, 0, freqs, "causal"),
             "dense": lambda: model.layers[0].ffn(x), "moe": lambda: model.layers[1].ffn(x),
             "head": lambda: model.head(x)}
    ref = {k: f() for k, f in parts.items()}
    parallel.parallelize(model)
    return {k: (f() - ref[k]).abs().max().item() for k, f in parts.items()}


@torch.no_grad()
def _fp8_rounding_noise(seed: int = 0) -> float:
    """|FP8 model − the same model before quantisation|: the size of FP8 rounding in these logits."""
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    logits = []
    for args in (FP8_ARGS, FP8_ARGS.replace(dtype="bf16")):
        torch.manual_seed(seed)
        logits.append(Transformer(args).eval()(tokens))
    return (logits[0] - logits[1]).abs().max().item()


def _model_checks() -> dict:
    out = {"tiny": parallel.parallel_logits_error(TINY, seed=0, mtp=True),
           "naive": parallel.parallel_logits_error(TINY.replace(attn_impl="naive"), seed=1),
           "fp8": parallel.parallel_logits_error(FP8_ARGS, seed=0, mtp=True),
           "fp8_noise": _fp8_rounding_noise(),
           "fp8_layers": _fp8_layer_errors(),
           "traffic": parallel.forward_traffic(TINY)}
    if parallel.world_size() > 1:
        out["all_to_all"] = parallel.all_to_all_error(TINY, seed=0, tokens_per_rank=12)["error"]
    return out


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@torch.no_grad()
def _load_checks(root: str) -> dict:
    hf16, hf8 = f"{root}/hf16", f"{root}/hf8"
    fp8_kept = load_hf_checkpoint(hf8, dtype="fp8", progress=False).float()
    dequantised = load_hf_checkpoint(hf8, dtype=torch.float32, progress=False)
    tokens = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    out = {"hf16": parallel.loaded_logits_error(hf16, torch.float32, mtp=True),
           "hf8_dequantised": parallel.loaded_logits_error(hf8, torch.float32, mtp=True),
           "hf8_fp8": parallel.loaded_logits_error(hf8, "fp8"),
           "fp8_noise": (fp8_kept(tokens) - dequantised(tokens)).abs().max().item()}
    out["mp2_fp8_dequantised"] = parallel.loaded_logits_error(hf8, torch.float32, True, f"{root}/mp2_fp8")
    out["mp2_fp8_fp8"] = parallel.loaded_logits_error(hf8, "fp8", False, f"{root}/mp2_fp8")
    out["mp2_bf16"] = parallel.loaded_logits_error(hf16, torch.float32, True, f"{root}/mp2_bf16")
    out["other_world_size"] = _error(lambda: parallel.load_rank_checkpoint(f"{root}/mp1"))
    out["missing_rank_file"] = _error(lambda: parallel.load_rank_checkpoint(f"{root}/mp2_incomplete"))
    args = TINY.replace(n_layers=2) if parallel.rank() == 1 else TINY      # rank 1 started with another config
    out["different_args"] = _error(lambda: parallel.parallelize(Transformer(args)))
    return out


def _lose_rank_1() -> str:
    if parallel.rank() == 1:
        return "left"                         # its process ends: its connections close
    time.sleep(0.5)
    try:
        parallel.all_reduce(torch.ones(4))
    except RuntimeError as e:
        return str(e)
    return "no error"


# ---- multi-process tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_cut_model_gives_the_single_process_logits(world_size):
    """1, 2 and 4 ranks: float32 logits within 1e-5 of the plain model (sequence, KV cache, MTP, naive attention);
    every FP8 layer cut over ranks within 1e-5 of the whole layer; whole FP8 models within FP8's own rounding (the
    ranks add partial sums in another order, and a 1e-9 change can move an activation across an FP8 rounding
    boundary); the all-to-all MoE equals the all-reduce one; one forward pass makes 1 + 2·n_layers all-reduces."""
    for r, res in enumerate(parallel.launch(_model_checks, world_size, timeout=TIMEOUT)):
        assert max(res["tiny"].values()) < 1e-5, (r, res["tiny"])
        assert max(res["naive"].values()) < 1e-5, (r, res["naive"])
        assert max(res["fp8_layers"].values()) < 1e-5, (r, res["fp8_layers"])
        assert max(res["fp8"].values()) < 0.5 * res["fp8_noise"], (r, res["fp8"], res["fp8_noise"])
        if world_size == 1:
            assert max(res["fp8"].values()) == 0 and res["traffic"] == {}, res
        else:
            assert res["all_to_all"] < 1e-6, res["all_to_all"]
            assert res["traffic"]["all_reduce"]["calls"] == 1 + 2 * TINY.n_layers, res["traffic"]
            assert res["traffic"]["all_gather"]["calls"] == 1, res["traffic"]


def test_each_rank_loads_its_part(tmp_path):
    """Two ranks read their parts of transformers folders (BF16; FP8 dequantised or kept) and of the per-rank files
    of `convert_checkpoint`; bad conversions and mismatched configs get errors naming the problem."""
    write_random_checkpoint(TINY, tmp_path / "hf16", n_shards=2)
    write_random_checkpoint(FP8_ARGS, tmp_path / "hf8", n_shards=3)
    checkpoint.convert_checkpoint(tmp_path / "hf8", tmp_path / "mp2_fp8", 2, "fp8", progress=False)
    checkpoint.convert_checkpoint(tmp_path / "hf16", tmp_path / "mp2_bf16", 2, "bf16", progress=False)
    for name, mp in (("mp1", 1), ("mp2_incomplete", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "convert.json").write_text(json.dumps({"format": "dsv3_lite.convert", "model_parallel": mp,
                                                                  "args": {}}))
    (tmp_path / "mp2_incomplete" / "model0-mp2.safetensors").write_bytes(b"")
    for r, res in enumerate(parallel.launch(_load_checks, 2, str(tmp_path), timeout=TIMEOUT)):
        for key in ("hf16", "hf8_dequantised", "mp2_fp8_dequantised", "mp2_bf16"):
            assert res[key] < 1e-5, (r, key, res[key])
        for key in ("hf8_fp8", "mp2_fp8_fp8"):
            assert res[key] < 0.5 * res["fp8_noise"], (r, key, res[key], res["fp8_noise"])
        assert "model_parallel = 1" in res["other_world_size"] and "world_size = 2" in res["other_world_size"]
        assert res["missing_rank_file"].startswith("FileNotFoundError") and "model1-mp2" in res["missing_rank_file"]
        assert "different ModelArgs" in res["different_args"] and "n_layers = 4 on rank(s) [0], 2 on rank(s) [1]" \
            in res["different_args"], res["different_args"]


def test_a_lost_rank_is_named_not_waited_for():
    """Rank 1 leaves; rank 0's next collective fails within seconds, naming rank 1."""
    start = time.monotonic()
    res = parallel.launch(_lose_rank_1, 2, timeout=TIMEOUT)
    assert res[1] == "left"
    assert "all_reduce failed on rank 0 of 2: rank(s) [1] did not answer" in res[0], res[0]
    assert time.monotonic() - start < TIMEOUT


# ---- one process: the cuts by hand, and errors -------------------------------------------------------------------

@torch.no_grad()
def test_cuts_add_up_to_the_whole_layers():
    """Simulated ranks in one process: column parts side by side, row and MoE partial sums added, equal the layer."""
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(256, 384, bias=False), torch.randn(3, 256)
    cols = [parallel._cut(lin, "w1", "col", r, 4) for r in range(4)]
    assert isinstance(cols[0], parallel.ColumnParallelLinear) and cols[0].weight.shape == (96, 256)
    torch.testing.assert_close(torch.cat([c(x) for c in cols], -1), lin(x), rtol=0, atol=0)
    rows = [parallel._cut(lin, "w2", "row", r, 2, reduce=False) for r in range(2)]
    torch.testing.assert_close(sum(m(x[:, r * 128:(r + 1) * 128]) for r, m in enumerate(rows)), lin(x))
    fp8 = FP8Linear.from_linear(lin)
    rows8 = [parallel._cut(fp8, "w2", "row", r, 2, reduce=False) for r in range(2)]
    assert isinstance(rows8[1], parallel.FP8RowParallelLinear) and rows8[1].scale.shape == (3, 1)
    torch.testing.assert_close(sum(m(x[:, r * 128:(r + 1) * 128]) for r, m in enumerate(rows8)), fp8(x))
    moe, h = MoE(TINY).eval(), torch.randn(7, TINY.dim)
    parts = [parallel.ParallelMoE(copy.deepcopy(moe), "ffn", r, 4) for r in range(4)]
    assert [p.experts_start_idx for p in parts] == [0, 2, 4, 6] and parts[3].experts.w1.shape == (2, 128, 256)
    torch.testing.assert_close(sum(p.routed(h, *p.gate(h)) + p.shared_experts(h) for p in parts), moe(h))


def test_parallelize_on_meta_holds_only_the_rank_slices():
    with torch.device("meta"):
        model = parallel.parallelize(Transformer(TINY), rank=3, world_size=4)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["embed.weight"] == shapes["head.weight"] == (512, 256)
    assert shapes["layers.0.attn.wq_b.weight"] == (48, 96) and shapes["layers.0.attn.wo.weight"] == (256, 32)
    assert shapes["layers.0.attn.wq_a.weight"] == (96, 256) and shapes["layers.1.ffn.gate.weight"] == (8, 256)
    assert shapes["layers.1.ffn.experts.w2"] == (2, 256, 128) and shapes["layers.0.ffn.w1.weight"] == (192, 256)
    assert model.layers[0].attn.n_local_heads == 1 and model.layers[1].ffn.experts_start_idx == 6
    with pytest.raises(ValueError, match="already cut"):
        parallel.parallelize(model, rank=0, world_size=4)


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_the_671B_model_cut_for_one_of_8_ranks_holds_what_the_planner_counts(dtype):
    """The full configuration, cut on the meta device for rank 3 of 8 (no memory used): its parameters and buffers
    are, to the byte, notebook 11's `weight_bytes` for one of 8 GPUs (85.1 GB in FP8)."""
    args = ModelArgs.preset("671B", dtype=dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = parallel.parallelize(Transformer(args), rank=3, world_size=8)
    finally:
        torch.set_default_dtype(old)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held == checkpoint.weight_bytes(args, 8, weights=dtype)["total"]
    assert model.layers[3].ffn.experts_start_idx == 96 and model.layers[0].attn.n_local_heads == 16


@pytest.mark.parametrize("args, world_size, message", [
    (TINY, 3, "world_size = 3 is not allowed: it must divide n_heads = 4 and vocab_size = 2048 and n_routed_experts "
              "= 8 and n_shared_experts \\* moe_inter_dim = 128, which the ranks split; allowed for this ModelArgs: "
              "1, 2, 4"),
    (TINY.replace(n_heads=2), 4, "it must divide n_heads = 2, which the ranks split; allowed for this ModelArgs: 1, 2"),
    (TINY.replace(dtype="fp8"), 2, "layers.0.attn.wo: world_size = 2 is not allowed: it must divide in_features = "
                                   "128 into parts that are multiples of 128 \\(whole FP8 scale blocks\\); allowed: 1"),
])
def test_world_sizes_that_do_not_divide_are_refused(args, world_size, message):
    with torch.device("meta"):
        model = Transformer(args)
    with pytest.raises(ValueError, match=message):
        parallel.parallelize(model, rank=0, world_size=world_size)


def test_checkpoint_names_map_to_the_cut_model():
    n = 61
    assert parallel._our_name("layers.3.ffn.experts.17.w1.weight", n) == ("layers.3.ffn.experts.w1", 17)
    assert parallel._our_name("layers.3.ffn.experts.17.w2.scale", n) == ("layers.3.ffn.experts.w2_scale", 17)
    assert parallel._our_name("layers.61.attn.wkv_b.weight", n) == ("mtp.layers.0.block.attn.wkv_b.weight", None)
    assert parallel._our_name("layers.61.shared_head.norm.weight", n) == ("mtp.layers.0.norm.weight", None)
    assert parallel._our_name("layers.61.eh_proj.weight", n) == ("mtp.layers.0.eh_proj.weight", None)
    assert parallel._our_name("layers.61.shared_head.head.weight", n) == (None, None)
    assert parallel._our_name("mtp.layers.0.block.ffn.experts.3.w3.weight", n) == \
        ("mtp.layers.0.block.ffn.experts.w3", 3)
    assert parallel._our_name("layers.3.ffn.shared_experts.w1.weight", n) == \
        ("layers.3.ffn.shared_experts.w1.weight", None)
