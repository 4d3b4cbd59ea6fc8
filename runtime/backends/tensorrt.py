"""TensorRT backend: builds (or loads from a cache) an engine for one graph of a bundle and runs it.

``tensorrt`` and ``polygraphy`` are imported in ``activate``, never at module import, so this module imports
on any machine. The module has two halves:

* pure logic, testable without a GPU: :class:`TensorRTOptions` (with the ``RAM_EDGE_TRT_*`` environment
  variables), :func:`plan_build` (optimization profile and builder flags from the bundle's manifest),
  :func:`cache_key` / :func:`engine_file_name`, :func:`check_shape` (a shape against the engine's profile,
  with errors that say how to rebuild), :func:`numpy_dtype` / :func:`prepare_input` (TensorRT <-> numpy
  dtypes, the bool mask);
* :class:`TensorRTBackend`, the GPU half: engine build through Polygraphy's loaders, engine cache,
  Polygraphy's ``TrtRunner`` for inference, constant inputs (the vocabulary) kept in device memory.

The engine's input shapes: ``batch`` 1..max_batch (opt ``min(16, max_batch)``, ram-tag's default batch),
``tags`` 1..max_tags (opt = the bundle's vocabulary size, max ``max(that, 20000)``), ``descriptions``
1..max(the bundle's D, max_descriptions) (opt = the bundle's D). Every other dimension is fixed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .base import Backend, TensorInfo
from .common import cache_file_name, digest, prepare_input, user_cache_dir, write_cache_entry, writable_dir

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'ram-edge[trt]' on a machine with an NVIDIA GPU; on Jetson use the JetPack TensorRT "
    "(sudo apt install python3-libnvinfer, then create the venv with --system-site-packages) and "
    "pip install polygraphy"
)

#: Symbolic dimension names of the bundle's graphs (docs/bundle.md) -> the option that sets their maximum.
DYNAMIC_DIMS = {"batch": "max_batch", "tags": "max_tags", "descriptions": "max_descriptions"}

#: The default maximum number of tags of a decoder engine (unless the bundle's vocabulary is larger).
DEFAULT_MAX_TAGS = 20000
#: The default opt batch: ram-tag's default --batch-size.
DEFAULT_OPT_BATCH = 16
#: Bumped when the engine file layout or the key's content changes.
CACHE_FORMAT = 1

_ENV_PREFIX = "RAM_EDGE_TRT_"


class TensorRTUnavailableError(ImportError):
    """The TensorRT backend cannot run on this machine (package missing, no CUDA device / runtime).

    An ``ImportError`` so that callers that already handle a missing backend package (``Tagger``,
    ``ram-tag``) report it as is."""


# ------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class TensorRTOptions:
    """How engines are built. ``None`` means the default derived from the bundle's manifest.

    max_batch:        largest batch (default: the manifest's ``max_batch``).
    opt_batch:        the batch TensorRT tunes kernels for (default ``min(16, max_batch)``).
    max_tags:         largest vocabulary of the decoder (default ``max(bundle's num_tags, 20000)``).
    max_descriptions: descriptions per tag; the engine takes ``max(bundle's D, this)``.
    fp16:             allow fp16 kernels (default: on for fp16 / int8 bundles, off for fp32).
    tf32:             allow TF32 kernels for float32 layers (default off: fp32 bundles stay fp32-exact).
    workspace_mb:     builder workspace limit (default: TensorRT's, all device memory).
    builder_optimization_level: 0..5 (default: TensorRT's, 3).
    cache_dir:        where engines are kept (default ``<bundle>/trt_cache``, else
                      ``$XDG_CACHE_HOME/ram-edge/tensorrt`` when the bundle folder is read-only).
    allocation:       activation memory: "static" (for the profile's max shapes), "profile", or "runtime"
                      (for the current shapes; default where TensorRT >= 10.1 supports it).

    Every option can also be set with an environment variable ``RAM_EDGE_TRT_<NAME>`` (e.g.
    ``RAM_EDGE_TRT_MAX_TAGS=30000``), which is how ``Tagger(..., backend="tensorrt")`` and ``ram-tag`` are
    configured; explicit arguments win over the environment.
    """

    max_batch: Optional[int] = None
    opt_batch: Optional[int] = None
    max_tags: Optional[int] = None
    max_descriptions: Optional[int] = None
    fp16: Optional[bool] = None
    tf32: bool = False
    workspace_mb: Optional[int] = None
    builder_optimization_level: Optional[int] = None
    cache_dir: Optional[str] = None
    allocation: Optional[str] = None

    def __post_init__(self):
        for name in ("max_batch", "opt_batch", "max_tags", "max_descriptions", "workspace_mb"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TensorRT option {name} must be a positive integer or None, got {value!r}")
        level = self.builder_optimization_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5):
            raise ValueError(f"TensorRT option builder_optimization_level must be 0..5 or None, got {level!r}")
        if self.allocation not in (None, "static", "profile", "runtime"):
            raise ValueError(
                f"TensorRT option allocation must be 'static', 'profile', 'runtime' or None, got {self.allocation!r}"
            )

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> "TensorRTOptions":
        """Options from ``RAM_EDGE_TRT_*`` variables, then ``overrides`` (those not None) on top."""
        environ = os.environ if environ is None else environ
        values: Dict[str, Any] = {}
        for f in fields(cls):
            var = _ENV_PREFIX + f.name.upper()
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            if f.name in ("fp16", "tf32"):
                if raw.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"{var}={raw!r}: expected 1 or 0")
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.name in ("cache_dir", "allocation"):
                values[f.name] = raw
            else:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r}: expected an integer") from None
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown TensorRT option(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "cache_dir" in values and values["cache_dir"] is not None:
            values["cache_dir"] = str(values["cache_dir"])
        return cls(**values)


# ------------------------------------------------------------------------------------------------------
# Profiles and build plan (pure)


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one input in an optimization profile."""

    min: Tuple[int, ...]
    opt: Tuple[int, ...]
    max: Tuple[int, ...]

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max shapes differ in rank: {self.min}, {self.opt}, {self.max}")
        if not all(1 <= a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise ValueError(f"profile shapes must satisfy 1 <= min <= opt <= max: {self.min}, {self.opt}, {self.max}")

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(a <= s <= c for a, s, c in zip(self.min, shape, self.max))

    def as_lists(self) -> list:
        return [list(self.min), list(self.opt), list(self.max)]


@dataclass(frozen=True)
class BuildPlan:
    """Everything an engine build depends on besides the ONNX file, TensorRT and the GPU."""

    graph_file: str
    role: str                                     # "encoder" | "decoder"
    precision: str
    profile: Dict[str, ShapeRange]
    dim_names: Dict[str, Tuple[Union[int, str], ...]]   # input -> the manifest's dims ("batch", 145, ...)
    flags: Tuple[str, ...]                        # sorted subset of ("fp16", "int8", "tf32")
    workspace_mb: Optional[int] = None
    builder_optimization_level: Optional[int] = None

    def key_material(self) -> Dict[str, Any]:
        """The build settings as they enter the cache key."""
        return {
            "profile": {name: r.as_lists() for name, r in sorted(self.profile.items())},
            "flags": list(self.flags),
            "workspace_mb": self.workspace_mb,
            "builder_optimization_level": self.builder_optimization_level,
        }


def dimension_ranges(manifest: Mapping[str, Any], options: TensorRTOptions) -> Dict[str, Tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dimension, from the manifest and the options."""
    vocab = manifest.get("vocabulary") or {}
    default_tags = int(vocab.get("num_tags") or 1)
    default_desc = int(vocab.get("max_descriptions") or 1)
    max_batch = options.max_batch or int(manifest.get("max_batch") or 32)
    opt_batch = min(options.opt_batch or DEFAULT_OPT_BATCH, max_batch)
    max_tags = options.max_tags or max(default_tags, DEFAULT_MAX_TAGS)
    max_desc = max(default_desc, options.max_descriptions or default_desc)
    return {
        "batch": (1, opt_batch, max_batch),
        "tags": (1, min(default_tags, max_tags), max_tags),
        "descriptions": (1, default_desc, max_desc),
    }


def plan_build(manifest: Mapping[str, Any], graph_file: str, options: TensorRTOptions) -> BuildPlan:
    """The optimization profile and flags for ``graph_file`` (a file named in the manifest's ``graphs``)."""
    graphs = manifest.get("graphs") or {}
    role = next((r for r, g in graphs.items() if isinstance(g, Mapping) and g.get("file") == graph_file), None)
    if role is None:
        raise ValueError(
            f"{graph_file}: not a graph of this bundle's manifest (graphs: "
            f"{sorted(g.get('file') for g in graphs.values() if isinstance(g, Mapping))})"
        )
    ranges = dimension_ranges(manifest, options)
    profile: Dict[str, ShapeRange] = {}
    dim_names: Dict[str, Tuple[Union[int, str], ...]] = {}
    for tensor in graphs[role].get("inputs") or []:
        name, dims = tensor["name"], tuple(tensor["shape"])
        lo, opt, hi = [], [], []
        for d in dims:
            if isinstance(d, int) and not isinstance(d, bool) and d > 0:
                lo.append(d), opt.append(d), hi.append(d)
            elif d in ranges:
                a, b, c = ranges[d]
                lo.append(a), opt.append(b), hi.append(c)
            else:
                raise ValueError(
                    f"{graph_file}: input {name} has dimension {d!r}, which the TensorRT backend cannot size "
                    f"(known symbolic dimensions: {', '.join(DYNAMIC_DIMS)}). Re-run `ram-export`."
                )
        profile[name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
        dim_names[name] = dims
    precision = str(manifest.get("precision", "fp32"))
    if precision == "int8-dynamic":
        # MatMulInteger / DynamicQuantizeLinear: onnxruntime's CPU fast path, not a TensorRT graph.
        raise ValueError(
            f"{graph_file}: an int8-dynamic bundle is for onnxruntime on CPU; for TensorRT export an fp16 or "
            "fp32 bundle (`ram-export --precision fp16`)"
        )
    fp16 = options.fp16 if options.fp16 is not None else precision in ("fp16", "int8")
    flags = [flag for flag, on in (("fp16", fp16), ("int8", precision == "int8"), ("tf32", options.tf32)) if on]
    return BuildPlan(
        graph_file=graph_file, role=role, precision=precision, profile=profile, dim_names=dim_names,
        flags=tuple(sorted(flags)), workspace_mb=options.workspace_mb,
        builder_optimization_level=options.builder_optimization_level,
    )


def cache_key(onnx_sha256: str, tensorrt_version: str, gpu: str, plan: BuildPlan) -> str:
    """sha256 over everything the serialized engine depends on. An engine is only valid for the TensorRT
    version and GPU model that built it, so both are part of the key."""
    material = {
        "cache_format": CACHE_FORMAT,
        "onnx_sha256": onnx_sha256,
        "tensorrt": tensorrt_version,
        "gpu": gpu,
        **plan.key_material(),
    }
    return digest(material)


def engine_file_name(graph_file: str, key: str) -> str:
    return cache_file_name(graph_file, key, ".engine")


# ------------------------------------------------------------------------------------------------------
# Shapes and dtypes (pure)


def check_shape(name: str, shape: Sequence[int], shape_range: ShapeRange, dims: Sequence[Union[int, str]],
                graph_file: str) -> None:
    """Raise ValueError, saying what to do, when ``shape`` is outside the engine's profile for ``name``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(shape_range.max):
        raise ValueError(
            f"{graph_file}: input {name} must have {len(shape_range.max)} dimensions "
            f"{tuple(dims)}, got shape {shape}"
        )
    for i, (s, lo, hi) in enumerate(zip(shape, shape_range.min, shape_range.max)):
        if lo <= s <= hi:
            continue
        dim = dims[i] if i < len(dims) else i
        if lo == hi:
            raise ValueError(f"{graph_file}: input {name} needs dimension {i} = {lo}, got shape {shape}")
        if s < lo:
            raise ValueError(f"{graph_file}: input {name} has {dim} = {s}; it must be at least {lo} (shape {shape})")
        option = DYNAMIC_DIMS.get(str(dim))
        what = {"tags": f"the vocabulary has {s} tags", "descriptions": f"the vocabulary has up to {s} "
                "descriptions per tag", "batch": f"a batch of {s} images"}.get(str(dim), f"{dim} = {s}")
        advice = (
            f"Rebuild the engine with a larger maximum: TensorRTBackend(..., {option}={s}) or "
            f"{_ENV_PREFIX}{option.upper()}={s} in the environment before creating the Tagger (the new engine "
            "is built once, minutes, and cached beside the old one)"
            if option else "Re-export the bundle"
        )
        if dim == "batch":
            advice += "; or pass smaller batches (ram-tag --batch-size)"
        raise ValueError(
            f"{graph_file}: {what}, but this TensorRT engine was built for at most {hi} ({name} profile "
            f"{shape_range.min}..{shape_range.max}). {advice}."
        )


#: TensorRT DataType member names -> numpy dtypes (those a bundle's graphs can have at their I/O).
_TRT_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,  # TensorRT BOOL is one byte, 0 = false, 1 = true: numpy's bool_ layout
}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a ``tensorrt.DataType`` (or its member name, e.g. "BOOL")."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", None) or str(trt_dtype)
    name = name.rsplit(".", 1)[-1].upper()
    if name not in _TRT_NUMPY:
        raise TypeError(f"TensorRT data type {name} has no numpy equivalent supported by ram-edge")
    return np.dtype(_TRT_NUMPY[name])


# ------------------------------------------------------------------------------------------------------
# Environment (imports, CUDA device)


def import_tensorrt():
    """(tensorrt, polygraphy.backend.trt) or :class:`TensorRTUnavailableError` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:  # includes a tensorrt whose libnvinfer cannot be loaded
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs the Python package 'tensorrt' (>= 10), which cannot be imported ({e}). "
            f"{INSTALL_HINT}."
        ) from e
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs tensorrt >= 10, this is {getattr(trt, '__version__', '?')}. {INSTALL_HINT}."
        )
    try:
        import polygraphy.backend.trt as poly_trt
    except ImportError as e:
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs 'polygraphy' (pip install polygraphy) ({e}). {INSTALL_HINT}."
        ) from e
    return trt, poly_trt


def cuda_device(index: int = 0) -> str:
    """'<name> (sm_XY)' of CUDA device ``index``; :class:`TensorRTUnavailableError` when there is none."""
    try:
        from polygraphy import cuda

        lib = cuda.wrapper().handle
    except Exception as e:  # libcudart not found / not loadable
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs the CUDA runtime library (libcudart), which cannot be loaded ({e}). "
            "Install the CUDA toolkit, or pip install nvidia-cuda-runtime-cu12, or on Jetson use JetPack's CUDA."
        ) from e
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value <= index:
        reason = f"cudaGetDeviceCount returned error {status}" if status else f"{count.value} CUDA device(s)"
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs an NVIDIA GPU, but no CUDA device {index} is usable ({reason}; check "
            "nvidia-smi, the driver and CUDA_VISIBLE_DEVICES). Use backend='onnxruntime' on this machine."
        )
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, index)  # cudaDevAttrComputeCapabilityMajor
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, index)  # cudaDevAttrComputeCapabilityMinor
    props = ctypes.create_string_buffer(16384)  # cudaDeviceProp (about 1 KB); `name` is its first field
    name = "unknown GPU"
    if lib.cudaGetDeviceProperties(props, index) == 0:
        name = props.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace") or name
    return f"{name} (sm_{major.value}{minor.value})"


def default_cache_dir(bundle_dir: Path) -> Path:
    return bundle_dir / "trt_cache"


def _read_manifest_beside(model_path: Path) -> Dict[str, Any]:
    from ram_edge.bundle_format import read_manifest

    return read_manifest(model_path.parent)


# ------------------------------------------------------------------------------------------------------
# The backend


class TensorRTBackend(Backend):
    """One TensorRT engine for one graph of a bundle.

    model_path: ``<bundle>/encoder.onnx`` or ``<bundle>/decoder.onnx``; the profile comes from
                ``<bundle>/manifest.json`` (or ``manifest=``).
    options:    a :class:`TensorRTOptions`; or its fields as keyword arguments. Unset fields come from the
                ``RAM_EDGE_TRT_*`` environment variables, then the manifest.
    device:     CUDA device index (the engine is built for and runs on that GPU).

    ``activate`` loads the cached engine when the key (sha256 of the ONNX file, TensorRT version, GPU,
    profile, flags) matches, else builds it (seconds for small graphs, minutes for Swin-L, longer on Jetson)
    and caches it. ``infer`` is serialised by a lock (one execution context per graph).
    """

    name = "tensorrt"

    def __init__(
        self,
        model_path,
        options: Optional[TensorRTOptions] = None,
        *,
        manifest: Optional[Mapping[str, Any]] = None,
        device: int = 0,
        **option_fields: Any,
    ):
        super().__init__(model_path)
        if options is not None and option_fields:
            raise TypeError("pass either options= or option keyword arguments, not both")
        self.options = options if options is not None else TensorRTOptions.from_env(**option_fields)
        self._manifest = dict(manifest) if manifest is not None else None
        self.device_index = int(device)
        self.plan: Optional[BuildPlan] = None
        self.engine_path: Optional[Path] = None
        self.loaded_from_cache = False
        self.gpu: Optional[str] = None
        self._trt = None
        self._engine = None
        self._runner = None
        self._ranges: Dict[str, ShapeRange] = {}
        self._device_constants: List[Dict[str, Any]] = []  # per chunk
        self._lock = threading.Lock()

    # -- life cycle ----------------------------------------------------------------------------------
    def _activate(self) -> None:
        trt, poly_trt = import_tensorrt()
        self._trt = trt
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no such ONNX file")
        manifest = self._manifest if self._manifest is not None else _read_manifest_beside(self.model_path)
        self.plan = plan_build(manifest, self.model_path.name, self.options)
        self.gpu = cuda_device(self.device_index)
        self._bind_device()

        from ram_edge.bundle_format import sha256_file

        key = cache_key(sha256_file(self.model_path), trt.__version__, self.gpu, self.plan)
        self._engine = self._load_or_build(trt, poly_trt, key)
        self._read_engine_io(trt)
        allocation = self.options.allocation
        if allocation is None:
            allocation = "runtime" if hasattr(trt.IExecutionContext, "update_device_memory_size_for_shapes") else "static"
        self._runner = poly_trt.TrtRunner(self._engine, allocation_strategy=allocation)
        self._runner.activate()

    def _bind_device(self) -> None:
        """Make this backend's GPU current for the calling thread (CUDA's current device is per thread)."""
        if self.device_index != 0:
            from polygraphy import cuda

            cuda.wrapper().handle.cudaSetDevice(self.device_index)

    def _deactivate(self) -> None:
        self._bind_device()
        self._free_device_constants()
        self._constants = {}
        if self._runner is not None:
            try:
                self._runner.deactivate()
            finally:
                self._runner = None
        self._engine = None

    def _cache_dir(self) -> Optional[Path]:
        if self.options.cache_dir:
            path = Path(self.options.cache_dir).expanduser()
            if not writable_dir(path):
                raise ValueError(f"TensorRT cache_dir {path} is not a writable folder")
            return path
        for path in (default_cache_dir(self.model_path.parent), user_cache_dir("tensorrt")):
            if writable_dir(path):
                return path
        logger.warning("no writable folder for the TensorRT engine cache; the engine will be rebuilt next time")
        return None

    def _load_or_build(self, trt, poly_trt, key: str):
        cache_dir = self._cache_dir()
        path = cache_dir / engine_file_name(self.plan.graph_file, key) if cache_dir else None
        self.engine_path = path
        if path is not None and path.is_file():
            try:
                engine = poly_trt.engine_from_bytes(path.read_bytes())
                self.loaded_from_cache = True
                logger.info("%s: loaded TensorRT engine %s", self.model_path.name, path)
                return engine
            except Exception as e:  # corrupt or written by an incompatible build: rebuild it
                logger.warning("%s: cached engine %s unusable (%s); rebuilding", self.model_path.name, path, e)
        logger.warning(
            "%s: building a TensorRT engine for %s (flags: %s, profile: %s); this takes a while once, then it "
            "is cached%s", self.model_path.name, self.gpu, ",".join(self.plan.flags) or "fp32",
            {n: r.as_lists() for n, r in self.plan.profile.items()}, f" in {path}" if path else "",
        )
        serialized = self._build(trt, poly_trt)
        if path is not None:
            meta = {"key": key, "onnx": str(self.model_path), "gpu": self.gpu, "tensorrt": trt.__version__,
                    **self.plan.key_material()}
            write_cache_entry(path, serialized, meta)
        self.loaded_from_cache = False
        return poly_trt.engine_from_bytes(serialized)

    def _build(self, trt, poly_trt):
        plan = self.plan
        profile = poly_trt.Profile()
        for name, r in plan.profile.items():
            profile.add(name, min=r.min, opt=r.opt, max=r.max)
        config_args: Dict[str, Any] = dict(
            profiles=[profile], fp16="fp16" in plan.flags, int8="int8" in plan.flags, tf32="tf32" in plan.flags,
        )
        if plan.workspace_mb is not None:
            config_args["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: plan.workspace_mb << 20}
        if plan.builder_optimization_level is not None:
            config_args["builder_optimization_level"] = plan.builder_optimization_level
        try:
            network = poly_trt.network_from_onnx_path(str(self.model_path))
            serialized = poly_trt.engine_bytes_from_network(network, config=poly_trt.CreateConfig(**config_args))
        except Exception as e:
            raise RuntimeError(f"TensorRT could not build an engine from {self.model_path}: {e}") from e
        if serialized is None:
            raise RuntimeError(f"TensorRT could not build an engine from {self.model_path} (see its log above)")
        return bytes(memoryview(serialized))

    def _read_engine_io(self, trt) -> None:
        engine = self._engine
        inputs, outputs, ranges = [], [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = self.plan.dim_names.get(name, ())
            shape = tuple(
                (dims[j] if j < len(dims) and isinstance(dims[j], str) else None) if d < 0 else int(d)
                for j, d in enumerate(engine.get_tensor_shape(name))
            )
            info = TensorInfo(name, shape, numpy_dtype(engine.get_tensor_dtype(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(info)
                lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
                ranges[name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
            else:
                outputs.append(info)
        self._inputs, self._outputs, self._ranges = tuple(inputs), tuple(outputs), ranges

    # -- metadata ------------------------------------------------------------------------------------
    @property
    def profile(self) -> Dict[str, ShapeRange]:
        """The engine's optimization profile (as built), by input name."""
        self._require_active()
        return dict(self._ranges)

    @property
    def device(self) -> str:
        return "cuda"

    # -- inference -----------------------------------------------------------------------------------
    def _prepare(self, feeds: Mapping[str, Any], check: bool = True) -> Dict[str, np.ndarray]:
        """Known names, the engine's dtypes, and (with ``check``) shapes inside the profile."""
        by_name = {t.name: t for t in self._inputs}
        prepared = {}
        for name, array in feeds.items():
            if name not in by_name:
                raise KeyError(f"{self.model_path.name}: has no input {name!r} (inputs: {sorted(by_name)})")
            array = prepare_input(name, array, by_name[name].dtype)
            if check:
                check_shape(name, array.shape, self._ranges[name], self.plan.dim_names.get(name, ()), self.model_path.name)
            prepared[name] = array
        return prepared

    def set_constant_inputs(self, feeds: Mapping[str, np.ndarray],
                            chunks: Optional[Sequence[Tuple[int, int]]] = None) -> None:
        """Validate against the engine's profile first (a too large vocabulary leaves the old one in place;
        with chunks, each chunk must fit the profile, the whole vocabulary need not), then upload once to
        device memory."""
        self._require_active()
        prepared = self._prepare(feeds, check=chunks is None)
        for start, stop in chunks or ():
            self._prepare({name: array[start:stop] for name, array in prepared.items()})
        with self._lock:
            super().set_constant_inputs(prepared, chunks)

    def _on_constants_changed(self) -> None:
        from polygraphy import cuda
        from polygraphy.datatype import DataType

        self._bind_device()
        self._free_device_constants()
        uploaded: List[Dict[str, Any]] = []
        try:
            for chunk in range(self.num_chunks):
                buffers: Dict[str, Any] = {}
                uploaded.append(buffers)
                for name, array in self.constant_feeds(chunk if self._chunks else None).items():
                    array = np.ascontiguousarray(array)
                    buffer = cuda.DeviceArray(shape=array.shape, dtype=DataType.from_dtype(array.dtype))
                    buffers[name] = buffer
                    buffer.copy_from(array)  # synchronous
        except BaseException:
            for buffers in uploaded:
                for buffer in buffers.values():
                    buffer.free()
            self._constants = {}
            raise
        self._device_constants = uploaded

    def _free_device_constants(self) -> None:
        constants, self._device_constants = self._device_constants, []
        for buffers in constants:
            for buffer in buffers.values():
                buffer.free()

    def _infer(self, feeds: Mapping[str, np.ndarray], chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
        prepared = self._prepare(feeds)
        with self._lock:
            self._bind_device()
            resident = self._device_constants[chunk or 0] if self._device_constants else {}
            feed_dict: Dict[str, Any] = {name: buffer for name, buffer in resident.items() if name not in prepared}
            feed_dict.update(prepared)
            outputs = self._runner.infer(feed_dict, check_inputs=False)
            # The runner reuses its host buffers on the next call: copy out, as float32.
            result = {}
            for name, value in outputs.items():
                value = np.asarray(value)
                dtype = np.float32 if np.issubdtype(value.dtype, np.floating) else value.dtype
                result[name] = np.array(value, dtype=dtype, copy=True)
            return result


__all__ = [
    "BuildPlan", "ShapeRange", "TensorRTBackend", "TensorRTOptions", "TensorRTUnavailableError", "cache_key",
    "check_shape", "cuda_device", "dimension_ranges", "engine_file_name", "import_tensorrt", "numpy_dtype",
    "plan_build", "prepare_input",
]
