"""Export options and their checks, without torch or onnx: ``ram-export`` refuses bad arguments before it
spends seconds importing torch and building a model."""

from __future__ import annotations

from typing import Optional

from .precision import PRECISIONS, TEXT_PRECISIONS

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization is one node from opset 17 on (TensorRT keeps it accurate in fp16)
DEFAULT_MAX_BATCH = 32
VOCAB_DTYPES = ("auto", "float16", "float32")
#: Calibration images the per-group int8 sensitivity and the choice of float groups are measured on.
DEFAULT_SENSITIVITY_IMAGES = 4


class ExportError(RuntimeError):
    """The export could not produce a bundle; nothing was left at the output path."""


def check_export_options(*, precision: str = "fp32", opset: int = DEFAULT_OPSET, max_batch: int = DEFAULT_MAX_BATCH,
                         vocab_dtype: str = "auto", text_precision: str = "fp32",
                         calibration_images: Optional[str] = None) -> None:
    """Refuse bad export options (in ``ram-export``'s flag names) before any model is built.
    ``calibration_images``: the calibration folder, which int8 needs and no other precision takes."""
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not calibration_images:
        raise ExportError("--precision int8 needs --calibration-images DIR (a few hundred of your own photos)")
    if calibration_images and precision != "int8":
        raise ExportError(f"--calibration-images applies to --precision int8, not {precision}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: use {MIN_OPSET} or newer (LayerNormalization as one node)")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1, got {max_batch}")
    if vocab_dtype not in VOCAB_DTYPES:
        raise ExportError(f"--vocab-dtype {vocab_dtype!r} is not one of {', '.join(VOCAB_DTYPES)}")
    if text_precision not in TEXT_PRECISIONS:
        raise ExportError(f"--text-precision {text_precision!r}: choose one of {', '.join(TEXT_PRECISIONS)}")
