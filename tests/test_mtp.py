"""Multi-token prediction (dsv3_lite.mtp) and self-speculative decoding (dsv3_lite.speculative), notebook 09."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dsv3_lite.checkpoint import load_hf_checkpoint, load_mtp
from dsv3_lite.config import ModelArgs, param_counts
from dsv3_lite.generation import generate
from dsv3_lite.model import Transformer
from dsv3_lite.mtp import add_mtp, mtp_logits, mtp_loss
from dsv3_lite.speculative import speculative_generate, verify_draft

SMALL = ModelArgs.preset("tiny").replace(vocab_size=512, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=2,
                                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                         max_seq_len=64, original_seq_len=16, max_batch_size=4)


def test_mtp_shapes_alignment_and_loss_depth_2():
    torch.manual_seed(0)
    args = SMALL.replace(n_mtp_layers=2)
    model = add_mtp(Transformer(args))
    B, T = 2, 11
    x, y = torch.randint(0, 512, (B, T)), torch.randint(0, 512, (B, T))
    logits = mtp_logits(model, model.hidden(x), y)
    assert [tuple(lg.shape) for lg in logits] == [(B, T - 1, 512), (B, T - 2, 512)]
    lam = 0.3
    manual = sum(F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten(), reduction="sum") / (B * T)
                 for k, lg in enumerate(logits, 1)) * lam / 2
    assert torch.allclose(mtp_loss(logits, y, lam), manual)
    # depth 1 at position i must not see targets beyond y[i] (causality): change y[:, 5:] and positions < 5 stay
    y2 = y.clone()
    y2[:, 5:] = (y2[:, 5:] + 1) % 512
    again = mtp_logits(model, model.hidden(x), y2)
    assert torch.allclose(again[0][:, :5], logits[0][:, :5], atol=1e-5)
    assert not torch.allclose(again[0][:, 5:], logits[0][:, 5:])


def test_mtp_parameter_count_and_shared_gradients():
    model = add_mtp(Transformer(SMALL))
    n = sum(p.numel() for p in model.mtp.parameters()) + sum(b.numel() for b in model.mtp.buffers())
    assert n == param_counts(SMALL)["mtp"]
    names = {k for k, _ in model.named_parameters()}
    assert not any(k.startswith("mtp.") and ("embed" in k or "head" in k) for k in names)  # shared, not copied
    x = torch.randint(0, 512, (2, 9))
    mtp_loss(mtp_logits(model, model.hidden(x).detach(), x), x).backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0


def test_add_mtp_needs_depth():
    with pytest.raises(ValueError, match="n_mtp_layers = 0"):
        add_mtp(Transformer(SMALL.replace(n_mtp_layers=0)))
    with pytest.raises(ValueError, match="add_mtp"):
        mtp_logits(Transformer(SMALL), torch.zeros(1, 3, 64), torch.zeros(1, 3, dtype=torch.long))


def _hf_checkpoint(tmp_path, seed=1):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**SMALL.to_hf_config())).eval()
    mtp = MtpModel(hf, 1).eval()
    with torch.no_grad():
        for p in mtp.layers.parameters():
            p.normal_(std=0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        mtp.layers[0].mtp_block.mlp.gate.e_score_correction_bias.normal_(std=0.05)
    hf.save_pretrained(tmp_path)
    n, out = SMALL.n_layers, {}
    for key, t in mtp.state_dict().items():
        if not key.startswith("layers.0."):
            continue
        rest = key.removeprefix("layers.0.").removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        if rest == "mlp.experts.gate_up_proj":
            for e, w in enumerate(t):
                out[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"] = w[:w.shape[0] // 2].clone()
                out[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"] = w[w.shape[0] // 2:].clone()
        elif rest == "mlp.experts.down_proj":
            for e, w in enumerate(t):
                out[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"] = w.clone()
        else:
            out[f"model.layers.{n}.{rest}"] = t.clone()
    out[f"model.layers.{n}.embed_tokens.weight"] = hf.model.embed_tokens.weight.clone()
    out[f"model.layers.{n}.shared_head.head.weight"] = hf.lm_head.weight.clone()
    return hf, mtp, out


def test_load_mtp_equals_transformers(tmp_path):
    hf, hf_mtp, tensors = _hf_checkpoint(tmp_path)
    save_file(tensors, tmp_path / "mtp.safetensors")
    ours = load_mtp(load_hf_checkpoint(tmp_path, dtype=torch.float32), tmp_path)
    x = torch.randint(0, SMALL.vocab_size, (2, 13))
    with torch.no_grad():
        h = hf.model(x).last_hidden_state
        pos = torch.arange(1, 13).expand(2, -1)
        ref = hf_mtp._project_to_logits(hf_mtp.forward_layer(0, h[:, :12], pos, None, input_ids=x[:, 1:]))
        got = mtp_logits(ours, ours.hidden(x), torch.cat([x[:, 1:], x[:, :1]], 1))[0]
    assert (got - ref).abs().max().item() < 1e-4
    assert ours.mtp.layers[0].block.ffn.gate.bias.dtype == torch.float32


def test_load_mtp_errors(tmp_path):
    hf, _, tensors = _hf_checkpoint(tmp_path)
    main = load_hf_checkpoint(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="no MTP layer"):
        load_mtp(main, tmp_path)
    bad = dict(tensors)
    bad["model.layers.2.embed_tokens.weight"] = bad["model.layers.2.embed_tokens.weight"] + 1
    save_file(bad, tmp_path / "mtp.safetensors")
    with pytest.raises(ValueError, match="embed_tokens.weight differs"):
        load_mtp(load_hf_checkpoint(tmp_path, dtype=torch.float32), tmp_path)
    missing = {k: v for k, v in tensors.items() if "eh_proj" not in k}
    save_file(missing, tmp_path / "mtp.safetensors")
    with pytest.raises(ValueError, match="missing .*eh_proj"):
        load_mtp(load_hf_checkpoint(tmp_path, dtype=torch.float32), tmp_path)


def _silence(blocks):
    for b in blocks:
        b.attn.wo.weight.data.zero_()
        if hasattr(b.ffn, "experts"):
            b.ffn.experts.w2.data.zero_()
            b.ffn.shared_experts.w2.weight.data.zero_()
        else:
            b.ffn.w2.weight.data.zero_()


@pytest.mark.parametrize("kind", ["random", "oracle"])
def test_speculative_greedy_equals_plain(kind):
    torch.manual_seed(0)
    model = add_mtp(Transformer(SMALL)).eval()
    if kind == "oracle":  # blocks do nothing; the MTP module recomputes the main model's next-token function
        _silence(list(model.layers) + [model.mtp.layers[0].block])
        model.mtp.layers[0].eh_proj.weight.data.copy_(torch.cat([torch.eye(64), torch.zeros(64, 64)], 1))
    prompt = torch.randint(3, 512, (9,)).tolist()
    for n in (1, 2, 17, 64 - 9 - 1):
        plain = generate(model, [prompt], n)[0]
        spec, stats = speculative_generate(model, prompt, n)
        assert spec == plain
        if kind == "oracle" and n > 1:
            assert stats.accepted == stats.drafted and stats.forwards == 1 + math.ceil((n - 1) / 2)


def test_speculative_errors_and_eos():
    model = add_mtp(Transformer(SMALL)).eval()
    with pytest.raises(ValueError, match="max_seq_len = 64"):
        speculative_generate(model, list(range(3, 40)), 30)
    with pytest.raises(ValueError, match="no MTP module"):
        speculative_generate(Transformer(SMALL), [5], 3)
    with pytest.raises(ValueError, match="non-empty"):
        speculative_generate(model, [], 3)
    with pytest.raises(ValueError, match=r"token id 512 is not allowed: ids must lie in \[0, vocab_size=512\)"):
        speculative_generate(model, [5, 512], 3)
    first = speculative_generate(model, [5, 6], 20)[0]
    out, _ = speculative_generate(model, [5, 6], 20, eos_id=first[3])
    assert out[-1] == first[3] and len(out) == first.index(first[3]) + 1


def test_speculative_stops_at_an_accepted_eos_draft():
    """An accepted draft that is EOS ends the text: no token after it is generated and no further forward runs."""
    torch.manual_seed(0)
    model = add_mtp(Transformer(SMALL)).eval()
    _silence(list(model.layers) + [model.mtp.layers[0].block])          # the oracle: every draft is accepted
    model.mtp.layers[0].eh_proj.weight.data.copy_(torch.cat([torch.eye(64), torch.zeros(64, 64)], 1))
    prompt = torch.randint(3, 512, (9,)).tolist()
    first, stats = speculative_generate(model, prompt, 30)
    assert stats.accepted == stats.drafted > 2
    # out = [x, d1, y1, d2, y2, ...]: drafts sit at odd indices; take one whose token did not occur before it
    i = next(i for i in range(3, len(first), 2) if first[i] not in first[:i])
    out, stats = speculative_generate(model, prompt, 30, eos_id=first[i])
    assert out == first[:i + 1]
    steps = (i + 1) // 2                                                 # verification forwards up to that draft
    assert stats.drafted == stats.accepted == steps and stats.forwards == 1 + steps


def test_verify_draft_sampling_keeps_the_main_distribution():
    """Speculative sampling: whatever q drafts, accepted drafts + replacements are distributed as p."""
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.tensor([0.0, 2.0, 1.0, -1.0, 0.5]), torch.tensor([3.0, 0.0, 0.0, 0.0, -2.0])
    q = torch.softmax(q_logits, -1)
    counts = torch.zeros(5)
    for _ in range(6000):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[verify_draft(p_logits, q_logits, d, temperature=1.0, generator=g)[1]] += 1
    assert (counts / counts.sum() - torch.softmax(p_logits, -1)).abs().max() < 0.025
    assert verify_draft(p_logits, q_logits, 1) == (True, 1)
    assert verify_draft(p_logits, q_logits, 2) == (False, 1)


@pytest.mark.parametrize(
    "prompt, change, message",
    [
        ([5, 2.5], {}, "speculative_generate: token id 2.5 is not allowed: token ids must be ints (not floats or bools)"),
        ([5, True], {}, "speculative_generate: token id True is not allowed"),
        ([5, -1], {}, "speculative_generate: token id -1 is not allowed: ids must lie in [0, vocab_size=512)"),
        ([5, 6], dict(temperature=math.nan), "speculative_generate: temperature = nan is not allowed"),
        ([5, 6], dict(temperature=math.inf), "speculative_generate: temperature = inf is not allowed"),
        ([5, 6], dict(top_p=math.nan), "speculative_generate: top_p = nan is not allowed"),
        ([5, 6], dict(max_new_tokens=2.5), "speculative_generate: max_new_tokens = 2.5 is not allowed"),
        ([5, 6], dict(eos_id=512), "speculative_generate: eos_id = 512 is not allowed"),
    ],
)
def test_speculative_checks_its_arguments(prompt, change, message):
    model = add_mtp(Transformer(SMALL)).eval()
    with pytest.raises(ValueError, match=re.escape(message)):
        speculative_generate(model, prompt, **{"max_new_tokens": 3, **change})


def test_speculative_takes_an_integer_tensor_prompt():
    torch.manual_seed(0)
    model = add_mtp(Transformer(SMALL)).eval()
    assert speculative_generate(model, torch.tensor([5, 6, 7]), 4)[0] == speculative_generate(model, [5, 6, 7], 4)[0]


def test_load_mtp_errors_name_the_file(tmp_path):
    _, _, tensors = _hf_checkpoint(tmp_path)
    save_file(tensors, tmp_path / "mtp.safetensors")
    main = load_hf_checkpoint(tmp_path, dtype=torch.float32)
    cfg = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg[:10])
    with pytest.raises(ValueError, match=re.escape(f"load_mtp: {tmp_path / 'config.json'} is not valid JSON")):
        load_mtp(main, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(ValueError, match=re.escape(f"load_mtp: {tmp_path / 'config.json'} holds a list")):
        load_mtp(main, tmp_path)
    (tmp_path / "config.json").write_text(cfg)
    shard = tmp_path / "mtp.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=re.escape(f"{shard} is not a valid safetensors file")):
        load_mtp(main, tmp_path)
