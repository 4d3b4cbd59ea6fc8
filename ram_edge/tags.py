"""Tag names, Chinese names and per-class thresholds shipped with the package (numpy-free, torch-free).

The official RAM / RAM++ vocabulary (4,585 tags) and Tag2Text's 3,429 tags come from recognize-anything
(Apache-2.0); the licence and notice sit beside them in ``ram_edge/data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import List, Optional, Sequence

OFFICIAL_NUM_TAGS = 4585
TAG2TEXT_NUM_TAGS = 3429
#: Upstream's decision thresholds where a vocabulary carries none of its own.
DEFAULT_THRESHOLD = 0.68
OPEN_SET_THRESHOLD = 0.5
#: Tag2Text's own thresholds where they differ from 0.68 (upstream's ``Tag2Text.class_threshold``):
#: 2701 "person", 2828 "man", 1167 "woman".
TAG2TEXT_THRESHOLD_OVERRIDES = {2701: 0.7, 2828: 0.7, 1167: 0.7}
#: Tags upstream's ``Tag2Text.generate`` removes from what it returns and from the caption's tag prompt
#: ("they may disturb captioning"): 127 "quarter", 2961 "back", 3351 "two", 3265 "three", 3338 "four",
#: 3355 "five", 3359 "one". A property of the 3,429-tag list, not of the tagging head.
TAG2TEXT_DELETE_TAG_INDEX = (127, 2961, 3351, 3265, 3338, 3355, 3359)


def _read_lines(name: str) -> List[str]:
    text = resources.files("ram_edge").joinpath("data", "tags", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class TagSet:
    """Names (and optionally Chinese names and thresholds) of a vocabulary, in class-index order."""

    names: Sequence[str]
    names_zh: Optional[Sequence[str]] = None
    thresholds: Optional[Sequence[float]] = None
    source: str = "custom"

    def __post_init__(self):
        n = len(self.names)
        for field, values in (("names_zh", self.names_zh), ("thresholds", self.thresholds)):
            if values is not None and len(values) != n:
                raise ValueError(f"TagSet: {field} has {len(values)} entries but there are {n} names")

    def __len__(self) -> int:
        return len(self.names)


def official_tags() -> TagSet:
    """The 4,585-tag vocabulary of the official RAM / RAM++ checkpoints."""
    names = _read_lines("ram_tag_list.txt")
    names_zh = _read_lines("ram_tag_list_chinese.txt")
    thresholds = [float(v) for v in _read_lines("ram_tag_list_threshold.txt")]
    return TagSet(names, names_zh, thresholds, source="official")


def tag2text_tags() -> TagSet:
    """Tag2Text's 3,429 tags with its per-class thresholds (0.68; 0.7 for "person", "man", "woman")."""
    names = _read_lines("tag2text_ori_tag_list.txt")
    thresholds = [TAG2TEXT_THRESHOLD_OVERRIDES.get(i, DEFAULT_THRESHOLD) for i in range(len(names))]
    return TagSet(names, thresholds=thresholds, source="tag2text")


def generic_tags(num_tags: int) -> TagSet:
    """Placeholder names for checkpoints whose vocabulary is not known (``tag_0`` ...)."""
    return TagSet([f"tag_{i}" for i in range(num_tags)], source="generic")


def read_tag_file(path) -> List[str]:
    """One tag name per line; blank lines ignored."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def tags_for(num_tags: int) -> TagSet:
    """The shipped vocabulary a checkpoint with ``num_tags`` classes was trained on, else generic names."""
    if num_tags == OFFICIAL_NUM_TAGS:
        return official_tags()
    if num_tags == TAG2TEXT_NUM_TAGS:
        return tag2text_tags()
    return generic_tags(num_tags)
