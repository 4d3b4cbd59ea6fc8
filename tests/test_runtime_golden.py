"""End to end: golden checkpoint -> ram_edge.export -> bundle -> Tagger, against the goldens' numbers.
Needs torch (the export side) and the reference material; skipped without either."""

import numpy as np
import pytest



@pytest.mark.parametrize("golden, size", [("ram_tiny_224", 224), ("ram_plus_tiny_384", 384)])
def test_exported_bundle_reproduces_golden_logits(reference, tmp_path, golden, size):
    pytest.importorskip("torch", reason="the export side (torch) is not installed")
    from ram_edge.export.bundle import export_bundle
    from ram_edge.models.checkpoint import load_checkpoint
    from ram_edge.runtime import Tagger

    golden_out = np.load(reference / "golden" / f"{golden}.npz")
    num_tags = golden_out["logits"].shape[1]
    model = load_checkpoint(reference / "golden" / f"{golden}.pth", image_size=size,
                            tags=[f"t{i}" for i in range(num_tags)])
    export_bundle(model, tmp_path / "bundle", source=golden)
    with Tagger(tmp_path / "bundle", exif_transpose=False) as tagger:
        images = [reference / "images" / n for n in ("demo4.jpg", "tagging_results.jpg")]
        pixels = np.stack([tagger.preprocess(p) for p in images])
        np.testing.assert_array_equal(pixels, golden_out["pixel_values"])
        np.testing.assert_allclose(tagger.encode(pixels), golden_out["image_embeds"], atol=1e-4)
        np.testing.assert_allclose(tagger.logits(pixels), golden_out["logits"], atol=1e-4)
