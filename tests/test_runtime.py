import subprocess
import sys

import numpy as np
import pytest

from conftest import TEST_IMAGE_SIZE, make_test_vocabulary, reference_logits, rewrite_manifest
from ram_edge.bundle_format import BundleError
from ram_edge.runtime import Tagger, TagResult, Vocabulary, get_backend_class, sigmoid
from ram_edge.runtime.backends.base import Backend


def random_pixels(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)).astype(np.float32)


def test_import_without_torch_onnx_or_onnxruntime():
    code = ("import sys\n"
            "for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'cv2'): sys.modules[m] = None\n"
            "import ram_edge.runtime, ram_edge.runtime.cli\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_logits_match_the_model_for_any_batch(test_bundle):
    with Tagger(test_bundle) as tagger:
        assert tagger.providers == ["CPUExecutionProvider"]
        for batch in (1, 3, 17):
            pixels = random_pixels(batch, seed=batch)
            logits = tagger.logits(pixels)
            assert logits.shape == (batch, 6) and logits.dtype == np.float32
            np.testing.assert_allclose(logits, reference_logits(pixels, tagger.vocabulary), atol=1e-5)
        embeds = tagger.encode(random_pixels(2))
        assert embeds.shape == (2, 5, 8)
        np.testing.assert_allclose(embeds[:, 0], embeds[:, 1:].mean(axis=1), atol=1e-6)
        with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
            tagger.encode(np.zeros((1, 3, 32, 32), np.float32))


def test_a_batch_is_one_encoder_and_one_decoder_call(test_bundle, monkeypatch):
    calls = []
    original = Backend.infer

    def spy(self, feeds):
        calls.append((self.model_path.name, {k: v.shape for k, v in feeds.items()}))
        return original(self, feeds)

    monkeypatch.setattr(Backend, "infer", spy)
    with Tagger(test_bundle) as tagger:
        images = [np.full((20 + i, 30, 3), 10 * i, np.uint8) for i in range(9)]
        results = tagger.tag(images, threshold=0.0)
    assert len(results) == 9
    assert calls == [("encoder.onnx", {"pixel_values": (9, 3, 64, 64)}),
                     ("decoder.onnx", {"image_embeds": (9, 5, 8)})]  # the vocabulary is bound once, not fed


def test_tag_orders_by_probability_and_applies_thresholds(bundle_factory):
    vocab = make_test_vocabulary(thresholds=[0.9, 0.1, 0.5, 0.2, 0.3, 0.99])
    bundle = bundle_factory(vocabulary=vocab, default_threshold=0.5)
    image = np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    with Tagger(bundle) as tagger:
        probs = sigmoid(tagger.logits(tagger.preprocess(image)))[0]
        everything = tagger.tag(image, threshold=0.0)
        assert isinstance(everything, TagResult)
        assert list(everything.probabilities) == sorted(everything.probabilities, reverse=True)
        np.testing.assert_allclose([probs[i] for i in everything.indices], everything.probabilities)
        assert everything.tags == tuple(f"tag_{i}" for i in everything.indices)

        per_tag = tagger.tag(image)  # threshold=None: the vocabulary's own
        expected = {f"tag_{i}" for i in range(6) if probs[i] > vocab.thresholds[i]}
        assert set(per_tag.tags) == expected
        fixed = tagger.tag(image, threshold=0.5)
        assert set(fixed.tags) == {f"tag_{i}" for i in range(6) if probs[i] > 0.5}
        assert tagger.tag(image, threshold=0.0, top_k=2).tags == everything.tags[:2]
        assert tagger.tag(image, threshold=0.0, lang="zh").tags == tuple(
            t.replace("tag_", "标签") for t in everything.tags)
        assert tagger.tag([], threshold=0.0) == []
        with pytest.raises(ValueError, match="lang"):
            tagger.tag(image, lang="fr")
        with pytest.raises(ValueError, match="top_k"):
            tagger.tag(image, top_k=0)


def test_default_threshold_applies_without_per_tag_thresholds(bundle_factory):
    bundle = bundle_factory(vocabulary=make_test_vocabulary(thresholds=None), default_threshold=0.3)
    with Tagger(bundle) as tagger:
        assert tagger.default_threshold == 0.3
        probs = tagger.select(np.array([[0.2, 0.31, 0.3, 0.9, 0.0, 0.5]], np.float32))[0]
        assert probs.tags == ("tag_3", "tag_5", "tag_1")  # strictly above 0.3


def test_set_vocabulary_swaps_tags_without_reloading(test_bundle):
    pixels = random_pixels(2)
    with Tagger(test_bundle) as tagger:
        session = tagger._encoder._session
        other = make_test_vocabulary(num_tags=11, descriptions=[4] + [1] * 10, seed=7, with_zh=False)
        tagger.set_vocabulary(other)
        assert tagger._encoder._session is session
        logits = tagger.logits(pixels)
        assert logits.shape == (2, 11)
        np.testing.assert_allclose(logits, reference_logits(pixels, other), atol=1e-5)
        sub = other.subset([3, "tag_0"])
        tagger.set_vocabulary(sub)
        np.testing.assert_allclose(tagger.logits(pixels), logits[:, [3, 0]], atol=1e-5)
        with pytest.raises(ValueError, match="8 wide|embed_dim=8"):
            tagger.set_vocabulary(Vocabulary(["a"], np.ones((1, 16))))


def test_padding_rows_change_no_score(test_bundle):
    pixels = random_pixels(1)
    base = make_test_vocabulary(num_tags=3, descriptions=[1, 2, 1])
    padded = Vocabulary(base.names, np.concatenate([base.embeddings, np.full((3, 3, 8), 5.0, np.float32)], 1),
                        num_descriptions=base.num_descriptions)
    with Tagger(test_bundle) as tagger:
        tagger.set_vocabulary(base)
        a = tagger.logits(pixels)
        tagger.set_vocabulary(padded)
        np.testing.assert_allclose(tagger.logits(pixels), a, atol=1e-6)


def test_bundle_file_modified_after_export_is_refused(test_bundle):
    with open(test_bundle / "vocabulary" / "embeddings.npy", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x01\x02")
    with pytest.raises(BundleError, match="embeddings.npy: sha256 .* does not match"):
        Tagger(test_bundle)
    Tagger(test_bundle, verify_files=False).close()


def test_missing_file_and_missing_manifest_are_refused(test_bundle):
    (test_bundle / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="decoder.onnx: listed in the manifest but missing"):
        Tagger(test_bundle)
    (test_bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Tagger(test_bundle)


def test_graphs_that_disagree_with_the_manifest_are_refused(bundle_factory):
    # the decoder graph was built for E = 16 while the manifest (and the encoder) say 8
    bundle = bundle_factory(decoder_embed_dim=16)
    with pytest.raises(BundleError, match=r"decoder.onnx: decoder input is image_embeds float32 \(batch, 5, 16\)"):
        Tagger(bundle)


def test_manifest_whose_encoder_output_differs_from_decoder_input_is_refused(bundle_factory):
    def edit(m):
        m["graphs"]["encoder"]["outputs"][0]["shape"] = ["batch", 10, 8]
        m["model"]["num_image_tokens"] = 10
    with pytest.raises(BundleError, match="disagrees|does not match"):
        Tagger(bundle_factory(edit_manifest=edit))


def test_manifest_naming_other_inputs_is_refused(test_bundle):
    rewrite_manifest(test_bundle, lambda m: m["graphs"]["encoder"]["inputs"][0].update(name="images"))
    with pytest.raises(BundleError, match=r"encoder.onnx: the graph's inputs are \['pixel_values'\]"):
        Tagger(test_bundle)


def test_invalid_bundle_vocabulary_is_a_bundle_error(test_bundle):
    path = test_bundle / "vocabulary" / "vocabulary.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"tag_1"', '"tag_0"'), encoding="utf-8")
    with pytest.raises(BundleError, match="duplicate tag names 'tag_0'"):
        Tagger(test_bundle, verify_files=False)


def test_backends_and_providers_fail_clearly(test_bundle):
    with pytest.raises((NotImplementedError, ImportError), match="tensorrt"):
        get_backend_class("tensorrt")
    with pytest.raises(ValueError, match="unknown backend 'foo'"):
        Tagger(test_bundle, backend="foo")
    with pytest.raises(ValueError, match="'NoSuchExecutionProvider' is not available"):
        Tagger(test_bundle, providers=["NoSuchExecutionProvider"])
    with Tagger(test_bundle, providers=["CPUExecutionProvider"], intra_op_threads=1) as tagger:
        assert tagger.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="through backend_options"):
        Tagger(test_bundle, backend="tensorrt", providers=["CPUExecutionProvider"])


def test_backend_options_reach_the_backend(test_bundle):
    with Tagger(test_bundle, backend_options={"inter_op_threads": 1}) as tagger:
        assert tagger._encoder.inter_op_threads == 1 and tagger._decoder.inter_op_threads == 1
    with pytest.raises(TypeError, match="no_such_option"):
        Tagger(test_bundle, backend_options={"no_such_option": 1})


def test_backend_life_cycle(test_bundle):
    backend_class = get_backend_class("onnxruntime")
    backend = backend_class(test_bundle / "encoder.onnx")
    with pytest.raises(RuntimeError, match="not active"):
        backend.infer({})
    with backend as active:
        assert [t.name for t in active.input_metadata()] == ["pixel_values"]
        assert active.input_metadata()[0].shape == ("batch", 3, 64, 64)
        assert active.output_metadata()[0].dtype == np.float32
        out = active.infer({"pixel_values": random_pixels(2)})
        assert out["image_embeds"].shape == (2, 5, 8)
        with pytest.raises(KeyError, match="inputs not given"):
            active.infer({})
    assert not backend.is_active
