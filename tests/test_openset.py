"""Open-set vocabularies end to end, torch-free at run time: the golden RAM++ / RAM checkpoints with the
golden tiny CLIP tower, through Vocabulary.from_descriptions / from_names and the Tagger, against
upstream's open-set outputs (golden/openset_*); concat / subset; thresholds; classification; prompts;
bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ram_edge.runtime import BundleError, ClassResult, TagResult, Tagger, Vocabulary
from ram_edge.tags import official_tags
from ram_edge.vocabulary import read_descriptions

TINY_HEADS = 2


def _export(reference, tmp_path_factory, golden: str, size: int):
    pytest.importorskip("torch", reason="exporting the golden needs torch")
    from ram_edge.export import export_bundle
    from ram_edge.models import load_checkpoint
    from ram_edge.models.clip_text import load_clip_text

    meta = json.loads((reference / "golden" / f"{golden}.json").read_text())
    model = load_checkpoint(reference / "golden" / f"{golden}.pth", image_size=size,
                            tags=[f"t{i}" for i in range(meta["num_tags"])])
    text = load_clip_text(reference / "golden" / "clip_text_tiny.pth", heads=TINY_HEADS)
    out = tmp_path_factory.mktemp(golden) / "bundle"
    export_bundle(model, out, source=golden, text_encoder=text)
    return out


@pytest.fixture(scope="module")
def ram_plus_bundle(reference, tmp_path_factory):
    return _export(reference, tmp_path_factory, "ram_plus_tiny_384", 384)


@pytest.fixture(scope="module")
def ram_bundle(reference, tmp_path_factory):
    return _export(reference, tmp_path_factory, "ram_tiny_224", 224)


def _golden(reference, name):
    z = np.load(reference / "golden" / f"{name}.npz")
    return {k: z[k] for k in z.files}, json.loads((reference / "golden" / f"{name}.json").read_text(encoding="utf-8"))


def _rare_descriptions(reference, count):
    data = json.loads((reference / "opensets" / "openimages_rare_200_llm_tag_descriptions.json").read_text())
    return data[:count]


# -- upstream parity -----------------------------------------------------------------------------------


def test_ram_plus_from_descriptions_reproduces_upstream(reference, ram_plus_bundle):
    golden, meta = _golden(reference, "openset_ram_plus_tiny_384")
    pixels = _golden(reference, "ram_plus_tiny_384")[0]["pixel_values"]
    with Tagger(ram_plus_bundle, exif_transpose=False) as tagger:
        texts = [t for item in _rare_descriptions(reference, 8) for t in next(iter(item.values()))]
        assert texts == meta["texts"]
        np.testing.assert_array_equal(tagger.text_encoder.tokenize(texts), golden["token_ids"])
        vocab = Vocabulary.from_descriptions(_rare_descriptions(reference, 8), tagger.text_encoder)
        assert vocab.names == meta["categories"] and vocab.max_descriptions == 51
        label_embed = vocab.embeddings.reshape(-1, 512)
        assert np.abs(label_embed - golden["label_embed"]).max() <= 1e-4
        np.testing.assert_array_equal(vocab.thresholds, golden["class_threshold"])
        tagger.set_vocabulary(vocab)
        logits = tagger.logits(pixels)
        assert np.abs(logits - golden["logits"]).max() <= 2e-4
        results = tagger.select(tagger.probabilities(pixels))  # the vocabulary's own 0.5 thresholds
        for row, result in zip(golden["tag_mask"], results):
            assert set(result.tags) == {n for n, on in zip(vocab.names, row) if on}
        assert [" | ".join(sorted(r.tags, key=vocab.names.index)) for r in results] == meta["tags"]


def test_ram_from_names_reproduces_upstream(reference, ram_bundle):
    golden, meta = _golden(reference, "openset_ram_tiny_224")
    pixels = _golden(reference, "ram_tiny_224")[0]["pixel_values"]
    with Tagger(ram_bundle, exif_transpose=False) as tagger:
        vocab = Vocabulary.from_names(meta["categories"], tagger.text_encoder)
        assert vocab.max_descriptions == 1 and vocab.info["kind"] == "ram"
        assert np.abs(vocab.embeddings[:, 0] - golden["label_embed"]).max() <= 1e-4
        tagger.set_vocabulary(vocab)
        assert np.abs(tagger.logits(pixels) - golden["logits"]).max() <= 2e-4
        results = tagger.select(tagger.probabilities(pixels))
        assert [" | ".join(sorted(r.tags, key=vocab.names.index)) for r in results] == meta["tags"]


def test_ram_plus_from_names_keeps_the_63_sentences_as_descriptions(ram_plus_bundle):
    with Tagger(ram_plus_bundle) as tagger:
        vocab = Vocabulary.from_names(["otter", "kayak"], tagger.text_encoder)
        assert vocab.num_descriptions.tolist() == [63, 63]
        assert np.allclose(np.linalg.norm(vocab.embeddings, axis=-1), 1.0, atol=1e-6)
        assert vocab.info["recipe"] == "names" and vocab.info["kind"] == "ram_plus"


# -- composing vocabularies ----------------------------------------------------------------------------


def test_concat_official_and_custom_scores_every_tag_as_alone(reference, ram_plus_bundle):
    """The official 4,585 tags (names, thresholds, Chinese; embeddings drawn here, 4 per tag) + open-set
    tags with 63 and 2-5 descriptions: every tag's logit as in its own part, <= 1e-5."""
    pixels = _golden(reference, "ram_plus_tiny_384")[0]["pixel_values"]
    official = official_tags()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((len(official), 4, 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    base = Vocabulary(list(official.names), rows, thresholds=official.thresholds, names_zh=official.names_zh)
    with Tagger(ram_plus_bundle, exif_transpose=False) as tagger:
        names = Vocabulary.from_names(["axolotl", "paddle board"], tagger.text_encoder)
        descs = Vocabulary.from_descriptions(
            [{"Aloe": ["a succulent with thick leaves", "aloe vera plant"]},
             {"Anole": ["a small green lizard", "a lizard on a branch", "anole", "a tree lizard", "a reptile"]}],
            tagger.text_encoder)
        embeds = tagger.encode(pixels)
        alone = np.concatenate([tagger.decode(embeds, v) for v in (base, names, descs)], axis=1)
        both = Vocabulary.concat(base, names, descs)
        assert both.num_tags == len(official) + 4 and both.max_descriptions == 63
        assert np.abs(tagger.decode(embeds, both) - alone).max() <= 1e-5
        # thresholds and Chinese names carried over; new tags get 0.5 and their English names
        assert both.thresholds[: len(official)].tolist() == base.thresholds.tolist()
        assert both.thresholds[len(official):].tolist() == [0.5] * 4
        assert both.names_zh[-1] == "Anole" and both.names_zh[0] == official.names_zh[0]
        # subset of the concatenation: the same scores again
        sub = both.subset(["axolotl", official.names[7], "Anole"])
        np.testing.assert_allclose(tagger.decode(embeds, sub),
                                   alone[:, [len(official), 7, len(official) + 3]], atol=1e-5)


def test_concat_refuses_duplicates_naming_them():
    a = Vocabulary(["cat", "dog"], np.eye(2, 8, dtype=np.float32))
    b = Vocabulary(["dog", "cat", "owl"], np.eye(3, 8, dtype=np.float32))
    with pytest.raises(ValueError, match=r"'cat' \(positions 0, 3\), 'dog' \(positions 1, 2\)"):
        Vocabulary.concat(a, b)
    with pytest.raises(ValueError, match="different widths"):
        Vocabulary.concat(a, Vocabulary(["owl"], np.ones((1, 4), np.float32)))


# -- thresholds and names ------------------------------------------------------------------------------


class _FakeText:
    """A deterministic stand-in for the text encoder in tests of the vocabulary's own logic (the real
    encoder is tested above)."""

    model_kind = "ram_plus"
    source = "fake"

    def encode(self, texts, progress=False):
        out = np.zeros((len(texts), 8), np.float32)
        for i, t in enumerate(texts):
            out[i, sum(map(ord, t)) % 8] = 1.0 + len(t) % 3
            out[i, len(t) % 8] += 0.5
        return out


def test_threshold_and_chinese_name_files(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("name,threshold,name_zh\notter,0.7,水獭\nkayak,,皮划艇\n", encoding="utf-8")
    vocab = Vocabulary.from_names(["otter", "kayak", "raft"], _FakeText(), thresholds=str(csv_file))
    assert vocab.thresholds.tolist() == pytest.approx([0.7, 0.5, 0.5])
    assert vocab.names_zh == ["水獭", "皮划艇", "raft"]
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps({"kayak": 0.61, "raft": {"threshold": 0.4, "name_zh": "筏"}}), encoding="utf-8")
    vocab = Vocabulary.from_names(["otter", "kayak", "raft"], _FakeText(), thresholds=json_file)
    assert vocab.thresholds.tolist() == pytest.approx([0.5, 0.61, 0.4])
    assert vocab.names_zh == ["otter", "kayak", "筏"]
    assert Vocabulary.from_names(["a", "b"], _FakeText(), thresholds=0.3).thresholds.tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match="not in the vocabulary: 'otterr'"):
        Vocabulary.from_names(["otter"], _FakeText(), thresholds={"otterr": 0.2})
    bad = tmp_path / "bad.csv"
    bad.write_text("name,threshold\notter,high\n")
    with pytest.raises(ValueError, match=r"row 1 \('otter'\): threshold 'high' is not a number"):
        Vocabulary.from_names(["otter"], _FakeText(), thresholds=bad)


@pytest.mark.parametrize("names, message", [
    (["otter", ""], "tag name 1 is empty"),
    (["otter", "   "], "tag name 1 is empty or only whitespace"),
    (["otter", "kayak", " otter"], r"duplicate tag names 'otter' \(positions 0, 2\)"),
    ("otter,kayak", "not one string"),
    ([], "no tag names"),
    (["ok", 3], "tag name 1 is 3, not a string"),
])
def test_bad_names_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_names(names, _FakeText())


@pytest.mark.parametrize("data, message", [
    ({"otter": "an otter"}, r"entry 0 \('otter'\): descriptions must be a list"),
    ([{"otter": []}], r"entry 0 \('otter'\) has no descriptions"),
    ([{"otter": ["fine", 3]}], r"entry 0 \('otter'\), description 1 is 3"),
    ([{"otter": ["fine"], "kayak": ["two tags in one entry"]}], "entry 0 must be an object with one tag"),
    ([["otter", ["x"]]], "entry 0 must be an object with one tag"),
    ("{}", "no tags"),
    ([{"otter": ["a"]}, {"otter": ["b"]}], "duplicate tag names 'otter'"),
    ([{"": ["a"]}], "tag name 0 is empty"),
])
def test_malformed_descriptions_are_refused(tmp_path, data, message):
    if isinstance(data, str):
        path = tmp_path / "d.json"
        path.write_text(data)
        data = path
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_descriptions(data, _FakeText())


def test_description_file_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"otter": ["a", }]')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_descriptions(path)
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        read_descriptions(tmp_path / "missing.json")


def test_tag2text_has_no_open_set():
    text = _FakeText()
    text.model_kind = "tag2text"
    with pytest.raises(ValueError, match="Tag2Text scores only its learned"):
        Vocabulary.from_names(["otter"], text)


# -- classification and prompts ------------------------------------------------------------------------


def test_classify_is_clip_zero_shot_on_the_global_token(reference, ram_plus_bundle):
    pixels = _golden(reference, "ram_plus_tiny_384")[0]["pixel_values"]
    images = [reference / "images" / n for n in ("demo4.jpg", "tagging_results.jpg")]
    classes = ["dog", "cat", "bird", "car"]
    with Tagger(ram_plus_bundle, exif_transpose=False) as tagger:
        results = tagger.classify(images, classes)
        assert all(isinstance(r, ClassResult) for r in results)
        # reference computation, independently: normalised global token vs the RAM recipe's class rows
        class_vocab = Vocabulary.from_names(classes, tagger.text_encoder, kind="ram")
        g = tagger.encode(pixels)[:, 0]
        g /= np.linalg.norm(g, axis=-1, keepdims=True)
        logits = tagger.bundle.logit_scale * g @ class_vocab.embeddings[:, 0].T
        expected = np.exp(logits - logits.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        for result, row in zip(results, expected):
            assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-5)
            assert result.as_dict() == pytest.approx(dict(zip(classes, row.tolist())), abs=1e-5)
            assert list(result.probabilities) == sorted(result.probabilities, reverse=True)
        single = tagger.classify(images[0], classes, top_k=2)
        assert single.labels == results[0].labels[:2]
        with pytest.raises(ValueError, match="at least two classes"):
            tagger.classify(images[0], ["dog"])


def test_as_prompt_is_a_grounding_dino_caption():
    assert TagResult(("Dog", "frisbee", "green grass"), (0.9, 0.8, 0.7)).as_prompt() == "dog . frisbee . green grass ."
    assert TagResult((), ()).as_prompt() == ""
    assert TagResult(("Dog",), (0.9,)).as_prompt(lower=False) == "Dog ."


def test_bundle_without_text_encoder_says_how_to_add_one(test_bundle):
    with Tagger(test_bundle) as tagger:
        with pytest.raises(BundleError, match=r"ram-export --text-encoder ViT-B-16.pt --out .*bundle"):
            tagger.classify(np.zeros((64, 64, 3), np.uint8), ["a", "b"])
