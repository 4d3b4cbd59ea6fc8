"""The tag vocabulary as data: names, optional Chinese names and thresholds, and per-tag description
embeddings. Numpy only: the exporter writes a bundle's ``vocabulary/`` with it and the runtime reads it.

On disk (``docs/bundle.md``)::

    vocabulary/
      vocabulary.json   {"format_version": 1, "names": [...], "names_zh": [...] | null,
                         "thresholds": [...] | null, "num_descriptions": [...], "embed_dim": E,
                         "dtype": "float16" | "float32"}
      embeddings.npy    (T, D, E) in that dtype, D = max(num_descriptions), rows past a tag's count are zero

In memory the embeddings are held once as a C-contiguous float32 (T, D, E) array, with the (T, D) bool
mask beside it: exactly what the decoder graph takes, so a backend can bind them once per vocabulary
instead of converting them on every call. Both arrays are read-only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

VOCABULARY_FORMAT_VERSION = 1
VOCABULARY_JSON = "vocabulary.json"
EMBEDDINGS_NPY = "embeddings.npy"
STORED_DTYPE = "float16"  # the default on disk: half the size, 3 significant digits of unit-norm rows
STORED_DTYPES = ("float16", "float32")
_FLOAT16_MAX = float(np.finfo(np.float16).max)

PathLike = Union[str, os.PathLike]


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class Vocabulary:
    """Tags the decoder scores, with their description embeddings.

    ``embeddings`` may be

    * (T, E): one embedding per tag (RAM),
    * (T, D, E): D descriptions per tag (RAM++); all D are valid unless ``num_descriptions`` says how
      many leading rows of each tag are (the rest is padding and is ignored), or
    * a list of T arrays of shape (D_t, E) (or (E,)), tags with different numbers of descriptions.

    ``thresholds`` are per-tag decision thresholds on the sigmoid probability (``None``: use the
    bundle's default). ``names_zh`` are Chinese display names. Invalid input raises ``ValueError``.
    """

    def __init__(
        self,
        names: Sequence[str],
        embeddings: Union[np.ndarray, Sequence[np.ndarray]],
        thresholds: Optional[Sequence[float]] = None,
        names_zh: Optional[Sequence[str]] = None,
        *,
        num_descriptions: Optional[Sequence[int]] = None,
    ):
        self._names: List[str] = _check_names(names, "names")
        num_tags = len(self._names)
        self._names_zh: Optional[List[str]] = None
        if names_zh is not None:
            self._names_zh = [str(n) for n in names_zh]
            if len(self._names_zh) != num_tags:
                raise ValueError(f"Vocabulary: names_zh has {len(self._names_zh)} entries, names has {num_tags}")
        self._thresholds: Optional[np.ndarray] = None
        if thresholds is not None:
            values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
            if values.shape[0] != num_tags:
                raise ValueError(f"Vocabulary: thresholds has {values.shape[0]} entries, names has {num_tags}")
            bad = np.flatnonzero(~np.isfinite(values) | (values < 0.0) | (values > 1.0))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"Vocabulary: threshold of tag {self._names[i]!r} is {values[i]}; thresholds are "
                    f"probabilities in [0, 1] ({bad.size} invalid)"
                )
            self._thresholds = _readonly(values.astype(np.float32))

        padded, counts = _pad_embeddings(embeddings, num_tags, num_descriptions)
        if not np.isfinite(padded).all():
            bad_tags = np.flatnonzero(~np.isfinite(padded).all(axis=(1, 2)))
            shown = ", ".join(repr(self._names[i]) for i in bad_tags[:5])
            raise ValueError(
                f"Vocabulary: embeddings contain NaN or inf ({bad_tags.size} tags, e.g. {shown}); "
                "recompute them (a text encoder run in float16 can overflow)"
            )
        self._num_descriptions = _readonly(counts)
        mask = np.arange(padded.shape[1])[None, :] < counts[:, None]
        padded[~mask] = 0.0  # padding is ignored by the graph; zero keeps the saved file canonical
        self._mask = _readonly(np.ascontiguousarray(mask))
        self._embeddings = _readonly(padded)

    # ----------------------------------------------------------------------------------------------
    # Properties

    @property
    def names(self) -> List[str]:
        return list(self._names)

    @property
    def names_zh(self) -> Optional[List[str]]:
        return None if self._names_zh is None else list(self._names_zh)

    @property
    def thresholds(self) -> Optional[np.ndarray]:
        """(T,) float32 per-tag thresholds, or ``None``."""
        return self._thresholds

    @property
    def embeddings(self) -> np.ndarray:
        """(T, D, E) float32, C-contiguous, read-only; padding rows are zero."""
        return self._embeddings

    @property
    def mask(self) -> np.ndarray:
        """(T, D) bool, read-only: ``arange(D) < num_descriptions[:, None]``."""
        return self._mask

    @property
    def num_descriptions(self) -> np.ndarray:
        """(T,) int64, read-only."""
        return self._num_descriptions

    @property
    def num_tags(self) -> int:
        return self._embeddings.shape[0]

    @property
    def max_descriptions(self) -> int:
        return self._embeddings.shape[1]

    @property
    def embed_dim(self) -> int:
        return self._embeddings.shape[2]

    def __len__(self) -> int:
        return self.num_tags

    def __repr__(self) -> str:
        return (
            f"Vocabulary(num_tags={self.num_tags}, max_descriptions={self.max_descriptions}, "
            f"embed_dim={self.embed_dim}, thresholds={'yes' if self._thresholds is not None else 'no'}, "
            f"names_zh={'yes' if self._names_zh is not None else 'no'})"
        )

    def display_names(self, lang: str = "en") -> List[str]:
        """Names in ``lang`` ("en" or "zh"); "zh" needs ``names_zh``."""
        if lang == "en":
            return list(self._names)
        if lang == "zh":
            if self._names_zh is None:
                raise ValueError("Vocabulary has no Chinese names (names_zh); use lang='en'")
            return list(self._names_zh)
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")

    def threshold_array(self, default: float) -> np.ndarray:
        """(T,) float32: the per-tag thresholds, or ``default`` for every tag when there are none."""
        if self._thresholds is not None:
            return self._thresholds
        return np.full(self.num_tags, default, dtype=np.float32)

    def index(self, name: str) -> int:
        try:
            return self._name_to_index()[name]
        except KeyError:
            raise KeyError(f"tag {name!r} is not in this vocabulary") from None

    def _name_to_index(self) -> Dict[str, int]:
        cache = getattr(self, "_index_cache", None)
        if cache is None:
            cache = {n: i for i, n in enumerate(self._names)}
            self._index_cache = cache
        return cache

    # ----------------------------------------------------------------------------------------------
    # Derived vocabularies

    def subset(self, names_or_indices: Sequence[Union[str, int]]) -> "Vocabulary":
        """A vocabulary of the given tags (by name or index, in the given order)."""
        items = list(names_or_indices)
        if not items:
            raise ValueError("Vocabulary.subset: no tags given")
        indices = []
        for item in items:
            if isinstance(item, str):
                indices.append(self.index(item))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                i = int(item)
                if not -self.num_tags <= i < self.num_tags:
                    raise IndexError(f"Vocabulary.subset: index {i} out of range for {self.num_tags} tags")
                indices.append(i % self.num_tags)
            else:
                raise TypeError(f"Vocabulary.subset: expected tag names or indices, got {type(item).__name__}")
        idx = np.asarray(indices, dtype=np.int64)
        counts = self._num_descriptions[idx]
        return Vocabulary(
            [self._names[i] for i in indices],
            self._embeddings[idx, : int(counts.max())],
            thresholds=None if self._thresholds is None else self._thresholds[idx],
            names_zh=None if self._names_zh is None else [self._names_zh[i] for i in indices],
            num_descriptions=counts,
        )

    # ----------------------------------------------------------------------------------------------
    # Files

    def save(self, directory: PathLike, dtype: str = STORED_DTYPE) -> Path:
        """Write ``vocabulary.json`` and ``embeddings.npy`` (``dtype``: float16 or float32) into
        ``directory`` (created). float32 keeps the embeddings exact; float16 halves the file."""
        if dtype not in STORED_DTYPES:
            raise ValueError(f"Vocabulary.save: dtype must be one of {STORED_DTYPES}, got {dtype!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        peak = float(np.abs(self._embeddings).max()) if self._embeddings.size else 0.0
        if dtype == "float16" and peak > _FLOAT16_MAX:
            raise ValueError(
                f"Vocabulary.save: an embedding component is {peak:g}, beyond float16's range "
                f"({_FLOAT16_MAX:g}); normalise the embeddings first, or save with dtype='float32'"
            )
        meta: Dict[str, Any] = {
            "format_version": VOCABULARY_FORMAT_VERSION,
            "names": self._names,
            "names_zh": self._names_zh,
            "thresholds": None if self._thresholds is None else [float(t) for t in self._thresholds],
            "num_descriptions": [int(n) for n in self._num_descriptions],
            "embed_dim": int(self.embed_dim),
            "dtype": dtype,
        }
        # Temporary names then rename, so an interrupted save never leaves a half-written file under
        # the real name.
        npy_tmp = directory / (EMBEDDINGS_NPY + ".tmp")
        json_tmp = directory / (VOCABULARY_JSON + ".tmp")
        with open(npy_tmp, "wb") as f:
            np.save(f, self._embeddings.astype(dtype, copy=False), allow_pickle=False)
        with open(json_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=None, separators=(",", ":"))
            f.write("\n")
        os.replace(npy_tmp, directory / EMBEDDINGS_NPY)
        os.replace(json_tmp, directory / VOCABULARY_JSON)
        return directory

    @classmethod
    def load(cls, directory: PathLike) -> "Vocabulary":
        """Read a vocabulary folder written by :meth:`save` (or by ``ram-export``)."""
        directory = Path(directory)
        json_path = directory / VOCABULARY_JSON
        npy_path = directory / EMBEDDINGS_NPY
        for path in (json_path, npy_path):
            if not path.is_file():
                raise ValueError(
                    f"{directory}: no {path.name}; a vocabulary folder holds {VOCABULARY_JSON} and "
                    f"{EMBEDDINGS_NPY} (written by Vocabulary.save or ram-export)"
                )
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{json_path}: unreadable ({e})") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{json_path}: expected a JSON object")
        version = meta.get("format_version")
        if version != VOCABULARY_FORMAT_VERSION:
            raise ValueError(
                f"{json_path}: vocabulary format version {version!r}, this ram-edge reads "
                f"{VOCABULARY_FORMAT_VERSION}"
            )
        for key in ("names", "num_descriptions", "embed_dim"):
            if key not in meta:
                raise ValueError(f"{json_path}: missing {key!r}")
        try:
            embeddings = np.load(npy_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{npy_path}: unreadable ({e})") from e
        names = meta["names"]
        counts = meta["num_descriptions"]
        embed_dim = meta["embed_dim"]
        if not isinstance(names, list) or not isinstance(counts, list):
            raise ValueError(f"{json_path}: 'names' and 'num_descriptions' must be lists")
        expected = (len(names), max(counts) if counts else 0, embed_dim)
        if embeddings.ndim != 3 or tuple(embeddings.shape) != expected:
            raise ValueError(
                f"{npy_path}: shape {tuple(embeddings.shape)}, but {json_path.name} describes "
                f"(num_tags, max(num_descriptions), embed_dim) = {expected}"
            )
        if not np.issubdtype(embeddings.dtype, np.floating):
            raise ValueError(f"{npy_path}: dtype {embeddings.dtype}, expected one of {STORED_DTYPES}")
        try:
            return cls(
                names,
                embeddings,
                thresholds=meta.get("thresholds"),
                names_zh=meta.get("names_zh"),
                num_descriptions=counts,
            )
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from e


# --------------------------------------------------------------------------------------------------
# Validation helpers


def _check_names(names: Sequence[str], field: str) -> List[str]:
    if isinstance(names, str):
        raise ValueError(f"Vocabulary: {field} must be a sequence of strings, not one string")
    result = list(names)
    if not result:
        raise ValueError("Vocabulary: needs at least one tag")
    for i, n in enumerate(result):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"Vocabulary: {field}[{i}] is {n!r}; tag names are non-empty strings")
    seen: Dict[str, int] = {}
    for i, n in enumerate(result):
        if n in seen:
            raise ValueError(
                f"Vocabulary: duplicate tag name {n!r} (positions {seen[n]} and {i}); names identify tags "
                "in the output, so they must be unique"
            )
        seen[n] = i
    return result


def _pad_embeddings(embeddings, num_tags: int, num_descriptions: Optional[Sequence[int]]):
    """(T, D, E) float32 C-contiguous array (a fresh copy we own) and (T,) int64 description counts."""
    if isinstance(embeddings, np.ndarray) or not isinstance(embeddings, (list, tuple)):
        array = np.asarray(embeddings)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or
                                         np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"Vocabulary: embeddings must be a float array, got dtype {array.dtype}")
        if array.ndim == 2:
            array = array[:, None, :]
        if array.ndim != 3:
            raise ValueError(
                f"Vocabulary: embeddings of shape {array.shape}; expected (T, E), (T, D, E) or a list of "
                "(D_t, E) arrays"
            )
        if array.shape[0] != num_tags:
            raise ValueError(f"Vocabulary: embeddings have {array.shape[0]} tags, names has {num_tags}")
        if array.shape[1] < 1 or array.shape[2] < 1:
            raise ValueError(f"Vocabulary: embeddings of shape {array.shape} are empty")
        padded = np.array(array, dtype=np.float32, order="C", copy=True)
        if num_descriptions is None:
            counts = np.full(num_tags, array.shape[1], dtype=np.int64)
        else:
            counts = _check_counts(num_descriptions, num_tags)
            if int(counts.max()) > array.shape[1]:
                raise ValueError(
                    f"Vocabulary: num_descriptions goes up to {int(counts.max())} but embeddings have "
                    f"D = {array.shape[1]}"
                )
        return padded, counts

    rows = []
    for i, item in enumerate(embeddings):
        a = np.asarray(item, dtype=np.float32)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[0] < 1:
            raise ValueError(f"Vocabulary: embeddings[{i}] has shape {a.shape}; expected (D_t, E) with D_t >= 1")
        rows.append(a)
    if len(rows) != num_tags:
        raise ValueError(f"Vocabulary: embeddings list has {len(rows)} tags, names has {num_tags}")
    widths = {a.shape[1] for a in rows}
    if len(widths) != 1:
        raise ValueError(f"Vocabulary: embeddings of different widths {sorted(widths)} in one vocabulary")
    counts = np.array([a.shape[0] for a in rows], dtype=np.int64)
    if num_descriptions is not None and not np.array_equal(_check_counts(num_descriptions, num_tags), counts):
        raise ValueError("Vocabulary: num_descriptions disagrees with the lengths of the embeddings list")
    padded = np.zeros((num_tags, int(counts.max()), widths.pop()), dtype=np.float32)
    for i, a in enumerate(rows):
        padded[i, : a.shape[0]] = a
    return padded, counts


def _check_counts(num_descriptions: Sequence[int], num_tags: int) -> np.ndarray:
    raw = list(num_descriptions)
    if len(raw) != num_tags:
        raise ValueError(f"Vocabulary: num_descriptions has {len(raw)} entries, names has {num_tags}")
    if any(isinstance(n, bool) or not float(n).is_integer() for n in raw):
        raise ValueError("Vocabulary: num_descriptions must be integers")
    counts = np.asarray(raw, dtype=np.int64)
    if (counts < 1).any():
        i = int(np.flatnonzero(counts < 1)[0])
        raise ValueError(
            f"Vocabulary: tag {i} has num_descriptions = {int(counts[i])}; every tag needs at least one "
            "description (a tag with none has no score)"
        )
    return counts
