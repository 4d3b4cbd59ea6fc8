"""Helpers shared by the backends that compile a graph and cache the result on disk (TensorRT engines,
OpenVINO compiled models), and that convert inputs to the graph's declared dtypes. numpy only.

The cache layout both follow: ``<cache_dir>/<graph stem>.<key[:24]>.<suffix>`` holds the compiled
artefact and a ``.json`` beside it records what went into the key. The key is :func:`digest` of a
JSON-able dict naming everything the artefact depends on (graph sha256, library version, hardware,
options), so a changed input is a new file, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def digest(material: Mapping[str, Any]) -> str:
    """sha256 (hex) of ``material`` as canonical JSON (sorted keys): the cache key of a compiled graph."""
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file_name(graph_file: str, key: str, suffix: str) -> str:
    """``encoder.<first 24 hex digits of key><suffix>``, e.g. ``encoder.0123abcd....engine``."""
    return f"{Path(graph_file).stem}.{key[:24]}{suffix}"


def user_cache_dir(backend: str) -> Path:
    """``$XDG_CACHE_HOME/ram-edge/<backend>`` (default ``~/.cache/ram-edge/<backend>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ram-edge" / backend


def writable_dir(path: Path) -> bool:
    """Create ``path`` if needed and check that a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def write_atomic(path: Path, data: Any) -> None:
    """Write ``data`` (bytes-like) to ``path`` through a temporary file and a rename, so that a reader
    (another process loading the same cache) never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_cache_entry(path: Path, data: Any, meta: Mapping[str, Any]) -> None:
    """The compiled artefact at ``path`` and ``meta`` (what went into its key) at ``path.json``; the
    artefact first, so a ``.json`` always describes a complete file."""
    write_atomic(path, data)
    write_atomic(path.with_suffix(".json"), (json.dumps(dict(meta), indent=1) + "\n").encode("utf-8"))


def prepare_input(name: str, array: Any, dtype: np.dtype) -> np.ndarray:
    """``array`` as a C-contiguous array of the graph's dtype. Masks become numpy bool (bytes 0 / 1 exactly:
    TensorRT leaves other byte values of a BOOL undefined), so any nonzero value counts as true."""
    array = np.asarray(array)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        if array.dtype != np.bool_:
            if not (np.issubdtype(array.dtype, np.number)):
                raise TypeError(f"input {name}: expected a bool mask, got {array.dtype}")
            array = array != 0
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"input {name}: expected {dtype.name} numbers, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)
