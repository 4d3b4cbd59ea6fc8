"""Precision conversions of exported graphs.

int8-dynamic: ``onnxruntime.quantization.quantize_dynamic`` -- every MatMul with a weight operand gets
int8 weights (per output channel) and int8 activations quantized per call (per tensor), run by
onnxruntime's integer GEMMs (VNNI / AMX on recent x86). No calibration data; lossy (see
docs/precision.md): a CPU fast path for onnxruntime, not for TensorRT.

fp16: weights and math in float16 where it is safe; the ops below stay float32 because they reduce
over many values or exponentiate (LayerNorm variance, softmax, the L2 norm and exp of RAM++'s
reweighting), where float16 overflows or loses the small differences that decide a score. Inputs and
outputs stay float32, so every precision is fed the same way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnx is imported where it is used: ram-export checks its flags before heavy imports
    import onnx

FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSum", "Exp", "Pow", "Sqrt", "Div"]

#: Max |logit| error of the whole pipeline against torch fp32 that an export accepts, by precision.
#: fp32 is the issue's bound; fp16 is measured in docs/precision.md (worst seen on demo weights
#: and goldens, with margin).
LOGIT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int8-dynamic": 0.5}

PRECISIONS = tuple(LOGIT_TOLERANCE)

#: The text encoder runs once per vocabulary build, so exactness is worth more than speed: fp32 unless
#: asked. Max |text embedding error| against torch fp32 that an export accepts (CLIP's raw text
#: embeddings have components up to ~1; they are normalised before use).
TEXT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
TEXT_PRECISIONS = tuple(TEXT_TOLERANCE)

#: The captioning graphs' precision in a bundle of each precision. int8-dynamic keeps them fp32: dynamic
#: int8 moved the text decoder's next-token logits by up to 9.8 on golden/tag2text_tiny_384 (fp32: 2e-5,
#: fp16: 3e-2), which changes captions; a caption's cost is the decoder steps, matrix-vector products that
#: dynamic activation quantization does not speed up much anyway.
CAPTION_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8-dynamic": "fp32"}

#: Max |next-token logit error| of the captioning graphs against torch fp32 (the tag encoder, then the
#: decoder's prompt and single-token steps, each fed the cache it returned), by the graphs' precision.
#: Measured on golden/tag2text_tiny_384: fp32 1.8e-5, fp16 2.7e-2 (logits up to ~32).
CAPTION_TOLERANCE = {"fp32": 1e-3, "fp16": 0.15}


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx
    from onnxconverter_common import float16

    float_outputs = {o.name for o in proto.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight it rounds below fp16's range
        converted = float16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=FP32_OPS)
    _restore_float32_outputs(converted, float_outputs)
    return converted


def _restore_float32_outputs(proto: onnx.ModelProto, names) -> None:
    """keep_io_types leaves float16 a graph output that other nodes also read (the tag encoder's
    ``tag_states``, which the cross keys / values are computed from): give those a Cast back to float32,
    the internal float16 tensor renamed, so every precision keeps float32 outputs."""
    import onnx

    graph = proto.graph
    for output in graph.output:
        if output.name not in names or output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        internal = f"{output.name}_fp16"
        for node in graph.node:
            node.input[:] = [internal if name == output.name else name for name in node.input]
            node.output[:] = [internal if name == output.name else name for name in node.output]
        for info in graph.value_info:
            if info.name == output.name:
                info.name = internal
        graph.node.append(onnx.helper.make_node("Cast", [internal], [output.name], to=onnx.TensorProto.FLOAT,
                                                name=f"{output.name}_to_float32"))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def to_int8_dynamic(fp32_path: Path) -> onnx.ModelProto:
    """Dynamic int8 quantization of the fp32 graph at ``fp32_path`` (weights per channel)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    model = onnx.load(str(fp32_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    # Only products with a weight: attention's activation x activation products stay float.
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    del model
    quantized_path = fp32_path.with_name(fp32_path.name + ".int8.tmp")
    quantizer_log = logging.getLogger()
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)  # it advises shape-inference pre-processing on every call
    try:
        quantize_dynamic(str(fp32_path), str(quantized_path), weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes)
        return onnx.load(str(quantized_path))
    finally:
        quantizer_log.setLevel(level)
        quantized_path.unlink(missing_ok=True)
