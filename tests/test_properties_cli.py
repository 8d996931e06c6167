"""Property-based tests (hypothesis) of the inputs a user hands the package: tokenizer files, token files and the
`dsv3-lite` flags. Whatever the input, the outcome is valid behaviour or one of the package's clear errors: a
ValueError or FileNotFoundError whose message names the file, and for the command line exit status 2 or 3 with one
stderr line `dsv3-lite <command>: error: ...`, never another exception or a traceback. No example trains: the
command-line examples point at data and checkpoints that do not exist, so every valid flag ends in status 3."""

import atexit
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3_lite.cli import main
from dsv3_lite.data.tokens import HEADER_BYTES, TokenFile, load_splits
from dsv3_lite.tokenizer import BPETokenizer

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALAR = st.none() | st.booleans() | st.integers(-3, 3000) | st.floats(allow_nan=False) | st.text(max_size=6)
JSON = st.recursive(SCALAR,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
MISSING = object()
TMP = Path(tempfile.mkdtemp(prefix="dsv3_lite_properties_"))
atexit.register(shutil.rmtree, TMP, True)


# --- tokenizer files -------------------------------------------------------------------------------------------------

SMALL = BPETokenizer.train("To be, or not to be, that is the question. " * 20, 256 + 3 + 24,
                           special_tokens=["<s>", "</s>", "<pad>"])
SMALL.save(TMP / "small.json")
SPEC = json.loads((TMP / "small.json").read_text(encoding="utf-8"))


def _paths(d, prefix=()):
    """The (keys and indices) of every value inside a JSON document, except inside the long vocab and merges."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield (*prefix, k)
        if k not in ("vocab", "merges"):
            yield from _paths(v, (*prefix, k))


PATHS = [*_paths(SPEC), ("model", "vocab", "a"), ("model", "vocab", "<s>"), ("model", "merges", 0),
         ("model", "merges", 5)]


def _edited(edits) -> dict:
    """SPEC with each (path, value) applied: the value set (MISSING: the key removed) where the path still exists."""
    d = json.loads(json.dumps(SPEC))
    for path, value in edits:
        *parents, last = path
        node = d
        for k in parents:
            node = node[k] if isinstance(node, (dict, list)) and _has(node, k) else None
        if isinstance(node, (dict, list)) and (_has(node, last) or isinstance(node, dict) and value is not MISSING):
            if value is MISSING:
                del node[last]
            else:
                node[last] = value
    return d


def _has(node, key) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and key < len(node)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON | st.just(MISSING)), min_size=1, max_size=3))
def test_any_tokenizer_file_loads_or_names_the_problem(edits):
    """Fields removed, replaced by any JSON value or of the wrong type: the file loads and round-trips text, or a
    ValueError names the file and the field."""
    path = TMP / "edited.json"
    path.write_text(json.dumps(_edited(edits)), encoding="utf-8")
    try:
        tok = BPETokenizer.from_file(path)
    except ValueError as e:
        assert str(e).startswith(f"tokenizer file {path}") and "\n" not in str(e), e
        return
    assert sorted(tok.vocab) == list(range(tok.vocab_size))                # dense ids: prepare can store them
    text = "To be, or not to be? <s> x"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text


@SETTINGS
@given(JSON)
def test_any_json_document_as_a_tokenizer_file(doc):
    path = TMP / "any.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=f"tokenizer file {path}"):
        BPETokenizer.from_file(path)


# --- token files -----------------------------------------------------------------------------------------------------

GOOD = {"format": "dsv3_lite.tokens", "version": 1, "dtype": "uint16", "count": 40, "vocab_size": 300,
        "tokenizer": None, "tokenizer_sha256": None, "separator_id": None,
        "inputs": [{"path": "a.txt", "bytes": 100, "chars": 100, "tokens": 40}]}
HEADER_KEYS = [*GOOD, "extra"]


@settings(SETTINGS, max_examples=300)
@given(edits=st.dictionaries(st.sampled_from(HEADER_KEYS), JSON | st.just(MISSING), max_size=3),
       cut=st.just(0) | st.integers(-100, 100),
       garble=st.none() | st.tuples(st.integers(0, 200), st.binary(max_size=8)))
def test_any_token_file_maps_or_names_the_problem(edits, cut, garble):
    """Header fields edited, the ids cut short or extended, bytes of the header overwritten: TokenFile maps the file
    and its properties work, or a ValueError names the file."""
    header = {k: v for k, v in {**GOOD, **edits}.items() if v is not MISSING}
    raw = json.dumps(header).encode()[:HEADER_BYTES - 1].ljust(HEADER_BYTES - 1) + b"\n"
    ids = np.arange(40, dtype=np.uint16).tobytes()
    data = raw + (ids[:len(ids) + cut] if cut < 0 else ids + b"\0" * cut)
    if garble is not None:
        at, junk = garble
        data = data[:at] + junk + data[at + len(junk):]
    folder = TMP / "tokens"
    folder.mkdir(exist_ok=True)
    path = folder / "train.bin"
    path.write_bytes(data)
    try:
        tf = TokenFile(path)
    except ValueError as e:
        assert str(e).startswith(f"TokenFile: {path}"), e
        return
    assert len(tf) == tf.header["count"] and tf.tokens.dtype == np.dtype(tf.header["dtype"])
    assert isinstance(tf.chars_per_token, float)
    try:
        train, val, _ = load_splits(folder)
    except ValueError as e:
        assert "load_splits" in str(e) or str(e).startswith("TokenFile"), e
        return
    assert len(train) + len(val) == len(tf)


# --- the command line ------------------------------------------------------------------------------------------------

NUMERIC = {"train": ["--minutes", "--steps", "--warmup", "--seq-len", "--batch-size", "--lr", "--min-lr", "--seed",
                     "--eval-every", "--ckpt-every", "--threads"],
           "generate": ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--threads"],
           "prepare": ["--workers"]}
NUMERIC["demo"] = NUMERIC["train"]
VALUE = (st.integers(-5, 3000).map(str) | st.floats(allow_nan=True, allow_infinity=True).map(str)
         | st.sampled_from(["0", "1", "1e-3", "0.5", "2**3", "", "x", "1_000", "-0", "1e999", "nan", "-inf"]))
NOWHERE = TMP / "does" / "not" / "exist"


def _required(command: str) -> list[str]:
    """Flags that make the command fail fast on a path that does not exist, after its flags were checked."""
    return {"train": ["--data", str(NOWHERE), "--out", str(TMP / "out"), "--quiet"],
            "demo": ["--data", str(NOWHERE), "--out", str(TMP / "out"), "--quiet"],
            "generate": ["--prompt", "ROMEO:", "--checkpoint", str(NOWHERE / "checkpoint.safetensors")],
            "prepare": ["--input", str(NOWHERE / "a.txt"), "--tokenizer", str(NOWHERE / "t.json"), "--out",
                        str(TMP / "prepared")]}[command]


@pytest.fixture(autouse=True, scope="module")
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@SETTINGS
@given(data=st.data(), command=st.sampled_from(sorted(NUMERIC)))
def test_any_flags_give_status_2_or_3_and_one_line(data, command):
    flags = data.draw(st.lists(st.sampled_from(NUMERIC[command]), max_size=4, unique=True))
    argv = [command, *_required(command)]
    for flag in flags:
        argv += [f"{flag}={data.draw(VALUE)}"]
    err = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(argv)
            except SystemExit as e:                      # argparse: a flag out of range
                status = e.code
    finally:
        torch.set_num_threads(threads)
    lines = err.getvalue().splitlines()
    assert status in (2, 3), (argv, status, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith(f"dsv3-lite {command}: error: "), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
