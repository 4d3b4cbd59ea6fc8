"""Tag queries (RAM++ reweighted descriptions, RAM plain embeddings, Tag2Text's learned table), the
alignment decoder, and the whole model whose state dict is the official checkpoints' layout: the tagging
path and, where the config has one, the captioning branch (``bert.py``).

The split the exporter relies on:
``encode_image(pixel_values) -> image_embeds`` and
``decode(image_embeds, label_embed (T,D,E), label_mask (T,D)[, label_fc_weight (T,H), label_fc_bias (T,)])
-> logits (B,T)``. Nothing in ``decode`` depends on the vocabulary size or is specific to one vocabulary:
Tag2Text's classifier has one weight row per tag, so those rows are vocabulary data like the embeddings.

Proposal for ``ram_edge.vocabulary.Vocabulary`` (phase 2, not done here): optional per-tag arrays, a
mapping name -> (T, ...) array (``{"label_fc_weight": (T, H), "label_fc_bias": (T,)}`` for Tag2Text,
empty for RAM / RAM++), each saved as ``<name>.npy`` beside ``embeddings.npy`` and listed in
``vocabulary.json`` (``"per_tag": {"label_fc_weight": {"shape": [H], "dtype": "float32"}}``), indexed
along axis 0 by ``subset()``, and fed to the decoder graph under its own name. Its keys are exactly the
keyword arguments of ``decode`` and of ``RAMTagger.default_classifier()``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ram_edge.tags import TagSet, tags_for

from .bert import MASKED_SCORE, AttentionBlock, DenseResidualNorm, Intermediate, TagEncoder, TextDecoder, share_parameters
from .config import DecoderConfig, RAMConfig
from .swin import SwinTransformer

# Added to the reweighting scores of padding rows (the value BERT masks keys with): exp() of it
# underflows to exactly 0 in fp32, so padding changes no score; finite so that TensorRT / fp16 never
# see inf - inf.
PADDING_SCORE = MASKED_SCORE


class DecoderLayer(nn.Module):
    """Cross-attention then feed-forward; tags never attend to each other. Named like ``BertLayer``
    (``crossattention``, ``intermediate``, ``output``) so official keys load unchanged."""

    def __init__(self, config: DecoderConfig, kv_dim: int):
        super().__init__()
        self.crossattention = AttentionBlock(config.hidden_size, config.num_heads, kv_dim, config.norm_eps)
        self.intermediate = Intermediate(config.hidden_size, config.intermediate_size)
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


class GroupWiseLinear(nn.Module):
    """Tag2Text's classifier (upstream's ``GroupWiseLinear``, keys ``fc.W`` (1, T, H), ``fc.b`` (1, T)):
    one weight row and bias per tag. Holds the default vocabulary's rows; ``decode`` takes them as inputs."""

    def __init__(self, num_tags: int, hidden_size: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(1, num_tags, hidden_size))
        self.b = nn.Parameter(torch.zeros(1, num_tags))


def group_wise_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits[b, t] = sum_d weight[t, d] * hidden[b, t, d] + bias[t]: hidden (B, T, H), weight (T, H), bias (T,)."""
    return (weight * hidden).sum(dim=-1) + bias


class RAMTagger(nn.Module):
    """A model of the family (``config.kind``). ``label_embed`` holds the default vocabulary in the official
    layout: (T*D, E), rows grouped by tag. ``tags`` carries that vocabulary's names and thresholds.

    With ``config.captioning``, also the captioning branch: ``tag_encoder`` (a ``TagEncoder``) and
    ``text_decoder`` (a ``TextDecoder``). As upstream, the tagging head's layers are the tag encoder's
    first layers (the same parameters under both names)."""

    def __init__(self, config: RAMConfig, tags: Optional[TagSet] = None):
        super().__init__()
        self.config = config
        self.tags = tags if tags is not None else tags_for(config.num_tags)
        if len(self.tags) != config.num_tags:
            raise ValueError(f"RAMTagger: {len(self.tags)} tag names for a model with {config.num_tags} tags")
        tag2text = config.kind == "tag2text"
        self.visual_encoder = SwinTransformer(config.swin)
        if not tag2text:  # Tag2Text's heads read Swin's tokens directly
            self.image_proj = nn.Linear(config.swin.num_features, config.embed_dim)
        self.label_embed = nn.Parameter(torch.zeros(config.label_rows, config.embed_dim))
        if config.kind == "ram_plus":
            self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if not tag2text:  # Tag2Text's label table is already in the head's space
            self.wordvec_proj = nn.Linear(config.embed_dim, config.decoder.hidden_size)
        self.tagging_head = AlignmentDecoder(config.decoder, config.image_embed_dim)
        if tag2text:
            self.fc = GroupWiseLinear(config.num_tags, config.decoder.hidden_size)
        else:
            self.fc = nn.Linear(config.decoder.hidden_size, 1)
        captioning = config.captioning
        if captioning is not None:
            self.tag_encoder = TagEncoder(captioning.tag_encoder)
            self.text_decoder = TextDecoder(captioning.text_decoder, captioning.tie_word_embeddings)
            for head_layer, encoder_layer in zip(self.tagging_head.encoder.layer, self.tag_encoder.encoder.layer):
                share_parameters(head_layer, encoder_layer)

    # -- the two exported halves -------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> image_embeds (B, 1+N, ``config.image_embed_dim``)."""
        tokens = self.visual_encoder(pixel_values)
        return tokens if self.config.kind == "tag2text" else self.image_proj(tokens)

    def decode(
        self,
        image_embeds: torch.Tensor,
        label_embed: torch.Tensor,
        label_mask: torch.Tensor,
        label_fc_weight: Optional[torch.Tensor] = None,
        label_fc_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """image_embeds (B, 1+N, E_img), label_embed (T, D, E), label_mask (T, D) bool -> logits (B, T).

        Tag2Text also takes each tag's classifier row, ``label_fc_weight`` (T, H) and ``label_fc_bias``
        (T,); RAM and RAM++ share one classifier and take neither.
        """
        tag2text = self.config.kind == "tag2text"
        if tag2text != (label_fc_weight is not None and label_fc_bias is not None):
            raise ValueError(
                "decode: Tag2Text scores each tag with its own classifier row: pass label_fc_weight (T, H) and "
                "label_fc_bias (T,) (default_classifier() has the checkpoint's)"
                if tag2text
                else f"decode: {self.config.kind} shares one classifier; label_fc_weight / label_fc_bias do not apply"
            )
        queries = self.tag_embeddings(image_embeds, label_embed, label_mask)
        if not tag2text:
            queries = F.relu(self.wordvec_proj(queries))
        hidden = self.tagging_head(queries, image_embeds)
        if tag2text:
            return group_wise_logits(hidden, label_fc_weight, label_fc_bias)
        return self.fc(hidden).squeeze(-1)

    def tag_embeddings(self, image_embeds: torch.Tensor, label_embed: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """One embedding per tag: (B, T, E) for RAM++ (depends on the image), (1, T, E) for RAM and Tag2Text."""
        if self.config.kind != "ram_plus":
            # Mean of the valid rows: exact for the official D = 1; prompt ensembles for D > 1.
            # torch.where rather than casting the mask: onnxconverter-common's fp16 pass mistypes a
            # Cast to float (it relabels the output float16 but keeps the attribute).
            summed = torch.where(label_mask.unsqueeze(-1), label_embed, 0.0).sum(dim=1)
            count = torch.where(label_mask, 1.0, 0.0).sum(dim=1, keepdim=True)
            return (summed / count).unsqueeze(0)
        num_tags, num_desc, dim = label_embed.shape
        image_cls = F.normalize(image_embeds[:, 0, :], dim=-1)  # (B, E)
        # The temperature scales the (B, E) image side, not the (B, T*D) product: same value, and OpenVINO
        # otherwise folds the scale into the whole label table on every call (measured 1.6-1.9x slower).
        scores = (self.reweight_scale.exp() * image_cls) @ label_embed.reshape(-1, dim).t()  # (B, T*D)
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

    def default_classifier(self) -> Dict[str, torch.Tensor]:
        """The checkpoint's per-tag classifier rows, as ``decode``'s keyword arguments: Tag2Text's
        ``label_fc_weight`` (T, H) and ``label_fc_bias`` (T,); empty for RAM / RAM++ (one shared ``fc``)."""
        if self.config.kind != "tag2text":
            return {}
        return {"label_fc_weight": self.fc.W.detach()[0], "label_fc_bias": self.fc.b.detach()[0]}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits (B, T) over the default vocabulary, as the reference implementation computes them."""
        return self.decode(self.encode_image(pixel_values), *self.default_vocabulary(), **self.default_classifier())

    # -- captioning (config.captioning) ------------------------------------------------------------
    def encode_tags(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tag prompt ids (B, L) with their mask, against image_embeds (B, 1+N, E_img) -> tag states (B, L, H)."""
        if self.config.captioning is None:
            raise ValueError(f"encode_tags: this {self.config.kind} model was built without its captioning branch")
        return self.tag_encoder(input_ids, attention_mask, image_embeds)
