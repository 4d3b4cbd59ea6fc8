"""Backends that run the bundle's graphs, by name. Each is imported only when asked for, so
``import ram_edge.runtime`` never imports onnxruntime or tensorrt."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

from ram_edge.bundle_format import BundleError

from .base import Backend, TensorInfo

# name -> (module, class, how to install it, top-level modules it needs). The needed modules are looked up
# (importlib.util.find_spec, no import) to tell which backends this machine can run.
_REGISTRY: Dict[str, Tuple[str, str, str, Tuple[str, ...]]] = {
    "onnxruntime": (
        "ram_edge.runtime.backends.onnxruntime", "OnnxRuntimeBackend",
        "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)", ("onnxruntime",),
    ),
    "tensorrt": (
        "ram_edge.runtime.backends.tensorrt", "TensorRTBackend",
        "pip install 'ram-edge[trt]' on a machine with an NVIDIA GPU; on Jetson use the JetPack TensorRT "
        "(python3-libnvinfer, venv with --system-site-packages) and pip install polygraphy",
        ("tensorrt", "polygraphy"),
    ),
}


def _missing_module(requires: Tuple[str, ...]) -> Optional[str]:
    for module in requires:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):  # a parent that fails to import, or a module without __spec__
            return module
    return None


def registered_backends() -> Tuple[str, ...]:
    """Every backend name ram-edge knows, installed or not."""
    return tuple(_REGISTRY)


def available_backends() -> Tuple[str, ...]:
    """The backends whose packages are installed here (found, not imported: cheap; a package that is
    present but broken, e.g. tensorrt without a GPU driver, still fails clearly when the backend starts)."""
    return tuple(name for name, entry in _REGISTRY.items() if _missing_module(entry[3]) is None)


def get_backend_class(name: str) -> Type[Backend]:
    """The Backend subclass registered as ``name``; a clear error when unknown, unimplemented or missing."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}")
    module_name, class_name, install, requires = _REGISTRY[name]
    missing = _missing_module(requires)
    if missing is not None:
        raise ImportError(f"backend {name!r} needs the module {missing!r}, which is not installed: {install}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise NotImplementedError(
                f"backend {name!r} is not implemented in this version of ram-edge; use backend='onnxruntime'"
            ) from None
        raise ImportError(f"backend {name!r} needs the module {e.name!r}: {install}") from e
    return getattr(module, class_name)


def register_backend(
    name: str, module: str, class_name: str, install_hint: str = "", requires: Sequence[str] = ()
) -> None:
    """Add a backend (e.g. from a plugin package); it is imported on first use. ``requires``: top-level
    modules it needs, for :func:`available_backends`."""
    _REGISTRY[name] = (module, class_name, install_hint, tuple(requires))


def backend_options(
    backend: str,
    providers: Optional[Sequence[Any]] = None,
    intra_op_threads: Optional[int] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Keyword arguments for ``backend``'s constructor: ``extra`` plus the onnxruntime-only settings
    (``providers``, ``intra_op_threads``), which other backends refuse."""
    options: Dict[str, Any] = dict(extra or {})
    if backend == "onnxruntime":
        options.update(providers=providers, intra_op_threads=intra_op_threads)
    elif providers is not None or intra_op_threads is not None:
        raise ValueError(f"providers and intra_op_threads are onnxruntime settings; backend {backend!r} takes "
                         "its settings through backend_options")
    return options


def open_graph(backend: str, path: Union[str, Path], options: Mapping[str, Any]) -> Backend:
    """Construct and activate ``backend`` on the graph at ``path``. A graph the backend cannot load is a
    :class:`BundleError` naming the file; a wrong provider or a missing package keeps its own message."""
    graph = get_backend_class(backend)(path, **options)
    try:
        graph.activate()
    except (ValueError, ImportError, NotImplementedError):
        raise  # a wrong provider / missing package: the message is already specific
    except Exception as e:  # onnxruntime raises its own exception types for invalid models
        raise BundleError(
            f"{graph.model_path}: the {backend} backend cannot load this graph ({e}). "
            "The file may be damaged, or need a newer onnxruntime (see the manifest's 'versions')."
        ) from e
    return graph


__all__ = [
    "Backend", "TensorInfo", "available_backends", "backend_options", "get_backend_class", "open_graph",
    "register_backend", "registered_backends",
]
