"""Captions over HTTP: ``POST /v1/tag`` with ``caption=true`` on the golden Tag2Text bundle gives each image
its tags and the caption ``Tagger.caption`` writes alone (the golden's token ids), sharing the batch's
encoder call; bundles without captioning graphs answer 501 and keep serving."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from _serving import ServerThread, png, post_tag
from ram_edge.runtime import Tagger
from ram_edge.serving import ServeConfig

pytest.importorskip("fastapi")


def _images(reference):
    return [(reference / "images" / name).read_bytes() for name in ("demo4.jpg", "tagging_results.jpg")]


def test_captions_over_http_equal_the_tagger_and_the_golden(reference, tag2text_bundle):
    bundle, golden, meta = tag2text_bundle
    images = _images(reference)
    with Tagger(bundle) as tagger:
        expected = tagger.caption(images)  # beam search, 3 beams: the golden's
        tags = tagger.tag(images)
    for i, result in enumerate(expected):
        assert list(result.token_ids) == golden["beam_caption_ids"][i, : golden["beam_caption_len"][i]].tolist()
    with ServerThread(bundle, ServeConfig(max_batch=4, max_wait_ms=2000)) as server:
        assert httpx.get(server.url + "/v1/model", timeout=10).json()["captioning"] is True
        answer = post_tag(server, images, caption="true")
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        for got, want, tagged in zip(results, expected, tags):
            assert got["caption"] == want.text and got["caption_tags"] == want.tags
            assert got["tags"] == list(tagged.tags)
        greedy = post_tag(server, images[:1], caption="true", num_beams="1").json()["results"][0]
        with Tagger(bundle) as tagger:
            assert greedy["caption"] == tagger.caption(images[0], num_beams=1).text
        bad = post_tag(server, images[:1], caption="true", classify="a,b")
        assert bad.status_code == 422 and "caption and classify" in bad.json()["error"]
        bad = post_tag(server, images[:1], num_beams="2")
        assert bad.status_code == 422 and "num_beams applies to caption" in bad.json()["error"]
        assert post_tag(server, images[:1]).json()["results"][0].get("caption") is None


def test_no_captioning_graphs_is_501_and_the_service_goes_on(test_bundle):
    with ServerThread(test_bundle) as server:
        answer = post_tag(server, [png()], caption="true")
        assert answer.status_code == 501 and "--captioning" in answer.json()["error"]
        assert post_tag(server, [png()]).status_code == 200
        assert httpx.get(server.url + "/v1/model", timeout=10).json()["captioning"] is False
