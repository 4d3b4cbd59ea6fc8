"""ram-edge: RAM++ / RAM image taggers as two ONNX graphs with the vocabulary as data.

Subpackages (data flows left to right, a module imports only from its left):
``ram_edge.models`` (torch) -> ``ram_edge.export`` (torch, onnx) -> bundle on disk -> ``ram_edge.runtime``
(numpy + onnxruntime / TensorRT, never torch). ``ram_edge.tags``, ``ram_edge.vocabulary`` and
``ram_edge.bundle_format`` are numpy-only and shared by both sides.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ram-edge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
