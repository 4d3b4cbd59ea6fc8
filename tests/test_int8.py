"""Calibrated int8 bundles (`ram-export --precision int8`), the accuracy report and its limits, the
calibration readers and splits. Real photos: scikit-image's bundled sample images ([dev])."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ram_edge import bundle_format as bf
from ram_edge.calibration import (
    AccuracyLimits, CalibrationError, EmbeddingReader, ImageReader, compare_logits, split_images,
)
from ram_edge.export.cli import main as export_main
from ram_edge.export.int8 import quantization_groups
from ram_edge.models import preset
from ram_edge.runtime import Tagger
from ram_edge.runtime.preprocess import Preprocessor

#: scikit-image's sample photographs, CC0 or public domain (its data/_fetchers.py docstrings).
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
          "coins.png", "retina.jpg", "ihc.png", "clock_motion.png", "brick.png", "grass.png", "gravel.png"]
VARIANT, TAGS = "ram_plus_tiny_224", 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (its sample photos) is not installed: pip install -e '.[dev]'")
    data = Path(spec.submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(data / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def int8_bundle(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "b"
    code = export_main(["--demo", VARIANT, "--num-tags", str(TAGS), "--no-text-encoder", "--precision", "int8",
                        "--calibration-images", str(photos), "--calibration-size", "6", "--sensitivity-images", "1",
                        "--min-top10-agreement", "0.8", "--max-flip-rate", "0.05", "--out", str(out), "-q"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "b"
    assert export_main(["--demo", VARIANT, "--num-tags", str(TAGS), "--no-text-encoder", "--out", str(out), "-q"]) == 0
    return out


def _logits(tagger: Tagger, paths) -> np.ndarray:
    return np.concatenate([tagger.logits(tagger.preprocess(p)[None]) for p in paths])


def test_int8_graphs_hold_only_symmetric_per_channel_qdq(int8_bundle):
    manifest = bf.read_manifest(int8_bundle)
    assert manifest["precision"] == "int8"
    for graph in ("encoder", "decoder"):
        proto = onnx.load(str(int8_bundle / manifest["graphs"][graph]["file"]))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        consumers = {}
        for node in proto.graph.node:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq, f"{graph}: no Q/DQ at all"
        weights = 0
        for node in qdq:
            scale, zero = inits[node.input[1]], inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), f"{node.name}: zero point not int8 0"
            assert (scale > 0).all()
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # a weight: int8 per output channel
                weights += 1
                w = inits[node.input[0]]
                assert w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64  # 7-bit (AVX2 saturation)
                axis = {a.name: a.i for a in node.attribute}["axis"]
                (user,) = consumers[node.output[0]]
                assert axis == (0 if user.op_type == "Conv" else w.ndim - 1)  # Conv (O, I, k, k); MatMul (K, N)
                assert scale.shape == (w.shape[axis],)
            else:  # an activation: one scale
                assert scale.ndim == 0
        assert weights > 0
        # The groups the export kept float have no Q/DQ; every other product reads int8.
        section = manifest["quantization"]["graphs"][graph]
        groups = quantization_groups(proto)
        dq_out = {o for n in qdq if n.op_type == "DequantizeLinear" for o in n.output}
        by_name = {n.name: n for n in proto.graph.node}
        assert {row["group"] for row in section["sensitivity"]} == set(groups)
        for name, group in groups.items():
            fed = [any(i in dq_out for i in by_name[n].input) for n in group.nodes]
            assert all(fed) if name not in section["kept_float"] else not any(fed), name


def test_manifest_records_calibration_sensitivity_and_accuracy(int8_bundle, photos):
    manifest = bf.read_manifest(int8_bundle)
    quant = manifest["quantization"]
    split = split_images(photos, calibration_size=6)
    assert quant["calibration_images"] == len(split.calibration) == 6
    assert quant["split"]["evaluation_images"] == len(split.evaluation) == 2  # 20 % of 13 photos
    assert quant["calibration_method"] == "minmax" and quant["sensitivity_images"] == 1
    encoder_groups = {row["group"]: row for row in quant["graphs"]["encoder"]["sensitivity"]}
    assert encoder_groups["visual_encoder.patch_embed.proj"]["kind"] == "conv"
    assert encoder_groups["visual_encoder.layers.0.attn.MatMul"]["kind"] == "activations"
    depth = preset(VARIANT).swin.depths[2]  # one group holds the same product of every block of a stage
    assert encoder_groups["visual_encoder.layers.2.mlp.fc2"]["nodes"] == depth
    assert 0 < quant["graphs"]["encoder"]["quantized_nodes"] <= sum(r["nodes"] for r in encoder_groups.values())
    decoder_groups = {row["group"] for row in quant["graphs"]["decoder"]["sensitivity"]}
    assert {"MatMul", "MatMul_1", "wordvec_proj", "fc"} <= decoder_groups  # RAM++ reweighting, projection, classifier
    for rows in (quant["graphs"][g]["sensitivity"] for g in ("encoder", "decoder")):
        for row in rows:
            assert 0.0 <= row["flip_rate"] <= 1.0 and 0.0 <= row["top10_agreement"] <= 1.0
    accuracy = manifest["accuracy"]
    assert accuracy["passed"] and accuracy["images"] == 2 and accuracy["tags"] == TAGS
    assert accuracy["limits"] == {"min_top10_agreement": 0.8, "max_flip_rate": 0.05, "max_probability_error": None}
    assert accuracy["top10_agreement"] >= 0.8 and accuracy["flip_rate"] <= 0.05
    assert 0.0 < accuracy["max_probability_error"] < 0.5  # lossy, but not broken


def test_int8_runs_on_onnxruntime_and_openvino_with_the_same_report(int8_bundle, fp32_bundle, photos):
    evaluation = split_images(photos, calibration_size=6).evaluation
    manifest = bf.read_manifest(int8_bundle)
    reference = _logits(Tagger(fp32_bundle, backend="onnxruntime", providers=["CPUExecutionProvider"]), evaluation)
    ort = Tagger(int8_bundle, backend="onnxruntime", providers=["CPUExecutionProvider"])
    thresholds = ort.vocabulary.threshold_array(ort.default_threshold)
    ort_report = compare_logits(reference, _logits(ort, evaluation), thresholds)
    # The runtime reproduces the report the export measured and stored.
    stored = manifest["accuracy"]
    assert ort_report.flips == stored["flips"]
    assert ort_report.top10_agreement == pytest.approx(stored["top10_agreement"])
    assert ort_report.max_probability_error == pytest.approx(stored["max_probability_error"], abs=1e-5)

    pytest.importorskip("openvino")
    ov = Tagger(int8_bundle, backend="openvino", backend_options={"inference_precision": "f32", "cache_dir": None})
    ov_logits = _logits(ov, evaluation)
    ov_report = compare_logits(reference, ov_logits, thresholds)
    assert abs(ov_report.top10_agreement - ort_report.top10_agreement) <= 0.1
    assert abs(ov_report.flip_rate - ort_report.flip_rate) <= 0.02
    assert abs(ov_report.max_probability_error - ort_report.max_probability_error) <= 0.05
    assert AccuracyLimits(0.8, 0.05).accepts(ov_report)
    # bf16 is an OpenVINO option on an fp32 bundle (compiled f32 on CPUs without native bf16).
    bf16 = Tagger(fp32_bundle, backend="openvino", backend_options={"inference_precision": "bf16", "cache_dir": None})
    assert compare_logits(reference, _logits(bf16, evaluation), thresholds).top10_agreement >= 0.9


def test_full_range_weights_on_request(photos, fp32_bundle, tmp_path):
    """--int8-weight-bits 8: the same symmetric per-channel Q/DQ with weights over the whole int8 range, recorded
    in the manifest; it still runs on onnxruntime within the limits it was exported under."""
    out = tmp_path / "w8"
    code = export_main(["--demo", VARIANT, "--num-tags", str(TAGS), "--no-text-encoder", "--precision", "int8",
                        "--int8-weight-bits", "8", "--calibration-images", str(photos), "--calibration-size", "4",
                        "--sensitivity-images", "1", "--min-top10-agreement", "0.8", "--max-flip-rate", "0.05",
                        "--out", str(out), "-q"])
    assert code == 0
    manifest = bf.read_manifest(out)
    quant = manifest["quantization"]
    assert quant["weight_bits"] == 8 and quant["weight_range"] == [-127, 127]
    largest = 0
    for graph in ("encoder", "decoder"):
        proto = onnx.load(str(out / manifest["graphs"][graph]["file"]))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                w = inits[node.input[0]].astype(np.int32)
                assert not inits[node.input[2]].any() and np.abs(w).max() <= 127
                largest = max(largest, int(np.abs(w).max()))
    assert largest == 127  # per-channel symmetric scales put each channel's largest weight at 127
    evaluation = split_images(photos, calibration_size=4).evaluation
    reference = _logits(Tagger(fp32_bundle, providers=["CPUExecutionProvider"]), evaluation)
    tagger = Tagger(out, providers=["CPUExecutionProvider"])
    report = compare_logits(reference, _logits(tagger, evaluation), tagger.vocabulary.threshold_array(tagger.default_threshold))
    assert report.flips == manifest["accuracy"]["flips"] and AccuracyLimits(0.8, 0.05).accepts(report)


def test_export_bundle_checks_calibration_as_the_cli_does(photos, tmp_path):
    """The library call refuses what ram-export refuses, with the same check (check_export_options)."""
    from ram_edge.export import CalibrationOptions, ExportError, export_bundle
    from ram_edge.models import demo_model

    model = demo_model(VARIANT, num_tags=TAGS)
    with pytest.raises(ExportError, match="--precision int8 needs --calibration-images"):
        export_bundle(model, tmp_path / "a", precision="int8")
    with pytest.raises(ExportError, match="--calibration-images applies to --precision int8, not fp16"):
        export_bundle(model, tmp_path / "b", precision="fp16", calibration=CalibrationOptions(str(photos)))
    assert list(tmp_path.iterdir()) == []


def test_seven_bit_weights_are_the_default_and_bits_are_checked(photos, tmp_path, capsys):
    from ram_edge.export import CalibrationOptions

    assert CalibrationOptions(str(photos)).weight_bits == 7
    with pytest.raises(Exception, match="--int8-weight-bits"):
        CalibrationOptions(str(photos), weight_bits=6)
    base = ["--demo", VARIANT, "--num-tags", str(TAGS), "--no-text-encoder", "--out", str(tmp_path / "b")]
    assert export_main(base + ["--precision", "fp16", "--int8-weight-bits", "8"]) == 2
    assert "--int8-weight-bits applies to --precision int8" in capsys.readouterr().err
    assert export_main(base + ["--precision", "int8", "--calibration-images", str(photos), "--int8-weight-bits", "6"]) == 2


def test_tag2text_int8_feeds_its_classifier_rows(photos, tmp_path):
    """Tag2Text's decoder reads per-tag classifier rows besides label_embed / label_mask: calibration, the
    sensitivity search and the accuracy report feed them too; its captioning graphs stay fp32."""
    out = tmp_path / "t2t"
    code = export_main(["--demo", "tag2text_tiny_384", "--num-tags", str(TAGS), "--precision", "int8",
                        "--calibration-images", str(photos), "--calibration-size", "4", "--sensitivity-images", "1",
                        "--min-top10-agreement", "0", "--max-flip-rate", "1", "--out", str(out), "-q"])
    assert code == 0
    manifest = bf.read_manifest(out)
    assert manifest["precision"] == "int8" and manifest["caption"]["precision"] == "fp32"
    assert sorted(manifest["vocabulary"]["per_tag"]) == ["label_fc_bias", "label_fc_weight"]
    evaluation = split_images(photos, calibration_size=4).evaluation
    tagger = Tagger(out, providers=["CPUExecutionProvider"])
    assert _logits(tagger, evaluation).shape == (len(evaluation), TAGS)
    assert manifest["accuracy"]["images"] == len(evaluation) and manifest["accuracy"]["tags"] == TAGS
    assert tagger.caption(evaluation[0]).token_ids


def test_cli_refuses_past_the_limits_and_writes_nothing(photos, tmp_path, capsys):
    out = tmp_path / "b"
    code = export_main(["--demo", VARIANT, "--num-tags", str(TAGS), "--no-text-encoder", "--precision", "fp16",
                        "--eval-images", str(photos), "--eval-size", "3", "--max-probability-error", "1e-7",
                        "--out", str(out), "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert "too far from fp32" in err and "max |probability error|" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no bundle, no partial or scratch folder


def test_cli_usage_errors(photos, tmp_path, capsys):
    """Refused before torch is imported and a model built: exit 2, in the CLI's flag names."""
    base = ["--demo", VARIANT, "--num-tags", str(TAGS), "--no-text-encoder", "--out", str(tmp_path / "b")]
    assert export_main(base + ["--precision", "int8"]) == 2
    assert "--calibration-images" in capsys.readouterr().err
    assert export_main(base + ["--calibration-images", str(photos)]) == 2
    assert "applies to --precision int8" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main(base + ["--precision", "int8", "--calibration-images", str(empty)]) == 2
    assert "no images" in capsys.readouterr().err
    assert export_main(base + ["--precision", "int8", "--calibration-images", str(photos), "--max-flip-rate", "2"]) == 2
    assert "--max-flip-rate must be within 0 and 1" in capsys.readouterr().err
    assert export_main(base + ["--precision", "int8", "--calibration-images", str(photos), "--calibration-size", "0"]) == 2
    assert "--calibration-size must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_split_is_deterministic_and_disjoint(photos, tmp_path):
    a = split_images(photos, calibration_size=100)
    assert a == split_images(photos, calibration_size=100)
    assert len(a.calibration) == 11 and len(a.evaluation) == 2 and not set(a.calibration) & set(a.evaluation)
    assert sorted(a.calibration + a.evaluation) == sorted(str(p) for p in photos.iterdir())
    assert len(split_images(photos, calibration_size=4).calibration) == 4
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(photos / "coffee.png", held / "coffee.png")
    b = split_images(photos, held)
    assert b.evaluation == (str(held / "coffee.png"),) and len(b.calibration) == 13  # a different file
    c = split_images(photos, photos, eval_size=5)  # the same folder: calibration avoids the evaluation images
    assert len(c.evaluation) == 5 and len(c.calibration) == 8 and not set(c.calibration) & set(c.evaluation)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(photos / "coffee.png", one / "x.png")
    with pytest.raises(CalibrationError, match="one image"):
        split_images(one)
    with pytest.raises(CalibrationError, match="not a folder"):
        split_images(tmp_path / "missing")


def test_readers_feed_runtime_preprocessing_and_skip_bad_files(photos, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = [str(photos / "coffee.png"), str(tmp_path / "broken.jpg"), str(photos / "camera.png")]
    pre = Preprocessor(224)
    reader = ImageReader(paths, pre)
    assert len(reader) == 2 and reader.skipped == [str(tmp_path / "broken.jpg")]
    first = reader.get_next()
    np.testing.assert_array_equal(first[bf.PIXEL_VALUES], pre(str(photos / "coffee.png"))[None])
    assert first[bf.PIXEL_VALUES].shape == (1, 3, 224, 224)
    assert reader.get_next() is not None and reader.get_next() is None
    reader.set_range(1, 2)  # onnxruntime's strided calibration: one image at a time
    assert reader.get_next()[bf.PIXEL_VALUES].shape == (1, 3, 224, 224) and reader.get_next() is None
    embed, mask = np.ones((3, 2, 8), np.float32), np.ones((3, 2), bool)
    embeddings = EmbeddingReader([np.zeros((5, 8), np.float32), np.ones((1, 5, 8), np.float32)], embed, mask)
    feeds = [embeddings.get_next(), embeddings.get_next()]
    assert embeddings.get_next() is None
    assert [f[bf.IMAGE_EMBEDS].shape for f in feeds] == [(1, 5, 8), (1, 5, 8)]
    assert feeds[0][bf.LABEL_EMBED] is feeds[1][bf.LABEL_EMBED]  # the vocabulary is never copied per image


def test_compare_logits_numbers():
    reference = np.array([[3.0, 2.0, 1.0, -1.0], [0.0, 1.0, 2.0, 3.0]])
    same = compare_logits(reference, reference.copy(), 0.5, k=2)
    assert same.top10_agreement == 1.0 and same.flips == 0 and same.max_probability_error == 0.0
    # Row 0: the top two swap with the third, one tag crosses 0.5; row 1 unchanged.
    moved = reference.copy()
    moved[0] = [1.0, 2.0, 3.0, 0.5]
    report = compare_logits(reference, moved, np.array([0.5, 0.5, 0.5, 0.5]), k=2)
    assert report.top10_agreement == pytest.approx(0.75)  # row 0 keeps 1 of 2, row 1 both
    assert report.worst_image_top10_agreement == 0.5
    assert report.flips == 1 and report.flip_rate == pytest.approx(1 / 8)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert report.max_probability_error == pytest.approx(sig(0.5) - sig(-1.0))  # tag 3
    assert report.max_logit_error == pytest.approx(2.0)
    limits = AccuracyLimits(min_top10_agreement=0.8, max_flip_rate=0.1)
    assert len(limits.violations(report)) == 2 and limits.share(0.5).max_flip_rate == pytest.approx(0.05)
    assert AccuracyLimits().accepts(same)
    with pytest.raises(ValueError):
        compare_logits(reference, reference[:1], 0.5)
    with pytest.raises(ValueError):
        AccuracyLimits(max_flip_rate=1.5)

