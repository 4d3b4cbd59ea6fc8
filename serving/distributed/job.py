"""Tag many images on a Ray cluster with Ray Data, writing Parquet shards.

The pipeline (one Ray Data dataset, streamed)::

    sources (listed on the driver)
      -> map_batches(load_images)             Ray tasks: read bytes, decode, resize, normalise
      -> map_batches(TagImages, ActorPool)    one Tagger per actor, loaded once: encoder + decoder
      -> write_parquet(out)                   shards, one per written block

Nothing is lost: an image that cannot be read or decoded is a row with its ``error`` (the task never
raises for a bad image), an actor that dies is restarted and its batch retried by Ray Data (actor pools
default to ``max_restarts=-1`` / ``max_task_retries=-1``), and a write task that is retried rewrites the
same file name, so every input ends up in exactly one row. ``resume=True`` reads the ``path`` column of
the shards already in ``out`` and tags only the rest.

Open-set vocabularies are a ``vocabulary`` of ``TagJobOptions.tagger_options``. Captions and
classification would add columns to :data:`OUTPUT_SCHEMA` (``caption``, ``classes``); the row contract
stays: ``path`` + results, or ``path`` + ``error``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import ActorPoolStrategy

from ram_edge.runtime.bundle import open_bundle
from ram_edge.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, Preprocessor
from ram_edge.runtime.tagger import Tagger
from ram_edge.vocabulary import Vocabulary

from .sources import LOCAL, Source, is_uri, list_sources

logger = logging.getLogger(__name__)

#: The columns of every shard. ``tags`` / ``probabilities`` are null and ``error`` says why for inputs
#: that could not be tagged. Captioning and classification would append ``caption`` (string) and ``classes``.
OUTPUT_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("probabilities", pa.list_(pa.float32())),
    pa.field("error", pa.string()),
])

#: CPUs a reading task reserves. Half a CPU: reading from storage waits on I/O as much as it decodes, and a
#: value the model actors never use keeps Ray Data from fusing the two stages into one (it fuses adjacent
#: map stages whose resources are equal, ray-project/ray#54433), so decoding stays in tasks that scale
#: with the cluster's CPUs instead of running serially inside each model actor.
READ_TASK_CPUS = 0.5

#: Preprocessing keyword arguments of :class:`Tagger` that the reading tasks apply (the actors never decode).
PREPROCESSING_OPTIONS = ("resize", "exif_transpose", "alpha", "max_pixels")


# ----------------------------------------------------------------------------------------------------
# Options and sizing


@dataclass(frozen=True)
class TagJobOptions:
    """What to tag with and how to spread it.

    threshold, top_k, lang: as :meth:`Tagger.tag`.
    batch_size:      images per encoder / decoder call (and per reading task batch).
    num_actors:      model replicas; None: one per GPU of the cluster, else sized to its CPUs
                     (:func:`plan_actor_pool`).
    cpus_per_actor:  CPUs reserved per actor (= onnxruntime intra-op threads on CPU); None: chosen by
                     :func:`plan_actor_pool`.
    tagger_options:  keyword arguments for :class:`Tagger` (backend, providers, vocabulary, verify_files,
                     backend_options, resize, exif_transpose, alpha, max_pixels). ``vocabulary`` may be
                     a folder (every actor loads it) or a :class:`Vocabulary` built here, e.g. an open-set
                     one from ``Vocabulary.from_names`` (shipped to the actors through the object store).
    rows_per_block:  inputs per Ray Data block (the unit of reading, retry and output shard); None:
                     enough blocks to keep every CPU busy, at most 1,000 rows each.
    """

    threshold: Optional[float] = None
    top_k: Optional[int] = None
    lang: str = "en"
    batch_size: int = 16
    num_actors: Optional[int] = None
    cpus_per_actor: Optional[int] = None
    tagger_options: Mapping[str, Any] = field(default_factory=dict)
    rows_per_block: Optional[int] = None


@dataclass(frozen=True)
class ActorPoolPlan:
    """How many model actors, and what each reserves."""

    size: int
    num_cpus: float
    num_gpus: float
    intra_op_threads: Optional[int]


def plan_actor_pool(resources: Mapping[str, float], num_actors: Optional[int] = None,
                    cpus_per_actor: Optional[int] = None) -> ActorPoolPlan:
    """Size the actor pool to the cluster (``ray.cluster_resources()``).

    With GPUs: one actor per GPU (each reserves one GPU and ``cpus_per_actor`` or 1 CPU). Without: every
    actor runs onnxruntime on ``cpus_per_actor`` threads (default up to 4), and the actors together leave
    an eighth of the CPUs (at least one) to the reading tasks, which would otherwise starve: a fixed
    pool's actors hold their CPUs for the whole job.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus >= 1:
        return ActorPoolPlan(size=num_actors or gpus, num_cpus=float(cpus_per_actor or 1), num_gpus=1.0,
                             intra_op_threads=cpus_per_actor)
    usable = max(1, cpus - max(1, cpus // 8))
    threads = cpus_per_actor or min(4, usable)
    size = num_actors or max(1, usable // threads)
    if size * threads >= cpus:
        logger.warning("%d actors x %d CPUs reserve all %d CPUs of the cluster: no CPU is left to read images, "
                       "and the job may not progress", size, threads, cpus)
    return ActorPoolPlan(size=size, num_cpus=float(threads), num_gpus=0.0, intra_op_threads=threads)


def _rows_per_block(num_rows: int, batch_size: int, cpus: int, requested: Optional[int]) -> int:
    if requested:
        return max(1, requested)
    return int(min(1000, max(batch_size, math.ceil(num_rows / (4 * cpus)))))


# ----------------------------------------------------------------------------------------------------
# The two stages


def load_images(batch: Dict[str, np.ndarray], preprocessor: Preprocessor,
                filesystems: Mapping[str, pafs.FileSystem]) -> Dict[str, np.ndarray]:
    """Ray task: read and preprocess a batch of sources -> ``path``, ``pixels`` (B, 3, S, S) float32,
    ``error`` ("" when the image is fine; its pixels are zeros otherwise). Never raises for one image."""
    paths = batch["path"]
    size = preprocessor.image_size
    pixels = np.zeros((len(paths), 3, size, size), dtype=np.float32)
    errors = np.array([str(e) for e in batch["error"]], dtype=object)
    for i, (filesystem, location) in enumerate(zip(batch["filesystem"], batch["location"])):
        if errors[i]:
            continue
        try:
            if filesystem == LOCAL:
                pixels[i] = preprocessor(location)
            else:
                try:
                    with filesystems[filesystem].open_input_stream(location) as f:
                        data = f.read()
                except OSError as e:
                    raise ImageError(f"cannot read: {e}") from None
                pixels[i] = preprocessor(data)
        except ImageError as e:
            errors[i] = e.reason
        except Exception as e:  # one file's unexpected failure must not fail its batch
            errors[i] = f"{type(e).__name__}: {e}"
    return {"path": paths, "pixels": pixels, "error": errors}


class TagImages:
    """Ray Data actor: one :class:`Tagger` per actor, loaded once in ``__init__``; each call is one
    encoder and one decoder call on the batch's good images. Returns rows of :data:`OUTPUT_SCHEMA`."""

    def __init__(self, bundle: str, tagger_options: Mapping[str, Any], threshold: Optional[float],
                 top_k: Optional[int], lang: str):
        tagger_options = dict(tagger_options)
        if isinstance(tagger_options.get("vocabulary"), ray.ObjectRef):  # built on the driver (build_dataset)
            tagger_options["vocabulary"] = ray.get(tagger_options["vocabulary"])
        self.tagger = Tagger(bundle, **tagger_options)
        self.names = self.tagger.vocabulary.display_names(lang)
        self.threshold, self.top_k = threshold, top_k

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        paths = [str(p) for p in batch["path"]]
        errors: List[Optional[str]] = [str(e) or None for e in batch["error"]]
        tags: List[Optional[List[str]]] = [None] * len(paths)
        probabilities: List[Optional[List[float]]] = [None] * len(paths)
        good = [i for i, e in enumerate(errors) if e is None]
        if good:
            try:
                probs = self.tagger.probabilities(batch["pixels"][good])
                results = self.tagger.select(probs, self.threshold, self.top_k, names=self.names)
            except Exception as e:  # as ram-tag: the batch's rows record why, the job goes on
                reason = f"inference failed for this batch: {type(e).__name__}: {e}"
                for i in good:
                    errors[i] = reason
            else:
                for i, result in zip(good, results):
                    tags[i] = list(result.tags)
                    probabilities[i] = list(result.probabilities)
        return pa.Table.from_pydict(
            {"path": paths, "tags": tags, "probabilities": probabilities, "error": errors}, schema=OUTPUT_SCHEMA
        )


# ----------------------------------------------------------------------------------------------------
# Output


def resolve_output(out: str) -> Tuple[pafs.FileSystem, str]:
    """``out`` (a local folder or a URI) -> pyarrow filesystem and the folder's path in it."""
    if is_uri(out):
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), str(Path(out).expanduser().resolve())


def list_shards(filesystem: pafs.FileSystem, folder: str) -> List[str]:
    info = filesystem.get_file_info(folder)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{folder} exists and is not a folder; --out names the folder of Parquet shards")
    entries = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".parquet"))


def read_done(filesystem: pafs.FileSystem, folder: str) -> Set[str]:
    """Paths already in the shards of ``folder`` (failed ones too, as ``ram-tag --resume``).

    A shard that cannot be read (a job killed while writing it) is deleted: no Parquet reader could
    use it, and its rows are tagged again.
    """
    done: Set[str] = set()
    for shard in list_shards(filesystem, folder):
        try:
            table = pq.read_table(shard, columns=["path"], filesystem=filesystem)
        except (OSError, pa.ArrowInvalid) as e:
            logger.warning("%s is not a readable Parquet file (%s): deleting it; its rows are tagged again",
                           shard, e)
            filesystem.delete_file(shard)
            continue
        done.update(table.column("path").to_pylist())
    return done


# ----------------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class TagJobSummary:
    """What one run did. ``failures`` holds up to 100 (path, error) pairs of this run."""

    inputs: int
    skipped: int
    tagged: int
    failed: int
    shards: Tuple[str, ...]
    seconds: float
    failures: Tuple[Tuple[str, str], ...] = ()


def check_job(bundle: str, options: TagJobOptions) -> Preprocessor:
    """Validate everything the workers would trip over, on the driver and before Ray starts any work:
    the bundle's manifest, the vocabulary and its language, threshold and top_k. Returns the
    preprocessing the reading tasks apply. Raises BundleError or ValueError."""
    info = open_bundle(bundle, verify_files=False)  # the actors verify the files they load
    vocabulary = options.tagger_options.get("vocabulary")
    if vocabulary is None:
        vocabulary = info.vocabulary_dir
    if not isinstance(vocabulary, Vocabulary):
        vocabulary = Vocabulary.load(vocabulary)
    vocabulary.display_names(options.lang)
    if options.threshold is not None and not 0.0 <= options.threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {options.threshold}")
    if options.top_k is not None and options.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {options.top_k}")
    if options.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {options.batch_size}")
    preprocessing = {k: v for k, v in options.tagger_options.items() if k in PREPROCESSING_OPTIONS}
    preprocessing.setdefault("max_pixels", DEFAULT_MAX_PIXELS)
    return Preprocessor(info.image_size, **preprocessing)


def build_dataset(bundle: str, sources: Sequence[Source], filesystems: Mapping[str, pafs.FileSystem],
                  options: TagJobOptions, preprocessor: Preprocessor) -> "ray.data.Dataset":
    """The lazy Ray Data pipeline from sources to output rows (call ``write_parquet`` or iterate it)."""
    resources = ray.cluster_resources()
    plan = plan_actor_pool(resources, options.num_actors, options.cpus_per_actor)
    tagger_options = dict(options.tagger_options)
    if isinstance(tagger_options.get("vocabulary"), Vocabulary):
        # One copy in the object store (per node), not one inside every actor's constructor arguments.
        tagger_options["vocabulary"] = ray.put(tagger_options["vocabulary"])
    if plan.intra_op_threads and tagger_options.get("backend", "onnxruntime") == "onnxruntime":
        tagger_options.setdefault("intra_op_threads", plan.intra_op_threads)
    block = _rows_per_block(len(sources), options.batch_size, max(1, int(resources.get("CPU", 1))),
                            options.rows_per_block)
    # from_items builds the blocks here on the driver (from_arrow would run a remote task per block).
    rows = [{"path": s.path, "filesystem": s.filesystem, "location": s.location, "error": s.error or ""}
            for s in sources]
    num_blocks = math.ceil(len(rows) / block)
    logger.info("%d inputs in %d blocks; %d model actors (%g CPUs, %g GPUs each)", len(sources), num_blocks,
                plan.size, plan.num_cpus, plan.num_gpus)
    return (
        ray.data.from_items(rows, override_num_blocks=num_blocks)
        .map_batches(load_images, batch_size=options.batch_size, batch_format="numpy", num_cpus=READ_TASK_CPUS,
                     fn_kwargs={"preprocessor": preprocessor, "filesystems": dict(filesystems)})
        .map_batches(TagImages, batch_size=options.batch_size, batch_format="numpy",
                     compute=ActorPoolStrategy(size=plan.size), num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                     fn_constructor_kwargs={"bundle": str(bundle), "tagger_options": tagger_options,
                                            "threshold": options.threshold, "top_k": options.top_k,
                                            "lang": options.lang})
    )


def tag_to_parquet(bundle: str, inputs: Sequence[str], out: str, *, options: TagJobOptions = TagJobOptions(),
                   resume: bool = False) -> TagJobSummary:
    """Tag ``inputs`` (local files / folders / globs, URIs) on the connected Ray cluster into Parquet shards
    in the folder ``out`` (local or a URI). Call :func:`connect` (or ``ray.init``) first.

    Without ``resume`` an ``out`` that already holds shards is refused (nothing is overwritten); with it,
    inputs whose path is already in ``out`` are skipped and the new rows are added as new shards.
    """
    start = time.perf_counter()
    preprocessor = check_job(bundle, options)
    filesystem, folder = resolve_output(out)
    existing = list_shards(filesystem, folder)
    if existing and not resume:
        raise ValueError(f"{out} already holds {len(existing)} Parquet shards: continue that run with --resume "
                         "(resume=True) or choose another output folder")
    sources, filesystems = list_sources(inputs)
    done = read_done(filesystem, folder) if resume else set()
    todo = [s for s in sources if s.path not in done]
    skipped = len(sources) - len(todo)
    if skipped:
        logger.info("resuming: %d of %d inputs already in %s", skipped, len(sources), out)
    if not todo:
        return TagJobSummary(len(sources), skipped, 0, 0, (), time.perf_counter() - start)

    before = set(list_shards(filesystem, folder))
    # Ray names each file after the dataset and the write task: a retried task overwrites its own file.
    build_dataset(bundle, todo, filesystems, options, preprocessor).write_parquet(folder, filesystem=filesystem)
    shards = tuple(s for s in list_shards(filesystem, folder) if s not in before)

    tagged = failed = 0
    failures: List[Tuple[str, str]] = []
    for shard in shards:
        table = pq.read_table(shard, columns=["path", "error"], filesystem=filesystem)
        bad = pc.is_valid(table.column("error"))
        n_bad = int(pc.sum(bad).as_py() or 0)
        failed += n_bad
        tagged += table.num_rows - n_bad
        if n_bad and len(failures) < 100:
            rows = table.filter(bad).slice(0, 100 - len(failures))
            failures.extend(zip(rows.column("path").to_pylist(), rows.column("error").to_pylist()))
    if tagged + failed != len(todo):
        logger.warning("%d rows written for %d inputs", tagged + failed, len(todo))
    return TagJobSummary(len(sources), skipped, tagged, failed, shards, time.perf_counter() - start, tuple(failures))


def connect(address: str, **init_options: Any) -> bool:
    """Connect to Ray: ``"local"`` starts a cluster on this machine, anything else is a cluster address
    (``auto``, ``HOST:6379``, ``ray://HOST:10001``). Reuses a connection this process already has.
    Returns True when this call started the connection (then :func:`ray.shutdown` is the caller's)."""
    if ray.is_initialized():
        return False
    ray.init(address="local" if address == "local" else address, **init_options)
    return True
