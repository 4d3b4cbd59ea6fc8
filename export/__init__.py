"""Export a RAM / RAM++ model to a bundle: two ONNX graphs (encoder, decoder), the vocabulary, a manifest.

Needs the ``[export]`` extra (torch, onnx, onnxconverter-common).
"""

from .bundle import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportError, ExportResult, VerificationError, default_vocabulary, export_bundle
from .precision import LOGIT_TOLERANCE, PRECISIONS

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_OPSET",
    "ExportError",
    "ExportResult",
    "LOGIT_TOLERANCE",
    "PRECISIONS",
    "VerificationError",
    "default_vocabulary",
    "export_bundle",
]
