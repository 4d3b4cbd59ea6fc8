"""Export a RAM / RAM++ model to a bundle: ONNX graphs (encoder, decoder, optionally CLIP's text encoder),
the vocabulary, a manifest.

Needs the ``[export]`` extra (torch, onnx, onnxconverter-common).
"""

from .bundle import (
    DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportError, ExportResult, VerificationError, add_text_encoder,
    check_export_options, default_vocabulary, export_bundle,
)
from .precision import LOGIT_TOLERANCE, PRECISIONS

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_OPSET",
    "ExportError",
    "ExportResult",
    "LOGIT_TOLERANCE",
    "PRECISIONS",
    "VerificationError",
    "add_text_encoder",
    "check_export_options",
    "default_vocabulary",
    "export_bundle",
]
