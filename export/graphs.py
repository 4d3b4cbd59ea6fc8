"""What each graph of a bundle is, as data (cf. Optimum's export configs): the module traced, names,
dynamic axes and example inputs. One generic routine (``onnx_export.trace_to_onnx``) traces any of them.

* ``encoder`` / ``decoder``: the image path of RAM / RAM++ / Tag2Text (they differ only inside
  ``RAMTagger.decode``; Tag2Text's decoder also takes each tag's classifier row, vocabulary data too).
* ``text_encoder``: CLIP's text tower, which turns words into the decoder's tag embeddings.
* ``tag_encoder`` / ``text_decoder``: the captioning branch (Tag2Text; RAM where its widths allow). The tag
  encoder reads the tag prompt against the image and also emits the text decoder's cross-attention keys
  and values, computed once per caption; the text decoder is one graph for the prompt (empty cache) and
  every later step (one token against the cache), so a token costs one step, not a re-run of the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ram_edge import bundle_format as bf
from ram_edge.models import CaptionConfig, RAMTagger
from ram_edge.models.clip_text import ClipTextModel


class EncoderGraph(nn.Module):
    """pixel_values (B, 3, S, S) -> image_embeds (B, 1+N, E)."""

    def __init__(self, model: RAMTagger):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class DecoderGraph(nn.Module):
    """image_embeds (B, 1+N, E), label_embed (T, D, E), label_mask (T, D)[, label_fc_weight (T, H),
    label_fc_bias (T,)] -> logits (B, T). The optional inputs are ``RAMTagger.default_classifier()``'s keys."""

    def __init__(self, model: RAMTagger):
        super().__init__()
        self.model = model
        self.classifier_names = tuple(model.default_classifier())

    def forward(self, image_embeds: torch.Tensor, label_embed: torch.Tensor, label_mask: torch.Tensor,
                *classifier: torch.Tensor) -> torch.Tensor:
        return self.model.decode(image_embeds, label_embed, label_mask, **dict(zip(self.classifier_names, classifier)))


class TagEncoderGraph(nn.Module):
    """tag_input_ids (B, L), tag_attention_mask (B, L), image_embeds (B, 1+N, E) -> tag_states (B, L, H) and
    the text decoder's cross-attention keys / values (layers, 2, B, heads, L, head_dim)."""

    def __init__(self, model: RAMTagger):
        super().__init__()
        self.model = model

    def forward(self, tag_input_ids: torch.Tensor, tag_attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        states = self.model.encode_tags(image_embeds, tag_input_ids, tag_attention_mask)
        return states, self.model.text_decoder.cross_kv(states)


class TextDecoderGraph(nn.Module):
    """input_ids (B, S), cross_kv, past_kv (layers, 2, B, heads, P, head_dim) -> logits (B, S, V) and
    present_kv (layers, 2, B, heads, P + S, head_dim); P = 0 is the prompt."""

    def __init__(self, model: RAMTagger):
        super().__init__()
        self.decoder = model.text_decoder

    def forward(self, input_ids: torch.Tensor, cross_kv: torch.Tensor,
                past_kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.step(input_ids, cross_kv, past_kv)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Tuple  # ints for fixed axes, strings for dynamic ones
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """One graph of the bundle: ``build()`` gives the module to trace, ``example_inputs()`` its tracing
    inputs (every dynamic axis a different size, so the tracer cannot confuse two of them)."""

    name: str  # the manifest's key: "encoder", "decoder", "text_encoder"
    file: str
    build: Callable[[], nn.Module] = field(compare=False, repr=False)
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    example_inputs: Callable[[], Tuple[torch.Tensor, ...]] = field(compare=False, repr=False)

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        return {
            t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
            for t in self.inputs + self.outputs
        }

    def manifest_entry(self) -> dict:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def image_graph_specs(model: RAMTagger) -> Tuple[GraphSpec, GraphSpec]:
    """The encoder and the decoder of a RAM / RAM++ / Tag2Text model."""
    config = model.config
    size, tokens, dim = config.image_size, config.swin.num_tokens, config.embed_dim
    image_embeds = TensorSpec(bf.IMAGE_EMBEDS, ("batch", tokens, config.image_embed_dim), "float32")
    hidden = config.decoder.hidden_size
    # Tag2Text's per-tag classifier rows, by the names decode() takes them under (vocabulary per-tag arrays).
    classifier_shapes = {bf.LABEL_FC_WEIGHT: ("tags", hidden), bf.LABEL_FC_BIAS: ("tags",)}
    classifier = [TensorSpec(name, classifier_shapes[name], "float32") for name in model.default_classifier()]

    def encoder_inputs() -> Tuple[torch.Tensor, ...]:
        return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    def decoder_inputs() -> Tuple[torch.Tensor, ...]:
        # 2 images, 3 tags, 5 descriptions, one tag padded: real values, so nothing folds to a special case.
        generator = torch.Generator().manual_seed(0)
        embeds = torch.randn(2, tokens, config.image_embed_dim, generator=generator)
        label_embed = torch.nn.functional.normalize(torch.randn(3, 5, dim, generator=generator), dim=-1)
        label_mask = torch.ones(3, 5, dtype=torch.bool)
        label_mask[1, 3:] = False
        rows = tuple(torch.randn(3, *spec.shape[1:], generator=generator) for spec in classifier)
        return (embeds, label_embed, label_mask) + rows

    encoder = GraphSpec(
        "encoder",
        bf.ENCODER_FILE,
        lambda: EncoderGraph(model),
        [TensorSpec(bf.PIXEL_VALUES, ("batch", 3, size, size), "float32")],
        [image_embeds],
        encoder_inputs,
    )
    decoder = GraphSpec(
        "decoder",
        bf.DECODER_FILE,
        lambda: DecoderGraph(model),
        [
            image_embeds,
            TensorSpec(bf.LABEL_EMBED, ("tags", "descriptions", dim), "float32"),
            TensorSpec(bf.LABEL_MASK, ("tags", "descriptions"), "bool"),
            *classifier,
        ],
        [TensorSpec(bf.LOGITS, ("batch", "tags"), "float32")],
        decoder_inputs,
    )
    return encoder, decoder


def sample_tag_prompts(caption: CaptionConfig, lengths: Tuple[int, ...], width: int, seed: int = 0):
    """(len(lengths), width) int64 tag-prompt ids shaped like upstream's tokenizer output ([ENC], random word
    ids, [SEP] at length-1, [PAD] after) and the matching int64 attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), caption.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        ids[row, 0] = caption.enc_token_id
        ids[row, 1 : length - 1] = torch.randint(1000, caption.tag_encoder.vocab_size - 2, (length - 2,),
                                                 generator=generator)
        ids[row, length - 1] = caption.eos_token_id
        mask[row, :length] = 1
    return ids, mask


def caption_graph_specs(model: RAMTagger) -> Tuple[GraphSpec, GraphSpec]:
    """The tag encoder and the cached text decoder of a model with a captioning branch.

    The decoder's cache is one stacked tensor per direction: ``past_kv`` / ``present_kv`` (layers, 2,
    batch, heads, positions, head_dim), index 0 keys, 1 values (``TextDecoder.step``): a fixed number of
    graph inputs whatever the depth, and a beam reorder is one gather on axis 2."""
    config = model.config
    caption = config.captioning
    if caption is None:
        raise ValueError(f"this {config.kind} model has no captioning branch (load it with captioning=True)")
    text = caption.text_decoder
    layers, heads, head_dim = text.num_layers, text.num_heads, text.head_dim
    tokens, width = config.swin.num_tokens, config.image_embed_dim

    def cache(positions: str) -> Tuple:
        return (layers, 2, "batch", heads, positions, head_dim)

    def tag_encoder_inputs() -> Tuple[torch.Tensor, ...]:
        # 2 images, 7 tag positions (one row padded), so no dynamic size equals another or the 40 of use.
        ids, mask = sample_tag_prompts(caption, (7, 4), 7)
        return ids, mask, torch.randn(2, tokens, width, generator=torch.Generator().manual_seed(1))

    def text_decoder_inputs() -> Tuple[torch.Tensor, ...]:
        # 3 rows, 5 new tokens after 6 cached positions, 7 tag positions: all different, none a fixed size.
        generator = torch.Generator().manual_seed(2)
        ids = torch.randint(1000, text.vocab_size - 2, (3, 5), generator=generator)
        return (ids, torch.randn(layers, 2, 3, heads, 7, head_dim, generator=generator),
                torch.randn(layers, 2, 3, heads, 6, head_dim, generator=generator))

    tag_encoder = GraphSpec(
        "tag_encoder",
        bf.TAG_ENCODER_FILE,
        lambda: TagEncoderGraph(model),
        [
            TensorSpec(bf.TAG_INPUT_IDS, ("batch", "tag_tokens"), "int64"),
            TensorSpec(bf.TAG_ATTENTION_MASK, ("batch", "tag_tokens"), "int64"),
            TensorSpec(bf.IMAGE_EMBEDS, ("batch", tokens, width), "float32"),
        ],
        [
            TensorSpec(bf.TAG_STATES, ("batch", "tag_tokens", caption.tag_encoder.hidden_size), "float32"),
            TensorSpec(bf.CROSS_KV, cache("tag_tokens"), "float32"),
        ],
        tag_encoder_inputs,
    )
    text_decoder = GraphSpec(
        "text_decoder",
        bf.TEXT_DECODER_FILE,
        lambda: TextDecoderGraph(model),
        [
            TensorSpec(bf.INPUT_IDS, ("batch", "new_tokens"), "int64"),
            TensorSpec(bf.CROSS_KV, cache("tag_tokens"), "float32"),
            TensorSpec(bf.PAST_KV, cache("past"), "float32"),
        ],
        [
            TensorSpec(bf.LOGITS, ("batch", "new_tokens", text.vocab_size), "float32"),
            TensorSpec(bf.PRESENT_KV, cache("present"), "float32"),
        ],
        text_decoder_inputs,
    )
    return tag_encoder, text_decoder


def sample_token_ids(model: ClipTextModel, lengths: Tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(len(lengths), max(lengths)) int64 ids shaped like tokenizer output: start token, random BPE ids,
    the end token (the largest id) at position length-1, zero padding after it."""
    config = model.config
    sot, eot = config.vocab_size - 2, config.vocab_size - 1
    width = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        ids[row, 0] = sot
        ids[row, 1 : length - 1] = torch.randint(1, sot, (length - 2,), generator=generator)
        ids[row, length - 1] = eot
    return ids


def text_encoder_spec(model: ClipTextModel) -> GraphSpec:
    """input_ids (N, L) int64 -> text_embeds (N, E), N and L dynamic (L <= context length)."""
    context = model.config.context_length
    return GraphSpec(
        "text_encoder",
        bf.TEXT_ENCODER_FILE,
        lambda: model,
        [TensorSpec(bf.INPUT_IDS, ("texts", "tokens"), "int64")],
        [TensorSpec(bf.TEXT_EMBEDS, ("texts", model.config.embed_dim), "float32")],
        # 3 texts, 7 tokens: neither size equals another axis or the context length.
        lambda: (sample_token_ids(model, (7, 4, 6 if context > 7 else 3)),),
    )
