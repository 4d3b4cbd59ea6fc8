"""CLIP's text tower from a bundle, torch-free: words -> the embeddings open-set vocabularies are made of.

    from ram_edge.runtime import TextEncoder, Vocabulary
    text = TextEncoder("bundle/")
    vocab = Vocabulary.from_names(["otter", "kayak", "paddle board"], text)

Texts are tokenized exactly as OpenAI's ``clip.tokenize(..., truncate=True)`` (:mod:`.clip_tokenizer`) and
run through ``text_encoder.onnx`` in batches. A batch is cut to its longest sequence instead of the
77-token context: CLIP's attention is causal and pools at the end-of-text token, so the padding after it
never reaches the output (exact, and several times faster for tag names and short sentences). Texts are
sorted by length first so that each batch is as short as it can be.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from ram_edge.bundle_format import BundleError
from ram_edge.vocabulary import TAG2TEXT_OPEN_SET_MESSAGE

from .backends import configure_backend, open_graph
from .bundle import ADD_TEXT_ENCODER_HINT, BundleInfo, check_backend_io, open_bundle
from .clip_tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

#: Texts per text-encoder call. 64 keeps the activations of a 77-token ViT-B/16 batch near 100 MB.
DEFAULT_BATCH_SIZE = 64


class TextEncoder:
    """Runs a bundle's ``text_encoder.onnx``.

    bundle:      a bundle folder or an opened :class:`BundleInfo` (the Tagger shares its own).
    backend, providers, intra_op_threads, backend_options: as for :class:`~ram_edge.runtime.Tagger`.
    batch_size:  texts per graph call.

    ``model_kind`` ("ram_plus" / "ram") tells :meth:`Vocabulary.from_names` which recipe the bundle's
    model needs; ``source`` names the text checkpoint (recorded in vocabularies built with it).
    """

    def __init__(
        self,
        bundle: Union[str, os.PathLike, BundleInfo],
        backend: str = "onnxruntime",
        providers: Optional[Sequence[Any]] = None,
        *,
        verify_files: bool = True,
        intra_op_threads: Optional[int] = None,
        backend_options: Optional[Dict[str, Any]] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        info = bundle if isinstance(bundle, BundleInfo) else open_bundle(bundle, verify_files=verify_files)
        if info.model_kind == "tag2text":
            raise BundleError(f"{info.path}: {TAG2TEXT_OPEN_SET_MESSAGE}")
        if not info.has_text_encoder:
            raise BundleError(
                f"{info.path}: this bundle has no text encoder, which open-set vocabularies and classification "
                f"need; " + ADD_TEXT_ENCODER_HINT.format(bundle=info.path)
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = info
        self.batch_size = int(batch_size)
        self.tokenizer = ClipTokenizer(info.tokenizer_path, context_length=info.context_length)
        backend, options, _ = configure_backend(backend, providers, intra_op_threads, backend_options)
        self._graph = open_graph(backend, info.text_encoder_path, options)
        try:
            check_backend_io(info, "text encoder", info.text_encoder, self._graph)
        except BaseException:
            self.close()
            raise
        self._input_name = info.text_encoder.inputs[0].name
        self._output_name = info.text_encoder.outputs[0].name

    # -- life cycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        self._graph.deactivate()

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TextEncoder({str(self.bundle.path)!r}, source={self.source!r}, embed_dim={self.embed_dim})"

    # -- properties ----------------------------------------------------------------------------------
    @property
    def model_kind(self) -> str:
        return self.bundle.model_kind

    @property
    def embed_dim(self) -> int:
        return self.bundle.embed_dim

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def source(self) -> str:
        return str(((self.bundle.manifest.get("text") or {}).get("model") or {}).get("source", "unknown"))

    @property
    def logit_scale(self) -> float:
        return self.bundle.logit_scale

    # -- encoding ------------------------------------------------------------------------------------
    def tokenize(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """(N, 77) int32 token ids, as ``clip.tokenize(texts, truncate=True)``."""
        return self.tokenizer(texts, truncate=True)

    def encode(self, texts: Union[str, Sequence[str]], batch_size: Optional[int] = None,
               progress: bool = False) -> np.ndarray:
        """(N, E) float32 text embeddings as CLIP's ``encode_text`` returns them (not normalised)."""
        ids = self.tokenize(texts)
        return self.encode_ids(ids, batch_size=batch_size, progress=progress)

    def encode_ids(self, ids: np.ndarray, batch_size: Optional[int] = None, progress: bool = False,
                   trim: bool = True) -> np.ndarray:
        """(N, L) token ids (start token, BPE ids, end token, zero padding) -> (N, E) float32.

        ``trim=False`` runs every batch at the full width L, as upstream does (same numbers up to
        float32 rounding; only for measuring what trimming saves)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be an (N, L) integer array, got {ids.dtype} {ids.shape}")
        batch_size = int(batch_size or self.batch_size)
        count = ids.shape[0]
        out = np.empty((count, self.embed_dim), dtype=np.float32)
        if count == 0:
            return out
        lengths = ids.argmax(axis=1) + 1 if trim else np.full(count, ids.shape[1])  # through the end token
        order = np.argsort(lengths, kind="stable")
        from tqdm import tqdm

        with tqdm(total=count, unit="text", desc="text embeddings", disable=not progress, leave=False) as bar:
            for start in range(0, count, batch_size):
                rows = order[start : start + batch_size]
                width = int(lengths[rows].max())
                batch = np.ascontiguousarray(ids[rows, :width], dtype=np.int64)
                out[rows] = self._graph.infer({self._input_name: batch})[self._output_name]
                bar.update(len(rows))
        return out
