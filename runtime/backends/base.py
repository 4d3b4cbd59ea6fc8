"""The backend interface: what a runner of one ONNX graph must offer the Tagger.

Life cycle as Polygraphy's runners: construct (cheap, nothing loaded) -> ``activate()`` (load / build the
graph, allocate) -> ``infer(feeds)`` any number of times -> ``deactivate()``; a backend is also a context
manager. Heavy modules (onnxruntime, tensorrt) are imported in ``activate``, never at import time.

Constant inputs (the vocabulary's ``label_embed`` / ``label_mask``) are handed over once with
:meth:`Backend.set_constant_inputs`; a backend may keep them resident (device memory, bound buffers) and
must not copy them again on every ``infer``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

Dim = Union[int, str, None]  # a fixed size, a symbolic (dynamic) dimension name, or unknown


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a graph input or output, as the loaded graph declares them."""

    name: str
    shape: Tuple[Dim, ...]
    dtype: np.dtype

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {np.dtype(self.dtype).name} ({dims})"


class Backend(abc.ABC):
    """Runs one graph. Subclasses implement ``_activate`` (which fills the metadata), ``_deactivate`` and ``_infer``."""

    #: Registry name, e.g. "onnxruntime".
    name = "base"

    def __init__(self, model_path: Union[str, Path]):
        self.model_path = Path(model_path)
        self._active = False
        self._constants: Dict[str, np.ndarray] = {}
        self._inputs: Tuple[TensorInfo, ...] = ()
        self._outputs: Tuple[TensorInfo, ...] = ()

    # -- life cycle ----------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> "Backend":
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._deactivate()

    close = deactivate

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------------------------------
    def set_constant_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Inputs that stay the same across ``infer`` calls until set again (replaces earlier ones)."""
        self._require_active()
        known = {t.name: t for t in self.input_metadata()}
        for name in feeds:
            if name not in known:
                raise KeyError(f"{self.model_path.name}: has no input {name!r} (inputs: {sorted(known)})")
        self._constants = dict(feeds)
        self._on_constants_changed()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run the graph on ``feeds`` (plus the constant inputs); returns every output as a numpy array."""
        self._require_active()
        expected = {t.name for t in self.input_metadata()}
        missing = expected - set(feeds) - set(self._constants)
        if missing:
            raise KeyError(f"{self.model_path.name}: inputs not given: {sorted(missing)}")
        return self._infer(feeds)

    def input_metadata(self) -> Tuple[TensorInfo, ...]:
        """The graph's inputs in declaration order (only valid while active)."""
        self._require_active()
        return self._inputs

    def output_metadata(self) -> Tuple[TensorInfo, ...]:
        """The graph's outputs in declaration order (only valid while active)."""
        self._require_active()
        return self._outputs

    # -- for subclasses --------------------------------------------------------------------------------
    @abc.abstractmethod
    def _activate(self) -> None:
        """Load the graph and set ``self._inputs`` / ``self._outputs`` (tuples of TensorInfo)."""

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]: ...

    def _on_constants_changed(self) -> None:
        """Hook: make ``self._constants`` resident (e.g. copy to the device) once."""

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"{type(self).__name__}({self.model_path.name}) is not active: call activate()")

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"{type(self).__name__}({str(self.model_path)!r}, {state})"


def describe_providers(providers: Optional[list]) -> str:
    return ", ".join(p if isinstance(p, str) else p[0] for p in providers or [])
