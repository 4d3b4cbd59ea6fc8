"""Batch tagging on Ray Data (``ram-tag BUNDLE INPUTS --ray local|ADDRESS --out tags.parquet``).

    from ram_edge.distributed import TagJobOptions, connect, tag_to_parquet
    connect("local")                                  # or a cluster address
    summary = tag_to_parquet("bundle/", ["photos/", "s3://bucket/shots/"], "tags.parquet",
                             options=TagJobOptions(top_k=10), resume=True)

A consumer of the torch-free runtime (``ram_edge.runtime``), which never imports this package. Needs the
``[ray]`` extra: ``pip install 'ram-edge[ray]'``.
"""

try:
    import pyarrow  # noqa: F401
    import ray.data  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"ram_edge.distributed needs Ray Data and pyarrow ({e}): pip install 'ram-edge[ray]'") from e

from .job import (
    OUTPUT_SCHEMA, ActorPoolPlan, TagImages, TagJobOptions, TagJobSummary, build_dataset, check_job, connect,
    load_images, plan_actor_pool, read_done, tag_to_parquet,
)
from .sources import Source, list_sources

__all__ = [
    "OUTPUT_SCHEMA",
    "ActorPoolPlan",
    "Source",
    "TagImages",
    "TagJobOptions",
    "TagJobSummary",
    "build_dataset",
    "check_job",
    "connect",
    "list_sources",
    "load_images",
    "plan_actor_pool",
    "read_done",
    "tag_to_parquet",
]
