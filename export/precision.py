"""Precision conversions of exported graphs.

int8 (static, calibrated): ``onnxruntime.quantization.quantize_static`` in QDQ form -- QuantizeLinear /
DequantizeLinear pairs in front of the inputs of every MatMul, Conv and Gemm it is asked to quantize
(:data:`INT8_OP_TYPES`), int8 weights per output channel, int8 activations per tensor, all symmetric
(zero points 0). That is the explicit-quantization form TensorRT builds int8 engines from, and
onnxruntime (CPU) and OpenVINO run the same file. Activation ranges come from calibration images
(``ram_edge.calibration`` readers, one image at a time); which products stay float is decided per
export by a sensitivity measurement (``export/int8.py``), not here.

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

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # onnx is imported where it is used: ram-export checks its flags before heavy imports
    import onnx

FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSum", "Exp", "Pow", "Sqrt", "Div"]

#: Max |logit| error of the whole pipeline against torch fp32 that an export accepts, by precision.
#: fp32 is the issue's bound; fp16 is measured in docs/precision.md (worst seen on demo weights
#: and goldens, with margin).
#: int8's bound is a sanity check only (the graphs run and compute the model): the export's check images
#: are uniform noise, far from the photos it was calibrated on; its accuracy is the report on held-out
#: images (``ram_edge.calibration.accuracy``), checked against the user's limits.
LOGIT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int8-dynamic": 0.5, "int8": 2.0}

PRECISIONS = tuple(LOGIT_TOLERANCE)

#: Ops whose inputs a static int8 graph quantizes: the products, where int8 kernels exist on every
#: backend. Softmax, LayerNorm, GELU and the residual adds stay float: no backend runs them faster in
#: int8, and a Q/DQ pair in front of them would only add rounding. Outputs are not quantized (the
#: bias add and what follows read float), as TensorRT's explicit-quantization guide places Q/DQ.
INT8_OP_TYPES = ("MatMul", "Conv", "Gemm")

#: ``--int8-weight-bits`` -> the symmetric int8 range of the weights. 7 (the default) is onnxruntime's
#: ``reduce_range``: x86 CPUs without VNNI (AVX2 only, like an earlier dev machine) multiply u8 x s8 with
#: ``vpmaddubsw``, which saturates the int16 sum of two products; with full-range weights onnxruntime and
#: OpenVINO then computed up to 0.30 away from the graph's own Q/DQ arithmetic (tiny demo encoder), with
#: 7-bit weights within 0.03 / 0.05. The graph stays plain symmetric int8 for TensorRT and VNNI CPUs, and
#: its accuracy report holds on every backend and CPU instead of only on the one it was measured on.
#: 8 is the full range, for bundles that only run where products do not saturate (CPUs with AVX-512 VNNI /
#: AVX-VNNI / AMX, TensorRT).
WEIGHT_RANGES = {7: (-64, 64), 8: (-127, 127)}
WEIGHT_BITS = tuple(WEIGHT_RANGES)

#: --calibration-method -> onnxruntime's CalibrationMethod member name.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

#: The text encoder runs once per vocabulary build, so exactness is worth more than speed: fp32 unless
#: asked. Max |text embedding error| against torch fp32 that an export accepts (CLIP's raw text
#: embeddings have components up to ~1; they are normalised before use).
TEXT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
TEXT_PRECISIONS = tuple(TEXT_TOLERANCE)

#: The captioning graphs' precision in a bundle of each precision. int8-dynamic keeps them fp32: dynamic
#: int8 moved the text decoder's next-token logits by up to 9.8 on golden/tag2text_tiny_384 (fp32: 2e-5,
#: fp16: 3e-2), which changes captions; a caption's cost is the decoder steps, matrix-vector products that
#: dynamic activation quantization does not speed up much anyway.
#: Static int8 keeps them fp32 too: its calibration and accuracy report cover the tagging graphs only.
CAPTION_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8-dynamic": "fp32", "int8": "fp32"}

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
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

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


def to_int8(fp32_path: Path, out_path: Path, *, reader=None, cache_path: Path, method: str = "minmax",
            weight_bits: int = 7, nodes_to_quantize: Optional[Sequence[str]] = None,
            nodes_to_exclude: Optional[Sequence[str]] = None) -> onnx.ModelProto:
    """Static int8 (QDQ) of the fp32 graph at ``fp32_path``, written to ``out_path`` and returned.

    ``reader``: a ranged ``CalibrationDataReader`` (``ram_edge.calibration``); calibration runs once per
    graph and its tensor ranges are kept in ``cache_path``, so further calls with another choice of
    nodes (the sensitivity measurement) pass ``reader=None`` and reuse them. ``nodes_to_quantize``: only
    these nodes (None: every node of :data:`INT8_OP_TYPES`); ``nodes_to_exclude``: these stay float.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits {weight_bits!r}: choose one of {', '.join(map(str, WEIGHT_BITS))}")
    if nodes_to_quantize is not None and not nodes_to_quantize:
        raise ValueError("nodes_to_quantize is empty: nothing would be quantized")
    extra_options = {
        "ActivationSymmetric": True,  # zero point 0: TensorRT's explicit quantization requires it
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,  # ranges symmetric about 0 for every method, as the Q/DQ are
        "OpTypesToExcludeOutputQuantization": list(INT8_OP_TYPES),
        # Biases stay float: TensorRT's parser takes int8 (not int32) into DequantizeLinear, and the add
        # is float anyway behind an unquantized output.
        "QuantizeBias": False,
        # Calibrate one image at a time and merge the statistics: memory for one image's tensors. (The
        # option is named for MinMax, but onnxruntime strides every method's data collection.)
        "CalibStridedMinMax": 1,
    }
    quantizer_log = logging.getLogger()
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)  # it advises shape-inference pre-processing on every call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(fp32_path), str(out_path), reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES),
                per_channel=True,
                reduce_range=weight_bits == 7,  # see WEIGHT_RANGES
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes_to_quantize or []),
                nodes_to_exclude=list(nodes_to_exclude or []),
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options=extra_options,
                calibration_cache_path=str(cache_path),
            )
    finally:
        quantizer_log.setLevel(level)
    return onnx.load(str(out_path))


def quantized_nodes(proto: onnx.ModelProto) -> Dict[str, Tuple[str, ...]]:
    """{node name: its inputs that come out of a DequantizeLinear} for every node of ``proto`` fed by one."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    found = {}
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            inputs = [i for i in node.input if i in dequantized]
            if inputs:
                found[node.name] = tuple(inputs)
    return found


def with_quantized_subset(fp32: onnx.ModelProto, qdq: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    """``fp32`` with the Q/DQ pairs that ``qdq`` (the same graph through :func:`to_int8`) puts on the inputs
    of ``nodes``, and no others: a variant for measuring which nodes to quantize, built from onnxruntime's
    own scales and int8 weights in a second instead of quantizing the whole graph again.

    Like onnxruntime's quantizer, a quantized tensor is read through its DequantizeLinear by every
    consumer (a Shape beside the MatMul too), so the variant computes what ``to_int8`` would write for
    the same ``nodes``: ``quantized_nodes`` of both agree.
    """
    import onnx

    wanted = set(nodes)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    qdq_nodes = {n.name: n for n in qdq.graph.node}
    pairs: Dict[str, List[onnx.NodeProto]] = {}  # float tensor -> its [QuantizeLinear,] DequantizeLinear
    for node in fp32.graph.node:
        if node.name not in wanted:
            continue
        for original, quantized in zip(node.input, qdq_nodes[node.name].input):
            if original == quantized or original in pairs:
                continue
            dq = producer[quantized]
            q = producer.get(dq.input[0])
            pairs[original] = ([q] if q is not None and q.op_type == "QuantizeLinear" else []) + [dq]
    rename = {tensor: chain[-1].output[0] for tensor, chain in pairs.items()}
    produced = {o for n in fp32.graph.node for o in n.output}

    variant = onnx.ModelProto()
    variant.CopyFrom(fp32)
    del variant.graph.node[:]
    # Pairs of graph inputs and initializers (weights) first; those of computed tensors after their producer.
    for tensor, chain in pairs.items():
        if tensor not in produced:
            variant.graph.node.extend(chain)
    for node in fp32.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for index, name in enumerate(copy.input):
            if name in rename:
                copy.input[index] = rename[name]
        variant.graph.node.append(copy)
        for output in node.output:
            if output in pairs:
                variant.graph.node.extend(pairs[output])
    have = {i.name for i in fp32.graph.initializer}
    needed = {name for chain in pairs.values() for n in chain for name in n.input}
    variant.graph.initializer.extend(i for i in qdq.graph.initializer if i.name in needed and i.name not in have)
    return variant
