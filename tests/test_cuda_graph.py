"""Decode steps on a GPU (notebooks/07_model.ipynb): an eager step reads nothing back on the host (no device-to-host
sync, the model's input checks included), and steps captured in a CUDA graph (`DecodeGraph`,
`generate(..., cuda_graph=True)`) give the same greedy tokens and step logits as eager decoding, on a small bf16 model
whose MoE layers run the grouped GEMM.

Skipped without a CUDA GPU (CI has none; the CPU side, tensor start_pos == int start_pos and the errors, is in
test_mla.py / test_model.py). Run on a GPU with `python -m pytest -o addopts="" tests/test_cuda_graph.py`.
"""

import pytest
import torch

from dsv3_lite import ModelArgs, Transformer
from dsv3_lite.generation import DecodeGraph, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")

# dense + MoE layers (group-limited routing, 2 shared experts), q_lora; widths multiples of 8 for the bf16 grouped GEMM
ARGS = ModelArgs.preset("tiny").replace(vocab_size=320, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3,
                                        n_dense_layers=1, n_heads=4, kv_lora_rank=32, q_lora_rank=48,
                                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=2,
                                        max_seq_len=128, original_seq_len=32, max_batch_size=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ARGS).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for layer in m.layers[ARGS.n_dense_layers:]:
            layer.ffn.gate.weight.normal_(std=0.5)      # routing that differs from token to token
    return m


def test_greedy_generate_with_cuda_graph_equals_eager(model):
    prompts = [[5, 17, 42], [7, 7, 7, 7, 7, 100], [1, 2, 3, 4, 5, 6, 7, 8, 9]]   # ragged: prompt tokens override
    eager = generate(model, prompts, max_new_tokens=24)
    graph = generate(model, prompts, max_new_tokens=24, cuda_graph=True)
    assert graph == eager
    assert all(layer.attn.cache_shape is None for layer in model.layers)          # cache freed
    eos = eager[0][3]
    assert generate(model, prompts[:1], 24, eos_id=eos, cuda_graph=True) == [eager[0][:eager[0].index(eos) + 1]]
    single = generate(model, [[3]], max_new_tokens=8)                               # a one-token prefill
    assert generate(model, [[3]], max_new_tokens=8, cuda_graph=True) == single


def test_decode_graph_logits_equal_eager_steps(model):
    seq = torch.randint(0, ARGS.vocab_size, (2, 20), device="cuda")
    with torch.no_grad():
        model.setup_cache(2, 32)
        model(seq[:, :8], 0, last_only=True)
        eager = [model(seq[:, p:p + 1], p, last_only=True) for p in range(8, 20)]
        model.setup_cache(2, 32)
        model(seq[:, :8], 0, last_only=True)
        g = DecodeGraph(model, seq[:, 8:9], 8)
        replayed = [g(seq[:, p:p + 1], p).clone() for p in range(8, 20)]
        with pytest.raises(ValueError, match=r"tokens.shape = \(1, 1\) is not allowed"):
            g(seq[:1, :1], 20)
        model.reset_cache()
    got, want = torch.stack(replayed), torch.stack(eager)                           # [12, B, V] float32
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-2, err                                                          # bf16: same math, other order
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_two_token_verify_graph_equals_eager_steps(model):
    """The verify step of speculative decoding, two tokens at a device-held position, captured once and replayed at
    successive positions: the logits of both positions equal eager two-token steps."""
    seq = torch.randint(0, ARGS.vocab_size, (2, 24), device="cuda")
    with torch.no_grad():
        model.setup_cache(2, 32)
        model(seq[:, :8], 0)
        eager = [model(seq[:, p:p + 2], p) for p in range(8, 20, 2)]
        model.setup_cache(2, 32)
        model(seq[:, :8], 0)
        g = DecodeGraph(model, seq[:, 8:10], 8, last_only=False)
        replayed = [g(seq[:, p:p + 2], p).clone() for p in range(8, 20, 2)]
        model.reset_cache()
    got, want = torch.stack(replayed), torch.stack(eager)                           # [6, B, 2, V] float32
    assert got.shape == want.shape == (6, 2, 2, ARGS.vocab_size)
    assert ((got - want).norm() / want.norm()).item() < 1e-2                       # bf16: same math, other order
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature")
@pytest.mark.parametrize("kind", ["int", "tensor"])
def test_decode_step_makes_no_host_sync(model, kind):
    """One decode step on the KV cache, absorbed attention, start_pos an int or a 0-dim device tensor: no operation
    waits for the GPU (torch.cuda.set_sync_debug_mode("error") raises on any device-to-host sync)."""
    assert all(layer.attn.attn_impl == "absorb" for layer in model.layers)
    seq = torch.randint(0, ARGS.vocab_size, (2, 10), device="cuda")
    pos = torch.tensor(8, device="cuda")
    with torch.no_grad():
        model.setup_cache(2, 16)
        model(seq[:, :8], 0, last_only=True)                                       # prefill
        model(seq[:, 8:9], 8 if kind == "int" else pos, last_only=True)            # warm-up: lazy init outside
        pos.fill_(9)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(seq[:, 9:10], 9 if kind == "int" else pos, last_only=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.reset_cache()
    assert logits.shape == (2, ARGS.vocab_size) and bool(torch.isfinite(logits).all())
