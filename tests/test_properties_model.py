"""Property-based tests (hypothesis) of the model's input boundary: `ModelArgs`, `ModelArgs.from_hf_config`, the
model's step (`Transformer.forward` on a KV cache) and `generate`'s arguments.

For any input the outcome is either valid behaviour or one of the package's clear errors: a `ValueError` whose
message starts with the function that refused it and names what is wrong ("... is not allowed: ..."), never another
exception type (a `TypeError` from a comparison, a `RuntimeError` from deep inside PyTorch, a `KeyError`).
`pytest --hypothesis-show-statistics` shows the share of examples accepted and refused (the strategies draw mostly
valid values, so that both outcomes are exercised)."""

import dataclasses
import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dsv3_lite.config import HF_CONFIG_NAMES, ModelArgs, param_counts
from dsv3_lite.generation import generate
from dsv3_lite.model import Transformer

FIELDS = {f.name: f.type for f in dataclasses.fields(ModelArgs)}
TINY = ModelArgs.preset("tiny")

# values a careless caller or a hand-edited config.json may hold: the right type and the wrong ones
garbage = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "yes", "no", "10000", "sigmoid", "fp8", "absorb", "ue8m0", "nan"]),
    st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.sampled_from(["a", "type"]), st.integers(), max_size=1))


def near(value):
    """Mostly valid values close to `value` (so that a fair share of examples builds a config), some invalid ones."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.sampled_from([value, max(value // 2, 1), 2 * value]) | st.integers(-1, 2 * value + 1)
    if isinstance(value, float):
        return st.sampled_from([value, 2 * value]) | st.floats(0.5, 4 * value + 4) | \
            st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0])
    return st.sampled_from(["softmax", "sigmoid", "bf16", "fp8", "naive", "absorb", "ue8m0", None])


def field_changes(base: ModelArgs):
    """{field: value} for one field of `base`: three times in four a value near the current one, else garbage."""
    return st.sampled_from(sorted(FIELDS)).flatmap(
        lambda k: st.tuples(st.just(k), near(getattr(base, k)) | near(getattr(base, k)) | near(getattr(base, k))
                            | garbage)).map(lambda kv: {kv[0]: kv[1]})


def merged(dicts: list[dict]) -> dict:
    return {k: v for d in dicts for k, v in d.items()}


def refused(e: ValueError, where: str) -> None:
    """The error is one of ours: it says who refused it and what is not allowed."""
    msg = str(e)
    event("refused")
    assert msg.startswith(where), msg
    assert "is not allowed" in msg or "must be" in msg, msg


def well_formed(a: ModelArgs) -> None:
    """What validation promises about an accepted config: every field of its declared type, every float finite."""
    event("accepted")
    for name, kind in FIELDS.items():
        v = getattr(a, name)
        if kind == "bool":
            assert isinstance(v, bool), (name, v)
        elif kind == "int":
            assert isinstance(v, int) and not isinstance(v, bool), (name, v)
        elif kind == "float":
            assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), (name, v)
    assert math.isfinite(a.softmax_scale) and a.softmax_scale > 0
    assert all(isinstance(n, int) and n >= 0 for n in param_counts(a).values())


@settings(max_examples=300, deadline=None)
@given(st.lists(field_changes(TINY), min_size=1, max_size=3).map(merged))
def test_model_args_preset_with_any_change(change):
    try:
        a = ModelArgs.preset("tiny", **change)
    except ValueError as e:
        refused(e, "ModelArgs.")
        assert str(e).split("=", 1)[0].removeprefix("ModelArgs.") in FIELDS   # it names a field
    else:
        well_formed(a)


@settings(max_examples=150, deadline=None)
@given(st.lists(field_changes(ModelArgs()), min_size=1, max_size=4).map(merged))
def test_model_args_from_any_fields(fields):
    try:
        a = ModelArgs(**fields)
    except ValueError as e:
        refused(e, "ModelArgs.")
    else:
        well_formed(a)


HF = TINY.to_hf_config()
HF_KEYS = sorted(HF)
ROPE_KEYS = sorted(HF["rope_parameters"])
REQUIRED = sorted(k for k in HF_CONFIG_NAMES.values() if "." not in k and k not in
                  ("scoring_func", "topk_method", "num_nextn_predict_layers", "initializer_range",
                   "q_lora_rank", "n_group", "topk_group"))


@settings(max_examples=200, deadline=None)
@given(drop=st.sets(st.sampled_from(HF_KEYS), max_size=3), change=st.dictionaries(st.sampled_from(HF_KEYS), garbage,
       max_size=2), rope_drop=st.sets(st.sampled_from(ROPE_KEYS), max_size=2),
       rope_change=st.dictionaries(st.sampled_from(ROPE_KEYS), garbage, max_size=2),
       extra=st.dictionaries(st.text(max_size=6), garbage, max_size=2), allow=st.booleans())
def test_from_hf_config_with_missing_extra_and_wrong_keys(drop, change, rope_drop, rope_change, extra, allow):
    d = {**extra, **{k: v for k, v in HF.items() if k not in drop}, **change}
    if isinstance(d.get("rope_parameters"), dict):
        d["rope_parameters"] = {**{k: v for k, v in d["rope_parameters"].items() if k not in rope_drop}, **rope_change}
    try:
        a = ModelArgs.from_hf_config(d, allow_other_model_type=allow)
    except ValueError as e:
        refused(e, "from_hf_config: ")
    else:
        well_formed(a)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(REQUIRED), min_size=1))
def test_from_hf_config_names_every_missing_key(drop):
    with pytest.raises(ValueError) as e:
        ModelArgs.from_hf_config({k: v for k, v in HF.items() if k not in drop})
    assert all(f"{k} (ModelArgs." in str(e.value) for k in drop), str(e.value)


# ---- the model and generate, on one very small model built once
SMALL = TINY.replace(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_heads=2, q_lora_rank=16,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=16,
                     original_seq_len=8, max_batch_size=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(SMALL).eval()


V = SMALL.vocab_size
ids = st.lists(st.integers(0, V - 1), min_size=1, max_size=6)                 # a valid prompt
bad_token = st.one_of(st.integers(-2, -1), st.integers(V, V + 2), st.booleans(), st.floats(-1, 70), st.none(),
                      st.just("7"))
bad_prompt = st.one_of(ids.flatmap(lambda p: st.tuples(st.integers(0, len(p) - 1), bad_token).map(
    lambda ib: p[:ib[0]] + [ib[1]] + p[ib[0] + 1:])), st.just([]), st.text(max_size=3), st.integers(0, 5))
bad_number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3), st.booleans(), st.none(),
                       st.just("0.7"))


def mostly(valid, invalid):
    """Three times in four a valid value: each argument can fail on its own while the others are fine."""
    return valid | valid | valid | invalid


@settings(max_examples=80, deadline=None)
@given(prompts=mostly(st.lists(ids, min_size=1, max_size=3),
                      st.lists(mostly(ids, bad_prompt), max_size=3) | st.none() | st.text(max_size=2)),
       max_new_tokens=mostly(st.integers(1, 8), st.integers(-1, 0) | st.integers(11, 30) | st.floats(0, 4)
                             | st.booleans() | st.none()),
       temperature=mostly(st.just(0.0) | st.floats(0.1, 2), bad_number),
       top_p=mostly(st.just(1.0) | st.floats(0.05, 1), bad_number),
       eos_id=mostly(st.none() | st.integers(0, V - 1), st.integers(-2, -1) | st.just(V) | st.floats(0, 5)
                     | st.booleans()))
def test_generate_with_any_arguments(model, prompts, max_new_tokens, temperature, top_p, eos_id):
    try:
        out = generate(model, prompts, max_new_tokens, temperature, top_p, eos_id,
                       generator=torch.Generator().manual_seed(0))
    except ValueError as e:
        refused(e, "generate: ")
    else:
        event("generated")
        assert isinstance(out, list) and len(out) == len(prompts)
        for new in out:
            assert 1 <= len(new) <= max_new_tokens
            assert all(isinstance(t, int) and 0 <= t < SMALL.vocab_size for t in new)
            assert eos_id not in new[:-1]                                 # cut after the first EOS
    assert model.layers[0].attn.cache_shape is None                        # the cache is freed either way


@settings(max_examples=80, deadline=None)
@given(prefill=st.integers(0, 6), dtype=mostly(st.just(torch.int64) | st.just(torch.int32),
                                               st.sampled_from([torch.float32, torch.bool, torch.int8])),
       shape=mostly(st.tuples(st.integers(1, 2), st.integers(1, 4)), st.tuples(st.integers(0, 3), st.integers(0, 4))),
       high=mostly(st.just(SMALL.vocab_size), st.integers(1, SMALL.vocab_size + 2)), data=st.data())
def test_a_cache_step_with_any_tokens_and_position(model, prefill, dtype, shape, high, data):
    start_pos = data.draw(mostly(st.integers(0, prefill), st.integers(-2, 14) | st.floats(0, 4) | st.none()))
    torch.manual_seed(0)
    with torch.no_grad():
        model.setup_cache(2, 12)
        if prefill:
            model(torch.randint(0, SMALL.vocab_size, (2, prefill)), 0)
        tokens = torch.randint(0 if high == SMALL.vocab_size else -1, high, shape).to(dtype)
        try:
            logits = model(tokens, start_pos)
        except ValueError as e:
            refused(e, "Transformer: ")
        else:                                   # only an in-range, contiguous, integer step gets here
            event("stepped")
            assert logits.shape == (*shape, SMALL.vocab_size) and torch.isfinite(logits).all()
            assert 0 <= start_pos <= prefill and model.n_cached == start_pos + shape[1]
        finally:
            model.reset_cache()
