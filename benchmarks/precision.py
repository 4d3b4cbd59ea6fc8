"""Measure fp32 / fp16 bundle error against the reference: the table of docs/precision.md.

    python benchmarks/precision.py                         # goldens (needs ../shared/reference)
    python benchmarks/precision.py --demo ram_swin_b_384   # plus demo presets (export-time check)

Each row exports a bundle into a temporary folder and reports max |error| of image_embeds, logits and
probabilities: against the golden .npz (goldens) or torch fp32 on the same inputs (demo presets).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def golden_rows(reference: Path, precisions):
    import onnxruntime as ort

    from ram_edge.export import export_bundle
    from ram_edge.models import load_checkpoint

    for meta_path in sorted((reference / "golden").glob("*.json")):
        name = meta_path.stem
        golden = np.load(meta_path.with_suffix(".npz"))
        num_tags = json.loads(meta_path.read_text())["num_tags"]
        model = load_checkpoint(meta_path.with_suffix(".pth"), tags=[f"t{i}" for i in range(num_tags)])
        label_embed = golden["label_embed"].reshape(num_tags, -1, golden["label_embed"].shape[-1]).astype(np.float32)
        for precision in precisions:
            with tempfile.TemporaryDirectory() as tmp:
                export_bundle(model, Path(tmp) / "b", precision=precision)
                encoder = ort.InferenceSession(f"{tmp}/b/encoder.onnx", providers=["CPUExecutionProvider"])
                decoder = ort.InferenceSession(f"{tmp}/b/decoder.onnx", providers=["CPUExecutionProvider"])
                embeds = encoder.run(None, {"pixel_values": golden["pixel_values"]})[0]
                feeds = {"image_embeds": embeds, "label_embed": label_embed, "label_mask": np.ones(label_embed.shape[:2], bool)}
                logits = decoder.run(None, feeds)[0]
            yield (f"golden {name}", precision, np.abs(embeds - golden["image_embeds"]).max(),
                   np.abs(logits - golden["logits"]).max(), np.abs(sigmoid(logits) - sigmoid(golden["logits"])).max())


def demo_rows(variants, precisions):
    from ram_edge.export import export_bundle
    from ram_edge.models import demo_model

    for variant in variants:
        model = demo_model(variant)
        for precision in precisions:
            with tempfile.TemporaryDirectory() as tmp:
                check = export_bundle(model, Path(tmp) / "b", precision=precision).verification
            yield (f"demo {variant}", precision, check.image_embeds_max_abs_error, check.logits_max_abs_error,
                   check.probability_max_abs_error)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", nargs="*", default=[], metavar="VARIANT", help="demo presets to measure too")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="shared/reference folder (goldens)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    if (args.reference / "golden").is_dir():
        rows.append(golden_rows(args.reference, args.precision))
    else:
        print(f"no goldens at {args.reference}; measuring demo presets only", file=sys.stderr)
    rows.append(demo_rows(args.demo, args.precision))
    print("| model | precision | image_embeds | logits | probabilities |\n| --- | --- | --- | --- | --- |")
    for source in rows:
        for name, precision, embeds, logits, probs in source:
            print(f"| {name} | {precision} | {embeds:.2e} | {logits:.2e} | {probs:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
