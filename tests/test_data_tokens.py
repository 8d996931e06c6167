"""Token files (dsv3_lite.data.tokens, notebook 10): streaming, exact ids, parallel workers, bounded memory."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dsv3_lite.data import prepare, shakespeare
from dsv3_lite.data.corpus import SHAKESPEARE_TOKENIZER_FILE, shakespeare_tokenizer
from dsv3_lite.data.tokens import HEADER_BYTES, TokenFile, eval_windows, sample_windows, shakespeare_tokens, text_chunks
from dsv3_lite.tokenizer import BPETokenizer

TOK = str(SHAKESPEARE_TOKENIZER_FILE)


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def text():
    return shakespeare()[:300_000]


@pytest.mark.parametrize("chunk_bytes", [1024, 4093, 50_000])
def test_chunks_cover_the_file_and_keep_the_ids(tmp_path, tok, text, chunk_bytes):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    pieces = list(text_chunks(f, chunk_bytes))
    assert b"".join(raw for _, raw in pieces) == f.read_bytes()
    assert [o for o, _ in pieces] == list(np.cumsum([0] + [len(r) for _, r in pieces[:-1]]))
    assert [i for _, raw in pieces for i in tok.encode(raw.decode())] == tok.encode(text)


def test_chunks_without_safe_cut_respect_utf8(tmp_path):
    f = tmp_path / "u.txt"
    f.write_bytes(("é€ 1 " * 5000).encode())          # no line starts with a letter, no newline at all
    pieces = list(text_chunks(f, 1024))
    assert len(pieces) > 1 and b"".join(r for _, r in pieces) == f.read_bytes()
    for _, raw in pieces:
        raw.decode("utf-8")                             # every piece is whole characters


def test_prepare_header_ids_and_atomic_output(tmp_path, tok, text):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    out = prepare([f], TOK, tmp_path / "out", name="x", workers=1, chunk_bytes=8192, progress=False)
    tf = TokenFile(out)
    assert tf.header["dtype"] == "uint16" and tf.header["count"] == len(tf)
    assert np.array_equal(tf.tokens, tok.encode(text))
    assert tf.header["inputs"][0]["chars"] == len(text) and tf.header["tokenizer"].endswith("shakespeare_tokenizer.json")
    assert out.stat().st_size == HEADER_BYTES + 2 * len(tf)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.bin"]   # no temporary files left


def test_parallel_equals_sequential_with_separator(tmp_path, tok, text):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:120_000], encoding="utf-8")
    b.write_text(text[120_000:], encoding="utf-8")
    par = TokenFile(prepare([a, b], TOK, tmp_path, name="par", workers=2, chunk_bytes=4096, progress=False))
    seq = TokenFile(prepare([a, b], TOK, tmp_path, name="seq", workers=1, chunk_bytes=4096, progress=False))
    expected = tok.encode(text[:120_000]) + [1] + tok.encode(text[120_000:])
    assert np.array_equal(par.tokens, expected) and np.array_equal(seq.tokens, expected)
    assert [s["tokens"] for s in par.header["inputs"]] == [len(expected) - 1 - len(tok.encode(text[120_000:])),
                                                           len(tok.encode(text[120_000:]))]


def test_uint32_for_large_vocabularies(tmp_path):
    base = shakespeare_tokenizer()
    vocab = dict(base.vocab)
    vocab.update({i: b"\xff\xfe" + i.to_bytes(4, "little") for i in range(len(vocab), 70_000)})  # unreachable tokens
    big = BPETokenizer(vocab, base.merges, base.special_tokens)
    f = tmp_path / "t.txt"
    f.write_text("ROMEO:\nWhat light\n", encoding="utf-8")
    tf = TokenFile(prepare([f], big, tmp_path, workers=1, progress=False))
    assert tf.header["dtype"] == "uint32" and tf.tokens.dtype == np.uint32
    assert tf.tokens.tolist() == base.encode("ROMEO:\nWhat light\n")


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare([tmp_path / "nope.txt"], TOK, tmp_path)
    with pytest.raises(ValueError, match="inputs=\\[\\]"):
        prepare([], TOK, tmp_path)
    f = tmp_path / "t.txt"
    f.write_text("hello\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        prepare([f], tmp_path / "missing.json", tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 10 + b"\xff\xfe broken")
    with pytest.raises(ValueError, match="not UTF-8 text: invalid byte at offset 100"):
        prepare([bad], TOK, tmp_path / "o", name="bad", progress=False)
    assert not any((tmp_path / "o").iterdir())                # neither the output nor a temporary file
    with pytest.raises(ValueError, match="not a dsv3_lite token file"):
        TokenFile(bad)



def _token_file(path, header: dict, ids=()) -> str:
    """Write a token file by hand: `header` as the JSON header, then `ids` as uint16."""
    raw = json.dumps(header).encode()
    path.write_bytes(raw.ljust(HEADER_BYTES - 1) + b"\n" + np.asarray(ids, dtype=np.uint16).tobytes())
    return str(path)


GOOD = {"format": "dsv3_lite.tokens", "version": 1, "dtype": "uint16", "count": 3, "inputs": []}


@pytest.mark.parametrize("edit, ids, message", [
    ({"format": "other.tokens"}, [1, 2, 3], "not a dsv3_lite token file: header format = 'other.tokens', expected "
                                            "'dsv3_lite.tokens'"),
    ({"format": None}, [1, 2, 3], "header format = None"),
    ({"dtype": "int64"}, [1, 2, 3], "header dtype = 'int64' is not allowed: 'uint16' or 'uint32'"),
    ({"count": -1}, [], r"header count = -1 is not allowed: an int >= 0"),
    ({"count": "3"}, [1, 2, 3], r"header count = '3' is not allowed"),
    ({"inputs": None}, [1, 2, 3], "header inputs = None is not allowed: a list"),
    ({}, [1, 2], "has 4,100 bytes, but its header promises 3 uint16 ids \\(4,102 bytes with the header\\): the file "
                 "was truncated"),
    ({"inputs": [7]}, [1, 2, 3], r"header inputs\[0\] = 7 is not allowed: a dict"),
    ({"inputs": [{"chars": -1}]}, [1, 2, 3], r"header inputs\[0\].chars = -1 is not allowed: an int >= 0"),
    ({"inputs": [{"tokens": "3"}]}, [1, 2, 3], r"header inputs\[0\].tokens = '3' is not allowed: an int >= 0"),
    ({"tokenizer": 5}, [1, 2, 3], r"header tokenizer = 5 is not allowed: a path \(str\) or null"),
    ({"tokenizer_sha256": []}, [1, 2, 3], r"header tokenizer_sha256 = \[\] is not allowed: a str or null"),
    ({"vocab_size": 0}, [1, 2, 3], r"header vocab_size = 0 is not allowed: an int >= 1"),
    ({"vocab_size": 70_000}, [1, 2, 3], r"header vocab_size = 70000 is not allowed: a uint16 file holds ids < 65,536"),
])
def test_header_errors_name_the_file_and_the_field(tmp_path, edit, ids, message):
    path = _token_file(tmp_path / "t.bin", {**GOOD, **edit}, ids)
    with pytest.raises(ValueError, match=message) as e:
        TokenFile(path)
    assert str(e.value).startswith(f"TokenFile: {path}")
    assert TokenFile(_token_file(tmp_path / "ok.bin", GOOD, [1, 2, 3])).tokens.tolist() == [1, 2, 3]


def test_header_not_json(tmp_path):
    for name, raw in [("short.bin", b"\x00" * 10), ("list.bin", b"[1, 2]".ljust(HEADER_BYTES)),
                      ("binary.bin", b"\xff\xfe" * HEADER_BYTES)]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=f"TokenFile: .*{name} is not a dsv3_lite token file \\(no "
                                              "'dsv3_lite.tokens' JSON header in its first 4096 bytes\\)"):
            TokenFile(tmp_path / name)


def test_truncated_inside_the_header_says_so(tmp_path):
    path = _token_file(tmp_path / "t.bin", GOOD, [1, 2, 3])
    with open(path, "r+b") as f:
        f.truncate(50)
    with pytest.raises(ValueError, match=f"TokenFile: {path} is not a dsv3_lite token file .*: it has only 50 bytes, "
                                         "less than the header, so it was truncated"):
        TokenFile(path)


def test_header_checked_under_python_O(tmp_path):
    """`python -O` removes asserts: the header checks must not be asserts."""
    wrong_magic = _token_file(tmp_path / "magic.bin", {**GOOD, "format": "other.tokens"}, [1, 2, 3])
    truncated = _token_file(tmp_path / "cut.bin", GOOD, [1])
    code = textwrap.dedent("""
        import sys
        from dsv3_lite.data.tokens import TokenFile
        print("optimize", sys.flags.optimize)
        for path in sys.argv[1:]:
            try:
                TokenFile(path)
                print("accepted", path)
            except ValueError as e:
                print("refused", e)
    """)
    r = subprocess.run([sys.executable, "-O", "-c", code, wrong_magic, truncated], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "optimize 1"
    assert lines[1].startswith(f"refused TokenFile: {wrong_magic} is not a dsv3_lite token file: header format")
    assert lines[2].startswith(f"refused TokenFile: {truncated} has 4,098 bytes")

def test_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = sample_windows(tokens, 5, 17, g1)
    assert x.shape == y.shape == (5, 17) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(sample_windows(tokens, 5, 17, g2)[0], x)
    ex, ey = eval_windows(tokens, 4, 10)
    starts = torch.tensor([0, 329, 659, 989])                  # linspace(0, 1000 - 11, 4), rounded down
    assert ex.dtype == torch.int64 and torch.equal(ex, starts[:, None] + torch.arange(10)) and torch.equal(ey, ex + 1)
    assert ex[0, 0] == 0 and ey[-1, -1] == 999                 # the first and the last token are both used
    with pytest.raises(ValueError, match="not enough"):
        sample_windows(tokens[:10], 1, 10, g1)


def test_eval_windows_needs_one_window():
    tokens = np.arange(11, dtype=np.uint16)
    x, y = eval_windows(tokens, 3, 10)                         # exactly one window: every start is 0
    assert torch.equal(x, torch.arange(10).expand(3, 10)) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match=r"eval_windows: 10 tokens are not enough for one window of seq_len \+ 1 = 11"):
        eval_windows(tokens[:10], 3, 10)


def test_shakespeare_prepared_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_LITE_CACHE", str(tmp_path))
    train, val = shakespeare_tokens()
    stamp = (tmp_path / "shakespeare" / "train.bin").stat().st_mtime_ns
    train2, val2 = shakespeare_tokens()
    assert (tmp_path / "shakespeare" / "train.bin").stat().st_mtime_ns == stamp
    assert len(train) == len(train2) > 500_000 and len(val) > 50_000 and 2.5 < val.chars_per_token < 3.5


BIG = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from dsv3_lite.data import prepare
    from dsv3_lite.data.tokens import TokenFile
    from dsv3_lite.data.corpus import SHAKESPEARE_TOKENIZER_FILE
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    line = ("ROMEO" + "and" * 330 + "\\n").encode()        # one long word per line: cheap to encode, 1 KB
    block = line * 1024
    with open(src, "wb") as f:
        for _ in range(300):                                 # 300 MB, written without holding it
            f.write(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    tf = TokenFile(prepare([src], str(SHAKESPEARE_TOKENIZER_FILE), out, workers=1, progress=False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bytes": src.stat().st_size, "count": len(tf), "head": tf.tokens[:8].tolist(),
                      "tail": tf.tokens[-8:].tolist(), "grew_mb": (peak - before) / 1024, "s": time.time() - t0}))
""")


def test_prepare_large_file_with_flat_memory(tmp_path, tok):
    """A 300 MB file goes through with the process's peak memory growing by far less than the file size."""
    r = subprocess.run([sys.executable, "-c", BIG, str(tmp_path / "big.txt"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    per_line = tok.encode("ROMEO" + "and" * 330 + "\n")
    assert res["bytes"] == 300 * 1024 * len("ROMEO" + "and" * 330 + "\n")
    assert res["count"] == 300 * 1024 * len(per_line)
    assert res["head"] == per_line[:8] and res["tail"] == per_line[-8:]
    assert res["grew_mb"] < 120, res                           # the file is 300 MB, the ids 2 x 100M bytes
