"""The bundle on disk: the one contract between ``ram_edge.export`` (writer) and ``ram_edge.runtime``
(reader). Numpy-free and torch-free. The full specification is ``docs/bundle.md``.

A bundle directory holds::

    manifest.json            written last: a directory without it is not a bundle
    encoder.onnx             pixel_values (B,3,S,S) float32 -> image_embeds (B,1+N,E) float32
    decoder.onnx             image_embeds (B,1+N,E), label_embed (T,D,E) float32, label_mask (T,D) bool
                             [, Tag2Text: label_fc_weight (T,H), label_fc_bias (T,) float32] -> logits (B,T) float32
    vocabulary/              the default vocabulary, in the format of ``ram_edge.vocabulary``
    text_encoder.onnx        optional: input_ids (N,L) int64 -> text_embeds (N,E) float32 (CLIP's text tower)
    tokenizer/               with the text encoder: the CLIP BPE merges and their licence
    tag_encoder.onnx         optional (captioning): tag_input_ids (B,L) int64, tag_attention_mask (B,L) int64,
                             image_embeds (B,1+N,E) -> tag_states (B,L,H), cross_kv (layers,2,B,heads,L,hd)
    text_decoder.onnx        with the tag encoder: input_ids (B,S) int64, cross_kv, past_kv (layers,2,B,heads,P,hd)
                             -> logits (B,S,V), present_kv (layers,2,B,heads,P+S,hd)
    caption_tokenizer/       with the captioning graphs: BERT's WordPiece vocab.txt and its licence
    NOTICE.recognize-anything.txt   when the official (RAM / RAM++ or Tag2Text) tag data is included
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Union

FORMAT_NAME = "ram-edge-bundle"
FORMAT_VERSION = 1

MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
VOCABULARY_DIR = "vocabulary"
TEXT_ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_DIR = "tokenizer"
TAG_ENCODER_FILE = "tag_encoder.onnx"
TEXT_DECODER_FILE = "text_decoder.onnx"
CAPTION_TOKENIZER_DIR = "caption_tokenizer"

# Graph input / output names (also recorded in the manifest, which is what readers should trust).
PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
LABEL_EMBED = "label_embed"
LABEL_MASK = "label_mask"
LOGITS = "logits"
INPUT_IDS = "input_ids"
TEXT_EMBEDS = "text_embeds"
# Tag2Text's per-tag classifier rows: decoder inputs fed from the vocabulary's per-tag arrays of these names.
LABEL_FC_WEIGHT = "label_fc_weight"
LABEL_FC_BIAS = "label_fc_bias"
# Captioning graphs.
TAG_INPUT_IDS = "tag_input_ids"
TAG_ATTENTION_MASK = "tag_attention_mask"
TAG_STATES = "tag_states"
CROSS_KV = "cross_kv"
PAST_KV = "past_kv"
PRESENT_KV = "present_kv"

# Upstream preprocessing (ARCHITECTURE.md): RGB, Pillow bilinear resize to S x S, /255, normalise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupt or of an unsupported format."""


def sha256_file(path: Union[str, os.PathLike], chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def preprocessing_spec(image_size: int) -> Dict[str, Any]:
    return {
        "color": "RGB",
        "resize": [image_size, image_size],
        "interpolation": "bilinear",
        "antialias": True,
        "keep_aspect_ratio": False,
        "scale": 1.0 / 255.0,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layout": "NCHW",
        "dtype": "float32",
    }


def read_manifest(bundle_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Parse ``manifest.json`` and check the format; file hashes are checked by the runtime's loader."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.exists():
        raise BundleError(f"{bundle_dir}: no such bundle folder. Pass the folder that `ram-export --out` wrote.")
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: a file, not a bundle folder. Pass the folder that `ram-export --out` wrote.")
    if not path.is_file():
        raise BundleError(
            f"{bundle_dir}: no {MANIFEST_FILE}, so this is not a complete bundle (an export that failed or was "
            "interrupted leaves none). Re-run `ram-export`."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e}). Re-run `ram-export`.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: not a ram-edge bundle manifest (format is {manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version}, this ram-edge reads version {FORMAT_VERSION}. "
            "Re-export the bundle with this ram-edge, or install the ram-edge that wrote it."
        )
    return manifest


def write_json(path: Union[str, os.PathLike], data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


@contextmanager
def staged_directory(out_dir: Union[str, os.PathLike]) -> Iterator[Path]:
    """A fresh hidden sibling of ``out_dir`` to write into; renamed onto ``out_dir`` only if the block
    succeeds (an old ``out_dir`` disappears only once the new one is complete), removed if it fails or
    is interrupted. Bundles and vocabulary folders are written this way."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
