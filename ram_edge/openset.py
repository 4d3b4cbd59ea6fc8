"""Upstream's open-set text recipes (recognize-anything ``ram/utils/openset_utils.py``), pure Python.

RAM builds a tag's embedding from 63 prompt sentences filled with its name; RAM++ reads one sentence
per description from an LLM-written file (``[{"tag": ["description", ...]}, ...]``). The sentences here
are exactly upstream's (``golden/clip_tokens.json`` holds the 12,600 it makes for the 200 rare names,
and the tests compare): note upstream's quirks, kept on purpose because the published open-set results
used them:

* ``article`` looks at the first letter of the name *as given* (capitalised names always get "a");
* a sentence starting with "a" or "the" is prefixed with "This is " (so "an embroidered ..." too);
* the name is lower-cased, ``_`` becomes a space and ``/`` becomes " or ", a trailing "." is dropped.
"""

from __future__ import annotations

from typing import List

#: upstream's ``multiple_templates`` (63), in order.
RAM_TEMPLATES = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)


def article(name: str) -> str:
    """upstream's ``article``: "an" when the name, as given, starts with a lower-case vowel."""
    return "an" if name[:1] in "aeiou" else "a"


def processed_name(name: str, rm_dot: bool = False) -> str:
    """upstream's ``processed_name``: ``_`` -> space, ``/`` -> " or ", lower case (trailing "." dropped)."""
    result = name.replace("_", " ").replace("/", " or ").lower()
    return result.rstrip(".") if rm_dot else result


def template_sentences(name: str) -> List[str]:
    """The 63 sentences RAM's open-set recipe embeds for ``name`` (upstream's order)."""
    texts = [template.format(processed_name(name, rm_dot=True), article=article(name)) for template in RAM_TEMPLATES]
    return ["This is " + text if text.startswith("a") or text.startswith("the") else text for text in texts]
