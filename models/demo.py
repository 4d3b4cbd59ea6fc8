"""Seeded random ("demo") weights for any configuration, so the whole pipeline runs without a checkpoint.

Same seed, same configuration, same torch version: the same weights. Label embeddings are unit-norm rows,
like the CLIP text embeddings of the real vocabularies. Parameters the architecture ties (Tag2Text's
tagging head and tag encoder, the LM head and its word embeddings) are drawn once.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Union

import torch

from ram_edge.tags import TagSet

from .config import CaptionConfig, RAMConfig, TextConfig, official_captioning, preset
from .tagging import RAMTagger

WEIGHT_STD = 0.02


def demo_config(name: str, captioning: Optional[bool] = None) -> RAMConfig:
    """The preset ``name``, with its captioning branch as asked: ``None`` as the preset has it (Tag2Text's
    do, RAM's do not), ``False`` none, ``True`` one (RAM: the official 12 + 12 BERT-base layers over a
    full-size tagging head, else BERTs the size of the tagging head, which shares their first layers)."""
    config = preset(name)
    if captioning is False:
        return replace(config, captioning=None)
    if captioning and config.captioning is None:
        if config.kind == "ram_plus":
            raise ValueError("RAM++ has no captioning branch")
        head = config.decoder
        if (head.hidden_size, head.intermediate_size) == (768, 3072):
            return replace(config, captioning=official_captioning(config.image_embed_dim))
        text = TextConfig(hidden_size=head.hidden_size, num_heads=head.num_heads,
                          intermediate_size=head.intermediate_size, num_layers=head.num_layers)
        return replace(config, captioning=CaptionConfig(tag_encoder=replace(text, encoder_width=config.image_embed_dim),
                                                        text_decoder=replace(text, encoder_width=text.hidden_size)))
    return config


@torch.no_grad()
def demo_model(config: Union[str, RAMConfig], seed: int = 0, tags: Optional[TagSet] = None, num_tags: Optional[int] = None) -> RAMTagger:
    """A model of ``config`` (a preset name or a RAMConfig) with seeded random weights, in eval mode.

    ``num_tags`` shrinks or grows the default vocabulary (names ``tag_<i>`` unless ``tags`` is given).
    """
    if isinstance(config, str):
        config = preset(config)
    if tags is not None:
        num_tags = len(tags)
    if num_tags is not None and num_tags != config.num_tags:
        config = replace(config, num_tags=num_tags)
    model = RAMTagger(config, tags)
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        # Truncated at 2 std like timm's trunc_normal_, drawn from our generator for reproducibility.
        return (torch.randn(shape, generator=generator) * std).clamp_(-2 * std, 2 * std)

    for name, param in model.named_parameters():
        if name == "label_embed":
            # Like CLIP text embeddings of one tag's descriptions: unit-norm, close to a per-tag
            # direction (cosine about 0.75), so RAM++'s reweighted average keeps a norm near 1.
            tags, dim = model.config.num_tags, model.config.embed_dim
            base = torch.randn(tags, 1, dim, generator=generator)
            rows = base + 0.6 * torch.randn(tags, model.config.descriptions_per_tag, dim, generator=generator)
            rows = rows.reshape(param.shape)
            param.copy_(rows / rows.norm(dim=-1, keepdim=True))
        elif name == "reweight_scale":
            param.fill_(math.log(1 / 0.07))  # CLIP's initial temperature
        elif "norm" in name.lower() and param.ndim == 1:
            # LayerNorm: weight near 1, bias near 0 (not exactly, so tests see non-trivial affine terms).
            base = 1.0 if name.endswith("weight") else 0.0
            param.copy_(base + normal(param.shape, WEIGHT_STD))
        elif name == "wordvec_proj.weight":
            # Queries of unit scale, so tags differ from each other as much as the image tokens do
            # (at 0.02 every tag would see the same image summary and score alike).
            param.copy_(normal(param.shape, 1.0 / math.sqrt(param.shape[1])))
        elif name in ("fc.weight", "fc.W"):
            # The decoder output is LayerNorm-ed; this spreads logits over tags to a std of 1-2 (measured
            # on the tiny and Swin-L presets), so demo probabilities cover (0, 1) rather than sit at 0.5.
            # (RAM's shared row is (1, H), Tag2Text's per-tag rows (1, T, H).)
            param.copy_(normal(param.shape, 2.4 / math.sqrt(param.shape[-1])))
        else:
            param.copy_(normal(param.shape, WEIGHT_STD))
    for module in model.modules():
        if hasattr(module, "refresh_bias"):
            module.refresh_bias()
    return model.eval()
