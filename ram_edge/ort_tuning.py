"""onnxruntime performance settings for ram-edge's two graphs, measured in ``benchmarks/latency.py``.

numpy only at import; ``onnxruntime`` is imported by the functions that need it. Two pieces:

* :func:`session_options` -- the ``SessionOptions`` the bundle graphs run fastest with on CPU (see
  docs/performance.md for what each setting is worth).
* :class:`BoundSession` -- an ``InferenceSession`` whose constant inputs (the vocabulary's
  ``label_embed`` / ``label_mask``) are bound once as ``OrtValue``s through ``IOBinding``, so a call only
  binds the image-dependent input: nothing vocabulary-sized is converted or copied per call, and on a
  CUDA device the vocabulary stays in device memory.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np

#: Session config entries for every provider (``SessionOptions.add_session_config_entry``).
#: ``session.set_denormal_as_zero``: flush denormal floats to zero in onnxruntime's threads. Swin's
#: shifted-window mask adds -100 to the scores of cross-region pairs; softmax turns them into
#: probabilities near exp(-100) = 4e-44, which are denormal in float32, and every multiply-add with a
#: denormal operand takes a slow microcode path on x86. Flushing them changes no output value measurably
#: (4e-44 x |v|; bit-identical image_embeds on the demo Swin-L) and makes the encoder ~15-30 % faster.
SESSION_CONFIG: Dict[str, str] = {
    "session.set_denormal_as_zero": "1",
}


def session_options(
    threads: Optional[int] = None,
    *,
    inter_op_threads: Optional[int] = None,
    denormal_as_zero: bool = True,
    allow_spinning: Optional[bool] = None,
    profile_prefix: Optional[str] = None,
    optimized_model_path: Optional[str] = None,
):
    """``onnxruntime.SessionOptions`` for a bundle graph.

    threads:          intra-op threads (None: onnxruntime's default, one per physical core).
    denormal_as_zero: see :data:`SESSION_CONFIG` (keep it on; it only exists to measure its effect).
    allow_spinning:   None keeps onnxruntime's default (worker threads spin between ops: lowest latency
                      on an otherwise idle machine); False stops them burning CPU between calls, better
                      when the machine is shared or preprocessing runs in parallel threads.
    profile_prefix:   write onnxruntime's per-node JSON profile (``session.end_profiling()``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # two straight-line graphs: no inter-op work
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    for key, value in SESSION_CONFIG.items():
        if key == "session.set_denormal_as_zero" and not denormal_as_zero:
            continue
        options.add_session_config_entry(key, value)
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def session_device(session) -> tuple:
    """("cuda", id) when the session's first provider runs on a CUDA device, else ("cpu", 0)."""
    first = session.get_providers()[0]
    if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return "cuda", int(session.get_provider_options().get(first, {}).get("device_id", 0))
    return "cpu", 0


class BoundSession:
    """Runs one ``InferenceSession`` through ``IOBinding`` with some inputs bound once.

    ``set_constants({"label_embed": ..., "label_mask": ...})`` wraps the arrays as ``OrtValue``s (on CPU
    without a copy: the OrtValue reads the numpy buffer, which this object keeps alive; on CUDA one
    host-to-device copy) and binds them; ``run(feeds)`` binds only ``feeds`` and returns every output as
    numpy. Not thread-safe: use one BoundSession per thread (they may share the session and the
    constants' OrtValues are cheap to re-bind).
    """

    def __init__(self, session, constants: Optional[Mapping[str, np.ndarray]] = None):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self._device = session_device(session)
        self._output_names: List[str] = [o.name for o in session.get_outputs()]
        self._binding = session.io_binding()
        self._constants: Dict[str, Any] = {}
        if constants:
            self.set_constants(constants)

    def set_constants(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Bind ``feeds`` for every later ``run`` (replacing earlier constants of the same names)."""
        kind, index = self._device
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            value = self._ort.OrtValue.ortvalue_from_numpy(array, kind, index)
            self._constants[name] = (value, array)  # the array keeps the CPU buffer alive
            self._binding.bind_ortvalue_input(name, value)

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        binding = self._binding
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, self._device[0], self._device[1])
        self.session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
        binding.clear_binding_outputs()
        return dict(zip(self._output_names, outputs))


class Float16Widener:
    """float16 -> float32 through one onnxruntime ``Cast`` (multi-threaded, F16C/AVX-512): 3-4x faster
    than ``numpy.astype`` for a vocabulary table (RAM++'s 10k-tag x 51 table: ~0.2 s instead of ~0.7 s on
    two cores), bit-identical. Build once, call per vocabulary load."""

    #: The serialized ONNX model ``y = Cast<to=float>(x: float16)`` (opset 13), inline so that the
    #: runtime needs no ``onnx`` package.
    MODEL = (b'\x08\x08\x12\x08ram-edge:6\n\x17\n\x01x\x12\x01y"\x04Cast*\t\n\x02to\x18\x01\xa0\x01\x02'
             b'\x12\x05widenZ\t\n\x01x\x12\x04\n\x02\x08\nb\t\n\x01y\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')

    def __init__(self, threads: Optional[int] = None):
        import onnxruntime as ort

        self._session = ort.InferenceSession(self.MODEL, session_options(threads), providers=["CPUExecutionProvider"])

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"x": np.ascontiguousarray(array, dtype=np.float16)})[0]
