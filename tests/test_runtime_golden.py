"""End to end: golden checkpoint -> ram_edge.export -> bundle -> Tagger, against the goldens' numbers.
Needs torch (the export side) and the reference material; skipped without either."""

import numpy as np
import pytest


@pytest.mark.parametrize("golden", ["ram_tiny_224", "ram_plus_tiny_384"])
def test_exported_bundle_reproduces_golden_logits(reference, golden_bundle, golden):
    from ram_edge.runtime import Tagger

    bundle, golden_out = golden_bundle(golden)
    with Tagger(bundle, exif_transpose=False) as tagger:
        images = [reference / "images" / n for n in ("demo4.jpg", "tagging_results.jpg")]
        pixels = np.stack([tagger.preprocess(p) for p in images])
        np.testing.assert_array_equal(pixels, golden_out["pixel_values"])
        np.testing.assert_allclose(tagger.encode(pixels), golden_out["image_embeds"], atol=1e-4)
        np.testing.assert_allclose(tagger.logits(pixels), golden_out["logits"], atol=1e-4)
