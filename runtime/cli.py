"""``ram-tag``: tag image files with a ram-edge bundle (torch-free)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, TextIO

from .pipeline import FileResult, find_images, tag_files

FORMATS = ("text", "json", "jsonl", "csv", "prompt")
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CSV_FIELDS = ("path", "tags", "probabilities", "error")
CSV_SEPARATOR = "|"

DESCRIPTION = """\
Tag images with a ram-edge bundle (written by `ram-export`), without torch.

examples:
  ram-tag bundle/ photo.jpg
  ram-tag bundle/ photos/ --format jsonl --out tags.jsonl        # a folder, recursively
  ram-tag bundle/ 'shots/**/*.png' --top-k 10 --threshold 0.5     # a glob (quote it)
  ram-tag bundle/ photos/ --format jsonl --out tags.jsonl --resume  # continue an interrupted run
  ram-tag bundle/ photos/ --tags "otter,kayak,paddle board"        # open-set tags, built on the fly
  ram-tag bundle/ photos/ --classify "cat,dog,bird"                 # zero-shot: one label per image
  ram-tag bundle/ photos/ --format prompt                           # Grounding DINO prompts
  ram-tag tag2text_bundle/ photos/ --caption --format jsonl         # tags and a caption per image
"""

EPILOG = """\
output formats (one record per input, in input order, written as each batch finishes):
  text   PATH<TAB>tag (0.931), tag (0.812)     or  PATH<TAB>error: REASON
  jsonl  {"path": ..., "tags": [...], "probabilities": [...]}  or  {"path": ..., "error": ...}
         one object per line: the format for large or long runs (every finished line is valid).
  json   the same objects in one JSON array. Records are streamed too and the closing bracket is
         written at the end, also on Ctrl-C; after a hard crash the file lacks it, and --resume repairs it.
  csv    columns path,tags,probabilities,error; tags and probabilities joined by '|'.
  prompt PATH<TAB>dog . frisbee . grass .   (a Grounding DINO / Grounded-SAM text prompt)

With --classify the records hold "classes" (most probable first, probabilities summing to 1) instead
of "tags"; --top-k keeps that many classes (default: all).

A tag is listed when its probability is above the threshold (default: the vocabulary's per-tag
thresholds, else the bundle's default), most probable first, at most --top-k.

With --caption every record also holds "caption" (json / jsonl), a caption column (csv), or the
caption after one more TAB (text, prompt). Captions are made from the tags the vocabulary's own
thresholds select (not --threshold / --top-k), or from --caption-tags, as upstream's Tag2Text does;
the bundle needs the captioning graphs (Tag2Text; RAM exported with --captioning).

--resume reads --out, skips every path it already holds (failed ones too: delete their lines to retry)
and appends the rest. Inputs that fail (unreadable, not an image, truncated, too large) are reported
on stderr and as records with "error"; the run goes on.

exit status: 0 all inputs tagged; 1 some inputs failed; 2 usage or bundle error; 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    from .backends import AUTO, registered_backends
    from .preprocess import DEFAULT_MAX_PIXELS

    p = argparse.ArgumentParser(
        prog="ram-tag", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by ram-export")
    p.add_argument("inputs", metavar="INPUTS", nargs="+",
                   help="image files, folders (searched recursively for image extensions) or glob patterns")
    g = p.add_argument_group("tags")
    vocab = g.add_mutually_exclusive_group()
    vocab.add_argument("--vocab", metavar="DIR", help="a vocabulary folder to use instead of the bundle's own")
    vocab.add_argument("--tags", metavar="FILE|LIST",
                       help='open-set tags built on the fly with the bundle\'s text encoder: a file (one name a '
                            'line) or "a,b,c" (threshold 0.5 unless --threshold/--thresholds)')
    vocab.add_argument("--descriptions", metavar="FILE.json",
                       help='open-set tags from LLM descriptions: [{"tag": ["description", ...]}, ...]')
    vocab.add_argument("--classify", metavar="FILE|LIST",
                       help='zero-shot classification over these classes (a file or "cat,dog") instead of tagging')
    g.add_argument("--thresholds", metavar="FILE", help="with --tags/--descriptions: per-tag thresholds, CSV or JSON")
    g.add_argument("--threshold", type=float, metavar="X",
                   help="one probability threshold in [0, 1] for every tag (default: per-tag thresholds)")
    g.add_argument("--top-k", type=int, metavar="K", help="at most K tags per image")
    g.add_argument("--lang", choices=("en", "zh"), default="en", help="tag names in English or Chinese")
    g = p.add_argument_group("captions (Tag2Text; RAM exported with --captioning)")
    g.add_argument("--caption", action="store_true", help="add a caption to every record")
    g.add_argument("--caption-tags", metavar="TAGS",
                   help='caption every image from these tags instead of its predicted ones, e.g. "dog, frisbee" '
                        "(implies --caption; empty: the predicted ones)")
    g.add_argument("--num-beams", type=int, metavar="N",
                   help="caption search: beams (default the bundle's, upstream's 3; 1 = greedy)")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    g.add_argument("--out", metavar="FILE", help="write results to FILE (default: standard output)")
    g.add_argument("--resume", action="store_true", help="skip inputs already recorded in --out and append")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary on stderr")
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per inference call (16)")
    g.add_argument("--workers", type=int, metavar="N", help="image decoding threads (default: min(8, CPUs))")
    g.add_argument("--backend", choices=(AUTO,) + registered_backends(), default="onnxruntime",
                   help="inference backend (default: onnxruntime; tensorrt needs the [trt] extra and an NVIDIA GPU, "
                        "openvino the [openvino] extra; auto: TensorRT, onnxruntime CUDA, OpenVINO on x86, "
                        "onnxruntime CPU, the first this machine has)")
    g.add_argument("--providers", nargs="+", metavar="NAME",
                   help="onnxruntime execution providers in order of preference, e.g. CUDAExecutionProvider "
                        "CPUExecutionProvider (default: CUDA when available, then CPU)")
    g.add_argument("--intra-op-threads", type=int, metavar="N", help="onnxruntime threads per operator")
    g.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    g = p.add_argument_group("preprocessing")
    g.add_argument("--resize", choices=("pillow", "opencv"), default="pillow",
                   help="pillow: exactly upstream (default); opencv: faster on large images, slightly different")
    g.add_argument("--no-exif-transpose", action="store_true",
                   help="ignore EXIF orientation (upstream's exact behaviour)")
    g.add_argument("--alpha", choices=("drop", "white"), default="drop",
                   help="transparent images: drop alpha like upstream (default) or composite on white")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images, a decompression-bomb guard (default {DEFAULT_MAX_PIXELS:,}; 0: none)")
    return p


# ----------------------------------------------------------------------------------------------------
# Records and writers


def to_record(item: FileResult) -> Dict[str, object]:
    if item.error is not None:
        return {"path": item.path, "error": item.error}
    if item.classes is not None:
        record = {"path": item.path, "classes": list(item.classes.labels),
                  "probabilities": [round(p, 4) for p in item.classes.probabilities]}
    else:
        record = {"path": item.path, "tags": list(item.result.tags),
                  "probabilities": [round(p, 4) for p in item.result.probabilities]}
    if item.caption is not None:
        record["caption"] = item.caption.text
    return record


def _labels(item: FileResult):
    """(names, probabilities) of a tagged or classified item."""
    found = item.classes if item.classes is not None else item.result
    names = found.labels if item.classes is not None else found.tags
    return names, found.probabilities


class Writer:
    """Writes records in one format; ``write`` flushes so that finished batches survive a crash."""

    def __init__(self, stream: TextIO, fmt: str, fresh: bool, json_prefix: Sequence[Dict[str, object]] = (),
                 caption: bool = False):
        self.stream, self.fmt = stream, fmt
        self._count = 0
        if fmt == "csv":
            fields = CSV_FIELDS + (("caption",) if caption else ())
            self._csv = csv.DictWriter(stream, fieldnames=fields, lineterminator="\n")
            if fresh:
                self._csv.writeheader()
        if fmt == "json":
            stream.write("[")
            for record in json_prefix:
                self._write_json(record)
        stream.flush()

    def _write_json(self, record) -> None:
        self.stream.write(("\n" if self._count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self._count += 1

    def write(self, items: Sequence[FileResult]) -> None:
        for item in items:
            record = to_record(item)
            if self.fmt == "jsonl":
                self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            elif self.fmt == "json":
                self._write_json(record)
            elif self.fmt == "csv":
                row = {
                    "path": item.path,
                    "tags": CSV_SEPARATOR.join(record.get("tags", record.get("classes", []))),
                    "probabilities": CSV_SEPARATOR.join(f"{p:.4f}" for p in record.get("probabilities", [])),
                    "error": item.error or "",
                }
                if "caption" in self._csv.fieldnames:
                    row["caption"] = record.get("caption", "")
                self._csv.writerow(row)
            else:
                if item.error is not None:
                    body = f"error: {item.error}"
                elif self.fmt == "prompt":
                    body = item.result.as_prompt()
                else:
                    body = ", ".join(f"{t} ({p:.3f})" for t, p in zip(*_labels(item)))
                if item.caption is not None:
                    body += f"\t{item.caption.text}"
                self.stream.write(f"{item.path}\t{body}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n")
        self.stream.flush()


def read_done(path: Path, fmt: str):
    """Paths already recorded in an output file, and (json only) its records to write back.

    Tolerates what a crash leaves: a last line cut short (dropped) or a JSON array never closed.
    """
    text = path.read_text(encoding="utf-8")
    records: List[Dict[str, object]] = []
    done: Set[str] = set()
    complete = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
    if fmt == "csv":
        for row in csv.DictReader(io.StringIO(complete)):
            if row.get("path"):
                done.add(row["path"])
    elif fmt in ("text", "prompt"):
        for line in complete.splitlines():
            if "\t" in line:
                done.add(line.split("\t", 1)[0])
    else:  # json and jsonl: one object per line (the json writer puts each record on its own line)
        for line in text.splitlines():
            line = line.strip().rstrip(",")
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a record cut short by a crash: it will be redone
                if isinstance(record, dict) and "path" in record:
                    records.append(record)
                    done.add(str(record["path"]))
    return done, records, complete


# ----------------------------------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"ram-tag: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return instead of exiting, for callers
        return int(e.code or 0)

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return _error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top_k is not None and args.top_k < 1:
        return _error(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        return _error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        return _error(f"--workers must be >= 1, got {args.workers}")
    if args.resume and not args.out:
        return _error("--resume needs --out FILE (the file to continue)")
    if args.thresholds and not (args.tags or args.descriptions):
        return _error("--thresholds applies to --tags or --descriptions")
    if args.classify and args.format == "prompt":
        return _error("--format prompt lists tags; it cannot be used with --classify")
    if args.caption_tags is not None:
        args.caption = True
    if args.num_beams is not None and not args.caption:
        return _error("--num-beams applies to captions: add --caption")
    if args.num_beams is not None and args.num_beams < 1:
        return _error(f"--num-beams must be >= 1, got {args.num_beams}")
    tag_names = classes = None
    try:
        from .vocab_cli import split_tags

        if args.tags:
            tag_names = split_tags(args.tags)
        if args.classify:
            classes = split_tags(args.classify, "--classify")
            if len(classes) < 2:
                return _error(f"--classify needs at least two classes, got {classes}")
    except ValueError as e:
        return _error(str(e))

    from PIL import Image
    from tqdm import tqdm

    from ram_edge.bundle_format import BundleError
    from ram_edge.vocabulary import Vocabulary

    from .tagger import Tagger

    # max_pixels is the explicit guard; Pillow's warning below its own hard limit would only repeat it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    paths, failures = find_images(args.inputs)

    # Resume: what the output already holds.
    out_path = Path(args.out) if args.out else None
    done: Set[str] = set()
    json_prefix: List[Dict[str, object]] = []
    fresh = True
    if args.resume and out_path.exists() and out_path.stat().st_size > 0:
        try:
            done, json_prefix, complete = read_done(out_path, args.format)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            return _error(f"--resume: cannot read {out_path}: {e}")
        fresh = False
        if args.format != "json" and len(complete) != out_path.stat().st_size:
            with open(out_path, "r+b") as f:  # drop a last line cut short by a crash
                f.truncate(len(complete.encode("utf-8")))
        before = len(paths)
        paths = [p for p in paths if p not in done]
        failures = [f for f in failures if f.path not in done]
        if not args.quiet:
            print(f"ram-tag: resuming: {before - len(paths)} of {before} inputs already in {out_path}",
                  file=sys.stderr)

    try:
        vocabulary = Vocabulary.load(args.vocab) if args.vocab else None
        tagger = Tagger(
            args.bundle, backend=args.backend, providers=args.providers, vocabulary=vocabulary,
            verify_files=not args.no_verify, intra_op_threads=args.intra_op_threads, resize=args.resize,
            exif_transpose=not args.no_exif_transpose, alpha=args.alpha, max_pixels=args.max_pixels or None,
        )
    except (BundleError, ValueError, ImportError, NotImplementedError) as e:
        return _error(str(e))
    if args.backend == "auto" and not args.quiet:
        print(f"ram-tag: --backend auto: {tagger.backend_name} ({tagger.backend_reason})", file=sys.stderr)
    try:
        if tag_names is not None or args.descriptions:
            thresholds = args.thresholds or args.threshold
            if not args.quiet:
                print("ram-tag: building the vocabulary with the bundle's text encoder", file=sys.stderr)
            build = Vocabulary.from_names if tag_names is not None else Vocabulary.from_descriptions
            tagger.set_vocabulary(build(tag_names if tag_names is not None else args.descriptions,
                                        tagger.text_encoder, thresholds=thresholds, progress=not args.quiet))
        if classes is not None:
            tagger.class_embeddings(classes)
        caption = None
        if args.caption:  # load the captioning graphs now: a bundle without them fails before any image
            from .caption import CaptionRequest

            caption = CaptionRequest(args.caption_tags, tagger.captioner.settings(num_beams=args.num_beams))
    except (BundleError, ValueError) as e:
        tagger.close()
        return _error(str(e))
    try:
        tagger.vocabulary.display_names(args.lang)
    except ValueError as e:
        tagger.close()
        return _error(str(e))

    if out_path is not None:
        if out_path.parent and not out_path.parent.exists():
            tagger.close()
            return _error(f"--out: folder {out_path.parent} does not exist")
        mode = "a" if (args.resume and args.format != "json") else "w"
        stream = open(out_path, mode, encoding="utf-8", newline="" if args.format == "csv" else None)
    else:
        stream = sys.stdout
    writer = Writer(stream, args.format, fresh=fresh, json_prefix=json_prefix, caption=caption is not None)

    num_failed = num_done = 0

    def report(items: Sequence[FileResult], bar) -> None:
        nonlocal num_failed, num_done
        writer.write(items)
        for item in items:
            num_done += 1
            if item.error is not None:
                num_failed += 1
                tqdm.write(f"ram-tag: {item.path}: {item.error}", file=sys.stderr)
        bar.update(len(items))

    start = time.perf_counter()
    interrupted = False
    bar = tqdm(total=len(paths) + len(failures), unit="img", file=sys.stderr, disable=args.quiet,
               dynamic_ncols=True)
    batches = tag_files(tagger, paths, batch_size=args.batch_size, threshold=args.threshold, top_k=args.top_k,
                        lang=args.lang, workers=args.workers, classify=classes, caption=caption)
    try:
        if failures:
            report(failures, bar)
        for items in batches:
            report(items, bar)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        batches.close()  # cancels queued decoding
        bar.close()
        writer.close()
        if stream is not sys.stdout:
            stream.close()
        tagger.close()

    elapsed = time.perf_counter() - start
    if not args.quiet:
        rate = num_done / elapsed if elapsed > 0 else 0.0
        print(f"ram-tag: {num_done - num_failed} tagged, {num_failed} failed in {elapsed:.2f} s "
              f"({rate:.1f} images/s)", file=sys.stderr)
    if interrupted:
        hint = " --resume" if args.out else ""
        print(f"ram-tag: interrupted; finished records are written. Run again with{hint or ' --out FILE --resume'} "
              "to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if num_failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
