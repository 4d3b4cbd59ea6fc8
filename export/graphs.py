"""What the two graphs are, as data (cf. Optimum's export configs): names, dynamic axes, dummy inputs.

RAM and RAM++ differ only inside ``RAMTagger.decode``; the graph specs are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ram_edge import bundle_format as bf
from ram_edge.models import RAMTagger


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
    name: str  # "encoder" | "decoder"
    file: str
    wrapper: Callable[[RAMTagger], nn.Module]
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]

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


def graph_specs(model: RAMTagger) -> Tuple[GraphSpec, GraphSpec]:
    config = model.config
    size, tokens, dim = config.image_size, config.swin.num_tokens, config.embed_dim
    image_embeds = TensorSpec(bf.IMAGE_EMBEDS, ("batch", tokens, dim), "float32")
    encoder = GraphSpec(
        "encoder",
        bf.ENCODER_FILE,
        EncoderGraph,
        [TensorSpec(bf.PIXEL_VALUES, ("batch", 3, size, size), "float32")],
        [image_embeds],
    )
    decoder = GraphSpec(
        "decoder",
        bf.DECODER_FILE,
        DecoderGraph,
        [
            image_embeds,
            TensorSpec(bf.LABEL_EMBED, ("tags", "descriptions", dim), "float32"),
            TensorSpec(bf.LABEL_MASK, ("tags", "descriptions"), "bool"),
        ],
        [TensorSpec(bf.LOGITS, ("batch", "tags"), "float32")],
    )
    return encoder, decoder


def dummy_inputs(model: RAMTagger, spec: GraphSpec) -> Tuple[torch.Tensor, ...]:
    """Tracing inputs whose dynamic sizes are all different (2 images, 3 tags, 5 descriptions), so no
    two dynamic axes can be confused by the tracer; real values, so nothing folds to a special case."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if spec.name == "encoder":
        return (torch.randn(2, 3, config.image_size, config.image_size, generator=generator),)
    image_embeds = torch.randn(2, config.swin.num_tokens, config.embed_dim, generator=generator)
    label_embed = torch.nn.functional.normalize(torch.randn(3, 5, config.embed_dim, generator=generator), dim=-1)
    label_mask = torch.ones(3, 5, dtype=torch.bool)
    label_mask[1, 3:] = False
    return image_embeds, label_embed, label_mask
