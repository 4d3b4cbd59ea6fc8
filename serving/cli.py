"""``ram-serve``: the tagging service (FastAPI on uvicorn) for one bundle."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import warnings
from typing import Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TOKEN_ENV = "RAM_SERVE_TOKEN"
#: Largest image a request may carry (width x height), checked from the header before decoding: 64 MP
#: covers 48 and 61 MP cameras; one decoded image of that size is 192 MB of RGB.
SERVE_MAX_PIXELS = 64_000_000
LOOPBACK = ("127.0.0.1", "::1", "localhost")

DESCRIPTION = """\
Serve a ram-edge bundle over HTTP: POST /v1/tag (multipart 'images', 'threshold', 'top_k', 'lang', and
'vocabulary', 'tags' or 'classify'), POST/GET /v1/vocabularies (open-set vocabularies built with the
bundle's text encoder), GET /healthz, GET /metrics (Prometheus), a web page at /, API docs at /docs.

examples:
  ram-serve bundle/                                  # http://127.0.0.1:8000/
  curl -F images=@photo.jpg -F top_k=5 http://127.0.0.1:8000/v1/tag
  curl -F images=@photo.jpg -F tags="otter,kayak" http://127.0.0.1:8000/v1/tag
  curl -H 'Content-Type: application/json' -d '{"id": "outdoor", "names": ["otter", "kayak"]}' \\
       http://127.0.0.1:8000/v1/vocabularies        # then -F vocabulary=outdoor
  RAM_SERVE_TOKEN=secret ram-serve bundle/ --host 0.0.0.0 --token-scope all
"""

EPILOG = """\
Concurrent requests are batched: the first image waits up to --max-wait-ms for others, up to
--max-batch images share one encoder call, whatever vocabulary each request names. At most --max-queue
tag requests and vocabulary uploads are in the service at once (uploading, decoding, waiting, running);
more are answered 503 at once. Vocabularies (POST /v1/vocabularies) are built one at a time, kept in
memory (at most --max-vocabularies) and lost on restart. Every bad input is a 4xx with JSON
{"error": "..."}; see docs/serving.md.

exit status: 0 stopped; 1 the server failed to start; 2 usage or bundle error, or the address cannot be
used; 130 stopped by Ctrl-C (SIGINT), after a graceful shutdown.
"""


def build_parser() -> argparse.ArgumentParser:
    from ram_edge import __version__
    from ram_edge.runtime.backends import registered_backends

    from .app import ServeConfig

    d = ServeConfig()
    p = argparse.ArgumentParser(prog="ram-serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by ram-export")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    g.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; prefer the variable, "
                        "a command line is visible to other users)")
    g.add_argument("--token-scope", choices=("writes", "all"), default=d.token_scope,
                   help="writes: the token guards endpoints that change state (creating and deleting vocabularies; "
                        "default); all: every /v1 endpoint")
    g.add_argument("--no-access-log", action="store_true", help="do not log every request")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                   help=f"most images per encoder call (default {d.max_batch}; 1: no batching)")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, metavar="MS",
                   help=f"how long an image waits for others to batch with (default {d.max_wait_ms:g})")
    g.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"tag and vocabulary requests in the service at once; more get 503 (default {d.max_queue})")
    g.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request, metavar="N",
                   help=f"default {d.max_images_per_request}")
    g.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20, metavar="MB",
                   help=f"largest request body (default {d.max_upload_bytes / 2**20:g} MiB)")
    g.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS, metavar="N",
                   help=f"largest image, width x height, checked before decoding (default {SERVE_MAX_PIXELS:,})")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, metavar="S",
                   help=f"seconds from a request's arrival to its answer (default {d.request_timeout:g})")
    g.add_argument("--decode-workers", type=int, metavar="N", help="image decoding threads (default: min(8, CPUs))")
    g = p.add_argument_group("open-set vocabularies and classification (bundles with a text encoder)")
    g.add_argument("--max-vocabularies", type=int, default=d.max_vocabularies, metavar="N",
                   help=f"vocabularies kept by POST /v1/vocabularies; more are refused (default {d.max_vocabularies})")
    g.add_argument("--max-vocabulary-texts", type=int, default=d.max_vocabulary_texts, metavar="N",
                   help="texts one vocabulary build may embed: 63 per name, one per description "
                        f"(default {d.max_vocabulary_texts:,})")
    g.add_argument("--max-request-tags", type=int, default=d.max_request_tags, metavar="N",
                   help=f"names in one request's 'tags' or 'classify' field (default {d.max_request_tags})")
    g = p.add_argument_group("model")
    g.add_argument("--vocab", metavar="DIR", help="a vocabulary folder to use instead of the bundle's own")
    g.add_argument("--backend", choices=registered_backends(), default="onnxruntime", help="inference backend")
    g.add_argument("--providers", nargs="+", metavar="NAME", help="onnxruntime execution providers, in order")
    g.add_argument("--intra-op-threads", type=int, metavar="N", help="onnxruntime threads per operator")
    g.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    g.add_argument("--resize", choices=("pillow", "opencv"), default="pillow", help="resize method (pillow = upstream)")
    g.add_argument("--no-exif-transpose", action="store_true", help="ignore EXIF orientation")
    g.add_argument("--alpha", choices=("drop", "white"), default="drop", help="transparent images: drop alpha or white")
    return p


def _error(message: str) -> int:
    print(f"ram-serve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port): bound here rather than by uvicorn so that a busy port is a
    clear error, and port 0 picks a free one."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:  # through the package: without the [serve] extra it says what to install
        from ram_edge.serving import ServeConfig, TaggingService, create_app
    except ImportError as e:
        return _error(str(e))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-images-per-request", args.max_images_per_request), ("--max-pixels", args.max_pixels),
                        ("--max-vocabularies", args.max_vocabularies),
                        ("--max-vocabulary-texts", args.max_vocabulary_texts),
                        ("--max-request-tags", args.max_request_tags)):
        if value < 1:
            return _error(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        return _error(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_wait_ms < 0 or args.request_timeout <= 0:
        return _error("--max-upload-mb and --request-timeout must be > 0, --max-wait-ms >= 0")
    if args.decode_workers is not None and args.decode_workers < 1:
        return _error(f"--decode-workers must be >= 1, got {args.decode_workers}")

    import uvicorn
    from PIL import Image

    from ram_edge.bundle_format import BundleError
    from ram_edge.runtime.tagger import Tagger
    from ram_edge.vocabulary import Vocabulary

    logging.basicConfig(level=args.log_level.upper(), format="ram-serve: %(message)s", stream=sys.stderr)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # --max-pixels is the explicit guard
    config = ServeConfig(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_images_per_request=args.max_images_per_request, max_upload_bytes=int(args.max_upload_mb * 2**20),
        request_timeout=args.request_timeout, decode_workers=args.decode_workers, token=token,
        token_scope=args.token_scope, max_vocabularies=args.max_vocabularies,
        max_vocabulary_texts=args.max_vocabulary_texts, max_request_tags=args.max_request_tags,
    )
    try:
        vocabulary = Vocabulary.load(args.vocab) if args.vocab else None
        tagger = Tagger(
            args.bundle, backend=args.backend, providers=args.providers, vocabulary=vocabulary,
            verify_files=not args.no_verify, intra_op_threads=args.intra_op_threads, resize=args.resize,
            exif_transpose=not args.no_exif_transpose, alpha=args.alpha, max_pixels=args.max_pixels,
        )
    except (BundleError, ValueError, ImportError, NotImplementedError) as e:
        return _error(str(e))
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        tagger.close()
        return _error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e} (--host / --port)")

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    if args.host not in LOOPBACK and token is None:
        logging.getLogger("ram-serve").warning(
            "listening on %s without a token: anyone who reaches this address can use the service", args.host)
    print(f"ram-serve: serving {args.bundle} on http://{url_host}:{port}/ (API docs: /docs)", file=sys.stderr,
          flush=True)
    server = _make_server_class()(uvicorn.Config(
        create_app(TaggingService(tagger, config, close_tagger=True)), log_level=args.log_level,
        access_log=not args.no_access_log, timeout_graceful_shutdown=int(max(1, args.request_timeout)),
    ))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown (mostly: see _Server)
        return EXIT_INTERRUPTED
    finally:
        sock.close()
    if server.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if server.started else EXIT_FAILED


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, remembering a Ctrl-C itself: after its graceful shutdown uvicorn re-raises the
        signal into the handler it replaced, which inside ``asyncio.run`` is asyncio's own; whether that
        ends in KeyboardInterrupt depends on timing, and the exit status must not (130 either way)."""

        interrupted = False

        def handle_exit(self, sig, frame):
            if sig == signal.SIGINT:
                self.interrupted = True
            super().handle_exit(sig, frame)

    return Server


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
