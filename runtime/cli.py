"""``ram-tag``: tag image files with a ram-edge bundle (torch-free)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, TextIO

from ram_edge.cli import EXIT_FAILED as EXIT_SOME_FAILED
from ram_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_common_flags, configure_logging

from .pipeline import FileResult, find_images, tag_files

FORMATS = ("text", "json", "jsonl", "csv", "prompt")
#: --out suffix -> format, when --format is not given.
SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "text",
                  ".tsv": "text"}
CSV_FIELDS = ("path", "tags", "probabilities", "error")
#: The csv columns with --caption.
CSV_CAPTION_FIELDS = CSV_FIELDS + ("caption",)
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
  ram-tag bundle/ photos/ s3://bucket/shots/ --ray local --out tags.parquet  # Ray Data, Parquet shards
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

The format is taken from the --out suffix (.json, .jsonl, .csv, .txt) unless --format is given. An
existing --out is never replaced silently: --resume continues it (in the same format), --overwrite
replaces it. --resume reads --out, skips every path it already holds (failed ones too: delete their
lines to retry) and appends the rest. Inputs that fail (unreadable, not an image, truncated, too large)
are reported on stderr and as records with "error"; the run goes on.

memory: on a CPU one image per call is the default (a batch is not faster there; on a GPU, 16), and the
decoder scores large vocabularies in chunks of tags within --decoder-memory MiB (default 256): the same
scores, bounded memory, for any vocabulary size.

exit status: 0 all inputs tagged; 1 some inputs failed, or the output could not be written; 2 usage,
bundle or output-path error, or no input found; 130 interrupted.
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
    g.add_argument("--format", choices=FORMATS, help="output format (default: from the --out suffix, else text)")
    g.add_argument("--out", metavar="FILE", help="write results to FILE (default: standard output)")
    g.add_argument("--resume", action="store_true", help="skip inputs already recorded in --out and append")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, metavar="N",
                   help="images per inference call (default: 1 on a CPU, 16 on a GPU)")
    g.add_argument("--decoder-memory", type=float, metavar="MIB", default=None,
                   help="bound on the decoder's working memory per call; larger vocabularies are scored in "
                        "chunks of tags (default 256)")
    g.add_argument("--tag-chunk", type=int, metavar="N", help="tags per decoder call (instead of --decoder-memory)")
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
    g.add_argument("--ray", metavar="ADDRESS",
                   help="run on Ray Data: 'local' starts a Ray cluster on this machine, else a cluster address "
                        "(auto, HOST:6379, ray://HOST:10001); --out is then a folder of Parquet shards "
                        "(needs the [ray] extra; see docs/serving.md)")
    g.add_argument("--ray-actors", type=int, metavar="N",
                   help="with --ray: model replicas (default: one per GPU, else sized to the cluster's CPUs)")
    g = p.add_argument_group("preprocessing")
    g.add_argument("--resize", choices=("pillow", "opencv"), default="pillow",
                   help="pillow: exactly upstream (default); opencv: faster on large images, slightly different")
    g.add_argument("--no-exif-transpose", action="store_true",
                   help="ignore EXIF orientation (upstream's exact behaviour)")
    g.add_argument("--alpha", choices=("drop", "white"), default="drop",
                   help="transparent images: drop alpha like upstream (default) or composite on white")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images, a decompression-bomb guard (default {DEFAULT_MAX_PIXELS:,}; 0: none)")
    add_common_flags(p, "ram-tag")
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


class OutputError(OSError):
    """Writing --out failed (disk full, device gone); the records written before are complete."""


def detect_format(path: Path) -> Optional[str]:
    """The format of an existing ram-tag output file, from its first bytes (None: empty or unknown)."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip()
    if not head:
        return None
    if head.startswith("["):
        return "json"
    if head.startswith("{"):
        return "jsonl"
    if head.split("\n", 1)[0].strip() in (",".join(CSV_FIELDS), ",".join(CSV_CAPTION_FIELDS)):
        return "csv"
    first = head.split("\n", 1)[0]
    if "\t" in first:
        body = first.split("\t", 1)[1]
        return "prompt" if body.endswith(" .") or body == "" else "text"
    return None


class Writer:
    """Writes records in one format, a batch at a time: each batch is formatted in memory and then written
    and flushed whole, so finished batches survive a crash. To a file (``path``) it writes bytes through one
    unbuffered descriptor; if a write fails (disk full), the file is cut back to the end of the last batch
    written whole — every record in it stays complete — and :class:`OutputError` is raised."""

    def __init__(self, fmt: str, fresh: bool, json_prefix: Sequence[Dict[str, object]] = (),
                 path: Optional[Path] = None, append: bool = False, stream: Optional[TextIO] = None,
                 caption: bool = False):
        self.fmt = fmt
        self._fields = CSV_CAPTION_FIELDS if caption else CSV_FIELDS
        self._count = 0
        self._text = io.StringIO()
        self._stream = stream
        self._fd: Optional[int] = None
        if path is not None:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
            self._fd = os.open(path, flags, 0o666)
        self._good = os.lseek(self._fd, 0, os.SEEK_END) if self._fd is not None else 0
        self._csv = csv.DictWriter(self._text, fieldnames=self._fields, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None and fresh:
            self._csv.writeheader()
        if fmt == "json":
            self._text.write("[")
            for record in json_prefix:
                self._write_json(record)
        self._emit()

    def _write_json(self, record) -> None:
        self._text.write(("\n" if self._count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self._count += 1

    def _emit(self) -> None:
        text, self._text = self._text.getvalue(), io.StringIO()
        if self._csv is not None:
            self._csv = csv.DictWriter(self._text, fieldnames=self._fields, lineterminator="\n")
        if not text:
            return
        if self._fd is None:
            self._stream.write(text)
            self._stream.flush()
            return
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._good)
            except OSError:
                pass
            raise OutputError(e.errno, e.strerror) from e
        self._good += len(text.encode("utf-8"))

    def write(self, items: Sequence[FileResult]) -> None:
        for item in items:
            record = to_record(item)
            if self.fmt == "jsonl":
                self._text.write(json.dumps(record, ensure_ascii=False) + "\n")
            elif self.fmt == "json":
                self._write_json(record)
            elif self.fmt == "csv":
                row = {
                    "path": item.path,
                    "tags": CSV_SEPARATOR.join(record.get("tags", record.get("classes", []))),
                    "probabilities": CSV_SEPARATOR.join(f"{p:.4f}" for p in record.get("probabilities", [])),
                    "error": item.error or "",
                }
                if self._fields is CSV_CAPTION_FIELDS:
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
                self._text.write(f"{item.path}\t{body}\n")
        self._emit()

    def close(self) -> None:
        """Finish the file (the JSON array's closing bracket) and close it."""
        try:
            if self.fmt == "json":
                self._text.write("\n]\n")
            self._emit()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


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


def _output_format(args) -> str:
    if args.format:
        return args.format
    if args.out:
        return SUFFIX_FORMATS.get(Path(args.out).suffix.lower(), "text")
    return "text"


def check_output(out: Path, fmt: str, resume: bool, overwrite: bool) -> Optional[str]:
    """What is wrong with writing ``fmt`` records to ``out`` (None: nothing), checked before the bundle is
    loaded: a folder or a device instead of a file, a folder that does not exist or cannot be written, an
    existing file that would be replaced silently, or one --resume would continue in another format."""
    if resume and overwrite:
        return "--resume and --overwrite: give one"
    try:
        info = out.stat()
    except FileNotFoundError:
        info = None
    except OSError as e:
        return f"--out {out}: {e.strerror or e}"
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            return f"--out {out} is a folder; give a file name (e.g. {out / ('tags.' + fmt.replace('text', 'txt'))})"
        if not stat.S_ISREG(info.st_mode):
            return f"--out {out} is not a regular file (a device or pipe); omit --out to write to standard output"
        if info.st_size > 0 and not (resume or overwrite):
            return f"--out {out} exists; pass --resume to continue it or --overwrite to replace it"
        if resume and info.st_size > 0:
            found = detect_format(out)
            if found is not None and found != fmt:
                return (f"--resume: {out} holds {found} records but the format is {fmt}; pass --format {found} "
                        "(or another --out)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return f"--out: folder {parent} does not exist"
    # Open it the way the run will, without changing it: catches /proc, read-only folders and the like.
    existed = info is not None
    try:
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e})"
    if not existed:
        out.unlink(missing_ok=True)
    return None


def _bundle_summary(bundle: str) -> str:
    """'encoder.onnx 801 MiB, decoder.onnx 53 MiB, ...' for the loading message (best effort)."""
    sizes = []
    for name in ("encoder.onnx", "decoder.onnx", "text_encoder.onnx", "tag_encoder.onnx", "text_decoder.onnx"):
        path = Path(bundle) / name
        if path.is_file():
            sizes.append(f"{name} {path.stat().st_size / 2**20:.0f} MiB")
    return ", ".join(sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return instead of exiting, for callers
        return int(e.code or 0)
    configure_logging(args, "ram-tag")

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return _error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top_k is not None and args.top_k < 1:
        return _error(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        return _error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        return _error(f"--workers must be >= 1, got {args.workers}")
    if args.decoder_memory is not None and not args.decoder_memory > 0:
        return _error(f"--decoder-memory must be a positive number of MiB, got {args.decoder_memory}")
    if args.tag_chunk is not None and args.tag_chunk < 1:
        return _error(f"--tag-chunk must be >= 1, got {args.tag_chunk}")
    if args.resume and not args.out:
        return _error("--resume needs --out FILE (the file to continue)")
    if args.caption_tags is not None:
        args.caption = True
    if args.num_beams is not None and not args.caption:
        return _error("--num-beams applies to captions: add --caption")
    if args.num_beams is not None and args.num_beams < 1:
        return _error(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.thresholds and not (args.tags or args.descriptions):
        return _error("--thresholds applies to --tags or --descriptions")
    fmt = _output_format(args)
    if args.ray is not None:
        if args.classify or args.caption:
            return _error(f"--ray writes tags; run {'--classify' if args.classify else '--caption'} without --ray")
        try:
            from ram_edge.distributed.cli import run as run_on_ray  # only here: Ray is an optional extra
        except ImportError as e:
            return _error(str(e))
        return run_on_ray(args)
    if args.classify and fmt == "prompt":
        return _error("--format prompt lists tags; it cannot be used with --classify")
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
    out_path = Path(args.out) if args.out and args.out != "-" else None
    if out_path is not None:
        problem = check_output(out_path, fmt, args.resume, args.overwrite)
        if problem:
            return _error(problem)

    from PIL import Image
    from tqdm import tqdm

    from ram_edge.bundle_format import BundleError
    from ram_edge.vocabulary import Vocabulary

    from .preprocess import IMAGE_EXTENSIONS
    from .tagger import DEFAULT_DECODER_MEMORY_MB, Tagger

    # max_pixels is the explicit guard; Pillow's warning below its own hard limit would only repeat it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    paths, failures = find_images(args.inputs)
    if not paths and not failures:
        return _error(f"nothing to tag: no image files in {', '.join(args.inputs)} (folders are searched "
                      f"recursively for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)")

    # Resume: what the output already holds.
    done: Set[str] = set()
    json_prefix: List[Dict[str, object]] = []
    fresh = True
    if args.resume and out_path.exists() and out_path.stat().st_size > 0:
        try:
            done, json_prefix, complete = read_done(out_path, fmt)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            return _error(f"--resume: cannot read {out_path}: {e}")
        fresh = False
        if fmt != "json" and len(complete) != out_path.stat().st_size:
            with open(out_path, "r+b") as f:  # drop a last line cut short by a crash
                f.truncate(len(complete.encode("utf-8")))
        before = len(paths)
        paths = [p for p in paths if p not in done]
        failures = [f for f in failures if f.path not in done]
        if not args.quiet:
            print(f"ram-tag: resuming: {before - len(paths)} of {before} inputs already in {out_path}",
                  file=sys.stderr)

    load_start = time.perf_counter()
    if not args.quiet:
        verify = "" if args.no_verify else "; checking every file's sha256 (--no-verify skips it)"
        print(f"ram-tag: loading {args.bundle} ({_bundle_summary(args.bundle)}{verify})", file=sys.stderr)
    try:
        vocabulary = Vocabulary.load(args.vocab) if args.vocab else None
        tagger = Tagger(
            args.bundle, backend=args.backend, providers=args.providers, vocabulary=vocabulary,
            verify_files=not args.no_verify, intra_op_threads=args.intra_op_threads, resize=args.resize,
            exif_transpose=not args.no_exif_transpose, alpha=args.alpha, max_pixels=args.max_pixels or None,
            decoder_memory_mb=args.decoder_memory or DEFAULT_DECODER_MEMORY_MB, tag_chunk=args.tag_chunk,
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
        return _error(f"--lang {args.lang}: {e} (use --lang en)")
    batch_size = args.batch_size or tagger.default_batch_size
    load_seconds = time.perf_counter() - load_start
    if not args.quiet:
        chunks = len(tagger.tag_chunks())
        print(f"ram-tag: loaded in {load_seconds:.1f} s: {tagger.backend_name} on {tagger.providers or tagger.backend_name}"
              f", {tagger.vocabulary.num_tags} tags ({chunks} decoder call{'s' if chunks > 1 else ''} per image), "
              f"batch {batch_size}", file=sys.stderr)

    num_failed = num_done = 0
    output_error: Optional[OSError] = None
    writer: Optional[Writer] = None
    try:
        writer = Writer(fmt, fresh=fresh, json_prefix=json_prefix, path=out_path,
                        append=args.resume and fmt != "json", stream=sys.stdout, caption=caption is not None)
    except OSError as e:
        output_error = e

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
    batches = tag_files(tagger, paths, batch_size=batch_size, threshold=args.threshold, top_k=args.top_k,
                        lang=args.lang, workers=args.workers, classify=classes, caption=caption)
    try:
        if output_error is None:
            if failures:
                report(failures, bar)
            for items in batches:
                report(items, bar)
    except KeyboardInterrupt:
        interrupted = True
    except OutputError as e:
        output_error = e
    finally:
        batches.close()  # cancels queued decoding
        bar.close()
        try:
            if writer is not None:
                writer.close()
        except OSError as e:
            output_error = output_error or e
        tagger.close()

    elapsed = time.perf_counter() - start
    if not args.quiet:
        rate = num_done / elapsed if elapsed > 0 else 0.0
        print(f"ram-tag: {num_done - num_failed} tagged, {num_failed} failed in {elapsed:.2f} s "
              f"({rate:.2f} images/s); loading took {load_seconds:.1f} s", file=sys.stderr)
    if output_error is not None:
        where = args.out or "standard output"
        print(f"ram-tag: error: writing {where} failed: {output_error.strerror or output_error}; the "
              f"{num_done} records before are complete" + (", run again with --resume to continue" if args.out else ""),
              file=sys.stderr)
        return EXIT_SOME_FAILED
    if interrupted:
        hint = " --resume" if args.out else ""
        print(f"ram-tag: interrupted; finished records are written. Run again with{hint or ' --out FILE --resume'} "
              "to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if num_failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
