"""CLIP's text tower: loading the three checkpoint layouts, text_encoder.onnx in bundles (export, adding
to an existing bundle, verification, refusals) and the torch-free TextEncoder against the goldens."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ram_edge import bundle_format as bf
from ram_edge.export import ExportError, add_text_encoder, export_bundle
from ram_edge.export.cli import main as export_main
from ram_edge.models import demo_model
from ram_edge.models.checkpoint import read_state_dict
from ram_edge.models.clip_text import (
    ClipCheckpointError, ClipTextConfig, ClipTextModel, demo_clip_text, infer_text_config, load_clip_text,
)
from ram_edge.runtime import BundleError, Tagger, TextEncoder

LAYOUTS = {"openai-pth": "clip_text_tiny.pth", "openai-jit": "clip_text_tiny.jit.pt", "hf": "clip_text_tiny.safetensors"}
TINY_HEADS = 2  # the golden's: OpenAI's width // 64 rule would say 1 (see clip_text_tiny.json)


@pytest.fixture(scope="module")
def clip_golden(reference):
    z = np.load(reference / "golden" / "clip_text_tiny.npz")
    meta = json.loads((reference / "golden" / "clip_text_tiny.json").read_text(encoding="utf-8"))
    return {**{k: z[k] for k in z.files}, "texts": meta["texts"], "meta": meta}


@pytest.fixture(scope="module")
def text_bundle(reference, tmp_path_factory):
    """A tiny demo image model (RAM++, 12 tags) with the golden tiny CLIP tower (OpenAI layout)."""
    out = tmp_path_factory.mktemp("text") / "bundle"
    text = load_clip_text(reference / "golden" / LAYOUTS["openai-pth"], heads=TINY_HEADS)
    export_bundle(demo_model("ram_plus_tiny_384", num_tags=12), out, source="demo", text_encoder=text)
    return out


# -- the torch model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_loads_and_matches_golden_in_torch(reference, clip_golden, layout):
    model = load_clip_text(reference / "golden" / LAYOUTS[layout], heads=TINY_HEADS)
    assert model.config == ClipTextConfig(width=64, layers=2, heads=2, mlp_width=256, variant="clip_tiny")
    with torch.no_grad():
        embeds = model(torch.from_numpy(clip_golden["ids"]).long()).numpy()
    assert np.abs(embeds - clip_golden["text_embeds"]).max() <= 1e-5


def test_torchscript_read_runs_no_code_and_equals_jit_state_dict(reference, tmp_path):
    path = reference / "golden" / LAYOUTS["openai-jit"]
    ours = read_state_dict(path)
    theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # A TorchScript-looking archive whose data.pkl names an arbitrary global is refused, not executed.
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pt"
    payload = pickle.dumps(_Evil(str(marker)), protocol=2)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/code/__torch__/m.py", "")
    with pytest.raises(ClipCheckpointError, match="refused"):
        load_clip_text(bad)
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_heads_rule_and_override(reference):
    sd = read_state_dict(reference / "golden" / LAYOUTS["openai-pth"])
    assert infer_text_config(sd).heads == 1  # width 64 // 64: OpenAI's rule
    assert infer_text_config(sd, heads=4).heads == 4
    with pytest.raises(ClipCheckpointError, match="not divisible by 3 heads"):
        infer_text_config(sd, heads=3)


def test_open_clip_layouts_load(reference, clip_golden, tmp_path):
    sd = torch.load(reference / "golden" / LAYOUTS["openai-pth"], map_location="cpu", weights_only=True)
    # open_clip's training checkpoint: {"epoch", "state_dict": {"module." + key}}, and CustomTextCLIP's "text." prefix.
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "epoch_32.pt")
    save_file({("text." + k if k != "logit_scale" else k): v.contiguous() for k, v in sd.items()},
              str(tmp_path / "open_clip_model.safetensors"))
    for name in ("epoch_32.pt", "open_clip_model.safetensors"):
        model = load_clip_text(tmp_path / name, heads=TINY_HEADS)
        with torch.no_grad():
            embeds = model(torch.from_numpy(clip_golden["ids"][:4]).long()).numpy()
        assert np.abs(embeds - clip_golden["text_embeds"][:4]).max() <= 1e-5


def test_hf_config_beside_the_weights_gives_heads(reference, clip_golden, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((reference / "golden" / LAYOUTS["hf"]).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(clip_golden["meta"]["hf_config"]))
    assert load_clip_text(tmp_path / "model.safetensors").config.heads == 2


def test_wrong_or_broken_text_checkpoints_are_refused(reference, tmp_path):
    with pytest.raises(ClipCheckpointError, match="not a CLIP text encoder"):
        load_clip_text(reference / "golden" / "ram_tiny_224.pth")  # an image tagger, not CLIP
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((reference / "golden" / LAYOUTS["hf"]).read_bytes()[:50_000])
    with pytest.raises(ClipCheckpointError, match="truncated or corrupt"):
        load_clip_text(truncated)
    sd = torch.load(reference / "golden" / LAYOUTS["openai-pth"], map_location="cpu", weights_only=True)
    del sd["ln_final.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ClipCheckpointError, match="missing key.*ln_final.weight"):
        load_clip_text(tmp_path / "partial.pt", heads=TINY_HEADS)


def test_cut_batches_are_exact():
    """The causal mask: ids cut after the end token give the same embeddings as 77-token rows (up to
    float32 rounding of different GEMM shapes: 1.5e-6 seen on values ~2)."""
    model = demo_clip_text("clip_tiny", seed=1)
    from ram_edge.export.graphs import sample_token_ids

    ids = sample_token_ids(model, (5, 9, 3))
    full = torch.zeros(3, 77, dtype=torch.int64)
    full[:, :9] = ids
    with torch.no_grad():
        assert (model(ids) - model(full)).abs().max() <= 1e-5


# -- the graph in a bundle ---------------------------------------------------------------------------


def test_bundle_text_encoder_matches_golden_from_every_layout(reference, clip_golden, text_bundle, tmp_path):
    """text_encoder.onnx from each layout (the first through export_bundle, the others added to the bundle
    in place), run by the torch-free TextEncoder: tokens equal the golden ids, embeddings <= 1e-4."""
    import shutil

    text_bundle = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    for layout, name in LAYOUTS.items():
        if layout != "openai-pth":  # text_bundle was exported with it
            add_text_encoder(text_bundle, load_clip_text(reference / "golden" / name, heads=TINY_HEADS), overwrite=True)
        with TextEncoder(text_bundle) as encoder:
            ids = encoder.tokenize(clip_golden["texts"])
            np.testing.assert_array_equal(ids, clip_golden["ids"])
            embeds = encoder.encode(clip_golden["texts"], batch_size=7)
            assert embeds.dtype == np.float32 and embeds.shape == (len(clip_golden["texts"]), 512)
            assert np.abs(embeds - clip_golden["text_embeds"]).max() <= 1e-4, layout
        manifest = json.loads((text_bundle / bf.MANIFEST_FILE).read_text())
        assert manifest["text"]["model"]["layout"] == ("hf" if layout == "hf" else "openai")
        assert manifest["text"]["verification"]["passed"]
        assert manifest["text"]["verification"]["text_embeds_max_abs_error"] <= 1e-4


def test_manifest_and_files_of_the_text_encoder(text_bundle):
    manifest = json.loads((text_bundle / bf.MANIFEST_FILE).read_text())
    entry = manifest["graphs"]["text_encoder"]
    assert entry["inputs"] == [{"name": "input_ids", "shape": ["texts", "tokens"], "dtype": "int64"}]
    assert entry["outputs"] == [{"name": "text_embeds", "shape": ["texts", 512], "dtype": "float32"}]
    tokenizer = manifest["text"]["tokenizer"]
    assert (tokenizer["context_length"], tokenizer["sot_token_id"], tokenizer["eot_token_id"]) == (77, 49406, 49407)
    for rel in ("text_encoder.onnx", tokenizer["file"], "tokenizer/LICENSE"):
        assert manifest["files"][rel] == bf.sha256_file(text_bundle / rel)
    assert "MIT" in (text_bundle / "tokenizer" / "LICENSE").read_text()
    assert manifest["text"]["model"]["heads"] == 2 and manifest["text"]["precision"] == "fp32"


def test_dynamic_texts_and_tokens(text_bundle):
    import onnxruntime as ort

    session = ort.InferenceSession(str(text_bundle / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 2), (5, 77), (3, 20)):
        ids = np.zeros(shape, dtype=np.int64)
        ids[:, 0], ids[:, -1] = 49406, 49407
        assert session.run(None, {"input_ids": ids})[0].shape == (shape[0], 512)


def test_add_text_encoder_to_existing_bundle_leaves_image_graphs_alone(reference, tmp_path, capsys):
    bundle = tmp_path / "b"
    export_bundle(demo_model("ram_tiny_224", num_tags=6), bundle, source="demo")
    before = {p.name: (p.stat().st_mtime_ns, bf.sha256_file(p)) for p in bundle.glob("*.onnx")}
    with pytest.raises(BundleError, match="ram-export --text-encoder"):
        Tagger(bundle).text_encoder  # says how to add one
    code = export_main(["--text-encoder", str(reference / "golden" / LAYOUTS["hf"]), "--text-heads", "2",
                        "--out", str(bundle), "-q"])
    assert code == 0
    after = {p.name: (p.stat().st_mtime_ns, bf.sha256_file(p)) for p in bundle.glob("*.onnx") if p.name != "text_encoder.onnx"}
    assert after == before
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no staging left
    with Tagger(bundle) as tagger:  # sha256 of every file, old and new, checks out
        assert tagger.text_encoder.encode(["a dog"]).shape == (1, 512)
    # a second time: refused without --overwrite, replaced with it
    openai = str(reference / "golden" / LAYOUTS["openai-pth"])
    assert export_main(["--text-encoder", openai, "--text-heads", "2", "--out", str(bundle), "-q"]) == 2
    assert "already has a text encoder" in capsys.readouterr().err
    assert export_main(["--text-encoder", openai, "--text-heads", "2", "--out", str(bundle), "--overwrite", "-q"]) == 0
    Tagger(bundle).close()


def test_text_encoder_of_the_wrong_width_is_refused(tmp_path):
    wide = ClipTextModel(ClipTextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=256))
    with pytest.raises(ExportError, match="256 wide but the image model takes embed_dim=512"):
        export_bundle(demo_model("ram_tiny_224", num_tags=4), tmp_path / "b", text_encoder=wide)
    assert not (tmp_path / "b").exists()
    export_bundle(demo_model("ram_tiny_224", num_tags=4), tmp_path / "ok", source="demo")
    manifest_before = (tmp_path / "ok" / bf.MANIFEST_FILE).read_bytes()
    with pytest.raises(ExportError, match="256 wide"):
        add_text_encoder(tmp_path / "ok", wide)
    assert (tmp_path / "ok" / bf.MANIFEST_FILE).read_bytes() == manifest_before


def test_failed_text_verification_leaves_the_bundle_as_it_was(tmp_path, monkeypatch):
    from ram_edge.export import bundle as bundle_module

    export_bundle(demo_model("ram_tiny_224", num_tags=4), tmp_path / "b", source="demo")
    manifest_before = (tmp_path / "b" / bf.MANIFEST_FILE).read_bytes()
    monkeypatch.setitem(bundle_module.TEXT_TOLERANCE, "fp32", -1.0)  # nothing passes
    with pytest.raises(ExportError, match="text_encoder"):
        add_text_encoder(tmp_path / "b", demo_clip_text("clip_tiny"))
    assert (tmp_path / "b" / bf.MANIFEST_FILE).read_bytes() == manifest_before
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        ["decoder.onnx", "encoder.onnx", "manifest.json", "vocabulary"])


def test_demo_export_includes_a_demo_text_encoder(tmp_path):
    assert export_main(["--demo", "ram_plus_tiny_384", "--num-tags", "5", "--out", str(tmp_path / "d"), "-q"]) == 0
    manifest = json.loads((tmp_path / "d" / bf.MANIFEST_FILE).read_text())
    assert manifest["text"]["model"]["variant"] == "clip_tiny"
    assert export_main(["--demo", "ram_plus_tiny_384", "--num-tags", "5", "--no-text-encoder",
                        "--out", str(tmp_path / "e"), "-q"]) == 0
    assert "text_encoder" not in json.loads((tmp_path / "e" / bf.MANIFEST_FILE).read_text())["graphs"]
