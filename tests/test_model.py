"""The whole model (notebooks/07_model.ipynb): parity with transformers through save_pretrained/load_hf_checkpoint,
KV-cache decoding, generation, published sizes, FP8 and sharded checkpoints, bad input."""

import json
import math
import re
import struct

import pytest
import torch

from dsv3_lite import ModelArgs, Transformer, load_hf_checkpoint
from dsv3_lite.checkpoint import checkpoint_files, dequantize_fp8
from dsv3_lite.config import param_counts
from dsv3_lite.fp8 import weight_quant_ref
from dsv3_lite.generation import generate, sample, top_p_probs
from dsv3_lite.moe import MoE

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SMALL = ModelArgs.preset("tiny").replace(
    vocab_size=300, dim=48, inter_dim=80, moe_inter_dim=24, n_layers=3, n_dense_layers=1, n_heads=4,
    kv_lora_rank=32, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_seq_len=64,
    original_seq_len=16, max_batch_size=4)

CONFIGS = {
    "q_lora+groups+yarn": SMALL,
    "no_q_lora+1group+2shared": SMALL.replace(q_lora_rank=0, n_expert_groups=1, n_limited_groups=1, n_shared_experts=2),
    "8groups_top4_no_yarn": SMALL.replace(n_routed_experts=16, n_expert_groups=8, n_limited_groups=3,
                                          n_activated_experts=4, original_seq_len=64, rope_factor=1.0),
    "2dense_mscale0.707": SMALL.replace(n_layers=4, n_dense_layers=2, mscale=0.707, n_shared_experts=2),
}


def _hf(args, seed):
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**args.to_hf_config())).eval()
    with torch.no_grad():
        for layer in hf.model.layers[args.n_dense_layers:]:
            layer.mlp.gate.weight.normal_(std=0.1)
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)  # non-zero routing bias
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for i, (name, args) in enumerate(CONFIGS.items()):
        hf = _hf(args, seed=i)
        hf.save_pretrained(root / name, max_shard_size="200KB" if i == 1 else "5GB")  # one sharded with an index
        out[name] = (hf, root / name, args)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(checkpoints, name):
    hf, path, args = checkpoints[name]
    ours = load_hf_checkpoint(path, dtype=torch.float32)
    assert ours.args.n_layers == args.n_layers and ours.args.q_lora_rank == args.q_lora_rank
    x = torch.randint(0, args.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max().item() <= 1e-4
        assert (ours(x, last_only=True) - ref[:, -1]).abs().max().item() <= 1e-4
        ours.setup_cache(2, 29)
        steps = [ours(x[:, :11], 0), ours(x[:, 11:14], 11)] + [ours(x[:, p:p + 1], p) for p in range(14, 29)]
        ours.reset_cache()
    assert (torch.cat(steps, 1) - ref).abs().max().item() <= 1e-4


def test_hidden_is_the_forward_without_head():
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    with torch.no_grad():
        for S in (1, 7, 33):
            x = torch.randint(0, SMALL.vocab_size, (3, S))
            h = model.hidden(x)
            assert h.shape == (3, S, SMALL.dim)
            assert torch.equal(model.head(h), model(x))
            assert torch.equal(model.head(h, last_only=True), model(x, last_only=True))
        x = torch.randint(0, SMALL.vocab_size, (2, 12))
        model.setup_cache(2, 12)
        steps = torch.cat([model.hidden(x[:, :5], 0), model.hidden(x[:, 5:6], 5), model.hidden(x[:, 6:], 6)], 1)
        model.reset_cache()
        assert (steps - model.hidden(x)).abs().max().item() < 1e-4
        with pytest.raises(ValueError, match="tokens must be \\[B, S\\]"):
            model.hidden(torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="start_pos = -1 with S = 1 is not allowed"):
            model.hidden(torch.zeros(1, 1, dtype=torch.long), start_pos=-1)


def test_checkpoint_files(checkpoints, tmp_path):
    for name in ("q_lora+groups+yarn", "no_q_lora+1group+2shared"):   # one file without index; shards + index
        _, path, _ = checkpoints[name]
        files = checkpoint_files(str(path))
        expected = {k: f for f in path.glob("*.safetensors") for k in load_file(f)}   # where each tensor really is
        assert files == expected and "lm_head.weight" in files
    with pytest.raises(FileNotFoundError, match="checkpoint_files: no model.safetensors.index.json or "
                                                "\\*.safetensors in"):
        checkpoint_files(tmp_path)


def test_sharded_checkpoint_really_sharded(checkpoints):
    _, path, _ = checkpoints["no_q_lora+1group+2shared"]
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1


def test_fp8_checkpoint_with_mtp_layer(checkpoints, tmp_path, capsys):
    _, path, args = checkpoints["q_lora+groups+yarn"]
    config = json.loads((path / "config.json").read_text())
    fp8, deq = {}, {}
    for k, v in load_file(path / "model.safetensors").items():
        if k.endswith("proj.weight"):
            q, s = weight_quant_ref(v)
            fp8[k], fp8[k + "_scale_inv"], deq[k] = q, s, dequantize_fp8(q, s, dtype=torch.float32)
        else:
            fp8[k] = deq[k] = v
    fp8["model.layers.3.eh_proj.weight"] = torch.zeros(args.dim, 2 * args.dim)  # MTP layer = num_hidden_layers
    (tmp_path / "deq").mkdir()
    save_file(deq, tmp_path / "deq" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text(json.dumps(config))
    (tmp_path / "fp8").mkdir()
    save_file(fp8, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    ours = load_hf_checkpoint(tmp_path / "fp8", dtype=torch.float32)
    assert "skipped 1 tensors of layer(s) [3]" in capsys.readouterr().out
    x = torch.randint(0, args.vocab_size, (1, 9))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= 1e-4
    assert not torch.equal(deq["model.layers.0.mlp.gate_proj.weight"],
                           load_file(path / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"])


def test_dequantize_fp8_blocks_multiply():
    w = torch.ones(130, 129).to(torch.float8_e4m3fn)
    s = torch.tensor([[2.0, 3.0], [5.0, 7.0]])
    d = dequantize_fp8(w, s, dtype=torch.float32)
    assert d[0, 0] == 2 and d[0, 128] == 3 and d[129, 0] == 5 and d[129, 128] == 7
    with pytest.raises(ValueError, match=r"weight_scale_inv shape \(1, 1\) does not fit weight \(130, 129\)"):
        dequantize_fp8(w, torch.ones(1, 1))


def test_bf16_load_keeps_gate_bias_fp32(checkpoints):
    _, path, _ = checkpoints["q_lora+groups+yarn"]
    m = load_hf_checkpoint(path, dtype=torch.bfloat16)
    assert m.head.weight.dtype == torch.bfloat16 and m.layers[1].ffn.gate.bias.dtype == torch.float32
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 3]])).dtype == torch.float32


def test_generate_matches_cache_free_greedy():
    torch.manual_seed(0)
    m = Transformer(SMALL).eval()
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4, 3]]
    out = generate(m, prompts, max_new_tokens=5)
    with torch.no_grad():
        for p, o in zip(prompts, out, strict=True):
            seq = list(p)
            for _ in range(5):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
            assert o == seq[len(p):]
    eos = out[0][1]
    cut = generate(m, prompts[:1], max_new_tokens=5, eos_id=eos)
    assert cut[0] == out[0][:out[0].index(eos) + 1]
    assert all(layer.attn.cache_shape is None for layer in m.layers)  # cache freed


def test_tensor_start_pos_decode_equals_int():
    """One-token steps with start_pos as a 0-dim int64 tensor (the CUDA-graph path) give the int path's logits."""
    torch.manual_seed(0)
    m = Transformer(SMALL).eval()
    seq = torch.randint(0, SMALL.vocab_size, (3, 14))
    pos = torch.tensor(0)
    runs = {}
    with torch.no_grad():
        for kind in ("int", "tensor"):
            m.setup_cache(4, 20)                      # larger than used: masked rows and a batch slice
            steps = [m(seq[:, :5], 0, last_only=True)]
            for p in range(5, 14):
                pos.fill_(p)
                steps.append(m(seq[:, p:p + 1], p if kind == "int" else pos, last_only=True))
            runs[kind] = torch.stack(steps, 1)        # [B, 10, V]
            m.reset_cache()
    torch.testing.assert_close(runs["tensor"], runs["int"], atol=1e-6, rtol=0)


def test_tensor_start_pos_multi_token_steps_equal_int():
    """Steps of 2 and 3 tokens with start_pos a 0-dim tensor (the verify step of speculative decoding in a CUDA graph)
    give the int path's logits at every position: the cache rows are written by index and each new token hides the
    rows after its own position."""
    torch.manual_seed(1)
    m = Transformer(SMALL).eval()
    seq = torch.randint(0, SMALL.vocab_size, (2, 16))
    runs = {}
    with torch.no_grad():
        for kind in ("int", "tensor"):
            m.setup_cache(2, 20)
            logits, p = [m(seq[:, :5], 0)], 5
            for n in (2, 3, 1, 2):
                logits.append(m(seq[:, p:p + n], p if kind == "int" else torch.tensor(p)))
                p += n
            runs[kind] = torch.cat(logits, 1)              # [B, 13, V]
            m.reset_cache()
    torch.testing.assert_close(runs["tensor"], runs["int"], atol=1e-5, rtol=0)


def test_tensor_start_pos_and_cuda_graph_bad_input():
    m = Transformer(SMALL).eval()
    with torch.no_grad():
        m.setup_cache(1, 8)
        with pytest.raises(ValueError, match="a tensor start_pos must be a 0-dim int64 tensor"):
            m(torch.zeros(1, 1, dtype=torch.long), torch.tensor(2, dtype=torch.int32))
        with pytest.raises(ValueError, match="a tensor start_pos must be a 0-dim int64 tensor"):
            m(torch.zeros(1, 1, dtype=torch.long), torch.tensor([2]))
        for layer in m.layers:
            layer.attn.attn_impl = "naive"
        m.setup_cache(1, 8)
        with pytest.raises(ValueError, match="tensor start_pos with attn_impl = 'naive' is not allowed"):
            m(torch.zeros(1, 1, dtype=torch.long), torch.tensor(2))
        for layer in m.layers:
            layer.attn.attn_impl = "absorb"
        m.reset_cache()
        with pytest.raises(ValueError, match="tensor start_pos without a KV cache is not allowed"):
            m(torch.zeros(1, 1, dtype=torch.long), torch.tensor(2))
    with pytest.raises(ValueError, match="cuda_graph=True is not allowed for a model on cpu: CUDA graphs need"):
        generate(m, [[1, 2, 3]], max_new_tokens=2, cuda_graph=True)
    for layer in m.layers:
        layer.attn.attn_impl = "naive"
    with pytest.raises(ValueError, match="cuda_graph=True is not allowed with attn_impl='naive'"):
        generate(m, [[1, 2, 3]], max_new_tokens=2, cuda_graph=True)
    assert all(layer.attn.cache_shape is None for layer in m.layers)


def test_sample_top_p_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.7, generator=g) for _ in range(500)]).flatten()
    assert set(draws.tolist()) == {0, 1}
    assert sample(logits.expand(3, -1), 0.0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="top_p = 0.0 is not allowed"):
        sample(logits, 1.0, 0.0)


@pytest.mark.parametrize("preset, total, active", [("671B", 671.03e9, 37.55e9), ("236B", 235.74e9, None),
                                                   ("16B", 15.71e9, None)])
def test_published_sizes_on_meta(preset, total, active):
    a = ModelArgs.preset(preset)
    with torch.device("meta"):
        m = Transformer(a)
    # weights (parameters, plus the FP8 weight buffers and the gate biases), not the FP8 block scales ("671B" is FP8)
    n = sum(t.numel() for k, t in [*m.named_parameters(), *m.named_buffers()] if not k.endswith("scale"))
    assert round(n / 1e9, 2) == pytest.approx(total / 1e9) and n == param_counts(a)["total"]
    if active:
        idle = sum(3 * layer.ffn.experts.w1.numel() * (1 - a.n_activated_experts / a.n_routed_experts)
                   for layer in m.layers if isinstance(layer.ffn, MoE))
        assert round((n - idle) / 1e9, 2) == pytest.approx(active / 1e9)


def test_bad_input(tmp_path, checkpoints):
    m = Transformer(SMALL).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="token id 300 is not allowed"):
            m(torch.tensor([[1, 300]]))
        with pytest.raises(ValueError, match="start_pos \\+ S <= max_seq_len = 64"):
            m(torch.zeros(1, 65, dtype=torch.long))
        with pytest.raises(ValueError, match="tokens must be \\[B, S\\]"):
            m(torch.zeros(5, dtype=torch.long))
        m.setup_cache(1, 8)
        with pytest.raises(ValueError, match="start_pos = 8 with S = 1 is not allowed"):
            m(torch.zeros(1, 1, dtype=torch.long), start_pos=8)
        m.reset_cache()
        with pytest.raises(ValueError, match="start_pos = 3 is not allowed without a KV cache"):
            m(torch.zeros(1, 1, dtype=torch.long), start_pos=3)
    with pytest.raises(ValueError, match=r"max_new_tokens \(62\) = 65 is not allowed: at most max_seq_len = 64"):
        generate(m, [[1, 2, 3]], max_new_tokens=62)
    with pytest.raises(ValueError, match=r"token id 300 in prompt 1 is not allowed: ids must lie in \[0, vocab_size=300\)"):
        generate(m, [[1, 2, 3], [4, 300]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id -1 in prompt 0 is not allowed"):
        generate(m, [[-1, 2]], max_new_tokens=2)
    _, path, _ = checkpoints["q_lora+groups+yarn"]
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type = 'llama'.*only 'deepseek_v3'"):
        load_hf_checkpoint(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype = torch.float8_e4m3fn is not allowed"):
        load_hf_checkpoint(path, dtype=torch.float8_e4m3fn)
    state = load_file(path / "model.safetensors")
    state.pop("model.layers.1.mlp.experts.5.up_proj.weight")
    state.pop("lm_head.weight")
    state["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(7, 7)
    state["model.layers.0.mlp.fancy_proj.weight"] = torch.zeros(3)
    (tmp_path / "broken").mkdir()
    save_file(state, tmp_path / "broken" / "model.safetensors")
    (tmp_path / "broken" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_hf_checkpoint(tmp_path / "broken", dtype=torch.float32)
    msg = str(e.value)
    assert "missing (2): " in msg and "head.weight (300, 48)" in msg
    assert "layers.1.ffn.experts.w3 (8, 24, 48) (experts [5] missing)" in msg
    assert "unexpected (1): model.layers.0.mlp.fancy_proj.weight (3,)" in msg
    assert "wrong shape or dtype (1): model.layers.0.self_attn.kv_b_proj.weight (7, 7) -> layers.0.attn.wkv_b.weight" in msg


def test_token_ids_checked_at_the_boundary():
    """Token ids are checked once, by the model (Embedding does not check them: on a GPU that would be a host sync)."""
    m = Transformer(ModelArgs.preset("tiny")).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="vocab_size=2048"):
            m(torch.tensor([[2048]]))
        with pytest.raises(ValueError, match="-1"):
            m(torch.tensor([[-1]]))
        with pytest.raises(ValueError, match="dtype"):
            m(torch.tensor([[1.0]]))


def test_attention_bad_input_at_the_boundary():
    """The calling contract of MLA (position, cache, form, gradients), checked once per step by the model."""
    m = Transformer(SMALL.replace(max_seq_len=16, max_batch_size=2)).eval()
    one = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_seq_len = 16"):
            m(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(ValueError, match="max_batch_size=2"):
            m.setup_cache(3, 8)
        with pytest.raises(ValueError, match="max_seq_len=16"):
            m.setup_cache(1, 17)
        m.setup_cache(2, 8)
        with pytest.raises(ValueError, match=r"start_pos = 7 with S = 2 is not allowed: start_pos \+ S must be <= the "
                                             "cache length 8"):
            m(torch.zeros(1, 2, dtype=torch.long), 7)
        with pytest.raises(ValueError, match="B = 3 is not allowed: the cache holds 2 sequences"):
            m(torch.zeros(3, 1, dtype=torch.long), 0)
        for layer in m.layers:
            layer.attn.attn_impl = "naive"
        with pytest.raises(ValueError, match="attn_impl = 'naive' is not allowed with a cache made for 'absorb': "
                                             "call setup_cache again"):
            m(one, 0)
        for layer in m.layers:
            layer.attn.attn_impl = "absorb"
    with pytest.raises(RuntimeError, match="no_grad"):
        m(one, 0)
    m.reset_cache()


# ---- FP8 inference: FP8Linear / FP8Experts in the model, FP8 checkpoints kept as FP8
FP8_ARGS = SMALL.replace(dim=128, inter_dim=256, moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128,
                         qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)   # every matrix input width % 128 == 0


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A random DeepseekV3ForCausalLM saved twice: FP8 (e4m3 + weight_scale_inv, as published) and dequantised."""
    root = tmp_path_factory.mktemp("fp8ckpt")
    _hf(FP8_ARGS, seed=7).save_pretrained(root / "plain")
    config = json.loads((root / "plain" / "config.json").read_text())
    fp8, deq = {}, {}
    for k, v in load_file(root / "plain" / "model.safetensors").items():
        if k.endswith("proj.weight"):
            q, s = weight_quant_ref(v)
            fp8[k], fp8[k + "_scale_inv"], deq[k] = q, s, dequantize_fp8(q, s, dtype=torch.float32)
        else:
            fp8[k] = deq[k] = v
    for name, state in (("deq", deq), ("fp8", fp8)):
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(config))
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    return root, fp8


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fp8_load_keeps_fp8_and_matches_dequantised(fp8_checkpoint):
    from dsv3_lite.fp8 import FP8Experts, FP8Linear
    root, fp8 = fp8_checkpoint
    m8 = load_hf_checkpoint(root / "fp8", dtype="fp8")
    m32 = load_hf_checkpoint(root / "deq", dtype=torch.float32)
    assert m8.args.dtype == "fp8"
    # every big matrix is FP8 and bit-identical to the checkpoint (no dequantisation); the rest stays float32
    assert isinstance(m8.layers[0].attn.wkv_b, FP8Linear) and isinstance(m8.layers[0].ffn.w2, FP8Linear)
    assert isinstance(m8.layers[1].ffn.experts, FP8Experts) and isinstance(m8.layers[1].ffn.shared_experts.w1, FP8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in m8.modules())
    as_bits = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bits(m8.layers[1].ffn.experts.w2[5]), as_bits(fp8["model.layers.1.mlp.experts.5.down_proj.weight"]))
    assert torch.equal(m8.layers[1].ffn.experts.w2_scale[5], fp8["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"])
    assert torch.equal(as_bits(m8.layers[2].attn.wq_b.weight), as_bits(fp8["model.layers.2.self_attn.q_b_proj.weight"]))
    assert torch.equal(m8.layers[2].attn.wq_b.scale, fp8["model.layers.2.self_attn.q_b_proj.weight_scale_inv"])
    assert m8.head.weight.dtype == m8.embed.weight.dtype == m8.layers[1].ffn.gate.weight.dtype == torch.float32
    x = torch.randint(0, FP8_ARGS.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = m32(x), m8(x)
        m8.setup_cache(2, 29)
        steps = torch.cat([m8(x[:, :11], 0)] + [m8(x[:, p:p + 1], p) for p in range(11, 29)], 1)
        m8.reset_cache()
    # Same weights on both sides; the FP8 model also rounds every matrix input to e4m3 per 1x128 tile (3 mantissa
    # bits: relative error up to 2^-4 = 6.25% per element, about 2% on average; measured 3.2% on the logits). So the
    # logits agree to 6.25% relative RMS, and they are not identical (the activations really are quantised).
    assert 1e-3 < _rel(got, ref) < 0.0625
    assert _rel(steps, ref) < 0.0625  # decoding: absorbed MLA with the dequantised wkv_b, FP8 everywhere else
    # a high-precision checkpoint loaded with dtype="fp8" is quantised on load to exactly the same FP8 model
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(root / "plain", dtype="fp8")(x), got)
    # .to(bfloat16) changes only the high-precision part; the FP8 buffers keep their dtype
    mb = m8.to(torch.bfloat16)
    assert mb.embed.weight.dtype == torch.bfloat16 and mb.layers[1].ffn.experts.w1.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert _rel(mb(x), ref) < 0.0625


def test_fp8_model_from_args_builds_and_runs():
    from dsv3_lite.fp8 import FP8Experts, FP8Linear
    torch.manual_seed(0)
    args = ModelArgs.preset("tiny", dtype="fp8")      # q_lora 96, kv_lora 64: those inputs stay high precision
    m = Transformer(args).eval()
    attn = m.layers[1].attn
    assert isinstance(attn.wq_a, FP8Linear) and isinstance(attn.wkv_a, FP8Linear) and isinstance(attn.wo, FP8Linear)
    assert isinstance(attn.wq_b, torch.nn.Linear) and isinstance(attn.wkv_b, torch.nn.Linear)
    assert isinstance(m.layers[1].ffn.experts, FP8Experts) and isinstance(m.layers[0].ffn.w1, FP8Linear)
    torch.manual_seed(0)
    bf = Transformer(ModelArgs.preset("tiny")).eval()   # same seed: the weights FP8 was quantised from
    x = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = m(x), bf(x)
    assert got.shape == (2, 9, args.vocab_size) and torch.isfinite(got).all()
    assert _rel(got, ref) < 0.1   # FP8 weights and activations (08: ~3% each) against the weights they came from
    out = generate(m, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    with torch.device("meta"):
        big = Transformer(ModelArgs.preset("671B"))
    assert big.layers[3].ffn.experts.w1.dtype == torch.float8_e4m3fn
    assert tuple(big.layers[3].ffn.experts.w1_scale.shape) == (256, 16, 56)


# ---- token ids, cache positions, sampling parameters, checkpoint files: every bad input named where it enters
def test_empty_or_untyped_tokens_are_refused_at_the_boundary():
    m = Transformer(SMALL).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"Transformer: tokens.shape = \(1, 0\) is not allowed: a step needs B >= 1 "
                                             r"sequences of S >= 1 tokens"):
            m(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match=r"tokens.shape = \(0, 3\) is not allowed"):
            m.hidden(torch.zeros(0, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="Transformer: tokens of type list is not allowed: token ids must be a "
                                             "tensor"):
            m([[1, 2]])


def test_generate_refuses_token_ids_that_are_not_ints():
    m = Transformer(SMALL).eval()
    with pytest.raises(ValueError, match=r"generate: token id 2.7 in prompt 0 is not allowed: token ids must be ints "
                                         r"\(not floats or bools\)"):
        generate(m, [[1, 2.7]], 2)                                   # was truncated to 2
    with pytest.raises(ValueError, match="generate: token id True in prompt 1 is not allowed"):
        generate(m, [[1], [True, 2]], 2)
    with pytest.raises(ValueError, match=r"generate: token id -1 in prompt 0 is not allowed: ids must lie in"):
        generate(m, [[5, -1, 7]], 2)                                 # -1 inside a prompt is an id, not a marker
    with pytest.raises(ValueError, match=r"generate: prompt 0 of dtype torch.float32 is not allowed: a tensor prompt "
                                         r"holds integer token ids"):
        generate(m, [torch.tensor([1.0, 2.0])], 2)
    with pytest.raises(ValueError, match="generate: prompt 0 = 'hello' is not allowed: a prompt is a list of token ids"):
        generate(m, ["hello"], 2)
    with pytest.raises(ValueError, match="generate: prompts must be a non-empty list of non-empty token lists"):
        generate(m, [[]], 2)
    # integer tensors are prompts too: a [B, S] batch, or one 1-D tensor per prompt
    want = generate(m, [[1, 2, 3], [4, 5, 6]], 3)
    assert generate(m, torch.tensor([[1, 2, 3], [4, 5, 6]]), 3) == want
    assert generate(m, [torch.tensor([1, 2, 3], dtype=torch.int32), (4, 5, 6)], 3) == want


def test_cache_steps_must_continue_what_is_cached():
    """A step on the KV cache starts at most where the cached positions end; starting earlier rewrites them."""
    torch.manual_seed(0)
    m = Transformer(SMALL).eval()
    seq = torch.randint(0, SMALL.vocab_size, (1, 12))
    with torch.no_grad():
        m.setup_cache(1, 16)
        with pytest.raises(ValueError, match="start_pos = 1 is not allowed: the KV cache holds 0 positions"):
            m(seq[:, 1:2], 1)
        m(seq[:, :4], 0)
        with pytest.raises(ValueError, match=r"Transformer: start_pos = 10 is not allowed: the KV cache holds 4 "
                                             r"positions \(0 … 3\), so a step starts at start_pos <= 4"):
            m(seq[:, 10:11], 10)
        ref = m(seq[:, 4:6], 4)                                      # continues: positions 4, 5
        assert torch.equal(m(seq[:, 4:6], 4), ref) and m.n_cached == 6   # rewriting 4, 5 gives the same logits
        m(seq[:, 2:3], 2)                                            # rewinds: positions 0 … 2 remain
        with pytest.raises(ValueError, match="start_pos = 4 is not allowed: the KV cache holds 3 positions"):
            m(seq[:, 4:5], 4)
        m.setup_cache(1, 16)                                         # a fresh cache holds nothing
        with pytest.raises(ValueError, match="start_pos = 3 is not allowed: the KV cache holds 0 positions"):
            m(seq[:, :1], 3)
        m.reset_cache()
    assert m.n_cached == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(temperature=math.nan), "temperature = nan is not allowed: it must be a finite number >= 0 (0: greedy)"),
        (dict(temperature=math.inf), "temperature = inf is not allowed"),
        (dict(temperature=-0.5), "temperature = -0.5 is not allowed"),
        (dict(temperature="0.7"), "temperature = '0.7' is not allowed"),
        (dict(top_p=math.nan), "top_p = nan is not allowed: it must be a number in (0, 1]"),
        (dict(top_p=1.5), "top_p = 1.5 is not allowed"),
        (dict(top_p=None), "top_p = None is not allowed"),
        (dict(max_new_tokens=2.5), "max_new_tokens = 2.5 is not allowed: it must be an int >= 1"),
        (dict(max_new_tokens=True), "max_new_tokens = True is not allowed"),
        (dict(eos_id=300), "eos_id = 300 is not allowed: give None or a token id, an int in [0, vocab_size=300)"),
        (dict(eos_id=-1), "eos_id = -1 is not allowed"),
        (dict(eos_id=2.0), "eos_id = 2.0 is not allowed"),
        (dict(generator=0), "generator = 0 is not allowed: give None or a torch.Generator"),
    ],
)
def test_generate_checks_its_sampling_parameters(change, message):
    m = Transformer(SMALL).eval()
    with pytest.raises(ValueError, match=re.escape("generate: " + message)):
        generate(m, [[1, 2, 3]], **{"max_new_tokens": 3, **change})


def test_sample_and_top_p_probs_check_their_parameters():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="sample: temperature = nan is not allowed"):
        sample(logits, math.nan)
    with pytest.raises(ValueError, match="sample: temperature = inf is not allowed"):
        sample(logits, math.inf)
    with pytest.raises(ValueError, match=r"top_p_probs: temperature = 0 is not allowed: it must be a finite number > 0"):
        top_p_probs(logits, 0)
    with pytest.raises(ValueError, match="top_p_probs: top_p = nan is not allowed"):
        top_p_probs(logits, 1.0, math.nan)
    assert torch.allclose(top_p_probs(logits, 1, 1).sum(-1), torch.ones(2))   # ints are numbers too


def _raw_safetensors(path, tensors):
    """A safetensors file written by hand: {name: (dtype string, shape, bytes)}, any dtype string."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_checkpoint_errors_name_the_file_and_the_tensor(tmp_path, checkpoints):
    _, single, _ = checkpoints["q_lora+groups+yarn"]
    _, sharded, _ = checkpoints["no_q_lora+1group+2shared"]
    cfg = (single / "config.json").read_text()
    # config.json that is not JSON
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text(cfg[:-20])
    with pytest.raises(ValueError, match=re.escape(f"load_hf_checkpoint: {tmp_path / 'cut' / 'config.json'} is not "
                                                   "valid JSON")):
        load_hf_checkpoint(tmp_path / "cut")
    # index: not JSON, no weight_map, a shard that is not there
    index = tmp_path / "idx" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint_files: {index} is not valid JSON")):
        checkpoint_files(index.parent)
    index.write_text(json.dumps({"metadata": {"total_size": 0}}))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint_files: {index} has no 'weight_map'")):
        checkpoint_files(index.parent)
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint_files: {index} names shards that are not in "
                                                          f"{index.parent}: model-00002-of-00002.safetensors")):
        checkpoint_files(index.parent)
    # a truncated shard of a sharded checkpoint: the error names that shard
    (tmp_path / "trunc").mkdir()
    shards = sorted(sharded.glob("*.safetensors"))
    for f in [sharded / "config.json", sharded / "model.safetensors.index.json", *shards]:
        (tmp_path / "trunc" / f.name).write_bytes(f.read_bytes())
    victim = tmp_path / "trunc" / shards[1].name
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"load_hf_checkpoint: {victim} is not a valid safetensors file: "
                                                   "Error while deserializing header")):
        load_hf_checkpoint(tmp_path / "trunc")
    # a shard whose header is valid but one tensor cannot be read: the error names the shard and the tensor
    (tmp_path / "dtype").mkdir()
    (tmp_path / "dtype" / "config.json").write_text(cfg)
    _raw_safetensors(tmp_path / "dtype" / "model.safetensors", {"lm_head.weight": ("F6_E2M3", [4], b"\0" * 3)})
    with pytest.raises(ValueError, match=re.escape(f"load_hf_checkpoint: tensor lm_head.weight in "
                                                   f"{tmp_path / 'dtype' / 'model.safetensors'} cannot be read")):
        load_hf_checkpoint(tmp_path / "dtype")
    # without an index, every *.safetensors is opened to list its tensors
    (tmp_path / "dtype" / "model.safetensors").write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint_files: {tmp_path / 'dtype' / 'model.safetensors'} "
                                                   "is not a valid safetensors file")):
        checkpoint_files(tmp_path / "dtype")
