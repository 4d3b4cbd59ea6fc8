"""Torch definitions of the RAM family: the tagging path of RAM++, RAM and Tag2Text, and the captioning
branch (tag encoder, text decoder) of Tag2Text and RAM (export time only; the runtime never imports this).

``load_checkpoint`` reads official checkpoints; ``demo_model`` builds seeded random weights; ``PRESETS``
names the official variants.
"""

from .bert import TagEncoder, TextDecoder
from .checkpoint import CheckpointError, clean_state_dict, infer_config, load_checkpoint, read_state_dict
from .config import PRESETS, CaptionConfig, DecoderConfig, RAMConfig, SwinConfig, TextConfig, official_captioning, preset
from .demo import demo_model
from .swin import SwinTransformer
from .tagging import AlignmentDecoder, RAMTagger

__all__ = [
    "AlignmentDecoder",
    "CaptionConfig",
    "CheckpointError",
    "DecoderConfig",
    "PRESETS",
    "RAMConfig",
    "RAMTagger",
    "SwinConfig",
    "SwinTransformer",
    "TagEncoder",
    "TextConfig",
    "TextDecoder",
    "clean_state_dict",
    "demo_model",
    "infer_config",
    "load_checkpoint",
    "official_captioning",
    "preset",
    "read_state_dict",
]
