#!/usr/bin/env python
"""How long building open-set vocabularies takes, torch-free, and what cutting batches saves.

    python benchmarks/openset.py                       # demo ViT-B/16-sized text tower, exported once
    python benchmarks/openset.py BUNDLE --limit 50     # a bundle with a real text encoder, 50 of 200 tags

Builds (1) RAM++'s vocabulary from the 200 x 51 LLM descriptions of the open-set file and (2) the
template vocabulary of the 200 names (63 sentences each), each with the runtime's TextEncoder twice:
batches cut to their longest sequence (the default) and at the full 77-token context (upstream's way).
Reports seconds, texts/s and the speed-up, and the largest difference between the two (float32
rounding only). Writes ``openset.json`` to ``--out``.

The description file and the tag names come from ``../shared/reference/opensets`` (or ``--descriptions``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OPENSETS = REPO.parent / "shared" / "reference" / "opensets"


def log(message: str) -> None:
    print(f"[openset] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("bundle", nargs="?", type=Path, help="a bundle with a text encoder (default: export a demo one)")
    p.add_argument("--descriptions", type=Path, default=OPENSETS / "openimages_rare_200_llm_tag_descriptions.json")
    p.add_argument("--limit", type=int, default=200, help="use the first N tags of the file (default all 200)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ram-edge" / "bench",
                   help="where the demo bundle is exported once (default ~/.cache/ram-edge/bench)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for openset.json")
    return p.parse_args(argv)


def demo_bundle(cache_dir: Path) -> Path:
    """RAM++ tiny image graphs (irrelevant here) + a ViT-B/16-sized demo text tower, exported once."""
    path = cache_dir / "openset_demo_vitb16"
    if not (path / "manifest.json").is_file():
        from ram_edge.export import export_bundle
        from ram_edge.models import demo_model
        from ram_edge.models.clip_text import demo_clip_text

        log(f"exporting a demo bundle with a ViT-B/16-sized text encoder to {path}")
        export_bundle(demo_model("ram_plus_tiny_384", num_tags=10), path, source="demo", overwrite=True,
                      text_encoder=demo_clip_text("clip_vit_b_16"))
    return path


def timed_build(text, texts, trim: bool, batch_size: int):
    ids = text.tokenize(texts)
    start = time.perf_counter()
    embeds = text.encode_ids(ids, batch_size=batch_size, trim=trim)
    return time.perf_counter() - start, embeds


def main(argv=None) -> int:
    args = parse_args(argv)
    from ram_edge.openset import template_sentences
    from ram_edge.runtime import TextEncoder
    from ram_edge.vocabulary import read_descriptions

    bundle = args.bundle or demo_bundle(args.cache_dir)
    items = read_descriptions(args.descriptions)[: args.limit]
    workloads = {
        "descriptions (RAM++ LLM file)": [t for _, texts in items for t in texts],
        "names x 63 templates (RAM / RAM++ from_names)": [s for name, _ in items for s in template_sentences(name)],
    }
    report = {"bundle": str(bundle), "tags": len(items), "batch_size": args.batch_size, "threads": args.threads,
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "results": {}}
    with TextEncoder(bundle, intra_op_threads=args.threads, batch_size=args.batch_size) as text:
        report["text_encoder"] = (text.bundle.manifest.get("text") or {}).get("model", {})
        for name, texts in workloads.items():
            start = time.perf_counter()
            ids = text.tokenize(texts)
            tokenize_s = time.perf_counter() - start
            lengths = ids.argmax(1) + 1
            cut_s, cut = timed_build(text, texts, True, args.batch_size)
            full_s, full = timed_build(text, texts, False, args.batch_size)
            result = {
                "texts": len(texts), "mean_tokens": float(lengths.mean()), "tokenize_s": tokenize_s,
                "cut_s": cut_s, "full_77_s": full_s, "speedup": full_s / cut_s,
                "texts_per_s_cut": len(texts) / cut_s, "max_abs_diff": float(np.abs(cut - full).max()),
            }
            report["results"][name] = result
            log(f"{name}: {len(texts)} texts, mean {result['mean_tokens']:.1f} tokens; tokenize {tokenize_s:.2f} s; "
                f"cut {cut_s:.1f} s, full 77 {full_s:.1f} s ({result['speedup']:.2f}x), max diff {result['max_abs_diff']:.1e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openset.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out / 'openset.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
