"""``export_bundle``: model -> a complete, verified bundle directory, or nothing; ``add_text_encoder``:
an existing bundle + a CLIP text tower -> the same bundle with ``text_encoder.onnx``. A model with a
captioning branch (Tag2Text; RAM loaded with ``captioning=True``) also gets ``tag_encoder.onnx``,
``text_decoder.onnx``, BERT's vocabulary and the manifest's ``caption`` section.

The bundle is built in a hidden sibling directory and renamed into place only after every graph passed
verification and the manifest (written last) lists every file's sha256. A failure or Ctrl-C at any
step removes the partial directory, so no runtime ever finds a bundle that looks complete but is not.
Adding a text encoder writes its files beside the image graphs (which stay untouched) and replaces the
manifest last, atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
from ram_edge.calibration import DEFAULT_EVAL_SIZE, AccuracyLimits, AccuracyReport, CalibrationError, evaluation_images
from ram_edge.models import RAMTagger
from ram_edge.models.clip_text import ClipTextModel, text_config_summary
from ram_edge.tags import DEFAULT_THRESHOLD, TAG2TEXT_DELETE_TAG_INDEX, TAG2TEXT_NUM_TAGS
from ram_edge.tokenizer_files import BERT_VOCAB_FILE, CLIP_BPE_FILE, bert_vocab_path, clip_bpe_path
from ram_edge.vocabulary import Vocabulary

from .graphs import GraphSpec, caption_graph_specs, image_graph_specs, text_encoder_spec
from .int8 import AccuracyCheck, CalibrationOptions, Int8Calibration
from .onnx_export import save_onnx, trace_to_onnx
from .options import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportError, check_export_options
from .precision import (
    CAPTION_PRECISION, CAPTION_TOLERANCE, LOGIT_TOLERANCE, TEXT_PRECISIONS, TEXT_TOLERANCE, to_fp16, to_int8_dynamic,
)
from .verify import (
    CaptionVerification, TextVerification, Verification, verify_bundle_graphs, verify_caption_graphs,
    verify_text_encoder,
)

NOTICE_FILE = "NOTICE.recognize-anything.txt"
#: Tag lists that come from recognize-anything: their notice is copied into the bundle.
RECOGNIZE_ANYTHING_TAG_SOURCES = ("official", "tag2text")
#: How upstream's tokenizer spells its special tokens; [DEC] and [ENC] are added after BERT's 30,522.
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CAPTION_ADDED_TOKENS = ("[DEC]", "[ENC]")
#: OpenAI CLIP's vocabulary: 49,408 ids, the last two are the start and end tokens.
CLIP_VOCAB_SIZE, CLIP_SOT, CLIP_EOT = 49408, 49406, 49407


class VerificationError(ExportError):
    def __init__(self, verification: Union[Verification, TextVerification, CaptionVerification]):
        self.verification = verification
        if isinstance(verification, TextVerification):
            what = f"text_encoder: max |text embedding error| {verification.text_embeds_max_abs_error:.3g}"
        elif isinstance(verification, CaptionVerification):
            what = f"text_decoder: max |step logit error| {verification.step_logits_max_abs_error:.3g}"
        else:
            what = f"max |logit error| {verification.logits_max_abs_error:.3g}"
        super().__init__(
            f"exported graphs disagree with the torch model: {what} > tolerance {verification.tolerance:g}; "
            "nothing written"
        )


class AccuracyError(ExportError):
    """The bundle's tags are further from the fp32 graphs' than the accuracy limits allow."""

    def __init__(self, report: AccuracyReport, violations, precision: str):
        self.report = report
        self.violations = list(violations)
        super().__init__(f"the {precision} graphs' tags are too far from fp32's on {report.images} held-out images: "
                         f"{'; '.join(self.violations)}; nothing written")


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
    names = list(tags.names)
    return Vocabulary(
        names,
        embed.float().cpu().numpy(),
        thresholds=tags.thresholds,
        names_zh=tags.names_zh,
        per_tag={name: rows.float().cpu().numpy() for name, rows in model.default_classifier().items()},
        # Tag2Text's learned classes share names (114 of its 3,429, e.g. "smile" noun and verb): kept as upstream's.
        unique_names=model.config.kind != "tag2text" or len(set(names)) == len(names),
    )


def excluded_tags(model: RAMTagger) -> list:
    """Names of the tags the model scores but upstream never outputs, nor feeds to the captioner:
    Tag2Text's ``delete_tag_index`` ("quarter", "back", "two", ...), positions in its 3,429-tag list."""
    if model.config.kind != "tag2text" or len(model.tags) != TAG2TEXT_NUM_TAGS:
        return []
    return [model.tags.names[i] for i in TAG2TEXT_DELETE_TAG_INDEX]


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
    with bf.staged_directory(out_dir) as staging:
        yield staging


@contextmanager
def _scratch_directory(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling of ``out_dir`` (same disk: it may hold several copies of a graph) for fp32 copies
    and int8 variants; always removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.scratch-", dir=out_dir.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _accuracy_check(model: RAMTagger, scratch: Path, vocabulary: Vocabulary, precision: str,
                    calibration: Optional[CalibrationOptions], eval_images, eval_size: int, limits: AccuracyLimits,
                    say: Progress) -> Optional[AccuracyCheck]:
    """The export's accuracy check: int8's calibration context, an fp32 comparison for ``eval_images``, or None."""
    try:
        if precision == "int8":
            return Int8Calibration(model, scratch, vocabulary, calibration, eval_images, eval_size, limits, say)
        if eval_images is not None:
            paths = evaluation_images(eval_images, eval_size)
            return AccuracyCheck(scratch, vocabulary, model.config.image_size, paths, limits,
                                 f"--eval-images ({len(paths)} images)", say)
    except CalibrationError as e:
        raise ExportError(str(e)) from e
    return None


def _write_graph(spec: GraphSpec, directory: Path, precision: str, opset: int, metadata: Dict[str, object],
                 say: Progress, accuracy: Optional[AccuracyCheck] = None) -> None:
    """Trace ``spec`` into ``directory``, convert it to ``precision`` and save it with ``metadata``.

    ``accuracy``: the export's accuracy check, which keeps a copy of the fp32 graph for its report and,
    for int8, is the calibration context that quantizes it.
    """
    step = time.perf_counter()
    path = directory / spec.file
    say(f"tracing the {spec.name} to ONNX (opset {opset})")
    proto = trace_to_onnx(spec, path, opset)
    if accuracy is not None:
        accuracy.keep_fp32(spec, path)
    if precision == "fp16":
        say(f"converting the {spec.name} to fp16")
        proto = to_fp16(proto)
    elif precision == "int8-dynamic":
        say(f"quantizing the {spec.name}'s weights to int8 (dynamic activations)")
        proto = to_int8_dynamic(path)
    elif precision == "int8":  # export_bundle made ``accuracy`` the Int8Calibration
        say(f"quantizing the {spec.name} to static int8 (calibrated Q/DQ)")
        del proto
        proto = accuracy.convert(spec, path)
    save_onnx(proto, path, {**metadata, "graph": spec.name, "precision": precision,
                            "inputs": _describe(spec.inputs), "outputs": _describe(spec.outputs)})
    del proto
    say(f"  {spec.file}: {path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - step:.1f} s")


def check_text_encoder(text_encoder: ClipTextModel, embed_dim: int, source: str = "the text encoder") -> None:
    """Refuse a text tower that cannot produce this bundle's tag embeddings (before any work)."""
    config = text_encoder.config
    if config.embed_dim != embed_dim:
        raise ExportError(
            f"{source}: its text embeddings are {config.embed_dim} wide but the image model takes "
            f"embed_dim={embed_dim}; RAM and RAM++ need CLIP ViT-B/16's text tower (512)"
        )
    if config.vocab_size != CLIP_VOCAB_SIZE:
        raise ExportError(
            f"{source}: token embedding table of {config.vocab_size} rows, but the CLIP tokenizer has "
            f"{CLIP_VOCAB_SIZE} ids; this is not an OpenAI-CLIP text tower"
        )


def _write_text_encoder(text_encoder: ClipTextModel, directory: Path, *, precision: str, opset: int, verify: bool,
                        metadata: Dict[str, object], say: Progress) -> dict:
    """text_encoder.onnx and tokenizer/ into ``directory``; returns the manifest's ``text`` section."""
    if precision not in TEXT_PRECISIONS:
        raise ExportError(f"text encoder precision {precision!r}: choose one of {', '.join(TEXT_PRECISIONS)}")
    text_encoder = text_encoder.float().eval()
    spec = text_encoder_spec(text_encoder)
    _write_graph(spec, directory, precision, opset, {**metadata, "text.source": getattr(text_encoder, "source", "")}, say)
    # The packaged tokenizer folder (merges, MIT LICENSE, NOTICE) travels with the graph.
    shutil.copytree(clip_bpe_path().parent, directory / bf.TOKENIZER_DIR, dirs_exist_ok=True)
    verification = None
    if verify:
        say("verifying the text encoder in onnxruntime against torch fp32")
        verification = verify_text_encoder(text_encoder, directory / spec.file, TEXT_TOLERANCE[precision])
        say(f"  max |error|: text_embeds {verification.text_embeds_max_abs_error:.2e} "
            f"(tolerance {verification.tolerance:g}), cosine >= {verification.min_cosine:.6f}")
        if not verification.passed:
            raise VerificationError(verification)
    return {
        "graph_entry": spec.manifest_entry(),
        "section": {
            "graph": spec.name,
            "precision": precision,
            "tokenizer": {
                "type": "clip-bpe",
                "file": f"{bf.TOKENIZER_DIR}/{CLIP_BPE_FILE}",
                "context_length": text_encoder.config.context_length,
                "sot_token_id": CLIP_SOT,
                "eot_token_id": CLIP_EOT,
                "licence": "MIT (OpenAI CLIP), see tokenizer/LICENSE",
            },
            "model": text_config_summary(text_encoder),
            "verification": None if verification is None else verification.to_dict(),
        },
    }


def _write_captioning(model: RAMTagger, directory: Path, *, precision: str, opset: int, verify: bool,
                      metadata: Dict[str, object], say: Progress) -> dict:
    """tag_encoder.onnx, text_decoder.onnx and caption_tokenizer/ into ``directory``, verified against
    torch; returns the graphs' manifest entries and the manifest's ``caption`` section."""
    caption = model.config.captioning
    specs = caption_graph_specs(model)
    for spec in specs:
        _write_graph(spec, directory, precision, opset, metadata, say)
    # BERT's vocabulary with its licence and notice travels with the graphs.
    shutil.copytree(bert_vocab_path().parent, directory / bf.CAPTION_TOKENIZER_DIR, dirs_exist_ok=True)
    vocab_lines = (directory / bf.CAPTION_TOKENIZER_DIR / BERT_VOCAB_FILE).read_text(encoding="utf-8").splitlines()
    vocab_ids = {token: i for i, token in enumerate(vocab_lines)}
    added = {token: len(vocab_lines) + i for i, token in enumerate(CAPTION_ADDED_TOKENS)}
    special = {**{token: vocab_ids[token] for token in BERT_SPECIAL_TOKENS}, **added}
    text, encoder = caption.text_decoder, caption.tag_encoder
    expected = {"[DEC]": caption.bos_token_id, "[ENC]": caption.enc_token_id, "[SEP]": caption.eos_token_id,
                "[PAD]": caption.pad_token_id}
    if any(special[token] != i for token, i in expected.items()) or len(vocab_lines) + len(added) != text.vocab_size:
        raise ExportError(
            f"the captioning branch's token ids {expected} and {text.vocab_size}-id vocabulary do not match BERT's "
            f"tokenizer with [DEC], [ENC] added ({special}, {len(vocab_lines) + len(added)} ids)"
        )
    verification = None
    if verify:
        say("verifying the captioning graphs in onnxruntime against torch fp32")
        verification = verify_caption_graphs(model, directory, CAPTION_TOLERANCE[precision], beams=caption.num_beams)
        say(f"  max |error|: tag_states {verification.tag_states_max_abs_error:.2e}, step logits "
            f"{verification.step_logits_max_abs_error:.2e} (tolerance {verification.tolerance:g}), present_kv "
            f"{verification.present_kv_max_abs_error:.2e}")
        if not verification.passed:
            raise VerificationError(verification)
    section = {
        "graphs": [spec.name for spec in specs],
        "precision": precision,
        "tokenizer": {
            "type": "bert-wordpiece",
            "file": f"{bf.CAPTION_TOKENIZER_DIR}/{BERT_VOCAB_FILE}",
            "lowercase": True,
            "added_tokens": list(CAPTION_ADDED_TOKENS),
            "special_tokens": special,
            "licence": f"Apache-2.0 (Google BERT), see {bf.CAPTION_TOKENIZER_DIR}/NOTICE.md",
        },
        "prompt": caption.prompt,
        "prompt_ids": list(caption.prompt_ids),
        "bos_token_id": caption.bos_token_id,
        "enc_token_id": caption.enc_token_id,
        "eos_token_id": caption.eos_token_id,
        "pad_token_id": caption.pad_token_id,
        "tag_max_length": caption.tag_max_length,
        "tag_separator": " | ",
        "search": {"num_beams": caption.num_beams, "max_length": caption.max_length,
                   "min_length": caption.min_length, "repetition_penalty": 1.0},
        "cache": {"layout": "(layers, 2, batch, heads, positions, head_dim); index 0 keys, 1 values",
                  "layers": text.num_layers, "heads": text.num_heads, "head_dim": text.head_dim,
                  "max_positions": text.max_positions, "tag_positions_max": encoder.max_positions},
        "vocab_size": text.vocab_size,
        "verification": None if verification is None else verification.to_dict(),
    }
    return {"graph_entries": {spec.name: spec.manifest_entry() for spec in specs}, "section": section}


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
    text_encoder: Optional[ClipTextModel] = None,
    text_precision: str = "fp32",
    captioning: Optional[bool] = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: Optional[Progress] = None,
    calibration: Optional[CalibrationOptions] = None,
    eval_images: Optional[Union[str, os.PathLike]] = None,
    eval_size: int = DEFAULT_EVAL_SIZE,
    accuracy_limits: Optional[AccuracyLimits] = None,
) -> ExportResult:
    """Export ``model`` to a bundle at ``out_dir``: encoder.onnx, decoder.onnx, vocabulary/, manifest.json,
    with ``text_encoder`` (a CLIP text tower) text_encoder.onnx + tokenizer/, and for a model with a
    captioning branch tag_encoder.onnx + text_decoder.onnx + caption_tokenizer/ (``captioning``: None =
    whenever the model has the branch, False = never, True = required).

    ``precision="int8"`` needs ``calibration`` (its images, count, method; see ``export/int8.py``). With
    int8 or ``eval_images`` the bundle's tags are compared with the fp32 graphs' on held-out images
    (``eval_images``' first ``eval_size``, or held out of the calibration images): the report goes into
    the manifest (``accuracy``) and past ``accuracy_limits`` (default ``AccuracyLimits()``) the export
    raises ``AccuracyError`` and writes nothing.

    ``vocabulary`` replaces the model's default vocabulary in the bundle (the graphs do not change);
    ``vocab_dtype`` is how its embeddings are stored: "float16", "float32" or "auto" (float32 up to
    ``VOCAB_FLOAT32_MAX_BYTES``, float16 above). ``text_precision``: "fp32" (default: vocabularies are
    built once, exactness is worth more than speed) or "fp16".
    Raises ``VerificationError`` (and writes nothing) when a graph disagrees with torch beyond the
    precision's tolerance, ``ExportError`` for other failures.
    """
    check_export_options(precision=precision, opset=opset, max_batch=max_batch, vocab_dtype=vocab_dtype,
                         text_precision=text_precision, calibration_images=calibration and calibration.images)
    limits = accuracy_limits or AccuracyLimits()
    say = progress or (lambda message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    model = model.float().eval()
    config = model.config
    if text_encoder is not None:
        check_text_encoder(text_encoder, config.embed_dim)
    if captioning and config.captioning is None:
        raise ExportError(f"this {config.kind} model has no captioning branch"
                          + ("" if config.kind == "ram_plus" else "; load the checkpoint with captioning=True (--captioning)"))
    with_captioning = config.captioning is not None and captioning is not False
    metadata = {
        "ram_edge.format_version": bf.FORMAT_VERSION,
        "ram_edge.version": __version__,
        "model.kind": config.kind,
        "model.variant": config.variant,
        "model.source": source,
        "model.image_size": config.image_size,
        "model.embed_dim": config.embed_dim,
        "preprocessing": f"RGB, bilinear resize to SxS, /255, mean {bf.IMAGENET_MEAN}, std {bf.IMAGENET_STD}, NCHW",
    }
    specs = image_graph_specs(model)

    with _staging_directory(out_dir, overwrite) as staging, _scratch_directory(out_dir) as scratch:
        # The vocabulary first: calibration and the accuracy report run the graphs with it.
        vocab = vocabulary if vocabulary is not None else default_vocabulary(model)
        vocab_dtype = vocab.storage_dtype(vocab_dtype)
        say(f"writing the default vocabulary ({len(vocab)} tags, {vocab_dtype} embeddings)")
        vocab_dir = vocab.save(staging / bf.VOCABULARY_DIR, dtype=vocab_dtype)
        stored_vocab = Vocabulary.load(vocab_dir)  # verify against what the runtime will read
        if model.tags.source in RECOGNIZE_ANYTHING_TAG_SOURCES:
            notice = resources.files("ram_edge").joinpath("data", NOTICE_FILE).read_bytes()
            (staging / NOTICE_FILE).write_bytes(notice)

        accuracy = _accuracy_check(model, scratch, stored_vocab, precision, calibration, eval_images, eval_size,
                                   limits, say)
        for spec in specs:
            _write_graph(spec, staging, precision, opset, metadata, say, accuracy)

        verification = None
        if verify:
            say("verifying both image graphs in onnxruntime against torch fp32")
            verification = verify_bundle_graphs(model, staging, stored_vocab, LOGIT_TOLERANCE[precision])
            say(
                f"  max |error|: image_embeds {verification.image_embeds_max_abs_error:.2e}, logits "
                f"{verification.logits_max_abs_error:.2e} (tolerance {verification.tolerance:g}), "
                f"probabilities {verification.probability_max_abs_error:.2e}"
            )
            if not verification.passed:
                raise VerificationError(verification)
        accuracy_section = None
        if accuracy is not None:
            say(f"comparing the {precision} graphs' tags with fp32's on {len(accuracy.eval_pixels)} held-out images "
                f"({accuracy.evaluation_source})")
            report = accuracy.report(staging)
            accuracy_section = accuracy.manifest_section(report)
            say(f"  {report.summary()}")
            if not accuracy_section["passed"]:
                raise AccuracyError(report, accuracy_section["violations"], precision)
        text = None
        if text_encoder is not None:
            text = _write_text_encoder(text_encoder, staging, precision=text_precision, opset=opset, verify=verify,
                                       metadata=metadata, say=say)
        caption = None
        if with_captioning:
            caption = _write_captioning(model, staging, precision=CAPTION_PRECISION[precision], opset=opset, verify=verify,
                                        metadata=metadata, say=say)

        manifest = _manifest(model, staging, precision, opset, max_batch, source, stored_vocab, vocab_dtype,
                             verification, specs, text, caption)
        if accuracy_section is not None:
            manifest["accuracy"] = accuracy_section
        if isinstance(accuracy, Int8Calibration):
            manifest["quantization"] = accuracy.manifest_quantization()
        bf.write_json(staging / bf.MANIFEST_FILE, manifest)  # last: its presence marks a complete bundle
    elapsed = time.perf_counter() - started
    say(f"bundle written to {out_dir} in {elapsed:.1f} s")
    return ExportResult(out_dir, manifest, verification, elapsed)


def add_text_encoder(
    bundle_dir: Union[str, os.PathLike],
    text_encoder: ClipTextModel,
    *,
    text_precision: str = "fp32",
    opset: Optional[int] = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: Optional[Progress] = None,
) -> ExportResult:
    """Add ``text_encoder`` to the existing bundle ``bundle_dir`` without touching its image graphs.

    The new files are written and verified in a hidden folder inside the bundle, moved into place, and
    the manifest is replaced last (atomically). A bundle that already has a text encoder is refused
    unless ``overwrite``.
    """
    say = progress or (lambda message: None)
    started = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    try:
        manifest = bf.read_manifest(bundle_dir)
    except bf.BundleError as e:
        raise ExportError(f"--out {bundle_dir}: {e}") from e
    if "text_encoder" in manifest.get("graphs", {}) and not overwrite:
        raise ExportError(f"{bundle_dir} already has a text encoder; pass --overwrite to replace it")
    check_text_encoder(text_encoder, int(manifest["model"]["embed_dim"]), getattr(text_encoder, "source", "text encoder"))
    opset = int(opset or manifest.get("opset", DEFAULT_OPSET))
    check_export_options(opset=opset, text_precision=text_precision)
    metadata = {
        "ram_edge.format_version": bf.FORMAT_VERSION,
        "ram_edge.version": __version__,
        "model.kind": manifest["model"].get("kind", ""),
        "model.embed_dim": manifest["model"]["embed_dim"],
    }
    staging = bundle_dir / f".text-encoder.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        text = _write_text_encoder(text_encoder, staging, precision=text_precision, opset=opset, verify=verify,
                                   metadata=metadata, say=say)
        files = dict(manifest.get("files", {}))
        for rel in [r for r in files if r == bf.TEXT_ENCODER_FILE or r.startswith(bf.TOKENIZER_DIR + "/")]:
            del files[rel]  # the old text encoder's entries, when overwriting
        new_files = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in new_files:
            files[path.relative_to(staging).as_posix()] = bf.sha256_file(path)
        manifest = dict(manifest)
        manifest["graphs"] = {**manifest["graphs"], "text_encoder": text["graph_entry"]}
        manifest["text"] = text["section"]
        manifest["files"] = dict(sorted(files.items()))
        manifest["versions"] = {**manifest.get("versions", {}), **_versions()}
        target_tokenizer = bundle_dir / bf.TOKENIZER_DIR
        if target_tokenizer.exists():
            shutil.rmtree(target_tokenizer)
        os.replace(staging / bf.TOKENIZER_DIR, target_tokenizer)
        os.replace(staging / bf.TEXT_ENCODER_FILE, bundle_dir / bf.TEXT_ENCODER_FILE)
        tmp_manifest = bundle_dir / (bf.MANIFEST_FILE + ".tmp")
        bf.write_json(tmp_manifest, manifest)
        os.replace(tmp_manifest, bundle_dir / bf.MANIFEST_FILE)  # last, atomically
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.perf_counter() - started
    say(f"text encoder added to {bundle_dir} in {elapsed:.1f} s")
    return ExportResult(bundle_dir, manifest, None, elapsed)


def _describe(tensors) -> str:
    return "; ".join(f"{t.name} {t.dtype} ({', '.join(map(str, t.shape))})" for t in tensors)


def _manifest(model, staging, precision, opset, max_batch, source, vocab, vocab_dtype, verification, specs, text,
              caption=None) -> dict:
    config = model.config
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    thresholds = vocab.thresholds
    graphs = {spec.name: spec.manifest_entry() for spec in specs}
    if text is not None:
        graphs["text_encoder"] = text["graph_entry"]
    if caption is not None:
        graphs.update(caption["graph_entries"])
    manifest = {
        "format": bf.FORMAT_NAME,
        "format_version": bf.FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {
            "kind": config.kind,
            "variant": config.variant,
            "source": source,
            "image_size": config.image_size,
            "embed_dim": config.embed_dim,
            "image_embed_dim": config.image_embed_dim,
            "num_image_tokens": config.swin.num_tokens,
            "config": config.to_dict(),
        },
        "preprocessing": bf.preprocessing_spec(config.image_size),
        "precision": precision,
        "opset": opset,
        "max_batch": max_batch,
        "graphs": graphs,
        "vocabulary": {
            "dir": bf.VOCABULARY_DIR,
            "num_tags": len(vocab),
            "max_descriptions": int(vocab.max_descriptions),
            "default_threshold": DEFAULT_THRESHOLD,
            "per_tag_thresholds": thresholds is not None,
            "source": model.tags.source,
            "dtype": vocab_dtype,
            "embedding_bytes": int(np.prod(vocab.embeddings.shape)) * np.dtype(vocab_dtype).itemsize,
            "per_tag": sorted(vocab.per_tag),
            "excluded_tags": excluded_tags(model),
        },
        "files": {p.relative_to(staging).as_posix(): bf.sha256_file(p) for p in files},
        "verification": None if verification is None else verification.to_dict(),
        "versions": _versions(),
    }
    if text is not None:
        manifest["text"] = text["section"]
    if caption is not None:
        manifest["caption"] = caption["section"]
    return manifest
