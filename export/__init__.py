"""Export a RAM / RAM++ model to a bundle: ONNX graphs (encoder, decoder, optionally CLIP's text encoder),
the vocabulary, a manifest.

Needs the ``[export]`` extra (torch, onnx, onnxconverter-common). The names below are imported on first
use (PEP 562), so ``ram_edge.export.options`` / ``.precision`` load without torch: ``ram-export`` checks
its arguments before the heavy imports.
"""

import importlib

_EXPORTS = {
    "DEFAULT_MAX_BATCH": "options", "DEFAULT_OPSET": "options", "ExportError": "options",
    "check_export_options": "options", "LOGIT_TOLERANCE": "precision", "PRECISIONS": "precision",
    "CALIBRATION_METHODS": "precision", "ExportResult": "bundle", "VerificationError": "bundle",
    "AccuracyError": "bundle", "add_text_encoder": "bundle", "default_vocabulary": "bundle",
    "export_bundle": "bundle", "CalibrationOptions": "int8", "DEFAULT_SENSITIVITY_IMAGES": "options",
    "quantization_groups": "int8",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
