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

from .backends import AUTO, get_backend_class, resolve_backend
from .backends.base import Backend
from .bundle import BundleInfo, check_graph_io, open_bundle
from .preprocess import DEFAULT_MAX_PIXELS, ImageInput, Preprocessor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagResult:
    """Tags of one image, most probable first. ``probabilities`` are sigmoid(logits), aligned with ``tags``;
    ``indices`` are the tags' positions in the vocabulary."""

    tags: Tuple[str, ...]
    probabilities: Tuple[float, ...]
    indices: Tuple[int, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.tags)

    def as_dict(self) -> Dict[str, float]:
        return dict(zip(self.tags, self.probabilities))


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
        resize: str = "pillow",
        exif_transpose: bool = True,
        alpha: str = "drop",
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ):
        options: Dict[str, Any] = dict(backend_options or {})
        requested = backend
        backend, auto_options, self.backend_reason = resolve_backend(requested)
        if requested == AUTO:
            logger.info("backend=%r chose %s: %s", AUTO, backend, self.backend_reason)
            options = {**auto_options, **options}
        if backend == "onnxruntime":
            options.update({k: v for k, v in (("providers", providers), ("intra_op_threads", intra_op_threads))
                            if v is not None})
        elif providers is not None or intra_op_threads is not None:
            raise ValueError(f"providers and intra_op_threads are onnxruntime settings; backend {backend!r} takes "
                             "its settings through backend_options")
        self.bundle: BundleInfo = open_bundle(bundle_dir, verify_files=verify_files)
        self.preprocessor = Preprocessor(
            self.bundle.image_size, resize=resize, exif_transpose=exif_transpose, alpha=alpha, max_pixels=max_pixels
        )
        backend_class = get_backend_class(backend)
        self.backend_name = backend
        self._encoder: Backend = backend_class(self.bundle.encoder_path, **options)
        self._decoder: Backend = backend_class(self.bundle.decoder_path, **options)
        try:
            for graph in (self._encoder, self._decoder):
                try:
                    graph.activate()
                except (ValueError, ImportError, NotImplementedError):
                    raise  # a wrong provider / missing package: the message is already specific
                except Exception as e:  # onnxruntime raises its own exception types for invalid models
                    raise BundleError(
                        f"{graph.model_path}: the {backend} backend cannot load this graph ({e}). "
                        "The file may be damaged, or need a newer onnxruntime (see the manifest's 'versions')."
                    ) from e
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

    # -- life cycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        self._encoder.deactivate()
        self._decoder.deactivate()

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

    # -- vocabulary ----------------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary: Union[Vocabulary, str, os.PathLike]) -> None:
        """Score a different set of tags from now on; the graphs stay loaded. The embeddings are handed to
        the decoder once here (kept on the device by backends that can), not on every call."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.load(vocabulary)
        if vocabulary.embed_dim != self.bundle.embed_dim:
            raise ValueError(
                f"vocabulary embeddings are {vocabulary.embed_dim} wide but this bundle's model takes "
                f"embed_dim={self.bundle.embed_dim}; compute the embeddings with the text encoder that matches "
                "the model (CLIP ViT-B/16 gives 512)"
            )
        self._decoder.set_constant_inputs({
            self.bundle.label_embed_name: vocabulary.embeddings,
            self.bundle.label_mask_name: vocabulary.mask,
        })
        self._vocabulary = vocabulary

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

    def decode(self, image_embeds: np.ndarray) -> np.ndarray:
        """image_embeds (B, 1+N, E) -> logits (B, T) against the current vocabulary; one decoder call."""
        image_embeds = np.ascontiguousarray(image_embeds, dtype=np.float32)
        expected = (self.bundle.num_image_tokens, self.bundle.embed_dim)
        if image_embeds.ndim != 3 or image_embeds.shape[1:] != expected:
            raise ValueError(f"image_embeds must be (B, {expected[0]}, {expected[1]}), got {image_embeds.shape}")
        outputs = self._decoder.infer({self.bundle.image_embeds_name: image_embeds})
        return outputs[self.bundle.logits_name]

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
    ) -> Union[TagResult, List[TagResult]]:
        """Tag one image (returns a TagResult) or a sequence of images (a list, one batch: one encoder and
        one decoder call). A tag is kept when its probability is above the threshold — ``threshold=None``
        uses the vocabulary's per-tag thresholds, else the bundle's default_threshold — then the
        ``top_k`` most probable are kept. Pass ``threshold=0`` for a plain top-k."""
        names = self._vocabulary.display_names(lang)  # check lang before spending time on the model
        single = _is_single_image(images)
        items = [images] if single else list(images)
        if not items:
            return []
        pixel_values = np.stack([self.preprocess(image, channel_order) for image in items])
        results = self.select(self.probabilities(pixel_values), threshold, top_k, names=names)
        return results[0] if single else results

    def select(
        self,
        probabilities: np.ndarray,
        threshold: Optional[float] = None,
        top_k: Optional[int] = None,
        lang: str = "en",
        names: Optional[List[str]] = None,
    ) -> List[TagResult]:
        """(B, T) probabilities -> one TagResult per row (threshold, then top_k, most probable first)."""
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if names is None:
            names = self._vocabulary.display_names(lang)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(names):
            raise ValueError(f"probabilities must be (B, {len(names)}), got {probabilities.shape}")
        if threshold is None:
            thresholds = self._vocabulary.threshold_array(self.default_threshold)
        else:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
            thresholds = np.float32(threshold)
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        return select_tags(probabilities, thresholds, names, top_k)
