"""The tagging service (``ram-serve``): FastAPI + uvicorn around one ``ram_edge.runtime.Tagger``, with dynamic
batching, limits, Prometheus metrics and a web page.

    from ram_edge.runtime import Tagger
    from ram_edge.serving import ServeConfig, TaggingService, create_app
    app = create_app(TaggingService(Tagger("bundle/"), ServeConfig(max_batch=16)))   # any ASGI server

A consumer of the torch-free runtime, which never imports it. Needs the ``[serve]`` extra:
``pip install 'ram-edge[serve]'``. Batch jobs on Ray Data are ``ram_edge.distributed``.
"""

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"ram_edge.serving needs FastAPI and prometheus-client ({e}): pip install 'ram-edge[serve]'") from e

from .app import ServeConfig, TaggingService, create_app
from .batcher import BatchStats, Batcher, WorkItem

__all__ = ["BatchStats", "Batcher", "ServeConfig", "TaggingService", "WorkItem", "create_app"]
