"""Torch definitions of the RAM family's tagging path (export time only; the runtime never imports this).

``load_checkpoint`` reads official checkpoints; ``demo_model`` builds seeded random weights; ``PRESETS``
names the official variants.
"""

from .checkpoint import CheckpointError, clean_state_dict, infer_config, load_checkpoint, read_state_dict
from .config import PRESETS, DecoderConfig, RAMConfig, SwinConfig, preset
from .demo import demo_model
from .swin import SwinTransformer
from .tagging import AlignmentDecoder, RAMTagger

__all__ = [
    "AlignmentDecoder",
    "CheckpointError",
    "DecoderConfig",
    "PRESETS",
    "RAMConfig",
    "RAMTagger",
    "SwinConfig",
    "SwinTransformer",
    "clean_state_dict",
    "demo_model",
    "infer_config",
    "load_checkpoint",
    "preset",
    "read_state_dict",
]
