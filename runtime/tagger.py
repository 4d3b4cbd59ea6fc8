"""The Tagger: bundle + backend + vocabulary + preprocessing, torch-free."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ram_edge.bundle_format import BundleError
from ram_edge.vocabulary import Vocabulary

from .backends import AUTO, configure_backend, open_graph
from .backends.base import Backend
from .bundle import BundleInfo, check_graph_io, open_bundle
from .caption import CaptionResult, is_empty_user_tags, tag_strings_for
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, ImageInput, Preprocessor

#: Class lists whose text embeddings ``Tagger.classify`` keeps, so repeated calls cost no text encoding.
CLASS_CACHE_SIZE = 8
#: Default bound on the decoder's working memory (activations of one call), in MiB. Tags never attend to
#: each other, so the vocabulary is scored in chunks of tags (and the batch in groups of images) that fit;
#: the scores are exactly those of one call. 256 MiB scores RAM++'s 4,585 tags for one image in 2 calls.
DEFAULT_DECODER_MEMORY_MB = 256
#: Images per call by default: on a CPU a batch buys no speed (docs/performance.md) and multiplies memory.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 16}
#: Measured working memory of the decoder per (image, tag) relative to the float32 estimate below, by the
#: bundle's precision (RAM++ Swin-L, onnxruntime CPU, 4,585 vs 256 tags: fp32 44 KB, int8-dynamic 33 KB,
#: fp16 157 KB a tag: the fp16 graph converts the label table and its products between the precisions).
DECODER_MEMORY_FACTOR = {"fp16": 3.0}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagResult:
    """Tags of one image, most probable first. ``probabilities`` are sigmoid(logits), aligned with ``tags``;
    ``indices`` are the tags' positions in the vocabulary."""

    tags: Tuple[str, ...]
    probabilities: Tuple[float, ...]
    indices: Tuple[int, ...] = field(default=(), repr=False)
    #: Why this input could not be tagged (``Tagger.tag(..., errors="return")``); None when it was.
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __len__(self) -> int:
        return len(self.tags)

    def as_dict(self) -> Dict[str, float]:
        return dict(zip(self.tags, self.probabilities))

    def as_prompt(self, lower: bool = True) -> str:
        """The tags as a Grounding DINO / Grounded-SAM text prompt: ``"dog . frisbee . grass ."``
        (lower case by default, as Grounding DINO lower-cases its caption anyway); "" without tags."""
        tags = [t.lower() if lower else t for t in self.tags]
        return " . ".join(tags) + " ." if tags else ""


@dataclass(frozen=True)
class ClassResult:
    """Zero-shot single-label classification of one image: every class, most probable first;
    ``probabilities`` are a softmax over the classes (they sum to 1)."""

    labels: Tuple[str, ...]
    probabilities: Tuple[float, ...]
    indices: Tuple[int, ...] = field(default=(), repr=False)
    error: Optional[str] = None  # as TagResult.error

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.labels[0]

    def as_dict(self) -> Dict[str, float]:
        return dict(zip(self.labels, self.probabilities))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 logistic function (as torch.sigmoid); overflow of exp for very negative logits gives 0."""
    x = np.asarray(logits, dtype=np.float32)
    with np.errstate(over="ignore"):
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32, copy=False)


def select_tags(
    probabilities: np.ndarray, thresholds: Union[np.ndarray, float], names: Sequence[str], top_k: Optional[int] = None
) -> List[TagResult]:
    """(B, T) probabilities -> per row the tags strictly above their threshold (upstream's
    ``probs > thresholds``), most probable first, at most ``top_k``. No validation: see Tagger.select."""
    keep = probabilities > thresholds
    results = []
    for row, row_keep in zip(probabilities, keep):
        idx = np.flatnonzero(row_keep)
        idx = idx[np.argsort(-row[idx], kind="stable")]  # ties keep vocabulary order
        if top_k is not None:
            idx = idx[: int(top_k)]
        results.append(TagResult(
            tags=tuple(names[i] for i in idx),
            probabilities=tuple(float(row[i]) for i in idx),
            indices=tuple(int(i) for i in idx),
        ))
    return results


def _is_single_image(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return True
    return isinstance(images, np.ndarray) and images.ndim <= 3


class Tagger:
    """Tags images with a bundle written by ``ram-export``.

    bundle_dir:       the bundle folder.
    backend:          "onnxruntime" (CPU or CUDA), "tensorrt" (NVIDIA GPUs, Jetson), "openvino" (x86 CPUs), or
                      "auto": the best of those this machine has (``resolve_backend``; see docs/runtime.md).
    providers:        onnxruntime execution providers, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"];
                      None: CUDA first when this onnxruntime has it, else CPU.
    backend_options:  keyword arguments for the backend, e.g. {"max_tags": 30000, "fp16": True} for
                      TensorRT (fields of ``TensorRTOptions``) or {"inter_op_threads": 1} for onnxruntime.
    vocabulary:       a :class:`Vocabulary` or a vocabulary folder; None: the bundle's own.
    verify_files:     check every file's sha256 against the manifest at load (a second per GB).
    intra_op_threads: onnxruntime threads per operator (None: one per physical core).
    decoder_memory_mb: bound on the decoder's working memory per call (default 256 MiB): larger
                      vocabularies or batches are scored in several calls, with exactly the same scores.
    tag_chunk:        tags per decoder call, instead of deriving it from ``decoder_memory_mb``.
    resize, exif_transpose, alpha, max_pixels: preprocessing, see :class:`Preprocessor`.

    Thread safety: ``preprocess``, ``encode``, ``logits`` and ``tag`` may be called from several threads;
    ``set_vocabulary`` must not run concurrently with them.
    """

    def __init__(
        self,
        bundle_dir: Union[str, os.PathLike],
        backend: str = "onnxruntime",
        providers: Optional[Sequence[Any]] = None,
        *,
        vocabulary: Union[Vocabulary, str, os.PathLike, None] = None,
        verify_files: bool = True,
        intra_op_threads: Optional[int] = None,
        backend_options: Optional[Dict[str, Any]] = None,
        decoder_memory_mb: float = DEFAULT_DECODER_MEMORY_MB,
        tag_chunk: Optional[int] = None,
        resize: str = "pillow",
        exif_transpose: bool = True,
        alpha: str = "drop",
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ):
        if not decoder_memory_mb > 0:
            raise ValueError(f"decoder_memory_mb must be positive, got {decoder_memory_mb!r}")
        if tag_chunk is not None and (isinstance(tag_chunk, bool) or int(tag_chunk) < 1):
            raise ValueError(f"tag_chunk must be a positive integer or None, got {tag_chunk!r}")
        self.decoder_memory_mb = float(decoder_memory_mb)
        self.tag_chunk = None if tag_chunk is None else int(tag_chunk)
        requested = backend
        backend, options, self.backend_reason = configure_backend(requested, providers, intra_op_threads,
                                                                  backend_options)
        if requested == AUTO:
            logger.info("backend=%r chose %s: %s", AUTO, backend, self.backend_reason)
        self.bundle: BundleInfo = open_bundle(bundle_dir, verify_files=verify_files)
        self.preprocessor = Preprocessor(
            self.bundle.image_size, resize=resize, exif_transpose=exif_transpose, alpha=alpha, max_pixels=max_pixels
        )
        self.backend_name = backend
        self._backend_options = options
        self._graphs: List[Backend] = []
        self._text_encoder = None
        self._captioner = None
        self._class_cache: Dict[Tuple[str, ...], np.ndarray] = {}
        try:
            self._encoder: Backend = self._open(self.bundle.encoder_path)
            self._decoder: Backend = self._open(self.bundle.decoder_path)
            check_graph_io(self.bundle, self._encoder, self._decoder)
            if vocabulary is None:
                try:
                    vocabulary = Vocabulary.load(self.bundle.vocabulary_dir)
                except ValueError as e:
                    raise BundleError(f"{self.bundle.path}: the bundle's vocabulary is invalid: {e}") from e
            self._vocabulary: Optional[Vocabulary] = None
            self.set_vocabulary(vocabulary)
        except BaseException:
            self.close()
            raise

    def _open(self, path) -> Backend:
        graph = open_graph(self.backend_name, path, self._backend_options)
        self._graphs.append(graph)
        return graph

    # -- life cycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        for graph in self._graphs:
            graph.deactivate()
        if self._text_encoder is not None:
            self._text_encoder.close()
        if self._captioner is not None:
            self._captioner.close()

    def __enter__(self) -> "Tagger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Tagger({str(self.bundle.path)!r}, backend={self.backend_name!r}, image_size={self.image_size}, "
                f"{self._vocabulary!r})")

    # -- properties ----------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @property
    def default_threshold(self) -> float:
        return self.bundle.default_threshold

    @property
    def providers(self) -> List[str]:
        """The onnxruntime providers in use (empty for other backends)."""
        return list(getattr(self._encoder, "providers", []))

    @property
    def default_batch_size(self) -> int:
        """Images per call that ``ram-tag`` uses unless told: 1 on a CPU (a batch is not faster there and
        multiplies memory), 16 on a GPU."""
        return DEFAULT_BATCH_SIZE.get(getattr(self._encoder, "device", "cpu"), 1)

    @property
    def has_text_encoder(self) -> bool:
        return self.bundle.has_text_encoder

    @property
    def text_encoder(self):
        """The bundle's CLIP text encoder (:class:`~ram_edge.runtime.TextEncoder`), loaded on first use with
        this Tagger's backend; a bundle without one raises BundleError saying how to add it."""
        if self._text_encoder is None:
            from .text_encoder import TextEncoder

            options = dict(self._backend_options)
            self._text_encoder = TextEncoder(self.bundle, self.backend_name, backend_options=options)
        return self._text_encoder

    @property
    def has_captioning(self) -> bool:
        """Whether the bundle has the captioning graphs (Tag2Text; RAM exported with --captioning)."""
        return self.bundle.has_captioning

    @property
    def captioner(self):
        """The bundle's captioning graphs and tokenizer (:class:`~ram_edge.runtime.caption.Captioner`), loaded
        on first use with this Tagger's backend; a bundle without them raises BundleError saying which
        export adds them."""
        if self._captioner is None:
            from .caption import Captioner

            self._captioner = Captioner(self.bundle, self.backend_name, dict(self._backend_options))
        return self._captioner

    # -- vocabulary ----------------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary: Union[Vocabulary, str, os.PathLike]) -> None:
        """Score a different set of tags from now on; the graphs stay loaded. The embeddings (and per-tag
        arrays such as Tag2Text's classifier rows) are handed to the decoder once here (kept on the device
        by backends that can), not on every call."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.load(vocabulary)
        self._check_vocabulary(vocabulary)
        chunks = self.tag_chunks(vocabulary)
        self._decoder.set_constant_inputs(self._vocabulary_feeds(vocabulary), chunks if len(chunks) > 1 else None)
        self._vocabulary = vocabulary

    def _vocabulary_feeds(self, vocabulary: Vocabulary) -> Dict[str, np.ndarray]:
        """The decoder's vocabulary inputs: embeddings, mask and per-tag arrays (Tag2Text's classifier rows),
        each with one row per tag (so chunks of tags are row ranges of all of them)."""
        return {self.bundle.label_embed_name: vocabulary.embeddings, self.bundle.label_mask_name: vocabulary.mask,
                **vocabulary.per_tag}

    # -- decoder working memory ------------------------------------------------------------------------
    def decoder_bytes_per_pair(self, max_descriptions: int) -> int:
        """Upper estimate of the decoder's activation bytes per (image, tag) pair, from the model's
        configuration: RAM++'s description scores and weights (2D), the tag embedding (E), the queries and
        the layers' hidden states (8H), attention scores and probabilities (2 x heads x image tokens) and the
        feed-forward block (2 x intermediate), float32. Official decoder, 145 image tokens: 56 KB (measured
        44 KB); x3 for fp16 bundles (``DECODER_MEMORY_FACTOR``)."""
        decoder = ((self.bundle.manifest.get("model") or {}).get("config") or {}).get("decoder") or {}
        hidden = int(decoder.get("hidden_size", 768))
        heads = int(decoder.get("num_heads", 4))
        intermediate = int(decoder.get("intermediate_size", 3072))
        floats = (2 * max_descriptions + self.bundle.embed_dim + 8 * hidden
                  + 2 * heads * self.bundle.num_image_tokens + 2 * intermediate)
        return int(4 * floats * DECODER_MEMORY_FACTOR.get(str(self.bundle.manifest.get("precision")), 1.0))

    def _pairs_per_call(self, vocabulary: Vocabulary) -> int:
        budget = self.decoder_memory_mb * 2**20
        return max(1, int(budget // self.decoder_bytes_per_pair(vocabulary.max_descriptions)))

    def tag_chunks(self, vocabulary: Optional[Vocabulary] = None) -> List[Tuple[int, int]]:
        """The (start, stop) tag ranges the decoder scores ``vocabulary`` (default: the current one) in:
        ``tag_chunk`` tags each, or as many as ``decoder_memory_mb`` holds for one image."""
        vocabulary = vocabulary if vocabulary is not None else self._vocabulary
        size = self.tag_chunk or self._pairs_per_call(vocabulary)
        total = vocabulary.num_tags
        return [(start, min(start + size, total)) for start in range(0, total, size)]
    def _check_vocabulary(self, vocabulary: Vocabulary) -> None:
        if vocabulary.embed_dim != self.bundle.embed_dim:
            raise ValueError(
                f"vocabulary embeddings are {vocabulary.embed_dim} wide but this bundle's model takes "
                f"embed_dim={self.bundle.embed_dim}; compute the embeddings with the text encoder that matches "
                "the model (CLIP ViT-B/16 gives 512)"
            )
        wanted = {t.name: tuple(t.shape[1:]) for t in self.bundle.decoder.inputs[3:]}
        given = {name: array.shape[1:] for name, array in vocabulary.per_tag.items()}
        if set(given) != set(wanted):
            if wanted and not given:
                raise ValueError(
                    f"this {self.bundle.model_kind} bundle scores each tag with its own classifier row: the vocabulary "
                    f"must carry the per-tag arrays {', '.join(wanted)} (the bundle's own vocabulary and its subsets "
                    "do; vocabularies built from words cannot)"
                )
            raise ValueError(f"the vocabulary's per-tag arrays {sorted(given) or 'none'} are not the decoder's per-tag "
                             f"inputs {sorted(wanted) or 'none'}: it was made for another kind of model")
        for name, shape in given.items():
            if any(isinstance(w, int) and w != g for w, g in zip(wanted[name], shape)) or len(shape) != len(wanted[name]):
                raise ValueError(f"the vocabulary's per-tag array {name} has rows of shape {shape}, the decoder takes "
                                 f"{wanted[name]}")

    def excluded_indices(self, vocabulary: Optional[Vocabulary] = None) -> np.ndarray:
        """Positions of the bundle's excluded tags (Tag2Text's delete_tag_index) in ``vocabulary`` (default: the
        current one): never output, whatever the threshold, as upstream."""
        vocabulary = vocabulary if vocabulary is not None else self._vocabulary
        if not self.bundle.excluded_tags:
            return np.zeros(0, dtype=np.int64)
        excluded = set(self.bundle.excluded_tags)
        return np.array([i for i, n in enumerate(vocabulary.names) if n in excluded], dtype=np.int64)

    # -- inference -----------------------------------------------------------------------------------
    def preprocess(self, image: ImageInput, channel_order: str = "rgb") -> np.ndarray:
        """One image (path, bytes, PIL image, or HWC uint8 array in ``channel_order`` "rgb" or "bgr") ->
        (3, S, S) float32."""
        return self.preprocessor(image, channel_order=channel_order)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) or (3, S, S) float32 -> image_embeds (B, 1+N, E); one encoder call for any B."""
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        S = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, S, S) or pixel_values.shape[0] < 1:
            raise ValueError(f"pixel_values must be (B, 3, {S}, {S}) float32, got {pixel_values.shape}")
        outputs = self._encoder.infer({self.bundle.pixel_values_name: np.ascontiguousarray(pixel_values)})
        return outputs[self.bundle.encoder.outputs[0].name]

    def decode(self, image_embeds: np.ndarray, vocabulary: Optional[Vocabulary] = None) -> np.ndarray:
        """image_embeds (B, 1+N, E) -> logits (B, T) against the current vocabulary, or against
        ``vocabulary`` for this call only (its arrays are fed with the call instead of the resident
        ones: what a service holding several vocabularies does); one decoder call."""
        image_embeds = self._check_image_embeds(image_embeds)
        resident = vocabulary is None
        vocabulary = self._vocabulary if resident else vocabulary
        if not resident:
            self._check_vocabulary(vocabulary)
        chunks = self.tag_chunks(vocabulary)
        # Images per call so that (images x chunk) pairs stay within decoder_memory_mb.
        images = max(1, self._pairs_per_call(vocabulary) // (chunks[0][1] - chunks[0][0]))
        name, out_name = self.bundle.image_embeds_name, self.bundle.logits_name
        batch = image_embeds.shape[0]
        if len(chunks) == 1 and batch <= images:
            feeds = {name: image_embeds} if resident else {name: image_embeds, **self._vocabulary_feeds(vocabulary)}
            return self._decoder.infer(feeds)[out_name]
        logits = np.empty((batch, vocabulary.num_tags), dtype=np.float32)
        for first in range(0, batch, images):
            rows = slice(first, first + images)
            for index, (start, stop) in enumerate(chunks):
                if resident:
                    feeds, chunk = {name: image_embeds[rows]}, (index if len(chunks) > 1 else None)
                else:  # views of the call's vocabulary, no copy
                    feeds = {name: image_embeds[rows], **{k: v[start:stop] for k, v in self._vocabulary_feeds(vocabulary).items()}}
                    chunk = None
                logits[rows, start:stop] = self._decoder.infer(feeds, chunk=chunk)[out_name]
        return logits

    def _check_image_embeds(self, image_embeds: np.ndarray) -> np.ndarray:
        image_embeds = np.ascontiguousarray(image_embeds, dtype=np.float32)
        expected = (self.bundle.num_image_tokens, self.bundle.image_width)
        if image_embeds.ndim != 3 or image_embeds.shape[1:] != expected:
            raise ValueError(f"image_embeds must be (B, {expected[0]}, {expected[1]}), got {image_embeds.shape}")
        return image_embeds

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> (B, T) logits (before the sigmoid)."""
        return self.decode(self.encode(pixel_values))

    def probabilities(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> (B, T) tag probabilities."""
        return sigmoid(self.logits(pixel_values))

    def tag(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        threshold: Optional[float] = None,
        top_k: Optional[int] = None,
        lang: str = "en",
        channel_order: str = "rgb",
        errors: str = "raise",
    ) -> Union[TagResult, List[TagResult]]:
        """Tag one image (returns a TagResult) or a sequence of images (a list, one batch: one encoder and
        one decoder call). A tag is kept when its probability is above the threshold — ``threshold=None``
        uses the vocabulary's per-tag thresholds, else the bundle's default_threshold — then the
        ``top_k`` most probable are kept. Pass ``threshold=0`` for a plain top-k.

        ``errors``: "raise" (default) raises the first :class:`ImageError`, naming the input; "return"
        tags the good images and gives each bad one a TagResult with ``error`` set (``ok`` False)."""
        names = self._vocabulary.display_names(lang)  # check lang before spending time on the model
        return self._per_image(images, channel_order, errors, TagResult,
                               lambda pixels: self.select(self.probabilities(pixels), threshold, top_k, names=names))

    def _per_image(self, images, channel_order: str, errors: str, result_type, infer):
        """Preprocess every input, run ``infer`` once on the good ones, and put the results (and, with
        ``errors="return"``, a ``result_type(error=...)`` per bad input) back in input order."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        single = _is_single_image(images)
        items = [images] if single else list(images)
        if not items:
            return []
        results: List[Any] = [None] * len(items)
        good, arrays = [], []
        for i, image in enumerate(items):
            try:
                arrays.append(self.preprocess(image, channel_order))
                good.append(i)
            except ImageError as e:
                if e.source is None and not single:
                    e = e.with_source(f"image {i}")
                if errors == "raise":
                    raise e from None
                results[i] = result_type((), (), error=str(e))
        if arrays:
            for i, result in zip(good, infer(np.stack(arrays))):
                results[i] = result
        return results[0] if single else results

    def select(
        self,
        probabilities: np.ndarray,
        threshold: Optional[float] = None,
        top_k: Optional[int] = None,
        lang: str = "en",
        names: Optional[List[str]] = None,
        vocabulary: Optional[Vocabulary] = None,
    ) -> List[TagResult]:
        """(B, T) probabilities -> one TagResult per row (threshold, then top_k, most probable first).
        ``threshold=None`` uses the vocabulary's own per-tag thresholds (the current one, or ``vocabulary``).
        The bundle's excluded tags (Tag2Text's delete_tag_index) are never listed, as upstream."""
        vocabulary = vocabulary if vocabulary is not None else self._vocabulary
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if names is None:
            names = vocabulary.display_names(lang)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(names):
            raise ValueError(f"probabilities must be (B, {len(names)}), got {probabilities.shape}")
        if threshold is None:
            thresholds = vocabulary.threshold_array(self.default_threshold)
        else:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
            thresholds = np.float32(threshold)
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        excluded = self.excluded_indices(vocabulary)
        if excluded.size:  # never above an infinite threshold
            thresholds = np.array(np.broadcast_to(thresholds, (len(names),)), dtype=np.float32)
            thresholds[excluded] = np.inf
        return select_tags(probabilities, thresholds, names, top_k)

    # -- captions ------------------------------------------------------------------------------------
    def caption(
        self,
        images: Union[ImageInput, Sequence[ImageInput], np.ndarray],
        tags: Union[None, str, Sequence[Optional[str]]] = None,
        num_beams: Optional[int] = None,
        *,
        max_length: Optional[int] = None,
        min_length: Optional[int] = None,
        repetition_penalty: Optional[float] = None,
        legacy_scoring: bool = False,
        channel_order: str = "rgb",
    ) -> Union[CaptionResult, List[CaptionResult]]:
        """Caption one image (a CaptionResult) or a sequence of images (a list, one per image), as
        upstream's ``Tag2Text.generate`` does. ``images`` may also be preprocessed ``pixel_values``
        (float32, (3, S, S) or (B, 3, S, S)).

        tags:               None: the predicted tags (the vocabulary's thresholds, excluded tags removed,
                            in vocabulary order, " | "-joined); a string: your tags for every image ("dog,
                            frisbee"; "," becomes " | " as upstream's script does; empty falls back to the
                            predicted tags); or one string / None per image. Longer than the 40-token tag
                            prompt: truncated, as upstream.
        num_beams:          1 = greedy; default the bundle's (upstream's 3).
        max_length, min_length: in tokens, the 4 prompt tokens included (default 30 and 10).
        repetition_penalty: transformers' (1.0 = none, the default).
        legacy_scoring:     beam scores as transformers <= 4.35 (normalised by the whole length, prompt
                            included); default: transformers >= 4.36, which upstream's goldens follow.

        Every image is searched on its own (a batch shares only the graph calls), so each gets the
        caption it gets alone. Needs the bundle's captioning graphs.
        """
        captioner = self.captioner  # fails first, with the export that adds the graphs
        settings = captioner.settings(num_beams, max_length, min_length, repetition_penalty, legacy_scoring)
        single, pixel_values = self._caption_inputs(images, channel_order)
        if pixel_values.shape[0] == 0:
            return []
        results = self.caption_embeds(self.encode(pixel_values), _per_image_tags(tags, pixel_values.shape[0], single),
                                      settings=settings)
        return results[0] if single else results

    def caption_embeds(self, image_embeds: np.ndarray, tags: Union[None, str, Sequence[Optional[str]]] = None,
                       probabilities: Optional[np.ndarray] = None, *, settings=None) -> List[CaptionResult]:
        """Captions from encoder outputs (B, 1+N, E): ``caption`` after the image encoder. ``probabilities``
        (B, T), when the caller has them, saves the tagging decoder call for the predicted tags;
        ``settings``: a :class:`~ram_edge.runtime.caption.SearchSettings` (default: the bundle's)."""
        captioner = self.captioner
        image_embeds = self._check_image_embeds(image_embeds)
        user = _per_image_tags(tags, image_embeds.shape[0], False)
        predicted = [""] * len(user)
        if any(is_empty_user_tags(t) for t in user):
            if probabilities is None:
                probabilities = sigmoid(self.decode(image_embeds))
            predicted = self.caption_tags(probabilities)
        settings = settings if settings is not None else captioner.settings()
        results = captioner.caption(image_embeds, tag_strings_for(predicted, user), settings)
        for given, result in zip(user, results):
            if result.tags_truncated and not is_empty_user_tags(given):
                logger.warning("caption tags longer than the %d-token tag prompt were cut there, as upstream does: %.60s...",
                               captioner.info.tag_max_length, result.tags)
        return results

    def caption_tags(self, probabilities: np.ndarray) -> List[str]:
        """Upstream's tag prompt from (B, T) probabilities: the tags above the vocabulary's own thresholds,
        the bundle's excluded tags removed, in vocabulary order, joined with " | "."""
        vocabulary = self._vocabulary
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if probabilities.ndim != 2 or probabilities.shape[1] != vocabulary.num_tags:
            raise ValueError(f"probabilities must be (B, {vocabulary.num_tags}), got {probabilities.shape}")
        thresholds = np.array(vocabulary.threshold_array(self.default_threshold), dtype=np.float32)
        thresholds[self.excluded_indices(vocabulary)] = np.inf
        names = vocabulary.names
        separator = self.captioner.info.tag_separator
        return [separator.join(names[i] for i in np.flatnonzero(row)) for row in probabilities > thresholds]

    def _caption_inputs(self, images: Any, channel_order: str) -> Tuple[bool, np.ndarray]:
        """(single, (B, 3, S, S) pixel values) from images or already preprocessed pixel values."""
        S = self.image_size
        if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating) and (
                images.shape[-3:] == (3, S, S) and images.ndim in (3, 4)):
            return images.ndim == 3, np.asarray(images, dtype=np.float32).reshape(-1, 3, S, S)
        single = _is_single_image(images)
        items = [images] if single else list(images)
        if not items:
            return single, np.zeros((0, 3, S, S), dtype=np.float32)
        return single, np.stack([self.preprocess(image, channel_order) for image in items])

    # -- zero-shot classification --------------------------------------------------------------------
    def class_embeddings(self, classes: Union[Sequence[str], Vocabulary]) -> Tuple[List[str], np.ndarray]:
        """Class names and their (C, E) unit text embeddings: RAM's prompt-template recipe (63 sentences
        per class, normalised, averaged, normalised), computed with the bundle's text encoder and cached;
        a :class:`Vocabulary` gives its own rows (averaged over descriptions and normalised)."""
        if isinstance(classes, Vocabulary):
            vocab = classes
        else:
            names = tuple(_clean_classes(classes))
            cached = self._class_cache.get(names)
            if cached is not None:
                return list(names), cached
            vocab = Vocabulary.from_names(list(names), self.text_encoder, kind="ram")
        self._check_vocabulary(vocab)
        mask = vocab.mask[:, :, None]
        mean = (vocab.embeddings * mask).sum(axis=1) / mask.sum(axis=1)
        embeds = (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)
        if not isinstance(classes, Vocabulary):
            if len(self._class_cache) >= CLASS_CACHE_SIZE:
                self._class_cache.pop(next(iter(self._class_cache)))
            self._class_cache[names] = embeds
        return vocab.names, embeds

    def classify_embeds(self, image_embeds: np.ndarray, classes: Union[Sequence[str], Vocabulary],
                        top_k: Optional[int] = None) -> List[ClassResult]:
        """Classify from encoder outputs: CLIP's zero-shot rule on the global token ``image_embeds[:, 0]``
        (which RAM and RAM++ align with CLIP's text space): softmax(logit_scale * cos(image, class))."""
        names, class_embeds = self.class_embeddings(classes)
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        image = np.asarray(image_embeds, dtype=np.float32)[:, 0, :]
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        logits = np.float32(self.bundle.logit_scale) * (image @ class_embeds.T)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[: top_k or len(names)]
            results.append(ClassResult(tuple(names[i] for i in order), tuple(float(row[i]) for i in order),
                                       tuple(int(i) for i in order)))
        return results

    def classify(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        classes: Union[Sequence[str], Vocabulary],
        top_k: Optional[int] = None,
        channel_order: str = "rgb",
        errors: str = "raise",
    ) -> Union[ClassResult, List[ClassResult]]:
        """Zero-shot single-label classification of one image (a ClassResult) or a list (one batch),
        without the decoder: probabilities over ``classes`` sum to 1. Needs the bundle's text encoder
        for class names (a Vocabulary of precomputed embeddings does not). ``errors`` as in :meth:`tag`."""
        self.class_embeddings(classes)  # fail on bad classes before decoding images
        return self._per_image(images, channel_order, errors, ClassResult,
                               lambda pixels: self.classify_embeds(self.encode(pixels), classes, top_k))


def _per_image_tags(tags: Union[None, str, Sequence[Optional[str]]], count: int, single: bool) -> List[Optional[str]]:
    """``Tagger.caption``'s ``tags`` as one entry (a string or None) per image."""
    if tags is None or isinstance(tags, str):
        return [tags] * count
    if single:
        raise ValueError("for one image pass its tags as one string, e.g. tags=\"dog, frisbee\" (a list gives one "
                         "entry per image)")
    tags = list(tags)
    if len(tags) != count:
        raise ValueError(f"tags has {len(tags)} entries for {count} images: give one string (or None) per image, "
                         "or one string for all")
    bad = [t for t in tags if t is not None and not isinstance(t, str)]
    if bad:
        raise ValueError(f"tags entries must be strings or None, got {bad[0]!r}")
    return tags


def _clean_classes(classes: Sequence[str]) -> List[str]:
    from ram_edge.vocabulary import clean_tag_names

    names = clean_tag_names(classes)
    if len(names) < 2:
        raise ValueError(f"classification needs at least two classes, got {names}")
    return names
