"""Tag queries (RAM++ reweighted descriptions, RAM plain embeddings), the alignment decoder, and the
whole tagging model whose state dict is the official checkpoints' tagging path.

The split the exporter relies on:
``encode_image(pixel_values) -> image_embeds`` and
``decode(image_embeds, label_embed (T,D,E), label_mask (T,D)) -> logits (B,T)``.
Nothing in ``decode`` depends on the vocabulary size or is specific to one vocabulary.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ram_edge.tags import TagSet, tags_for

from .config import DecoderConfig, RAMConfig
from .swin import SwinTransformer

# Added to the reweighting scores of padding rows: exp() of it underflows to exactly 0 in fp32, so
# padding changes no score; finite so that TensorRT / fp16 never see inf - inf.
PADDING_SCORE = -1.0e4


class CrossAttention(nn.Module):
    """BERT's ``BertSelfAttention`` used as cross-attention: queries from tags, keys/values from the image."""

    def __init__(self, config: DecoderConfig, kv_dim: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_dim, config.hidden_size)
        self.value = nn.Linear(kv_dim, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """hidden (B or 1, T, H), image_embeds (B, N, E) -> (B, T, H). No mask: every image token attends."""
        q = self._heads(self.query(hidden)) * self.head_dim**-0.5
        k, v = self._heads(self.key(image_embeds)), self._heads(self.value(image_embeds))
        out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # (B, heads, T, head_dim)
        return out.transpose(1, 2).flatten(2)


class DenseResidualNorm(nn.Module):
    """BERT's ``*Output``: LayerNorm(dense(x) + residual) (post-LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttentionBlock(nn.Module):
    """Named like ``BertAttention`` (``.self``, ``.output``) so official keys load unchanged."""

    def __init__(self, config: DecoderConfig, kv_dim: int):
        super().__init__()
        self.self = CrossAttention(config, kv_dim)
        self.output = DenseResidualNorm(config.hidden_size, config.hidden_size, config.norm_eps)

    def forward(self, hidden: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, image_embeds), hidden)


class Intermediate(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class DecoderLayer(nn.Module):
    """Cross-attention then feed-forward; tags never attend to each other."""

    def __init__(self, config: DecoderConfig, kv_dim: int):
        super().__init__()
        self.crossattention = CrossAttentionBlock(config, kv_dim)
        self.intermediate = Intermediate(config)
        self.output = DenseResidualNorm(config.intermediate_size, config.hidden_size, config.norm_eps)

    def forward(self, hidden: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.crossattention(hidden, image_embeds)
        return self.output(self.intermediate(hidden), hidden)


class LayerStack(nn.Module):
    def __init__(self, config: DecoderConfig, kv_dim: int):
        super().__init__()
        self.layer = nn.ModuleList(DecoderLayer(config, kv_dim) for _ in range(config.num_layers))


class AlignmentDecoder(nn.Module):
    """``tagging_head``: the Query2Label-style BERT encoder in tagging mode (no embeddings, no self-attention)."""

    def __init__(self, config: DecoderConfig, kv_dim: int):
        super().__init__()
        self.encoder = LayerStack(config, kv_dim)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        hidden = queries
        for layer in self.encoder.layer:
            hidden = layer(hidden, image_embeds)
        return hidden


class RAMTagger(nn.Module):
    """RAM++ or RAM tagging path. ``label_embed`` holds the default vocabulary in the official layout:
    (T*D, E), rows grouped by tag. ``tags`` carries that vocabulary's names and thresholds."""

    def __init__(self, config: RAMConfig, tags: Optional[TagSet] = None):
        super().__init__()
        self.config = config
        self.tags = tags if tags is not None else tags_for(config.num_tags)
        if len(self.tags) != config.num_tags:
            raise ValueError(f"RAMTagger: {len(self.tags)} tag names for a model with {config.num_tags} tags")
        self.visual_encoder = SwinTransformer(config.swin)
        self.image_proj = nn.Linear(config.swin.num_features, config.embed_dim)
        self.label_embed = nn.Parameter(torch.zeros(config.label_rows, config.embed_dim))
        if config.kind == "ram_plus":
            self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.wordvec_proj = nn.Linear(config.embed_dim, config.decoder.hidden_size)
        self.tagging_head = AlignmentDecoder(config.decoder, config.embed_dim)
        self.fc = nn.Linear(config.decoder.hidden_size, 1)

    # -- the two exported halves -------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> image_embeds (B, 1+N, E)."""
        return self.image_proj(self.visual_encoder(pixel_values))

    def decode(self, image_embeds: torch.Tensor, label_embed: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """image_embeds (B, 1+N, E), label_embed (T, D, E), label_mask (T, D) bool -> logits (B, T)."""
        queries = F.relu(self.wordvec_proj(self.tag_embeddings(image_embeds, label_embed, label_mask)))
        hidden = self.tagging_head(queries, image_embeds)
        return self.fc(hidden).squeeze(-1)

    def tag_embeddings(self, image_embeds: torch.Tensor, label_embed: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """One embedding per tag: (B, T, E) for RAM++ (depends on the image), (1, T, E) for RAM."""
        if self.config.kind == "ram":
            # Mean of the valid rows: exact for the official D = 1; prompt ensembles for D > 1.
            # torch.where rather than casting the mask: onnxconverter-common's fp16 pass mistypes a
            # Cast to float (it relabels the output float16 but keeps the attribute).
            summed = torch.where(label_mask.unsqueeze(-1), label_embed, 0.0).sum(dim=1)
            count = torch.where(label_mask, 1.0, 0.0).sum(dim=1, keepdim=True)
            return (summed / count).unsqueeze(0)
        num_tags, num_desc, dim = label_embed.shape
        image_cls = F.normalize(image_embeds[:, 0, :], dim=-1)  # (B, E)
        scores = self.reweight_scale.exp() * (image_cls @ label_embed.reshape(-1, dim).t())  # (B, T*D)
        scores = scores.reshape(scores.shape[0], num_tags, num_desc).masked_fill(~label_mask, PADDING_SCORE)
        weights = scores.softmax(dim=-1)  # (B, T, D)
        # Batched over tags: (T, B, D) @ (T, D, E) -> (T, B, E); no loop over the batch.
        return (weights.transpose(0, 1) @ label_embed).transpose(0, 1)

    # -- the default vocabulary --------------------------------------------------------------------
    def default_vocabulary(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The checkpoint's own ``label_embed`` as (T, D, E) and an all-true (T, D) mask."""
        config = self.config
        embed = self.label_embed.detach().reshape(config.num_tags, config.descriptions_per_tag, config.embed_dim)
        return embed, torch.ones(embed.shape[:2], dtype=torch.bool, device=embed.device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits (B, T) over the default vocabulary, as the reference implementation computes them."""
        return self.decode(self.encode_image(pixel_values), *self.default_vocabulary())
