"""`save_hf_checkpoint` (notebook 11) and `dsv3-lite export` (notebook 10's CLI): a dsv3_lite model written as a
transformers-format DeepSeek-V3 folder, read back by transformers (same logits, same greedy tokens) and by our
loaders (the same bits)."""

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open

from dsv3_lite.checkpoint import _max_shard_bytes, checkpoint_tensors, load_hf_checkpoint, load_mtp, save_hf_checkpoint
from dsv3_lite.cli import main
from dsv3_lite.config import ModelArgs
from dsv3_lite.data.corpus import shakespeare_tokenizer
from dsv3_lite.fp8 import FP8, use_fp8
from dsv3_lite.generation import generate
from dsv3_lite.model import Transformer
from dsv3_lite.mtp import add_mtp, mtp_logits

TINY = ModelArgs.preset("tiny")
FAST = ["--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--threads", "1", "--quiet"]  # as test_cli.py


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    """No log lines or progress bars from transformers' loading (the notebook cells need the same)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _model(args: ModelArgs = TINY, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    """A random model with its MTP module and random routing biases (zero biases would hide a lost bias)."""
    torch.manual_seed(seed)
    model = add_mtp(Transformer(args)).eval()
    with torch.no_grad():
        for layer in [*model.layers[args.n_dense_layers:], *(m.block for m in model.mtp.layers)]:
            layer.ffn.gate.bias.normal_(std=0.5)
    return model.to(dtype)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, FP8 ones as their bytes (torch.equal has no float8 kernel on the CPU)."""
    return {k: v.view(torch.uint8) if v.dtype == FP8 else v for k, v in model.state_dict().items()}


def _tensors(path) -> dict[str, tuple[str, tuple, torch.dtype, int]]:
    """name -> (file, shape, dtype, bytes) of every tensor in the folder's safetensors files."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                out[k] = (f.name, tuple(t.shape), t.dtype, t.numel() * t.element_size())
    return out


def _mtp_layer_keys(hf, n: int) -> set[str]:
    """What transformers calls the tensors of an MTP layer stored as layer n: one more decoder layer (its names,
    experts fused) plus the module's own six tensors."""
    block = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.") for k in hf.state_dict()
             if k.startswith(f"model.layers.{n - 1}.")}          # layer n-1 is a MoE layer, like the MTP block
    own = ("enorm", "hnorm", "eh_proj", "embed_tokens", "shared_head.norm", "shared_head.head")
    return block | {f"model.layers.{n}.{name}.weight" for name in own}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_loads_the_export_with_our_logits(tmp_path, dtype):
    """Nothing missing or mis-shaped; the MTP layer (layer 4 of the tiny model) is all that transformers does not
    use, and it names it as unexpected: transformers 5.24 skips only `model.layers.61.*` by name. Logits in float32
    equal ours within 1e-4 (YaRN on, query compression, 4 expert groups, random routing biases)."""
    from transformers import AutoModelForCausalLM

    model = _model(dtype=dtype)
    save_hf_checkpoint(model, tmp_path / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["mismatched_keys"], info["error_msgs"]) == (set(), set(), [])
    assert info["unexpected_keys"] == _mtp_layer_keys(hf, TINY.n_layers)
    assert hf.config.num_mtp_layers == 1 and json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] \
        == str(dtype).removeprefix("torch.")
    x = torch.randint(0, TINY.vocab_size, (2, 19))
    with torch.no_grad():
        err = (hf(x).logits - copy.deepcopy(model).float()(x)).abs().max().item()
    assert err < 1e-4


def test_transformers_ignores_layer_61_and_reads_it_as_the_mtp_module(tmp_path):
    """With 61 layers, as V3, the MTP layer sits where transformers looks for it: `from_pretrained` reports nothing
    unexpected, and `MtpModel.from_pretrained` (what `generate(use_mtp=True)` loads) reads our layer 61 completely
    and predicts what our MTP module predicts."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    args = TINY.replace(n_layers=61, vocab_size=256, dim=32, inter_dim=32, moe_inter_dim=16, n_heads=2, q_lora_rank=16,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=64,
                        original_seq_len=16)
    model = _model(args)
    save_hf_checkpoint(model, tmp_path / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    hf_mtp = MtpModel.from_pretrained(hf.eval()).eval()        # raises if a tensor of the MTP layer is missing
    x = torch.randint(0, args.vocab_size, (2, 13))
    with torch.no_grad():
        h = hf.model(x).last_hidden_state
        pos = torch.arange(1, 13).expand(2, -1)
        ref = hf_mtp._project_to_logits(hf_mtp.forward_layer(0, h[:, :12], pos, None, input_ids=x[:, 1:]))
        got = mtp_logits(model, model.hidden(x), torch.cat([x[:, 1:], x[:, :1]], 1))[0]
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("max_shard_size", ["5GB", "2MB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "fp8"])
def test_round_trip_is_bit_identical(tmp_path, dtype, max_shard_size):
    """ours -> folder -> ours (`load_hf_checkpoint` + `load_mtp`): every parameter and buffer equal in value and
    dtype, main model and MTP module, in one shard or several."""
    model = _model(TINY.replace(dtype="fp8")) if dtype == "fp8" else _model(dtype=dtype)
    save_hf_checkpoint(model, tmp_path / "hf", max_shard_size=max_shard_size)
    n_files = len(list((tmp_path / "hf").glob("*.safetensors")))
    assert (n_files == 1) == (max_shard_size == "5GB")
    back = load_mtp(load_hf_checkpoint(tmp_path / "hf", dtype=dtype), tmp_path / "hf")
    ours, theirs = _state(model), _state(back)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])] == []


def test_files_are_named_and_cut_as_transformers_does(tmp_path):
    """One shard: `model.safetensors` and no index. Several: `model-0000k-of-0000n.safetensors`, each at most
    max_shard_size bytes of tensor data (or one tensor larger than that), and an index whose total_size and
    weight_map describe them; the tensors are those of the published layout (`checkpoint_tensors`), cut in its
    order."""
    model = _model(dtype=torch.bfloat16)
    save_hf_checkpoint(model, tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    limit = 1_500_000
    save_hf_checkpoint(model, tmp_path / "many", max_shard_size="1500KB")
    tensors = _tensors(tmp_path / "many")
    files = sorted({f for f, *_ in tensors.values()})
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert len(files) > 5
    for f in files:
        sizes = [b for file, _, _, b in tensors.values() if file == f]
        assert sum(sizes) <= limit or len(sizes) == 1
    index = json.loads((tmp_path / "many/model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": sum(b for *_, b in tensors.values())},
                     "weight_map": {k: f for k, (f, *_) in sorted(tensors.items())}}
    published = checkpoint_tensors(TINY)              # BF16 names, shapes and dtypes, MTP module included
    assert set(tensors) == {t.name for t in published}
    assert all(tensors[t.name][1:3] == (t.shape, t.dtype) for t in published)
    shard = [files.index(tensors[t.name][0]) for t in published]
    assert shard == sorted(shard)                     # the shards cut the published order into consecutive runs


def test_fp8_export_stores_what_the_published_checkpoint_stores(tmp_path):
    """FP8 layers: float8_e4m3fn weights with float32 `weight_scale_inv`, named as in the published layout, and its
    `quantization_config`. The tiny model's `wq_b` and `wkv_b` (input widths 96 and 64, not multiples of 128) and
    the MTP module stay in high precision, as the model holds them, and config.json names those projections in
    `modules_to_not_convert` for transformers (with lm_head, which a list must name itself)."""
    args = TINY.replace(dtype="fp8")
    save_hf_checkpoint(_model(args), tmp_path / "hf")
    tensors = _tensors(tmp_path / "hf")
    published = {t.name: t for t in checkpoint_tensors(args)}
    assert set(tensors) <= set(published)
    n = args.n_layers
    high = {f"model.layers.{i}.self_attn.{p}" for i in range(n) for p in ("q_b_proj", "kv_b_proj")}
    fp8 = {k for k, (_, _, d, _) in tensors.items() if d == FP8}
    assert fp8 == {k for k, t in published.items() if t.dtype == FP8 and not k.startswith(f"model.layers.{n}.")
                   and k.removesuffix(".weight") not in high}
    assert {k for k in tensors if k.endswith("_scale_inv")} == {k + "_scale_inv" for k in fp8}
    assert all(tensors[k][1:3] == (published[k].shape, torch.float32) for k in tensors if k.endswith("_scale_inv"))
    q = json.loads((tmp_path / "hf/config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", *sorted(high, key=lambda m: (
                     int(m.split(".")[2]), m.endswith("kv_b_proj")))]}


def test_fp8_export_of_a_fully_fp8_model_has_the_published_quantization_config(tmp_path):
    """Every projection FP8 (widths multiples of 128), as in DeepSeek-V3: the published `quantization_config`."""
    args = TINY.replace(dtype="fp8", n_layers=2, q_lora_rank=128, kv_lora_rank=128, v_head_dim=32, n_heads=4)
    save_hf_checkpoint(_model(args), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}


def test_transformers_dequantises_the_fp8_export_to_our_weights(tmp_path):
    """transformers reads an FP8 folder on a CPU by dequantising it (it needs accelerate for that): its logits equal
    those of our float32 load of the same folder."""
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate installed")
    from transformers import AutoModelForCausalLM

    save_hf_checkpoint(_model(TINY.replace(dtype="fp8")), tmp_path / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["mismatched_keys"]) == (set(), set())
    ours = load_hf_checkpoint(tmp_path / "hf", dtype=torch.float32)
    x = torch.randint(0, TINY.vocab_size, (2, 11))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < 1e-4


def test_transformers_fp8_gpu_path_keeps_the_high_precision_projections(tmp_path, monkeypatch):
    """On an FP8 GPU transformers swaps every nn.Linear it is not told to keep for its FP8Linear. Pretending to be
    one (capability 9.0; nothing runs), the loaded model has our FP8 bytes and scales in its FP8 layers and our
    float32 `q_b_proj`, `kv_b_proj` and head as plain linears, and no tensor is missing."""
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate installed")
    from transformers import AutoModelForCausalLM

    model = _model(TINY.replace(dtype="fp8"))
    save_hf_checkpoint(model, tmp_path / "hf")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set()
    attn, ours = hf.model.layers[1].self_attn, model.layers[1].attn
    assert type(attn.q_b_proj) is torch.nn.Linear and torch.equal(attn.q_b_proj.weight, ours.wq_b.weight)
    assert type(hf.lm_head) is torch.nn.Linear and torch.equal(hf.lm_head.weight, model.head.weight)
    assert attn.q_a_proj.weight.dtype == FP8
    assert torch.equal(attn.q_a_proj.weight.view(torch.uint8), ours.wq_a.weight.view(torch.uint8))
    assert torch.equal(attn.q_a_proj.weight_scale_inv, ours.wq_a.scale)


@pytest.mark.parametrize("size", ["5GB", "500MB", "100KB", "7gb", " 3MB "])
def test_max_shard_size_reads_sizes_as_transformers(size):
    from transformers.utils.hub import convert_file_size_to_int

    assert _max_shard_bytes(size) == convert_file_size_to_int(size.strip().upper())
    assert _max_shard_bytes(4096) == _max_shard_bytes("4096") == 4096


@pytest.mark.parametrize("as_path", [False, True])
def test_tokenizer_loads_in_transformers_with_our_ids(tmp_path, as_path):
    """`AutoTokenizer.from_pretrained(folder)`: a fast tokenizer with DeepSeek-V3's begin/end of sentence and pad
    tokens as bos/eos/pad, giving our ids (special tokens included, none added) and our text back; the same ids in
    config.json and generation_config.json. A tokenizer.json path writes the same files as the tokenizer object."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dsv3_lite.data.corpus import SHAKESPEARE_TOKENIZER_FILE

    ours = shakespeare_tokenizer()
    save_hf_checkpoint(_model(), tmp_path / "hf", tokenizer=SHAKESPEARE_TOKENIZER_FILE if as_path else ours)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                                             "<｜▁pad▁｜>")
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tuple(ids.values())
    for text in ["ROMEO:\nWherefore art thou Romeo?", "  two  spaces, 3 digits 123 and é ü 字",
                 "<｜begin▁of▁sentence｜>First Citizen:<｜end▁of▁sentence｜>", ""]:
        assert tok(text).input_ids == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert {k: cfg[k] for k in ids} == ids
    assert json.loads((tmp_path / "hf/generation_config.json").read_text()) == ids


def test_without_tokenizer_no_special_ids_are_claimed(tmp_path):
    save_hf_checkpoint(_model(), tmp_path / "hf")
    assert json.loads((tmp_path / "hf/generation_config.json").read_text()) == \
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    assert not (tmp_path / "hf/tokenizer.json").exists()


def _bad_cases(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("a file")
    big = shakespeare_tokenizer()
    small_model = _model(TINY.replace(vocab_size=1024))
    fp8_mtp, fp8_by_hand = _model(), _model()
    use_fp8(fp8_mtp.mtp)                                 # load_mtp could not read an FP8 MTP module back as it is
    use_fp8(fp8_by_hand.layers)                          # FP8 layers in a model whose ModelArgs say bf16
    return [
        (dict(path=full), f"path = '{re.escape(str(full))}' is not allowed: it exists and is not an empty folder"),
        (dict(path=tmp_path / "file"), "path = .* is not allowed: it exists and is not an empty folder"),
        (dict(max_shard_size="5XB"), "max_shard_size = '5XB' is not allowed: give a positive int .* '5GB'"),
        (dict(max_shard_size=0), "max_shard_size = 0 is not allowed"),
        (dict(max_shard_size=-5), "max_shard_size = -5 is not allowed"),
        (dict(max_shard_size=True), "max_shard_size = True is not allowed"),
        (dict(max_shard_size=1.5e9), "max_shard_size = 1500000000.0 is not allowed"),
        (dict(max_shard_size="GB"), "max_shard_size = 'GB' is not allowed"),
        (dict(model=torch.nn.Linear(4, 4)), "model of type Linear is not allowed: give a dsv3_lite.model.Transformer"),
        (dict(model=_model().state_dict()), "model of type OrderedDict is not allowed"),
        (dict(tokenizer=42), "tokenizer of type int is not allowed: give a dsv3_lite.tokenizer.BPETokenizer, the "
                             "path of its tokenizer.json, or None"),
        (dict(tokenizer=big.vocab), "tokenizer of type dict is not allowed"),
        (dict(model=small_model, tokenizer=big), "a tokenizer of 2048 tokens is not allowed: the model's embedding "
                                                 "has vocab_size = 1024 rows"),
        (dict(model=fp8_mtp), r"mtp.layers.0.eh_proj.weight of dtype torch.float8_e4m3fn is not allowed: the MTP "
                              "module is written in high precision"),
        (dict(model=fp8_by_hand), r"tensors model\.layers\.0\.\S+weight_scale_inv, .* are not allowed: a DeepSeek-V3 "
                                  "checkpoint of the model's ModelArgs has no such tensor"),
    ]


def test_bad_input_is_refused_by_name_and_nothing_is_written(tmp_path):
    model = _model()
    for kwargs, message in _bad_cases(tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        args = dict(model=model, path=tmp_path / "out") | kwargs
        with pytest.raises(ValueError, match="save_hf_checkpoint: " + message):
            save_hf_checkpoint(**args)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, kwargs
    assert (tmp_path / "full/notes.txt").read_text() == "keep me"


def test_missing_tokenizer_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        save_hf_checkpoint(_model(), tmp_path / "out", tokenizer=tmp_path / "nope.json")
    assert list(tmp_path.iterdir()) == []


def test_written_atomically_into_a_new_or_empty_folder(tmp_path, monkeypatch):
    """An empty folder is filled; a failure while writing (here the third shard) leaves neither `path` nor the
    temporary folder behind."""
    import safetensors.torch

    (tmp_path / "empty").mkdir()
    assert save_hf_checkpoint(_model(), tmp_path / "empty") == tmp_path / "empty"
    assert (tmp_path / "empty/model.safetensors").is_file()
    real, calls = safetensors.torch.save_file, []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(_model(), tmp_path / "deep/new", max_shard_size="2MB")
    assert calls[0].parent.name.startswith(".new.tmp")   # written beside `path`, under a temporary name
    assert list((tmp_path / "deep").iterdir()) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 4 steps on the bundled Shakespeare by `dsv3-lite train` (as test_cli.py's fixture)."""
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", "--out", str(out), "--steps", "4", *FAST]) == 0
    return out / "checkpoint.safetensors"


def test_cli_export_generates_our_greedy_tokens_in_transformers(trained, tmp_path, capsys):
    """`dsv3-lite export` of a trained checkpoint: transformers' tokenizer encodes the prompts to our ids, its logits
    equal ours within 1e-4, and `model.generate(do_sample=False)` continues each prompt with the tokens of our greedy
    `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsv3_lite.train import checkpoint_tokenizer, load_model

    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "hf")]) == 0
    assert f"from_pretrained('{tmp_path / 'hf'}')" in capsys.readouterr().out
    model, _ = load_model(trained)
    ours = checkpoint_tokenizer(trained)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    eos = ours.special_tokens["<｜end▁of▁sentence｜>"]
    for text in ["ROMEO:\nWhat light", "First Citizen:\nBefore we proceed", "KING HENRY"]:
        prompt = tok(text).input_ids
        assert prompt == ours.encode(text)
        x = torch.tensor([prompt])
        expected = generate(model, [prompt], 24, temperature=0.0, eos_id=eos)[0]
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
            got = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)
        assert got[0, len(prompt):].tolist() == expected
        assert tok.decode(expected) == ours.decode(expected)


def test_cli_export_errors(trained, tmp_path, capsys):
    """A missing checkpoint exits 3, an occupied --out or a bad --max-shard-size 2, each with one line naming it."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    for argv, status, message in [
        (["--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "a")], 3, "nope.safetensors not "
         "found"),
        (["--checkpoint", str(trained), "--out", str(tmp_path / "full")], 2, "is not an empty folder"),
        (["--checkpoint", str(trained), "--out", str(tmp_path / "b"), "--max-shard-size", "5XB"], 2,
         "max_shard_size = '5XB' is not allowed"),
    ]:
        assert main(["export", *argv]) == status
        err = capsys.readouterr().err
        assert err.startswith("dsv3-lite export: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
