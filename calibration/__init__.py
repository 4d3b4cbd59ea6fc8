"""INT8 calibration and accuracy: which images calibrate and which evaluate (``images``), the data readers
that feed ``onnxruntime.quantization`` from image folders through the runtime's preprocessing
(``readers``), and the accuracy report of a lower-precision bundle against fp32 (``accuracy``).

The quantization algorithm stays onnxruntime's (``ram_edge.export.precision.to_int8``); this package
only supplies its data. Needs onnxruntime (a runtime dependency) and onnx (``[export]``).
"""

from .accuracy import (
    DEFAULT_MAX_FLIP_RATE, DEFAULT_MIN_TOP10_AGREEMENT, TOP_K, AccuracyLimits, AccuracyReport, compare_logits,
    report_table,
)
from .images import (
    DEFAULT_CALIBRATION_SIZE, DEFAULT_EVAL_SIZE, HOLD_OUT_FRACTION, CalibrationError, ImageSplit, evaluation_images,
    list_images, split_images,
)

_READERS = ("EmbeddingReader", "ImageReader")  # onnxruntime.quantization (and onnx): imported on first use


def __getattr__(name):
    if name in _READERS:
        from . import readers

        return getattr(readers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AccuracyLimits",
    "AccuracyReport",
    "CalibrationError",
    "DEFAULT_CALIBRATION_SIZE",
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_MAX_FLIP_RATE",
    "DEFAULT_MIN_TOP10_AGREEMENT",
    "EmbeddingReader",
    "HOLD_OUT_FRACTION",
    "ImageReader",
    "ImageSplit",
    "TOP_K",
    "compare_logits",
    "evaluation_images",
    "list_images",
    "report_table",
    "split_images",
]
