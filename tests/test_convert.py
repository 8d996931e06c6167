"""Converting a checkpoint into one file per rank (notebooks/11_checkpoints.ipynb, `convert_checkpoint`): the official
names and cuts of DeepSeek's `convert.py`, the MTP module kept, a lossless round trip, streaming, atomic files and a
record, and an error that names the file, the tensor and what is allowed for every bad input."""

import errno
import json
import shutil
import struct
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3_lite.checkpoint import (
    CONVERT_RECORD,
    _check_model_parallel,
    convert_checkpoint,
    converted_name,
    dequantize_fp8,
    gather_converted,
    rank_file,
    write_random_checkpoint,
)
from dsv3_lite.config import ModelArgs

CONVERT = sys.modules[convert_checkpoint.__module__]     # the module, to replace its file writes
# the tiny preset with widths whose cuts at 2 and 4 ranks fall on 128×128 FP8 blocks: wq_b, wkv_b [1024, ·],
# wo [256, 512], dense w1 [512, 256], shared experts 2 × 256 wide; 8 routed experts 256 wide, 8 heads
SMALL = ModelArgs.preset("tiny", dtype="fp8", dim=256, inter_dim=512, moe_inter_dim=256, n_layers=2, n_heads=8,
                         n_shared_experts=2, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)
COPIES = ["model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"]   # the MTP layer's


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def tensors_of(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An FP8 checkpoint of SMALL in the published layout (2 shards, MTP layer 2) with two tokenizer files."""
    path = tmp_path_factory.mktemp("convert") / "hf"
    write_random_checkpoint(SMALL, path, n_shards=2)
    (path / "tokenizer.json").write_text('{"model": "a tokenizer"}', encoding="utf-8")
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    """A BF16 checkpoint whose vocabulary (2049) no rank count above 1 divides."""
    path = tmp_path_factory.mktemp("convert") / "bf16"
    write_random_checkpoint(SMALL.replace(dtype="bf16", vocab_size=2049), path)
    return path


@pytest.fixture
def copy(source, tmp_path):
    """A copy of the source to damage."""
    return shutil.copytree(source, tmp_path / "damaged")


def assert_nothing_written(save):
    """An interrupted or refused conversion leaves no rank file, no temporary file and no record."""
    assert not save.exists() or sorted(p.name for p in save.iterdir()) == []


# --- names and cuts ---------------------------------------------------------------------------------------------------

def test_converted_names_are_the_official_ones():
    assert converted_name("model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv", 61) == \
        "layers.3.ffn.experts.5.w1.scale"
    assert converted_name("model.layers.3.mlp.gate.e_score_correction_bias", 61) == "layers.3.ffn.gate.bias"
    assert converted_name("lm_head.weight", 61) == "head.weight"
    assert converted_name("model.embed_tokens.weight", 61) == "embed.weight"
    assert converted_name("model.norm.weight", 61) == "norm.weight"
    assert converted_name("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 61) == "layers.0.attn.wkv_a.weight"
    # the MTP layer, under notebook 09's module names; its copies of the embedding and the head are not written
    assert converted_name("model.layers.61.input_layernorm.weight", 61) == "mtp.layers.0.block.attn_norm.weight"
    assert converted_name("model.layers.61.mlp.experts.255.down_proj.weight", 61) == \
        "mtp.layers.0.block.ffn.experts.255.w2.weight"
    assert converted_name("model.layers.61.eh_proj.weight", 61) == "mtp.layers.0.eh_proj.weight"
    assert converted_name("model.layers.61.enorm.weight", 61) == "mtp.layers.0.enorm.weight"
    assert converted_name("model.layers.61.shared_head.norm.weight", 61) == "mtp.layers.0.norm.weight"
    assert converted_name("model.layers.61.embed_tokens.weight", 61) is None
    assert converted_name("model.layers.61.shared_head.head.weight", 61) is None
    assert rank_file(3, 16) == "model3-mp16.safetensors"


def test_rank_files_hold_the_official_names_and_shapes(source, tmp_path):
    convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    ranks = [load_file(tmp_path / "mp2" / rank_file(r, 2)) for r in range(2)]
    want = {  # name: (shape on each rank, dtype); cuts: vocabulary, heads (8 × 128 query and key-value rows), FFN
        "embed.weight": ((1024, 256), torch.bfloat16),
        "head.weight": ((1024, 256), torch.bfloat16),
        "norm.weight": ((256,), torch.bfloat16),
        "layers.0.attn_norm.weight": ((256,), torch.bfloat16),
        "layers.0.attn.wq_a.weight": ((96, 256), torch.float8_e4m3fn),        # replicated
        "layers.0.attn.wq_a.scale": ((1, 2), torch.float32),
        "layers.0.attn.q_norm.weight": ((96,), torch.bfloat16),
        "layers.0.attn.wq_b.weight": ((512, 96), torch.float8_e4m3fn),        # 1024 rows / 2
        "layers.0.attn.wq_b.scale": ((4, 1), torch.float32),
        "layers.0.attn.wkv_a.weight": ((128, 256), torch.float8_e4m3fn),
        "layers.0.attn.kv_norm.weight": ((64,), torch.bfloat16),
        "layers.0.attn.wkv_b.weight": ((512, 64), torch.float8_e4m3fn),
        "layers.0.attn.wo.weight": ((256, 256), torch.float8_e4m3fn),         # 512 columns / 2
        "layers.0.attn.wo.scale": ((2, 2), torch.float32),
        "layers.0.ffn_norm.weight": ((256,), torch.bfloat16),
        "layers.0.ffn.w1.weight": ((256, 256), torch.float8_e4m3fn),          # dense FFN, 512 wide
        "layers.0.ffn.w3.weight": ((256, 256), torch.float8_e4m3fn),
        "layers.0.ffn.w2.weight": ((256, 256), torch.float8_e4m3fn),
        "layers.0.ffn.w2.scale": ((2, 2), torch.float32),
        "layers.1.ffn.gate.weight": ((8, 256), torch.bfloat16),
        "layers.1.ffn.gate.bias": ((8,), torch.float32),
        "layers.1.ffn.shared_experts.w1.weight": ((256, 256), torch.float8_e4m3fn),
        "layers.1.ffn.shared_experts.w2.weight": ((256, 256), torch.float8_e4m3fn),
    }
    for r, held in enumerate(ranks):
        for name, (shape, dtype) in want.items():
            assert (tuple(held[name].shape), held[name].dtype) == (shape, dtype), (r, name)
        assert not any(k.startswith("model.") or ".mlp." in k or "self_attn" in k or "weight_scale_inv" in k
                       for k in held)
    assert ranks[0]["layers.1.ffn.experts.3.w1.weight"].shape == (256, 256)     # experts 0-3 on rank 0, whole
    assert ranks[0]["layers.1.ffn.experts.3.w1.scale"].shape == (2, 2)
    assert "layers.1.ffn.experts.4.w1.weight" not in ranks[0] and "layers.1.ffn.experts.4.w1.weight" in ranks[1]
    with safe_open(tmp_path / "mp2" / rank_file(0, 2), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # the cut pieces are the source's slices
    src = tensors_of(source)
    wo = src["model.layers.0.self_attn.o_proj.weight"]
    assert same_bits(ranks[1]["layers.0.attn.wo.weight"], wo[:, 256:].contiguous())
    assert same_bits(ranks[1]["embed.weight"], src["model.embed_tokens.weight"][1024:])


def test_mtp_module_is_kept(source, tmp_path):
    convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    src = tensors_of(source)
    ranks = [load_file(tmp_path / "mp2" / rank_file(r, 2)) for r in range(2)]
    for held in ranks:
        for name in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.norm.weight",
                     "mtp.layers.0.block.attn_norm.weight", "mtp.layers.0.block.ffn.gate.bias"):
            assert name in held
        assert held["mtp.layers.0.eh_proj.weight"].shape == (256, 512)                   # replicated
        assert held["mtp.layers.0.block.attn.wq_b.weight"].shape == (512, 96)            # cut as in the main model
        assert not any(".embed" in k or "shared_head" in k or "layers.2." in k for k in held)  # copies not written
    assert same_bits(ranks[1]["mtp.layers.0.block.ffn.experts.5.w1.weight"],
                     src["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert same_bits(ranks[0]["mtp.layers.0.norm.weight"], src["model.layers.2.shared_head.norm.weight"])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_round_trip_is_bit_for_bit(source, tmp_path, n):
    record = convert_checkpoint(source, tmp_path / "out", model_parallel=n)
    src, back = tensors_of(source), gather_converted(tmp_path / "out")
    assert back.keys() == src.keys() and len(src) == 169
    assert all(same_bits(back[k], src[k]) for k in src)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [CONVERT_RECORD, "tokenizer.json", "tokenizer_config.json", *(rank_file(r, n) for r in range(n))])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()
    assert record["files"] == {f: (tmp_path / "out" / f).stat().st_size for f in record["files"]}


@pytest.mark.parametrize("n", [2, 8])
def test_bf16_equals_dequantize_fp8(source, tmp_path, n):
    """n = 8 cuts wo's 512 columns into 64, which FP8 refuses (half a block) and BF16 allows."""
    record = convert_checkpoint(source, tmp_path / "out", model_parallel=n, dtype="bf16")
    src, back = tensors_of(source), gather_converted(tmp_path / "out")
    fp8 = [k for k, t in src.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 72 and back.keys() == src.keys() - {k + "_scale_inv" for k in fp8}
    for k in fp8:
        assert torch.equal(back[k], dequantize_fp8(src[k], src[k + "_scale_inv"])), k
    assert all(same_bits(back[k], src[k]) for k in back if k not in fp8)
    assert record["dtype"] == record["args"]["dtype"] == "bf16"
    with safe_open(tmp_path / "out" / rank_file(n - 1, n), framework="pt") as f:
        assert not any(k.endswith(".scale") for k in f.keys())
        assert f.get_slice("layers.0.attn.wo.weight").get_dtype() == "BF16"
        assert f.get_slice("layers.0.attn.wo.weight").get_shape() == [256, 512 // n]


def test_bf16_source(bf16_source, tmp_path):
    convert_checkpoint(bf16_source, tmp_path / "out", model_parallel=1, dtype="bf16")
    src, back = tensors_of(bf16_source), gather_converted(tmp_path / "out")
    assert back.keys() == src.keys() and all(same_bits(back[k], src[k]) for k in src)
    with pytest.raises(ValueError, match="dtype = 'fp8' is not allowed .*no FP8 quantization_config.*use dtype = 'bf16'"):
        convert_checkpoint(bf16_source, tmp_path / "fp8", model_parallel=1)


def test_experts_are_partitioned(source, tmp_path):
    record = convert_checkpoint(source, tmp_path / "mp4", model_parallel=4)
    for r in range(4):
        with safe_open(tmp_path / "mp4" / rank_file(r, 4), framework="pt") as f:
            for prefix in ("layers.1.ffn.experts.", "mtp.layers.0.block.ffn.experts."):
                held = {(int(k.removeprefix(prefix).split(".")[0]), k.rsplit(".", 2)[1]) for k in f.keys()
                        if k.startswith(prefix)}
                assert held == {(e, w) for e in (2 * r, 2 * r + 1) for w in ("w1", "w2", "w3")}
    e = record["tensors"]["layers.1.ffn.experts.5.w3.scale"]
    assert e == {"source": "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv", "shape": [2, 2], "dim": None,
                 "dtype": "F32", "rank": 2}


def test_record(source, tmp_path):
    record = convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    assert json.loads((tmp_path / "mp2" / CONVERT_RECORD).read_text()) == record
    cfg = json.loads((source / "config.json").read_text())
    assert (record["format"], record["version"], record["model_parallel"], record["dtype"]) == \
        ("dsv3_lite.convert", 1, 2, "fp8")
    assert record["config"] == cfg
    assert ModelArgs(**record["args"]) == ModelArgs.from_hf_config(cfg)
    assert record["tokenizer"] == ["tokenizer.json", "tokenizer_config.json"]
    assert record["shared"] == dict(zip(COPIES, ["embed.weight", "head.weight"], strict=True))
    t = record["tensors"]
    assert t["layers.0.attn.wo.weight"] == {"source": "model.layers.0.self_attn.o_proj.weight", "shape": [256, 512],
                                            "dim": 1, "dtype": "F8_E4M3"}
    assert t["embed.weight"]["dim"] == t["mtp.layers.0.block.attn.wkv_b.scale"]["dim"] == 0
    assert t["layers.0.attn.wkv_a.weight"]["dim"] is None and "rank" not in t["layers.0.attn.wkv_a.weight"]
    assert len(t) == 167


def test_files_are_valid_safetensors_with_aligned_tensors(source, tmp_path):
    convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    for r in range(2):
        raw = (tmp_path / "mp2" / rank_file(r, 2)).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        sizes = {"F32": 4, "BF16": 2, "F8_E4M3": 1}
        spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n                    # no gap, nothing after
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(v["data_offsets"][0] % sizes[v["dtype"]] == 0 for k, v in header.items() if k != "__metadata__")


# --- the save folder --------------------------------------------------------------------------------------------------

def test_the_same_conversion_twice_is_a_no_op(source, tmp_path, capsys, monkeypatch):
    first = convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mp2").iterdir()}
    capsys.readouterr()
    monkeypatch.setattr(CONVERT, "_write", lambda *a: pytest.fail("wrote a tensor"))
    assert convert_checkpoint(source, tmp_path / "mp2", model_parallel=2) == first
    out = capsys.readouterr()
    assert out.out == f"convert_checkpoint: {tmp_path / 'mp2'} already holds this conversion (2 rank files, fp8): " \
                      "nothing to do\n" and out.err == ""
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mp2").iterdir()} == stamps


def test_a_damaged_conversion_is_redone(source, tmp_path):
    convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    (tmp_path / "mp2" / rank_file(1, 2)).unlink()
    convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    assert (tmp_path / "mp2" / rank_file(1, 2)).is_file()
    back, src = gather_converted(tmp_path / "mp2"), tensors_of(source)
    assert all(same_bits(back[k], src[k]) for k in src)


def test_another_conversion_is_refused(source, tmp_path):
    save = tmp_path / "mp2"
    convert_checkpoint(source, save, model_parallel=2)
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    with pytest.raises(ValueError, match=r"holds another conversion: model_parallel = 2 there, 4 now\. Choose another "
                                         r"save_path \(--save-path\), or delete .*mp2 to convert into it"):
        convert_checkpoint(source, save, model_parallel=4)
    with pytest.raises(ValueError, match="dtype = 'fp8' there, 'bf16' now"):
        convert_checkpoint(source, save, model_parallel=2, dtype="bf16")
    other = shutil.copytree(source, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"rms_norm_eps": 1e-5}))
    with pytest.raises(ValueError, match=r"the source config.json differs in rms_norm_eps \(1e-06 there, 1e-05 now\)"):
        convert_checkpoint(other, save, model_parallel=2)
    assert {p.name: p.read_bytes() for p in save.iterdir()} == before


def test_a_folder_with_other_files_is_refused(source, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"save_path = '.*notes' is not allowed: it holds files that a conversion "
                                         r"does not write \(notes.txt\): give a new or empty folder"):
        convert_checkpoint(source, tmp_path / "notes", model_parallel=2)
    with pytest.raises(ValueError, match="holds files that a conversion does not write"):
        convert_checkpoint(source, source, model_parallel=2)            # the source folder itself
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_path = '.*file' is a file, which is not allowed: give a folder"):
        convert_checkpoint(source, tmp_path / "file", model_parallel=2)
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["notes.txt"]


def test_leftovers_of_an_interrupted_run_are_replaced(source, tmp_path):
    save = tmp_path / "mp2"
    save.mkdir()
    (save / rank_file(0, 2)).write_bytes(b"the first half of a file")
    (save / rank_file(3, 4)).write_bytes(b"a rank file of another count")
    (save / "tokenizer.json").write_text("old")
    (save / f".{rank_file(1, 2)}.tmp999999999").write_bytes(b"temporary file of a killed process")
    convert_checkpoint(source, save, model_parallel=2)
    assert sorted(p.name for p in save.iterdir()) == \
        [CONVERT_RECORD, rank_file(0, 2), rank_file(1, 2), "tokenizer.json", "tokenizer_config.json"]
    back, src = gather_converted(save), tensors_of(source)
    assert all(same_bits(back[k], src[k]) for k in src)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_nothing(source, tmp_path, monkeypatch, error):
    calls = Counter()
    write = CONVERT._write

    def failing(f, offset, t):
        calls["n"] += 1
        if calls["n"] == 40:                  # in the middle of layer 1
            raise error
        write(f, offset, t)

    monkeypatch.setattr(CONVERT, "_write", failing)
    save = tmp_path / "mp2"
    if isinstance(error, OSError):
        with pytest.raises(OSError, match=r"convert_checkpoint: writing .*mp2/model[01]-mp2\.safetensors failed: No "
                                          r"space left on device; no file of this conversion was kept") as e:
            convert_checkpoint(source, save, model_parallel=2)
        assert e.value.errno == errno.ENOSPC
    else:
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(source, save, model_parallel=2)
    assert_nothing_written(save)
    monkeypatch.setattr(CONVERT, "_write", write)
    convert_checkpoint(source, save, model_parallel=2)          # and the next run goes through
    assert (save / CONVERT_RECORD).is_file()


def test_too_little_free_space_is_refused_before_writing(source, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(OSError, match=r"has 1,000 bytes free and the conversion needs [\d,]+: free space or choose "
                                      "another save_path"):
        convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    assert_nothing_written(tmp_path / "mp2")


# --- streaming and progress -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_each_source_tensor_is_read_once(source, tmp_path, monkeypatch, dtype):
    """One `get_tensor` per source tensor: the FP8 scales once (with their weight in BF16), the MTP copies once
    (compared with the embedding and the head as those are read)."""
    reads = Counter()
    real = safetensors.safe_open

    class CountingSafeOpen:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, key):
            reads[key] += 1
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", CountingSafeOpen)
    convert_checkpoint(source, tmp_path / "out", model_parallel=2, dtype=dtype)
    assert reads == Counter(tensors_of(source).keys())
    assert all(k in reads for k in COPIES)


def test_progress_bar(source, tmp_path, capsys):
    convert_checkpoint(source, tmp_path / "quiet", model_parallel=2)          # small: no bar by default
    assert capsys.readouterr().err == ""
    convert_checkpoint(source, tmp_path / "bar", model_parallel=2, progress=True)
    err = capsys.readouterr().err
    assert "convert_checkpoint" in err and "MB" in err and "100%" in err


# --- bad input --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -2, True, 2.0, "2", None])
def test_model_parallel_must_be_a_positive_int(source, tmp_path, n):
    with pytest.raises(ValueError, match=f"model_parallel = {n!r} is not allowed: it must be a positive int"):
        convert_checkpoint(source, tmp_path / "out", model_parallel=n)


@pytest.mark.parametrize("n, dtype, message", [
    (3, "fp8", "model_parallel = 3 is not allowed: it must divide n_routed_experts = 8 and n_heads = 8 (allowed: 1, 2, "
               "4; with dtype = 'bf16': 1, 2, 4, 8)"),
    (16, "bf16", "model_parallel = 16 is not allowed: it must divide n_routed_experts = 8 and n_heads = 8 (allowed: "
                 "1, 2, 4, 8)"),
    (8, "fp8", "model_parallel = 8 is not allowed: with dtype = 'fp8' it must cut "
               "model.layers.0.self_attn.o_proj.weight [256, 512] into whole 128×128 scale blocks, not 64 columns per "
               "rank (allowed: 1, 2, 4; with dtype = 'bf16': 1, 2, 4, 8)"),
])
def test_rank_counts_the_cuts_cannot_make(source, tmp_path, n, dtype, message):
    with pytest.raises(ValueError) as e:
        convert_checkpoint(source, tmp_path / "out", model_parallel=n, dtype=dtype)
    assert str(e.value) == "convert_checkpoint: " + message
    assert_nothing_written(tmp_path / "out")


def test_a_cut_dim_that_n_does_not_divide(bf16_source, tmp_path):
    with pytest.raises(ValueError, match=r"model_parallel = 2 is not allowed: it must divide dim 0 of "
                                         r"model.embed_tokens.weight \[2049, 256\], which the ranks cut \(allowed: 1\)"):
        convert_checkpoint(bf16_source, tmp_path / "out", model_parallel=2, dtype="bf16")


def test_the_671B_checkpoint_allows_up_to_16_ranks_in_fp8():
    from dsv3_lite.checkpoint import checkpoint_tensors

    V3 = ModelArgs.preset("671B")
    specs = {t.name: ("F8_E4M3" if t.dtype == torch.float8_e4m3fn else "BF16", t.shape) for t in checkpoint_tensors(V3)}
    _check_model_parallel(16, V3, specs, "fp8")                               # the official README's count
    with pytest.raises(ValueError, match=r"gate_proj.weight \[18432, 7168\] into whole 128×128 scale blocks, not 576 "
                                         r"rows per rank \(allowed: 1, 2, 4, 8, 16; with dtype = 'bf16': 1, 2, 4, 8, "
                                         r"16, 32, 64, 128\)"):
        _check_model_parallel(32, V3, specs, "fp8")


def test_bad_dtype_and_missing_source(source, tmp_path):
    with pytest.raises(ValueError, match="dtype = 'fp16' is not allowed: 'fp8' .* or 'bf16'"):
        convert_checkpoint(source, tmp_path / "out", model_parallel=2, dtype="fp16")
    with pytest.raises(FileNotFoundError, match=r"convert_checkpoint: .*nowhere/config.json not found"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", model_parallel=2)


def test_a_shard_missing_from_the_folder(copy, tmp_path):
    (copy / "model-00002-of-000002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json names shards that are not in .*: "
                                                r"model-00002-of-000002.safetensors"):
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)
    (copy / "model.safetensors.index.json").unlink()                         # no index: the tensors are missing
    with pytest.raises(ValueError, match=r"does not match its config.json:\n  missing \(\d+\): model.layers."):
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)
    assert_nothing_written(tmp_path / "out")


def test_a_truncated_or_corrupt_shard(copy, tmp_path):
    shard = copy / "model-00001-of-000002.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:len(raw) // 2])                                   # a download cut short
    with pytest.raises(ValueError, match=r"model-00001-of-000002.safetensors is not a valid safetensors file: .*"
                                         r"incomplete"):
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)
    shard.write_bytes(raw[:8] + b"#" + raw[9:])                              # a damaged header
    with pytest.raises(ValueError, match="model-00001-of-000002.safetensors is not a valid safetensors file"):
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)
    assert_nothing_written(tmp_path / "out")


def _rewrite(folder, changes: dict[str, torch.Tensor]) -> None:
    """Replace tensors in the shards that hold them (same names, so the index stays right)."""
    for f in sorted(folder.glob("*.safetensors")):
        state = load_file(f)
        if changes.keys() & state.keys():
            save_file({**state, **{k: v for k, v in changes.items() if k in state}}, f, metadata={"format": "pt"})


def test_tensors_that_do_not_fit_the_config(copy, tmp_path):
    _rewrite(copy, {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(512, 255, dtype=torch.float8_e4m3fn),   # shape, and its
        "model.layers.1.self_attn.o_proj.weight_scale_inv": torch.ones(3, 3),                     # scale
        "model.layers.1.mlp.experts.2.gate_proj.weight": torch.zeros(256, 256, dtype=torch.bfloat16),   # not FP8
        "model.norm.weight": torch.ones(256, dtype=torch.int64),                                   # not a float
    })
    with pytest.raises(ValueError) as e:
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)
    message = str(e.value)
    assert message.startswith(f"convert_checkpoint: {copy} does not match its config.json:\n  wrong shape or dtype (4): ")
    assert "model.layers.0.mlp.up_proj.weight [512, 255] in model-00001-of-000002.safetensors: config.json gives " \
           "[512, 256]" in message
    assert "model.layers.1.self_attn.o_proj.weight_scale_inv [3, 3] in model-00001-of-000002.safetensors does not " \
           "fit its weight [256, 512]: one scale per 128×128 block is [2, 4]" in message
    assert "model.layers.1.mlp.experts.2.gate_proj.weight in model-00001-of-000002.safetensors is BF16: F8_E4M3 (an " \
           "FP8 weight with its scale) is allowed" in message
    assert "model.norm.weight in model-00001-of-000002.safetensors is I64: one of ('F64', 'F32', 'F16', 'BF16') is " \
           "allowed" in message
    assert_nothing_written(tmp_path / "out")


def test_missing_and_unexpected_tensors(copy, tmp_path):
    shard = copy / "model-00001-of-000002.safetensors"
    state = load_file(shard)
    state.pop("lm_head.weight")
    state["model.layers.1.mlp.fancy_proj.weight"] = torch.zeros(3)
    save_file(state, shard)
    (copy / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"missing \(1\): lm_head.weight \[2048, 256\]\n  unexpected \(1\): "
                                         r"model.layers.1.mlp.fancy_proj.weight \[3\] in "
                                         r"model-00001-of-000002.safetensors"):
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)


def test_mtp_copies_must_equal_the_shared_tensors(copy, tmp_path):
    head = load_file(copy / "model-00001-of-000002.safetensors")["lm_head.weight"]
    _rewrite(copy, {COPIES[1]: head + 1})
    with pytest.raises(ValueError, match=r"model.layers.2.shared_head.head.weight in model-00002-of-000002.safetensors "
                                         r"differs from lm_head.weight in model-00001-of-000002.safetensors, but the "
                                         "MTP module shares that tensor with the main model"):
        convert_checkpoint(copy, tmp_path / "out", model_parallel=2)
    assert_nothing_written(tmp_path / "out")


def test_gather_needs_a_finished_conversion(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="convert.json not found: .* holds no finished conversion"):
        gather_converted(tmp_path)
    convert_checkpoint(source, tmp_path / "mp2", model_parallel=2)
    (tmp_path / "mp2" / rank_file(1, 2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"model1-mp2.safetensors not found, but convert.json lists it"):
        gather_converted(tmp_path / "mp2")
