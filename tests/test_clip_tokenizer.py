"""The torch-free CLIP tokenizer against OpenAI's ``clip.tokenize(..., truncate=True)``.

Parity: every string of the reference goldens (31,014 + 38) gives clip's ids, token counts and EOT
positions. Behaviour: the expected ids below were computed once with OpenAI's own
``clip/simple_tokenizer.py`` (github.com/openai/CLIP, ``regex`` 2026.11.19, ftfy 6.3.1, Python 3.11)
and are hard-coded, so these tests need neither ``clip`` nor ``regex``.
"""

import gzip
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from ram_edge.runtime.clip_tokenizer import ClipTokenizer, clip_bpe_path
from ram_edge.tokenizer_files import CLIP_BPE_SHA256

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


def _first_mismatches(texts, got, want, limit=5):
    """The failure message: how many strings differ and the first few, with both values."""
    got, want = np.asarray(got), np.asarray(want)
    rows = np.flatnonzero((got != want).reshape(len(texts), -1).any(axis=1))
    lines = [f"{len(rows)} of {len(texts)} strings differ; first:"]
    for i in rows[:limit]:
        lines.append(f"  [{i}] {texts[i]!r:.160}\n      want {want[i].tolist()}\n      got  {got[i].tolist()}")
    return "\n".join(lines)


# -- golden parity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tokens_golden(reference):
    texts = json.loads((reference / "golden" / "clip_tokens.json").read_text(encoding="utf-8"))["texts"]
    with np.load(reference / "golden" / "clip_tokens.npz") as z:
        return texts, {k: z[k] for k in z.files}


def test_golden_ids_counts_and_eot_index(tok, clip_tokens_golden):
    texts, want = clip_tokens_golden
    assert len(texts) == 31014
    ids, counts = tok(texts, return_counts=True)
    assert ids.shape == (31014, 77) and ids.dtype == np.int32
    assert np.array_equal(ids, want["ids"]), _first_mismatches(texts, ids, want["ids"])
    assert np.array_equal(counts, want["n_tokens"]), _first_mismatches(texts, counts, want["n_tokens"])
    eot_index = ids.argmax(-1)
    assert np.array_equal(eot_index, want["eot_index"]), _first_mismatches(texts, eot_index, want["eot_index"])
    assert (counts > 77).sum() == 4129  # the truncated LLM descriptions: truncation is exercised


def test_golden_token_counts(tok, clip_tokens_golden):
    texts, want = clip_tokens_golden
    counts = tok.token_counts(texts)
    assert counts.dtype == np.int32
    assert np.array_equal(counts, want["n_tokens"]), _first_mismatches(texts, counts, want["n_tokens"])


def test_golden_clip_text_tiny_ids(tok, reference):
    texts = json.loads((reference / "golden" / "clip_text_tiny.json").read_text(encoding="utf-8"))["texts"]
    with np.load(reference / "golden" / "clip_text_tiny.npz") as z:
        want_ids, want_n = z["ids"], z["n_tokens"]
    assert len(texts) == 38
    ids, counts = tok(texts, return_counts=True)
    assert np.array_equal(ids, want_ids), _first_mismatches(texts, ids, want_ids)
    assert np.array_equal(counts, want_n)


# -- odd inputs, expected ids from OpenAI's SimpleTokenizer ------------------------------------------------
ORACLE_CASES = [
    ('empty', '',
     []),
    ('only_whitespace', ' \t\n\u3000\xa0 ',
     []),
    ('html_entity', 'salt &amp; pepper',
     [6611, 261, 8253]),
    ('html_three_levels', '&amp;amp;lt;b&amp;amp;gt; AT&amp;T',  # ftfy unescapes once, clip twice more
     [283, 321, 285, 536, 261, 339]),
    ('html_named_accent', 'caf&eacute; &quot;menu&quot;',
     [15304, 257, 6225, 257]),
    ('html_numeric', '&#39;quoted&#39; &#x1F600; &#28;x',
     [262, 27706, 262, 7334, 343]),
    ('mojibake_utf8_as_cp1252', 'donâ€™t stop Ã©tÃ©',
     [847, 713, 1691, 3459, 39694]),
    ('mojibake_utf8_as_latin1', 'naÃ¯ve cafÃ©',
     [1097, 35689, 563, 15304]),
    ('tabs_newlines', 'A  PHOTO\tOF   A\nCAT!!!',
     [320, 1125, 539, 320, 2368, 995]),
    ('unicode_spaces', '\r\nline\u2028two\u3000three\xa0four\u2009five',
     [1148, 1237, 2097, 2721, 3127]),
    ('emoji', '🐱 👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️',
     [22979, 43722, 25023, 26304, 964, 356, 16223, 1752]),
    ('cjk', '一只猫 東京タワー 한국어',
     [19759, 222, 34517, 103, 163, 234, 360, 48338, 21078, 105, 34941, 2429, 107, 30391, 15197, 250, 31871, 255,
      31625, 368]),
    ('accents', 'Naïve café Straße İstanbul ὈΔΥΣΣΕΎΣ',
     [1097, 35689, 563, 15304, 1894, 127, 253, 324, 328, 16384, 11231, 157, 121, 222, 138, 112, 139, 227, 139, 225,
      139, 225, 138, 113, 139, 235, 139, 480]),
    ('digits', '12345 3.14 1,000 ٣٤ Ⅻ ½ x²',  # one token per digit, Nl / No included
     [272, 273, 274, 275, 276, 274, 269, 272, 275, 272, 267, 271, 271, 271, 149, 352, 149, 353, 158, 227, 375, 33613,
      343, 41175]),
    ('apostrophes', "it's the cat's toy, isn't it? we'll they're I've I'm I'd",
     [585, 568, 518, 2368, 568, 5988, 267, 2923, 713, 585, 286, 649, 1342, 889, 982, 328, 1200, 328, 880, 328, 1896]),
    ('apostrophes_upper', "IT'S THE CAT'S, WE'LL",
     [585, 568, 518, 2368, 568, 267, 649, 1342]),
    ('curly_apostrophe', 'the dog’s bone',  # ftfy uncurls the quote
     [518, 1929, 568, 6195]),
    ('long_s', "it'ſt ſtop",  # clip's re.IGNORECASE: 's matches 'ſ
     [585, 6, 129, 379, 339, 129, 123, 1253]),
    ('literal_eot', '<|endoftext|>',
     [EOT]),
    ('literal_specials_in_words', 'a<|endoftext|>b <|startoftext|>cat',
     [320, EOT, 321, SOT, 2368]),
    ('literal_eot_after_punctuation', 'stop!<|endoftext|>',  # '!<|' is one punctuation run: no special token
     [1691, 0, 27, 347, 40786, 4160, 91, 285]),
    ('literal_eot_upper', '<|ENDOFTEXT|>',
     [EOT]),
    ('literal_sot_long_s', '<|ſtartoftext|>',  # isolated by IGNORECASE, but BPE-encoded: not the special token
     [27, 91, 129, 123, 2002, 6659, 18169, 91, 285]),
    ('ypogegrammeni', 'a\u0345b \u0345',  # U+0345 is matched by none of clip's classes: dropped
     [320, 321]),
    ('zero_width', 'zero\u200bwidth soft\u00adhyphen \ufeffbom',
     [5848, 9844, 23571, 3773, 22618, 1441, 745, 576, 19469]),
    ('control_chars', '\x00\x1b[31mred\x1b[0m a\x1cb a\x07b',
     [736, 3937, 3937]),
    ('unicode17_letters', '\U000323b0\U000323b1 x\U0001e6c0y',  # letters newer than Oniguruma's tables
     [172, 110, 236, 108, 172, 110, 236, 365, 87, 172, 252, 249, 222, 344]),
    ('unicode17_digit', '!\U00011de0!',
     [256, 172, 239, 115, 510, 256]),
    ('mixed_scripts', 'Pokémon ポケモン покемон 포켓몬 pokemon123',
     [22066, 2429, 251, 3909, 109, 2429, 95, 26875, 26302, 20978, 118, 22176, 38018, 20978, 377, 169, 237, 105, 168,
      120, 241, 36311, 361, 9528, 272, 273, 274]),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in ORACLE_CASES], ids=[c[0] for c in ORACLE_CASES])
def test_matches_openai_simple_tokenizer(tok, text, expected):
    assert tok.encode(text) == expected
    row = np.zeros(77, np.int32)
    row[: len(expected) + 2] = [SOT, *expected, EOT]
    np.testing.assert_array_equal(tok(text), row[None])


def test_batch_equals_one_by_one(tok):
    texts = [c[1] for c in ORACLE_CASES]
    batch, counts = tok(texts, return_counts=True)
    np.testing.assert_array_equal(batch, np.concatenate([tok(t) for t in texts]))
    np.testing.assert_array_equal(counts, [len(c[2]) + 2 for c in ORACLE_CASES])
    np.testing.assert_array_equal(tok.token_counts(texts), counts)


def test_empty_string_is_start_and_end(tok):
    ids = tok("")
    assert ids.shape == (1, 77)
    assert ids[0, :2].tolist() == [SOT, EOT] and not ids[0, 2:].any()
    assert tok.token_counts([""]).tolist() == [2]


# -- truncation and shapes ---------------------------------------------------------------------------------
def test_truncation_keeps_the_end_token(tok):
    ids, counts = tok(["cat " * 100, "a cat"], return_counts=True)
    assert counts.tolist() == [102, 4]
    assert ids[0].tolist() == [SOT] + [2368] * 75 + [EOT]  # clip: tokens[:77], last replaced by EOT
    assert ids.argmax(-1).tolist() == [76, 3]


def test_truncate_false_raises_naming_the_text(tok):
    with pytest.raises(ValueError, match=r"texts\[1\] is 102 tokens.*context length 77.*'cat cat"):
        tok(["fine", "cat " * 100], truncate=False)
    assert tok(["cat " * 75], truncate=False)[0, -1] == EOT  # exactly 77 tokens fit


def test_context_length(tok):
    assert tok("a photo of a cat", context_length=5).tolist() == [[SOT, 320, 1125, 539, EOT]]
    assert tok("a photo of a cat", context_length=2).tolist() == [[SOT, EOT]]
    short = ClipTokenizer(context_length=16)
    assert short.context_length == 16 and short(["a", "b"]).shape == (2, 16)
    for bad, error in ((1, ValueError), (0, ValueError), ("77", TypeError), (True, TypeError), (7.0, TypeError)):
        with pytest.raises(error, match="context_length"):
            tok("a", context_length=bad)
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(context_length=1)


def test_shapes_and_input_kinds(tok):
    assert tok("a cat").shape == (1, 77)
    assert tok([]).shape == (0, 77) and tok([]).dtype == np.int32
    assert tok.token_counts([]).shape == (0,)
    expected = tok(["a cat", "dog"])
    np.testing.assert_array_equal(tok(("a cat", "dog")), expected)
    np.testing.assert_array_equal(tok(np.array(["a cat", "dog"])), expected)  # numpy str_ entries
    np.testing.assert_array_equal(tok(t for t in ["a cat", "dog"]), expected)


def test_type_errors_name_the_entry(tok):
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        tok(["a", "b", 3])
    with pytest.raises(TypeError, match=r"texts\[0\] is NoneType"):
        tok.token_counts([None])
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        tok(["a", b"b"])
    for bad in (b"bytes", None, 5):
        with pytest.raises(TypeError, match="texts must be a str or a sequence of str"):
            tok(bad)
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(["a list"])


# -- clean-up, decode, properties ---------------------------------------------------------------------------
def test_clean_is_clips_clean_up(tok):
    assert tok.clean("  A&amp;amp;B\t\t C\u3000ÃŸ\n") == "a&b c ß"
    # expected values from clip's whitespace_clean(basic_clean(text)).lower()
    assert tok.clean("\x1c\x1dA\x1cB x&#28;y") == "ab xy"
    assert tok.clean("İ") == "i\u0307"
    assert tok.clean("ﬁ ＡＢＣ") == "fi abc"
    assert tok.clean("") == ""


def test_decode_is_clips_decode(tok):
    ids = tok("Hello, World! naïve 猫")[0]
    assert tok.decode(ids[: int(ids.argmax()) + 1]) == "<|startoftext|>hello , world ! naïve 猫 <|endoftext|>"
    assert tok.decode([0, 256, SOT, EOT, 187, 188]) == "!! <|startoftext|><|endoftext|>\ufffd\x00"
    assert tok.decode([]) == ""
    text = "a photo of a cat."
    assert tok.decode(tok.encode(text)) == "a photo of a cat . "
    with pytest.raises(ValueError, match="49408 is outside the vocabulary"):
        tok.decode([320, 49408])
    with pytest.raises(ValueError, match="-1 is outside"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ids must be integers"):
        tok.decode(["a"])


def test_properties(tok):
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size, tok.context_length) == (SOT, EOT, 49408, 77)


# -- the packaged BPE file ------------------------------------------------------------------------------------
def test_packaged_bpe_file_with_its_licence():
    path = clip_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CLIP_BPE_SHA256
    assert "MIT License" in (path.parent / "LICENSE").read_text() and "OpenAI" in (path.parent / "LICENSE").read_text()
    assert CLIP_BPE_SHA256 in (path.parent / "NOTICE.md").read_text()


def test_explicit_bpe_path_equals_the_packaged_one(tok, reference):
    other = ClipTokenizer(reference / "tokenizers" / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    texts = ["a photo of a cat.", "Naïve café 🐱"]
    np.testing.assert_array_equal(other(texts), tok(texts))


def test_bad_bpe_file_is_a_clear_error(tmp_path):
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("hello")
    with pytest.raises(ValueError, match="cannot read CLIP BPE merges"):
        ClipTokenizer(not_gzip)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="not CLIP's BPE merge file"):
        ClipTokenizer(short)
    with pytest.raises(ValueError, match="cannot read"):
        ClipTokenizer(tmp_path / "missing.txt.gz")


def test_imports_neither_torch_nor_regex():
    code = ("import sys\n"
            "for m in ('torch', 'regex', 'clip', 'transformers'): sys.modules[m] = None\n"
            "from ram_edge.runtime.clip_tokenizer import ClipTokenizer\n"
            "print(ClipTokenizer()('a cat')[0, :4].tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[{SOT}, 320, 2368, {EOT}]"
