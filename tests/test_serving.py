"""The tagging service over real HTTP: uvicorn on 127.0.0.1 in a thread (tests/_serving.py), the test
bundle from conftest, httpx as the client; raw sockets where a client must stall mid-request."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from _serving import ServerThread, metric_value, metrics, png, post_tag  # noqa: E402
from conftest import make_test_vocabulary  # noqa: E402
from ram_edge.runtime import Tagger  # noqa: E402
from ram_edge.serving import ServeConfig  # noqa: E402
from ram_edge.serving.app import STATIC_DIR  # noqa: E402
from ram_edge.serving.cli import bind, main  # noqa: E402


def jpeg(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def multipart(image: bytes, boundary: str = "ramedgeboundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"threshold\"\r\n\r\n0\r\n"
         f"--{boundary}--\r\n").encode()


def start_raw_request(server: ServerThread, body: bytes, send: int) -> socket.socket:
    """A POST /v1/tag whose headers and first ``send`` body bytes are sent; the rest is held back."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary=ramedgeboundary\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[:send])
    return sock


def read_response(sock: socket.socket):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    import json

    return int(lines[0].split()[1]), headers, json.loads(body)


def wait_for_metric(server: ServerThread, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric_value(metrics(server), name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------------


def test_tags_equal_the_tagger_and_health_model_metrics(test_bundle):
    images = [png(seed=1), jpeg(seed=2)]
    with Tagger(test_bundle) as tagger:
        expected = tagger.tag(images, threshold=0, top_k=4, lang="zh")
    with ServerThread(test_bundle) as server:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "text_encoder": False}
        response = post_tag(server, images, threshold=0, top_k=4, lang="zh")
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 2
        for got, want in zip(results, expected):
            assert got["tags"] == list(want.tags) and len(got["tags"]) == 4 and got["tags"][0].startswith("标签")
            np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=0, atol=1e-6)
        # Default: the bundle's threshold (0.68), every tag above it, most probable first.
        default = post_tag(server, images[:1]).json()["results"][0]
        assert all(p > 0.68 for p in default["probabilities"])
        assert default["probabilities"] == sorted(default["probabilities"], reverse=True)

        model = httpx.get(server.url + "/v1/model").json()
        assert model["num_tags"] == 6 and model["languages"] == ["en", "zh"]
        assert model["model"]["image_size"] == 64 and model["limits"]["max_images_per_request"] == 16
        assert model["open_set"]["text_encoder"] is False and model["classification"] is False

        text = metrics(server)
        assert metric_value(text, "ram_serve_requests_total", endpoint="/v1/tag", status="200") == 2
        assert metric_value(text, "ram_serve_images_total") == 3
        assert metric_value(text, "ram_serve_batch_size_sum") == 3
        assert metric_value(text, "ram_serve_request_seconds_count", endpoint="/v1/tag") == 2
        assert "ram_serve_requests_in_flight 0.0" in text and "ram_serve_queued_images 0.0" in text


def test_every_bad_input_is_a_4xx_with_a_reason_and_the_service_goes_on(test_bundle, tmp_path):
    config = ServeConfig(max_images_per_request=3, max_upload_bytes=256 * 1024)
    good = png(seed=3)
    cut = jpeg(seed=4)
    on_disk = tmp_path / "on_disk.png"
    on_disk.write_bytes(good)
    big_upload = png(400, 300, seed=5)  # random pixels do not compress: ~360 KB
    assert len(big_upload) > 256 * 1024
    cases = [
        ("not an image", dict(images=[b"hello, not pixels"]), 400, "not an image"),
        ("empty file", dict(images=[b""]), 400, "empty"),
        ("truncated", dict(images=[cut[: len(cut) // 3]]), 400, "truncated"),
        ("a path is bytes, never opened", dict(images=[str(on_disk).encode()]), 400, "not an image"),
        ("too many pixels", dict(images=[png(200, 200, seed=6)]), 400, "over the limit of 20,000"),
        ("second image bad", dict(images=[good, b"GIF89a broken"]), 400, "images[1]"),
        ("threshold above 1", dict(images=[good], threshold=2), 422, "threshold"),
        ("threshold not a number", dict(images=[good], threshold="abc"), 422, "threshold"),
        ("top_k zero", dict(images=[good], top_k=0), 422, "top_k"),
        ("top_k not an int", dict(images=[good], top_k="many"), 422, "top_k"),
        ("unknown language", dict(images=[good], lang="fr"), 422, "lang"),
        ("no image", dict(images=[], top_k=3), 422, "images"),
        ("too many images", dict(images=[good] * 4), 413, "limit is 3"),
        ("body too large", dict(images=[big_upload]), 413, "over the limit of 262,144 bytes"),
    ]
    with ServerThread(test_bundle, config, max_pixels=20_000) as server:
        for name, request, status, reason in cases:
            response = post_tag(server, **request)
            assert response.status_code == status, (name, response.text)
            assert response.headers["content-type"] == "application/json", name
            assert reason in response.json()["error"], (name, response.json())
            after = post_tag(server, [good], threshold=0)  # the service keeps serving
            assert after.status_code == 200 and len(after.json()["results"][0]["tags"]) == 6, name

        # Without Content-Length (chunked), the limit applies to the bytes as they arrive.
        body = multipart(big_upload)
        chunked = httpx.post(server.url + "/v1/tag", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                             headers={"Content-Type": "multipart/form-data; boundary=ramedgeboundary"}, timeout=30)
        assert chunked.status_code == 413 and "262,144 bytes" in chunked.json()["error"]
        assert post_tag(server, [good]).status_code == 200

        # A path in a text field is refused as not a file: nothing is read from the server's disk.
        response = httpx.post(server.url + "/v1/tag", data={"images": str(on_disk)}, timeout=30)
        assert response.status_code == 422 and "images" in response.json()["error"]
        # A body that is not multipart at all, and unknown URLs, are JSON errors too.
        response = httpx.post(server.url + "/v1/tag", json={"images": [str(on_disk)]}, timeout=30)
        assert response.status_code == 422 and "error" in response.json()
        assert httpx.get(server.url + "/v2/nothing").json() == {"error": "Not Found"}

        text = metrics(server)
        assert metric_value(text, "ram_serve_errors_total", endpoint="/v1/tag", reason="bad_input") == 6
        assert metric_value(text, "ram_serve_errors_total", endpoint="/v1/tag", reason="bad_parameter") == 8
        assert metric_value(text, "ram_serve_errors_total", endpoint="/v1/tag", reason="too_large") == 3
        assert httpx.get(server.url + "/healthz").status_code == 200


def test_chinese_names_missing_is_400(bundle_factory):
    bundle = bundle_factory(vocabulary=make_test_vocabulary(with_zh=False))
    with ServerThread(bundle) as server:
        response = post_tag(server, [png()], lang="zh")
        assert response.status_code == 400 and "no names in that language" in response.json()["error"]
        assert httpx.get(server.url + "/v1/model").json()["languages"] == ["en"]


def _concurrent(server: ServerThread, images) -> list:
    results = [None] * len(images)
    barrier = threading.Barrier(len(images))

    def client(i: int) -> None:
        barrier.wait()
        results[i] = post_tag(server, [images[i]], threshold=0, timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


@pytest.mark.parametrize("max_batch, batches", [(4, 1), (1, 4)], ids=["batching", "no-batching"])
def test_concurrent_requests_share_one_encoder_call(test_bundle, max_batch, batches):
    # A wait far longer than the test: with batching the batch closes when its 4th image arrives.
    config = ServeConfig(max_batch=max_batch, max_wait_ms=60_000, request_timeout=120)
    images = [png(seed=10 + i) for i in range(4)]
    with Tagger(test_bundle) as tagger:
        expected = [tagger.tag(image, threshold=0) for image in images]
    with ServerThread(test_bundle, config) as server:
        responses = _concurrent(server, images)
        for response, want in zip(responses, expected):
            assert response.status_code == 200, response.text
            got = response.json()["results"][0]
            assert got["tags"] == list(want.tags)
            np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=0, atol=1e-5)
        text = metrics(server)
        assert metric_value(text, "ram_serve_batch_size_count") == batches
        assert metric_value(text, "ram_serve_batch_size_sum") == 4
        assert metric_value(text, "ram_serve_batch_size_bucket", le=f"{4 // batches}.0") == batches


def test_full_queue_answers_503_then_serves_again(test_bundle):
    with ServerThread(test_bundle, ServeConfig(max_queue=1)) as server:
        body = multipart(png(seed=20))
        stalled = start_raw_request(server, body, send=len(body) // 2)  # admitted, body incomplete
        try:
            wait_for_metric(server, "ram_serve_requests_in_flight", 1)
            refused = post_tag(server, [png(seed=21)])
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "--max-queue" in refused.json()["error"]
            stalled.sendall(body[len(body) // 2:])
            status, _, answer = read_response(stalled)
            assert status == 200 and len(answer["results"][0]["tags"]) == 6
        finally:
            stalled.close()
        wait_for_metric(server, "ram_serve_requests_in_flight", 0)
        assert post_tag(server, [png(seed=21)]).status_code == 200
        assert metric_value(metrics(server), "ram_serve_errors_total", endpoint="/v1/tag", reason="overloaded") == 1


def test_a_body_that_stalls_past_the_timeout_is_408(test_bundle):
    with ServerThread(test_bundle, ServeConfig(request_timeout=0.5)) as server:
        body = multipart(png(seed=22))
        stalled = start_raw_request(server, body, send=100)
        try:
            status, _, answer = read_response(stalled)  # the server answers without the rest of the body
        finally:
            stalled.close()
        assert status == 408 and "--request-timeout" in answer["error"]
        assert post_tag(server, [png(seed=22)]).status_code == 200
        wait_for_metric(server, "ram_serve_requests_in_flight", 0)


def test_no_answer_within_the_timeout_is_504_and_the_image_is_dropped(test_bundle):
    # The batcher holds the first image up to a minute for three more that never come.
    config = ServeConfig(max_batch=4, max_wait_ms=60_000, request_timeout=0.5)
    with ServerThread(test_bundle, config) as server:
        response = post_tag(server, [png(seed=23)])
        assert response.status_code == 504 and "--request-timeout" in response.json()["error"]
        wait_for_metric(server, "ram_serve_requests_in_flight", 0)
        assert metric_value(metrics(server), "ram_serve_errors_total", endpoint="/v1/tag", reason="timeout") == 1
    # Shutting down released the waiting batch; the timed-out image never reached the encoder.
    assert metric_value(generate_latest(server.service.metrics.registry).decode(), "ram_serve_images_total") == 0


def test_bearer_token(test_bundle):
    good = png(seed=30)
    with ServerThread(test_bundle, ServeConfig(token="s3cret", token_scope="all")) as server:
        missing = post_tag(server, [good])
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in missing.json()["error"]
        assert post_tag(server, [good], headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + "/v1/model").status_code == 401
        assert post_tag(server, [good], headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/healthz").status_code == 200  # probes and scrapers need no token
        assert httpx.get(server.url + "/metrics").status_code == 200
    # The default scope guards only endpoints that change state: tagging stays open.
    with ServerThread(test_bundle, ServeConfig(token="s3cret")) as server:
        assert post_tag(server, [good]).status_code == 200


def test_page_static_files_and_openapi(test_bundle):
    with ServerThread(test_bundle) as server:
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        # Nothing is loaded from another origin: every src / href is local.
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert refs and all(r.startswith("/") for r in refs), refs
        for name in ("app.js", "style.css"):
            asset = httpx.get(f"{server.url}/static/{name}")
            assert asset.status_code == 200 and asset.text == (STATIC_DIR / name).read_text(encoding="utf-8")
        assert "http://" not in (STATIC_DIR / "app.js").read_text() and "https://" not in (STATIC_DIR / "style.css").read_text()

        schema = httpx.get(server.url + "/openapi.json").json()
        operation = schema["paths"]["/v1/tag"]["post"]
        ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert set(schema["components"]["schemas"][ref]["properties"]) == {
            "images", "threshold", "top_k", "lang", "vocabulary", "tags", "classify", "caption", "num_beams"}
        assert {"400", "404", "413", "422", "501", "503"} <= set(operation["responses"])
        assert {"post", "get"} <= set(schema["paths"]["/v1/vocabularies"])
        assert {"get", "delete"} <= set(schema["paths"]["/v1/vocabularies/{vocabulary_id}"])
        assert httpx.get(server.url + "/docs").status_code == 200


def test_cli_help_version_and_usage_errors(test_bundle, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--max-batch", "--max-wait-ms", "--max-queue", "--token", "127.0.0.1", "exit status"):
        assert text in out
    assert main(["--version"]) == 0
    assert main([str(test_bundle), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main([str(test_bundle.parent / "missing")]) == 2
    assert "ram-serve: error:" in capsys.readouterr().err
    busy = bind("127.0.0.1", 0)
    try:
        assert main([str(test_bundle), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        busy.close()


def test_ram_serve_process_serves_and_stops_on_ctrl_c(test_bundle):
    env = dict(os.environ, RAM_SERVE_TOKEN="tok")
    process = subprocess.Popen(
        [sys.executable, "-m", "ram_edge.serving.cli", str(test_bundle), "--port", "0", "--max-batch", "4",
         "--token-scope", "all", "--no-access-log"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = process.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "ram-serve did not become healthy"
            time.sleep(0.1)
        files = [("images", ("a.png", png(seed=40), "image/png"))]
        assert httpx.post(url + "/v1/tag", files=files, timeout=30).status_code == 401  # token from the env
        ok = httpx.post(url + "/v1/tag", files=files, headers={"Authorization": "Bearer tok"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["results"][0]["tags"]
        assert httpx.get(url + "/v1/model", headers={"Authorization": "Bearer tok"}).json()["batching"]["max_batch"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


# ------------------------------------------------------------------------------------------------------
# The batcher on its own: which images share an encoder call, decided deterministically by holding the
# worker inside a call while more images queue up.


def test_batcher_forms_batches_and_decodes_per_vocabulary():
    from ram_edge.runtime.tagger import select_tags
    from ram_edge.serving import Batcher, WorkItem

    gate, entered = threading.Event(), threading.Event()
    encoded, decoded = [], []

    def encode(pixels):
        encoded.append(len(pixels))
        entered.set()
        gate.wait(30)
        return pixels.reshape(len(pixels), -1)[:, :3] * 1.0

    def decode(target, embeds):
        decoded.append((target, len(embeds)))
        return embeds + (0.0 if target is None else 1.0)

    def select(probabilities, item):
        return select_tags(probabilities, 0.0, ["a", "b", "c"], item.top_k)[0]

    batcher = Batcher(encode, decode, select, max_batch=3, max_wait_ms=0)
    try:
        first = WorkItem(np.full((3, 2, 2), 0.1, np.float32))
        batcher.submit([first])
        assert entered.wait(30)  # the worker is inside encode with a batch of one
        later = [WorkItem(np.full((3, 2, 2), 0.2 + 0.1 * i, np.float32), top_k=2, target=v)
                 for i, v in enumerate([None, None, "outdoor", None])]
        later[1].future.cancel()  # a request that gave up: dropped before the encoder runs
        batcher.submit(later)
        assert batcher.queued == 4
        gate.set()
        results = [item.future.result(30) for item in [first, later[0], later[2], later[3]]]
        # 1, then 3 of the 4 queued (max_batch) less the cancelled one: two vocabularies share one encoder
        # call and are decoded apart; then the last.
        assert encoded == [1, 2, 1]
        assert decoded == [(None, 1), (None, 1), ("outdoor", 1), (None, 1)]
        assert [len(r.tags) for r in results] == [3, 2, 2, 2]
        assert results[1].probabilities[0] == pytest.approx(0.2)
        assert results[2].probabilities[0] == pytest.approx(0.4 + 1.0)  # its own vocabulary's scores
    finally:
        gate.set()
        batcher.close()
    assert not batcher.alive
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit([WorkItem(np.zeros((3, 2, 2), np.float32))])


def test_batcher_reports_a_failed_batch_to_each_request():
    from ram_edge.serving import Batcher, WorkItem

    def encode(pixels):
        raise RuntimeError("device lost")

    batcher = Batcher(encode, lambda v, e: e, lambda p, item: None, max_batch=4, max_wait_ms=0)
    try:
        items = [WorkItem(np.zeros((3, 2, 2), np.float32)) for _ in range(2)]
        batcher.submit(items)
        for item in items:
            with pytest.raises(RuntimeError, match="device lost"):
                item.future.result(30)
        assert batcher.alive  # the worker survives and takes the next batch
    finally:
        batcher.close()


def test_batcher_a_failing_target_fails_only_its_images():
    from ram_edge.runtime.tagger import select_tags
    from ram_edge.serving import Batcher, WorkItem

    encoded = []

    def encode(pixels):
        encoded.append(len(pixels))
        return pixels.reshape(len(pixels), -1)[:, :3] * 1.0

    def decode(target, embeds):
        if target == "broken":
            raise ValueError("vocabulary embeddings are 4 wide but this bundle's model takes embed_dim=8")
        return embeds

    batcher = Batcher(encode, decode, lambda p, item: select_tags(p, 0.0, ["a", "b", "c"])[0], max_batch=3,
                      max_wait_ms=60_000)
    try:
        items = [WorkItem(np.full((3, 2, 2), 0.5, np.float32), target=t) for t in (None, "broken", None)]
        batcher.submit(items)
        assert [len(items[i].future.result(30).tags) for i in (0, 2)] == [3, 3]
        with pytest.raises(ValueError, match="embed_dim=8"):
            items[1].future.result(30)
        assert encoded == [3]  # one encoder call for the three
    finally:
        batcher.close()
