"""Opening a bundle for inference: manifest, file integrity and graph I/O agreement (docs/bundle.md).

Everything wrong with a bundle raises :class:`ram_edge.bundle_format.BundleError` naming the file and
what to do, at load time rather than at the first image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ram_edge.bundle_format import MANIFEST_FILE, BundleError, read_manifest, sha256_file
from ram_edge.tags import DEFAULT_THRESHOLD

from .backends.base import Backend, TensorInfo

_MANIFEST_DTYPES = {"float32": np.float32, "float16": np.float16, "bool": np.bool_, "int64": np.int64,
                    "int32": np.int32}

#: What to tell a user whose bundle lacks the text encoder (open-set vocabularies, classification).
ADD_TEXT_ENCODER_HINT = (
    "add one to this bundle (the image graphs are not re-exported) with "
    "`ram-export --text-encoder ViT-B-16.pt --out {bundle}` (OpenAI's CLIP ViT-B/16 weights, or the "
    "openai/clip-vit-base-patch16 safetensors); see docs/openset.md"
)


#: What to tell a user whose bundle has no captioning graphs, by model kind.
ADD_CAPTIONING_HINT = {
    "tag2text": "re-export it with them: `ram-export --checkpoint tag2text_swin_14m.pth --out {bundle} --overwrite` "
                "(Tag2Text bundles get tag_encoder.onnx and text_decoder.onnx unless --no-captioning is given)",
    "ram": "re-export it with `ram-export --checkpoint ram_swin_large_14m.pth --captioning --out {bundle} --overwrite` "
           "(RAM's captioning branch is exported on request)",
    "ram_plus": "RAM++ has no captioning branch; caption with a Tag2Text bundle (`ram-export --checkpoint "
                "tag2text_swin_14m.pth --out DIR`) or an official RAM one exported with --captioning",
}


@dataclass(frozen=True)
class GraphSpec:
    """One graph as the manifest declares it."""

    file: str
    inputs: Tuple[TensorInfo, ...]
    outputs: Tuple[TensorInfo, ...]


@dataclass(frozen=True)
class CaptionInfo:
    """The manifest's ``caption`` section, checked: the captioning graphs, BERT's tokenizer and how
    upstream's ``generate`` drives them (token ids, prompt, tag prompt length, search defaults)."""

    tag_encoder: GraphSpec
    text_decoder: GraphSpec
    tokenizer_path: Path
    lowercase: bool
    added_tokens: Tuple[str, ...]
    special_tokens: Dict[str, int]
    prompt: str
    prompt_ids: Tuple[int, ...]
    bos_token_id: int
    enc_token_id: int
    eos_token_id: int
    pad_token_id: int
    tag_max_length: int
    tag_separator: str
    num_beams: int
    max_length: int
    min_length: int
    repetition_penalty: float
    vocab_size: int
    #: Positions the text decoder has (its position embeddings): the longest caption it can make.
    max_positions: Optional[int] = None


@dataclass(frozen=True)
class BundleInfo:
    """What the runtime needs from a bundle's manifest, checked."""

    path: Path
    manifest: Dict[str, Any]
    image_size: int
    embed_dim: int
    num_image_tokens: int
    default_threshold: float
    encoder: GraphSpec
    decoder: GraphSpec
    vocabulary_dir: Path
    text_encoder: Optional[GraphSpec] = None
    tokenizer_path: Optional[Path] = None
    context_length: int = 77
    #: Width of the image embeddings: ``embed_dim`` for RAM / RAM++, Swin's own for Tag2Text (no image_proj).
    image_embed_dim: Optional[int] = None
    #: Tags the model scores but never outputs (Tag2Text's delete_tag_index), by name.
    excluded_tags: Tuple[str, ...] = ()
    caption: Optional[CaptionInfo] = None

    @property
    def encoder_path(self) -> Path:
        return self.path / self.encoder.file

    @property
    def decoder_path(self) -> Path:
        return self.path / self.decoder.file

    # The graphs' I/O names by role (the manifest is what readers trust, see bundle_format).
    @property
    def pixel_values_name(self) -> str:
        return self.encoder.inputs[0].name

    @property
    def image_embeds_name(self) -> str:
        return self.decoder.inputs[0].name

    @property
    def label_embed_name(self) -> str:
        return self.decoder.inputs[1].name

    @property
    def label_mask_name(self) -> str:
        return self.decoder.inputs[2].name

    @property
    def per_tag_input_names(self) -> Tuple[str, ...]:
        """Decoder inputs after the three above: per-tag arrays of the vocabulary (Tag2Text's classifier rows)."""
        return tuple(t.name for t in self.decoder.inputs[3:])

    @property
    def image_width(self) -> int:
        return self.embed_dim if self.image_embed_dim is None else self.image_embed_dim

    @property
    def logits_name(self) -> str:
        return self.decoder.outputs[0].name

    @property
    def model_kind(self) -> str:
        return str(self.manifest["model"].get("kind", "ram_plus"))

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    @property
    def text_encoder_path(self) -> Path:
        if self.text_encoder is None:
            raise BundleError(f"{self.path}: this bundle has no text encoder; "
                              + ADD_TEXT_ENCODER_HINT.format(bundle=self.path))
        return self.path / self.text_encoder.file

    @property
    def has_captioning(self) -> bool:
        return self.caption is not None

    def require_captioning(self) -> CaptionInfo:
        """The caption section, or a BundleError saying which export adds the captioning graphs."""
        if self.caption is None:
            hint = ADD_CAPTIONING_HINT.get(self.model_kind, ADD_CAPTIONING_HINT["ram"])
            raise BundleError(f"{self.path}: this {self.model_kind} bundle has no captioning graphs (tag_encoder.onnx, "
                              f"text_decoder.onnx); " + hint.format(bundle=self.path))
        return self.caption

    @property
    def logit_scale(self) -> float:
        """CLIP's temperature for zero-shot classification (100 for OpenAI's models)."""
        text = self.manifest.get("text") or {}
        return float((text.get("model") or {}).get("logit_scale", 100.0))


def open_bundle(bundle_dir, verify_files: bool = True) -> BundleInfo:
    """Read and check ``manifest.json``; with ``verify_files`` also the sha256 of every listed file."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    where = bundle_dir / MANIFEST_FILE

    def get(mapping: Mapping, key: str, kind, context: str):
        value = mapping.get(key) if isinstance(mapping, Mapping) else None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise BundleError(f"{where}: {context}{key!r} is missing or not a {getattr(kind, '__name__', kind)}. "
                              "Re-run `ram-export`.")
        return value

    model = get(manifest, "model", dict, "")
    image_size = get(model, "image_size", int, "model.")
    embed_dim = get(model, "embed_dim", int, "model.")
    num_image_tokens = get(model, "num_image_tokens", int, "model.")
    image_embed_dim = get(model, "image_embed_dim", int, "model.") if "image_embed_dim" in model else None
    graphs = get(manifest, "graphs", dict, "")
    encoder = _graph_spec(get(graphs, "encoder", dict, "graphs."), "encoder", where, 1, 1)
    # 3 inputs, or 5 with Tag2Text's per-tag classifier rows.
    decoder = _graph_spec(get(graphs, "decoder", dict, "graphs."), "decoder", where, (3, 5), 1)
    text_encoder, tokenizer_path, context_length = None, None, 77
    if "text_encoder" in graphs:
        text_encoder = _graph_spec(get(graphs, "text_encoder", dict, "graphs."), "text_encoder", where, 1, 1)
        text = get(manifest, "text", dict, "")
        tokenizer = get(text, "tokenizer", dict, "text.")
        tokenizer_path = bundle_dir / _safe_relative(get(tokenizer, "file", str, "text.tokenizer."), where)
        context_length = get(tokenizer, "context_length", int, "text.tokenizer.")
    caption = _caption_info(manifest, graphs, bundle_dir, where, get) if "caption" in manifest else None
    vocab_meta = manifest.get("vocabulary") or {}
    vocab_dir = vocab_meta.get("dir", "vocabulary") if isinstance(vocab_meta, dict) else "vocabulary"
    default_threshold = vocab_meta.get("default_threshold", DEFAULT_THRESHOLD) if isinstance(vocab_meta, dict) \
        else DEFAULT_THRESHOLD
    if not isinstance(default_threshold, (int, float)) or not 0.0 <= float(default_threshold) <= 1.0:
        raise BundleError(f"{where}: vocabulary.default_threshold is {default_threshold!r}, not in [0, 1]")
    excluded = vocab_meta.get("excluded_tags", []) if isinstance(vocab_meta, dict) else []
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise BundleError(f"{where}: vocabulary.excluded_tags must be a list of tag names. Re-run `ram-export`.")

    info = BundleInfo(
        path=bundle_dir,
        manifest=manifest,
        image_size=image_size,
        embed_dim=embed_dim,
        num_image_tokens=num_image_tokens,
        default_threshold=float(default_threshold),
        encoder=encoder,
        decoder=decoder,
        vocabulary_dir=bundle_dir / _safe_relative(vocab_dir, where),
        text_encoder=text_encoder,
        tokenizer_path=tokenizer_path,
        context_length=context_length,
        image_embed_dim=image_embed_dim,
        excluded_tags=tuple(excluded),
        caption=caption,
    )
    _check_declared_shapes(info, where)
    _check_files(info, get(manifest, "files", dict, ""), where, verify_files)
    return info


def _caption_info(manifest: Mapping, graphs: Mapping, bundle_dir: Path, where: Path, get) -> CaptionInfo:
    caption = get(manifest, "caption", dict, "")
    tokenizer = get(caption, "tokenizer", dict, "caption.")
    search = get(caption, "search", dict, "caption.")
    special = get(tokenizer, "special_tokens", dict, "caption.tokenizer.")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in special.items()):
        raise BundleError(f"{where}: caption.tokenizer.special_tokens must map tokens to ids. Re-run `ram-export`.")
    prompt_ids = get(caption, "prompt_ids", list, "caption.")
    if not prompt_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids):
        raise BundleError(f"{where}: caption.prompt_ids must be a non-empty list of token ids. Re-run `ram-export`.")
    info = CaptionInfo(
        tag_encoder=_graph_spec(get(graphs, "tag_encoder", dict, "graphs."), "tag_encoder", where, 3, 2),
        text_decoder=_graph_spec(get(graphs, "text_decoder", dict, "graphs."), "text_decoder", where, 3, 2),
        tokenizer_path=bundle_dir / _safe_relative(get(tokenizer, "file", str, "caption.tokenizer."), where),
        lowercase=get(tokenizer, "lowercase", bool, "caption.tokenizer."),
        added_tokens=tuple(get(tokenizer, "added_tokens", list, "caption.tokenizer.")),
        special_tokens=dict(special),
        prompt=get(caption, "prompt", str, "caption."),
        prompt_ids=tuple(prompt_ids),
        bos_token_id=get(caption, "bos_token_id", int, "caption."),
        enc_token_id=get(caption, "enc_token_id", int, "caption."),
        eos_token_id=get(caption, "eos_token_id", int, "caption."),
        pad_token_id=get(caption, "pad_token_id", int, "caption."),
        tag_max_length=get(caption, "tag_max_length", int, "caption."),
        tag_separator=get(caption, "tag_separator", str, "caption."),
        num_beams=get(search, "num_beams", int, "caption.search."),
        max_length=get(search, "max_length", int, "caption.search."),
        min_length=get(search, "min_length", int, "caption.search."),
        repetition_penalty=float(get(search, "repetition_penalty", (int, float), "caption.search.")),
        vocab_size=get(caption, "vocab_size", int, "caption."),
        max_positions=(caption.get("cache") or {}).get("max_positions"),
    )
    if not (0 < len(info.prompt_ids) < info.min_length <= info.max_length) or info.num_beams < 1 or info.tag_max_length < 2:
        raise BundleError(f"{where}: caption section has inconsistent lengths (prompt {len(info.prompt_ids)}, min_length "
                          f"{info.min_length}, max_length {info.max_length}, num_beams {info.num_beams}, "
                          f"tag_max_length {info.tag_max_length}). Re-run `ram-export`.")
    return info


def _graph_spec(spec: Mapping, role: str, where: Path, n_inputs: Union[int, Tuple[int, ...]], n_outputs: int) -> GraphSpec:
    def tensors(key: str, count: Union[int, Tuple[int, ...]]) -> Tuple[TensorInfo, ...]:
        items = spec.get(key)
        counts = (count,) if isinstance(count, int) else count
        if not isinstance(items, list) or len(items) not in counts:
            raise BundleError(f"{where}: graphs.{role}.{key} must list {' or '.join(map(str, counts))} tensor(s). "
                              "Re-run `ram-export`.")
        out = []
        for item in items:
            try:
                shape = tuple(item["shape"])
                dtype = np.dtype(_MANIFEST_DTYPES[item["dtype"]])
                out.append(TensorInfo(str(item["name"]), shape, dtype))
            except (KeyError, TypeError) as e:
                raise BundleError(f"{where}: graphs.{role}.{key}: malformed entry {item!r} ({e})") from None
        return tuple(out)

    file = spec.get("file")
    if not isinstance(file, str):
        raise BundleError(f"{where}: graphs.{role}.file is missing")
    _safe_relative(file, where)
    return GraphSpec(file, tensors("inputs", n_inputs), tensors("outputs", n_outputs))


def _safe_relative(rel: str, where: Path) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"{where}: path {rel!r} must be relative and inside the bundle")
    return rel


def _check_files(info: BundleInfo, files: Mapping[str, Any], where: Path, verify: bool) -> None:
    required_files = [info.encoder.file, info.decoder.file]
    if info.text_encoder is not None:
        required_files += [info.text_encoder.file, info.tokenizer_path.relative_to(info.path).as_posix()]
    if info.caption is not None:
        caption = info.caption
        required_files += [caption.tag_encoder.file, caption.text_decoder.file,
                           caption.tokenizer_path.relative_to(info.path).as_posix()]
    for required in required_files:
        if required not in files:
            raise BundleError(f"{where}: 'files' lists no sha256 for {required}. Re-run `ram-export`.")
    for rel, digest in files.items():
        path = info.path / _safe_relative(rel, where)
        if not path.is_file():
            raise BundleError(
                f"{path}: listed in the manifest but missing. The bundle was copied incompletely; copy the "
                "whole folder again or re-run `ram-export`."
            )
        if verify:
            actual = sha256_file(path)
            if actual != digest:
                raise BundleError(
                    f"{path}: sha256 {actual} does not match the manifest's {digest}: the file was modified or "
                    "damaged after export. Copy the bundle again or re-run `ram-export` "
                    "(--no-verify skips this check; in Python, verify_files=False)."
                )


def _dims_agree(a: Sequence, b: Sequence) -> bool:
    """Same rank, and every dimension fixed in both is equal (symbolic / unknown ones match anything)."""
    if len(a) != len(b):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))


def _fmt(shape: Sequence) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _check_declared_shapes(info: BundleInfo, where: Path) -> None:
    S, E, W = info.image_size, info.embed_dim, info.image_width
    pixels = info.encoder.inputs[0]
    embeds_out = info.encoder.outputs[0]
    embeds_in, label_embed, label_mask = info.decoder.inputs[:3]
    logits = info.decoder.outputs[0]
    expectations = [
        (pixels, (None, 3, S, S), np.float32),
        (embeds_out, (None, info.num_image_tokens, W), np.float32),
        (embeds_in, (None, info.num_image_tokens, W), np.float32),
        (label_embed, (None, None, E), np.float32),
        (label_mask, (None, None), np.bool_),
        (logits, (None, None), np.float32),
    ]
    for tensor, shape, dtype in expectations:
        if not _dims_agree(tensor.shape, shape) or tensor.dtype != np.dtype(dtype):
            raise BundleError(
                f"{where}: graph tensor {tensor.describe()} disagrees with the model section "
                f"(expected {np.dtype(dtype).name} {_fmt(shape)} for image_size={S}, embed_dim={E}, "
                f"image embeddings {W} wide, num_image_tokens={info.num_image_tokens}). Re-run `ram-export`."
            )
    for tensor in info.decoder.inputs[3:]:  # per-tag inputs (Tag2Text's classifier rows): float32, rows = tags
        if tensor.dtype != np.dtype(np.float32) or not tensor.shape or isinstance(tensor.shape[0], int):
            raise BundleError(f"{where}: decoder input {tensor.describe()} should be a float32 per-tag array, one "
                              "row per tag (a dynamic first axis). Re-run `ram-export`.")
    if info.caption is not None:
        _check_caption_shapes(info, where)
    if info.text_encoder is not None:
        for tensor, shape, dtype in (
            (info.text_encoder.inputs[0], (None, None), np.int64),
            (info.text_encoder.outputs[0], (None, E), np.float32),
        ):
            if not _dims_agree(tensor.shape, shape) or tensor.dtype != np.dtype(dtype):
                raise BundleError(
                    f"{where}: text encoder tensor {tensor.describe()} should be {np.dtype(dtype).name} "
                    f"{_fmt(shape)}: its embeddings must be as wide as the image model's (embed_dim={E}). "
                    "Add the right text encoder with `ram-export --text-encoder ... --overwrite`."
                )
    if not _dims_agree(embeds_out.shape, embeds_in.shape):
        raise BundleError(
            f"{where}: encoder output {embeds_out.describe()} does not match decoder input "
            f"{embeds_in.describe()}: the graphs come from different models. Re-run `ram-export`."
        )


def _check_caption_shapes(info: BundleInfo, where: Path) -> None:
    """The captioning graphs' declared I/O: dtypes, the image embeddings they read, the cache's rank, and
    the decoder's cache and vocabulary agreeing with the tag encoder's cross keys / values."""
    caption = info.caption
    ids, mask, embeds = caption.tag_encoder.inputs
    states, cross_out = caption.tag_encoder.outputs
    step_ids, cross_in, past = caption.text_decoder.inputs
    logits, present = caption.text_decoder.outputs
    cache = (None, 2, None, None, None, None)
    for tensor, shape, dtype in (
        (ids, (None, None), np.int64), (mask, (None, None), np.int64),
        (embeds, (None, info.num_image_tokens, info.image_width), np.float32),
        (states, (None, None, None), np.float32), (cross_out, cache, np.float32),
        (step_ids, (None, None), np.int64), (cross_in, cache, np.float32), (past, cache, np.float32),
        (logits, (None, None, caption.vocab_size), np.float32), (present, cache, np.float32),
    ):
        if not _dims_agree(tensor.shape, shape) or tensor.dtype != np.dtype(dtype):
            raise BundleError(f"{where}: captioning graph tensor {tensor.describe()} should be {np.dtype(dtype).name} "
                              f"{_fmt(shape)}. Re-run `ram-export`.")
    for a, b in ((cross_out, cross_in), (cross_in, past), (past, present)):
        if not _dims_agree([d for i, d in enumerate(a.shape) if i != 4], [d for i, d in enumerate(b.shape) if i != 4]):
            raise BundleError(f"{where}: {a.describe()} and {b.describe()} should share layers, heads and head_dim: "
                              "the captioning graphs come from different models. Re-run `ram-export`.")


def check_backend_io(info: BundleInfo, role: str, spec: GraphSpec, backend: Backend) -> None:
    """One loaded graph's actual inputs / outputs (names, dtypes, fixed dims) against the manifest."""
    path = info.path / spec.file
    for kind, declared, actual in (
        ("inputs", spec.inputs, backend.input_metadata()),
        ("outputs", spec.outputs, backend.output_metadata()),
    ):
        actual_by_name = {t.name: t for t in actual}
        if set(actual_by_name) != {t.name for t in declared}:
            raise BundleError(
                f"{path}: the graph's {kind} are {sorted(actual_by_name)}, the manifest declares "
                f"{[t.name for t in declared]}. The manifest belongs to another export; re-run `ram-export`."
            )
        for want in declared:
            got = actual_by_name[want.name]
            if got.dtype != want.dtype or not _dims_agree(got.shape, want.shape):
                raise BundleError(
                    f"{path}: {role} {kind[:-1]} is {got.describe()} in the graph but "
                    f"{want.describe()} in the manifest. Re-run `ram-export`."
                )


def check_graph_io(info: BundleInfo, encoder: Backend, decoder: Backend) -> None:
    """The loaded image graphs' actual inputs / outputs against the manifest and against each other."""
    check_backend_io(info, "encoder", info.encoder, encoder)
    check_backend_io(info, "decoder", info.decoder, decoder)
    produced = {t.name: t for t in encoder.output_metadata()}[info.encoder.outputs[0].name]
    consumed = {t.name: t for t in decoder.input_metadata()}[info.image_embeds_name]
    if not _dims_agree(produced.shape, consumed.shape) or produced.dtype != consumed.dtype:
        raise BundleError(
            f"{info.path}: encoder output {produced.describe()} does not fit decoder input "
            f"{consumed.describe()}: the two graphs come from different models. Re-run `ram-export`."
        )
