"""What a batch job reads: local files, folders and globs (as ``ram-tag``), and URIs that pyarrow's
filesystems reach (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``).

Listing happens once, on the driver, like Ray Data's own file readers. Every input becomes a
:class:`Source`: the path as the user will see it in the output (``path``), and how a worker opens it
(``filesystem`` key and the path inside that filesystem). A URI prefix is listed recursively and keeps
image extensions only; a URI naming one object is taken whatever its extension, like a file named
explicitly. Inputs that exist as nothing become sources that carry their error, so they end up as rows
of the output instead of failing the job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow.fs as pafs

from ram_edge.runtime.pipeline import find_images
from ram_edge.runtime.preprocess import is_image_path

#: ``scheme://`` at the start of an input marks a URI (one letter would be a Windows drive, ``C:/``).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")

#: The filesystem key of local paths: workers open them directly (a shared filesystem on a cluster).
LOCAL = ""


@dataclass(frozen=True)
class Source:
    """One input: ``path`` as written in the output, ``filesystem`` (a key of the job's filesystem table,
    :data:`LOCAL` for local paths) and ``location`` (the path inside that filesystem), or ``error`` when it
    cannot be read at all."""

    path: str
    filesystem: str = LOCAL
    location: str = ""
    error: Optional[str] = None


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


def _root(uri: str) -> str:
    """``scheme://authority`` of a URI: inputs sharing it share one filesystem object."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme.lower()}://{rest.split('/', 1)[0]}"


def list_sources(inputs: Sequence[str]) -> Tuple[List[Source], Dict[str, pafs.FileSystem]]:
    """Expand ``inputs`` into sources, in input order (folders and prefixes sorted), without duplicates.

    Returns the sources and the filesystems their URIs need (picklable pyarrow objects handed to the
    workers once, instead of resolving a URI per image, which for S3 may cost a request each).
    """
    sources: List[Source] = []
    filesystems: Dict[str, pafs.FileSystem] = {}
    seen = set()
    local: List[str] = []

    def add(source: Source) -> None:
        key = (source.filesystem, source.location or source.path)
        if key not in seen:
            seen.add(key)
            sources.append(source)

    def flush_local() -> None:
        # find_images keeps ram-tag's rules (recursive folders, globs, explicit files, errors).
        if local:
            paths, failures = find_images(local)
            for p in paths:
                add(Source(p, LOCAL, p))
            for f in failures:
                add(Source(f.path, error=f.error))
            local.clear()

    for item in inputs:
        if not is_uri(item):
            local.append(item)
            continue
        flush_local()
        for source in _list_uri(item, filesystems):
            add(source)
    flush_local()
    return sources, filesystems


def _list_uri(uri: str, filesystems: Dict[str, pafs.FileSystem]) -> List[Source]:
    root = _root(uri)
    try:
        filesystem, location = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ValueError for unusable URIs
        return [Source(uri, error=f"cannot open this URI: {e}")]
    filesystems.setdefault(root, filesystem)
    filesystem = filesystems[root]
    try:
        info = filesystem.get_file_info(location)
        if info.type == pafs.FileType.File:
            return [Source(uri, root, location)]
        if info.type == pafs.FileType.NotFound:
            return [Source(uri, error="no such file, folder or prefix")]
        base = location.rstrip("/")
        entries = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        return [Source(uri, error=f"cannot list: {e}")]
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File and is_image_path(e.path))
    prefix = uri.rstrip("/")
    return [Source(prefix + p[len(base):], root, p) for p in files]
