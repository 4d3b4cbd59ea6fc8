"""The tagging service: a FastAPI app around one :class:`~ram_edge.runtime.Tagger`.

Endpoints: ``POST /v1/tag`` (multipart ``images``, ``threshold``, ``top_k``, ``lang``), ``GET /v1/model``,
``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /`` (the page), ``/docs`` and ``/openapi.json``.

Where the work happens: uploads are read by Starlette, images are decoded and resized on a thread pool
(Pillow releases the GIL), and the model runs on the :class:`~ram_edge.serving.batcher.Batcher`'s own
thread, so the event loop only moves bytes. Every error is JSON ``{"error": "..."}`` with a 4xx status
(5xx only for the service's own failures), and the service goes on serving.

Limits (see :class:`ServeConfig`): at most ``max_queue`` tag requests are admitted at once, counted from
the moment their headers arrive (uploading, decoding, waiting or running); one more is answered 503 at
once, before its body is read. A body over ``max_upload_bytes`` is 413 (counted as the bytes arrive,
whatever Content-Length says), more than ``max_images_per_request`` images 413, an
image over the Tagger's ``max_pixels`` 400 from its header before decoding. A request has
``request_timeout`` seconds from its first byte: a body still incomplete then is 408, an answer the model
has not given by then 504. The service only ever reads the bytes of uploaded files: no path or URL in a
request is opened.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ram_edge import __version__
from ram_edge.runtime.preprocess import ImageError
from ram_edge.runtime.tagger import TagResult, Tagger, sigmoid

from .batcher import BatchStats, Batcher, WorkItem
from .metrics import RequestMetricsMiddleware, ServiceMetrics

logger = logging.getLogger(__name__)

#: Endpoints that run the model; admission control (max_queue, request_timeout) applies to them.
MODEL_ENDPOINTS = ("/v1/tag",)
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/model", *MODEL_ENDPOINTS)
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
    max_queue:              tag requests admitted at once; the next one is answered 503.
    max_images_per_request: images in one request (413 beyond).
    max_upload_bytes:       request body size (413 beyond).
    request_timeout:        seconds from a request's arrival to its answer (408 while uploading, 504 after).
    decode_workers:         threads decoding images (None: min(8, CPUs)).
    token:                  bearer token; None: no authentication.
    token_scope:            "writes": the token guards endpoints that change state (phase 1 has none;
                            phase 2's vocabularies will); "all": every /v1 endpoint too.
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

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_images_per_request", "max_upload_bytes"):
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


# ----------------------------------------------------------------------------------------------------
# The service (no HTTP here)


class TaggingService:
    """A Tagger, its batcher and its decoding threads. :meth:`start` / :meth:`stop` bracket serving."""

    def __init__(self, tagger: Tagger, config: ServeConfig = ServeConfig(), *, close_tagger: bool = False):
        self.tagger, self.config = tagger, config
        self.metrics = ServiceMetrics()
        self._close_tagger = close_tagger
        vocabulary = tagger.vocabulary
        # Display names once per language: Vocabulary.display_names copies the list on every call.
        self.names: Dict[str, List[str]] = {"en": vocabulary.display_names("en")}
        if vocabulary.names_zh is not None:
            self.names["zh"] = vocabulary.display_names("zh")
        self.batcher: Optional[Batcher] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    def start(self) -> None:
        c = self.config
        self._pool = ThreadPoolExecutor(max_workers=c.decode_workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="ram-serve-decode")
        self.batcher = Batcher(self.tagger.encode, self._decode, self._select, max_batch=c.max_batch,
                               max_wait_ms=c.max_wait_ms, on_batch=self._record_batch)
        self.metrics.queued.set_function(lambda: self.batcher.queued if self.batcher else 0)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._close_tagger:
            self.tagger.close()

    # -- batcher callbacks (worker thread) -----------------------------------------------------------
    def _decode(self, vocabulary: Optional[str], image_embeds: np.ndarray) -> np.ndarray:
        # Phase 2 looks `vocabulary` up among the stored vocabularies; None is the bundle's own.
        return sigmoid(self.tagger.decode(image_embeds))

    def _select(self, probabilities: np.ndarray, item: WorkItem) -> TagResult:
        return self.tagger.select(probabilities, item.threshold, item.top_k, names=self.names[item.lang])[0]

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batch_seconds.observe(stats.seconds)
        self.metrics.images.inc(stats.size)

    # -- requests (event loop) -----------------------------------------------------------------------
    async def tag(self, images: List[bytes], *, threshold: Optional[float], top_k: Optional[int], lang: str,
                  deadline: float) -> List[TagResult]:
        """Decode ``images`` on the thread pool, tag them in the batcher, and return their results.
        Raises HTTPException 400 (a bad image, a language the vocabulary lacks), 503, 504."""
        if lang not in self.names:
            raise HTTPException(400, f"lang {lang!r}: this vocabulary has no names in that language "
                                     f"(it has {', '.join(sorted(self.names))})")
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
        items = [WorkItem(pixels, threshold, top_k, lang) for pixels in decoded]
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


# ----------------------------------------------------------------------------------------------------
# HTTP


class TagResultModel(BaseModel):
    tags: List[str]
    probabilities: List[float]


class TagResponse(BaseModel):
    results: List[TagResultModel]


class ErrorResponse(BaseModel):
    error: str


def _json_error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class AdmissionMiddleware:
    """Admission control for the model endpoints, before their body is read: at most ``max_queue``
    requests in the service (503 with Retry-After beyond); a body limit (413 at once for a larger
    Content-Length, else as soon as the bytes received pass it, whatever the headers said); and a
    deadline from the first byte, stored in the scope for the handler and applied to receiving the body
    (408 when it is not complete in time). Errors raised while the body is read are HTTPExceptions, which
    FastAPI passes through its form parsing to the app's JSON error handler."""

    def __init__(self, app: ASGIApp, service: TaggingService):
        self.app, self.service = app, service
        self.in_flight = 0  # the event loop is one thread: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in MODEL_ENDPOINTS:
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
        loc = [str(x) for x in error.get("loc", ()) if x not in ("body", "query", "header")]
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
        description="Tag images with a RAM / RAM++ bundle. Errors are JSON `{\"error\": \"...\"}`.",
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

    # Phase 2's state-changing endpoints (POST /v1/vocabularies) take `authorized` always.
    reads = [Depends(authorized)] if config.token_scope == "all" else []
    errors: Dict[int, Dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 422, 503,
                                                                                     504)}

    @app.post("/v1/tag", response_model=TagResponse, responses=errors, dependencies=reads, summary="Tag images")
    async def tag(
        request: Request,
        images: List[UploadFile] = File(..., description="one or more image files (repeat the field)"),
        threshold: Optional[float] = Form(None, ge=0.0, le=1.0,
                                          description="one threshold for every tag; default: per-tag thresholds"),
        top_k: Optional[int] = Form(None, ge=1, description="at most this many tags per image"),
        lang: Literal["en", "zh"] = Form("en", description="tag names in English or Chinese"),
    ) -> JSONResponse:
        """Tags per image, most probable first, in the order the images were sent."""
        if len(images) > config.max_images_per_request:
            raise HTTPException(413, f"{len(images)} images in one request; the limit is "
                                     f"{config.max_images_per_request} (--max-images-per-request)")
        data = [await upload.read() for upload in images]
        deadline = request.scope.get(_DEADLINE_KEY, asyncio.get_running_loop().time() + config.request_timeout)
        results = await service.tag(data, threshold=threshold, top_k=top_k, lang=lang, deadline=deadline)
        return JSONResponse({"results": [{"tags": list(r.tags), "probabilities": list(r.probabilities)}
                                         for r in results]})

    @app.get("/v1/model", dependencies=reads, summary="The model, its vocabulary and the service's limits")
    async def model() -> Dict[str, Any]:
        manifest = info.manifest
        return {
            "model": {k: manifest.get("model", {}).get(k) for k in ("kind", "variant", "image_size")},
            "precision": manifest.get("precision"),
            "num_tags": service.tagger.vocabulary.num_tags,
            "languages": sorted(service.names),
            "default_threshold": service.tagger.default_threshold,
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
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": "the model is not serving"}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
