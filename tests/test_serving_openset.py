"""Open-set vocabularies and classification in the service, over real HTTP: POST / GET / DELETE
/v1/vocabularies, /v1/tag with vocabulary / tags / classify against the Tagger's own answers, several
vocabularies in one batch, bad bodies, the token, a bundle without a text encoder. The demo bundle
(ram-export --demo ram_plus_tiny_384 --num-tags 200, with its demo text encoder) is exported once per
session (conftest's openset_demo_bundle)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _serving import ServerThread, metric_value, metrics, png, post_tag  # noqa: E402
from ram_edge.runtime import Tagger, Vocabulary  # noqa: E402
from ram_edge.serving import ServeConfig  # noqa: E402
from ram_edge.serving.cli import main as serve_main  # noqa: E402

OUTDOOR = ["otter", "kayak", "paddle board"]
DESCRIPTIONS = [{"river otter": ["an otter swimming in a river", "a furry animal with whiskers"]},
                {"canoe": ["a narrow boat paddled by hand"]}]
IMAGES = [png(seed=50), png(120, 90, seed=51)]


def post_vocabulary(server: ServerThread, body, token=None, timeout: float = 120) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return httpx.post(server.url + "/v1/vocabularies", json=body, headers=headers, timeout=timeout)


def assert_same(got: dict, want, key: str = "tags") -> None:
    """A result of the service equals the Tagger's (probabilities within float rounding of another batch
    shape)."""
    names = want.tags if key == "tags" else want.labels
    assert got[key] == list(names), (got, want)
    np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def expected(openset_demo_bundle):
    """What the Tagger answers for IMAGES: with a vocabulary from OUTDOOR (otter at 0.6), merged
    descriptions, the request-time tags, and classification."""
    with Tagger(openset_demo_bundle) as tagger:
        text = tagger.text_encoder
        out: dict = {}
        tagger.set_vocabulary(Vocabulary.from_names(OUTDOOR, text, thresholds={"otter": 0.6}))
        out["outdoor"] = tagger.tag(IMAGES, threshold=0)
        out["outdoor_default_thresholds"] = tagger.tag(IMAGES)
        default = Vocabulary.load(tagger.bundle.vocabulary_dir)
        merged = Vocabulary.concat(default, Vocabulary.from_descriptions(DESCRIPTIONS, text),
                                   default_threshold=tagger.default_threshold)
        tagger.set_vocabulary(merged)
        out["merged"] = tagger.tag(IMAGES, threshold=0, top_k=8)
        out["merged_default_thresholds"] = tagger.tag(IMAGES)
        tagger.set_vocabulary(Vocabulary.from_names(["sky", "dog"], text))
        out["sky_dog"] = tagger.tag(IMAGES, threshold=0)
        tagger.set_vocabulary(default)
        out["default"] = tagger.tag(IMAGES, threshold=0, top_k=5)
        out["classes"] = tagger.classify(IMAGES, ["cat", "dog", "bird"])
    return out


# ------------------------------------------------------------------------------------------------------


def test_build_list_tag_and_delete_vocabularies(openset_demo_bundle, expected):
    with ServerThread(openset_demo_bundle) as server:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "text_encoder": True}
        created = post_vocabulary(server, {"id": "outdoor", "names": OUTDOOR, "thresholds": {"otter": 0.6},
                                           "names_zh": {"otter": "水獭"}})
        assert created.status_code == 201, created.text
        summary = created.json()
        assert summary["id"] == "outdoor" and summary["num_tags"] == 3 and summary["recipe"] == "names"
        assert summary["texts"] == 3 * 63 and summary["merge_default"] is False
        assert summary["embedding_bytes"] == 3 * 63 * 512 * 4

        merged = post_vocabulary(server, {"descriptions": DESCRIPTIONS, "merge_default": True})
        assert merged.status_code == 201, merged.text
        merged_id = merged.json()["id"]
        assert merged_id.startswith("vocab-") and merged.json()["num_tags"] == 202
        assert merged.json()["num_own_tags"] == 2 and merged.json()["texts"] == 3

        listed = httpx.get(server.url + "/v1/vocabularies").json()
        assert [v["id"] for v in listed["vocabularies"]] == ["outdoor", merged_id]
        assert listed["max_vocabularies"] == 16 and listed["text_encoder"] is True
        detail = httpx.get(server.url + "/v1/vocabularies/outdoor").json()
        assert detail["tags"] == OUTDOOR and detail["names_zh"] == ["水獭", "kayak", "paddle board"]
        assert detail["thresholds"] == pytest.approx([0.6, 0.5, 0.5]) and detail["descriptions_per_tag"] == [63] * 3

        # Tagging against them equals Tagger.set_vocabulary(...) + tag, with the request's threshold or the
        # vocabulary's own per-tag thresholds.
        for fields, want in (({"threshold": 0}, "outdoor"), ({}, "outdoor_default_thresholds")):
            response = post_tag(server, IMAGES, vocabulary="outdoor", **fields)
            assert response.status_code == 200, response.text
            for got, result in zip(response.json()["results"], expected[want]):
                assert_same(got, result)
        for fields, want in (({"threshold": 0, "top_k": 8}, "merged"), ({}, "merged_default_thresholds")):
            for got, result in zip(post_tag(server, IMAGES, vocabulary=merged_id, **fields).json()["results"],
                                   expected[want]):
                assert_same(got, result)
        zh = post_tag(server, IMAGES[:1], vocabulary="outdoor", threshold=0, lang="zh").json()["results"][0]
        assert sorted(zh["tags"]) == sorted(["水獭", "kayak", "paddle board"])  # own names where no Chinese one
        # The default vocabulary is untouched.
        for got, result in zip(post_tag(server, IMAGES, threshold=0, top_k=5).json()["results"], expected["default"]):
            assert_same(got, result)

        deleted = httpx.delete(server.url + "/v1/vocabularies/outdoor")
        assert deleted.status_code == 200 and deleted.json() == {"deleted": "outdoor"}
        for response in (post_tag(server, IMAGES[:1], vocabulary="outdoor"),
                         httpx.get(server.url + "/v1/vocabularies/outdoor"),
                         httpx.delete(server.url + "/v1/vocabularies/outdoor")):
            assert response.status_code == 404 and "'outdoor' not found" in response.json()["error"]

        text = metrics(server)
        assert metric_value(text, "ram_serve_vocabularies") == 1
        assert metric_value(text, "ram_serve_vocabulary_build_seconds_count") == 2
        assert metric_value(text, "ram_serve_requests_total", endpoint="/v1/vocabularies/{id}", status="404") == 2
        assert metric_value(text, "ram_serve_requests_total", endpoint="/v1/vocabularies", status="201") == 2
        model = httpx.get(server.url + "/v1/model").json()
        assert model["open_set"]["text_encoder"] is True and model["open_set"]["vocabularies"] == 1
        assert model["classification"] is True and model["num_tags"] == 200


def test_requests_with_different_vocabularies_share_one_encoder_call(openset_demo_bundle, expected):
    # The batch closes when its 4th image arrives; the wait is far longer than the test.
    config = ServeConfig(max_batch=4, max_wait_ms=60_000, request_timeout=120)
    with ServerThread(openset_demo_bundle, config) as server:
        stored = post_vocabulary(server, {"id": "outdoor", "names": OUTDOOR, "thresholds": {"otter": 0.6}})
        assert stored.status_code == 201
        requests = [({"vocabulary": "outdoor", "threshold": 0}, "outdoor"), ({"threshold": 0, "top_k": 5}, "default"),
                    ({"tags": "sky, dog", "threshold": 0}, "sky_dog"), ({"classify": "cat,dog,bird"}, "classes")]
        responses = [None] * len(requests)
        barrier = threading.Barrier(len(requests))

        def client(i: int) -> None:
            barrier.wait()
            responses[i] = post_tag(server, IMAGES[:1], timeout=120, **requests[i][0])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for response, (fields, want) in zip(responses, requests):
            assert response.status_code == 200, response.text
            assert_same(response.json()["results"][0], expected[want][0], "classes" if "classify" in fields else "tags")
        text = metrics(server)
        # One encoder call for the four images, decoded against four targets.
        assert metric_value(text, "ram_serve_batch_size_count") == 1
        assert metric_value(text, "ram_serve_batch_size_sum") == 4
        assert metric_value(text, "ram_serve_batch_targets_sum") == 4


def test_request_tags_and_classify(openset_demo_bundle, expected):
    with ServerThread(openset_demo_bundle, ServeConfig(max_request_tags=4)) as server:
        for _ in range(2):  # the second request finds the embeddings cached
            response = post_tag(server, IMAGES, tags=" sky,dog ", threshold=0)
            assert response.status_code == 200, response.text
            for got, want in zip(response.json()["results"], expected["sky_dog"]):
                assert_same(got, want)
        text = metrics(server)
        assert metric_value(text, "ram_serve_text_cache_total", result="miss") == 1
        assert metric_value(text, "ram_serve_text_cache_total", result="hit") == 1
        # Open-set tags use upstream's 0.5 unless the request gives a threshold.
        default = post_tag(server, IMAGES[:1], tags="sky,dog").json()["results"][0]
        assert default["tags"] == [t for t, p in zip(expected["sky_dog"][0].tags, expected["sky_dog"][0].probabilities)
                                   if p > 0.5]

        classified = post_tag(server, IMAGES, classify="cat, dog, bird")
        assert classified.status_code == 200, classified.text
        for got, want in zip(classified.json()["results"], expected["classes"]):
            assert_same(got, want, "classes")
            assert sum(got["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        top = post_tag(server, IMAGES[:1], classify="cat,dog,bird", top_k=2).json()["results"][0]
        assert top["classes"] == list(expected["classes"][0].labels[:2])

        cases = [
            ({"classify": "cat"}, 400, "at least two classes"),
            ({"classify": "cat,dog", "threshold": 0.5}, 422, "threshold does not apply to classify"),
            ({"tags": "sky,,dog"}, 400, "tags: tag name 1 is empty"),
            ({"tags": "sky,dog,sky"}, 400, "duplicate tag names 'sky'"),
            ({"tags": "a,b,c,d,e"}, 413, "the limit is 4 (--max-request-tags)"),
            ({"tags": "sky", "vocabulary": "x"}, 422, "give at most one of vocabulary, tags, classify"),
            ({"vocabulary": "nope"}, 404, "vocabulary 'nope' not found"),
        ]
        for fields, status, reason in cases:
            response = post_tag(server, IMAGES[:1], **fields)
            assert response.status_code == status, (fields, response.text)
            assert reason in response.json()["error"], (fields, response.json())
        assert post_tag(server, IMAGES[:1], tags="sky,dog").status_code == 200


def test_bad_vocabulary_bodies_are_4xx_with_the_reason(openset_demo_bundle):
    config = ServeConfig(max_vocabularies=2, max_vocabulary_texts=200, max_upload_bytes=64 * 1024)
    cases = [
        ({}, 422, "give either names or descriptions"),
        ({"names": ["a"], "descriptions": DESCRIPTIONS}, 422, "give either names or descriptions"),
        ({"names": []}, 400, "no tag names given"),
        ({"names": ["a", "  "]}, 400, "tag name 1 is empty"),
        ({"names": ["a", "b", "a"]}, 400, "duplicate tag names 'a' (positions 0, 2)"),
        ({"names": "a,b"}, 422, "names: Input should be a valid list"),
        ({"names": ["a", 2]}, 422, "names.1"),
        ({"descriptions": [{"a": "one string"}]}, 400, "entry 0 ('a'): descriptions must be a list"),
        ({"descriptions": [{"a": ["x"], "b": ["y"]}]}, 400, "entry 0 must be an object with one tag"),
        ({"descriptions": [{"a": []}]}, 400, "entry 0 ('a') has no descriptions"),
        ({"descriptions": "/etc/passwd"}, 422, "descriptions"),  # a path is never opened
        ({"names": ["a"], "thresholds": 2}, 422, "thresholds"),
        ({"names": ["a"], "thresholds": "/etc/thresholds.csv"}, 422, "thresholds"),
        ({"names": ["a"], "thresholds": {"b": 0.6}}, 400, "thresholds given for tags not in the vocabulary: 'b'"),
        ({"names": ["a", "b"], "names_zh": ["甲"]}, 400, "1 Chinese names for 2 tags"),
        ({"names": ["a"], "id": "no spaces"}, 422, "id: String should match pattern"),
        ({"names": ["a"], "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"names": ["tag_3", "otter"], "merge_default": True}, 400, "already in the default vocabulary: 'tag_3'"),
        ({"names": ["a", "b", "c", "d"]}, 413, "4 tags need 252 text embeddings; the limit is 200"),
        ({"descriptions": [{f"t{i}": ["a description"] * 60} for i in range(4)]}, 413, "240 text embeddings"),
    ]
    with ServerThread(openset_demo_bundle, config) as server:
        for body, status, reason in cases:
            response = post_vocabulary(server, body)
            assert response.status_code == status, (body, response.text)
            assert reason in response.json()["error"], (body, response.json())
        not_json = httpx.post(server.url + "/v1/vocabularies", content=b"{names: [", timeout=30,
                              headers={"Content-Type": "application/json"})
        assert not_json.status_code == 422 and "JSON" in not_json.json()["error"]
        too_large = post_vocabulary(server, {"names": ["x" * 70_000]})
        assert too_large.status_code == 413 and "65,536 bytes" in too_large.json()["error"]

        assert post_vocabulary(server, {"id": "one", "names": ["a"]}).status_code == 201
        taken = post_vocabulary(server, {"id": "one", "names": ["b"]})
        assert taken.status_code == 409 and "DELETE /v1/vocabularies/one first" in taken.json()["error"]
        assert post_vocabulary(server, {"names": ["b"]}).status_code == 201
        full = post_vocabulary(server, {"names": ["c"]})
        assert full.status_code == 409 and "at most 2 vocabularies (--max-vocabularies)" in full.json()["error"]
        assert len(httpx.get(server.url + "/v1/vocabularies").json()["vocabularies"]) == 2
        assert post_tag(server, IMAGES[:1], vocabulary="one", threshold=0).json()["results"][0]["tags"] == ["a"]
        text = metrics(server)
        assert metric_value(text, "ram_serve_errors_total", endpoint="/v1/vocabularies", reason="conflict") == 2
        assert metric_value(text, "ram_serve_errors_total", endpoint="/v1/vocabularies", reason="bad_input") == 9


def test_one_build_at_a_time(openset_demo_bundle):
    with ServerThread(openset_demo_bundle) as server:
        service = server.service
        # Hold the vocabulary thread, so that the first build waits for it deterministically.
        gate = threading.Event()
        service._build_pool.submit(gate.wait, 60)
        first: dict = {}
        waiting = threading.Thread(target=lambda: first.setdefault(
            "response", post_vocabulary(server, {"id": "first", "names": ["otter"]})))
        waiting.start()
        try:
            deadline = time.monotonic() + 30
            while service.building != "first":
                assert time.monotonic() < deadline and waiting.is_alive(), "the first build never started"
                time.sleep(0.01)
            busy = post_vocabulary(server, {"id": "second", "names": ["kayak"]})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
            assert "'first' is being built (one build at a time)" in busy.json()["error"]
            assert post_tag(server, IMAGES[:1], tags="sky,dog").status_code == 200  # request words do not wait
        finally:
            gate.set()
            waiting.join(60)
        assert first["response"].status_code == 201
        assert post_vocabulary(server, {"id": "second", "names": ["kayak"]}).status_code == 201


def test_the_token_guards_vocabulary_changes(openset_demo_bundle):
    with ServerThread(openset_demo_bundle, ServeConfig(token="s3cret")) as server:
        missing = post_vocabulary(server, {"id": "v", "names": ["otter"]})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert post_vocabulary(server, {"id": "v", "names": ["otter"]}, token="wrong").status_code == 401
        assert post_vocabulary(server, {"id": "v", "names": ["otter"]}, token="s3cret").status_code == 201
        # Reads and tagging stay open in the default scope ("writes"), request tags included.
        assert httpx.get(server.url + "/v1/vocabularies/v").status_code == 200
        assert post_tag(server, IMAGES[:1], vocabulary="v").status_code == 200
        assert post_tag(server, IMAGES[:1], tags="sky,dog").status_code == 200
        assert httpx.delete(server.url + "/v1/vocabularies/v").status_code == 401
        authorized = {"Authorization": "Bearer s3cret"}
        assert httpx.delete(server.url + "/v1/vocabularies/v", headers=authorized).status_code == 200
    with ServerThread(openset_demo_bundle, ServeConfig(token="s3cret", token_scope="all")) as server:
        assert httpx.get(server.url + "/v1/vocabularies").status_code == 401
        assert post_tag(server, IMAGES[:1], tags="sky,dog").status_code == 401


def test_a_bundle_without_text_encoder_says_how_to_add_one(test_bundle):
    with ServerThread(test_bundle) as server:
        for response in (post_vocabulary(server, {"names": ["otter"]}),
                         post_tag(server, [png()], tags="otter,kayak"),
                         post_tag(server, [png()], classify="cat,dog")):
            assert response.status_code == 501, response.text
            assert "has no text encoder" in response.json()["error"]
            assert "ram-export --text-encoder" in response.json()["error"]
        assert httpx.get(server.url + "/v1/vocabularies").json() == {"vocabularies": [], "max_vocabularies": 16,
                                                                     "text_encoder": False}
        assert post_tag(server, [png()], threshold=0).status_code == 200
        text = metrics(server)
        assert metric_value(text, "ram_serve_errors_total", endpoint="/v1/tag", reason="not_implemented") == 2


def test_cli_open_set_flags(test_bundle, capsys):
    assert serve_main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--max-vocabularies", "--max-vocabulary-texts", "--max-request-tags", "/v1/vocabularies"):
        assert flag in out
    assert serve_main([str(test_bundle), "--max-vocabularies", "0"]) == 2
    assert "--max-vocabularies must be >= 1" in capsys.readouterr().err
