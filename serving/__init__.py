"""The tagging service (``ram-serve``): FastAPI + uvicorn around one ``ram_edge.runtime.Tagger``, with dynamic
batching, limits, Prometheus metrics and a web page.

    from ram_edge.runtime import Tagger
    from ram_edge.serving import ServeConfig, TaggingService, create_app
    app = create_app(TaggingService(Tagger("bundle/"), ServeConfig(max_batch=16)))   # any ASGI server

A consumer of the torch-free runtime, which never imports it. Needs the ``[serve]`` extra:
``pip install 'ram-edge[serve]'``; the names below are imported on first use, so that ``ram-serve`` can say
so instead of failing on import. Batch jobs on Ray Data are ``ram_edge.distributed``.
"""

from typing import Any

_EXPORTS = {
    "ServeConfig": "app", "TaggingService": "app", "create_app": "app",
    "BatchStats": "batcher", "Batcher": "batcher", "WorkItem": "batcher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ram_edge.serving' has no attribute {name!r}")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ram_edge.serving needs FastAPI, uvicorn and prometheus-client ({e}): "
                          "pip install 'ram-edge[serve]'") from e
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
