"""ram-export: graph parity with torch and the goldens, vocabulary as input, atomic bundles, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _shared import golden_paths, needs_shared
from ram_edge import bundle_format as bf
from ram_edge.export import VerificationError, export_bundle
from ram_edge.export import bundle as bundle_module
from ram_edge.export.cli import main as export_main
from ram_edge.models import demo_model, load_checkpoint
from ram_edge.vocabulary import Vocabulary


def _sessions(bundle: Path):
    return (
        ort.InferenceSession(str(bundle / bf.ENCODER_FILE), providers=["CPUExecutionProvider"]),
        ort.InferenceSession(str(bundle / bf.DECODER_FILE), providers=["CPUExecutionProvider"]),
    )


def _decode(decoder, image_embeds, label_embed, label_mask):
    feeds = {bf.IMAGE_EMBEDS: image_embeds, bf.LABEL_EMBED: label_embed.astype(np.float32), bf.LABEL_MASK: label_mask}
    return decoder.run(None, feeds)[0]


@pytest.fixture(scope="module", params=["ram_plus_tiny_384", "ram_tiny_224"])
def demo_bundle(request, tmp_path_factory):
    """A demo model (small vocabulary) and its fp32 bundle."""
    model = demo_model(request.param, seed=3, num_tags=24)
    out = tmp_path_factory.mktemp("bundle") / request.param
    export_bundle(model, out, source="demo:seed=3")
    return model, out


@needs_shared
@pytest.mark.parametrize("name", ["ram_plus_tiny_384", "ram_tiny_224"])
def test_golden_logits_through_onnx(name, tmp_path):
    pth, npz, meta = golden_paths(name)
    golden = np.load(npz)
    num_tags = json.loads(meta.read_text())["num_tags"]
    model = load_checkpoint(pth, tags=[f"t{i}" for i in range(num_tags)])
    result = export_bundle(model, tmp_path / "b", source=pth.name)
    assert result.verification.passed and result.verification.logits_max_abs_error < 1e-4

    encoder, decoder = _sessions(tmp_path / "b")
    embeds = encoder.run(None, {bf.PIXEL_VALUES: golden["pixel_values"]})[0]
    assert np.abs(embeds - golden["image_embeds"]).max() <= 1e-4
    # The golden's own fp32 label_embed, (T*D, E) -> (T, D, E)
    label_embed = golden["label_embed"].reshape(num_tags, -1, golden["label_embed"].shape[-1])
    logits = _decode(decoder, embeds, label_embed, np.ones(label_embed.shape[:2], bool))
    assert logits.shape == golden["logits"].shape
    assert np.abs(logits - golden["logits"]).max() <= 1e-4
    # A small vocabulary is stored float32 ("auto"): the bundle's own vocabulary is exact too.
    vocab = Vocabulary.load(tmp_path / "b" / bf.VOCABULARY_DIR)
    assert bf.read_manifest(tmp_path / "b")["vocabulary"]["dtype"] == "float32"
    assert np.abs(_decode(decoder, embeds, vocab.embeddings, vocab.mask) - golden["logits"]).max() <= 1e-4
    # Stored float16 (what "auto" does for RAM++'s 478 MB table), scores move by ~1e-4 (3 digits a component).
    export_bundle(model, tmp_path / "b16v", source=pth.name, vocab_dtype="float16", verify=False)
    vocab16 = Vocabulary.load(tmp_path / "b16v" / bf.VOCABULARY_DIR)
    assert bf.read_manifest(tmp_path / "b16v")["vocabulary"]["dtype"] == "float16"
    error16 = np.abs(_decode(decoder, embeds, vocab16.embeddings, vocab16.mask) - golden["logits"]).max()
    assert 0 < error16 < 5e-4


def test_dynamic_batch_tags_descriptions(demo_bundle):
    model, bundle = demo_bundle
    encoder, decoder = _sessions(bundle)
    rng = np.random.default_rng(0)
    size = model.config.image_size
    for batch, tags, descriptions in ((1, 1, 1), (3, 7, 4), (2, 40, 9)):
        pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        embeds = encoder.run(None, {bf.PIXEL_VALUES: pixels})[0]
        assert embeds.shape == (batch, model.config.swin.num_tokens, 512)
        label = rng.standard_normal((tags, descriptions, 512)).astype(np.float32)
        label /= np.linalg.norm(label, axis=-1, keepdims=True)
        mask = np.ones((tags, descriptions), bool)
        logits = _decode(decoder, embeds, label, mask)
        with torch.no_grad():
            ref = model.decode(torch.from_numpy(embeds), torch.from_numpy(label), torch.from_numpy(mask)).numpy()
        assert logits.shape == (batch, tags)
        assert np.abs(logits - ref).max() < 1e-4


def test_tag_independence_with_padding(demo_bundle):
    """Scores of k tags alone equal their scores inside a larger, ragged (padded) vocabulary."""
    model, bundle = demo_bundle
    encoder, decoder = _sessions(bundle)
    rng = np.random.default_rng(1)
    size = model.config.image_size
    embeds = encoder.run(None, {bf.PIXEL_VALUES: rng.standard_normal((2, 3, size, size), dtype=np.float32)})[0]
    ram_plus = model.config.kind == "ram_plus"
    counts = rng.integers(1, 6, size=30) if ram_plus else np.ones(30, int)
    ragged = [rng.standard_normal((n, 512)).astype(np.float32) for n in counts]
    ragged = [r / np.linalg.norm(r, axis=-1, keepdims=True) for r in ragged]
    vocab = Vocabulary([f"t{i}" for i in range(30)], ragged)
    full = _decode(decoder, embeds, vocab.embeddings, vocab.mask)

    picked = [3, 17, 29]
    alone = vocab.subset(picked)
    scores_alone = _decode(decoder, embeds, alone.embeddings, alone.mask)
    np.testing.assert_allclose(scores_alone, full[:, picked], atol=1e-5)
    # Each tag alone with exactly its own descriptions (no padding at all).
    for i in picked:
        single = _decode(decoder, embeds, ragged[i][None], np.ones((1, counts[i]), bool))
        np.testing.assert_allclose(single[:, 0], full[:, i], atol=1e-5)
    # Extra padding columns change nothing.
    wide = np.concatenate([vocab.embeddings, rng.standard_normal((30, 3, 512)).astype(np.float32)], axis=1)
    wide_mask = np.concatenate([vocab.mask, np.zeros((30, 3), bool)], axis=1)
    np.testing.assert_allclose(_decode(decoder, embeds, wide, wide_mask), full, atol=1e-5)


def test_manifest_hashes_and_metadata(demo_bundle):
    model, bundle = demo_bundle
    manifest = bf.read_manifest(bundle)
    assert manifest["model"]["kind"] == model.config.kind
    assert manifest["model"]["image_size"] == model.config.image_size
    assert manifest["precision"] == "fp32" and manifest["opset"] >= 17
    assert manifest["vocabulary"]["num_tags"] == 24
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx", "vocabulary/vocabulary.json", "vocabulary/embeddings.npy"}
    for name, digest in manifest["files"].items():
        assert bf.sha256_file(bundle / name) == digest
    assert manifest["verification"]["passed"] is True
    enc = manifest["graphs"]["encoder"]
    assert enc["outputs"][0]["shape"] == ["batch", model.config.swin.num_tokens, 512]
    assert [t["name"] for t in manifest["graphs"]["decoder"]["inputs"]] == ["image_embeds", "label_embed", "label_mask"]

    proto = onnx.load(str(bundle / bf.DECODER_FILE), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model.kind"] == model.config.kind and props["precision"] == "fp32" and props["graph"] == "decoder"
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", model.config.swin.num_tokens, 512], ["tags", "descriptions", 512], ["tags", "descriptions"]]
    ops = {n.op_type for n in onnx.load(str(bundle / bf.ENCODER_FILE)).graph.node}
    assert "LayerNormalization" in ops  # one node per LayerNorm (opset 17)


@pytest.mark.parametrize("variant", ["ram_plus_tiny_384", "ram_tiny_224"])
def test_fp16_bundle(variant, tmp_path):
    model = demo_model(variant, seed=5, num_tags=40)
    result = export_bundle(model, tmp_path / "b16", precision="fp16")
    v = result.verification
    assert v.passed and 0 < v.logits_max_abs_error < 5e-2 and v.probability_max_abs_error < 1e-2
    proto = onnx.load(str(tmp_path / "b16" / bf.ENCODER_FILE))
    weights = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert {n.op_type for n in proto.graph.node} >= {"LayerNormalization", "Cast"}
    assert (tmp_path / "b16" / bf.ENCODER_FILE).stat().st_size < 0.6 * proto.ByteSize() * 2


def test_int8_dynamic_bundle(tmp_path):
    model = demo_model("ram_plus_tiny_384", seed=5, num_tags=40)
    result = export_bundle(model, tmp_path / "b8", precision="int8-dynamic")
    v = result.verification
    assert v.passed and 1e-4 < v.logits_max_abs_error < 0.5
    proto = onnx.load(str(tmp_path / "b8" / bf.ENCODER_FILE))
    ops = {n.op_type for n in proto.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) >= 4 * sum(model.config.swin.depths)  # qkv, proj, fc1, fc2 of every block
    assert bf.read_manifest(tmp_path / "b8")["precision"] == "int8-dynamic"


def _leftovers(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_vocab_dtype_auto_switches_to_float16_for_large_tables(tmp_path, monkeypatch):
    model = demo_model("ram_tiny_224", num_tags=8)
    export_bundle(model, tmp_path / "small", verify=False)
    import ram_edge.vocabulary

    monkeypatch.setattr(ram_edge.vocabulary, "VOCAB_FLOAT32_MAX_BYTES", 8 * 512 * 4 - 1)
    export_bundle(model, tmp_path / "large", verify=False)
    stored = {name: np.load(tmp_path / name / bf.VOCABULARY_DIR / "embeddings.npy").dtype for name in ("small", "large")}
    assert stored == {"small": np.float32, "large": np.float16}
    assert bf.read_manifest(tmp_path / "large")["vocabulary"]["embedding_bytes"] == 8 * 512 * 2


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(bundle_module.LOGIT_TOLERANCE, "fp32", 0.0)
    model = demo_model("ram_tiny_224", num_tags=8)
    with pytest.raises(VerificationError, match="tolerance"):
        export_bundle(model, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_interrupted_export_keeps_old_bundle(tmp_path, monkeypatch):
    model = demo_model("ram_tiny_224", num_tags=8)
    export_bundle(model, tmp_path / "out", verify=False)
    before = bf.read_manifest(tmp_path / "out")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "verify_bundle_graphs", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(demo_model("ram_tiny_224", seed=9, num_tags=8), tmp_path / "out", overwrite=True)
    assert _leftovers(tmp_path, "out") == ["out"]
    assert bf.read_manifest(tmp_path / "out") == before


def test_cli_exit_codes(tmp_path, capsys):
    out = tmp_path / "b"
    assert export_main(["--demo", "ram_tiny_224", "--num-tags", "10", "--out", str(out), "-q"]) == 0
    assert (out / bf.MANIFEST_FILE).is_file()
    assert export_main(["--demo", "ram_tiny_224", "--num-tags", "10", "--out", str(out), "-q"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "c"), "-q"]) == 2
    assert "missing.pth: no such file" in capsys.readouterr().err
    assert export_main(["--demo", "ram_tiny_224", "--out", str(tmp_path / "d"), "--opset", "13", "-q"]) == 2
    assert not (tmp_path / "d").exists()
    assert export_main(["--help"]) == 0
    assert "exit status" in capsys.readouterr().out


def test_official_vocabulary_travels_with_the_bundle(tmp_path):
    """A 4,585-tag model gets the official names, Chinese names and thresholds, and the licence notice."""
    from ram_edge.runtime import Tagger

    out = tmp_path / "official"
    export_bundle(demo_model("ram_tiny_224"), out, verify=False)
    vocab = Vocabulary.load(out / bf.VOCABULARY_DIR)
    assert len(vocab) == 4585 and vocab.max_descriptions == 1
    assert (vocab.names[0], vocab.names_zh[0]) == ("3D CG rendering", "三维CG渲染")
    assert (vocab.names[4584], vocab.names_zh[4584]) == ("zoo", "动物园")
    assert float(vocab.thresholds[0]) == pytest.approx(0.65)
    assert (out / "NOTICE.recognize-anything.txt").read_text(encoding="utf-8").startswith("# NOTICES AND INFORMATION")
    manifest = bf.read_manifest(out)
    assert manifest["vocabulary"]["source"] == "official" and manifest["vocabulary"]["per_tag_thresholds"] is True

    image = Path(__file__).resolve().parents[1] / "examples" / "images" / "demo4.jpg"
    with Tagger(out) as tagger:
        probs = tagger.probabilities(tagger.preprocess(image)[None])[0]
        result = tagger.tag(image, lang="zh")
    on = np.flatnonzero(probs > vocab.thresholds)  # upstream's decision: per-tag official thresholds
    assert sorted(result.indices) == sorted(on.tolist())
    assert list(result.tags) == [vocab.names_zh[i] for i in result.indices]
    assert list(result.probabilities) == sorted(result.probabilities, reverse=True)


@pytest.mark.parametrize("args, message", [
    (["--demo", "ram_plus_tiny_384", "--opset", "13"], "--opset 13: use 17 or newer"),
    (["--demo", "ram_plus_tiny_384", "--num-tags", "0"], "--num-tags must be at least 1"),
    (["--demo", "ram_plus_tiny_384", "--max-batch", "0"], "--max-batch must be at least 1"),
    (["--checkpoint", "missing.pth"], "--checkpoint missing.pth: no such file"),
    (["--demo", "ram_plus_tiny_384", "--image-size", "224"], "--image-size and --variant apply to --checkpoint"),
])
def test_cli_refuses_bad_arguments_before_importing_torch(tmp_path, args, message):
    """With torch made unimportable, the refusal still comes (exit 2): nothing heavy ran first."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from ram_edge.export.cli import main; "
            f"sys.exit(main({args + ['--out', str(tmp_path / 'b')]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


def test_cli_version(capsys):
    assert export_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ram-export (ram-edge) ")
