"""What the service scores an image against, and the vocabularies it keeps.

A *target* is what one image of a request is scored against; the batcher groups a batch's images by
target (by identity: requests naming the same stored vocabulary, or the same tags, share one object and so
one decoder call), after one encoder call for the whole batch:

* :class:`TagTarget` — tags scored by the decoder: the service's default vocabulary (the bundle's own, or
  ``--vocab``), an open-set vocabulary, or the default followed by open-set tags (``merge_default``);
* :class:`ClassTarget` — CLIP zero-shot classification over a list of classes (encoder only);
* :class:`CaptionTarget` — a TagTarget's tags plus a caption per image (bundles with captioning graphs).

A merged target never copies the default vocabulary: the default part is decoded with the embeddings the
decoder already holds (``Tagger.decode(embeds)``) and the open-set part with its own
(``Tagger.decode(embeds, vocabulary=own)``), and the two logit blocks are joined. Tags never attend to
each other in the decoder, so this equals decoding ``Vocabulary.concat(default, own)`` (docs/openset.md)
while a stored vocabulary costs only its own tags' memory, not another copy of RAM++'s 478 MB table, and
the default's embeddings stay resident on the device.

:class:`VocabularyStore` keeps the vocabularies built with ``POST /v1/vocabularies`` (in memory, at most
``capacity``; the next one is refused until one is deleted). :class:`TargetCache` keeps the targets built
from the words of single requests (``tags``, ``classify``), least recently used dropped first.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence, Union

import numpy as np

from ram_edge.runtime.tagger import ClassResult, TagResult, Tagger, select_tags, sigmoid
from ram_edge.vocabulary import Vocabulary

#: Client-chosen vocabulary ids: a letter or digit, then letters, digits, ``.``, ``_`` or ``-``.
VOCABULARY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


@dataclass(eq=False)
class TagTarget:
    """Tags scored by the decoder, as one list: the service's default vocabulary first when
    ``include_default``, then the tags of ``own`` (fed to the decoder with each call).

    names:      display names per language ("en", and "zh" where there are Chinese names).
    thresholds: (T,) float32, the per-tag thresholds used when a request gives none.
    excluded:   positions never output, whatever the threshold (Tag2Text's deleted tags, as ``Tagger.select``).
    """

    own: Optional[Vocabulary]
    include_default: bool
    names: Dict[str, List[str]]
    thresholds: np.ndarray
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def languages(self) -> List[str]:
        return sorted(self.names)

    @property
    def num_tags(self) -> int:
        return len(self.names["en"])

    def scores(self, tagger: Tagger, image_embeds: np.ndarray) -> np.ndarray:
        """(B, 1+N, E) image embeddings -> (B, T) probabilities: one decoder call per part."""
        parts = []
        if self.include_default:
            parts.append(tagger.decode(image_embeds))
        if self.own is not None:
            parts.append(tagger.decode(image_embeds, vocabulary=self.own))
        return sigmoid(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))

    def result(self, scores: np.ndarray, threshold: Optional[float], top_k: Optional[int], lang: str) -> TagResult:
        """One image's (1, T) probabilities -> its tags, as ``Tagger.select`` (the request's threshold
        and top_k were validated by the HTTP layer)."""
        thresholds = self.thresholds if threshold is None else np.full(self.num_tags, threshold, dtype=np.float32)
        if self.excluded.size:
            thresholds = np.array(thresholds, dtype=np.float32)
            thresholds[self.excluded] = np.inf
        return select_tags(scores, thresholds, self.names[lang], top_k)[0]


@dataclass(eq=False)
class ClassTarget:
    """Zero-shot classification over ``classes`` (one unit text embedding per class, from
    ``Tagger.class_embeddings``): ``Tagger.classify_embeds`` on the encoder's global token."""

    classes: Vocabulary

    #: Class names are the request's own: every language shows them as given.
    languages = ("en", "zh")

    def scores(self, tagger: Tagger, image_embeds: np.ndarray) -> List[ClassResult]:
        return tagger.classify_embeds(image_embeds, self.classes)

    def result(self, scores: Sequence[ClassResult], threshold: Optional[float], top_k: Optional[int],
               lang: str) -> ClassResult:
        found = scores[0]
        if top_k is None or top_k >= len(found.labels):
            return found
        return ClassResult(found.labels[:top_k], found.probabilities[:top_k], found.indices[:top_k])


@dataclass(frozen=True)
class CaptionedTags:
    """An image's tags and the caption written for it (``CaptionResult``: text, token_ids, tags fed)."""

    tags: TagResult
    caption: Any


@dataclass(eq=False)
class CaptionTarget:
    """``base``'s tags and, per image, a caption (``Tagger.caption_embeds``: guided by the bundle's own
    predicted tags, as upstream's ``generate``; when ``base`` is the default vocabulary its probabilities
    are reused, so the tagging decoder runs once)."""

    base: TagTarget
    num_beams: Optional[int] = None

    @property
    def languages(self) -> List[str]:
        return self.base.languages

    def scores(self, tagger: Tagger, image_embeds: np.ndarray) -> List[Any]:

        probabilities = self.base.scores(tagger, image_embeds)
        default_only = self.base.include_default and self.base.own is None
        settings = None
        if self.num_beams is not None:
            settings = tagger.captioner.settings(num_beams=self.num_beams)
        captions = tagger.caption_embeds(image_embeds, probabilities=probabilities if default_only else None,
                                         settings=settings)
        return list(zip(probabilities, captions))

    def result(self, scores: Sequence[Any], threshold: Optional[float], top_k: Optional[int], lang: str) -> CaptionedTags:
        row, caption = scores[0]
        return CaptionedTags(self.base.result(row[None], threshold, top_k, lang), caption)


Target = Union[TagTarget, ClassTarget, CaptionTarget]


def default_target(tagger: Tagger) -> TagTarget:
    """The service's default vocabulary (the Tagger's current one), scored as ``Tagger.tag`` does."""
    vocabulary = tagger.vocabulary
    names = {"en": vocabulary.display_names("en")}
    if vocabulary.names_zh is not None:
        names["zh"] = vocabulary.display_names("zh")
    return TagTarget(None, True, names, vocabulary.threshold_array(tagger.default_threshold),
                     tagger.excluded_indices(vocabulary))


def open_set_target(tagger: Tagger, own: Vocabulary, include_default: bool = False) -> TagTarget:
    """Open-set tags ``own``, after the default vocabulary's tags when ``include_default``.

    Thresholds: each part's own (the default threshold for a part without), as ``Vocabulary.concat(default,
    own, default_threshold=tagger.default_threshold)`` would give. Chinese: always offered; each tag shows
    its Chinese name where it has one, else its own name (open-set tags are usually named in one
    language). Tags already in the default vocabulary are refused when merging (ValueError): names
    identify tags in the answer."""
    default = tagger.default_threshold
    own_zh = own.names_zh if own.names_zh is not None else own.names
    if not include_default:
        return TagTarget(own, False, {"en": own.names, "zh": own_zh}, own.threshold_array(default))
    base = tagger.vocabulary
    check_merge(base, own.names)
    base_zh = base.names_zh if base.names_zh is not None else base.names
    return TagTarget(own, True, {"en": base.names + own.names, "zh": base_zh + own_zh},
                     np.concatenate([base.threshold_array(default), own.threshold_array(default)]),
                     tagger.excluded_indices(base))


def check_merge(default: Vocabulary, names: Sequence[str]) -> None:
    """ValueError when open-set ``names`` repeat tags of the default vocabulary they would follow."""
    taken = set(default.names)
    clash = [name for name in names if name in taken]
    if clash:
        more = f" and {len(clash) - 10} more" if len(clash) > 10 else ""
        raise ValueError(f"tags already in the default vocabulary: {', '.join(map(repr, clash[:10]))}{more}; leave "
                         "them out, or build without merge_default")


# ----------------------------------------------------------------------------------------------------
# Stored vocabularies (POST /v1/vocabularies)


@dataclass(eq=False)
class StoredVocabulary:
    """A vocabulary built by ``POST /v1/vocabularies`` and how it was built."""

    id: str
    target: TagTarget
    recipe: str  # "names" or "descriptions"
    merge_default: bool
    num_texts: int
    build_seconds: float
    created: float = field(default_factory=time.time)

    @property
    def own(self) -> Vocabulary:
        assert self.target.own is not None
        return self.target.own

    def summary(self) -> Dict[str, Any]:
        """What ``GET /v1/vocabularies`` lists."""
        return {
            "id": self.id,
            "num_tags": self.target.num_tags,
            "num_own_tags": self.own.num_tags,
            "merge_default": self.merge_default,
            "recipe": self.recipe,
            "texts": self.num_texts,
            "embedding_bytes": int(self.own.embeddings.nbytes),
            "build_seconds": round(self.build_seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
        }

    def detail(self) -> Dict[str, Any]:
        """``GET /v1/vocabularies/{id}``: the summary and the vocabulary's own tags (the default
        vocabulary's are described by ``GET /v1/model``)."""
        own = self.own
        thresholds = own.thresholds
        return {
            **self.summary(),
            "tags": own.names,
            "names_zh": own.names_zh,
            "thresholds": None if thresholds is None else [round(float(t), 6) for t in thresholds],
            "descriptions_per_tag": [int(n) for n in own.num_descriptions],
        }


class VocabularyStore:
    """Vocabularies by id, in memory, at most ``capacity`` (a full store refuses new ones rather than
    dropping one that a client may still use). Used from the event loop only: no lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: Dict[str, StoredVocabulary] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, vocabulary_id: str) -> bool:
        return vocabulary_id in self._items

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def new_id(self) -> str:
        while True:
            candidate = f"vocab-{secrets.token_hex(4)}"
            if candidate not in self._items:
                return candidate

    def add(self, entry: StoredVocabulary) -> None:
        """Keep ``entry``; the caller has checked that its id is free and the store is not full."""
        assert entry.id not in self._items and not self.full
        self._items[entry.id] = entry

    def get(self, vocabulary_id: str) -> Optional[StoredVocabulary]:
        return self._items.get(vocabulary_id)

    def delete(self, vocabulary_id: str) -> bool:
        return self._items.pop(vocabulary_id, None) is not None

    def entries(self) -> List[StoredVocabulary]:
        return list(self._items.values())


class TargetCache:
    """Targets built from the words of a request (``tags=...``, ``classify=...``), by key, at most
    ``size``; the least recently used is dropped first. Thread-safe: looked up on the event loop, filled
    on the text-encoding thread."""

    def __init__(self, size: int):
        self.size = size
        self._items: "OrderedDict[Hashable, Target]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Target]:
        with self._lock:
            target = self._items.get(key)
            if target is not None:
                self._items.move_to_end(key)
            return target

    def put(self, key: Hashable, target: Target) -> Target:
        with self._lock:
            self._items[key] = target
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return target
