"""``ram-vocab``: build open-set vocabularies from words with a bundle's text encoder (torch-free), and
describe vocabulary folders."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
Build an open-set vocabulary from words with a bundle's CLIP text encoder, without torch.

examples:
  ram-vocab build bundle/ --tags "otter,kayak,paddle board" --out vocab/outdoor
  ram-vocab build bundle/ --tags tags.txt --thresholds thresholds.csv --out vocab/mine
  ram-vocab build bundle/ --descriptions llm_tag_descriptions.json --merge-default --out vocab/all
  ram-vocab info vocab/outdoor
  ram-tag bundle/ photos/ --vocab vocab/outdoor
"""

EPILOG = """\
recipes (upstream's, see docs/openset.md):
  --tags          each name fills upstream's 63 prompt templates; RAM averages the sentence embeddings
                  into one per tag, RAM++ keeps them as the tag's descriptions and reweights them per image
  --descriptions  RAM++'s LLM descriptions: [{"tag": ["description", ...]}, ...], any number per tag

thresholds: open-set tags default to 0.5 (upstream's open-set scripts; a tag is on when its probability
is strictly greater). --thresholds FILE sets them per tag (CSV with columns name,threshold[,name_zh], or
JSON {"tag": 0.6} / {"tag": {"threshold": 0.6, "name_zh": "..."}}) and may give Chinese names.

exit status: 0 written; 2 bad arguments, bundle or input file (nothing written); 130 interrupted
"""


def split_tags(value: str, flag: str = "--tags") -> List[str]:
    """``--tags`` (or ``flag``): an existing file (one name a line) or a comma-separated list."""
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag} {value}: cannot read the file ({e})") from e
        names = [line.strip() for line in lines if line.strip()]
        if not names:
            raise ValueError(f"{flag} {value}: the file lists no names")
        return names
    if os.sep in value and not ("," in value):
        raise ValueError(f"{flag} {value}: no such file (pass a file of names, one a line, or \"a,b,c\")")
    names = [part.strip() for part in value.split(",")]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{flag} {value!r}: empty name at position {empty[0]} (two commas in a row, or a "
                         "trailing comma?)")
    return names


def build_parser() -> argparse.ArgumentParser:
    from ram_edge import __version__

    parser = argparse.ArgumentParser(prog="ram-vocab", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ram-vocab (ram-edge) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser("build", help="build a vocabulary with the bundle's text encoder",
                           description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("bundle", metavar="BUNDLE", help="bundle folder with a text encoder (ram-export --text-encoder)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--tags", metavar="FILE|LIST", help='tag names: a file (one a line) or "a,b,c"')
    source.add_argument("--descriptions", metavar="FILE.json", help='LLM descriptions: [{"tag": ["description", ...]}, ...]')
    build.add_argument("--thresholds", metavar="FILE", help="per-tag thresholds (and Chinese names): CSV or JSON")
    build.add_argument("--threshold", type=float, metavar="X", help="one threshold for every new tag (default 0.5)")
    build.add_argument("--merge-default", action="store_true",
                       help="append the new tags to the bundle's own vocabulary (e.g. the official 4,585)")
    build.add_argument("--out", required=True, metavar="DIR", help="vocabulary folder to write")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    build.add_argument("--dtype", choices=["auto", "float32", "float16"], default="auto",
                       help="stored embeddings: auto = float32 up to 64 MiB, else float16")
    build.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per text-encoder call (64)")
    build.add_argument("--intra-op-threads", type=int, metavar="N", help="onnxruntime threads per operator")
    build.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress bar, errors only")
    build.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    info = sub.add_parser("info", help="describe a vocabulary folder")
    info.add_argument("vocab", metavar="DIR", help="a vocabulary folder (ram-vocab build --out, or BUNDLE/vocabulary)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _error(message: str) -> int:
    print(f"ram-vocab: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _summary(vocab) -> dict:
    counts = vocab.num_descriptions
    thresholds = vocab.thresholds
    return {
        "num_tags": vocab.num_tags,
        "embed_dim": vocab.embed_dim,
        "descriptions_per_tag": {"min": int(counts.min()), "max": int(counts.max()), "total": int(counts.sum())},
        "thresholds": None if thresholds is None else
        {"min": float(thresholds.min()), "max": float(thresholds.max()), "mean": round(float(thresholds.mean()), 4)},
        "chinese_names": vocab.names_zh is not None,
        "first_tags": vocab.names[:10],
        "info": vocab.info,
    }


def cmd_info(args) -> int:
    from ram_edge.vocabulary import Vocabulary

    try:
        vocab = Vocabulary.load(args.vocab)
    except ValueError as e:
        return _error(str(e))
    summary = _summary(vocab)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        return EXIT_OK
    d = summary["descriptions_per_tag"]
    t = summary["thresholds"]
    print(f"{args.vocab}: {summary['num_tags']} tags, embeddings {summary['embed_dim']} wide, "
          f"{d['min']}-{d['max']} descriptions per tag ({d['total']} rows)")
    print("thresholds: " + ("none (the bundle's default applies)" if t is None else
                            f"{t['min']:.3g} to {t['max']:.3g}, mean {t['mean']:.3g}"))
    print(f"Chinese names: {'yes' if summary['chinese_names'] else 'no'}")
    print(f"first tags: {', '.join(summary['first_tags'])}")
    if summary["info"]:
        print(f"built: {json.dumps(summary['info'], ensure_ascii=False)[:300]}")
    return EXIT_OK


def cmd_build(args) -> int:
    from ram_edge.bundle_format import BundleError, read_manifest
    from ram_edge.vocabulary import TAG2TEXT_OPEN_SET_MESSAGE, Vocabulary

    from .bundle import open_bundle
    from .text_encoder import TextEncoder

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return _error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.threshold is not None and args.thresholds:
        return _error("--threshold and --thresholds: give one")
    if args.batch_size < 1:
        return _error(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        return _error(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    try:
        names = split_tags(args.tags) if args.tags else None
    except ValueError as e:
        return _error(str(e))

    started = time.perf_counter()
    try:
        # Before hashing files or loading graphs: a Tag2Text bundle cannot take a vocabulary built from words.
        if read_manifest(args.bundle).get("model", {}).get("kind") == "tag2text":
            return _error(f"{args.bundle}: {TAG2TEXT_OPEN_SET_MESSAGE}")
        bundle = open_bundle(args.bundle, verify_files=not args.no_verify)
        if not args.quiet:
            print(f"ram-vocab: loading the text encoder of {args.bundle}", file=sys.stderr)
        with TextEncoder(bundle, intra_op_threads=args.intra_op_threads, batch_size=args.batch_size) as text:
            loaded = time.perf_counter()
            thresholds = args.thresholds if args.thresholds else args.threshold
            progress = not args.quiet
            if names is not None:
                vocab = Vocabulary.from_names(names, text, thresholds=thresholds, progress=progress)
            else:
                vocab = Vocabulary.from_descriptions(args.descriptions, text, thresholds=thresholds, progress=progress)
        built = time.perf_counter()
        if args.merge_default:
            vocab = Vocabulary.concat(Vocabulary.load(bundle.vocabulary_dir), vocab)
        _save_atomically(vocab, out, args.dtype)
    except KeyboardInterrupt:
        print("ram-vocab: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BundleError, ValueError, OSError) as e:
        return _error(str(e))
    if not args.quiet:
        print(f"ram-vocab: {vocab.num_tags} tags ({int(vocab.num_descriptions.sum())} embeddings) written to {out}; "
              f"text encoder loaded in {loaded - started:.1f} s, embeddings in {built - loaded:.1f} s", file=sys.stderr)
    print(out)
    return EXIT_OK


def _save_atomically(vocab, out: Path, dtype: str) -> None:
    """An interrupted or failed build leaves ``out`` as it was (see ``bundle_format.staged_directory``)."""
    from ram_edge.bundle_format import staged_directory

    with staged_directory(out) as staging:
        vocab.save(staging, dtype=dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.ERROR
    logging.basicConfig(level=level, format="ram-vocab: %(message)s", stream=sys.stderr)
    return cmd_info(args) if args.command == "info" else cmd_build(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
