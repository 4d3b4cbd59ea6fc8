"""Torch definitions of the RAM family: the tagging path of RAM++, RAM and Tag2Text, and the captioning
branch (tag encoder, text decoder) of Tag2Text and RAM (export time only; the runtime never imports this).

``load_checkpoint`` reads official checkpoints; ``demo_model`` builds seeded random weights; ``PRESETS``
names the official variants. The names are imported on first use (PEP 562): ``ram_edge.models.config``
(the presets, plain dataclasses) loads without torch, so ``ram-export --help`` and its argument checks
are instant.
"""

import importlib

_EXPORTS = {
    "TagEncoder": "bert", "TextDecoder": "bert",
    "CheckpointError": "checkpoint", "clean_state_dict": "checkpoint", "infer_config": "checkpoint",
    "load_checkpoint": "checkpoint", "read_state_dict": "checkpoint",
    "PRESETS": "config", "CaptionConfig": "config", "DecoderConfig": "config", "RAMConfig": "config",
    "SwinConfig": "config", "TextConfig": "config", "official_captioning": "config", "preset": "config",
    "demo_model": "demo", "SwinTransformer": "swin", "AlignmentDecoder": "tagging", "RAMTagger": "tagging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
