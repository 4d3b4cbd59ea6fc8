"""``ram-tag ... --ray local|ADDRESS``: the Ray Data branch of ``ram-tag`` (``ram_edge.runtime.cli`` parses the
flags and hands them here, importing this module only when ``--ray`` is given). ``--vocab DIR`` is loaded
by every actor; ``--tags`` / ``--descriptions`` are built once on the driver."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from ram_edge.runtime.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, _error
from ram_edge.vocabulary import Vocabulary

#: Failures listed on stderr; the rest are in the output's ``error`` column.
SHOWN_FAILURES = 20


def build_vocabulary(args: argparse.Namespace) -> Vocabulary:
    """``--tags`` / ``--descriptions``: the open-set vocabulary, built once here on the driver with the
    bundle's text encoder (the job ships it to the model actors through the object store)."""
    from ram_edge.runtime.text_encoder import TextEncoder
    from ram_edge.runtime.vocab_cli import split_tags

    names = split_tags(args.tags) if args.tags else None
    if not args.quiet:
        print("ram-tag: building the vocabulary with the bundle's text encoder", file=sys.stderr)
    thresholds = args.thresholds or args.threshold
    with TextEncoder(args.bundle, args.backend, args.providers, verify_files=not args.no_verify) as text:
        if names is not None:
            return Vocabulary.from_names(names, text, thresholds=thresholds, progress=not args.quiet)
        return Vocabulary.from_descriptions(args.descriptions, text, thresholds=thresholds, progress=not args.quiet)


def run(args: argparse.Namespace) -> int:
    """Run the job ``ram-tag``'s parsed arguments describe; returns ram-tag's exit status."""
    if not args.out:
        return _error("--ray needs --out FOLDER (Parquet shards are written there, e.g. --out tags.parquet)")
    if args.format not in (None, "text"):
        return _error("--ray writes Parquet to --out; --format does not apply")
    if args.workers is not None:
        return _error("--workers does not apply with --ray: images are decoded in Ray tasks on every CPU")
    if args.ray_actors is not None and args.ray_actors < 1:
        return _error(f"--ray-actors must be >= 1, got {args.ray_actors}")

    from PIL import Image

    from ram_edge.bundle_format import BundleError

    from .job import TagJobOptions, connect, tag_to_parquet

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # --max-pixels is the explicit guard
    tagger_options = {
        "backend": args.backend, "verify_files": not args.no_verify, "resize": args.resize,
        "exif_transpose": not args.no_exif_transpose, "alpha": args.alpha, "max_pixels": args.max_pixels or None,
    }
    if args.providers:
        tagger_options["providers"] = args.providers
    if args.vocab:
        tagger_options["vocabulary"] = args.vocab
    elif args.tags or args.descriptions:
        try:
            tagger_options["vocabulary"] = build_vocabulary(args)
        except (BundleError, ValueError) as e:
            return _error(str(e))
    options = TagJobOptions(
        threshold=args.threshold, top_k=args.top_k, lang=args.lang,
        batch_size=args.batch_size or TagJobOptions.batch_size,
        num_actors=args.ray_actors, cpus_per_actor=args.intra_op_threads, tagger_options=tagger_options,
    )

    started = False
    try:
        started = connect(args.ray, logging_level=logging.WARNING)
        if args.quiet:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        summary = tag_to_parquet(args.bundle, args.inputs, args.out, options=options, resume=args.resume)
    except KeyboardInterrupt:
        print("ram-tag: interrupted; finished shards are written. Run again with --resume to continue.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BundleError, ValueError, ConnectionError) as e:
        return _error(str(e))
    finally:
        if started:
            import ray

            ray.shutdown()

    for path, error in summary.failures[:SHOWN_FAILURES]:
        print(f"ram-tag: {path}: {error}", file=sys.stderr)
    if summary.failed > SHOWN_FAILURES:
        print(f"ram-tag: ... and {summary.failed - SHOWN_FAILURES} more failures (rows whose 'error' is set)",
              file=sys.stderr)
    if not args.quiet:
        if summary.skipped:
            print(f"ram-tag: resumed: {summary.skipped} of {summary.inputs} inputs were already in {args.out}",
                  file=sys.stderr)
        done = summary.tagged + summary.failed
        rate = done / summary.seconds if summary.seconds > 0 else 0.0
        print(f"ram-tag: {summary.tagged} tagged, {summary.failed} failed in {summary.seconds:.2f} s "
              f"({rate:.1f} images/s), {len(summary.shards)} shards in {args.out}", file=sys.stderr)
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK
