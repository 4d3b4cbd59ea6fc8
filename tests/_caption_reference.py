"""Torch reference of Tag2Text's caption generation, for tests only: the yardstick the runtime's
(numpy) generation loop will be held to, and proof that the cached decoder reproduces upstream.

Upstream (``Tag2Text.generate``) calls Hugging Face's ``generate`` on the text decoder without a
usable cache (it re-runs the whole prefix each step); this drives ``TextDecoder.step`` with its
explicit cache instead and reproduces transformers 4.36.2's search:

* greedy: argmax of the logits, [SEP] set to -inf while the sequence is shorter than ``min_length``
  (``MinLengthLogitsProcessor``), stop at [SEP] or ``max_length``; finished rows emit [PAD].
* beam search (``BeamSearchScorer``, length_penalty 1, early_stopping False): beam scores start
  (0, -1e9, ...); each step adds log_softmax (with the [SEP] block) to the beam scores, takes the top
  2 x num_beams of num_beams x V, sends [SEP] candidates ranked within the first num_beams to the
  finished hypotheses (the rest refill the beams, in rank order), and stops once ``num_beams``
  hypotheses are kept and none of the running beams could beat the worst of them, or at ``max_length``
  (then the running beams are offered as hypotheses too). The best hypothesis wins, [SEP] appended if
  it fits.
* length normalisation: 4.36 divides a hypothesis' summed log-probabilities by the number of tokens
  generated after the prompt, its [SEP] included (``cur_len - decoder_prompt_len``); transformers
  <= 4.35 (``legacy=True``) by the whole length with the prompt, [SEP] excluded. The two differ only
  in that denominator and in the matching bound of the stopping test.

* repetition penalty (``RepetitionPenaltyLogitsProcessor``, when ``repetition_penalty`` != 1): the score
  of every token already in the sequence, prompt included, times the penalty where negative, divided
  where not; applied to the logits in greedy search, to the log-probabilities in beam search (where
  transformers runs its logits processors), before the [SEP] block.

Every step's logits come from the cache; batches of images are searched independently (no
upstream batched quirk: see golden/tag2text_tiny_384.json ``batched_quirk``). ``caption`` overrides the
model's ``CaptionConfig`` (other lengths, beams).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ram_edge.models import CaptionConfig, RAMTagger


def _min_length_block(scores: torch.Tensor, length: int, caption: CaptionConfig) -> torch.Tensor:
    """[SEP] impossible while the sequence (prompt included) is shorter than ``min_length``."""
    if length < caption.min_length:
        scores = scores.clone()
        scores[:, caption.eos_token_id] = -float("inf")
    return scores


def _repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor (gather, scale by sign, scatter)."""
    if penalty == 1.0:
        return scores
    score = torch.gather(scores, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, ids, score)


def _pad(sequences: List[torch.Tensor], pad: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = seq
    return out


@torch.no_grad()
def caption_states(model: RAMTagger, image_embeds: torch.Tensor, enc_input_ids, enc_attention_mask) -> torch.Tensor:
    """Tag-encoder states (B, L, H) from the tag prompt ids and mask (as upstream: [ENC] first)."""
    return model.encode_tags(image_embeds, torch.as_tensor(enc_input_ids).long(), torch.as_tensor(enc_attention_mask).long())


@torch.no_grad()
def greedy(model: RAMTagger, tag_states: torch.Tensor, repetition_penalty: float = 1.0,
           caption: Optional[CaptionConfig] = None) -> torch.Tensor:
    """Greedy captions (B, <= max_length) incl. the prompt and a final [SEP], [PAD]-padded."""
    caption = caption or model.config.captioning
    decoder = model.text_decoder
    batch = tag_states.shape[0]
    ids = torch.tensor(caption.prompt_ids).repeat(batch, 1)
    cross = decoder.cross_kv(tag_states)
    logits, past = decoder.step(ids, cross)
    unfinished = torch.ones(batch, dtype=torch.bool)
    while True:
        scores = _repetition_penalty(logits[:, -1], ids, repetition_penalty)
        scores = _min_length_block(scores, ids.shape[1], caption)
        next_tokens = torch.where(unfinished, scores.argmax(dim=-1), caption.pad_token_id)
        ids = torch.cat([ids, next_tokens[:, None]], dim=1)
        unfinished &= next_tokens != caption.eos_token_id
        if not unfinished.any() or ids.shape[1] >= caption.max_length:
            return ids
        logits, past = decoder.step(next_tokens[:, None], cross, past)


@dataclass
class _Hypotheses:
    """Finished hypotheses of one image (transformers' ``BeamHypotheses``)."""

    num_beams: int
    beams: list
    worst_score: float = 1e9

    def add(self, tokens: torch.Tensor, sum_logprobs: float, length: int) -> None:
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


@torch.no_grad()
def beam_search(model: RAMTagger, tag_states: torch.Tensor, legacy: bool = False, repetition_penalty: float = 1.0,
                caption: Optional[CaptionConfig] = None) -> torch.Tensor:
    """Beam-search captions (B, <= max_length) incl. the prompt and a final [SEP], [PAD]-padded;
    ``legacy``: transformers <= 4.35's length normalisation."""
    caption = caption or model.config.captioning
    decoder = model.text_decoder
    beams = caption.num_beams
    batch = tag_states.shape[0]
    prompt_len = len(caption.prompt_ids)

    def hypothesis_length(length_with_next: int) -> int:
        # 4.36: tokens generated after the prompt, the [SEP] just chosen included; <= 4.35: everything
        # before the [SEP], prompt included.
        return length_with_next - 1 if legacy else length_with_next - prompt_len

    cross = decoder.cross_kv(tag_states).repeat_interleave(beams, dim=2)  # rows b*beams ... b*beams+beams-1
    ids = torch.tensor(caption.prompt_ids).repeat(batch * beams, 1)
    beam_scores = torch.zeros(batch, beams)
    beam_scores[:, 1:] = -1e9  # the copies of the prompt must not all be expanded
    beam_scores = beam_scores.reshape(-1)
    hyps = [_Hypotheses(beams, []) for _ in range(batch)]
    done = [False] * batch
    logits, past = decoder.step(ids, cross)
    while True:
        length_with_next = ids.shape[1] + 1
        logprobs = _repetition_penalty(torch.log_softmax(logits[:, -1], dim=-1), ids, repetition_penalty)
        logprobs = _min_length_block(logprobs, ids.shape[1], caption)
        scores = (logprobs + beam_scores[:, None]).reshape(batch, -1)  # (B, beams * V)
        top_scores, top = scores.topk(2 * beams, dim=1)
        vocab = logprobs.shape[-1]
        next_scores = torch.zeros(batch, beams)
        next_tokens = torch.full((batch, beams), caption.pad_token_id, dtype=torch.long)
        next_rows = torch.zeros(batch, beams, dtype=torch.long)
        for b in range(batch):
            if done[b]:
                continue  # padding rows (score 0, [PAD], row 0), as transformers does
            filled = 0
            for rank in range(2 * beams):
                token, row = int(top[b, rank]) % vocab, b * beams + int(top[b, rank]) // vocab
                if token == caption.eos_token_id:
                    if rank < beams:
                        hyps[b].add(ids[row].clone(), float(top_scores[b, rank]), hypothesis_length(length_with_next))
                else:
                    next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = top_scores[b, rank], token, row
                    filled += 1
                if filled == beams:
                    break
            bound_length = length_with_next if legacy else length_with_next - prompt_len
            done[b] = hyps[b].is_done(float(top_scores[b].max()), bound_length)
        rows = next_rows.reshape(-1)
        beam_scores = next_scores.reshape(-1)
        ids = torch.cat([ids[rows], next_tokens.reshape(-1, 1)], dim=1)
        past = past[:, :, rows]
        if all(done) or ids.shape[1] >= caption.max_length:
            break
        logits, past = decoder.step(next_tokens.reshape(-1, 1), cross, past)

    best = []
    for b in range(batch):
        if not done[b]:
            for row in range(b * beams, (b + 1) * beams):
                hyps[b].add(ids[row], float(beam_scores[row]), ids.shape[1] if legacy else ids.shape[1] - prompt_len)
        tokens = max(hyps[b].beams, key=lambda hyp: hyp[0])[1]
        if len(tokens) < caption.max_length:
            tokens = torch.cat([tokens, torch.tensor([caption.eos_token_id])])
        best.append(tokens)
    return _pad(best, caption.pad_token_id)
