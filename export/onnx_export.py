"""Tracing one graph to ONNX, and writing it with the bundle's metadata (what Netron shows)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict

import onnx
import torch

from .graphs import GraphSpec
from .options import MIN_OPSET

#: ONNX files are protobufs, capped at 2 GB; larger graphs keep their weights in a side file.
PROTOBUF_LIMIT = 2**31 - 2**26



def trace_to_onnx(spec: GraphSpec, path: Path, opset: int) -> onnx.ModelProto:
    """Trace ``spec``'s module to ``path`` and return the ONNX model (rewritten by ``save_onnx``)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset {MIN_OPSET} or newer")
    module = spec.build().eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is still the one that traces
        # these models to plain, TensorRT-friendly graphs with symbolic batch / tag / token axes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            spec.example_inputs(),
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load(str(path))


def save_onnx(proto: onnx.ModelProto, path: Path, metadata: Dict[str, str]) -> None:
    """Write ``proto`` with ``metadata`` as metadata_props, check it, and keep weights inline below 2 GB."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
    proto.producer_name = "ram-edge"
    large = proto.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
    onnx.checker.check_model(str(path))
