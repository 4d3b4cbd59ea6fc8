"""The decoder's working memory is bounded whatever the vocabulary: tags are scored in chunks (and images in
groups) that fit ``decoder_memory_mb``, with the same scores as one call — tags never attend to each other."""

from __future__ import annotations

import numpy as np
import pytest

from ram_edge.runtime import Tagger, Vocabulary
from ram_edge.runtime.backends import available_backends


@pytest.fixture(scope="module", params=["ram_plus_tiny_384", "ram_tiny_224"])
def bundle(request, tmp_path_factory):
    pytest.importorskip("torch", reason="exporting the demo bundle needs torch")
    from ram_edge.export import export_bundle
    from ram_edge.models import demo_model

    out = tmp_path_factory.mktemp("mem") / request.param
    export_bundle(demo_model(request.param, seed=5, num_tags=300), out, source="demo", verify=False)
    return out


def _pixels(tagger, n=5):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3, tagger.image_size, tagger.image_size)).astype(np.float32)


def _ragged(num_tags=37, dim=512, seed=1):
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((1 + i % 4, dim)).astype(np.float32) for i in range(num_tags)]
    return Vocabulary([f"x{i}" for i in range(num_tags)], [r / np.linalg.norm(r, axis=-1, keepdims=True) for r in rows])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_chunked_scores_equal_one_call(bundle, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    options = {"cache_dir": None} if backend == "openvino" else {}
    with Tagger(bundle, backend=backend, backend_options=options, decoder_memory_mb=10_000) as whole:
        pixels = _pixels(whole)
        embeds = whole.encode(pixels)
        reference = whole.decode(embeds)
        assert len(whole.tag_chunks()) == 1
        ragged = _ragged()
        reference_ragged = whole.decode(embeds, ragged)
    for chunk in (1, 7, 128, 299):
        with Tagger(bundle, backend=backend, backend_options=options, tag_chunk=chunk) as tagger:
            assert len(tagger.tag_chunks()) == -(-300 // chunk)
            np.testing.assert_allclose(tagger.decode(embeds), reference, atol=1e-5, rtol=0)
            np.testing.assert_allclose(tagger.decode(embeds, ragged), reference_ragged, atol=1e-5, rtol=0)
    # a budget of 20.5 (image, tag) pairs: chunks of 20 tags, one image per call
    per_pair = whole.decoder_bytes_per_pair(whole.vocabulary.max_descriptions)
    with Tagger(bundle, backend=backend, backend_options=options, decoder_memory_mb=20.5 * per_pair / 2**20) as tagger:
        assert {stop - start for start, stop in tagger.tag_chunks()} == {20} and len(tagger.tag_chunks()) == 15
        np.testing.assert_allclose(tagger.decode(embeds), reference, atol=1e-5, rtol=0)
        results = tagger.tag([np.zeros((64, 64, 3), np.uint8)] * 2, threshold=0, top_k=3)
        assert all(len(r.tags) == 3 for r in results)


def test_bytes_per_pair_follows_the_decoder_config(bundle):
    with Tagger(bundle) as tagger:
        config = tagger.bundle.manifest["model"]["config"]["decoder"]
        d = tagger.vocabulary.max_descriptions
        floats = 2 * d + 512 + 8 * config["hidden_size"] + 2 * config["num_heads"] * tagger.bundle.num_image_tokens \
            + 2 * config["intermediate_size"]
        assert tagger.decoder_bytes_per_pair(d) == 4 * floats
        # the official decoder (768 / 4 heads / 3072) at 145 tokens, RAM++'s 51 descriptions: ~56 KB a pair
        official = 4 * (2 * 51 + 512 + 8 * 768 + 2 * 4 * 145 + 2 * 3072)
        assert 55_000 < official < 57_000


def test_options_are_checked(bundle):
    with pytest.raises(ValueError, match="decoder_memory_mb must be positive"):
        Tagger(bundle, decoder_memory_mb=0)
    with pytest.raises(ValueError, match="tag_chunk must be a positive integer"):
        Tagger(bundle, tag_chunk=0)
    with Tagger(bundle) as tagger:
        assert tagger.default_batch_size == 1  # a CPU
