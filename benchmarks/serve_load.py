#!/usr/bin/env python
"""Load test of the tagging service: N concurrent clients for a bounded time, batching on and off.

    python benchmarks/serve_load.py BUNDLE --clients 8 --duration 10 --out serve_load.json
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --duration 10

With a BUNDLE it starts ``ram-serve`` on 127.0.0.1 (a free port) once per mode — ``batching``
(``--max-batch`` / ``--max-wait-ms``) and ``no-batching`` (``--max-batch 1``) — waits for /healthz, and
stops it afterwards; with ``--url`` it measures that running service as it is configured (one mode,
``as-configured``). Every client is a thread with its own keep-alive connection that posts one image
per request (``--images``, cycled) until ``--duration`` seconds have passed, so the load is bounded in
time and stays on this machine. Reports per mode: requests, answers by status, throughput, latency
percentiles, and the batch sizes the service formed (from its /metrics histogram, before and after).
``--vocabularies N`` (a bundle with a text encoder) first stores N small open-set vocabularies with
``POST /v1/vocabularies`` and makes the clients cycle through them and the default one, request by
request: the report then shows how many targets a batch was decoded against (one encoder call each).
Clients and server share the machine's CPUs: on a small machine the numbers are a floor, not a capacity.
Writes JSON to ``--out`` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import summarize  # noqa: E402  (percentiles, shared with the latency benchmark)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / "examples" / "images"
BATCH_METRIC = "ram_serve_batch_size"
TARGETS_METRIC = "ram_serve_batch_targets"


def log(message: str) -> None:
    print(f"[serve_load] {message}", file=sys.stderr, flush=True)


# -- pure functions (tested in tests/test_serve_load.py) -----------------------------------------------


def batch_histogram(metrics_text: str, metric: str = BATCH_METRIC) -> Dict[str, float]:
    """Cumulative bucket counts of a histogram (default: batch sizes), plus ``_sum`` and ``_count``."""
    out: Dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = re.match(rf'^{metric}_bucket\{{le="([^"]+)"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        m = re.match(rf"^{metric}_(sum|count) (\S+)$", line)
        if m:
            out["_" + m.group(1)] = float(m.group(2))
    return out


def batch_sizes(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, object]:
    """The batches formed between two scrapes: how many, their mean size, and how many fell in each
    histogram bucket (``"8": 3`` = three batches of more than the previous bound and at most 8 images)."""
    count = after.get("_count", 0.0) - before.get("_count", 0.0)
    total = after.get("_sum", 0.0) - before.get("_sum", 0.0)
    bounds = sorted((k for k in after if not k.startswith("_")), key=lambda k: float(k))
    per_bucket, previous = {}, 0.0
    for bound in bounds:
        cumulative = after[bound] - before.get(bound, 0.0)
        if cumulative - previous > 0:
            label = bound[:-2] if bound.endswith(".0") else bound
            per_bucket[label] = int(round(cumulative - previous))
        previous = cumulative
    return {"batches": int(count), "images": int(total), "mean": total / count if count else 0.0,
            "histogram": per_bucket}


# -- the load --------------------------------------------------------------------------------------------


def run_clients(url: str, images: List[Tuple[str, bytes]], clients: int, duration: float, timeout: float,
                vocabularies: Sequence[Optional[str]] = (None,)) -> Tuple[List[float], Dict[str, int], float]:
    """``clients`` threads post images for ``duration`` seconds, each request against the next of
    ``vocabularies`` (ids; None: the default). Returns latencies of 200 answers (s), answers by status
    ("error" for transport failures), and the wall time."""
    import httpx

    latencies: List[float] = []
    statuses: Dict[str, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        mine: List[float] = []
        counts: Dict[str, int] = {}
        with httpx.Client(timeout=timeout) as http:
            barrier.wait()
            i = index
            while time.monotonic() < stop_at[0]:
                name, data = images[i % len(images)]
                fields = {"top_k": "5"}
                vocabulary = vocabularies[i % len(vocabularies)]
                if vocabulary is not None:
                    fields["vocabulary"] = vocabulary
                i += 1
                start = time.perf_counter()
                try:
                    response = http.post(url + "/v1/tag", files=[("images", (name, data))], data=fields)
                    key = str(response.status_code)
                except httpx.HTTPError:
                    key = "error"
                if key == "200":
                    mine.append(time.perf_counter() - start)
                counts[key] = counts.get(key, 0) + 1
        with lock:
            latencies.extend(mine)
            for key, n in counts.items():
                statuses[key] = statuses.get(key, 0) + n

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + duration
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(duration + timeout + 30)
    return latencies, statuses, time.perf_counter() - started


def store_vocabularies(url: str, count: int) -> List[Optional[str]]:
    """Store ``count`` open-set vocabularies of four tags each; returns the targets the clients cycle
    through: None (the default vocabulary), then their ids."""
    import httpx

    ids: List[Optional[str]] = [None]
    for k in range(count):
        body = {"id": f"load-{k}", "names": [f"object {k} {j}" for j in range(4)]}
        response = httpx.post(url + "/v1/vocabularies", json=body, timeout=600)
        if response.status_code == 409 and "exists" in response.text:  # --url: stored by an earlier run
            ids.append(body["id"])
            continue
        if response.status_code != 201:
            raise SystemExit(f"serve_load: POST /v1/vocabularies answered {response.status_code}: {response.text}")
        ids.append(body["id"])
    return ids


def measure(url: str, images, clients: int, duration: float, timeout: float, warmup: float,
            vocabularies: int = 0) -> Dict[str, object]:
    import httpx

    targets = store_vocabularies(url, vocabularies)
    if warmup > 0:
        run_clients(url, images, clients, warmup, timeout, targets)
    scrape = httpx.get(url + "/metrics", timeout=30).text
    before, targets_before = batch_histogram(scrape), batch_histogram(scrape, TARGETS_METRIC)
    latencies, statuses, wall = run_clients(url, images, clients, duration, timeout, targets)
    scrape = httpx.get(url + "/metrics", timeout=30).text
    after, targets_after = batch_histogram(scrape), batch_histogram(scrape, TARGETS_METRIC)
    ok = statuses.get("200", 0)
    report: Dict[str, object] = {
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": {k: v for k, v in statuses.items() if k != "200"},
        "seconds": wall,
        "throughput_rps": ok / wall if wall > 0 else 0.0,
        "batch_sizes": batch_sizes(before, after),
        "vocabularies": len(targets),
        "targets_per_batch": batch_sizes(targets_before, targets_after)["mean"],
    }
    if latencies:
        report["latency_ms"] = {k: (v * 1000 if k != "n" else v) for k, v in summarize(latencies).items()}
    return report


class Service:
    """``ram-serve BUNDLE --port 0 ...`` as a child process, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, bundle: str, extra: Sequence[str]):
        command = [sys.executable, "-m", "ram_edge.serving.cli", bundle, "--port", "0", "--no-access-log",
                   "--log-level", "warning", *extra]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if not match:
            self.stop()
            raise RuntimeError(f"ram-serve did not start: {line}{self.process.stderr.read()}")
        self.url = match.group(1)
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"ram-serve exited with status {self.process.returncode}")
            time.sleep(0.1)
        raise RuntimeError("ram-serve did not become healthy")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def load_images(folder: Path) -> List[Tuple[str, bytes]]:
    from ram_edge.runtime.preprocess import is_image_path

    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p)) if folder.is_dir() else [folder]
    if not paths:
        raise SystemExit(f"serve_load: no images in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("bundle", nargs="?", help="bundle to serve (starts ram-serve per mode); omit with --url")
    p.add_argument("--url", help="measure this running service instead (http://127.0.0.1:PORT)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per mode (10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (1)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="an image or a folder of images to post")
    p.add_argument("--max-batch", type=int, default=16, help="ram-serve --max-batch in the batching mode (16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="ram-serve --max-wait-ms in the batching mode (5)")
    p.add_argument("--modes", nargs="+", choices=("batching", "no-batching"), default=["batching", "no-batching"])
    p.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout, seconds (60)")
    p.add_argument("--vocabularies", type=int, default=0, metavar="N",
                   help="store N open-set vocabularies first and cycle requests through them and the default "
                        "(needs a bundle with a text encoder; default 0: the default vocabulary only)")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                   help="further ram-serve flags, e.g. --serve-args --intra-op-threads 2 (must come last)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    if (args.bundle is None) == (args.url is None):
        p.error("give a BUNDLE to serve or --url of a running service (one of them)")
    if args.clients < 1 or args.duration <= 0 or args.vocabularies < 0:
        p.error("--clients must be >= 1, --duration > 0 and --vocabularies >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    images = load_images(args.images)
    report: Dict[str, object] = {
        "benchmark": "serve_load",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "clients": args.clients, "duration_s": args.duration, "images": [name for name, _ in images],
        "modes": {},
    }
    if args.url:
        log(f"{args.clients} clients for {args.duration:g} s against {args.url}")
        report["modes"]["as-configured"] = measure(args.url.rstrip("/"), images, args.clients, args.duration,
                                                   args.timeout, args.warmup, args.vocabularies)
    else:
        report["bundle"] = args.bundle
        for mode in args.modes:
            max_batch = args.max_batch if mode == "batching" else 1
            flags = ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
                     "--max-queue", str(max(64, 4 * args.clients)), *args.serve_args]
            service = Service(args.bundle, flags)
            try:
                service.wait_ready()
                log(f"{mode}: {args.clients} clients for {args.duration:g} s, ram-serve {' '.join(flags)}")
                result = measure(service.url, images, args.clients, args.duration, args.timeout, args.warmup,
                                 args.vocabularies)
            finally:
                service.stop()
            result["server"] = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, "flags": flags}
            report["modes"][mode] = result
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    for mode, result in report["modes"].items():
        lat = result.get("latency_ms", {})
        log(f"{mode}: {result['throughput_rps']:.1f} req/s, p50 {lat.get('p50', float('nan')):.1f} ms, "
            f"p99 {lat.get('p99', float('nan')):.1f} ms, errors {result['errors'] or 'none'}, "
            f"mean batch {result['batch_sizes']['mean']:.2f}, {result['targets_per_batch']:.2f} targets per batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
