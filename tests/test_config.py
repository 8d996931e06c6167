"""ModelArgs (notebook 02): presets, validation, HF config round trips, parameter counts, embedding and head."""

import json
import math
import re

import pytest
import torch

from dsv3_lite.config import (
    HF_CONFIG_NAMES,
    HF_PARAM_NAMES,
    PRESETS,
    ModelArgs,
    hf_param_name,
    official_param_name,
    param_counts,
)
from dsv3_lite.embedding import Embedding, Head

transformers = pytest.importorskip("transformers")


def test_presets_match_the_official_configs():
    """Spot values from the official inference/configs/*.json."""
    v3 = ModelArgs.preset("671B")
    assert (v3.vocab_size, v3.dim, v3.inter_dim, v3.moe_inter_dim) == (129280, 7168, 18432, 2048)
    assert (v3.n_layers, v3.n_dense_layers, v3.n_heads) == (61, 3, 128)
    assert (v3.n_routed_experts, v3.n_shared_experts, v3.n_activated_experts) == (256, 1, 8)
    assert (v3.n_expert_groups, v3.n_limited_groups, v3.score_func, v3.route_scale) == (8, 4, "sigmoid", 2.5)
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_head_dim, v3.v_head_dim) == (1536, 512, 192, 128)
    assert v3.dtype == "fp8" and v3.scale_fmt is None and v3.gate_bias and v3.n_mtp_layers == 1
    assert ModelArgs.preset("v3.1") == v3.replace(scale_fmt="ue8m0")
    assert ModelArgs.preset("16B").mscale == 0.707 and ModelArgs.preset("16B").q_lora_rank == 0
    assert ModelArgs.preset("236B").route_scale == 16.0 and ModelArgs.preset("236B").n_limited_groups == 3


def test_v3_softmax_scale_and_yarn_switch():
    v3 = ModelArgs.preset("671B")
    assert v3.yarn_enabled
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * 1.368888 ** 2, rel=1e-6)
    assert round(v3.softmax_scale, 7) == 0.1352338
    off = v3.replace(max_seq_len=4096)  # official rule: YaRN only if max_seq_len > original_seq_len
    assert not off.yarn_enabled and off.softmax_scale == 192 ** -0.5


def test_tiny_exercises_every_branch():
    t = ModelArgs.preset("tiny")
    assert t.vocab_size == 2048
    assert 0 < t.n_dense_layers < t.n_layers  # dense and MoE layers
    assert t.n_expert_groups >= 2 and t.n_limited_groups < t.n_expert_groups  # group-limited routing
    assert t.score_func == "sigmoid" and t.gate_bias  # routing bias
    assert t.q_lora_rank > 0 and t.yarn_enabled and t.rope_factor > 1 and t.mscale > 0
    assert t.n_mtp_layers == 1
    c = param_counts(t)
    assert 5e6 <= c["total"] + c["mtp"] <= 10e6


def test_param_counts_reproduce_the_published_sizes():
    c = param_counts(ModelArgs.preset("671B"))
    assert round(c["total"] / 1e9, 2) == 671.03
    assert round((c["activated"] + c["embed"]) / 1e9, 2) == 37.55
    assert round(c["mtp"] / 1e9, 2) == 11.61
    assert round(c["attention"] / 1e6, 1) == 187.1
    assert round(param_counts(ModelArgs.preset("16B"))["total"] / 1e9, 2) == 15.71
    assert round(param_counts(ModelArgs.preset("236B"))["total"] / 1e9, 2) == 235.74


def _module_params(module):
    return sum(p.numel() for p in module.parameters())


def test_param_counts_match_transformers_attention_and_model():
    """Count the parameters HF instantiates for a tiny config and compare with our formula."""
    a = ModelArgs.preset("tiny")
    cfg = transformers.DeepseekV3Config(**a.to_hf_config())
    model = transformers.DeepseekV3ForCausalLM(cfg)
    c = param_counts(a)
    assert _module_params(model.model.layers[0].self_attn) == c["attention"]
    gate_bias = a.n_routed_experts  # HF keeps e_score_correction_bias as a buffer, not a parameter
    assert _module_params(model) == c["total"] - (a.n_layers - a.n_dense_layers) * gate_bias


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
        (dict(n_expert_groups=7), "n_expert_groups"),
        (dict(n_limited_groups=9), "n_limited_groups"),
        (dict(n_activated_experts=300), "n_activated_experts"),
        (dict(score_func="relu"), "score_func"),
        (dict(dim=0), "dim"),
        (dict(dim=7168.0), "dim"),
        (dict(n_dense_layers=62), "n_dense_layers"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(rope_factor=0.5), "rope_factor"),
        (dict(beta_fast=1, beta_slow=1), "beta_fast"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(dtype="bf16", scale_fmt="ue8m0"), "scale_fmt"),
        (dict(score_func="softmax"), "gate_bias"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}="):
        ModelArgs.preset("671B", **change)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        ModelArgs.preset("7B")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name):
    a = ModelArgs.preset(name)
    d = a.to_hf_config()
    assert ModelArgs.from_hf_config(d, max_seq_len=a.max_seq_len) == a
    cfg = transformers.DeepseekV3Config(**d)  # transformers accepts the dict
    assert ModelArgs.from_hf_config(cfg, max_seq_len=a.max_seq_len) == a  # and the PretrainedConfig back


def test_hf_config_json_file_with_rope_scaling(tmp_path):
    """The published layout: top-level rope_theta and a `rope_scaling` block with `type`."""
    d = ModelArgs.preset("671B").to_hf_config()
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    d["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(d))
    a = ModelArgs.from_hf_config(tmp_path, max_seq_len=16384)  # a folder works, like a file
    assert a == ModelArgs.preset("671B")
    assert ModelArgs.from_hf_config(tmp_path / "config.json").max_seq_len == 163840


def test_hf_without_yarn_keeps_yarn_off():
    a = ModelArgs.preset("tiny", max_seq_len=128)
    d = a.to_hf_config()
    assert d["rope_parameters"]["rope_type"] == "default"
    b = ModelArgs.from_hf_config(d)
    assert not b.yarn_enabled and b.softmax_scale == a.softmax_scale


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(max_position_embeddings=128), "max_position_embeddings"),
    ],
)
def test_hf_configs_the_official_model_cannot_express(change, key):
    d = {**ModelArgs.preset("tiny").to_hf_config(), **change}
    with pytest.raises(ValueError, match=key):
        ModelArgs.from_hf_config(d)


def test_hf_mscale_mismatch_is_refused():
    d = ModelArgs.preset("tiny").to_hf_config()
    d["rope_parameters"] = {**d["rope_parameters"], "mscale": 0.707}
    with pytest.raises(ValueError, match="mscale"):
        ModelArgs.from_hf_config(d)
    with pytest.raises(ValueError, match="config="):
        ModelArgs.from_hf_config("/nonexistent/config.json")


def test_hf_softmax_scale_agrees():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    for name in ["tiny", "16B", "671B"]:
        for max_seq_len in (None, 64):
            a = ModelArgs.preset(name) if max_seq_len is None else ModelArgs.preset(name, max_seq_len=max_seq_len)
            cfg = transformers.DeepseekV3Config(**a.to_hf_config())
            assert math.isclose(yarn_apply_mscale(cfg.rope_parameters, a.qk_head_dim ** -0.5), a.softmax_scale,
                                rel_tol=1e-12)


def test_name_tables():
    assert set(HF_CONFIG_NAMES) <= {f.name for f in ModelArgs.__dataclass_fields__.values()}
    assert len(set(HF_PARAM_NAMES.values())) == len(HF_PARAM_NAMES)
    names = ["embed.weight", "head.weight", "norm.weight", "layers.0.attn.wq_a.weight", "layers.0.attn.q_norm.weight",
             "layers.1.attn.wkv_b.weight", "layers.3.ffn.gate.bias", "layers.3.ffn.experts.7.w3.weight",
             "layers.3.ffn.shared_experts.w2.scale", "layers.2.ffn_norm.weight"]
    for n in names:
        assert official_param_name(hf_param_name(n)) == n
    assert hf_param_name("layers.3.ffn.experts.7.w3.weight") == "model.layers.3.mlp.experts.7.up_proj.weight"


def test_hf_param_names_cover_the_hf_model():
    a = ModelArgs.preset("tiny")
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**a.to_hf_config()))
    for key in model.state_dict():
        assert hf_param_name(official_param_name(key)) == key


def test_embedding_and_head():
    a = ModelArgs.preset("tiny")
    emb, head = Embedding(a), Head(a)
    ids = torch.randint(0, a.vocab_size, (3, 5))
    assert torch.equal(emb(ids), emb.weight[ids])
    h = torch.randn(3, 5, a.dim)
    assert head(h).shape == (3, 5, a.vocab_size) and head(h, last_only=True).shape == (3, a.vocab_size)
    assert torch.allclose(head(h)[:, -1], head(h, last_only=True), atol=1e-6)
    # bad token ids are refused by the model, once per step: test_model.py::test_token_ids_checked_at_the_boundary


# ---- every field has its declared type and every float is finite
FLOAT_FIELDS = ["route_scale", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale", "rms_norm_eps",
                "init_std"]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_fields_must_be_finite(field, value):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}={value!r} is not allowed: it must be a finite number"):
        ModelArgs.preset("tiny", **{field: value})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(gate_bias="no"), "ModelArgs.gate_bias='no' is not allowed: it must be a bool (True or False)"),
        (dict(gate_bias=1), "ModelArgs.gate_bias=1 is not allowed: it must be a bool"),
        (dict(n_layers=4.0), "ModelArgs.n_layers=4.0 is not allowed: it must be an int (not a bool or a float)"),
        (dict(n_dense_layers=True), "ModelArgs.n_dense_layers=True is not allowed: it must be an int"),
        (dict(rope_theta="10000"), "ModelArgs.rope_theta='10000' is not allowed: it must be a finite number (an int "
                                   "or a float, not a bool)"),
        (dict(route_scale=True), "ModelArgs.route_scale=True is not allowed: it must be a finite number"),
        (dict(mscale=None), "ModelArgs.mscale=None is not allowed: it must be a finite number"),
        (dict(rope_factor=10 ** 400), "ModelArgs.rope_factor=1000.* is not allowed: it must be a finite number"),
        (dict(score_func=1), "ModelArgs.score_func=1 is not allowed: choose one of"),
        (dict(scale_fmt=True), "ModelArgs.scale_fmt=True is not allowed: choose one of"),
        (dict(rope_theta=1.0), "ModelArgs.rope_theta=1.0 is not allowed: it must be > 1"),
    ],
)
def test_fields_must_have_their_declared_type(change, message):
    with pytest.raises(ValueError, match=re.escape(message).replace(r"\.\*", ".*")):
        ModelArgs.preset("tiny", **change)


def test_int_and_float_values_stay_accepted():
    """Float fields take ints (the published config.json writes `"rope_theta": 10000`); int fields take only ints."""
    a = ModelArgs.preset("tiny", rope_theta=10000, route_scale=2, mscale=0, beta_fast=32.5, rope_factor=4)
    assert a.rope_theta == 10000 and a.beta_fast == 32.5 and a.mscale == 0


def test_unknown_field_names_are_named():
    with pytest.raises(ValueError, match="ModelArgs.preset: hidden_size=5 is not allowed: ModelArgs has no such field"):
        ModelArgs.preset("tiny", hidden_size=5)
    with pytest.raises(ValueError, match="ModelArgs.replace: n_experts=5 is not allowed"):
        ModelArgs.preset("tiny").replace(n_experts=5)
    with pytest.raises(ValueError, match="from_hf_config: heads=5 is not allowed"):
        ModelArgs.from_hf_config(ModelArgs.preset("tiny").to_hf_config(), heads=5)


# ---- from_hf_config: required keys, the model type, malformed blocks, wrong types
def test_hf_missing_keys_are_all_named():
    d = ModelArgs.preset("tiny").to_hf_config()
    for key in ("hidden_size", "num_hidden_layers", "kv_lora_rank"):
        d.pop(key)
    d["routed_scaling_factor"] = None                                  # a null counts as missing
    with pytest.raises(ValueError) as e:
        ModelArgs.from_hf_config(d)
    msg = str(e.value)
    assert msg.startswith("from_hf_config: a config without hidden_size (ModelArgs.dim), num_hidden_layers "
                          "(ModelArgs.n_layers), routed_scaling_factor (ModelArgs.route_scale), kv_lora_rank "
                          "(ModelArgs.kv_lora_rank) is not allowed")
    yarn = ModelArgs.preset("tiny").to_hf_config()
    del yarn["rope_parameters"]["original_max_position_embeddings"], yarn["rope_parameters"]["rope_theta"]
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_theta or rope_theta \(ModelArgs\.rope_theta\), "
                                         r"rope_parameters\.original_max_position_embeddings"):
        ModelArgs.from_hf_config(yarn)


def test_hf_nullable_keys_keep_their_meaning():
    """q_lora_rank null is the V2-Lite file's 'no query compression'; n_group / topk_group null mean one group."""
    d = ModelArgs.preset("16B").to_hf_config()
    assert d["q_lora_rank"] is None
    d.update(n_group=None, topk_group=None)
    a = ModelArgs.from_hf_config(d, max_seq_len=16384)
    assert a.q_lora_rank == 0 and a.n_expert_groups == 1 and a.n_limited_groups == 1


def test_hf_model_type_must_be_deepseek_v3():
    d = ModelArgs.preset("16B").to_hf_config()
    llama = {**d, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ValueError, match="from_hf_config: model_type='llama' is not allowed: only 'deepseek_v3' "
                                         r"\(DeepseekV3ForCausalLM\) configs.*allow_other_model_type=True"):
        ModelArgs.from_hf_config(llama)
    no_type = {k: v for k, v in d.items() if k != "model_type"}
    with pytest.raises(ValueError, match="model_type=None is not allowed"):
        ModelArgs.from_hf_config(no_type)
    # a DeepSeek-V2 file (softmax routing, no bias) is read when asked for
    v2 = {**d, "model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "greedy"}
    v2.pop("norm_topk_prob")
    a = ModelArgs.from_hf_config(v2, allow_other_model_type=True, max_seq_len=16384)
    assert a == ModelArgs.preset("16B")


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("value", [[["type", "yarn"], ["factor", 40]], "yarn", 40])
def test_hf_malformed_rope_block_is_named(key, value):
    d = ModelArgs.preset("tiny").to_hf_config()
    d.pop("rope_parameters")
    d[key] = value
    with pytest.raises(ValueError, match=rf"from_hf_config: {key}=.* is not allowed: it must be a dict"):
        ModelArgs.from_hf_config(d)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size="256"), "from_hf_config: hidden_size: ModelArgs.dim='256' is not allowed: it must be an int"),
        (dict(hidden_size=0), "from_hf_config: hidden_size: ModelArgs.dim=0 is not allowed: it must be a positive int"),
        (dict(routed_scaling_factor="2.5"), "routed_scaling_factor: ModelArgs.route_scale='2.5' is not allowed"),
        (dict(max_position_embeddings=512.0), "max_position_embeddings: ModelArgs.max_seq_len=512.0 is not allowed"),
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps: ModelArgs.rms_norm_eps=nan is not allowed"),
        (dict(num_nextn_predict_layers="1"), "num_nextn_predict_layers: ModelArgs.n_mtp_layers='1' is not allowed"),
        (dict(topk_method=True), "topk_method=True is not allowed: choose one of"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob='yes' is not allowed: it must be a bool"),
        (dict(quantization_config="fp8"), "quantization_config='fp8' is not allowed: it must be a dict"),
        (dict(rope_theta="10000"),
         "rope_parameters.rope_theta: ModelArgs.rope_theta='10000' is not allowed: it must be a finite number"),
        (dict(factor="4"), "rope_parameters.factor: ModelArgs.rope_factor='4' is not allowed: it must be a finite number"),
        (dict(original_max_position_embeddings=128.5),
         "rope_parameters.original_max_position_embeddings: ModelArgs.original_seq_len=128.5 is not allowed"),
        (dict(mscale="1"), "rope_parameters.mscale: ModelArgs.mscale='1' is not allowed"),
        (dict(beta_fast=[32]), "rope_parameters.beta_fast: ModelArgs.beta_fast=[32] is not allowed"),
    ],
)
def test_hf_wrong_types_name_the_key_and_the_field(change, message):
    d = ModelArgs.preset("tiny").to_hf_config()
    rope = {k: v for k, v in change.items() if k in d["rope_parameters"]}   # keys of the RoPE block
    d = {**d, **{k: v for k, v in change.items() if k not in rope}, "rope_parameters": {**d["rope_parameters"], **rope}}
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelArgs.from_hf_config(d)


def test_hf_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 7168,')                   # cut short
    with pytest.raises(ValueError, match=f"from_hf_config: {tmp_path / 'config.json'} is not valid JSON"):
        ModelArgs.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, which is not allowed: it must hold one JSON object"):
        ModelArgs.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="from_hf_config: config='5' is not allowed: give a config.json"):
        ModelArgs.from_hf_config(5)
