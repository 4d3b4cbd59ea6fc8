"""benchmarks/serve_load.py: the batch-size arithmetic on /metrics text, and one short real run (two
ram-serve processes on 127.0.0.1, two clients, one second each)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("ram_edge_bench_serve_load", REPO / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ram_edge_bench_serve_load", module)
    spec.loader.exec_module(module)
    return module


def test_batch_sizes_between_two_scrapes(serve_load):
    def text(buckets, total, count):
        lines = [f'ram_serve_batch_size_bucket{{le="{le}"}} {v}' for le, v in buckets.items()]
        return "\n".join(lines + [f"ram_serve_batch_size_sum {total}", f"ram_serve_batch_size_count {count}",
                                  'ram_serve_requests_total{endpoint="/v1/tag",status="200"} 9.0'])

    before = serve_load.batch_histogram(text({"1.0": 2.0, "2.0": 2.0, "4.0": 2.0, "+Inf": 2.0}, 2.0, 2.0))
    after = serve_load.batch_histogram(text({"1.0": 3.0, "2.0": 5.0, "4.0": 6.0, "+Inf": 6.0}, 13.0, 6.0))
    assert before == {"1.0": 2.0, "2.0": 2.0, "4.0": 2.0, "+Inf": 2.0, "_sum": 2.0, "_count": 2.0}
    # 4 new batches of 11 images: one of 1, two of 2, one of 3 or 4.
    assert serve_load.batch_sizes(before, after) == {"batches": 4, "images": 11, "mean": 2.75,
                                                     "histogram": {"1": 1, "2": 2, "4": 1}}


def test_short_run_with_and_without_batching(serve_load, test_bundle, image_dir, tmp_path):
    out = tmp_path / "load.json"
    assert serve_load.main([str(test_bundle), "--clients", "2", "--duration", "1", "--warmup", "0",
                            "--images", str(image_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"batching", "no-batching"}
    for mode, result in report["modes"].items():
        assert result["ok"] > 0 and result["errors"] == {}, mode
        assert result["requests"] == result["ok"] == result["latency_ms"]["n"]
        assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
        assert result["batch_sizes"]["images"] == result["ok"]  # one image per request
    assert report["modes"]["no-batching"]["batch_sizes"]["histogram"].keys() == {"1"}
    assert report["modes"]["batching"]["server"]["max_batch"] == 16


def test_short_run_across_stored_vocabularies(serve_load, openset_demo_bundle, image_dir, tmp_path):
    out = tmp_path / "load.json"
    assert serve_load.main([str(openset_demo_bundle), "--clients", "2", "--duration", "1", "--warmup", "0",
                            "--modes", "batching", "--vocabularies", "2", "--images", str(image_dir),
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())["modes"]["batching"]
    assert result["ok"] > 0 and result["errors"] == {}
    assert result["vocabularies"] == 3 and result["targets_per_batch"] >= 1.0
