"""Precision conversions of exported graphs.

fp16: weights and math in float16 where it is safe; the ops below stay float32 because they reduce
over many values or exponentiate (LayerNorm variance, softmax, the L2 norm and exp of RAM++'s
reweighting), where float16 overflows or loses the small differences that decide a score. Inputs and
outputs stay float32, so every precision is fed the same way.
"""

from __future__ import annotations

import warnings

import onnx

FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSum", "Exp", "Pow", "Sqrt", "Div"]

#: Max |logit| error of the whole pipeline against torch fp32 that an export accepts, by precision.
#: fp32 is the issue's bound; fp16 is measured in docs/precision.md (worst seen on demo weights
#: and goldens, with margin).
LOGIT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}

PRECISIONS = tuple(LOGIT_TOLERANCE)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight it rounds below fp16's range
        return float16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=FP32_OPS)
