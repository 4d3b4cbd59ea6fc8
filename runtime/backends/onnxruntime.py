"""onnxruntime backend. ``onnxruntime`` is imported in ``activate``, not at module import."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ram_edge.ort_tuning import session_device, session_options

from .base import Backend, TensorInfo

# onnxruntime's type strings -> numpy dtypes (the ones a bundle can contain).
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}

# Providers whose tensors live in CUDA memory: constant inputs are kept there.

Provider = Union[str, Tuple[str, Dict[str, Any]]]


def default_providers(available: Sequence[str]) -> List[str]:
    """CUDA first when this onnxruntime build has it, then CPU. (Not TensorRT: its engine build takes
    minutes at first load; ask for it explicitly.)"""
    chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    return chosen + ["CPUExecutionProvider"]


def resolve_providers(providers: Optional[Sequence[Provider]], available: Sequence[str]) -> List[Provider]:
    if providers is None:
        return list(default_providers(available))
    if isinstance(providers, str):
        providers = [providers]
    resolved: List[Provider] = []
    for p in providers:
        name = p if isinstance(p, str) else p[0]
        if name not in available:
            raise ValueError(
                f"onnxruntime execution provider {name!r} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}). For CUDA install onnxruntime-gpu instead of onnxruntime."
            )
        resolved.append(p)
    if not resolved:
        raise ValueError("providers is empty; pass None for the default or e.g. ['CPUExecutionProvider']")
    return resolved


class OnnxRuntimeBackend(Backend):
    """One ``onnxruntime.InferenceSession`` (graph optimisation level ALL).

    providers:        onnxruntime provider names (or (name, options) pairs); None: CUDA when available,
                      then CPU.
    intra_op_threads: threads for one operator; None lets onnxruntime use one per physical core.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path,
        providers: Optional[Sequence[Provider]] = None,
        intra_op_threads: Optional[int] = None,
        inter_op_threads: Optional[int] = None,
    ):
        super().__init__(model_path)
        self.requested_providers = providers
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._session = None
        self._ort = None
        self._output_names: List[str] = []
        self._device: Tuple[str, int] = ("cpu", 0)
        self._device_constants: List[Dict[str, Any]] = []  # per chunk, on a CUDA device

    # -- life cycle ----------------------------------------------------------------------------------
    def _activate(self) -> None:
        import onnxruntime as ort

        self._ort = ort
        # Graph optimisation ALL, sequential execution, denormals flushed (Swin's shift-mask softmax makes
        # ~1e-44 values that take x86's slow path): measured in docs/performance.md.
        options = session_options(self.intra_op_threads, inter_op_threads=self.inter_op_threads)
        providers = resolve_providers(self.requested_providers, ort.get_available_providers())
        self._session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        self._inputs = tuple(_tensor_info(a) for a in self._session.get_inputs())
        self._outputs = tuple(_tensor_info(a) for a in self._session.get_outputs())
        self._output_names = [t.name for t in self._outputs]
        self._device = session_device(self._session)

    def _deactivate(self) -> None:
        self._device_constants = []
        self._constants = {}
        self._session = None

    @property
    def providers(self) -> List[str]:
        """The providers the session actually uses (after onnxruntime's fallbacks)."""
        self._require_active()
        return list(self._session.get_providers())

    @property
    def device(self) -> str:
        return self._device[0]

    # -- inference -----------------------------------------------------------------------------------
    def _on_constants_changed(self) -> None:
        # On CPU onnxruntime reads a C-contiguous numpy array of the right dtype in place, so the arrays
        # are simply kept. On a CUDA device they are copied to device memory once here; otherwise every
        # run would copy the whole vocabulary (hundreds of MB for RAM++) host -> device. Chunked constants
        # are copied chunk by chunk (the same bytes in total).
        self._device_constants = []
        if self._device[0] == "cuda":
            kind, index = self._device
            for chunk in range(self.num_chunks):
                self._device_constants.append({
                    name: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), kind, index)
                    for name, array in self.constant_feeds(chunk if self._chunks else None).items()
                })

    def _infer(self, feeds: Mapping[str, np.ndarray], chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
        if self._device_constants:
            ort_feeds = dict(self._device_constants[chunk or 0])
            for name, array in feeds.items():
                ort_feeds[name] = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            values = self._session.run_with_ort_values(self._output_names, ort_feeds)
            return {name: value.numpy() for name, value in zip(self._output_names, values)}
        merged = dict(self.constant_feeds(chunk))
        merged.update(feeds)
        outputs = self._session.run(self._output_names, merged)
        return dict(zip(self._output_names, outputs))


def _tensor_info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, (int, str)) or d is None else None for d in (arg.shape or ()))
    return TensorInfo(arg.name, shape, np.dtype(_ORT_DTYPES.get(arg.type, np.void)))
