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


#: Google BERT's WordPiece vocabulary (bert-base-uncased, Apache-2.0; ``LICENSE`` and ``NOTICE.md`` beside it),
#: the captioning branch's tokenizer (Tag2Text, RAM).
BERT_VOCAB_FILE = "vocab.txt"
BERT_VOCAB_SHA256 = "552e5d877f7906bdcabbdf788e1e5ce172ff18cb02956027791f3576a5e7c821"


def bert_vocab_path() -> Path:
    """Path of the packaged bert-base-uncased ``vocab.txt`` (its folder also holds the licence and notice)."""
    return Path(os.fspath(resources.files("ram_edge").joinpath("data", "tokenizers", "bert-base-uncased", BERT_VOCAB_FILE)))
