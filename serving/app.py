"""The tagging service: a FastAPI app around one :class:`~ram_edge.runtime.Tagger`.

Endpoints: ``POST /v1/tag`` (multipart ``images``, ``threshold``, ``top_k``, ``lang``, and one of
``vocabulary`` / ``tags`` / ``classify``), ``POST`` / ``GET /v1/vocabularies``, ``GET`` / ``DELETE
/v1/vocabularies/{id}``, ``GET /v1/model``, ``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /``
(the page), ``/docs`` and ``/openapi.json``.

Where the work happens: uploads are read by Starlette, images are decoded and resized on a thread pool
(Pillow releases the GIL), the model runs on the :class:`~ram_edge.serving.batcher.Batcher`'s own thread,
and text encoding (open-set tags, classes) on two more: one for ``POST /v1/vocabularies`` builds (one at a
time) and one for the words of single requests, so a long build never delays them. The event loop only
moves bytes. Every error is JSON ``{"error": "..."}`` with a 4xx status (5xx only for the service's own
failures, 501 for open-set requests to a bundle without a text encoder), and the service goes on serving.

Limits (see :class:`ServeConfig`): at most ``max_queue`` requests with a body (tag requests and
vocabulary uploads) are admitted at once, counted from the moment their headers arrive (uploading,
decoding, waiting or running); one more is answered 503 at once, before its body is read. A body over
``max_upload_bytes`` is 413 (counted as the bytes arrive, whatever Content-Length says), more than
``max_images_per_request`` images 413, an image over the Tagger's ``max_pixels`` 400 from its header before
decoding. A request has ``request_timeout`` seconds from its first byte: a body still incomplete then is
408, a tag answer the model has not given by then 504 (a vocabulary build is bounded by
``max_vocabulary_texts`` instead). The service only ever reads the bytes of uploaded files: no path or
URL in a request is opened.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ram_edge import __version__
from ram_edge.bundle_format import BundleError
from ram_edge.openset import RAM_TEMPLATES
from ram_edge.runtime.preprocess import ImageError
from ram_edge.runtime.tagger import ClassResult, TagResult, Tagger
from ram_edge.vocabulary import Vocabulary, clean_tag_names, read_descriptions, resolve_tag_table

from .batcher import BatchStats, Batcher, WorkItem
from .metrics import RequestMetricsMiddleware, ServiceMetrics
from .vocabularies import (
    VOCABULARY_ID_PATTERN, CaptionedTags, CaptionTarget, ClassTarget, StoredVocabulary, Target, TargetCache,
    VocabularyStore, check_merge, default_target, open_set_target,
)

logger = logging.getLogger(__name__)

#: Endpoints whose requests carry a body: admission control (max_queue, body size, request_timeout)
#: applies to them (to /v1/vocabularies for POST only).
BODY_ENDPOINTS = ("/v1/tag", "/v1/vocabularies")
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/model", *BODY_ENDPOINTS, "/v1/vocabularies/{id}")
TOKEN_SCOPES = ("writes", "all")
STATIC_DIR = Path(str(files("ram_edge.serving") / "static"))
#: The page loads nothing from elsewhere; the browser is told so too.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
_DEADLINE_KEY = "ram_edge.deadline"


@dataclass(frozen=True)
class ServeConfig:
    """Batching, limits and access of one service instance.

    max_batch:              most images per encoder call (1 turns batching off).
    max_wait_ms:            how long the first image of a batch waits for others.
    max_queue:              requests with a body (tag requests, vocabulary uploads) admitted at once; the
                            next one is answered 503.
    max_images_per_request: images in one request (413 beyond).
    max_upload_bytes:       request body size (413 beyond).
    request_timeout:        seconds from a request's arrival to its answer (408 while uploading, 504 after).
    decode_workers:         threads decoding images (None: min(8, CPUs)).
    token:                  bearer token; None: no authentication.
    token_scope:            "writes": the token guards endpoints that change state (creating and deleting
                            vocabularies); "all": every /v1 endpoint too.
    max_vocabularies:       vocabularies kept by POST /v1/vocabularies; a full store refuses the next (409).
    max_vocabulary_texts:   texts one vocabulary build may embed (63 per name, one per description; 413
                            beyond): bounds its time and its memory (E * 4 bytes per text, 2 KiB for CLIP).
    max_request_tags:       names in one request's ``tags`` or ``classify`` field (413 beyond).
    text_cache_size:        targets built from requests' ``tags`` / ``classify`` kept for the next request
                            with the same words (least recently used dropped first).
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_images_per_request: int = 16
    max_upload_bytes: int = 32 * 1024 * 1024
    request_timeout: float = 30.0
    decode_workers: Optional[int] = None
    token: Optional[str] = None
    token_scope: str = "writes"
    max_vocabularies: int = 16
    max_vocabulary_texts: int = 32_768
    max_request_tags: int = 16
    text_cache_size: int = 16

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_images_per_request", "max_upload_bytes", "max_vocabularies",
                     "max_vocabulary_texts", "max_request_tags", "text_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.decode_workers is not None and self.decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {self.decode_workers}")
        if self.token_scope not in TOKEN_SCOPES:
            raise ValueError(f"token_scope must be one of {TOKEN_SCOPES}, got {self.token_scope!r}")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty")


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class VocabularyRequest(BaseModel):
    """The body of ``POST /v1/vocabularies``: ``names`` or ``descriptions``, built with the bundle's text
    encoder by upstream's recipes (``Vocabulary.from_names`` / ``from_descriptions``)."""

    model_config = ConfigDict(extra="forbid")

    id: Optional[str] = Field(None, pattern=VOCABULARY_ID_PATTERN,
                              description="the id to keep it under (default: one is made up)")
    names: Optional[List[str]] = Field(None, description="tag names; each fills upstream's 63 prompt templates")
    descriptions: Optional[Union[List[Any], Dict[str, Any]]] = Field(
        None, description='LLM descriptions, RAM++\'s format: [{"tag": ["description", ...]}, ...]')
    thresholds: Optional[Union[Probability, List[Probability], Dict[str, Probability]]] = Field(
        None, description="one threshold for every tag, one per tag, or tag -> threshold (default 0.5)")
    names_zh: Optional[Union[List[str], Dict[str, str]]] = Field(
        None, description="Chinese display names: one per tag, or tag -> name")
    merge_default: bool = Field(False, description="score the service's default vocabulary first, then these tags")


# ----------------------------------------------------------------------------------------------------
# The service (no HTTP here)


class TaggingService:
    """A Tagger, its batcher, its decoding and text-encoding threads, and the stored vocabularies.
    :meth:`start` / :meth:`stop` bracket serving. The Tagger's vocabulary when the service is made is its
    default vocabulary (the service never changes it: other vocabularies are fed with each decoder call)."""

    def __init__(self, tagger: Tagger, config: ServeConfig = ServeConfig(), *, close_tagger: bool = False):
        self.tagger, self.config = tagger, config
        self.metrics = ServiceMetrics()
        self._close_tagger = close_tagger
        self.default = default_target(tagger)
        self.store = VocabularyStore(config.max_vocabularies)
        self.cache = TargetCache(config.text_cache_size)
        #: Why open-set requests cannot be served (the runtime's message: how to add a text encoder), or None.
        self.open_set_error: Optional[str] = None
        if not tagger.has_text_encoder:
            try:
                tagger.text_encoder  # raises BundleError saying how to add one
            except BundleError as e:
                self.open_set_error = str(e)
        self.building: Optional[str] = None  # id of the vocabulary being built (event loop only)
        self._text_lock = threading.Lock()
        self.batcher: Optional[Batcher] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._text_pool: Optional[ThreadPoolExecutor] = None
        self._build_pool: Optional[ThreadPoolExecutor] = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    @property
    def has_text_encoder(self) -> bool:
        return self.open_set_error is None

    def start(self) -> None:
        c = self.config
        self._pool = ThreadPoolExecutor(max_workers=c.decode_workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="ram-serve-decode")
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-serve-text")
        self._build_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-serve-vocab")
        self.batcher = Batcher(self.tagger.encode, self._decode, self._select, max_batch=c.max_batch,
                               max_wait_ms=c.max_wait_ms, on_batch=self._record_batch)
        self.metrics.queued.set_function(lambda: self.batcher.queued if self.batcher else 0)
        self.metrics.vocabularies.set_function(lambda: len(self.store))

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        for pool in (self._pool, self._text_pool, self._build_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self._close_tagger:
            self.tagger.close()

    # -- worker threads ------------------------------------------------------------------------------
    def _decode(self, target: Target, image_embeds: np.ndarray):
        return target.scores(self.tagger, image_embeds)

    def _select(self, scores, item: WorkItem) -> Union[TagResult, ClassResult]:
        return item.target.result(scores, item.threshold, item.top_k, item.lang)

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batch_targets.observe(stats.targets)
        self.metrics.batch_seconds.observe(stats.seconds)
        self.metrics.images.inc(stats.size)

    def _text_encoder(self):
        """The Tagger's text encoder, loaded on first use; under a lock, as two threads may ask first."""
        with self._text_lock:
            return self.tagger.text_encoder

    def _request_target(self, key: Tuple[str, Tuple[str, ...]]) -> Target:
        """(text thread) The target of a request's ``tags`` or ``classify`` words, cached. Jobs run one at a
        time, so a job for words an earlier job has just built finds them in the cache."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        kind, names = key
        text = self._text_encoder()  # loaded under the lock; class_embeddings below uses the same one
        if kind == "tags":
            target: Target = open_set_target(self.tagger, Vocabulary.from_names(list(names), text))
        else:
            labels, embeds = self.tagger.class_embeddings(list(names))
            target = ClassTarget(Vocabulary(labels, embeds))
        return self.cache.put(key, target)

    def _build_vocabulary(self, request: VocabularyRequest) -> Vocabulary:
        """(vocabulary thread) The open-set part of a stored vocabulary."""
        text = self._text_encoder()
        options = {"thresholds": request.thresholds, "names_zh": request.names_zh}
        if request.names is not None:
            return Vocabulary.from_names(request.names, text, **options)
        return Vocabulary.from_descriptions(request.descriptions, text, **options)

    # -- requests (event loop) -----------------------------------------------------------------------
    def _require_text_encoder(self) -> None:
        if self.open_set_error is not None:
            raise HTTPException(501, self.open_set_error)

    async def target(self, *, vocabulary: Optional[str], tags: Optional[str], classify: Optional[str],
                     deadline: float) -> Target:
        """What a tag request's images are scored against: a stored vocabulary, the request's own tags or
        classes (built with the text encoder on the text thread, cached), or the default vocabulary.
        Raises HTTPException 400, 404, 413, 422, 501, 504."""
        given = [name for name, value in (("vocabulary", vocabulary), ("tags", tags), ("classify", classify))
                 if value is not None]
        if len(given) > 1:
            raise HTTPException(422, f"{' and '.join(given)}: give at most one of vocabulary, tags, classify")
        if vocabulary is not None:
            entry = self.store.get(vocabulary)
            if entry is None:
                raise HTTPException(404, f"vocabulary {vocabulary!r} not found (GET /v1/vocabularies lists them)")
            return entry.target
        if tags is None and classify is None:
            return self.default
        self._require_text_encoder()
        kind, words = ("tags", tags) if tags is not None else ("classify", classify)
        try:
            names = clean_tag_names(words.split(","))
        except ValueError as e:
            raise HTTPException(400, f"{kind}: {e}") from None
        if len(names) > self.config.max_request_tags:
            raise HTTPException(413, f"{kind}: {len(names)} names; the limit is {self.config.max_request_tags} "
                                     "(--max-request-tags): keep more as a vocabulary (POST /v1/vocabularies)")
        key = (kind, tuple(names))
        cached = self.cache.get(key)
        self.metrics.text_cache.labels("hit" if cached is not None else "miss").inc()
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        try:
            # On timeout the job is cancelled if it has not started (a started one fills the cache).
            return await asyncio.wait_for(loop.run_in_executor(self._text_pool, self._request_target, key),
                                          max(0.0, deadline - loop.time()))
        except ValueError as e:
            raise HTTPException(400, f"{kind}: {e}") from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"{kind}: the text encoder did not finish within "
                                     f"{self.config.request_timeout:g} s (--request-timeout); once started it "
                                     "goes on, and a retry finds the result cached") from None

    async def tag(self, images: List[bytes], *, threshold: Optional[float], top_k: Optional[int], lang: str,
                  deadline: float, target: Optional[Target] = None) -> List[Union[TagResult, ClassResult]]:
        """Decode ``images`` on the thread pool, score them against ``target`` (default: the default
        vocabulary) in the batcher, and return their results.
        Raises HTTPException 400 (a bad image, a language the vocabulary lacks), 503, 504."""
        target = target if target is not None else self.default
        if lang not in target.languages:
            raise HTTPException(400, f"lang {lang!r}: this vocabulary has no names in that language "
                                     f"(it has {', '.join(target.languages)})")
        if not self.ready:
            raise HTTPException(503, "the service is not running")
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self.tagger.preprocess, data) for data in images),
            return_exceptions=True,
        )
        for i, outcome in enumerate(decoded):
            if isinstance(outcome, ImageError):
                raise HTTPException(400, f"images[{i}]: {outcome}")
            if isinstance(outcome, BaseException):
                raise outcome
        items = [WorkItem(pixels, threshold, top_k, lang, target) for pixels in decoded]
        try:
            self.batcher.submit(items)
        except RuntimeError as e:
            raise HTTPException(503, str(e)) from None
        waiting = [asyncio.wrap_future(item.future) for item in items]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*waiting), max(0.0, deadline - loop.time())))
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer from the model within {self.config.request_timeout:g} s "
                                     "(--request-timeout); the service is overloaded") from None

    def _check_room(self, vocabulary_id: str) -> None:
        if vocabulary_id in self.store:
            raise HTTPException(409, f"vocabulary {vocabulary_id!r} exists: DELETE /v1/vocabularies/{vocabulary_id} "
                                     "first, or choose another id")
        if self.store.full:
            raise HTTPException(409, f"the service keeps at most {self.store.capacity} vocabularies "
                                     "(--max-vocabularies): DELETE one first")

    def _plan_build(self, request: VocabularyRequest) -> Tuple[str, int]:
        """Check a build request before any text is encoded: its recipe and the number of texts to embed.
        The runtime's own checks give the messages (positions of empty or duplicate names, malformed
        description entries, thresholds for tags not in the list)."""
        if (request.names is None) == (request.descriptions is None):
            raise HTTPException(422, "give either names or descriptions")
        try:
            if request.names is not None:
                recipe, names = "names", clean_tag_names(request.names)
                texts = len(names) * len(RAM_TEMPLATES)
            else:
                items = read_descriptions(request.descriptions)
                recipe, names = "descriptions", clean_tag_names([name for name, _ in items])
                texts = sum(len(descriptions) for _, descriptions in items)
            resolve_tag_table(names, request.thresholds, request.names_zh)
            if request.merge_default:
                check_merge(self.tagger.vocabulary, names)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if texts > self.config.max_vocabulary_texts:
            raise HTTPException(413, f"{len(names)} tags need {texts:,} text embeddings; the limit is "
                                     f"{self.config.max_vocabulary_texts:,} (--max-vocabulary-texts)")
        return recipe, texts

    async def create_vocabulary(self, request: VocabularyRequest) -> StoredVocabulary:
        """Build a vocabulary on the vocabulary thread (one build at a time) and keep it.
        Raises HTTPException 400, 409, 413, 422, 501, 503."""
        self._require_text_encoder()
        vocabulary_id = request.id or self.store.new_id()
        self._check_room(vocabulary_id)
        recipe, texts = self._plan_build(request)
        if self.building is not None:
            raise HTTPException(503, f"vocabulary {self.building!r} is being built (one build at a time); retry "
                                     "when it is done", headers={"Retry-After": "5"})
        self.building = vocabulary_id
        started = time.perf_counter()
        try:
            own = await asyncio.get_running_loop().run_in_executor(self._build_pool, self._build_vocabulary, request)
            target = open_set_target(self.tagger, own, include_default=request.merge_default)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        finally:
            self.building = None
        seconds = time.perf_counter() - started
        # Only builds add vocabularies and they run one at a time: the room checked above is still there.
        entry = StoredVocabulary(vocabulary_id, target, recipe, request.merge_default, texts, seconds)
        self.store.add(entry)
        self.metrics.build_seconds.observe(seconds)
        logger.info("vocabulary %r: %d tags (%d texts) built in %.2f s", vocabulary_id, own.num_tags, texts, seconds)
        return entry


# ----------------------------------------------------------------------------------------------------
# HTTP


class TagResultModel(BaseModel):
    tags: List[str]
    probabilities: List[float]
    caption: Optional[str] = Field(None, description="with caption=true: the caption written for the image")
    caption_tags: Optional[str] = Field(None, description="with caption=true: the tags that guided it, ' | '-joined")


class ClassResultModel(BaseModel):
    classes: List[str]
    probabilities: List[float]


class TagResponse(BaseModel):
    results: List[Union[TagResultModel, ClassResultModel]]


class ErrorResponse(BaseModel):
    error: str


def _result_json(result: Union[TagResult, ClassResult, CaptionedTags]) -> Dict[str, Any]:
    if isinstance(result, ClassResult):
        return {"classes": list(result.labels), "probabilities": list(result.probabilities)}
    if isinstance(result, CaptionedTags):
        return {**_result_json(result.tags), "caption": result.caption.text, "caption_tags": result.caption.tags}
    return {"tags": list(result.tags), "probabilities": list(result.probabilities)}


def _json_error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class AdmissionMiddleware:
    """Admission control for the requests that carry a body (``/v1/tag``, ``POST /v1/vocabularies``),
    before it is read: at most ``max_queue`` such requests in the service (503 with Retry-After beyond);
    a body limit (413 at once for a larger Content-Length, else as soon as the bytes received pass it,
    whatever the headers said); and a deadline from the first byte, stored in the scope for the handler
    and applied to receiving the body (408 when it is not complete in time). Errors raised while the
    body is read are HTTPExceptions, which FastAPI passes through its parsing to the app's JSON error
    handler."""

    def __init__(self, app: ASGIApp, service: TaggingService):
        self.app, self.service = app, service
        self.in_flight = 0  # the event loop is one thread: no lock needed

    @staticmethod
    def _applies(scope: Scope) -> bool:
        path = scope.get("path")
        return path == "/v1/tag" or (path == "/v1/vocabularies" and scope.get("method") == "POST")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._applies(scope):
            await self.app(scope, receive, send)
            return
        config = self.service.config
        if self.in_flight >= config.max_queue:
            response = _json_error(503, f"the service is at its limit of {config.max_queue} requests in progress "
                                        "(--max-queue); retry shortly", headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        too_large = (f"the request body is over the limit of {config.max_upload_bytes:,} bytes "
                     "(--max-upload-mb)")
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > config.max_upload_bytes:
            await _json_error(413, too_large)(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.request_timeout
        scope[_DEADLINE_KEY] = deadline
        received = 0
        body_complete = False

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {config.request_timeout:g} s "
                                         "(--request-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > config.max_upload_bytes:
                    raise HTTPException(413, too_large)
                body_complete = not message.get("more_body", False)
            else:
                body_complete = True
            return message

        self.in_flight += 1
        self.service.metrics.in_flight.inc()
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.in_flight -= 1
            self.service.metrics.in_flight.dec()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = [str(x) for x in error.get("loc", ()) if x not in ("body", "query", "header", "path")]
        parts.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(service: TaggingService) -> FastAPI:
    """The ASGI app. The service is started and stopped with the app's lifespan."""
    config = service.config
    info = service.tagger.bundle

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="ram-edge tagging service",
        version=__version__,
        description="Tag images with a RAM / RAM++ bundle, with open-set vocabularies and zero-shot "
                    "classification where the bundle has a text encoder. Errors are JSON `{\"error\": \"...\"}`.",
        lifespan=lifespan,
        middleware=[
            Middleware(RequestMetricsMiddleware, metrics=service.metrics, endpoints=ENDPOINTS),
            Middleware(AdmissionMiddleware, service=service),
        ],
    )
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")

    bearer = HTTPBearer(auto_error=False, description="required when the service runs with --token")

    async def authorized(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if config.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), config.token.encode()):
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    writes = [Depends(authorized)]  # endpoints that change state: always behind the token
    reads = writes if config.token_scope == "all" else []

    def errors(*codes: int) -> Dict[int, Dict[str, Any]]:
        return {code: {"model": ErrorResponse} for code in codes}

    @app.post("/v1/tag", response_model=TagResponse, dependencies=reads, summary="Tag or classify images",
              responses=errors(400, 401, 404, 408, 413, 422, 501, 503, 504))
    async def tag(
        request: Request,
        images: List[UploadFile] = File(..., description="one or more image files (repeat the field)"),
        threshold: Optional[float] = Form(None, ge=0.0, le=1.0,
                                          description="one threshold for every tag; default: per-tag thresholds"),
        top_k: Optional[int] = Form(None, ge=1, description="at most this many tags (or classes) per image"),
        lang: Literal["en", "zh"] = Form("en", description="tag names in English or Chinese"),
        vocabulary: Optional[str] = Form(None, description="score against this stored vocabulary (an id from "
                                                           "POST /v1/vocabularies)"),
        tags: Optional[str] = Form(None, description="comma-separated open-set tags for this request only "
                                                     "(threshold 0.5 unless `threshold`); built with the text "
                                                     "encoder and cached"),
        classify: Optional[str] = Form(None, description="comma-separated classes (at least two): zero-shot "
                                                         "classification instead of tags"),
        caption: bool = Form(False, description="also write a caption per image (bundles with captioning graphs: "
                                                "Tag2Text, RAM exported with --captioning)"),
        num_beams: Optional[int] = Form(None, ge=1, le=8, description="with caption: beams of the search "
                                                                      "(default the bundle's, 3; 1 = greedy)"),
    ) -> JSONResponse:
        """Per image, in the order sent: its tags, most probable first (`{"tags", "probabilities"}`), or with
        `classify` every class, most probable first, probabilities summing to 1 (`{"classes", "probabilities"}`)."""
        if len(images) > config.max_images_per_request:
            raise HTTPException(413, f"{len(images)} images in one request; the limit is "
                                     f"{config.max_images_per_request} (--max-images-per-request)")
        if classify is not None and threshold is not None:
            raise HTTPException(422, "threshold does not apply to classify (its probabilities are a softmax over "
                                     "the classes); use top_k")
        if caption and classify is not None:
            raise HTTPException(422, "caption and classify: a caption comes with tags, not with classes")
        if num_beams is not None and not caption:
            raise HTTPException(422, "num_beams applies to caption=true")
        if caption and not service.tagger.has_captioning:
            raise HTTPException(501, "this bundle has no captioning graphs: export a Tag2Text checkpoint (or RAM with "
                                     "`ram-export --captioning`) to caption; see docs/captioning.md")
        deadline = request.scope.get(_DEADLINE_KEY, asyncio.get_running_loop().time() + config.request_timeout)
        target = await service.target(vocabulary=vocabulary, tags=tags, classify=classify, deadline=deadline)
        if caption:
            target = CaptionTarget(target, num_beams)
        data = [await upload.read() for upload in images]
        results = await service.tag(data, threshold=threshold, top_k=top_k, lang=lang, deadline=deadline,
                                    target=target)
        return JSONResponse({"results": [_result_json(r) for r in results]})

    @app.post("/v1/vocabularies", status_code=201, dependencies=writes, summary="Build and keep a vocabulary",
              responses=errors(400, 401, 408, 409, 413, 422, 501, 503))
    async def create_vocabulary(body: VocabularyRequest) -> JSONResponse:
        """Builds an open-set vocabulary with the bundle's text encoder (seconds for a few hundred texts on
        a CPU; one build at a time) and keeps it in memory under its id, for `POST /v1/tag` `vocabulary=ID`."""
        entry = await service.create_vocabulary(body)
        return JSONResponse(entry.summary(), status_code=201)

    @app.get("/v1/vocabularies", dependencies=reads, summary="The stored vocabularies")
    async def list_vocabularies() -> Dict[str, Any]:
        return {"vocabularies": [entry.summary() for entry in service.store.entries()],
                "max_vocabularies": config.max_vocabularies, "text_encoder": service.has_text_encoder}

    @app.get("/v1/vocabularies/{vocabulary_id}", dependencies=reads, summary="One stored vocabulary and its tags",
             responses=errors(401, 404))
    async def get_vocabulary(vocabulary_id: str) -> Dict[str, Any]:
        entry = service.store.get(vocabulary_id)
        if entry is None:
            raise HTTPException(404, f"vocabulary {vocabulary_id!r} not found")
        return entry.detail()

    @app.delete("/v1/vocabularies/{vocabulary_id}", dependencies=writes, summary="Forget a stored vocabulary",
                responses=errors(401, 404))
    async def delete_vocabulary(vocabulary_id: str) -> Dict[str, Any]:
        if not service.store.delete(vocabulary_id):
            raise HTTPException(404, f"vocabulary {vocabulary_id!r} not found")
        return {"deleted": vocabulary_id}

    @app.get("/v1/model", dependencies=reads, summary="The model, its vocabulary and the service's limits")
    async def model() -> Dict[str, Any]:
        manifest = info.manifest
        return {
            "model": {k: manifest.get("model", {}).get(k) for k in ("kind", "variant", "image_size")},
            "precision": manifest.get("precision"),
            "num_tags": service.default.num_tags,
            "languages": service.default.languages,
            "default_threshold": service.tagger.default_threshold,
            "open_set": {"text_encoder": service.has_text_encoder, "vocabularies": len(service.store),
                         "max_vocabularies": config.max_vocabularies,
                         "max_vocabulary_texts": config.max_vocabulary_texts,
                         "max_request_tags": config.max_request_tags},
            "classification": service.has_text_encoder,
            "captioning": service.tagger.has_captioning,
            "batching": {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms},
            "limits": {"max_images_per_request": config.max_images_per_request,
                       "max_upload_bytes": config.max_upload_bytes,
                       "max_pixels": service.tagger.preprocessor.max_pixels,
                       "max_queue": config.max_queue, "request_timeout": config.request_timeout},
            "version": __version__,
        }

    @app.get("/healthz", summary="200 when the model is loaded and the batcher runs")
    async def healthz() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ok", "text_encoder": service.has_text_encoder})
        return JSONResponse({"status": "unavailable", "error": "the model is not serving"}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
