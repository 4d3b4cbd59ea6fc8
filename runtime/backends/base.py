"""The backend interface: what a runner of one ONNX graph must offer the Tagger.

Life cycle as Polygraphy's runners: construct (cheap, nothing loaded) -> ``activate()`` (load / build the
graph, allocate) -> ``infer(feeds)`` any number of times -> ``deactivate()``; a backend is also a context
manager. Heavy modules (onnxruntime, tensorrt) are imported in ``activate``, never at import time.

Constant inputs (the vocabulary's ``label_embed`` / ``label_mask``) are handed over once with
:meth:`Backend.set_constant_inputs`; a backend may keep them resident (device memory, bound buffers) and
must not copy them again on every ``infer``. They may be split into *chunks*: row ranges along axis 0
(the tags), so that one call scores one chunk of the vocabulary and the graph's working memory is
bounded by the chunk, not by the vocabulary (``infer(feeds, chunk=i)``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

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
        self._chunks: Optional[List[Tuple[int, int]]] = None
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
    def set_constant_inputs(self, feeds: Mapping[str, np.ndarray],
                            chunks: Optional[Sequence[Tuple[int, int]]] = None) -> None:
        """Inputs that stay the same across ``infer`` calls until set again (replaces earlier ones).

        ``chunks``: row ranges ``(start, stop)`` along axis 0 of every constant; ``infer(..., chunk=i)``
        then runs with rows ``start:stop`` of each. The constants are still handed over once."""
        self._require_active()
        known = {t.name: t for t in self.input_metadata()}
        for name in feeds:
            if name not in known:
                raise KeyError(f"{self.model_path.name}: has no input {name!r} (inputs: {sorted(known)})")
        if chunks is not None:
            rows = {np.shape(a)[0] for a in feeds.values()}
            chunks = [(int(a), int(b)) for a, b in chunks]
            if len(rows) != 1 or not chunks or any(not 0 <= a < b <= min(rows) for a, b in chunks):
                raise ValueError(f"{self.model_path.name}: chunks {chunks[:3]}... do not fit constants with "
                                 f"{sorted(rows)} rows")
        self._constants = dict(feeds)
        self._chunks = chunks
        self._on_constants_changed()

    @property
    def num_chunks(self) -> int:
        """How many chunks the constants were split into (1 when they were not)."""
        return 1 if self._chunks is None else len(self._chunks)

    def constant_feeds(self, chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The constants of one call: all of them, or the rows of ``chunk`` (numpy views, no copy)."""
        if chunk is None or self._chunks is None:
            return self._constants
        start, stop = self._chunks[chunk]
        return {name: array[start:stop] for name, array in self._constants.items()}

    def infer(self, feeds: Mapping[str, np.ndarray], chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Run the graph on ``feeds`` plus the constant inputs (those of ``chunk`` when they are chunked);
        returns every output as a numpy array."""
        self._require_active()
        expected = {t.name for t in self.input_metadata()}
        missing = expected - set(feeds) - set(self._constants)
        if missing:
            raise KeyError(f"{self.model_path.name}: inputs not given: {sorted(missing)}")
        if chunk is not None and not 0 <= chunk < self.num_chunks:
            raise IndexError(f"{self.model_path.name}: chunk {chunk} of {self.num_chunks}")
        if chunk is None and self._chunks is not None and not set(self._constants) <= set(feeds):
            raise ValueError(f"{self.model_path.name}: the constant inputs are chunked; pass chunk=0..{self.num_chunks - 1}")
        return self._infer(feeds, chunk)

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
    def _infer(self, feeds: Mapping[str, np.ndarray], chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Run with ``feeds`` over the constants of ``chunk`` (see :meth:`constant_feeds`); ``feeds`` win
        over constants of the same name."""

    def _on_constants_changed(self) -> None:
        """Hook: make ``self._constants`` resident (e.g. copy to the device) once, per chunk if chunked."""

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"{type(self).__name__}({self.model_path.name}) is not active: call activate()")

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"{type(self).__name__}({str(self.model_path)!r}, {state})"


def describe_providers(providers: Optional[list]) -> str:
    return ", ".join(p if isinstance(p, str) else p[0] for p in providers or [])
