"""Tokenizer files shipped with the package (numpy-free, torch-free).

They live here, in the ground both sides share, so the exporter can copy them into bundles without
importing the runtime, and the runtime can read them without a bundle.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

#: OpenAI CLIP's byte-level BPE merges (MIT, ``LICENSE`` and ``NOTICE.md`` beside it).
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def clip_bpe_path() -> Path:
    """Path of the packaged ``bpe_simple_vocab_16e6.txt.gz`` (a real file: the package installs unzipped)."""
    return Path(os.fspath(resources.files("ram_edge").joinpath("data", "tokenizers", "clip", CLIP_BPE_FILE)))
