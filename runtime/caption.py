"""Captions from a bundle's captioning graphs, torch-free: the token sequences upstream's
``Tag2Text.generate`` returns, computed with numpy and one cached decoder step per token.

    from ram_edge.runtime import Tagger
    tagger = Tagger("bundles/tag2text")
    result = tagger.caption("photo.jpg")              # CaptionResult(text, token_ids, tags)
    tagger.caption(["a.jpg", "b.jpg"], tags=["dog,frisbee", None], num_beams=1)

What upstream does, and how it is done here:

1. **Tag prompt.** The predicted tags (probability above the class threshold, Tag2Text's
   ``delete_tag_index`` removed, in vocabulary order) joined with " | ", or the user's tags with each ","
   replaced by " | " (``inference_tag2text.py``); BERT-tokenized (lower case, accents stripped,
   WordPiece), ``[CLS] ... [SEP]`` truncated / padded to 40 tokens, ``[CLS]`` replaced by ``[ENC]``.
   Tokenization is the ``tokenizers`` library's WordPiece with upstream's two added tokens.
2. **Tag encoder** (``tag_encoder.onnx``): the prompt against the image embeddings -> tag states, and the
   text decoder's cross-attention keys / values, computed once per caption.
3. **Search** from the prompt "[DEC] a picture of" on ``text_decoder.onnx``: the prompt runs once with an
   empty cache, then each step feeds one token per row and the cache it got back, so a token costs one
   step whatever the length so far (upstream re-runs the whole prefix each step). Greedy, or beam search
   as transformers 4.36's ``BeamSearchScorer`` (scores normalised by the generated length, [SEP]
   included; ``legacy_scoring=True``: transformers <= 4.35, by the whole length with the prompt).
   ``max_length`` / ``min_length`` count the prompt; [SEP] is blocked below ``min_length``;
   ``repetition_penalty`` as ``RepetitionPenaltyLogitsProcessor`` (on the log-probabilities in beam
   search, on the logits in greedy, as transformers applies it).
4. **Text**: the ids decoded without special tokens, WordPiece pieces joined, transformers' clean-up of
   spaces before punctuation, and the prompt's characters cut off (``[len("a picture of "):]``).

Every image is searched on its own: a batch only shares graph calls (rows of finished images leave the
batch), so each image gets the caption it gets alone. Upstream's batched beam search does not (its
encoder states are expanded twice; see golden/tag2text_tiny_384.json ``batched_quirk``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .backends import open_graph
from .bundle import BundleInfo, CaptionInfo, check_backend_io

#: What upstream's ``inference_tag2text.py`` treats as "no user tags" (then the predicted tags are used).
NO_USER_TAGS = ("none", "None")
#: transformers' ``BeamSearchScorer`` start: every beam but the first is "impossible", so the copies of the
#: prompt are not all expanded.
_BEAM_START_SCORE = -1e9


@dataclass(frozen=True)
class CaptionResult:
    """One image's caption. ``token_ids`` is the whole sequence upstream's ``generate`` returns (the
    prompt first, ending with [SEP] when the caption ended before ``max_length``, no padding); ``tags``
    is the tag string fed to the tag encoder (before its truncation to the tag prompt's length)."""

    text: str
    token_ids: Tuple[int, ...]
    tags: str
    #: Whether ``tags`` was longer than the tag prompt and cut (as upstream's tokenizer cuts it).
    tags_truncated: bool = field(default=False, repr=False)


def user_tag_string(tags: str) -> str:
    """User-given tags as upstream's ``inference_tag2text.py`` feeds them: "," -> " | ", nothing else
    (so "dog, cat" becomes "dog |  cat", spaces and all)."""
    return tags.replace(",", " | ")


def is_empty_user_tags(tags: Optional[str]) -> bool:
    """No tags given: None, only whitespace, or upstream's "none" / "None"."""
    return tags is None or not tags.strip() or tags in NO_USER_TAGS


# ------------------------------------------------------------------------------------------------------
# Tokenizer


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (what ``decode`` applies for BERT): no space before
    punctuation and in English contractions. (``tokenizers``' own WordPiece clean-up also turns " do not"
    into " don't", which transformers does not; so the library joins the pieces and this cleans up.)"""
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
        .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re")
    )


class CaptionTokenizer:
    """BERT's uncased WordPiece tokenizer as upstream builds it (``BertTokenizer`` + ``[DEC]``, ``[ENC]``),
    on the ``tokenizers`` library: lower-casing and accent stripping, whitespace / punctuation / CJK
    splitting, greedy longest-match WordPiece (``##`` continuations, words over 100 characters ->
    ``[UNK]``). Special tokens written in a text are matched exactly (case-sensitive) as upstream does.

    vocab_path:     ``vocab.txt`` (one token a line, id = line number).
    added_tokens:   appended after the file's ids, in order (upstream: [DEC], [ENC]).
    special_tokens: token -> id of every special token; checked against the file, skipped when decoding.
    """

    def __init__(self, vocab_path: Path, added_tokens: Sequence[str], special_tokens: Mapping[str, int],
                 lowercase: bool = True):
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        vocab = models.WordPiece.read_file(str(vocab_path))
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=None, lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        in_file = [t for t in special_tokens if t not in added_tokens]
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in in_file])
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added_tokens])
        got = {t: tokenizer.token_to_id(t) for t in special_tokens}
        if got != dict(special_tokens):
            raise ValueError(f"{vocab_path}: special token ids {got} differ from the bundle's {dict(special_tokens)}")
        cls_id, sep_id = got.get("[CLS]"), got.get("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{vocab_path}: the special tokens must include [CLS] and [SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        self._tokenizer = tokenizer
        self.pad_id = got.get("[PAD]", 0)
        self.special_ids = frozenset(got.values())
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        """``[CLS]`` ids ``[SEP]``, untruncated."""
        return self._tokenizer.encode(text).ids

    def encode_tag_prompts(self, texts: Sequence[str], max_length: int,
                           first_token_id: int) -> Tuple[np.ndarray, np.ndarray, List[bool]]:
        """Upstream's tag-encoder input: ``tokenizer(texts, padding="max_length", truncation=True,
        max_length=max_length)`` with position 0 replaced by ``first_token_id`` ([ENC]). Returns ids and
        attention mask, (N, max_length) int64, and which texts were truncated.

        Truncation keeps ``[CLS]``, the first ``max_length - 2`` tokens and ``[SEP]``, as transformers'
        (and the library's) truncation of one sequence does; done here rather than by reconfiguring the
        library tokenizer, so one CaptionTokenizer serves several threads."""
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), max_length), dtype=np.int64)
        truncated = []
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(texts))):
            tokens = encoding.ids
            truncated.append(len(tokens) > max_length)
            if truncated[-1]:
                tokens = tokens[: max_length - 1] + tokens[-1:]  # ... [SEP]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        ids[:, 0] = first_token_id
        return ids, mask, truncated

    def decode(self, ids: Sequence[int]) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=True)`` as transformers' BertTokenizer does it."""
        kept = [int(i) for i in ids if int(i) not in self.special_ids]
        return clean_up_tokenization(self._tokenizer.decode(kept, skip_special_tokens=False).strip())


# ------------------------------------------------------------------------------------------------------
# Search


@dataclass(frozen=True)
class SearchSettings:
    """How to search (upstream's ``generate`` arguments). Lengths count the prompt tokens."""

    num_beams: int
    max_length: int
    min_length: int
    repetition_penalty: float = 1.0
    legacy_scoring: bool = False

    def check(self, prompt_length: int, max_positions: Optional[int]) -> None:
        for name in ("num_beams", "max_length", "min_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.max_length <= prompt_length:
            raise ValueError(f"max_length {self.max_length} leaves no token after the {prompt_length}-token prompt "
                             "(lengths count the prompt, as upstream's)")
        if max_positions is not None and self.max_length > max_positions:
            raise ValueError(f"max_length {self.max_length} exceeds the text decoder's {max_positions} positions")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if not (float(self.repetition_penalty) > 0.0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty!r}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (x - max - log sum exp(x - max)), as torch computes it."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_repetition_penalty(scores: np.ndarray, sequences: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` in place: the score of every token already in a
    row's sequence (prompt included) is multiplied by ``penalty`` where negative, divided where not."""
    if penalty == 1.0:
        return scores
    p = np.float32(penalty)
    seen = np.take_along_axis(scores, sequences, axis=1)
    np.put_along_axis(scores, sequences, np.where(seen < 0, seen * p, seen / p), axis=1)
    return scores


@dataclass(frozen=True)
class CaptionRequest:
    """What to caption with, for a run over many files (``tag_files``, ``ram-tag --caption``): one tag
    string for every image (None: each image's predicted tags) and the search settings."""

    tags: Optional[str]
    settings: SearchSettings


@dataclass
class _Hypotheses:
    """One image's finished hypotheses: transformers' ``BeamHypotheses`` (length_penalty 1,
    early_stopping False); scores are Python floats, as ``.item()`` gives them there."""

    num_beams: int
    beams: List[Tuple[float, np.ndarray]] = field(default_factory=list)
    worst_score: float = 1e9

    def add(self, tokens: np.ndarray, sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / length
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        return len(self.beams) >= self.num_beams and self.worst_score >= best_sum_logprobs / length

    def best(self) -> np.ndarray:
        # transformers sorts by score and pops the last: among equal scores the latest added wins.
        return sorted(self.beams, key=lambda hyp: hyp[0])[-1][1]


class Captioner:
    """The captioning graphs of a bundle (``tag_encoder.onnx``, ``text_decoder.onnx``) and BERT's tokenizer.

    ``Tagger.caption`` is the usual way in; this is the part after the image encoder: image embeddings
    and tag strings in, :class:`CaptionResult` out. ``backend`` / ``backend_options`` as resolved by
    ``configure_backend`` (the Tagger hands over its own).
    """

    def __init__(self, bundle: BundleInfo, backend: str, backend_options: Mapping[str, Any]):
        self.bundle = bundle
        self.info: CaptionInfo = bundle.require_captioning()
        info = self.info
        self.tokenizer = CaptionTokenizer(info.tokenizer_path, info.added_tokens, info.special_tokens, info.lowercase)
        if self.tokenizer.vocab_size != info.vocab_size:
            raise ValueError(f"{info.tokenizer_path}: {self.tokenizer.vocab_size} token ids, but the text decoder "
                             f"scores {info.vocab_size}")
        self._graphs = []
        try:
            self._tag_encoder = self._open(bundle.path / info.tag_encoder.file, backend, backend_options)
            check_backend_io(bundle, "tag encoder", info.tag_encoder, self._tag_encoder)
            self._text_decoder = self._open(bundle.path / info.text_decoder.file, backend, backend_options)
            check_backend_io(bundle, "text decoder", info.text_decoder, self._text_decoder)
        except BaseException:
            self.close()
            raise
        cache = info.text_decoder.inputs[2].shape  # (layers, 2, batch, heads, past, head_dim)
        self._cache_dims = (int(cache[0]), 2, int(cache[3]), int(cache[5]))

    def _open(self, path: Path, backend: str, options: Mapping[str, Any]):
        graph = open_graph(backend, path, options)
        self._graphs.append(graph)
        return graph

    def close(self) -> None:
        for graph in self._graphs:
            graph.deactivate()

    def settings(self, num_beams: Optional[int] = None, max_length: Optional[int] = None,
                 min_length: Optional[int] = None, repetition_penalty: Optional[float] = None,
                 legacy_scoring: bool = False) -> SearchSettings:
        """Search settings: the bundle's defaults (upstream's: 3 beams, 30 / 10 tokens, no penalty)
        where not given, checked."""
        info = self.info
        settings = SearchSettings(
            num_beams=info.num_beams if num_beams is None else num_beams,
            max_length=info.max_length if max_length is None else max_length,
            min_length=info.min_length if min_length is None else min_length,
            repetition_penalty=info.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
            legacy_scoring=bool(legacy_scoring),
        )
        settings.check(len(info.prompt_ids), info.max_positions)
        return settings

    # -- graphs --------------------------------------------------------------------------------------
    def encode_tags(self, image_embeds: np.ndarray, tag_strings: Sequence[str]) -> Tuple[np.ndarray, List[bool]]:
        """(B, 1+N, E) image embeddings and B tag strings -> the decoder's cross keys / values (layers, 2,
        B, heads, L, head_dim), and which tag strings were truncated."""
        info = self.info
        ids, mask, truncated = self.tokenizer.encode_tag_prompts(tag_strings, info.tag_max_length, info.enc_token_id)
        outputs = self._tag_encoder.infer({
            info.tag_encoder.inputs[0].name: ids,
            info.tag_encoder.inputs[1].name: mask,
            info.tag_encoder.inputs[2].name: np.ascontiguousarray(image_embeds, dtype=np.float32),
        })
        return outputs[info.tag_encoder.outputs[1].name], truncated

    def tag_prompt_ids(self, tag_strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """The tag encoder's input ids and attention mask for ``tag_strings``, (B, 40) int64 each."""
        ids, mask, _ = self.tokenizer.encode_tag_prompts(tag_strings, self.info.tag_max_length, self.info.enc_token_id)
        return ids, mask

    def empty_cache(self, rows: int) -> np.ndarray:
        layers, two, heads, head_dim = self._cache_dims
        return np.zeros((layers, two, rows, heads, 0, head_dim), dtype=np.float32)

    def step(self, input_ids: np.ndarray, cross_kv: np.ndarray, past_kv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """One decoder call: ``input_ids`` (rows, S) after the cached positions -> the last position's
        logits (rows, V) and the present cache (layers, 2, rows, heads, P + S, head_dim)."""
        spec = self.info.text_decoder
        out = self._text_decoder.infer({spec.inputs[0].name: np.ascontiguousarray(input_ids, dtype=np.int64),
                                        spec.inputs[1].name: cross_kv, spec.inputs[2].name: past_kv})
        return out[spec.outputs[0].name][:, -1, :], out[spec.outputs[1].name]

    # -- captions ------------------------------------------------------------------------------------
    def caption(self, image_embeds: np.ndarray, tag_strings: Sequence[str],
                settings: SearchSettings) -> List[CaptionResult]:
        """One caption per image of ``image_embeds`` (B, 1+N, E), each from its own tag string."""
        if len(tag_strings) != image_embeds.shape[0]:
            raise ValueError(f"{len(tag_strings)} tag strings for {image_embeds.shape[0]} images")
        cross, truncated = self.encode_tags(image_embeds, tag_strings)
        sequences = self.search(cross, settings)
        prompt_chars = len(self.info.prompt)
        return [CaptionResult(self.tokenizer.decode(ids)[prompt_chars:], tuple(int(i) for i in ids), tags, cut)
                for ids, tags, cut in zip(sequences, tag_strings, truncated)]

    def search(self, cross_kv: np.ndarray, settings: SearchSettings) -> List[np.ndarray]:
        """Token ids per image (prompt first, [SEP] last when the caption ended early) from the cross keys /
        values of B images: greedy for one beam, beam search otherwise."""
        if settings.num_beams == 1:
            return self._greedy(cross_kv, settings)
        return self._beam_search(cross_kv, settings)

    def _scores(self, logits: np.ndarray, sequences: np.ndarray, settings: SearchSettings, beam: bool) -> np.ndarray:
        """The logits processors transformers runs: log-softmax first in beam search, then the repetition
        penalty, then [SEP] blocked while the sequences are shorter than ``min_length``."""
        scores = log_softmax(logits.astype(np.float32)) if beam else np.array(logits, dtype=np.float32)
        scores = apply_repetition_penalty(scores, sequences, settings.repetition_penalty)
        if sequences.shape[1] < settings.min_length:
            scores[:, self.info.eos_token_id] = -np.inf
        return scores

    def _greedy(self, cross_kv: np.ndarray, settings: SearchSettings) -> List[np.ndarray]:
        eos = self.info.eos_token_id
        batch = cross_kv.shape[2]
        sequences = np.tile(np.asarray(self.info.prompt_ids, dtype=np.int64), (batch, 1))
        logits, past = self.step(sequences, cross_kv, self.empty_cache(batch))
        active = np.arange(batch)  # images still generating; rows of sequences / past / cross, in order
        results: List[Optional[np.ndarray]] = [None] * batch
        while True:
            tokens = self._scores(logits, sequences, settings, beam=False).argmax(axis=1)
            sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
            ended = tokens == eos
            if sequences.shape[1] >= settings.max_length:
                ended[:] = True
            for row in np.flatnonzero(ended):
                results[active[row]] = sequences[row]
            if ended.all():
                return results  # type: ignore[return-value]
            if ended.any():  # finished images leave the batch: their rows are not decoded further
                keep = np.flatnonzero(~ended)
                active, sequences, tokens = active[keep], sequences[keep], tokens[keep]
                cross_kv, past = cross_kv.take(keep, axis=2), past.take(keep, axis=2)
            logits, past = self.step(tokens[:, None], cross_kv, past)

    def _beam_search(self, cross_kv: np.ndarray, settings: SearchSettings) -> List[np.ndarray]:
        info = self.info
        beams, eos = settings.num_beams, info.eos_token_id
        prompt = np.asarray(info.prompt_ids, dtype=np.int64)
        prompt_len = len(prompt)
        batch = cross_kv.shape[2]
        legacy = settings.legacy_scoring
        # The prompt once per image, its logits and cache then copied to the image's beams (identical rows).
        logits, past = self.step(np.tile(prompt, (batch, 1)), cross_kv, self.empty_cache(batch))
        logits, past = np.repeat(logits, beams, axis=0), np.repeat(past, beams, axis=2)
        cross_kv = np.repeat(cross_kv, beams, axis=2)  # rows b * beams ... b * beams + beams - 1
        sequences = np.tile(prompt, (batch * beams, 1))
        beam_scores = np.zeros((batch, beams), dtype=np.float32)
        beam_scores[:, 1:] = _BEAM_START_SCORE
        active = np.arange(batch)
        hypotheses = [_Hypotheses(beams) for _ in range(batch)]
        results: List[Optional[np.ndarray]] = [None] * batch
        while True:
            cur_len = sequences.shape[1]
            scores = self._scores(logits, sequences, settings, beam=True)
            vocab = scores.shape[1]
            scores = (scores + beam_scores.reshape(-1, 1)).reshape(len(active), beams * vocab)
            top = _top_k(scores, 2 * beams)
            top_scores = np.take_along_axis(scores, top, axis=1)
            # transformers 4.36: a hypothesis ending here has cur_len + 1 - prompt generated tokens ([SEP]
            # included), and that bounds the stopping test; <= 4.35: its length without [SEP], prompt
            # included, and cur_len + 1 in the test.
            hyp_length = cur_len if legacy else cur_len + 1 - prompt_len
            bound_length = cur_len + 1 if legacy else cur_len + 1 - prompt_len
            next_scores = np.zeros((len(active), beams), dtype=np.float32)
            next_tokens = np.zeros((len(active), beams), dtype=np.int64)
            next_rows = np.zeros((len(active), beams), dtype=np.int64)
            done = np.zeros(len(active), dtype=bool)
            for a in range(len(active)):
                filled = 0
                for rank in range(2 * beams):
                    token, row = int(top[a, rank] % vocab), a * beams + int(top[a, rank] // vocab)
                    if token == eos:
                        if rank < beams:  # an [SEP] ranked below the beams is not a hypothesis
                            hypotheses[active[a]].add(sequences[row].copy(), float(top_scores[a, rank]), hyp_length)
                    else:
                        next_scores[a, filled], next_tokens[a, filled], next_rows[a, filled] = top_scores[a, rank], token, row
                        filled += 1
                    if filled == beams:
                        break
                done[a] = hypotheses[active[a]].is_done(float(top_scores[a].max()), bound_length)
            rows = next_rows.reshape(-1)
            sequences = np.concatenate([sequences[rows], next_tokens.reshape(-1, 1)], axis=1)
            beam_scores = next_scores
            at_max = sequences.shape[1] >= settings.max_length
            for a in range(len(active)):
                if not (done[a] or at_max):
                    continue
                hyps = hypotheses[active[a]]
                if not done[a]:  # out of length: the running beams are hypotheses too
                    for beam in range(beams):
                        length = sequences.shape[1] if legacy else sequences.shape[1] - prompt_len
                        hyps.add(sequences[a * beams + beam], float(beam_scores[a, beam]), length)
                tokens = hyps.best()
                if len(tokens) < settings.max_length:
                    tokens = np.append(tokens, eos)
                results[active[a]] = tokens
            if at_max or done.all():
                return results  # type: ignore[return-value]
            if done.any():  # finished images leave the batch
                keep = np.flatnonzero(~done)
                keep_rows = (keep[:, None] * beams + np.arange(beams)).reshape(-1)
                active, beam_scores, next_tokens = active[keep], beam_scores[keep], next_tokens[keep]
                rows, sequences = rows[keep_rows], sequences[keep_rows]
                cross_kv = cross_kv.take(keep_rows, axis=2)
            past = past.take(rows, axis=2)  # the beam reorder: one gather on the batch axis of the cache
            logits, past = self.step(next_tokens.reshape(-1, 1), cross_kv, past)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, largest first (ties: lower index first)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)  # index order first, so the stable sort below breaks ties by index
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def tag_strings_for(predicted: Sequence[str], user: Sequence[Optional[str]]) -> List[str]:
    """Per image the tag string to feed: the user's (upstream's normalisation) unless empty, else the
    predicted one."""
    return [p if is_empty_user_tags(u) else user_tag_string(u) for p, u in zip(predicted, user)]


__all__ = ["CaptionRequest", "CaptionResult", "CaptionTokenizer", "Captioner", "SearchSettings", "tag_strings_for"]
