"""Batch tagging on Ray Data, on one local Ray cluster (2 CPUs) shared by the whole session."""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

from ram_edge.distributed import (  # noqa: E402
    OUTPUT_SCHEMA, TagJobOptions, build_dataset, check_job, list_sources, plan_actor_pool, tag_to_parquet,
)
from ram_edge.runtime import Tagger  # noqa: E402
from ram_edge.runtime.cli import main as ram_tag  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray.data

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a closed network
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def make_images(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        size = (int(rng.integers(32, 90)), int(rng.integers(32, 90)))
        path = folder / f"{prefix}{i:03}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
        paths.append(str(path))
    return paths


def read_rows(out: Path) -> list:
    return pq.read_table(str(out)).to_pylist()


# ------------------------------------------------------------------------------------------------------
# No cluster needed


def test_actor_pool_is_sized_to_the_cluster():
    gpu = plan_actor_pool({"CPU": 32, "GPU": 4})
    assert (gpu.size, gpu.num_gpus, gpu.num_cpus) == (4, 1.0, 1.0)
    cpu = plan_actor_pool({"CPU": 16})  # 2 CPUs left to the reading tasks, 4 threads per actor
    assert (cpu.size, cpu.num_cpus, cpu.num_gpus, cpu.intra_op_threads) == (3, 4.0, 0.0, 4)
    small = plan_actor_pool({"CPU": 2})
    assert (small.size, small.num_cpus) == (1, 1.0)
    assert plan_actor_pool({"CPU": 64}, num_actors=2, cpus_per_actor=8).size == 2


def test_sources_from_folders_globs_and_uris(tmp_path):
    local = make_images(tmp_path / "local", 3)
    remote = make_images(tmp_path / "remote" / "deep", 2, seed=1)
    (tmp_path / "remote" / "notes.txt").write_text("not an image extension: skipped in a listing")
    uri = (tmp_path / "remote").as_uri()
    sources, filesystems = list_sources([str(tmp_path / "local"), local[0], uri, uri + "/deep/" +
                                         Path(remote[0]).name, str(tmp_path / "nothing.png"), uri + "/missing"])
    paths = [s.path for s in sources]
    assert paths[:3] == local  # the folder, sorted; the repeated file is dropped
    assert paths[3:5] == [uri + "/deep/" + Path(p).name for p in remote]  # listed recursively, as URIs
    assert [s.location for s in sources[3:5]] == remote and list(filesystems) == ["file://"]
    assert len(paths) == 7  # the named object equals a listed one by location -> dropped
    errors = {s.path: s.error for s in sources if s.error}
    assert errors == {str(tmp_path / "nothing.png"): "no such file or directory",
                      uri + "/missing": "no such file, folder or prefix"}


# ------------------------------------------------------------------------------------------------------
# On the local cluster


def test_same_tags_as_ram_tag_and_bad_images_are_rows(ray_cluster, test_bundle, tmp_path, capsys):
    folder = tmp_path / "photos"
    make_images(folder, 8)
    make_images(folder / "sub", 3, seed=2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("hello")
    good = (folder / "img000.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 3])
    other = tmp_path / "bucket"
    make_images(other, 3, seed=3, prefix="obj")
    missing = str(tmp_path / "nothing-here.png")

    # The single-process reference: ram-tag on the same images (the URI input as a plain folder).
    reference = tmp_path / "ram-tag.jsonl"
    assert ram_tag([str(test_bundle), str(folder), missing, str(other), "--format", "jsonl", "--out", str(reference),
                    "--threshold", "0.3", "--top-k", "4", "-q"]) == 1
    expected = {r["path"]: r for r in map(json.loads, reference.read_text(encoding="utf-8").splitlines())}

    out = tmp_path / "tags.parquet"
    summary = tag_to_parquet(str(test_bundle), [str(folder), missing, other.as_uri()], str(out),
                             options=TagJobOptions(threshold=0.3, top_k=4, batch_size=4, rows_per_block=5))
    assert (summary.inputs, summary.tagged, summary.failed, summary.skipped) == (18, 14, 4, 0)
    assert len(summary.shards) >= 2 and all(s.endswith(".parquet") for s in summary.shards)
    assert pq.read_schema(summary.shards[0]).equals(OUTPUT_SCHEMA)
    rows = read_rows(out)
    by_path = {r["path"].replace(other.as_uri(), str(other)): r for r in rows}
    assert len(rows) == len(by_path) == len(expected) == 18
    assert set(by_path) == set(expected)
    for path, want in expected.items():
        got = by_path[path]
        if "error" in want:
            assert got["error"] == want["error"] and got["tags"] is None and got["probabilities"] is None, path
        else:
            assert got["error"] is None and got["tags"] == want["tags"] and len(got["tags"]) >= 1, path
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-4)
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "not an image" in errors["notes.jpg"] and "not an image" in errors["empty.jpg"]
    assert "truncated" in errors["cut.jpg"] and errors["nothing-here.png"] == "no such file or directory"
    assert dict(summary.failures).keys() == {r["path"] for r in rows if r["error"]}


def test_reading_tasks_and_model_actors_are_separate_stages(ray_cluster, test_bundle, tmp_path, capsys):
    options = TagJobOptions(batch_size=4)
    sources, filesystems = list_sources(make_images(tmp_path / "few", 2))
    build_dataset(str(test_bundle), sources, filesystems, options, check_job(str(test_bundle), options)).explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(TagImages)]" in plan
    assert "TaskPoolMapOperator[MapBatches(load_images)]" in plan  # not fused into the actors


def _actor_processes() -> dict:
    """pid -> process title of the model actors (Ray titles a worker after its actor class, and appends
    ``.submit`` while the actor runs a batch)."""
    titles = {}
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "TagImages" in title:
            titles[int(cmdline.split("/")[2])] = title
    return titles


def test_a_killed_actor_is_replaced_and_every_row_is_written_once(ray_cluster, test_bundle, tmp_path):
    paths = make_images(tmp_path / "many", 240, seed=5)
    out = tmp_path / "tags.parquet"
    outcome = {}

    def run() -> None:
        try:
            outcome["summary"] = tag_to_parquet(str(test_bundle), [str(tmp_path / "many")], str(out),
                                                options=TagJobOptions(threshold=0, batch_size=4, rows_per_block=8))
        except BaseException as e:  # reported by the assertions below
            outcome["error"] = e

    job = threading.Thread(target=run)
    job.start()
    killed, seen = None, set()
    deadline = time.monotonic() + 300
    while job.is_alive() and time.monotonic() < deadline:
        actors = _actor_processes()
        seen |= set(actors)
        busy = [pid for pid, title in actors.items() if title.endswith(".submit")]
        if killed is None and busy:
            # The actor's first batch: 59 more are to come, and this one must be done again.
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)  # the worker dies as under the OOM killer
        time.sleep(0.005)
    job.join(60)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(paths)  # every image exactly once
    assert (summary.tagged, summary.failed) == (240, 0)
    assert killed is not None, "no actor was seen running a batch"
    assert seen - {killed}, "no replacement actor ran the rest of the job"
    with Tagger(test_bundle) as tagger:
        for row in rows[::20]:
            want = tagger.tag(row["path"], threshold=0)
            assert row["tags"] == list(want.tags)
            np.testing.assert_allclose(row["probabilities"], want.probabilities, rtol=0, atol=1e-5)


def test_ram_tag_ray_resume_skips_done_paths(ray_cluster, test_bundle, tmp_path, capsys):
    first = make_images(tmp_path / "a", 6, seed=7)
    out = tmp_path / "tags.parquet"
    base = [str(test_bundle), "--ray", "local", "--out", str(out), "--threshold", "0", "--top-k", "3"]
    assert ram_tag([base[0], str(tmp_path / "a"), *base[1:]]) == 0
    err = capsys.readouterr().err
    assert "6 tagged, 0 failed" in err and "shards in" in err
    shards_before = set(out.glob("*.parquet"))

    second = make_images(tmp_path / "b", 4, seed=8)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (out / "killed-while-writing.parquet").write_bytes(b"PAR1 and then nothing")  # a shard cut short
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]

    assert ram_tag([base[0], *inputs, *base[1:]]) == 2  # without --resume nothing is overwritten
    assert "already holds" in capsys.readouterr().err
    assert ram_tag([base[0], *inputs, *base[1:], "--resume"]) == 1  # the broken image
    err = capsys.readouterr().err
    assert "resumed: 6 of 11 inputs" in err and "4 tagged, 1 failed" in err and "broken.png" in err
    assert not (out / "killed-while-writing.parquet").exists()
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(first + second + [str(tmp_path / "b" / "broken.png")])
    new_rows = [r for s in set(out.glob("*.parquet")) - shards_before for r in pq.read_table(str(s)).to_pylist()]
    assert sorted(r["path"] for r in new_rows) == sorted(second + [str(tmp_path / "b" / "broken.png")])
    assert all(len(r["tags"]) == 3 for r in rows if r["error"] is None)

    assert ram_tag([base[0], *inputs, *base[1:], "--resume"]) == 0  # nothing left to do
    assert "resumed: 11 of 11" in capsys.readouterr().err
    assert len(read_rows(out)) == 11


def test_ram_tag_ray_with_vocab_or_tags_equals_ram_tag(ray_cluster, openset_demo_bundle, tmp_path, capsys):
    """An open-set vocabulary on Ray: --vocab DIR (loaded by the actor) and --tags (built once on the driver,
    shipped through the object store) give ram-tag --tags' tags."""
    from ram_edge.runtime.vocab_cli import main as ram_vocab

    bundle = str(openset_demo_bundle)
    paths = make_images(tmp_path / "photos", 3, seed=9)
    vocab = tmp_path / "vocab"
    tags = "otter,kayak,sky,paddle board"
    assert ram_vocab(["build", bundle, "--tags", tags, "--out", str(vocab), "-q"]) == 0
    reference = tmp_path / "ram-tag.jsonl"
    assert ram_tag([bundle, *paths, "--tags", tags, "--top-k", "3", "--threshold", "0", "--format", "jsonl",
                    "--out", str(reference), "-q"]) == 0
    expected = {r["path"]: r for r in map(json.loads, reference.read_text(encoding="utf-8").splitlines())}
    assert len(expected) == 3 and all(len(r["tags"]) == 3 for r in expected.values())
    for name, vocabulary in (("vocab", ["--vocab", str(vocab)]), ("tags", ["--tags", tags])):
        out = tmp_path / f"{name}.parquet"
        assert ram_tag([bundle, *paths, *vocabulary, "--top-k", "3", "--threshold", "0", "--ray", "local",
                        "--out", str(out), "-q"]) == 0
        rows = read_rows(out)
        assert sorted(r["path"] for r in rows) == sorted(paths)
        for row in rows:
            want = expected[row["path"]]
            assert row["error"] is None and row["tags"] == want["tags"], (name, row, want)
            np.testing.assert_allclose(row["probabilities"], want["probabilities"], rtol=0, atol=1e-4)
    assert ram_tag([bundle, *paths, "--tags", "otter,,kayak", "--ray", "local", "--out", str(tmp_path / "x")]) == 2
    assert "empty name at position 1" in capsys.readouterr().err


def test_ram_tag_ray_usage_errors(test_bundle, tmp_path, capsys):
    folder = str(tmp_path)
    assert ram_tag([str(test_bundle), folder, "--ray", "local"]) == 2
    assert "--ray needs --out" in capsys.readouterr().err
    assert ram_tag([str(test_bundle), folder, "--ray", "local", "--out", "x.parquet", "--format", "jsonl"]) == 2
    assert "--format does not apply" in capsys.readouterr().err
    assert ram_tag([str(test_bundle), folder, "--ray", "local", "--out", "x.parquet", "--workers", "2"]) == 2
    assert ram_tag([str(test_bundle), folder, "--ray", "local", "--out", "x.parquet", "--ray-actors", "0"]) == 2
    assert "--ray-actors must be >= 1" in capsys.readouterr().err
    assert ram_tag([str(test_bundle), folder, "--ray", "local", "--out", "x.parquet", "--classify", "cat,dog"]) == 2
    assert "run --classify without --ray" in capsys.readouterr().err
    assert ram_tag([str(test_bundle), folder, "--ray", "local", "--out", "x.parquet", "--tags", "a,b"]) == 2
    assert "has no text encoder" in capsys.readouterr().err
