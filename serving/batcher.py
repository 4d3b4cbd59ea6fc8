"""Dynamic batching: images of concurrent requests share one encoder call.

Request handlers (on the event loop) put one :class:`WorkItem` per image into a bounded queue and await
its future. One worker thread (the model never runs on the event loop) takes the first waiting item,
then whatever else arrives within ``max_wait_ms``, up to ``max_batch`` items, and runs:

    encode(stacked pixels)                               one call for the whole batch
    for each target among the items: decode(target, their embeddings)
    per item: select(its row of the scores, its threshold / top_k / lang)

An item's ``target`` is what it is scored against (the service's default vocabulary, a stored open-set
vocabulary, a request's own tags or classes: :mod:`ram_edge.serving.vocabularies`), so requests with
different targets still share the expensive encoder call and are decoded per target. Items whose
request has given up (timed out, cancelled) are dropped before the encoder runs.

The queue itself has no bound: the service admits at most ``max_queue`` requests of at most
``max_images_per_request`` images each (answering 503 beyond), which bounds it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

import numpy as np


logger = logging.getLogger(__name__)

#: ``decode(target, image_embeds) -> scores`` of the B images against that target: an array or a list
#: with one row per image (probabilities (B, T) for tags, B class results for a classification).
DecodeFn = Callable[[Optional[Hashable], np.ndarray], Sequence[Any]]
#: ``select(scores[row:row + 1], item) -> result``: the item's threshold, top_k and language.
SelectFn = Callable[[Sequence[Any], "WorkItem"], Any]


@dataclass
class WorkItem:
    """One image of one request. ``target``: what it is scored against (items are grouped by it, so it
    must be hashable; None is allowed). ``future`` resolves to what ``select`` returns for it."""

    pixels: np.ndarray
    threshold: Optional[float] = None
    top_k: Optional[int] = None
    lang: str = "en"
    target: Optional[Hashable] = None
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class BatchStats:
    """Handed to ``on_batch`` after every model call (for metrics)."""

    size: int
    targets: int
    seconds: float


class Batcher:
    """Collects :class:`WorkItem` s into batches and runs them on one worker thread.

    encode:      (B, 3, S, S) float32 -> image embeddings (B, ...), one call per batch.
    decode:      see :data:`DecodeFn`.
    select:      see :data:`SelectFn`.
    max_batch:   most images per encoder call (1: no batching).
    max_wait_ms: how long the first image of a batch waits for company (0: take only what is queued).
    on_batch:    called on the worker thread with :class:`BatchStats` after each batch.
    """

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], decode: DecodeFn, select: SelectFn, *,
                 max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Optional[Callable[[BatchStats], None]] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._encode, self._decode, self._select = encode, decode, select
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: "queue.Queue[Optional[WorkItem]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # items submitted and not yet taken by the worker
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ram-serve-batcher", daemon=True)
        self._thread.start()

    # -- producer side (any thread) ------------------------------------------------------------------
    def submit(self, items: List[WorkItem]) -> None:
        """Queue ``items`` (one request's images); RuntimeError after :meth:`close`."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the service is shutting down")
            self._waiting += len(items)
            for item in items:
                self._queue.put(item)

    @property
    def queued(self) -> int:
        """Images waiting for the model."""
        return self._waiting

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Stop taking work, fail what is still queued, and join the worker."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the service shut down before this image was tagged"))

    # -- worker thread -------------------------------------------------------------------------------
    def _take(self, block: bool, timeout: Optional[float] = None) -> Optional[WorkItem]:
        item = self._queue.get(block=block, timeout=timeout)
        if item is not None:
            with self._lock:
                self._waiting -= 1
        return item

    def _collect(self) -> Optional[List[WorkItem]]:
        first = self._take(block=True)
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._take(block=remaining > 0, timeout=remaining if remaining > 0 else None)
            except queue.Empty:
                break
            if item is None:  # close() was called: run this batch, then stop
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            # A request that timed out cancelled its futures: skip those images.
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, items: List[WorkItem]) -> None:
        start = time.perf_counter()
        groups: Dict[Optional[Hashable], List[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.target, []).append(i)
        try:
            embeds = self._encode(np.stack([item.pixels for item in items]))
        except Exception as e:  # the encoder failed: every image learns why
            logger.exception("inference failed for a batch of %d images", len(items))
            self._fail(items, e)
        else:
            for target, indices in groups.items():
                try:
                    scores = self._decode(target, embeds[indices])
                    for row, i in enumerate(indices):
                        items[i].future.set_result(self._select(scores[row:row + 1], items[i]))
                except Exception as e:  # this target's images learn why; the others' results stand
                    logger.exception("decoding failed for %d images of a batch", len(indices))
                    self._fail([items[i] for i in indices], e)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(items), len(groups), time.perf_counter() - start))

    @staticmethod
    def _fail(items: List[WorkItem], error: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
