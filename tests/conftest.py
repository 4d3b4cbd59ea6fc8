"""Shared fixtures. ``make_test_bundle`` writes a tiny but contract-exact bundle (docs/bundle.md) with
hand-built ONNX graphs, so runtime tests need neither torch nor the exporter.

The tiny model (S = 64, N = (64/32)^2 = 4 image tokens, E = 8):

* encoder: 32x32 average pooling -> (B, 4, 3) patches -> @ W (3, E) -> tokens; token 0 = their mean.
* decoder: logits[b, t] = SCALE * image_embeds[b, 0] . masked_mean_d(label_embed[t, d])

so every tag's logit depends only on its own rows, and :func:`reference_logits` computes it in numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest

from ram_edge.bundle_format import (
    DECODER_FILE, ENCODER_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, VOCABULARY_DIR,
    preprocessing_spec, sha256_file, write_json,
)
from ram_edge.vocabulary import Vocabulary

TEST_IMAGE_SIZE = 64
TEST_EMBED_DIM = 8
TEST_NUM_TOKENS = 1 + (TEST_IMAGE_SIZE // 32) ** 2
LOGIT_SCALE = 4.0
PATCH_WEIGHTS = np.array(
    [[0.5, -0.25, 1.0, 0.0, -0.75, 0.3, 0.2, -0.1],
     [-0.4, 0.6, 0.1, 0.9, 0.2, -0.3, 0.5, 0.7],
     [0.3, 0.2, -0.8, 0.4, 0.6, 0.1, -0.6, 0.25]], dtype=np.float32)

REPO_ROOT = Path(__file__).resolve().parents[1]

# The `reference` fixture (../shared/reference, or a skip saying it is absent) for every test module.
from _shared import reference  # noqa: E402,F401


# ------------------------------------------------------------------------------------------------------
# Graphs


def _encoder_model(image_size: int, embed_dim: int, weights: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    grid = image_size // 32
    nodes = [
        helper.make_node("AveragePool", ["pixel_values"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Reshape", ["pooled", "patch_shape"], ["patches_cf"]),
        helper.make_node("Transpose", ["patches_cf"], ["patches"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["patches", "patch_weights"], ["tokens"]),
        helper.make_node("ReduceMean", ["tokens"], ["global_token"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["global_token", "tokens"], ["image_embeds"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([0, 3, grid * grid], dtype=np.int64), "patch_shape"),
        numpy_helper.from_array(weights.astype(np.float32), "patch_weights"),
    ]
    graph = helper.make_graph(
        nodes, "test_encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 1 + grid * grid, embed_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _decoder_model(num_tokens: int, embed_dim: int, scale: float):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["image_embeds", "zero"], ["global_token"], axis=1),  # (B, E)
        helper.make_node("Cast", ["label_mask"], ["mask_f"], to=TensorProto.FLOAT),  # (T, D)
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask_3d"]),  # (T, D, 1)
        helper.make_node("Mul", ["label_embed", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["label_sum"], keepdims=0),  # (T, E)
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["label_count"], keepdims=1),  # (T, 1)
        helper.make_node("Div", ["label_sum", "label_count"], ["label_mean"]),
        helper.make_node("Transpose", ["label_mean"], ["label_mean_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["global_token", "label_mean_t"], ["dot"]),
        helper.make_node("Mul", ["dot", "scale"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
    ]
    graph = helper.make_graph(
        nodes, "test_decoder",
        [
            helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", num_tokens, embed_dim]),
            helper.make_tensor_value_info("label_embed", TensorProto.FLOAT, ["tags", "descriptions", embed_dim]),
            helper.make_tensor_value_info("label_mask", TensorProto.BOOL, ["tags", "descriptions"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "tags"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_image_embeds(pixel_values: np.ndarray, weights: np.ndarray = PATCH_WEIGHTS) -> np.ndarray:
    B, _, S, _ = pixel_values.shape
    g = S // 32
    pooled = pixel_values.reshape(B, 3, g, 32, g, 32).mean(axis=(3, 5)).reshape(B, 3, g * g)
    tokens = pooled.transpose(0, 2, 1) @ weights
    return np.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)


def reference_logits(pixel_values: np.ndarray, vocab: Vocabulary, scale: float = LOGIT_SCALE) -> np.ndarray:
    """The test model's logits in float64 numpy, for comparison with the graphs."""
    g = reference_image_embeds(pixel_values.astype(np.float64))[:, 0]
    mask = vocab.mask.astype(np.float64)[:, :, None]
    label_mean = (vocab.embeddings.astype(np.float64) * mask).sum(1) / mask.sum(1)
    return scale * g @ label_mean.T


# ------------------------------------------------------------------------------------------------------
# Vocabulary and bundle


def make_test_vocabulary(
    num_tags: int = 6,
    descriptions: Optional[Sequence[int]] = None,
    embed_dim: int = TEST_EMBED_DIM,
    thresholds: Optional[Sequence[float]] = None,
    with_zh: bool = True,
    seed: int = 0,
) -> Vocabulary:
    """Tags ``tag_0`` ... with ragged descriptions (1, 2, 3, 1, 2, 3, ... unless given)."""
    rng = np.random.default_rng(seed)
    counts = list(descriptions) if descriptions is not None else [1 + i % 3 for i in range(num_tags)]
    embeddings = [rng.standard_normal((d, embed_dim)).astype(np.float32) for d in counts]
    # float16 round trip now, so that the vocabulary in memory equals the one loaded from the bundle
    embeddings = [e.astype(np.float16).astype(np.float32) for e in embeddings]
    return Vocabulary(
        [f"tag_{i}" for i in range(num_tags)],
        embeddings,
        thresholds=thresholds,
        names_zh=[f"标签{i}" for i in range(num_tags)] if with_zh else None,
    )


def make_test_bundle(
    root: Path,
    *,
    name: str = "bundle",
    vocabulary: Optional[Vocabulary] = None,
    image_size: int = TEST_IMAGE_SIZE,
    embed_dim: int = TEST_EMBED_DIM,
    decoder_embed_dim: Optional[int] = None,
    default_threshold: float = 0.68,
    edit_manifest: Optional[Callable[[dict], None]] = None,
) -> Path:
    """Write a bundle into ``root/name`` and return its path.

    decoder_embed_dim: build the decoder for a different E than the encoder (a broken bundle).
    edit_manifest:     mutate the manifest dict before it is written (hashes are of the real files).
    """
    import onnx

    bundle = Path(root) / name
    bundle.mkdir(parents=True)
    num_tokens = 1 + (image_size // 32) ** 2
    weights = np.resize(PATCH_WEIGHTS, (3, embed_dim)).astype(np.float32)
    dec_e = decoder_embed_dim or embed_dim
    onnx.save(_encoder_model(image_size, embed_dim, weights), str(bundle / ENCODER_FILE))
    onnx.save(_decoder_model(num_tokens, dec_e, LOGIT_SCALE), str(bundle / DECODER_FILE))
    vocab = vocabulary if vocabulary is not None else make_test_vocabulary(embed_dim=embed_dim)
    vocab.save(bundle / VOCABULARY_DIR)

    embeds_shape = ["batch", num_tokens, embed_dim]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": "2026-01-01T00:00:00Z",
        "model": {"kind": "ram_plus", "variant": "custom", "source": "test:hand-built", "image_size": image_size,
                  "embed_dim": embed_dim, "num_image_tokens": num_tokens, "config": {}},
        "preprocessing": preprocessing_spec(image_size),
        "precision": "fp32",
        "opset": 17,
        "max_batch": 8,
        "graphs": {
            "encoder": {"file": ENCODER_FILE,
                        "inputs": [{"name": "pixel_values", "shape": ["batch", 3, image_size, image_size],
                                    "dtype": "float32"}],
                        "outputs": [{"name": "image_embeds", "shape": embeds_shape, "dtype": "float32"}]},
            "decoder": {"file": DECODER_FILE,
                        "inputs": [{"name": "image_embeds", "shape": embeds_shape, "dtype": "float32"},
                                   {"name": "label_embed", "shape": ["tags", "descriptions", embed_dim],
                                    "dtype": "float32"},
                                   {"name": "label_mask", "shape": ["tags", "descriptions"], "dtype": "bool"}],
                        "outputs": [{"name": "logits", "shape": ["batch", "tags"], "dtype": "float32"}]},
        },
        "vocabulary": {"dir": VOCABULARY_DIR, "num_tags": vocab.num_tags, "max_descriptions": vocab.max_descriptions,
                       "default_threshold": default_threshold, "source": "test"},
        "files": {},
        "verification": {"logits_max_abs_error": 0.0, "tolerance": 1e-4, "reference": "numpy"},
        "versions": {"ram_edge": "test"},
    }
    for rel in (ENCODER_FILE, DECODER_FILE, f"{VOCABULARY_DIR}/vocabulary.json", f"{VOCABULARY_DIR}/embeddings.npy"):
        manifest["files"][rel] = sha256_file(bundle / rel)
    if edit_manifest is not None:
        edit_manifest(manifest)
    write_json(bundle / MANIFEST_FILE, manifest)
    return bundle


def rewrite_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    path = Path(bundle) / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    write_json(path, manifest)


# ------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def bundle_factory(tmp_path) -> Callable[..., Path]:
    """``bundle_factory(name=..., **options)``: :func:`make_test_bundle` under this test's tmp_path."""
    counter = iter(range(1000))

    def factory(**kwargs) -> Path:
        kwargs.setdefault("name", f"bundle{next(counter)}")
        return make_test_bundle(tmp_path, **kwargs)

    return factory


@pytest.fixture
def test_bundle(bundle_factory) -> Path:
    return bundle_factory(name="bundle")


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """A folder of small, different RGB images: a.png, b.jpg, sub/c.png."""
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for rel, size in (("a.png", (80, 60)), ("b.jpg", (50, 90)), ("sub/c.png", (64, 64))):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / rel, quality=95)
    return folder


@pytest.fixture(scope="session")
def golden_bundle(reference, tmp_path_factory) -> Callable[[str], tuple]:
    """``golden_bundle(name)`` -> (bundle folder, golden arrays): ``golden/<name>.pth`` exported with
    ``ram_edge.export.export_bundle`` (fp32, tags ``t0``...), once per test session, shared by every test
    that runs a golden through a backend. Skips without torch (the export side)."""
    pytest.importorskip("torch", reason="the export side (torch) is not installed")
    from ram_edge.export.bundle import export_bundle
    from ram_edge.models.checkpoint import load_checkpoint

    exported = {}

    def export(name: str) -> tuple:
        if name not in exported:
            golden = np.load(reference / "golden" / f"{name}.npz")
            size = json.loads((reference / "golden" / f"{name}.json").read_text(encoding="utf-8"))["image_size"]
            model = load_checkpoint(reference / "golden" / f"{name}.pth", image_size=size,
                                    tags=[f"t{i}" for i in range(golden["logits"].shape[1])])
            bundle = tmp_path_factory.mktemp("golden") / name
            export_bundle(model, bundle, source=name)
            exported[name] = (bundle, golden)
        return exported[name]

    return export


@pytest.fixture(scope="session")
def tag2text_bundle(reference, tmp_path_factory) -> tuple:
    """(bundle folder, golden arrays, golden json) for ``golden/tag2text_tiny_384.pth`` exported with
    ``ram_edge.export.export_bundle`` (fp32, its 3,429 tags, tagging and captioning graphs; the BERT
    heads from the json, as they are not in the weights), once per test session. Skips without torch."""
    pytest.importorskip("torch", reason="the export side (torch) is not installed")
    from ram_edge.export.bundle import export_bundle
    from ram_edge.models.checkpoint import load_checkpoint

    golden = reference / "golden"
    meta = json.loads((golden / "tag2text_tiny_384.json").read_text(encoding="utf-8"))
    model = load_checkpoint(golden / "tag2text_tiny_384.pth", caption_heads=meta["med"]["num_attention_heads"])
    bundle = tmp_path_factory.mktemp("tag2text") / "tag2text_tiny_384"
    export_bundle(model, bundle, source="tag2text_tiny_384.pth")
    return bundle, np.load(golden / "tag2text_tiny_384.npz"), meta


@pytest.fixture(scope="session")
def openset_demo_bundle(tmp_path_factory) -> Path:
    """``ram-export --demo ram_plus_tiny_384 --num-tags 200``: random weights with a demo text encoder, for
    the open-set service, page and Ray tests; exported once per test session (about 20 s). Skips without
    torch (the export side)."""
    pytest.importorskip("torch", reason="exporting the demo bundle needs torch")
    from ram_edge.export.cli import main as export_main

    out = tmp_path_factory.mktemp("openset_demo") / "bundle"
    assert export_main(["--demo", "ram_plus_tiny_384", "--num-tags", "200", "--out", str(out), "-q"]) == 0
    return out
