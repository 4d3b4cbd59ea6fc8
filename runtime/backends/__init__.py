"""Backends that run the bundle's graphs, by name. Each is imported only when asked for, so
``import ram_edge.runtime`` never imports onnxruntime, tensorrt or openvino.

:func:`resolve_backend` turns ``"auto"`` into a backend name for this machine."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple, Type, Union

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
    "openvino": (
        "ram_edge.runtime.backends.openvino", "OpenVINOBackend",
        "pip install 'ram-edge[openvino]'", ("openvino",),
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


def configure_backend(
    requested: str,
    providers: Optional[Sequence[Any]] = None,
    intra_op_threads: Optional[int] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Tuple[str, Dict[str, Any], str]:
    """(backend name, keyword arguments for its constructor, why it was chosen) for ``requested`` (a
    registered name or ``"auto"``, see :func:`resolve_backend`): ``extra`` over auto's defaults, plus the
    onnxruntime-only settings ``providers`` / ``intra_op_threads``, which other backends refuse."""
    backend, auto_options, reason = resolve_backend(requested)
    options: Dict[str, Any] = {**auto_options, **dict(extra or {})}
    if backend == "onnxruntime":
        options.update({k: v for k, v in (("providers", providers), ("intra_op_threads", intra_op_threads))
                        if v is not None})
    elif providers is not None or intra_op_threads is not None:
        raise ValueError(f"providers and intra_op_threads are onnxruntime settings; backend {backend!r} takes "
                         "its settings through backend_options")
    return backend, options, reason


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
            f"The file may be damaged, or need a newer {backend} (see the manifest's 'versions')."
        ) from e
    return graph


# ------------------------------------------------------------------------------------------------------
# backend="auto"

AUTO = "auto"
_X86 = frozenset({"x86_64", "amd64", "x64", "i386", "i686", "x86"})


def cuda_gpu_present() -> bool:
    """An NVIDIA GPU device node exists (``/dev/nvidia0``..., or Jetson's ``/dev/nvhost-ctrl-gpu``) and
    ``CUDA_VISIBLE_DEVICES`` does not hide every GPU. A file lookup: no CUDA library is loaded, so this costs
    nothing on a CPU machine; whether the driver works is for the chosen backend to find out."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/nvhost-ctrl-gpu")


@dataclass(frozen=True)
class MachineInfo:
    """What ``backend="auto"`` decides on. :meth:`detect` looks at this machine; tests build one.

    installed:     registered backends whose modules are installed (:func:`available_backends`).
    cuda_gpu:      :func:`cuda_gpu_present`.
    ort_providers: onnxruntime's available execution providers (looked up only where there is a GPU,
                   to import onnxruntime only when its answer matters).
    arch:          ``platform.machine()``.
    """

    installed: FrozenSet[str]
    cuda_gpu: bool
    ort_providers: Tuple[str, ...]
    arch: str

    @classmethod
    def detect(cls) -> "MachineInfo":
        installed = frozenset(available_backends())
        gpu = cuda_gpu_present()
        providers: Tuple[str, ...] = ()
        if gpu and "onnxruntime" in installed:
            import onnxruntime

            providers = tuple(onnxruntime.get_available_providers())
        return cls(installed, gpu, providers, platform.machine())

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in _X86


def resolve_backend(
    name: str = AUTO, machine: Optional[MachineInfo] = None
) -> Tuple[str, Dict[str, Any], str]:
    """(backend name, its options, why). ``"auto"``, in this order: TensorRT where tensorrt and polygraphy
    are installed and an NVIDIA GPU is present; onnxruntime on CUDA where its CUDAExecutionProvider is
    available and a GPU is present; OpenVINO on an x86 CPU where openvino is installed; onnxruntime on CPU.
    Any other registered name is returned as it is. ``machine``: what to decide on (default: this one)."""
    if name != AUTO:
        if name not in _REGISTRY:
            raise ValueError(f"unknown backend {name!r}; choose {AUTO!r} or one of {', '.join(_REGISTRY)}")
        return name, {}, f"backend {name!r} was asked for"
    m = machine if machine is not None else MachineInfo.detect()
    gpu = "an NVIDIA GPU is present" if m.cuda_gpu else "no NVIDIA GPU"
    if m.cuda_gpu and "tensorrt" in m.installed:
        return "tensorrt", {}, f"{gpu} and tensorrt + polygraphy are installed"
    if m.cuda_gpu and "CUDAExecutionProvider" in m.ort_providers:
        why = f"{gpu} and onnxruntime has the CUDAExecutionProvider (tensorrt + polygraphy: not installed)"
        return "onnxruntime", {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}, why
    if m.cuda_gpu:
        gpu += " but neither tensorrt nor onnxruntime-gpu is installed"
    if m.is_x86 and "openvino" in m.installed:
        return "openvino", {}, f"{gpu}; openvino is installed and this CPU is {m.arch}"
    cpu = (f"openvino is not installed ({_REGISTRY['openvino'][2]})" if m.is_x86
           else f"this CPU is {m.arch}, not x86 (OpenVINO is picked on x86 only)")
    return "onnxruntime", {"providers": ["CPUExecutionProvider"]}, f"{gpu}; {cpu}"


__all__ = [
    "AUTO", "Backend", "MachineInfo", "TensorInfo", "available_backends", "configure_backend", "cuda_gpu_present",
    "get_backend_class", "open_graph", "register_backend", "registered_backends", "resolve_backend",
]
