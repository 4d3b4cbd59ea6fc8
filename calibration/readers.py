"""Calibration data readers (``onnxruntime.quantization.CalibrationDataReader``) over images.

* :class:`ImageReader` feeds the encoder ``pixel_values`` of image files, preprocessed by the runtime's
  own :class:`~ram_edge.runtime.preprocess.Preprocessor` (exactly what ``Tagger`` feeds it).
* :class:`EmbeddingReader` feeds the decoder: image embeddings (from the calibrated encoder) with the
  bundle's vocabulary, so the decoder is calibrated on what it will see behind an int8 encoder.

Both are ranged (``set_range``, ``len``): ``quantize_static`` with ``CalibStridedMinMax`` then collects
one image at a time and merges the statistics, so memory holds one image's intermediate tensors
(about 1 GB for Swin-L 384) instead of every image's.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ram_edge import bundle_format as bf
from ram_edge.runtime.preprocess import ImageError, Preprocessor

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class _RangedReader(CalibrationDataReader):
    """``get_next`` over items ``[start, end)`` of a sequence; ``set_range`` picks another slice."""

    def __init__(self, count: int, what: str, progress: Optional[Progress]):
        self._count = count
        self._start, self._end, self._next = 0, count, 0
        self._what = what
        self._progress = progress
        self._served = 0
        self._step = max(1, count // 10)

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._next = start_index, min(end_index, self._count), start_index

    def rewind(self) -> None:
        self.set_range(0, self._count)
        self._served = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._next >= self._end:
            return None
        index = self._next
        self._next += 1
        self._served += 1
        if self._progress is not None and (self._served % self._step == 0 or self._served == self._count):
            self._progress(f"  {self._what}: {self._served}/{self._count}")
        return self.feeds(index)

    def feeds(self, index: int) -> Dict[str, np.ndarray]:
        raise NotImplementedError


class ImageReader(_RangedReader):
    """Encoder feeds ``{pixel_values: (1, 3, S, S)}``, one image per call, from ``paths``.

    Every image is decoded once at construction: files that are not images (or are damaged) are left
    out with a warning and listed in ``skipped``, so a stray file in a folder of hundreds does not end
    an export, and ``len`` counts what calibration will really see.
    """

    def __init__(self, paths: Sequence[str], preprocessor: Preprocessor, *, progress: Optional[Progress] = None,
                 what: str = "calibration images"):
        self.preprocessor = preprocessor
        self.paths: List[str] = []
        self.skipped: List[str] = []
        for path in paths:
            try:
                preprocessor(path)
            except ImageError as e:
                logger.warning("%s: skipped for calibration: %s", path, e)
                self.skipped.append(path)
            else:
                self.paths.append(path)
        super().__init__(len(self.paths), what, progress)

    def feeds(self, index: int) -> Dict[str, np.ndarray]:
        return {bf.PIXEL_VALUES: self.pixels(index)}

    def pixels(self, index: int) -> np.ndarray:
        return self.preprocessor(self.paths[index])[None]


class EmbeddingReader(_RangedReader):
    """Decoder feeds ``{image_embeds: (1, N, E), label_embed, label_mask, **per_tag}``: one image's
    embeddings with the whole vocabulary (T, D, E) per call (the same arrays every call, never copied);
    ``per_tag``: the vocabulary's further per-tag decoder inputs (Tag2Text's classifier rows)."""

    def __init__(self, image_embeds: Sequence[np.ndarray], label_embed: np.ndarray, label_mask: np.ndarray, *,
                 per_tag: Optional[Mapping[str, np.ndarray]] = None, progress: Optional[Progress] = None,
                 what: str = "decoder calibration images"):
        self.image_embeds = list(image_embeds)
        self.label_embed = np.ascontiguousarray(label_embed, dtype=np.float32)
        self.label_mask = np.ascontiguousarray(label_mask, dtype=np.bool_)
        self.per_tag = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in (per_tag or {}).items()}
        super().__init__(len(self.image_embeds), what, progress)

    def feeds(self, index: int) -> Dict[str, np.ndarray]:
        embeds = self.image_embeds[index]
        return {bf.IMAGE_EMBEDS: embeds if embeds.ndim == 3 else embeds[None],
                bf.LABEL_EMBED: self.label_embed, bf.LABEL_MASK: self.label_mask, **self.per_tag}
