"""The tag vocabulary as data: names, optional Chinese names and thresholds, and per-tag description
embeddings. Numpy only: the exporter writes a bundle's ``vocabulary/`` with it and the runtime reads it.

Open-set vocabularies are built from words with a text encoder (``ram_edge.runtime.TextEncoder``, or
anything with ``encode(texts) -> (N, E)``): :meth:`Vocabulary.from_names` (upstream's prompt-template
recipe) and :meth:`Vocabulary.from_descriptions` (RAM++'s LLM descriptions); :meth:`Vocabulary.concat`
joins vocabularies (the official 4,585 tags + your own) without changing any tag's score.

On disk (``docs/bundle.md``)::

    vocabulary/
      vocabulary.json   {"format_version": 1, "names": [...], "names_zh": [...] | null,
                         "thresholds": [...] | null, "num_descriptions": [...], "embed_dim": E,
                         "dtype": "float16" | "float32", "info": {...} (optional: how it was built)}
      embeddings.npy    (T, D, E) in that dtype, D = max(num_descriptions), rows past a tag's count are zero
      <name>.npy        optional per-tag arrays (T, ...) in that dtype, listed in vocabulary.json as
                        "per_tag": {"<name>": {"shape": [...], "dtype": ...}} (shape without the T axis)

Per-tag arrays are data the decoder needs for each tag besides its embeddings, fed to the graph under
their own names: Tag2Text's classifier rows ``label_fc_weight`` (T, H) and ``label_fc_bias`` (T,).
RAM and RAM++ vocabularies have none. Files without the key (and readers that ignore it) keep working.

Names are unique, except in a learned table whose classes share names (Tag2Text's 3,429 tags hold 114
names twice, e.g. "smile" the noun and the verb): built with ``unique_names=False`` (saved as
``"unique_names": false``), such a vocabulary keeps upstream's names, and a name that stands for
several tags is refused where a name must pick one (``index``, ``subset`` by name; select by index).

In memory the embeddings are held once as a C-contiguous float32 (T, D, E) array, with the (T, D) bool
mask beside it: exactly what the decoder graph takes, so a backend can bind them once per vocabulary
instead of converting them on every call. Both arrays are read-only.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .openset import template_sentences
from .tags import DEFAULT_THRESHOLD, OPEN_SET_THRESHOLD

VOCABULARY_FORMAT_VERSION = 1
VOCABULARY_JSON = "vocabulary.json"
EMBEDDINGS_NPY = "embeddings.npy"
STORED_DTYPES = ("float16", "float32")
#: ``dtype="auto"`` (the default, for ``Vocabulary.save`` and ``ram-export`` alike) stores embeddings
#: float32 (exact) up to this size and float16 above it: a 4,585-tag RAM table (9 MB) or a few thousand
#: open-set tags stay exact, RAM++'s official 478 MB table is halved (the float16 rounding moves golden
#: logits by ~7e-5, see docs/precision.md).
VOCAB_FLOAT32_MAX_BYTES = 64 * 2**20
_FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Model kinds a vocabulary can be built for: RAM++ keeps every description, RAM averages them.
OPEN_SET_KINDS = ("ram_plus", "ram")
#: Why Tag2Text has no open-set vocabularies (``Vocabulary.from_names`` and ``ram-vocab build`` say it).
TAG2TEXT_OPEN_SET_MESSAGE = (
    "Tag2Text scores only its learned 3,429-tag label table (each tag also has its own classifier row, which "
    "no text encoder can produce): it has no open-set vocabularies; use a subset of its own vocabulary instead "
    "(Vocabulary.subset)"
)
#: Per-tag array names: identifiers (they become graph input names and file names), not the embeddings'.
_PER_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED_PER_TAG = frozenset({"embeddings", "vocabulary", "label_embed", "label_mask"})

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
    bundle's default). ``names_zh`` are Chinese display names. ``per_tag`` maps names to (T, ...) float
    arrays the decoder takes for each tag (Tag2Text's ``label_fc_weight`` / ``label_fc_bias``).
    ``unique_names=False`` admits names shared by several tags (a learned table's classes, see the module
    docstring). Invalid input raises ``ValueError``.
    """

    def __init__(
        self,
        names: Sequence[str],
        embeddings: Union[np.ndarray, Sequence[np.ndarray]],
        thresholds: Optional[Sequence[float]] = None,
        names_zh: Optional[Sequence[str]] = None,
        *,
        num_descriptions: Optional[Sequence[int]] = None,
        info: Optional[Mapping[str, Any]] = None,
        per_tag: Optional[Mapping[str, Any]] = None,
        unique_names: bool = True,
        _owned: bool = False,
    ):
        self._unique_names = bool(unique_names)
        self._names: List[str] = _check_names(names, "names", unique=self._unique_names)
        self._info: Dict[str, Any] = dict(info or {})
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

        # _owned: a float32 C-contiguous array nobody else holds (Vocabulary.load's): no second copy.
        padded, counts = _pad_embeddings(embeddings, num_tags, num_descriptions, copy=not _owned)
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
        self._per_tag: Dict[str, np.ndarray] = _check_per_tag(per_tag or {}, self._names)

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
    def unique_names(self) -> bool:
        """False for a learned table whose names may repeat (see the module docstring)."""
        return self._unique_names

    @property
    def per_tag(self) -> Dict[str, np.ndarray]:
        """Per-tag arrays by name, each (T, ...) float32, C-contiguous, read-only (empty for RAM / RAM++)."""
        return dict(self._per_tag)

    @property
    def info(self) -> Dict[str, Any]:
        """How the vocabulary was built (recipe, text encoder, parts), as saved in vocabulary.json."""
        return dict(self._info)

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
            f"names_zh={'yes' if self._names_zh is not None else 'no'}"
            + (f", per_tag={sorted(self._per_tag)}" if self._per_tag else "") + ")"
        )

    def display_names(self, lang: str = "en") -> List[str]:
        """Names in ``lang`` ("en" or "zh"); "zh" needs ``names_zh``."""
        if lang == "en":
            return list(self._names)
        if lang == "zh":
            if self._names_zh is None:
                raise ValueError("this vocabulary has no Chinese names (names_zh); ask for English names instead")
            return list(self._names_zh)
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")

    def threshold_array(self, default: float) -> np.ndarray:
        """(T,) float32: the per-tag thresholds, or ``default`` for every tag when there are none."""
        if self._thresholds is not None:
            return self._thresholds
        return np.full(self.num_tags, default, dtype=np.float32)

    def index(self, name: str) -> int:
        """The position of the tag called ``name``; a name several tags share is refused (KeyError)."""
        try:
            i = self._name_to_index()[name]
        except KeyError:
            raise KeyError(f"tag {name!r} is not in this vocabulary") from None
        if i < 0:
            where = [j for j, n in enumerate(self._names) if n == name]
            raise KeyError(f"tag name {name!r} stands for {len(where)} tags of this vocabulary (positions "
                           f"{', '.join(map(str, where))}); select them by index")
        return i

    def _name_to_index(self) -> Dict[str, int]:
        """name -> position, or -1 for a name several tags share."""
        cache = getattr(self, "_index_cache", None)
        if cache is None:
            cache = {}
            for i, n in enumerate(self._names):
                cache[n] = -1 if n in cache else i
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
            info={**self._info, "subset_of": self._info.get("recipe", "vocabulary"), "recipe": "subset"},
            per_tag={name: array[idx] for name, array in self._per_tag.items()},
            unique_names=self._unique_names,
        )

    @classmethod
    def concat(cls, *vocabularies: "Vocabulary", default_threshold: float = DEFAULT_THRESHOLD) -> "Vocabulary":
        """One vocabulary holding every tag of ``vocabularies``, in order: e.g. the official 4,585 tags
        and your own. Tags never attend to each other in the decoder, so every tag scores exactly as in
        its own part, whatever the parts' description counts (padding is masked).

        Where one part has per-tag thresholds and another has none, the latter's tags get
        ``default_threshold`` (upstream's 0.68, what the Tagger would have used for them); where one part
        has Chinese names and another has none, the latter's English names stand in. Duplicate names
        across parts are refused (names identify tags in the output), and so are parts with different
        per-tag arrays: a tag without its classifier row has no score, and nothing could stand in for it.
        """
        if len(vocabularies) == 1 and isinstance(vocabularies[0], (list, tuple)):
            vocabularies = tuple(vocabularies[0])
        if not vocabularies or not all(isinstance(v, Vocabulary) for v in vocabularies):
            raise TypeError("Vocabulary.concat: pass one or more Vocabulary objects")
        widths = sorted({v.embed_dim for v in vocabularies})
        if len(widths) > 1:
            raise ValueError(f"Vocabulary.concat: embeddings of different widths {widths}; they come from "
                             "different text encoders")
        _check_same_per_tag(vocabularies)
        names = [n for v in vocabularies for n in v._names]
        # Parts of learned tables whose names repeat (all built with unique_names=False) may share names.
        unique = any(v._unique_names for v in vocabularies)
        if unique:
            _refuse_duplicates(names, "Vocabulary.concat")
        depth = max(v.max_descriptions for v in vocabularies)
        embeddings = np.zeros((len(names), depth, widths[0]), dtype=np.float32)
        row = 0
        for v in vocabularies:
            embeddings[row : row + v.num_tags, : v.max_descriptions] = v._embeddings
            row += v.num_tags
        thresholds = None
        if any(v._thresholds is not None for v in vocabularies):
            thresholds = np.concatenate([v.threshold_array(default_threshold) for v in vocabularies])
        names_zh = None
        if any(v._names_zh is not None for v in vocabularies):
            names_zh = [n for v in vocabularies for n in (v._names_zh if v._names_zh is not None else v._names)]
        return cls(
            names, embeddings, thresholds=thresholds, names_zh=names_zh,
            num_descriptions=np.concatenate([v._num_descriptions for v in vocabularies]),
            info={"recipe": "concat", "parts": [{"num_tags": v.num_tags, **v._info} for v in vocabularies]},
            per_tag={name: np.concatenate([v._per_tag[name] for v in vocabularies])
                     for name in vocabularies[0]._per_tag},
            unique_names=unique,
        )

    # ----------------------------------------------------------------------------------------------
    # Open-set vocabularies from words

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        text_encoder: Any,
        *,
        kind: Optional[str] = None,
        thresholds: Any = None,
        names_zh: Any = None,
        progress: bool = False,
    ) -> "Vocabulary":
        """A vocabulary of ``names`` by upstream's open-set recipe: each name fills RAM's 63 prompt
        templates (:mod:`ram_edge.openset`) and every sentence is embedded and L2-normalised. For RAM
        (``kind="ram"``) a tag's embedding is their mean, normalised again (one row per tag); for RAM++
        the 63 sentences are the tag's descriptions, so the model's own per-image reweighting picks among
        them. ``kind`` defaults to the text encoder's bundle (``text_encoder.model_kind``).

        ``thresholds``: None (upstream's open-set 0.5 for every tag, decided with ``>``), one float, one
        per tag, a mapping name -> threshold, or a CSV/JSON file (see :func:`read_tag_table`), which may
        also give Chinese names; ``names_zh``: a sequence or a mapping name -> Chinese name.
        """
        names = clean_tag_names(names)
        sentences = [template_sentences(name) for name in names]
        return cls._from_sentences(names, sentences, text_encoder, kind=kind, thresholds=thresholds, names_zh=names_zh,
                                   progress=progress, recipe="names")

    @classmethod
    def from_descriptions(
        cls,
        descriptions: Any,
        text_encoder: Any,
        *,
        kind: Optional[str] = None,
        thresholds: Any = None,
        names_zh: Any = None,
        progress: bool = False,
    ) -> "Vocabulary":
        """A vocabulary from LLM-written descriptions, RAM++'s recipe: ``descriptions`` is the file format
        users have (``[{"tag": ["description", ...]}, ...]``, a JSON path or the parsed list) or a mapping
        tag -> descriptions. Any number of descriptions per tag; each is embedded (truncated at 77 tokens,
        as upstream) and L2-normalised, one row per description. For RAM a tag's rows are averaged and
        normalised again. ``thresholds`` / ``names_zh`` as in :meth:`from_names`.
        """
        items = read_descriptions(descriptions)
        names = clean_tag_names([name for name, _ in items])
        return cls._from_sentences(names, [texts for _, texts in items], text_encoder, kind=kind, thresholds=thresholds,
                                   names_zh=names_zh, progress=progress, recipe="descriptions")

    @classmethod
    def _from_sentences(cls, names: List[str], sentences: List[List[str]], text_encoder: Any, *, kind: Optional[str],
                        thresholds: Any, names_zh: Any, progress: bool, recipe: str) -> "Vocabulary":
        kind = kind if kind is not None else getattr(text_encoder, "model_kind", None)
        if kind not in OPEN_SET_KINDS:
            if kind == "tag2text":
                raise ValueError(TAG2TEXT_OPEN_SET_MESSAGE)
            raise ValueError(f"kind must be one of {OPEN_SET_KINDS} (the model the vocabulary is for), got {kind!r}")
        flat = [text for group in sentences for text in group]
        embeds = np.asarray(text_encoder.encode(flat, progress=progress), dtype=np.float32)
        if embeds.ndim != 2 or embeds.shape[0] != len(flat):
            raise ValueError(f"text encoder returned {embeds.shape} for {len(flat)} texts, expected (N, E)")
        embeds = _l2_normalize(embeds)
        rows, start = [], 0
        for group in sentences:
            block = embeds[start : start + len(group)]
            start += len(group)
            rows.append(_l2_normalize(block.mean(axis=0, keepdims=True)) if kind == "ram" else block)
        table = resolve_tag_table(names, thresholds, names_zh)
        info = {"recipe": recipe, "kind": kind, "text_encoder": getattr(text_encoder, "source", None),
                "texts_per_tag": sorted({len(group) for group in sentences})}
        return cls(names, rows, thresholds=table["thresholds"], names_zh=table["names_zh"], info=info)

    # ----------------------------------------------------------------------------------------------
    # Files

    def storage_dtype(self, dtype: str = "auto") -> str:
        """The dtype :meth:`save` writes for ``dtype``: "auto" is float32 up to VOCAB_FLOAT32_MAX_BYTES of
        embeddings and per-tag arrays (exact), float16 above (half the size)."""
        if dtype == "auto":
            total = self._embeddings.nbytes + sum(a.nbytes for a in self._per_tag.values())
            return "float32" if total <= VOCAB_FLOAT32_MAX_BYTES else "float16"
        if dtype not in STORED_DTYPES:
            raise ValueError(f"Vocabulary.save: dtype must be 'auto' or one of {STORED_DTYPES}, got {dtype!r}")
        return dtype

    def save(self, directory: PathLike, dtype: str = "auto") -> Path:
        """Write ``vocabulary.json`` and ``embeddings.npy`` into ``directory`` (created). ``dtype``:
        "auto" (default, see :meth:`storage_dtype`), "float32" (exact) or "float16" (half the file)."""
        dtype = self.storage_dtype(dtype)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {EMBEDDINGS_NPY: self._embeddings, **{f"{n}.npy": a for n, a in self._per_tag.items()}}
        for file, array in arrays.items():
            peak = float(np.abs(array).max()) if array.size else 0.0
            if dtype == "float16" and peak > _FLOAT16_MAX:
                what = "an embedding component" if file == EMBEDDINGS_NPY else f"a component of {file[:-4]}"
                raise ValueError(
                    f"Vocabulary.save: {what} is {peak:g}, beyond float16's range "
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
        if not self._unique_names:
            meta["unique_names"] = False
        if self._per_tag:
            meta["per_tag"] = {name: {"shape": list(array.shape[1:]), "dtype": dtype}
                               for name, array in self._per_tag.items()}
        if self._info:
            meta["info"] = self._info
        # Temporary names then rename (vocabulary.json last), so an interrupted save never leaves a
        # half-written file under the real name.
        json_tmp = directory / (VOCABULARY_JSON + ".tmp")
        for file, array in arrays.items():
            with open(directory / (file + ".tmp"), "wb") as f:
                np.save(f, array.astype(dtype, copy=False), allow_pickle=False)
        with open(json_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=None, separators=(",", ":"))
            f.write("\n")
        for file in arrays:
            os.replace(directory / (file + ".tmp"), directory / file)
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
            embeddings = read_npy_float32(npy_path)
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
        per_tag = _load_per_tag(directory, meta.get("per_tag"), len(names))
        try:
            return cls(
                names,
                embeddings,
                thresholds=meta.get("thresholds"),
                names_zh=meta.get("names_zh"),
                num_descriptions=counts,
                info=meta.get("info") if isinstance(meta.get("info"), dict) else None,
                per_tag=per_tag,
                unique_names=meta.get("unique_names", True) is not False,
                _owned=True,
            )
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from e


# --------------------------------------------------------------------------------------------------
# Validation helpers


def _check_per_tag(per_tag: Mapping[str, Any], names: List[str]) -> Dict[str, np.ndarray]:
    """Per-tag arrays as read-only C-contiguous float32 copies, each (T, ...) for the T ``names``."""
    if not isinstance(per_tag, Mapping):
        raise ValueError(f"Vocabulary: per_tag must map names to arrays, got {type(per_tag).__name__}")
    checked: Dict[str, np.ndarray] = {}
    for name, values in per_tag.items():
        if not isinstance(name, str) or not _PER_TAG_NAME.fullmatch(name) or name in _RESERVED_PER_TAG:
            raise ValueError(f"Vocabulary: per-tag array name {name!r} must be an identifier (letters, digits, "
                             f"underscores), not one of {sorted(_RESERVED_PER_TAG)}")
        array = np.asarray(values)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"Vocabulary: per-tag array {name!r} must hold numbers, got dtype {array.dtype}")
        if array.ndim < 1 or array.shape[0] != len(names):
            raise ValueError(f"Vocabulary: per-tag array {name!r} has shape {array.shape}; its first axis must "
                             f"be the {len(names)} tags")
        array = np.array(array, dtype=np.float32, order="C", copy=True)
        if not np.isfinite(array).all():
            bad = np.flatnonzero(~np.isfinite(array.reshape(len(names), -1)).all(axis=1))
            raise ValueError(f"Vocabulary: per-tag array {name!r} holds NaN or inf ({bad.size} tags, e.g. "
                             f"{names[int(bad[0])]!r})")
        checked[name] = _readonly(array)
    return checked


def _check_same_per_tag(vocabularies: Sequence["Vocabulary"]) -> None:
    """Every part of a concatenation carries the same per-tag arrays (names and trailing shapes)."""
    def layout(v: "Vocabulary") -> Dict[str, Tuple[int, ...]]:
        return {name: array.shape[1:] for name, array in v._per_tag.items()}

    first = layout(vocabularies[0])
    for i, v in enumerate(vocabularies[1:], start=1):
        other = layout(v)
        if other != first:
            def describe(arrays):
                return ", ".join(f"{n} {(-1,) + s}" for n, s in arrays.items()) or "none"

            raise ValueError(
                f"Vocabulary.concat: part 0 has per-tag arrays {describe(first)} and part {i} has {describe(other)}; "
                "every part must carry the same ones (Tag2Text's classifier rows come only from its checkpoint: "
                "concatenate subsets of one Tag2Text vocabulary, not other vocabularies)"
            )


def _load_per_tag(directory: Path, listed: Any, num_tags: int) -> Dict[str, np.ndarray]:
    """The per-tag arrays ``vocabulary.json`` lists (``"per_tag"``, optional), checked against their files."""
    if listed is None:
        return {}
    json_path = directory / VOCABULARY_JSON
    if not isinstance(listed, dict):
        raise ValueError(f"{json_path}: 'per_tag' must be an object name -> {{\"shape\": [...], \"dtype\": ...}}")
    arrays = {}
    for name, spec in listed.items():
        if not isinstance(name, str) or not _PER_TAG_NAME.fullmatch(name) or name in _RESERVED_PER_TAG:
            raise ValueError(f"{json_path}: per-tag array name {name!r} is not an identifier")
        path = directory / f"{name}.npy"
        if not path.is_file():
            raise ValueError(f"{directory}: {json_path.name} lists the per-tag array {name!r} but {path.name} is missing")
        try:
            array = read_npy_float32(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from e
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or tuple(array.shape) != (num_tags, *shape):
            raise ValueError(f"{path}: shape {tuple(array.shape)}, but {json_path.name} describes "
                             f"(num_tags, *shape) = {(num_tags, *(shape or []))}")
        arrays[name] = array
    return arrays


def _check_names(names: Sequence[str], field: str, unique: bool = True) -> List[str]:
    if isinstance(names, str):
        raise ValueError(f"Vocabulary: {field} must be a sequence of strings, not one string")
    result = list(names)
    if not result:
        raise ValueError("Vocabulary: needs at least one tag")
    for i, n in enumerate(result):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"Vocabulary: {field}[{i}] is {n!r}; tag names are non-empty strings")
    if unique:
        _refuse_duplicates(result, "Vocabulary")
    return result


def _refuse_duplicates(names: Sequence[str], who: str) -> None:
    counts = Counter(names)
    duplicates = [n for n, c in counts.items() if c > 1]
    if duplicates:
        shown = ", ".join(
            f"{n!r} (positions {', '.join(str(i) for i, m in enumerate(names) if m == n)})" for n in duplicates[:10]
        )
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise ValueError(
            f"{who}: duplicate tag names {shown}{more}; names identify tags in the output, so they must be unique"
        )


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float32 like the reference's ``x / x.norm(dim=-1)``."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("a text embedding has zero norm; the text encoder output is broken")
    return (x / norms).astype(np.float32, copy=False)


def clean_tag_names(names: Sequence[str]) -> List[str]:
    """Names for an open-set vocabulary: surrounding whitespace stripped; empty or whitespace-only names
    and duplicates (after stripping) refused, each named with its position."""
    if isinstance(names, str):
        raise ValueError("tag names must be a list of strings, not one string (split 'a,b,c' first)")
    result = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"tag name {i} is {name!r}, not a string")
        if not name.strip():
            raise ValueError(f"tag name {i} is empty or only whitespace ({name!r})")
        result.append(name.strip())
    if not result:
        raise ValueError("no tag names given")
    _refuse_duplicates(result, "tag names")
    return result


def read_descriptions(descriptions: Any) -> List[Tuple[str, List[str]]]:
    """(tag, descriptions) pairs from RAM++'s description format, a JSON file of it, or a mapping.

    The format is ``[{"tag": ["description", ...]}, ...]`` (upstream's ``openimages_rare_200_llm_tag_
    descriptions.json``); every entry must be a one-key object whose value is a non-empty list of
    non-empty strings. Each problem is reported with the entry's position and tag.
    """
    where = "descriptions"
    if isinstance(descriptions, (str, os.PathLike)):
        where = str(descriptions)
        try:
            with open(descriptions, encoding="utf-8") as f:
                descriptions = json.load(f)
        except OSError as e:
            raise ValueError(f"{where}: cannot read ({e.strerror or e})") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
    if isinstance(descriptions, Mapping):
        entries = [{k: v} for k, v in descriptions.items()]
    elif isinstance(descriptions, list):
        entries = descriptions
    else:
        raise ValueError(f'{where}: expected a list like [{{"tag": ["description", ...]}}, ...], '
                         f"got {type(descriptions).__name__}")
    if not entries:
        raise ValueError(f"{where}: no tags")
    items: List[Tuple[str, List[str]]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise ValueError(f'{where}: entry {i} must be an object with one tag, like {{"otter": ["an otter '
                             f'swimming", ...]}}; got {json.dumps(entry, ensure_ascii=False)[:80]}')
        (name, texts), = entry.items()
        if not isinstance(texts, list):
            raise ValueError(f"{where}: entry {i} ({name!r}): descriptions must be a list of strings, "
                             f"got {type(texts).__name__}")
        if not texts:
            raise ValueError(f"{where}: entry {i} ({name!r}) has no descriptions")
        for j, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: entry {i} ({name!r}), description {j} is {text!r}; descriptions "
                                 "are non-empty strings")
        items.append((name, list(texts)))
    return items


def read_tag_table(path: PathLike) -> Dict[str, Dict[str, Any]]:
    """Per-tag thresholds and Chinese names from a file: name -> {"threshold": float, "name_zh": str}.

    * CSV with a header naming a ``name`` (or ``tag``) column and any of ``threshold``, ``name_zh``
      (or ``zh``);
    * JSON: ``{"otter": 0.6, ...}``, ``{"otter": {"threshold": 0.6, "name_zh": "水獭"}, ...}`` or a list
      of objects with a ``name`` key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    rows: List[Mapping[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, Mapping):
            rows = [{"name": k, **(v if isinstance(v, Mapping) else {"threshold": v})} for k, v in data.items()]
        elif isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
            rows = data
        else:
            raise ValueError(f'{path}: expected {{"tag": threshold, ...}} or a list of {{"name": ..., "threshold": ...}}')
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if not ({"name", "tag"} & set(header)):
            raise ValueError(f"{path}: the CSV header must name a 'name' (or 'tag') column; it has {header}")
        rows = [{(k or "").strip().lower(): v for k, v in row.items()} for row in reader]
    table: Dict[str, Dict[str, Any]] = {}
    for i, row in enumerate(rows):
        name = row.get("name", row.get("tag"))
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: row {i + 1} has no tag name")
        entry: Dict[str, Any] = {}
        threshold = row.get("threshold")
        if threshold not in (None, ""):
            try:
                entry["threshold"] = float(threshold)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i + 1} ({name!r}): threshold {threshold!r} is not a number") from None
            if not 0.0 <= entry["threshold"] <= 1.0:
                raise ValueError(f"{path}: row {i + 1} ({name!r}): threshold {threshold} is not in [0, 1]")
        zh = row.get("name_zh", row.get("zh"))
        if zh not in (None, ""):
            entry["name_zh"] = str(zh)
        if name.strip() in table:
            raise ValueError(f"{path}: tag {name.strip()!r} is listed twice")
        table[name.strip()] = entry
    return table


def resolve_tag_table(names: Sequence[str], thresholds: Any = None, names_zh: Any = None) -> Dict[str, Any]:
    """Thresholds and Chinese names for an open-set vocabulary of ``names`` from what the user gave
    (see :meth:`Vocabulary.from_names`). Names the user listed that are not in the vocabulary are
    refused, so a typo does not silently keep the default."""
    table: Dict[str, Dict[str, Any]] = {}
    if isinstance(thresholds, (str, os.PathLike)):
        table = read_tag_table(thresholds)
        thresholds = None
    index = {n: i for i, n in enumerate(names)}

    def per_tag(values: Any, what: str, default: Any) -> List[Any]:
        if isinstance(values, Mapping):
            unknown = [k for k in values if k not in index]
            if unknown:
                raise ValueError(f"{what} given for tags not in the vocabulary: {', '.join(map(repr, unknown[:10]))}")
            return [values.get(n, default) for n in names]
        values = list(values)
        if len(values) != len(names):
            raise ValueError(f"{len(values)} {what} for {len(names)} tags")
        return values

    if table:
        unknown = [k for k in table if k not in index]
        if unknown:
            raise ValueError(f"thresholds file lists tags not in the vocabulary: {', '.join(map(repr, unknown[:10]))}")
    if thresholds is None:
        resolved = [table.get(n, {}).get("threshold", OPEN_SET_THRESHOLD) for n in names]
    elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        resolved = [float(thresholds)] * len(names)
    else:
        resolved = per_tag(thresholds, "thresholds", OPEN_SET_THRESHOLD)
    zh = None
    if names_zh is not None:
        zh = per_tag(names_zh, "Chinese names", None)
        zh = [z if z is not None else n for z, n in zip(zh, names)]
    elif any("name_zh" in e for e in table.values()):
        zh = [table.get(n, {}).get("name_zh", n) for n in names]
    return {"thresholds": resolved, "names_zh": zh}


def read_npy_float32(path: PathLike, block_bytes: int = 1 << 24) -> np.ndarray:
    """A float16 / float32 ``.npy`` file as a C-contiguous float32 array, read in blocks of about
    ``block_bytes``: memory peaks at the float32 array plus one block, not at both whole arrays (RAM++'s
    float16 table is 239 MB on disk, 478 MB as float32)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype not in (np.dtype("<f2"), np.dtype("<f4")) or fortran:
            raise ValueError(f"dtype {dtype}{' (Fortran order)' if fortran else ''}, expected C-order "
                             f"little-endian one of {STORED_DTYPES}")
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(-1)
        step = max(1, block_bytes // dtype.itemsize)
        block = np.empty(min(step, flat.size), dtype=dtype)
        for start in range(0, flat.size, step):
            part = block[: min(step, flat.size - start)]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise ValueError(f"the file ends after {start} of {flat.size} values (truncated)")
            flat[start : start + part.size] = part
        return out


def _pad_embeddings(embeddings, num_tags: int, num_descriptions: Optional[Sequence[int]], copy: bool = True):
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
        padded = np.array(array, dtype=np.float32, order="C", copy=True if copy else None)
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
