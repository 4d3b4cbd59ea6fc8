"""Tag2Text through the bundle, torch-free at run time, against ``golden/tag2text_tiny_384``: tagging
logits and the tags upstream outputs, its learned vocabulary (subsets score as the whole), the tag
prompts, every golden caption token for token (beam search, greedy, user tags, the older transformers
scoring; one image at a time and batched), the tokenizer against transformers' BertTokenizer, bad input,
the bundle's captioning graphs and section, RAM's captioning branch, ``ram-tag --caption``.

The bundle comes from ``conftest.tag2text_bundle`` (exported once per session).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from ram_edge import bundle_format as bf
from ram_edge.runtime import BundleError, Tagger, Vocabulary
from ram_edge.runtime.caption import CaptionResult, apply_repetition_penalty, log_softmax
from ram_edge.runtime.cli import main as tag_main
from ram_edge.runtime.vocab_cli import main as vocab_main
from ram_edge.tags import TAG2TEXT_DELETE_TAG_INDEX, TAG2TEXT_NUM_TAGS

from _shared import golden_paths

IMAGES = ("demo4.jpg", "tagging_results.jpg")
#: (golden arrays' name, inputs of the json's outputs, Tagger.caption arguments)
CASES = [
    ("beam", "beam", {}),
    ("greedy", "greedy", {"num_beams": 1}),
    ("user_tags", "user_tags", {}),
    ("beam_legacy", "beam", {"legacy_scoring": True}),
    ("user_tags_legacy", "user_tags", {"legacy_scoring": True}),
]


@pytest.fixture(scope="module")
def tagger(tag2text_bundle):
    with Tagger(tag2text_bundle[0]) as t:
        yield t


@pytest.fixture(scope="module")
def pixels(reference):
    # The json: "the model input was pixel_values of ram_plus_tiny_384.npz".
    return np.load(reference / "golden" / "ram_plus_tiny_384.npz")["pixel_values"]


def golden_ids(golden, name: str, image: int) -> list:
    return golden[f"{name}_caption_ids"][image, : int(golden[f"{name}_caption_len"][image])].tolist()


def golden_captions(meta, name: str, inputs: str) -> list:
    section = meta["outputs_legacy_beam_scoring"] if name.endswith("_legacy") else meta["outputs"]
    return section[inputs]["captions"]


def user_tags(meta, inputs: str):
    return meta["user_tags_raw"] if inputs == "user_tags" else None


def reference_generation():
    """tests/_caption_reference.py (torch), the yardstick of transformers' search."""
    pytest.importorskip("torch")
    try:
        import _caption_reference
    except ImportError:  # tests/ imported as a package
        from tests import _caption_reference
    return _caption_reference


# -- tagging ---------------------------------------------------------------------------------------


def test_tagging_logits_through_the_bundle(tag2text_bundle, tagger, pixels, reference):
    _, golden, meta = tag2text_bundle
    images = [reference / "images" / name for name in IMAGES]
    np.testing.assert_array_equal(np.stack([tagger.preprocess(p) for p in images]), pixels)
    embeds = tagger.encode(pixels)
    assert embeds.shape == tuple(meta["shapes"]["image_embeds"]) == (2, 145, 128)  # Swin's width: no image_proj
    assert np.abs(embeds - golden["image_embeds"]).max() <= 1e-4
    logits = tagger.logits(pixels)
    assert logits.shape == (2, TAG2TEXT_NUM_TAGS)
    assert np.abs(logits - golden["logits"]).max() <= 1e-4
    np.testing.assert_array_equal(tagger.vocabulary.thresholds, golden["class_threshold"])


def test_tags_are_upstreams_without_the_deleted_ones(tag2text_bundle, tagger, pixels):
    _, golden, meta = tag2text_bundle
    assert tagger.bundle.excluded_tags == tuple(tagger.vocabulary.names[i] for i in TAG2TEXT_DELETE_TAG_INDEX)
    probabilities = tagger.probabilities(pixels)
    # Over the class thresholds: 9 and 13 tags, of which 2 and 2 are deleted ("one", "back" are forced on).
    assert (probabilities > golden["class_threshold"]).sum(axis=1).tolist() == meta["n_tags_over_threshold"]
    fed = meta["outputs"]["beam"]["tags_fed"]
    assert tagger.caption_tags(probabilities) == fed  # vocabulary order, " | "
    results = tagger.select(probabilities)
    assert [sorted(r.tags) for r in results] == [sorted(f.split(" | ")) for f in fed]
    assert all(r.probabilities == tuple(sorted(r.probabilities, reverse=True)) for r in results)
    # Deleted tags stay out whatever the threshold.
    everything = tagger.select(probabilities, threshold=0.0)
    assert all(len(r) == TAG2TEXT_NUM_TAGS - len(TAG2TEXT_DELETE_TAG_INDEX) for r in everything)
    assert not set(tagger.bundle.excluded_tags) & set(everything[0].tags)


def test_a_subset_of_the_learned_vocabulary_scores_as_the_whole(tag2text_bundle, tagger, pixels):
    full = tagger.logits(pixels)
    vocabulary = tagger.vocabulary
    assert not vocabulary.unique_names  # 114 of the 3,429 names are shared by two classes, as upstream's list
    assert sorted(vocabulary.per_tag) == [bf.LABEL_FC_BIAS, bf.LABEL_FC_WEIGHT]
    picks = [2701, 5, 3428, 1167, 0, 14, 3038]  # 14 and 3038 are both "smile"
    part = vocabulary.subset(picks)
    assert part.names[-2:] == ["smile", "smile"] and len(part) == 7
    embeds = tagger.encode(pixels)
    assert np.abs(tagger.decode(embeds, vocabulary=part) - full[:, picks]).max() <= 1e-6  # measured: 0
    try:
        tagger.set_vocabulary(part)
        assert np.abs(tagger.logits(pixels) - full[:, picks]).max() <= 1e-6
        assert tagger.caption_tags(tagger.probabilities(pixels)) == ["woman", "person"]  # the subset's tags
    finally:
        tagger.set_vocabulary(vocabulary)
    with pytest.raises(KeyError, match=r"tag name 'smile' stands for 2 tags of this vocabulary \(positions 14, 3038\)"):
        vocabulary.subset(["smile"])


def test_open_set_vocabularies_are_refused(tag2text_bundle, tagger, tmp_path):
    words = Vocabulary(["otter", "kayak"], np.ones((2, tagger.bundle.embed_dim)))
    with pytest.raises(ValueError, match=r"scores each tag with its own classifier row: the vocabulary must carry "
                                         r"the per-tag arrays label_fc_weight, label_fc_bias"):
        tagger.set_vocabulary(words)
    with pytest.raises(BundleError, match=r"Tag2Text scores only its learned 3,429-tag label table"):
        tagger.text_encoder
    code = vocab_main(["build", str(tag2text_bundle[0]), "--tags", "otter,kayak", "--out", str(tmp_path / "v")])
    assert code == 2 and not (tmp_path / "v").exists()


# -- captions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, inputs, kwargs", CASES, ids=[c[0] for c in CASES])
def test_golden_captions_per_image_and_batched(tag2text_bundle, tagger, pixels, name, inputs, kwargs):
    _, golden, meta = tag2text_bundle
    tags = user_tags(meta, inputs)
    alone = [tagger.caption(pixels[i], tags=None if tags is None else tags[i], **kwargs) for i in range(2)]
    batched = tagger.caption(pixels, tags=tags, **kwargs)
    assert all(isinstance(r, CaptionResult) for r in alone) and len(batched) == 2
    for i in range(2):
        assert list(alone[i].token_ids) == golden_ids(golden, name, i), f"image {i} alone"
        assert batched[i] == alone[i], f"image {i} in the batch"
        assert alone[i].text == golden_captions(meta, name, inputs)[i]
        assert alone[i].tags == meta["outputs"][inputs]["tags_fed"][i]
    # Upstream's own batched beam search gave image 1 image 0's caption (its batched_quirk); ours does not.
    if name == "beam":
        assert golden["beam_batched_caption_ids"][1].tolist() != list(batched[1].token_ids)


def test_tag_prompts_are_upstreams(tag2text_bundle, tagger):
    _, golden, meta = tag2text_bundle
    for mode in ("beam", "greedy", "user_tags"):
        ids, mask = tagger.captioner.tag_prompt_ids(meta["outputs"][mode]["tags_fed"])
        np.testing.assert_array_equal(ids, golden[f"{mode}_enc_input_ids"])
        np.testing.assert_array_equal(mask, golden[f"{mode}_enc_attention_mask"])


def test_tokenizer_is_transformers_bert_tokenizer(tagger):
    """Ids and text from transformers 4.36.2's BertTokenizer (slow, upstream's init_tokenizer) for strings that
    exercise accents, case, literal special tokens, CJK, unicode spaces, long words, contractions.
    (The same held on 34,014 tag-list and fuzzed strings and 20,000 id sequences with tokenizers 0.15.2 and
    0.23.3; see docs/captioning.md.)"""
    tokenizer = tagger.captioner.tokenizer
    expected = {
        "Café naïve ÅNGSTRÖM": [101, 7668, 15743, 17076, 15687, 102],
        "dog | frisbee |  green grass": [101, 3899, 1064, 10424, 2483, 11306, 1064, 2665, 5568, 102],
        "[SEP] and [sep], [DEC]x": [101, 102, 1998, 1031, 19802, 1033, 1010, 30522, 1060, 102],
        "東京タワー 3.5kg": [101, 1879, 1755, 1709, 30262, 30265, 1017, 1012, 1019, 2243, 2290, 102],
        "x-ray\u00a0e.g.\tit's": [101, 1060, 1011, 4097, 1041, 1012, 1043, 1012, 2009, 1005, 1055, 102],
        "a" * 101 + " b": [101, 100, 1038, 102],
    }
    for text, ids in expected.items():
        assert tokenizer.encode(text) == ids, text
    decoded = {
        (30522, 1037, 3861, 1997, 2079, 2025, 2175, 1012, 102): "a picture of do not go.",
        (30522, 1037, 3861, 1997, 2123, 1005, 1056, 1010, 2009, 1005, 1055, 100, 102): "a picture of don't, it's",
        (30522, 1037, 3861, 1997, 6774, 17580, 405, 17580, 102, 0, 0): "a picture ofzingeis [unused400]eis",
    }
    for ids, text in decoded.items():
        assert tokenizer.decode(ids) == text


def test_repetition_penalty_and_lengths_as_transformers(tag2text_bundle, tagger, pixels):
    """Other search settings than the goldens': the numpy search against the torch reference of
    transformers' (tests/_caption_reference.py) on the same tag states, token for token."""
    generation = reference_generation()
    import torch

    from ram_edge.models import load_checkpoint

    _, golden, meta = tag2text_bundle
    model = load_checkpoint(golden_paths("tag2text_tiny_384")[0], caption_heads=4)
    fed = meta["outputs"]["beam"]["tags_fed"]
    ids, mask = tagger.captioner.tag_prompt_ids(fed)
    with torch.no_grad():
        states = model.encode_tags(torch.from_numpy(golden["image_embeds"]), torch.from_numpy(ids), torch.from_numpy(mask))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: a thread pool only adds contention
    settings = [(1, 1.5, 30, 10), (3, 1.3, 24, 16), (2, 1.2, 12, 5)]
    for beams, penalty, max_length, min_length in settings:
        caption = replace(model.config.captioning, num_beams=beams, max_length=max_length, min_length=min_length)
        if beams == 1:
            want = generation.greedy(model, states, penalty, caption)
        else:
            want = generation.beam_search(model, states, repetition_penalty=penalty, caption=caption)
        got = tagger.caption(pixels, num_beams=beams, repetition_penalty=penalty, max_length=max_length,
                             min_length=min_length)
        for i in range(2):
            row, n = want[i].tolist(), len(got[i].token_ids)
            assert list(got[i].token_ids) == row[:n] and not any(row[n:]), (beams, penalty, max_length, i)
            assert n <= max_length and (n >= min_length or got[i].token_ids[-1] != 102)
    torch.set_num_threads(threads)
    # The penalty changes the captions (the goldens' captions repeat "ether", "tae", ...).
    assert tagger.caption(pixels[0], repetition_penalty=1.5).token_ids != tuple(golden_ids(golden, "beam", 0))


def test_repetition_penalty_processor():
    scores = np.array([[-1.0, 2.0, -3.0, 4.0], [1.0, -2.0, 0.5, 0.0]], dtype=np.float32)
    seen = np.array([[1, 2, 2], [0, 3, 1]])
    out = apply_repetition_penalty(scores.copy(), seen, 2.0)
    np.testing.assert_array_equal(out, [[-1.0, 1.0, -6.0, 4.0], [0.5, -4.0, 0.5, 0.0]])
    np.testing.assert_array_equal(apply_repetition_penalty(scores.copy(), seen, 1.0), scores)
    np.testing.assert_allclose(np.exp(log_softmax(scores)).sum(axis=1), 1.0, rtol=1e-6)


# -- bad input -------------------------------------------------------------------------------------


def test_long_and_empty_user_tags(tag2text_bundle, tagger, pixels, caplog):
    _, golden, meta = tag2text_bundle
    beam = [golden_ids(golden, "beam", i) for i in range(2)]
    # Empty user tags fall back to the predicted ones, as upstream's script does.
    empties = ("", "   ", "none", "None", None)
    results = tagger.caption(pixels[[0] * len(empties) + [1]], tags=list(empties) + [meta["user_tags_raw"][1]])
    for result in results[:-1]:
        assert list(result.token_ids) == beam[0] and result.tags == meta["outputs"]["beam"]["tags_fed"][0]
    assert list(results[-1].token_ids) == golden_ids(golden, "user_tags", 1)
    # Over-long user tags are cut at the 40-token tag prompt, as upstream's tokenizer does (image 1's 18 tags
    # already are): 500 tags caption like their first 40 tokens.
    many = ", ".join(f"tag{i}" for i in range(500))
    with caplog.at_level(logging.WARNING, logger="ram_edge.runtime.tagger"):
        long = tagger.caption(pixels[0], tags=many)
    assert long.tags_truncated and long.tags == many.replace(",", " | ")
    assert "were cut there" in caplog.text
    ids, mask = tagger.captioner.tag_prompt_ids([long.tags])
    assert ids.shape == (1, 40) and mask.all() and ids[0, -1] == 102 and ids[0, 0] == 30523
    assert not tagger.caption(pixels[0]).tags_truncated
    with pytest.raises(ValueError, match=r"tags has 3 entries for 2 images"):
        tagger.caption(pixels, tags=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"for one image pass its tags as one string"):
        tagger.caption(pixels[0], tags=["dog", "cat"])
    with pytest.raises(ValueError, match=r"num_beams must be at least 1"):
        tagger.caption(pixels[0], num_beams=0)
    with pytest.raises(ValueError, match=r"max_length 4 leaves no token after the 4-token prompt"):
        tagger.caption(pixels[0], max_length=4)
    with pytest.raises(ValueError, match=r"repetition_penalty must be a positive number"):
        tagger.caption(pixels[0], repetition_penalty=0)
    assert tagger.caption([]) == []


def test_bundles_without_captioning_graphs_say_which_export_adds_them(tag2text_bundle, tmp_path, bundle_factory):
    ram_plus = bundle_factory()  # the hand-built RAM++ test bundle: tagging works as before
    with Tagger(ram_plus) as plain:
        assert not plain.has_captioning and plain.bundle.excluded_tags == ()
        assert len(plain.tag(np.zeros((64, 64, 3), np.uint8), threshold=0.0)) == 6
        with pytest.raises(BundleError, match=r"this ram_plus bundle has no captioning graphs .* RAM\+\+ has no "
                                              r"captioning branch"):
            plain.caption(np.zeros((64, 64, 3), np.uint8))
    ram = bundle_factory(edit_manifest=lambda m: m["model"].update(kind="ram"))
    with Tagger(ram) as plain, pytest.raises(BundleError, match=r"ram-export --checkpoint ram_swin_large_14m\.pth "
                                                                 r"--captioning --out"):
        plain.caption(np.zeros((64, 64, 3), np.uint8))
    code = tag_main([str(ram), str(tmp_path), "--caption", "-q"])
    assert code == 2


def test_tag2text_without_captioning(tag2text_bundle, tmp_path, reference):
    pytest.importorskip("torch")
    from ram_edge.export.cli import main as export_main

    pth = str(reference / "golden" / "tag2text_tiny_384.pth")
    assert export_main(["--checkpoint", pth, "--out", str(tmp_path / "x"), "-q"]) == 2  # 12 heads do not divide 32
    assert not (tmp_path / "x").exists()
    out = tmp_path / "tagging_only"
    assert export_main(["--checkpoint", pth, "--no-captioning", "--no-verify", "--out", str(out), "-q"]) == 0
    manifest = bf.read_manifest(out)
    assert "caption" not in manifest and set(manifest["graphs"]) == {"encoder", "decoder"}
    assert not (out / bf.CAPTION_TOKENIZER_DIR).exists()
    assert (out / "NOTICE.recognize-anything.txt").is_file()  # Tag2Text's tag list is recognize-anything's
    with Tagger(out) as t:
        assert not t.has_captioning and len(t.vocabulary) == TAG2TEXT_NUM_TAGS
        np.testing.assert_array_equal(t.vocabulary.per_tag[bf.LABEL_FC_BIAS],
                                      Vocabulary.load(tag2text_bundle[0] / "vocabulary").per_tag[bf.LABEL_FC_BIAS])
        with pytest.raises(BundleError, match=r"re-export it with them: `ram-export --checkpoint tag2text_swin_14m\.pth"):
            t.caption(reference / "images" / IMAGES[0])


# -- the bundle ------------------------------------------------------------------------------------


def test_caption_graphs_manifest_and_dynamic_axes(tag2text_bundle):
    bundle, golden, meta = tag2text_bundle
    manifest = bf.read_manifest(bundle)
    caption = manifest["caption"]
    assert caption["prompt_ids"] == meta["generate"]["prompt_ids"] and caption["prompt"] == meta["generate"]["prompt"]
    assert caption["tokenizer"]["special_tokens"] == meta["tokenizer"]["special_ids"]
    assert caption["search"] == {"num_beams": 3, "max_length": 30, "min_length": 10, "repetition_penalty": 1.0}
    assert caption["tag_max_length"] == 40 and caption["vocab_size"] == meta["tokenizer"]["len"] == 30524
    assert caption["precision"] == "fp32" and caption["verification"]["passed"]
    assert caption["verification"]["step_logits_max_abs_error"] < 1e-4
    for rel in (bf.TAG_ENCODER_FILE, bf.TEXT_DECODER_FILE, "caption_tokenizer/vocab.txt", "caption_tokenizer/NOTICE.md",
                "caption_tokenizer/LICENSE", "vocabulary/label_fc_weight.npy", "vocabulary/label_fc_bias.npy"):
        assert manifest["files"][rel] == bf.sha256_file(bundle / rel)
    assert manifest["model"]["image_embed_dim"] == 128 and manifest["model"]["embed_dim"] == 32
    # One text-decoder graph for the prompt (past length 0) and every step, batch / lengths dynamic.
    decoder = ort.InferenceSession(str(bundle / bf.TEXT_DECODER_FILE), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in decoder.get_inputs()}
    assert shapes[bf.PAST_KV] == [2, 2, "batch", 4, "past", 8] and shapes[bf.INPUT_IDS] == ["batch", "new_tokens"]
    encoder = ort.InferenceSession(str(bundle / bf.TAG_ENCODER_FILE), providers=["CPUExecutionProvider"])
    states, cross = encoder.run(None, {bf.TAG_INPUT_IDS: golden["beam_enc_input_ids"].astype(np.int64),
                                       bf.TAG_ATTENTION_MASK: golden["beam_enc_attention_mask"].astype(np.int64),
                                       bf.IMAGE_EMBEDS: golden["image_embeds"]})
    assert np.abs(states - golden["beam_tag_encoder_out"]).max() <= 1e-4
    assert cross.shape == (2, 2, 2, 4, 40, 8)
    ids = golden["greedy_caption_ids"].astype(np.int64)  # teacher-forced: the prompt, then 3 + 2 tokens
    cross = encoder.run(None, {bf.TAG_INPUT_IDS: golden["greedy_enc_input_ids"].astype(np.int64),
                               bf.TAG_ATTENTION_MASK: golden["greedy_enc_attention_mask"].astype(np.int64),
                               bf.IMAGE_EMBEDS: golden["image_embeds"]})[1]
    past = np.zeros((2, 2, 2, 4, 0, 8), np.float32)
    logits = []
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 7), (7, 9)):
        step, past = decoder.run(None, {bf.INPUT_IDS: ids[:, start:stop], bf.CROSS_KV: cross, bf.PAST_KV: past})
        assert step.shape == (2, stop - start, 30524) and past.shape[4] == stop
        logits.append(step)
    logits = np.concatenate(logits, axis=1)  # logits[:, t] scores token t + 1
    chosen = np.take_along_axis(logits[:, 3:8], ids[:, 4:9, None], axis=2)[..., 0]
    assert np.abs(chosen - golden["greedy_step_logit"][:, :5]).max() <= 1e-4


# -- RAM's captioning branch -----------------------------------------------------------------------


def test_ram_captions_through_the_bundle(tmp_path):
    """RAM's branch (tag encoder over image_proj's 512-wide output) exported with captioning=True: the
    runtime's captions equal the torch reference's on the same tag states."""
    generation = reference_generation()
    import torch

    from ram_edge.export import export_bundle
    from ram_edge.models import demo_model
    from ram_edge.models.demo import demo_config

    model = demo_model(demo_config("ram_tiny_224", captioning=True), seed=2, num_tags=12)
    assert model.config.kind == "ram" and model.config.captioning.tag_encoder.encoder_width == 512
    result = export_bundle(model, tmp_path / "ram", source="demo:seed=2", captioning=True)
    assert result.manifest["caption"]["verification"]["passed"]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with Tagger(tmp_path / "ram") as tagger:
        got = tagger.caption(pixels, tags=["dog, frisbee", None], num_beams=2, max_length=16)
        ids, mask = tagger.captioner.tag_prompt_ids([r.tags for r in got])
    with torch.no_grad():
        states = model.encode_tags(model.encode_image(torch.from_numpy(pixels)), torch.from_numpy(ids),
                                   torch.from_numpy(mask))
    want = generation.beam_search(model, states, caption=replace(model.config.captioning, num_beams=2, max_length=16))
    for i in range(2):
        row, n = want[i].tolist(), len(got[i].token_ids)
        assert list(got[i].token_ids) == row[:n] and not any(row[n:])
    assert got[0].tags == "dog |  frisbee" and got[1].tags.startswith("tag_")


# -- ram-tag --caption -----------------------------------------------------------------------------


def test_ram_tag_caption_in_every_format(tag2text_bundle, reference, tmp_path):
    bundle, golden, meta = tag2text_bundle
    images = str(reference / "images")
    beam = meta["outputs"]["beam"]["captions"]
    out = tmp_path / "tags.jsonl"
    run = [str(bundle), images, "--out", str(out), "-q", "--no-verify", "--overwrite"]
    assert tag_main(run + ["--caption", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in rows] == beam and [r["path"].rsplit("/", 1)[-1] for r in rows] == list(IMAGES)
    assert [r["tags"] for r in rows] == [list(r.tags) for r in _tags(bundle, reference)]
    assert tag_main(run + ["--caption", "--format", "csv", "--num-beams", "1"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["caption"] for r in rows] == meta["outputs"]["greedy"]["captions"] and rows[0]["tags"]
    assert tag_main(run + ["--caption-tags", meta["user_tags_raw"][0], "--format", "prompt"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].split("\t")[2] == meta["outputs"]["user_tags"]["captions"][0]
    # Without --caption the records are as before.
    assert tag_main(run + ["--format", "json"]) == 0
    assert "caption" not in json.loads(out.read_text())[0]
    assert tag_main(run + ["--num-beams", "2"]) == 2


def _tags(bundle, reference):
    with Tagger(bundle, verify_files=False) as tagger:
        return tagger.tag([reference / "images" / name for name in IMAGES])


def test_fp16_captioning_graphs(tmp_path, reference):
    """fp16 bundles carry fp16 captioning graphs (inputs and outputs stay float32), verified against torch
    at export; int8-dynamic and int8 bundles keep them fp32 (dynamic int8 moved step logits by ~10)."""
    pytest.importorskip("torch")
    from ram_edge.export import export_bundle
    from ram_edge.export.precision import CAPTION_PRECISION, CAPTION_TOLERANCE
    from ram_edge.models import demo_model

    assert CAPTION_PRECISION == {"fp32": "fp32", "fp16": "fp16", "int8-dynamic": "fp32", "int8": "fp32"}
    model = demo_model("tag2text_tiny_384", seed=4, num_tags=20)
    manifest = export_bundle(model, tmp_path / "b", precision="fp16", source="demo:seed=4").manifest
    caption = manifest["caption"]
    assert caption["precision"] == "fp16" and caption["verification"]["passed"]
    assert 0 < caption["verification"]["step_logits_max_abs_error"] <= CAPTION_TOLERANCE["fp16"]
    assert manifest["vocabulary"]["excluded_tags"] == []  # a 20-tag demo list: upstream's indices do not apply
    with Tagger(tmp_path / "b") as tagger:
        result = tagger.caption(reference / "images" / IMAGES[0], num_beams=1)
    assert result.token_ids[:4] == tuple(caption["prompt_ids"]) and len(result.token_ids) <= 30
