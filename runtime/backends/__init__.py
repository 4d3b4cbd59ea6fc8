"""Backends that run the bundle's graphs, by name. Each is imported only when asked for, so
``import ram_edge.runtime`` never imports onnxruntime or tensorrt."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple, Type

from .base import Backend, TensorInfo

# name -> (module, class, how to install it). A TensorRT runner will register here behind the same
# interface.
_REGISTRY: Dict[str, Tuple[str, str, str]] = {
    "onnxruntime": (
        "ram_edge.runtime.backends.onnxruntime", "OnnxRuntimeBackend",
        "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)",
    ),
    "tensorrt": (
        "ram_edge.runtime.backends.tensorrt", "TensorRTBackend",
        "pip install 'ram-edge[trt]' on a machine with an NVIDIA GPU",
    ),
}


def available_backends() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend_class(name: str) -> Type[Backend]:
    """The Backend subclass registered as ``name``; a clear error when unknown, unimplemented or missing."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}")
    module_name, class_name, install = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise NotImplementedError(
                f"backend {name!r} is not implemented in this version of ram-edge; use backend='onnxruntime'"
            ) from None
        raise ImportError(f"backend {name!r} needs the module {e.name!r}: {install}") from e
    return getattr(module, class_name)


def register_backend(name: str, module: str, class_name: str, install_hint: str = "") -> None:
    """Add a backend (e.g. from a plugin package); it is imported on first use."""
    _REGISTRY[name] = (module, class_name, install_hint)


__all__ = ["Backend", "TensorInfo", "available_backends", "get_backend_class", "register_backend"]
