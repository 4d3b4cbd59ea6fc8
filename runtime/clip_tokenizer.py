"""OpenAI CLIP's tokenizer without torch, ``regex`` or ``clip``: token for token ``clip.tokenize(..., truncate=True)``.

    from ram_edge.runtime.clip_tokenizer import ClipTokenizer
    tok = ClipTokenizer()
    ids = tok(["a photo of a cat.", "a dog"])   # int32 (2, 77): <|startoftext|> BPE ids <|endoftext|> 0 ...

OpenAI's ``SimpleTokenizer`` does four things; here each is done the same way:

1. clean-up in Python, step for step: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip()``, runs of
   whitespace -> one space, ``strip()``, ``lower()``;
2. pre-tokenization by its regex, run by the ``tokenizers`` library (Oniguruma) instead of the
   ``regex`` package. The pattern is rewritten so that both engines split identically (see
   :data:`PRE_TOKENIZE_PATTERN`);
3. the byte -> unicode mapping (``tokenizers``' ``ByteLevel``, the same GPT-2 table as CLIP's);
4. BPE with CLIP's merges and ``</w>`` end-of-word suffix (``tokenizers``' ``BPE``, batched in Rust;
   it merges the lowest-ranked pair first, leftmost first, as CLIP's loop does).

Literal ``<|startoftext|>`` / ``<|endoftext|>`` in a text become the special ids exactly where CLIP's
regex isolates them (not after punctuation, e.g. ``"!<|endoftext|>"``); the library's added-token
matching would find them everywhere, so those few texts take a short path in Python
(``ClipTokenizer._encode_with_specials``).

Equality with OpenAI's tokenizer was checked on the 31,014 strings of the reference goldens and on
63,281 fuzzed and enumerated strings against ``clip/simple_tokenizer.py`` (``regex`` 2026.11, Unicode 17.0;
tokenizers 0.15.2 and 0.23.3, ftfy 6.1.1 and 6.3.1). ``lower()`` and ftfy's NFC use the interpreter's
Unicode tables, on both sides alike.
"""

from __future__ import annotations

import gzip
import html
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from ram_edge.tokenizer_files import clip_bpe_path

__all__ = ["ClipTokenizer", "PRE_TOKENIZE_PATTERN", "clip_bpe_path"]

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
#: CLIP's ``SimpleTokenizer`` reads lines 1 .. 48894 of the merge file (49152 - 256 - 2 merges).
NUM_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77

#: ``regex``'s ``\s`` (Unicode White_Space). Stdlib ``re``'s ``\s`` also matches U+001C..U+001F, which
#: CLIP's whitespace clean-up keeps (ftfy normally drops them first, ``&#28;``-style references cannot
#: make them), so the class is spelled out.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

# Letters and digits that ``regex`` (2026.11: Unicode 17.0) classes as \p{L} / \p{N} and the Oniguruma
# of tokenizers 0.15 (older Unicode) does not; Oniguruma would put them in the punctuation class.
# Listing them in the pattern too is harmless where a newer Oniguruma knows them. Measured over every
# code point with both engines; no code point is \p{L} / \p{N} in Oniguruma but not in ``regex``.
_LETTERS_ADDED: Tuple[Tuple[int, int], ...] = (
    (0x558, 0x558), (0x58B, 0x58C), (0x88F, 0x88F), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0x1C89, 0x1C8A),
    (0x208F, 0x208F), (0x209D, 0x209F), (0xA7CB, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4),
    (0xA7DA, 0xA7DD), (0xA7E2, 0xA7E2), (0xA7F1, 0xA7F1), (0xAB6C, 0xAB6D), (0x105C0, 0x105F3),
    (0x107BB, 0x107BF), (0x10940, 0x10959), (0x10D4A, 0x10D65), (0x10D6F, 0x10D85), (0x10EC2, 0x10EC7),
    (0x10ED9, 0x10EEE), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11B0A, 0x11B0A),
    (0x11BC0, 0x11BE0), (0x11DB0, 0x11DDB), (0x11DF1, 0x11DF1), (0x11F02, 0x11F02), (0x11F04, 0x11F10),
    (0x11F12, 0x11F33), (0x1342F, 0x1342F), (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D),
    (0x16D40, 0x16D6C), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF3), (0x187F8, 0x187FF),
    (0x18CD6, 0x18CDA), (0x18CFF, 0x18CFF), (0x18D09, 0x18D20), (0x18D80, 0x18DF2), (0x18E00, 0x19191),
    (0x191A0, 0x191D2), (0x1B123, 0x1B128), (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1B168, 0x1B168),
    (0x1D6A6, 0x1D6A6), (0x1DF1F, 0x1DF81), (0x1DF90, 0x1DF96), (0x1DFCD, 0x1DFFF), (0x1E030, 0x1E06D),
    (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2),
    (0x1E6E4, 0x1E6E5), (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF), (0x2B739, 0x2B73F),
    (0x2B81E, 0x2B81E), (0x2CEA2, 0x2CEAD), (0x2EBF0, 0x2EE5D), (0x31350, 0x33479), (0x3D000, 0x3FC3F),
)
_DIGITS_ADDED: Tuple[Tuple[int, int], ...] = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11DE0, 0x11DE9), (0x11F50, 0x11F59),
    (0x1246F, 0x1246F), (0x12475, 0x1247F), (0x12550, 0x12686), (0x16130, 0x16139), (0x16D70, 0x16D79),
    (0x16FF4, 0x16FF6), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)


def _char_ranges(ranges: Iterable[Tuple[int, int]]) -> str:
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


_L = r"\p{L}" + _char_ranges(_LETTERS_ADDED)
_N = r"\p{N}" + _char_ranges(_DIGITS_ADDED)

#: CLIP's ``<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+``
#: (``re.IGNORECASE``) as Oniguruma must read it to split cleaned (lower-cased) text the same way:
#:
#: * IGNORECASE is spelled out. On lower-cased text its only effect in ``regex`` is U+017F LATIN SMALL
#:   LETTER LONG S matching ``s`` (``'ſ``, ``<|ſtartoftext|>``); Oniguruma's ``(?i)`` also folds
#:   multi-character sequences (``ß`` ~ ``ss``), which ``regex`` does not by default.
#: * U+0345 COMBINING GREEK YPOGEGRAMMENI case-folds to a letter, so with IGNORECASE ``regex`` excludes
#:   it from the negated class while ``[\p{L}]`` does not take it either: CLIP drops it like a space.
#: * the letters and digits of newer Unicode versions (:data:`_LETTERS_ADDED`, :data:`_DIGITS_ADDED`).
PRE_TOKENIZE_PATTERN = (
    r"<\|[sſ]tartoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d"
    rf"|[{_L}]+|[{_N}]|[^\s\x{{345}}{_L}{_N}]+"
)

TextInput = Union[str, Sequence[str]]


def _bytes_to_unicode() -> List[Tuple[int, str]]:
    """CLIP's (= GPT-2's) printable stand-in for each byte, in CLIP's order (its first 256 token ids):
    the printable bytes as themselves, then the others as U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(others)]


def _read_merges(path: Path) -> List[Tuple[str, str]]:
    try:
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read CLIP BPE merges from {path}: {e}") from e
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merge file: expected a header and {NUM_MERGES} "
                         "lines of two symbols")
    return merges  # type: ignore[return-value]


def _as_text_list(texts: TextInput) -> List[str]:
    """One str or a sequence of str -> list; TypeError naming the first entry that is not a str."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, not {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str: {text!r:.80}")
    return texts


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer (vocabulary 49,408), equal to ``clip.tokenize(texts, truncate=True)``.

    ``bpe_path``: CLIP's ``bpe_simple_vocab_16e6.txt.gz``; None reads the copy shipped in the package.
    ``context_length``: row length of :meth:`__call__` unless a call gives its own (CLIP: 77).
    """

    def __init__(self, bpe_path: Optional[Union[str, Path]] = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self._context_length = self._check_context_length(context_length)
        self.bpe_path = Path(bpe_path) if bpe_path is not None else clip_bpe_path()
        merges = _read_merges(self.bpe_path)
        byte_chars = _bytes_to_unicode()
        self._id_to_token: List[str] = [
            *(c for _, c in byte_chars), *(c + "</w>" for _, c in byte_chars), *(a + b for a, b in merges), SOT, EOT]
        vocab = {token: i for i, token in enumerate(self._id_to_token)}
        self._sot = vocab[SOT]
        self._eot = vocab[EOT]
        self._byte_of_char = {c: b for b, c in byte_chars}

        # No normalizer (clean-up is done in Python) and no added tokens (see the module docstring).
        self._split = pre_tokenizers.Split(Regex(PRE_TOKENIZE_PATTERN), behavior="removed", invert=True)
        self._tokenizer = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>"))
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [self._split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    # -- properties -------------------------------------------------------------------------------------
    @property
    def sot_token_id(self) -> int:
        """``<|startoftext|>``: 49406."""
        return self._sot

    @property
    def eot_token_id(self) -> int:
        """``<|endoftext|>``: 49407, the highest id, so ``ids.argmax(-1)`` is where CLIP pools."""
        return self._eot

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def context_length(self) -> int:
        return self._context_length

    # -- text -> ids ------------------------------------------------------------------------------------
    @staticmethod
    def clean(text: str) -> str:
        """CLIP's clean-up: ``whitespace_clean(basic_clean(text)).lower()``."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()

    def encode(self, text: str) -> List[int]:
        """BPE ids of one text, without start / end tokens (CLIP's ``SimpleTokenizer.encode``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return self._encode_batch([text])[0]

    def token_counts(self, texts: TextInput) -> np.ndarray:
        """int32 (N,): tokens per text before truncation, start and end tokens included (> context
        length: :meth:`__call__` truncates it)."""
        return np.array([len(ids) + 2 for ids in self._encode_batch(_as_text_list(texts))], dtype=np.int32)

    def __call__(
        self,
        texts: TextInput,
        context_length: Optional[int] = None,
        truncate: bool = True,
        return_counts: bool = False,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """int32 (N, context_length): ``<|startoftext|>``, BPE ids, ``<|endoftext|>``, zeros; a str is N = 1.

        A text longer than the context keeps its first ``context_length`` tokens with the last one
        replaced by ``<|endoftext|>`` (as ``clip.tokenize(truncate=True)``); ``truncate=False`` raises
        ValueError naming it instead. ``return_counts``: also :meth:`token_counts`, from the same pass
        (to report truncation without tokenizing twice).
        """
        length = self._context_length if context_length is None else self._check_context_length(context_length)
        texts = _as_text_list(texts)
        out = np.zeros((len(texts), length), dtype=np.int32)
        counts = np.zeros(len(texts), dtype=np.int32)
        for i, ids in enumerate(self._encode_batch(texts)):
            counts[i] = len(ids) + 2
            if not truncate and counts[i] > length:
                raise ValueError(f"texts[{i}] is {counts[i]} tokens, longer than the context length "
                                 f"{length} (truncate=False): {texts[i]!r:.120}")
            row = [self._sot, *ids[: length - 2], self._eot]
            out[i, : len(row)] = row
        return (out, counts) if return_counts else out

    # -- ids -> text ------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """CLIP's ``SimpleTokenizer.decode``: every id (special tokens and padding included) back to text,
        invalid UTF-8 replaced, each ``</w>`` a space."""
        try:
            tokens = [self._id_to_token[int(i)] if 0 <= int(i) < len(self._id_to_token) else None for i in ids]
        except (TypeError, ValueError) as e:
            raise TypeError(f"ids must be integers: {e}") from e
        if None in tokens:
            bad = next(i for i, t in zip(ids, tokens) if t is None)
            raise ValueError(f"token id {bad} is outside the vocabulary (0 .. {len(self._id_to_token) - 1})")
        data = bytes(self._byte_of_char[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    @staticmethod
    def _check_context_length(context_length: int) -> int:
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int, not {type(context_length).__name__}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        return int(context_length)

    def _encode_batch(self, texts: List[str]) -> List[List[int]]:
        cleaned = [self.clean(t) for t in texts]
        ids = [enc.ids for enc in self._tokenizer.encode_batch(cleaned, add_special_tokens=False)]
        for i, text in enumerate(cleaned):
            if SOT in text or EOT in text:
                ids[i] = self._encode_with_specials(text)
        return ids

    def _encode_with_specials(self, cleaned: str) -> List[int]:
        """A cleaned text holding a literal special token: CLIP maps a pre-token that *is* one to its id
        (its BPE cache is seeded with them); every other pre-token is BPE-encoded as usual."""
        specials = {SOT: self._sot, EOT: self._eot}
        ids: List[int] = []
        words: List[str] = []
        for piece, _ in self._split.pre_tokenize_str(cleaned):
            if piece in specials:
                if words:  # a piece is one pre-token: splitting it again leaves it whole
                    ids += self._tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False).ids
                    words = []
                ids.append(specials[piece])
            else:
                words.append(piece)
        if words:
            ids += self._tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False).ids
        return ids
