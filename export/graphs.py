"""What each graph of a bundle is, as data (cf. Optimum's export configs): the module traced, names,
dynamic axes and example inputs. One generic routine (``onnx_export.trace_to_onnx``) traces any of them.

* ``encoder`` / ``decoder``: the image path of RAM / RAM++ (they differ only inside ``RAMTagger.decode``).
* ``text_encoder``: CLIP's text tower, which turns words into the decoder's tag embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ram_edge import bundle_format as bf
from ram_edge.models import RAMTagger
from ram_edge.models.clip_text import ClipTextModel


class EncoderGraph(nn.Module):
    """pixel_values (B, 3, S, S) -> image_embeds (B, 1+N, E)."""

    def __init__(self, model: RAMTagger):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class DecoderGraph(nn.Module):
    """image_embeds (B, 1+N, E), label_embed (T, D, E), label_mask (T, D) -> logits (B, T)."""

    def __init__(self, model: RAMTagger):
        super().__init__()
        self.model = model

    def forward(self, image_embeds: torch.Tensor, label_embed: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        return self.model.decode(image_embeds, label_embed, label_mask)


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
    """The encoder and the decoder of a RAM / RAM++ model."""
    config = model.config
    size, tokens, dim = config.image_size, config.swin.num_tokens, config.embed_dim
    image_embeds = TensorSpec(bf.IMAGE_EMBEDS, ("batch", tokens, dim), "float32")

    def encoder_inputs() -> Tuple[torch.Tensor, ...]:
        return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    def decoder_inputs() -> Tuple[torch.Tensor, ...]:
        # 2 images, 3 tags, 5 descriptions, one tag padded: real values, so nothing folds to a special case.
        generator = torch.Generator().manual_seed(0)
        embeds = torch.randn(2, tokens, dim, generator=generator)
        label_embed = torch.nn.functional.normalize(torch.randn(3, 5, dim, generator=generator), dim=-1)
        label_mask = torch.ones(3, 5, dtype=torch.bool)
        label_mask[1, 3:] = False
        return embeds, label_embed, label_mask

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
        ],
        [TensorSpec(bf.LOGITS, ("batch", "tags"), "float32")],
        decoder_inputs,
    )
    return encoder, decoder


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
