"""End to end: golden checkpoint -> ram_edge.export -> bundle -> Tagger, against the goldens' numbers.
Needs torch (the export side) and the reference material; skipped without either."""

import numpy as np
import pytest

from conftest import shared_dir


@pytest.mark.parametrize("golden, size", [("ram_tiny_224", 224), ("ram_plus_tiny_384", 384)])
def test_exported_bundle_reproduces_golden_logits(tmp_path, golden, size):
    pytest.importorskip("torch", reason="the export side (torch) is not installed")
    shared = shared_dir()
    if shared is None:
        pytest.skip("reference material absent: no ../shared beside the repository and RAM_EDGE_SHARED unset")
    from ram_edge.export.bundle import export_bundle
    from ram_edge.models.checkpoint import load_checkpoint
    from ram_edge.runtime import Tagger

    reference = np.load(shared / "reference" / "golden" / f"{golden}.npz")
    num_tags = reference["logits"].shape[1]
    model = load_checkpoint(shared / "reference" / "golden" / f"{golden}.pth", image_size=size,
                            tags=[f"t{i}" for i in range(num_tags)])
    export_bundle(model, tmp_path / "bundle", source=golden)
    with Tagger(tmp_path / "bundle", exif_transpose=False) as tagger:
        images = [shared / "reference" / "images" / n for n in ("demo4.jpg", "tagging_results.jpg")]
        pixels = np.stack([tagger.preprocess(p) for p in images])
        np.testing.assert_array_equal(pixels, reference["pixel_values"])
        np.testing.assert_allclose(tagger.encode(pixels), reference["image_embeds"], atol=1e-4)
        np.testing.assert_allclose(tagger.logits(pixels), reference["logits"], atol=1e-4)
