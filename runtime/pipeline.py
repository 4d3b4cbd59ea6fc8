"""Tagging many files: preprocessing on threads, overlapped with inference.

While batch k runs on the backend (onnxruntime releases the GIL), a thread pool decodes and resizes
batches k+1 ... k+prefetch (Pillow's decoders release it too). Results come back batch by batch, in
input order, so a caller can write them as soon as each batch is done.
"""

from __future__ import annotations

import glob
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from typing import Deque, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ram_edge.vocabulary import Vocabulary

from .caption import CaptionRequest, CaptionResult
from .preprocess import ImageError, is_image_path
from .tagger import ClassResult, TagResult, Tagger, sigmoid


@dataclass(frozen=True)
class FileResult:
    """One input's outcome: ``result`` when it was tagged (``classes`` when it was classified; ``caption``
    when captioned too), else ``error`` says why not."""

    path: str
    result: Optional[TagResult] = None
    error: Optional[str] = None
    classes: Optional[ClassResult] = None
    caption: Optional[CaptionResult] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def find_images(inputs: Sequence[str]) -> Tuple[List[str], List[FileResult]]:
    """Expand files, folders (recursive, image extensions only, sorted) and glob patterns.

    Returns (paths, failures): inputs that exist as nothing and match nothing become failures, so they
    are reported like any unreadable file. Files named explicitly are kept whatever their extension.
    Duplicates are dropped, first occurrence wins.
    """
    paths: List[str] = []
    failures: List[FileResult] = []
    seen = set()

    def add(p: str) -> None:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if is_image_path(name):
                        add(os.path.join(root, name))
        elif os.path.lexists(item):
            add(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            for m in matches:
                if os.path.isdir(m):
                    continue
                add(m)
            if not matches:
                failures.append(FileResult(item, error="no file matches this pattern"))
        else:
            failures.append(FileResult(item, error="no such file or directory"))
    return paths, failures


def _chunks(items: Iterable[str], size: int) -> Iterator[List[str]]:
    it = iter(items)
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def tag_files(
    tagger: Tagger,
    paths: Iterable[str],
    batch_size: int = 16,
    threshold: Optional[float] = None,
    top_k: Optional[int] = None,
    lang: str = "en",
    workers: Optional[int] = None,
    prefetch_batches: int = 2,
    classify: Optional[Union[Sequence[str], Vocabulary]] = None,
    caption: Optional[CaptionRequest] = None,
) -> Iterator[List[FileResult]]:
    """Yield one list of :class:`FileResult` per batch, in input order.

    A file that cannot be read or decoded fails alone (its ``error`` says why); the rest of its batch is
    tagged. Each batch of good images is one encoder and one decoder call. With ``classify`` (class
    names or a Vocabulary) images are classified zero-shot instead (encoder only; ``top_k`` classes).
    With ``caption`` every image is also captioned from the same image embeddings (and, for predicted
    tags, the same probabilities).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = tagger.vocabulary.display_names(lang)  # fail on a bad lang before any work
    if classify is not None:
        tagger.class_embeddings(classify)  # embed the class names once, before any image

    def infer(pixels: np.ndarray) -> List[FileResult]:
        if caption is not None:
            return infer_with_captions(pixels)
        if classify is not None:
            return [FileResult("", classes=c) for c in tagger.classify_embeds(tagger.encode(pixels), classify, top_k)]
        return [FileResult("", result=r) for r in
                tagger.select(tagger.probabilities(pixels), threshold, top_k, names=names)]

    def infer_with_captions(pixels: np.ndarray) -> List[FileResult]:
        embeds = tagger.encode(pixels)
        if classify is not None:
            found = [FileResult("", classes=c) for c in tagger.classify_embeds(embeds, classify, top_k)]
            probabilities = None
        else:
            probabilities = sigmoid(tagger.decode(embeds))
            found = [FileResult("", result=r) for r in tagger.select(probabilities, threshold, top_k, names=names)]
        captions = tagger.caption_embeds(embeds, caption.tags, probabilities, settings=caption.settings)
        return [replace(item, caption=c) for item, c in zip(found, captions)]

    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ram-tag-decode")
    chunks = _chunks(paths, batch_size)
    pending: Deque[List[Tuple[str, Future]]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append([(p, pool.submit(tagger.preprocess, p)) for p in chunk])

    try:
        for _ in range(max(1, prefetch_batches)):
            submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()  # keep the decoders busy while this batch runs
            arrays: List[np.ndarray] = []
            outcomes: List[Optional[FileResult]] = []
            good: List[int] = []
            for path, future in batch:
                try:
                    arrays.append(future.result())
                    good.append(len(outcomes))
                    outcomes.append(None)
                except ImageError as e:
                    outcomes.append(FileResult(path, error=e.reason))
                except Exception as e:  # an unexpected failure of one file must not end the run
                    outcomes.append(FileResult(path, error=f"{type(e).__name__}: {e}"))
            if arrays:
                try:
                    results = infer(np.stack(arrays))
                except Exception as e:
                    reason = f"inference failed for this batch: {type(e).__name__}: {e}"
                    for i in good:
                        outcomes[i] = FileResult(batch[i][0], error=reason)
                else:
                    for i, result in zip(good, results):
                        outcomes[i] = replace(result, path=batch[i][0])
            yield outcomes  # type: ignore[misc]
    finally:
        for batch in pending:
            for _, future in batch:
                future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
