"""``export_bundle``: model -> a complete, verified bundle directory, or nothing.

The bundle is built in a hidden sibling directory and renamed into place only after both graphs passed
verification and the manifest (written last) lists every file's sha256. A failure or Ctrl-C at any
step removes the partial directory, so no runtime ever finds a bundle that looks complete but is not.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

import numpy as np

from ram_edge import __version__
from ram_edge import bundle_format as bf
from ram_edge.models import RAMTagger
from ram_edge.tags import DEFAULT_THRESHOLD
from ram_edge.vocabulary import Vocabulary

from .graphs import graph_specs
from .onnx_export import MIN_OPSET, save_onnx, trace_to_onnx
from .precision import LOGIT_TOLERANCE, PRECISIONS, to_fp16, to_int8_dynamic
from .verify import Verification, verify_bundle_graphs

NOTICE_FILE = "NOTICE.recognize-anything.txt"
DEFAULT_OPSET = 17
DEFAULT_MAX_BATCH = 32
#: ``vocab_dtype="auto"`` stores embeddings float32 (exact) up to this size and float16 above it: a
#: 4,585-tag RAM table (9 MB) or a few hundred open-set tags stay exact, RAM++'s official 478 MB
#: table is halved (the float16 rounding moves golden logits by ~7e-5, see docs/precision.md).
VOCAB_FLOAT32_MAX_BYTES = 64 * 2**20
VOCAB_DTYPES = ("auto", "float16", "float32")


class ExportError(RuntimeError):
    """The export could not produce a bundle; nothing was left at the output path."""


class VerificationError(ExportError):
    def __init__(self, verification: Verification):
        self.verification = verification
        super().__init__(
            f"exported graphs disagree with the torch model: max |logit error| "
            f"{verification.logits_max_abs_error:.3g} > tolerance {verification.tolerance:g}; no bundle written"
        )


@dataclass
class ExportResult:
    directory: Path
    manifest: dict
    verification: Optional[Verification]
    seconds: float


Progress = Callable[[str], None]


def default_vocabulary(model: RAMTagger) -> Vocabulary:
    """The checkpoint's own vocabulary: its label_embed with the names / thresholds it was paired with."""
    embed, _ = model.default_vocabulary()
    tags = model.tags
    return Vocabulary(
        list(tags.names),
        embed.float().cpu().numpy(),
        thresholds=tags.thresholds,
        names_zh=tags.names_zh,
    )


def _versions() -> Dict[str, str]:
    versions = {"ram_edge": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxconverter-common", "numpy"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def check_output_dir(out_dir: Union[str, os.PathLike], overwrite: bool) -> None:
    """Fail before any work if ``out_dir`` holds something that may not be replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")


@contextmanager
def _staging_directory(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden sibling of ``out_dir``; renamed onto ``out_dir`` only if the block succeeds."""
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            # Two renames, so that the old bundle disappears only once the new one is complete.
            retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_bundle(
    model: RAMTagger,
    out_dir: Union[str, os.PathLike],
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    max_batch: int = DEFAULT_MAX_BATCH,
    source: str = "unknown",
    vocabulary: Optional[Vocabulary] = None,
    vocab_dtype: str = "auto",
    overwrite: bool = False,
    verify: bool = True,
    progress: Optional[Progress] = None,
) -> ExportResult:
    """Export ``model`` to a bundle at ``out_dir``: encoder.onnx, decoder.onnx, vocabulary/, manifest.json.

    ``vocabulary`` replaces the model's default vocabulary in the bundle (the graphs do not change);
    ``vocab_dtype`` is how its embeddings are stored: "float16", "float32" or "auto" (float32 up to
    ``VOCAB_FLOAT32_MAX_BYTES``, float16 above).
    Raises ``VerificationError`` (and writes nothing) when the graphs disagree with torch beyond the
    precision's tolerance, ``ExportError`` for other failures.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: use {MIN_OPSET} or newer (LayerNormalization as one node)")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1, got {max_batch}")
    if vocab_dtype not in VOCAB_DTYPES:
        raise ExportError(f"vocabulary dtype {vocab_dtype!r} is not one of {', '.join(VOCAB_DTYPES)}")
    say = progress or (lambda message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    model = model.float().eval()
    config = model.config
    encoder_spec, decoder_spec = graph_specs(model)
    metadata = {
        "ram_edge.format_version": bf.FORMAT_VERSION,
        "ram_edge.version": __version__,
        "model.kind": config.kind,
        "model.variant": config.variant,
        "model.source": source,
        "model.image_size": config.image_size,
        "model.embed_dim": config.embed_dim,
        "precision": precision,
        "preprocessing": f"RGB, bilinear resize to SxS, /255, mean {bf.IMAGENET_MEAN}, std {bf.IMAGENET_STD}, NCHW",
    }

    with _staging_directory(out_dir, overwrite) as staging:
        for spec in (encoder_spec, decoder_spec):
            step = time.perf_counter()
            path = staging / spec.file
            say(f"tracing the {spec.name} to ONNX (opset {opset})")
            proto = trace_to_onnx(model, spec, path, opset)
            if precision == "fp16":
                say(f"converting the {spec.name} to fp16")
                proto = to_fp16(proto)
            elif precision == "int8-dynamic":
                say(f"quantizing the {spec.name}'s weights to int8 (dynamic activations)")
                proto = to_int8_dynamic(path)
            save_onnx(proto, path, {**metadata, "graph": spec.name, "inputs": _describe(spec.inputs), "outputs": _describe(spec.outputs)})
            del proto
            say(f"  {spec.file}: {path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - step:.1f} s")

        vocab = vocabulary if vocabulary is not None else default_vocabulary(model)
        if vocab_dtype == "auto":
            vocab_dtype = "float32" if vocab.embeddings.nbytes <= VOCAB_FLOAT32_MAX_BYTES else "float16"
        say(f"writing the default vocabulary ({len(vocab)} tags, {vocab_dtype} embeddings)")
        vocab_dir = vocab.save(staging / bf.VOCABULARY_DIR, dtype=vocab_dtype)
        stored_vocab = Vocabulary.load(vocab_dir)  # verify against what the runtime will read
        if model.tags.source == "official":
            notice = resources.files("ram_edge").joinpath("data", NOTICE_FILE).read_bytes()
            (staging / NOTICE_FILE).write_bytes(notice)

        verification = None
        if verify:
            say("verifying both graphs in onnxruntime against torch fp32")
            verification = verify_bundle_graphs(model, staging, stored_vocab, LOGIT_TOLERANCE[precision])
            say(
                f"  max |error|: image_embeds {verification.image_embeds_max_abs_error:.2e}, logits "
                f"{verification.logits_max_abs_error:.2e} (tolerance {verification.tolerance:g}), "
                f"probabilities {verification.probability_max_abs_error:.2e}"
            )
            if not verification.passed:
                raise VerificationError(verification)

        manifest = _manifest(model, staging, precision, opset, max_batch, source, stored_vocab, vocab_dtype, verification, encoder_spec, decoder_spec)
        bf.write_json(staging / bf.MANIFEST_FILE, manifest)  # last: its presence marks a complete bundle
    elapsed = time.perf_counter() - started
    say(f"bundle written to {out_dir} in {elapsed:.1f} s")
    return ExportResult(out_dir, manifest, verification, elapsed)


def _describe(tensors) -> str:
    return "; ".join(f"{t.name} {t.dtype} ({', '.join(map(str, t.shape))})" for t in tensors)


def _manifest(model, staging, precision, opset, max_batch, source, vocab, vocab_dtype, verification, encoder_spec, decoder_spec) -> dict:
    config = model.config
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    thresholds = vocab.thresholds
    return {
        "format": bf.FORMAT_NAME,
        "format_version": bf.FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {
            "kind": config.kind,
            "variant": config.variant,
            "source": source,
            "image_size": config.image_size,
            "embed_dim": config.embed_dim,
            "num_image_tokens": config.swin.num_tokens,
            "config": config.to_dict(),
        },
        "preprocessing": bf.preprocessing_spec(config.image_size),
        "precision": precision,
        "opset": opset,
        "max_batch": max_batch,
        "graphs": {"encoder": encoder_spec.manifest_entry(), "decoder": decoder_spec.manifest_entry()},
        "vocabulary": {
            "dir": bf.VOCABULARY_DIR,
            "num_tags": len(vocab),
            "max_descriptions": int(vocab.max_descriptions),
            "default_threshold": DEFAULT_THRESHOLD,
            "per_tag_thresholds": thresholds is not None,
            "source": model.tags.source,
            "dtype": vocab_dtype,
            "embedding_bytes": int(np.prod(vocab.embeddings.shape)) * np.dtype(vocab_dtype).itemsize,
        },
        "files": {p.relative_to(staging).as_posix(): bf.sha256_file(p) for p in files},
        "verification": None if verification is None else verification.to_dict(),
        "versions": _versions(),
    }
