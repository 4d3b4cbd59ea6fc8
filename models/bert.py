"""BERT as the RAM family uses it (BLIP's ``med.py``): the attention blocks the tagging head is built
from, and Tag2Text's captioning branch, the tag encoder and the text decoder.

Module names follow upstream's so official keys load unchanged. Post-LayerNorm everywhere, exact GELU,
LayerNorm eps from the config (1e-12).

Captioning, as upstream's ``Tag2Text.generate`` computes it:

1. Tag encoder (``tag_encoder.*``, a ``BertModel``): token ids of "tag | tag | ..." ([ENC] first, padded
   to 40) -> word + position embeddings, LayerNorm; per layer bidirectional self-attention (padding
   keys masked), cross-attention to ``image_embeds`` (every token), feed-forward -> tag states (B, L, H).
2. Text decoder (``text_decoder.*``, a ``BertLMHeadModel``): token ids from "[DEC] a picture of" on ->
   embeddings (positions offset by what the cache holds); per layer causal self-attention,
   cross-attention to the tag states (every position, padding included: upstream passes no mask),
   feed-forward; LM head: dense, GELU, LayerNorm, projection to the vocabulary plus a bias.

Written for export (one graph per method, batch and lengths dynamic, every size from the config or the
inputs): the decoder's caches are explicit tensors, never hidden state.

* ``TextDecoder.cross_kv(tag_states)`` -> (layers, 2, B, heads, L, head_dim): the cross-attention keys
  and values, computed once per caption (index 0 keys, 1 values).
* ``TextDecoder.step(input_ids (B, S), cross_kv, past_kv)`` -> logits (B, S, V) and the present
  self-attention cache (layers, 2, B, heads, P + S, head_dim), where ``past_kv`` holds P positions (or is
  ``None``). One stacked tensor rather than 2 x layers of them: a fixed number of graph inputs whatever
  the depth, and a beam reorder is one gather on axis 2.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

# Added to the scores of keys a query must not see: upstream's (1 - mask) * -10000. exp() of it
# underflows to exactly 0 in fp32; finite so that TensorRT / fp16 never see inf - inf.
MASKED_SCORE = -1.0e4


class Attention(nn.Module):
    """``BertSelfAttention``: queries from ``hidden``, keys and values from ``states`` (the same sequence
    for self-attention, image or tag states for cross-attention)."""

    def __init__(self, hidden_size: int, num_heads: int, kv_dim: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"Attention: hidden {hidden_size} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_dim, hidden_size)
        self.value = nn.Linear(kv_dim, hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, heads, L, head_dim)."""
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, L, kv_dim) -> keys, values, each (B, heads, L, head_dim)."""
        return self.split_heads(self.key(states)), self.split_heads(self.value(states))

    def attend(
        self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """hidden (B or 1, Lq, H) over keys/values (B, heads, Lk, head_dim); ``bias`` is added to the
        scores and broadcasts to (B, heads, Lq, Lk). Returns (B, Lq, H)."""
        q = self.split_heads(self.query(hidden)) * self.head_dim**-0.5
        scores = q @ keys.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        out = scores.softmax(dim=-1) @ values  # (B, heads, Lq, head_dim)
        return out.transpose(1, 2).flatten(2)

    def forward(self, hidden: torch.Tensor, states: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.attend(hidden, *self.keys_values(states), bias)


class DenseResidualNorm(nn.Module):
    """BERT's ``*Output``: LayerNorm(dense(x) + residual) (post-LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nn.Module):
    """``BertAttention`` (``.self``, ``.output``): attention, then the residual and LayerNorm."""

    def __init__(self, hidden_size: int, num_heads: int, kv_dim: int, eps: float):
        super().__init__()
        self.self = Attention(hidden_size, num_heads, kv_dim)
        self.output = DenseResidualNorm(hidden_size, hidden_size, eps)

    def forward(self, hidden: torch.Tensor, states: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.output(self.self(hidden, states, bias), hidden)

    def attend(
        self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """As ``forward``, with keys and values already projected (a cache)."""
        return self.output(self.self.attend(hidden, keys, values, bias), hidden)


class Intermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention, cross-attention, feed-forward (``attention``, ``crossattention``, ``intermediate``,
    ``output``). How self-attention is masked and cached is the caller's: the encoder and the decoder differ."""

    def __init__(self, config: TextConfig):
        super().__init__()
        h, eps = config.hidden_size, config.norm_eps
        self.attention = AttentionBlock(h, config.num_heads, h, eps)
        self.crossattention = AttentionBlock(h, config.num_heads, config.encoder_width, eps)
        self.intermediate = Intermediate(h, config.intermediate_size)
        self.output = DenseResidualNorm(config.intermediate_size, h, eps)

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (no token types: upstream's med BERT has none)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """input_ids (B, S) at positions past_length ... past_length + S - 1 -> (B, S, H)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past_length
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class TagEncoder(nn.Module):
    """``tag_encoder``: upstream's ``BertModel`` (no pooler) reading the tag prompt against the image."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L), attention_mask (B, L) (1 = token, 0 = padding), image_embeds (B, N, E) ->
        tag states (B, L, H). Padding positions get states too (the decoder attends to them)."""
        hidden = self.embeddings(input_ids)
        # Padding is masked as a key only; every image token is attended.
        bias = torch.where(attention_mask[:, None, None, :] != 0, 0.0, MASKED_SCORE)  # (B, 1, 1, L)
        for layer in self.encoder.layer:
            hidden = layer.attention(hidden, hidden, bias)
            hidden = layer.crossattention(hidden, image_embeds)
            hidden = layer.feed_forward(hidden)
        return hidden


class PredictionTransform(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """``cls.predictions``: transform, then the vocabulary projection whose bias is ``bias`` itself
    (upstream's ``decoder.bias = self.bias``: one tensor stored under both names)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # F.linear on rows, not the Linear on (B, S, H): traced to ONNX as one Gemm reading the weight as
        # stored (transB), so a projection tied to the word embeddings stays one initializer in the graph
        # (a MatMul would get a transposed copy: 94 MB more for the official 30,524 x 768 table).
        hidden = self.transform(hidden)
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), self.decoder.weight, self.bias)
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


class LMHead(nn.Module):
    """``cls`` (upstream's ``BertOnlyMLMHead``)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.predictions = LMPrediction(config)


class BertBody(nn.Module):
    """``text_decoder.bert``: embeddings and layers."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)


class TextDecoder(nn.Module):
    """``text_decoder``: upstream's ``BertLMHeadModel`` as a causal decoder with an explicit cache.

    ``tie_word_embeddings``: the LM projection is the word-embedding table itself (as upstream's
    checkpoints have it; one tensor, stored under both names)."""

    def __init__(self, config: TextConfig, tie_word_embeddings: bool = True):
        super().__init__()
        self.config = config
        self.bert = BertBody(config)
        self.cls = LMHead(config)
        if tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def cross_kv(self, tag_states: torch.Tensor) -> torch.Tensor:
        """Tag states (B, L, H) -> cross-attention keys and values (layers, 2, B, heads, L, head_dim)."""
        return torch.stack([torch.stack(layer.crossattention.self.keys_values(tag_states)) for layer in self.layers])

    def step(
        self, input_ids: torch.Tensor, cross_kv: torch.Tensor, past_kv: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode ``input_ids`` (B, S) after the P positions in ``past_kv`` ((layers, 2, B, heads, P,
        head_dim), or ``None`` for P = 0).

        Returns ``logits`` (B, S, V), where ``logits[:, i]`` scores the token after ``input_ids[:, i]``,
        and the present cache (layers, 2, B, heads, P + S, head_dim). Position ids start at P; the new
        tokens see every cached position and each other causally.
        """
        past_length = 0 if past_kv is None else past_kv.shape[4]
        new = input_ids.shape[1]
        hidden = self.bert.embeddings(input_ids, past_length)
        # Query i (absolute position P + i) sees keys 0 ... P + i: an (S, P + S) bias, broadcast over B, heads.
        query_pos = torch.arange(new, device=input_ids.device)[:, None] + past_length
        key_pos = torch.arange(past_length + new, device=input_ids.device)[None, :]
        causal = torch.where(key_pos <= query_pos, 0.0, MASKED_SCORE)
        present = []
        for i, layer in enumerate(self.layers):
            keys, values = layer.attention.self.keys_values(hidden)
            if past_kv is not None:
                keys = torch.cat([past_kv[i, 0], keys], dim=2)
                values = torch.cat([past_kv[i, 1], values], dim=2)
            present.append(torch.stack([keys, values]))
            hidden = layer.attention.attend(hidden, keys, values, causal)
            hidden = layer.crossattention.attend(hidden, cross_kv[i, 0], cross_kv[i, 1])
            hidden = layer.feed_forward(hidden)
        return self.cls.predictions(hidden), torch.stack(present)

    def forward(self, input_ids: torch.Tensor, tag_states: torch.Tensor) -> torch.Tensor:
        """Uncached: logits (B, S, V) of the whole sequence ``input_ids`` against ``tag_states``."""
        return self.step(input_ids, self.cross_kv(tag_states))[0]


def share_parameters(owner: nn.Module, borrower: nn.Module) -> None:
    """Make each parameter of ``owner`` also the parameter at the same path in ``borrower`` (one tensor,
    two names), as upstream's ``tie_encoder_decoder_weights`` does for the tagging head and the tag encoder."""
    for name, param in list(owner.named_parameters()):
        path, _, leaf = name.rpartition(".")
        target = borrower.get_submodule(path)
        current = getattr(target, leaf)
        if current.shape != param.shape:
            raise ValueError(f"share_parameters: {name} is {tuple(param.shape)} here, {tuple(current.shape)} there")
        setattr(target, leaf, param)
