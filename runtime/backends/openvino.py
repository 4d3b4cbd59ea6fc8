"""OpenVINO backend: the bundle's ONNX graphs compiled by OpenVINO's CPU plugin (x86 CPUs).

``openvino`` is imported in ``activate``, never at module import. Like the TensorRT backend the module has
a pure half, testable without OpenVINO -- :class:`OpenVINOOptions`, :func:`read_cpu_info` (model name and
ISA flags from ``/proc/cpuinfo``), :func:`choose_precision` (f32 or bf16, and why), :func:`cache_key` --
and :class:`OpenVINOBackend`, which reads ``encoder.onnx`` / ``decoder.onnx`` as they are
(``Core.read_model`` on the file: no conversion step, no IR on disk, dynamic axes stay dynamic),
compiles it, caches the compiled model, and runs it.

Compiled-model cache: OpenVINO's ``CompiledModel.export_model`` / ``Core.import_model``, in files named by
our own key (sha256 of the ONNX file, the OpenVINO build, the CPU's model name and ISA flags as OpenVINO
and ``/proc/cpuinfo`` report them, and every compile option), the same layout as the TensorRT engine
cache (:mod:`.common`). OpenVINO's ``CACHE_DIR`` would hash the model itself but keeps its key implicit;
with an explicit key a new OpenVINO build, another CPU or another precision can never pick up a blob
compiled for something else, and each blob has a ``.json`` saying what it was compiled for.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .base import Backend, TensorInfo
from .common import cache_file_name, digest, prepare_input, user_cache_dir, write_cache_entry, writable_dir

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ram-edge[openvino]'"
#: The oldest OpenVINO this backend is written for (the Python API of 2024.0: ``openvino.Core``,
#: ``import_model`` from bytes, ``InferRequest.infer(share_inputs=...)``).
MIN_OPENVINO = (2024, 0)
#: openvino before 2024.4 declares numpy<2; run with numpy 2 anyway (pip upgrades numpy for another
#: package) its tensors read garbage: logits of NaN and 1e32 measured with 2024.0 + numpy 2.4.
FIRST_NUMPY2_OPENVINO = (2024, 4)

PRECISIONS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
#: /proc/cpuinfo flags that mean the CPU computes bf16 natively (AVX-512 BF16: Cooper Lake, Zen 4+;
#: AMX: Sapphire Rapids+). Without them OpenVINO's CPU plugin compiles an f32 model even when bf16 is asked.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The ISA flags that decide which kernels OpenVINO's CPU plugin compiles: part of the cache key, so a blob
#: never moves to a CPU that lacks (or has more of) them. Model names alone are not enough: VMs often
#: report a generic "AMD EPYC" or "Intel Xeon Processor".
CPU_KEY_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "avx_ne_convert",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)
#: Bumped when the blob file layout or the key's content changes.
CACHE_FORMAT = 1
BLOB_SUFFIX = ".blob"


class OpenVINOUnavailableError(ImportError):
    """openvino is missing or too old. An ``ImportError``, which ``Tagger`` and ``ram-tag`` report as is."""


# ------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class OpenVINOOptions:
    """How a graph is compiled and run.

    device:              an OpenVINO device name; "CPU" (the one this backend is made and tested for).
    inference_precision: "f32", "bf16", or None: bf16 where the CPU computes it natively (AVX-512 BF16 or
                         AMX; about 2x faster than f32 for Swin-L, logits within ~0.06), else f32.
    performance_hint:    "LATENCY" (default: one stream using every core for each call, what a Tagger
                         with one caller wants) or "THROUGHPUT" (several streams; parallel calls from
                         several threads run side by side).
    num_threads:         threads OpenVINO uses in total (INFERENCE_NUM_THREADS); None: one per core.
    cache_dir:           where compiled models are kept: True (default) for ``$XDG_CACHE_HOME/ram-edge/
                         openvino`` (``~/.cache/ram-edge/openvino``), a folder, or None / False for no cache.
    """

    device: str = "CPU"
    inference_precision: Optional[str] = None
    performance_hint: str = "LATENCY"
    num_threads: Optional[int] = None
    cache_dir: Union[str, os.PathLike, bool, None] = True

    def __post_init__(self):
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"OpenVINO option device must be a device name such as 'CPU', got {self.device!r}")
        if self.inference_precision not in (None,) + PRECISIONS:
            raise ValueError(
                f"OpenVINO option inference_precision must be 'f32', 'bf16' or None (bf16 where the CPU has "
                f"it natively), got {self.inference_precision!r}"
            )
        hint = self.performance_hint
        if not isinstance(hint, str) or hint.upper() not in PERFORMANCE_HINTS:
            raise ValueError(f"OpenVINO option performance_hint must be 'LATENCY' or 'THROUGHPUT', got {hint!r}")
        object.__setattr__(self, "performance_hint", hint.upper())
        n = self.num_threads
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"OpenVINO option num_threads must be a positive integer or None, got {n!r}")
        cache = self.cache_dir
        if not (cache is None or isinstance(cache, (bool, str, os.PathLike))) or cache == "":
            raise ValueError(
                f"OpenVINO option cache_dir must be a folder, True (the default folder) or None / False (no "
                f"cache), got {cache!r}"
            )

    def resolved_cache_dir(self) -> Optional[Path]:
        """The cache folder these options name, or None when caching is off."""
        if self.cache_dir is None or self.cache_dir is False:
            return None
        if self.cache_dir is True:
            return user_cache_dir("openvino")
        return Path(self.cache_dir).expanduser()


# ------------------------------------------------------------------------------------------------------
# The CPU and the precision (pure)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as ``/proc/cpuinfo`` describes it: model name and ISA flags."""

    model: str
    flags: FrozenSet[str]

    def key_material(self) -> Dict[str, Any]:
        return {"model": self.model, "flags": sorted(self.flags & set(CPU_KEY_FLAGS))}


def read_cpu_info(cpuinfo: Optional[str] = None) -> CpuInfo:
    """Parse ``cpuinfo`` (the text of ``/proc/cpuinfo``; read from the file when None). Without that file
    (not Linux) the model is ``platform.processor()`` and the flags are unknown (empty)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", flags)


def choose_precision(
    requested: Optional[str], capabilities: Sequence[str], cpu_flags: FrozenSet[str]
) -> Tuple[str, str]:
    """(precision, why). ``capabilities``: the device's OPTIMIZATION_CAPABILITIES ("FP32", "BF16", ...);
    ``cpu_flags``: /proc/cpuinfo flags. With ``requested=None``, bf16 when either says the CPU computes
    bf16 natively (OpenVINO lists BF16 exactly then), else f32."""
    native = sorted(set(BF16_FLAGS) & set(cpu_flags))
    has_cap = "BF16" in {str(c).upper() for c in capabilities}
    evidence = ", ".join(
        ([f"OpenVINO lists BF16 among {'/'.join(capabilities)}"] if has_cap else [])
        + ([f"CPU flags {' '.join(native)}"] if native else [])
    )
    if requested is not None:
        if requested not in PRECISIONS:
            raise ValueError(f"inference_precision must be 'f32', 'bf16' or None, got {requested!r}")
        return requested, f"inference_precision={requested!r} was asked for"
    if has_cap or native:
        return "bf16", f"this CPU computes bf16 natively ({evidence}); pass inference_precision='f32' for exact f32"
    return "f32", (
        f"this CPU has no native bf16 (OpenVINO capabilities {'/'.join(capabilities) or 'unknown'}, "
        f"no {' / '.join(BF16_FLAGS)} flag)"
    )


def compile_config(options: OpenVINOOptions, precision: str) -> Dict[str, Any]:
    """The properties ``compile_model`` (and ``import_model``) get for ``options`` and the chosen precision."""
    config: Dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": options.performance_hint}
    if options.num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = options.num_threads
    if options.device == "CPU":
        # Flush denormals, as the onnxruntime sessions do (ram_edge.ort_tuning.SESSION_CONFIG: Swin's
        # shifted-window mask makes ~1e-44 softmax values, each a slow x86 microcode path); image_embeds
        # stay bit-identical on the tiny demo encoder.
        config["CPU_DENORMALS_OPTIMIZATION"] = True
    return config


def cache_key(onnx_sha256: str, openvino_version: str, device: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """sha256 over everything a compiled blob depends on: the graph, the OpenVINO build (blobs are not
    portable across versions), the device (name, OpenVINO's view of it, the CPU's model and ISA flags)
    and the compile configuration (precision, hint, threads)."""
    return digest({
        "cache_format": CACHE_FORMAT,
        "onnx_sha256": onnx_sha256,
        "openvino": openvino_version,
        "device": dict(device),
        "config": {k: str(v) for k, v in config.items()},
    })


def check_shape(graph_file: str, info: TensorInfo, shape: Sequence[int]) -> None:
    """ValueError naming the input when ``shape`` cannot fit ``info`` (rank, fixed dimensions): clearer
    than the CPU plugin's own message about memory descriptors."""
    shape = tuple(int(s) for s in shape)
    fixed = [(d, s) for d, s in zip(info.shape, shape) if isinstance(d, int)]
    if len(shape) != len(info.shape) or any(d != s for d, s in fixed):
        raise ValueError(f"{graph_file}: input {info.describe()} cannot take an array of shape {shape}")


# ------------------------------------------------------------------------------------------------------
# The backend


def import_openvino():
    """The ``openvino`` module, or :class:`OpenVINOUnavailableError` with the install hint."""
    try:
        import openvino as ov
    except ImportError as e:
        raise OpenVINOUnavailableError(
            f"the OpenVINO backend needs the package 'openvino', which cannot be imported ({e}): {INSTALL_HINT}"
        ) from e
    version = str(getattr(ov, "__version__", "0"))
    parts = version.split("-")[0].split(".")
    try:
        numbers = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
    except ValueError:
        numbers = MIN_OPENVINO  # a development build without a release number: let it try
    if numbers < MIN_OPENVINO:
        raise OpenVINOUnavailableError(
            f"the OpenVINO backend needs openvino >= {MIN_OPENVINO[0]}.{MIN_OPENVINO[1]}, this is {version}: "
            f"{INSTALL_HINT}"
        )
    if numbers < FIRST_NUMPY2_OPENVINO and int(np.__version__.split(".")[0]) >= 2:
        raise OpenVINOUnavailableError(
            f"openvino {version} is built for numpy 1 (it requires numpy<2) but numpy {np.__version__} is "
            "installed; together they return wrong numbers without an error. Install openvino>=2024.4 "
            "(pip install -U 'ram-edge[openvino]') or numpy<2"
        )
    return ov


class _Slot:
    """One infer request and the (constants generation, chunk) whose tensors it holds."""

    __slots__ = ("request", "generation")

    def __init__(self, request):
        self.request = request
        self.generation: Optional[Tuple[int, int]] = None


class OpenVINOBackend(Backend):
    """One OpenVINO compiled model for one graph of a bundle.

    model_path: an ONNX file (``<bundle>/encoder.onnx`` or ``decoder.onnx``), read as it is.
    options:    an :class:`OpenVINOOptions`, or its fields as keyword arguments
                (``Tagger(..., backend="openvino", backend_options={"inference_precision": "f32"})``).

    After ``activate``: ``precision`` is what OpenVINO compiled for ("f32" / "bf16", read back from the
    compiled model), ``precision_reason`` why it was chosen, ``cache_path`` the blob file (None without a
    cache) and ``loaded_from_cache`` whether it came from there.

    Threads: ``infer`` may be called from several threads. Each call takes an infer request from a pool of
    at most OPTIMAL_NUMBER_OF_INFER_REQUESTS (1 with the LATENCY hint, one per stream with THROUGHPUT) and
    waits while all are busy. A request runs one call at a time and holds its own intermediate buffers;
    with LATENCY there is one stream, so more requests would only queue inside OpenVINO and cost memory
    (Swin-L activations), while with THROUGHPUT each stream works on its own request in parallel. The
    vocabulary (``set_constant_inputs``) is copied once into OpenVINO tensors, which each request gets
    once per vocabulary (``set_tensor`` shares, not copies).
    """

    name = "openvino"

    def __init__(self, model_path, options: Optional[OpenVINOOptions] = None, **option_fields: Any):
        super().__init__(model_path)
        if options is not None and option_fields:
            raise TypeError("pass either options= or option keyword arguments, not both")
        if options is None:
            known = list(OpenVINOOptions.__dataclass_fields__)
            unknown = sorted(set(option_fields) - set(known))
            if unknown:
                raise TypeError(f"unknown OpenVINO option(s) {unknown}; known: {known}")
            options = OpenVINOOptions(**option_fields)
        self.options = options
        self.precision: Optional[str] = None
        self.precision_reason = ""
        self.cache_path: Optional[Path] = None
        self.loaded_from_cache = False
        self._ov = None
        self._compiled = None
        self._ports: List[Any] = []
        self._by_name: Dict[str, TensorInfo] = {}
        self._cond = threading.Condition()
        self._idle: List[_Slot] = []
        self._created = 0
        self._pool_size = 1
        self._const_tensors: List[Dict[str, Any]] = []  # per chunk
        self._generation = 0

    # -- life cycle ----------------------------------------------------------------------------------
    def _activate(self) -> None:
        ov = import_openvino()
        self._ov = ov
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no such ONNX file")
        core = ov.Core()
        device = self.options.device
        if device not in core.available_devices:
            raise ValueError(
                f"OpenVINO device {device!r} is not available here (available: {', '.join(core.available_devices)})"
            )
        capabilities = [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
        cpu = read_cpu_info()
        precision, self.precision_reason = choose_precision(self.options.inference_precision, capabilities, cpu.flags)
        config = compile_config(self.options, precision)
        device_material = {
            "name": device,
            "full_name": str(core.get_property(device, "FULL_DEVICE_NAME")),
            "capabilities": capabilities,
            "cpu": cpu.key_material(),
        }

        from ram_edge.bundle_format import sha256_file

        key = cache_key(sha256_file(self.model_path), ov.get_version(), device_material, config)
        self._compiled, input_names, output_names = self._load_or_compile(core, config, key, device_material)
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.precision != precision:
            logger.warning("%s: precision %s (%s), but OpenVINO compiled %s on this %s (%s)", self.model_path.name,
                           precision, self.precision_reason, self.precision, device, device_material["full_name"])
        logger.info("%s: OpenVINO %s on %s, precision %s: %s", self.model_path.name, ov.get_version(), device,
                    self.precision, self.precision_reason)
        self._ports = list(self._compiled.outputs)
        self._inputs = tuple(_tensor_info(n, port) for n, port in zip(input_names, self._compiled.inputs))
        self._outputs = tuple(_tensor_info(n, port) for n, port in zip(output_names, self._ports))
        self._by_name = {t.name: t for t in self._inputs}
        self._pool_size = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def _deactivate(self) -> None:
        with self._cond:
            self._idle, self._created = [], 0
            self._const_tensors = []
            self._constants = {}
        self._ports = []
        self._compiled = None

    def _cache_dir(self) -> Optional[Path]:
        path = self.options.resolved_cache_dir()
        if path is None:
            return None
        if writable_dir(path):
            return path
        if self.options.cache_dir is True:
            logger.warning("%s is not writable: OpenVINO compiled models are not cached (cache_dir= sets "
                           "another folder)", path)
            return None
        raise ValueError(f"OpenVINO cache_dir {path} is not a writable folder")

    def _load_or_compile(self, core, config: Mapping[str, Any], key: str, device_material: Mapping[str, Any]):
        """(compiled model, input names, output names). The names are the ONNX graph's: OpenVINO adds the
        names of tensors its transformations merged into a port (``image_embeds_cast_to_/Gather_3``), so
        they are taken from the model as read, and kept in the cache entry's ``.json`` for the next load."""
        device = self.options.device
        cache_dir = self._cache_dir()
        path = cache_dir / cache_file_name(self.model_path.name, key, BLOB_SUFFIX) if cache_dir else None
        self.cache_path = path
        self.loaded_from_cache = False
        if path is not None and path.is_file():
            try:
                meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
                # The runtime properties (threads, hint) are not restored from a blob: pass them again.
                compiled = core.import_model(path.read_bytes(), device, dict(config))
                names = _port_names(compiled, meta["inputs"], meta["outputs"])
                self.loaded_from_cache = True
                logger.info("%s: loaded the compiled model from %s", self.model_path.name, path)
                return (compiled,) + names
            except Exception as e:  # damaged, incomplete, or from a build the key did not tell apart
                logger.warning("%s: cached compiled model %s unusable (%s); compiling again",
                               self.model_path.name, path, e)
        model = core.read_model(str(self.model_path))
        compiled = core.compile_model(model, device, dict(config))
        names = _port_names(compiled, [p.get_any_name() for p in model.inputs],
                            [p.get_any_name() for p in model.outputs])
        if path is not None:
            meta = {"key": key, "onnx": str(self.model_path), "openvino": self._ov.get_version(),
                    "device": dict(device_material), "config": {k: str(v) for k, v in config.items()},
                    "inputs": names[0], "outputs": names[1]}
            try:
                blob = io.BytesIO()  # export_model() returns bytes in OpenVINO 2024.0, a BytesIO in 2026.4
                compiled.export_model(blob)
                write_cache_entry(path, blob.getvalue(), meta)
                logger.info("%s: compiled for %s and cached in %s", self.model_path.name, device, path)
            except OSError as e:  # a full disk must not stop inference
                logger.warning("%s: could not cache the compiled model in %s (%s)", self.model_path.name, path, e)
        return (compiled,) + names

    @property
    def device(self) -> str:
        return "cpu" if self.options.device.upper().startswith("CPU") else self.options.device.lower()

    # -- inference -----------------------------------------------------------------------------------
    def _prepare(self, feeds: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        prepared = {}
        for name, array in feeds.items():
            info = self._by_name.get(name)
            if info is None:
                raise KeyError(f"{self.model_path.name}: has no input {name!r} (inputs: {sorted(self._by_name)})")
            array = prepare_input(name, array, info.dtype)
            check_shape(self.model_path.name, info, array.shape)
            prepared[name] = array
        return prepared

    def set_constant_inputs(self, feeds: Mapping[str, np.ndarray],
                            chunks: Optional[Sequence[Tuple[int, int]]] = None) -> None:
        """Checked and converted first (a wrong array leaves the previous constants in place), then copied
        once into OpenVINO tensors (per chunk when chunked); each infer request picks them up at its next
        call."""
        self._require_active()
        super().set_constant_inputs(self._prepare(feeds), chunks)

    def _on_constants_changed(self) -> None:
        # One copy into OpenVINO-owned memory: the Vocabulary's arrays are read-only, which ov.Tensor
        # cannot share; the tensors then outlive any later vocabulary for requests still using them.
        tensors = [{name: self._ov.Tensor(np.ascontiguousarray(array))
                    for name, array in self.constant_feeds(chunk if self._chunks else None).items()}
                   for chunk in range(self.num_chunks)]
        with self._cond:
            self._const_tensors = tensors
            self._generation += 1

    def _acquire(self) -> Tuple[_Slot, List[Dict[str, Any]], int]:
        with self._cond:
            while not self._idle and self._created >= self._pool_size:
                self._cond.wait()
            if self._idle:
                slot = self._idle.pop()
            else:
                slot = _Slot(self._compiled.create_infer_request())
                self._created += 1
            return slot, self._const_tensors, self._generation

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            self._idle.append(slot)
            self._cond.notify()

    def _infer(self, feeds: Mapping[str, np.ndarray], chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
        prepared = self._prepare(feeds)
        slot, chunk_tensors, generation = self._acquire()
        try:
            request = slot.request
            constants = chunk_tensors[chunk or 0] if chunk_tensors else {}
            state = (generation, chunk or 0)
            if slot.generation != state:
                for name, tensor in constants.items():
                    request.set_tensor(name, tensor)
                slot.generation = state
            if any(name in constants for name in prepared):
                slot.generation = None  # a constant overridden for this call: set them again next time
            # share_inputs: the call's arrays are read in place; share_outputs=False: outputs are copies,
            # the request reuses its output buffers on the next call.
            result = request.infer(prepared, share_inputs=True, share_outputs=False)
            return {info.name: result[port] for info, port in zip(self._outputs, self._ports)}
        finally:
            self._release(slot)


def _port_names(compiled, inputs: Sequence[str], outputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``inputs`` / ``outputs`` (the graph's names, in order) checked against the compiled model's ports."""
    result = []
    for kind, ports, names in (("inputs", compiled.inputs, inputs), ("outputs", compiled.outputs, outputs)):
        names = [str(n) for n in names]
        if len(names) != len(ports) or any(n not in p.get_names() for n, p in zip(names, ports)):
            raise ValueError(f"the compiled model's {kind} {[sorted(p.get_names()) for p in ports]} are not {names}")
        result.append(names)
    return result[0], result[1]


def _tensor_info(name: str, port) -> TensorInfo:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorInfo(name, shape, np.dtype(port.get_element_type().to_dtype()))


__all__ = [
    "BF16_FLAGS", "CpuInfo", "OpenVINOBackend", "OpenVINOOptions", "OpenVINOUnavailableError", "cache_key",
    "check_shape", "choose_precision", "compile_config", "import_openvino", "read_cpu_info",
]
