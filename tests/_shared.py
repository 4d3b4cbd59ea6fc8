"""Locating ``../shared/reference`` (goldens, state-dict key lists, tag files) for the model tests.

The reference folder sits beside the repository in the dev/CI checkout only; tests that need it are
marked ``needs_shared`` (or use the ``reference`` fixture) and skip cleanly elsewhere.
Set ``RAM_EDGE_SHARED`` to point at another ``shared`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SKIP_REASON = "../shared/reference not found (only in the dev/CI checkout)"


def shared_dir() -> Path:
    """The ``shared`` folder: ``$RAM_EDGE_SHARED`` if set, else the one beside the repository."""
    env = os.environ.get("RAM_EDGE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def reference_dir() -> Path:
    return shared_dir() / "reference"


def has_reference() -> bool:
    return reference_dir().is_dir()


#: Mark a test (or module: ``pytestmark = needs_shared``) that reads ``shared/reference``.
needs_shared = pytest.mark.skipif(not has_reference(), reason=SKIP_REASON)


@pytest.fixture(scope="session")
def reference() -> Path:
    """``shared/reference``, or a skip with a clear reason when this checkout has none."""
    if not has_reference():
        pytest.skip(SKIP_REASON)
    return reference_dir()


def golden_paths(name: str):
    """(``.pth``, ``.npz``, ``.json``) of ``golden/<name>``."""
    base = reference_dir() / "golden" / name
    return base.with_suffix(".pth"), base.with_suffix(".npz"), base.with_suffix(".json")
