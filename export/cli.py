"""``ram-export``: an official checkpoint (or seeded demo weights) -> a verified bundle directory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from ram_edge.cli import EXIT_FAILED as EXIT_VERIFICATION_FAILED
from ram_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_common_flags, configure_logging

EPILOG = """\
examples:
  ram-export --checkpoint ram_plus_swin_large_14m.pth --text-encoder ViT-B-16.pt --precision fp16 --out bundles/ram_plus_fp16
  ram-export --checkpoint ram_swin_large_14m.pth --out bundles/ram        (RAM: architecture inferred)
  ram-export --text-encoder ViT-B-16.pt --out bundles/ram                 (add CLIP's text encoder to a bundle)
  ram-export --demo ram_plus_swin_l_384 --out bundles/demo               (seeded random weights, text encoder too)
  ram-export --demo ram_plus_tiny_384 --out bundles/tiny                 (seconds; for trying things out)
  ram-export --checkpoint tag2text_swin_14m.pth --out bundles/tag2text    (tagging + captioning graphs)
  ram-export --checkpoint ram_swin_large_14m.pth --captioning --out bundles/ram_caption   (RAM's captions)
  ram-export --checkpoint ram_plus_swin_large_14m.pth --precision int8 --calibration-images my_photos/ --out bundles/ram_plus_int8

int8 (static, calibrated): calibrate on a few hundred of your own photos (--calibration-size, default
128); 20 % of the folder (at most --eval-size) is held out for the accuracy report unless --eval-images
is given. The export prints each layer group's sensitivity and which groups stay float, and refuses the
bundle when its tags are further from fp32's than --min-top10-agreement / --max-flip-rate allow.

The text encoder (CLIP ViT-B/16's text tower: OpenAI's ViT-B-16.pt, an open_clip checkpoint or Hugging
Face openai/clip-vit-base-patch16 model.safetensors) lets the runtime build open-set vocabularies from
words (ram-vocab, ram-tag --tags) and classify zero-shot (ram-tag --classify).

exit status: 0 bundle written; 1 the graphs failed verification or the accuracy limits (nothing written);
             2 bad arguments, checkpoint or output path; 130 interrupted (nothing written)
"""


def build_parser() -> argparse.ArgumentParser:
    # Plain constants and dataclasses: no torch (or onnx) import for --help and the argument checks.
    from ram_edge.calibration.accuracy import DEFAULT_MAX_FLIP_RATE, DEFAULT_MIN_TOP10_AGREEMENT
    from ram_edge.calibration.images import DEFAULT_CALIBRATION_SIZE, DEFAULT_EVAL_SIZE
    from ram_edge.export.options import DEFAULT_SENSITIVITY_IMAGES
    from ram_edge.export.precision import CALIBRATION_METHODS, PRECISIONS, WEIGHT_BITS
    from ram_edge.models.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="ram-export",
        description="Export a RAM++ / RAM model to a bundle: encoder.onnx, decoder.onnx (the vocabulary is "
        "an input), the default vocabulary and a manifest. Both graphs are checked against torch before "
        "the bundle appears at --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH", help="official .pth (or bare state dict, or .safetensors); architecture inferred")
    source.add_argument("--demo", metavar="VARIANT", choices=sorted(PRESETS), help="seeded random weights of a preset: " + ", ".join(sorted(PRESETS)))
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="bundle directory to create; with only --text-encoder, the existing bundle to add it to")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="graph precision (default fp32)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch the bundle is meant for; recorded for TensorRT profiles (default 32)")
    parser.add_argument("--image-size", type=int, help="input size; default 384 for window 12, 224 for window 7")
    parser.add_argument("--tags", metavar="FILE", help="tag names, one a line, in the checkpoint's class order (default: the official 4,585)")
    parser.add_argument("--variant", metavar="NAME", help="preset the checkpoint must match (a check; shapes are inferred)")
    parser.add_argument("--decoder-heads", type=int, default=4, help="tagging-head attention heads (default 4, as official)")
    caption = parser.add_argument_group("captioning (Tag2Text; RAM where its widths allow)")
    captioning = caption.add_mutually_exclusive_group()
    captioning.add_argument("--captioning", dest="captioning", action="store_true", default=None,
                            help="export the captioning graphs (tag_encoder.onnx, text_decoder.onnx); default for "
                            "Tag2Text, on request for RAM (RAM++ has none)")
    captioning.add_argument("--no-captioning", dest="captioning", action="store_false",
                            help="tagging graphs only, also for Tag2Text")
    caption.add_argument("--caption-heads", type=int, default=12, metavar="H",
                         help="attention heads of the tag encoder and text decoder (not in the weights; default 12, "
                         "as official)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --demo weights (default 0)")
    parser.add_argument("--num-tags", type=int, help="with --demo: vocabulary size (default: the official 4,585)")
    parser.add_argument("--vocab-dtype", default="auto", choices=["auto", "float16", "float32"],
                        help="how the vocabulary's embeddings are stored: auto = float32 (exact) up to 64 MiB, "
                        "float16 above (RAM++'s official 478 MB table becomes 239 MB)")
    text = parser.add_argument_group("text encoder (open-set vocabularies from words)")
    text.add_argument("--text-encoder", metavar="PATH",
                      help="CLIP text weights: OpenAI ViT-B-16.pt, an open_clip checkpoint, or a Hugging Face "
                      "CLIP(TextModelWithProjection) .safetensors; alone (no --checkpoint/--demo) it is added to the "
                      "existing bundle at --out")
    text.add_argument("--text-heads", type=int, metavar="H",
                      help="attention heads of the text tower (default width // 64, OpenAI's rule: 8 for ViT-B/16)")
    text.add_argument("--text-activation", choices=["quick_gelu", "gelu"], default=None,
                      help="quick_gelu for OpenAI's models (default), gelu for open_clip's own trainings")
    text.add_argument("--text-precision", choices=["fp32", "fp16"], default="fp32",
                      help="precision of text_encoder.onnx (default fp32: vocabularies are built once)")
    text.add_argument("--no-text-encoder", action="store_true", help="with --demo: leave out the demo text encoder")
    int8 = parser.add_argument_group("int8 calibration and the accuracy report (--precision int8; --eval-images for any precision)")
    int8.add_argument("--calibration-images", metavar="DIR",
                      help="photos to calibrate --precision int8 on (recursively; a few hundred of your own)")
    int8.add_argument("--calibration-size", type=int, default=DEFAULT_CALIBRATION_SIZE, metavar="N",
                      help=f"calibrate on at most N images of the folder (default {DEFAULT_CALIBRATION_SIZE})")
    int8.add_argument("--calibration-method", choices=list(CALIBRATION_METHODS), default="minmax",
                      help="activation ranges: minmax (default), entropy or percentile (99.999 %%)")
    int8.add_argument("--int8-weight-bits", type=int, choices=list(WEIGHT_BITS), default=7, metavar="{7,8}",
                      help="7 (default): weights within +-64, the same results on every x86 CPU (AVX2 without VNNI "
                      "saturates full-range products); 8: full int8 range, finer weights, for bundles that run only on "
                      "CPUs with VNNI / AMX or on TensorRT")
    int8.add_argument("--sensitivity-images", type=int, default=DEFAULT_SENSITIVITY_IMAGES, metavar="N",
                      help=f"calibration images each layer group's sensitivity is measured on (default {DEFAULT_SENSITIVITY_IMAGES})")
    int8.add_argument("--eval-images", metavar="DIR",
                      help="held-out photos for the accuracy report against fp32 (default with int8: 20 %% of "
                      "--calibration-images, at most --eval-size)")
    int8.add_argument("--eval-size", type=int, default=DEFAULT_EVAL_SIZE, metavar="N",
                      help=f"evaluate on at most N images (default {DEFAULT_EVAL_SIZE})")
    int8.add_argument("--min-top10-agreement", type=float, default=DEFAULT_MIN_TOP10_AGREEMENT, metavar="A",
                      help=f"refuse the bundle below this mean top-10 tag agreement with fp32 (default {DEFAULT_MIN_TOP10_AGREEMENT})")
    int8.add_argument("--max-flip-rate", type=float, default=DEFAULT_MAX_FLIP_RATE, metavar="F",
                      help="refuse the bundle above this share of (image, tag) decisions that differ from fp32 "
                      f"at the per-tag thresholds (default {DEFAULT_MAX_FLIP_RATE})")
    int8.add_argument("--max-probability-error", type=float, metavar="P",
                      help="refuse the bundle above this max |probability - fp32 probability| (default: no limit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle (or its text encoder) at --out (only once the new one is complete)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check (not recommended)")
    add_common_flags(parser, "ram-export")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be refused from the arguments alone, before torch is imported and a model is
    built (argparse's error: exit 2 with the usage line)."""
    from ram_edge.calibration.images import CalibrationError, list_images
    from ram_edge.export.options import ExportError, check_export_options

    if not (args.checkpoint or args.demo or args.text_encoder):
        parser.error("one of --checkpoint, --demo or --text-encoder is required")
    if args.no_text_encoder and args.text_encoder:
        parser.error("--no-text-encoder and --text-encoder contradict each other")
    for flag, value in (("--text-heads", args.text_heads), ("--num-tags", args.num_tags),
                        ("--decoder-heads", args.decoder_heads), ("--image-size", args.image_size),
                        ("--caption-heads", args.caption_heads)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.num_tags is not None and not args.demo:
        parser.error("--num-tags applies to --demo (a checkpoint's tags are in its weights; --tags FILE names them)")
    if args.demo and (args.image_size or args.variant):
        parser.error("--image-size and --variant apply to --checkpoint; a --demo preset fixes both")
    for flag, path in (("--checkpoint", args.checkpoint), ("--text-encoder", args.text_encoder), ("--tags", args.tags)):
        if path and not Path(path).is_file():
            parser.error(f"{flag} {path}: no such file")
    for flag, path in (("--calibration-images", args.calibration_images), ("--eval-images", args.eval_images)):
        if path:  # an empty or missing folder is refused before minutes of model loading and tracing
            try:
                list_images(path, flag)
            except CalibrationError as e:
                parser.error(str(e))
    if args.int8_weight_bits != 7 and args.precision != "int8":
        parser.error(f"--int8-weight-bits applies to --precision int8, not {args.precision}")
    if not (args.checkpoint or args.demo) and (args.calibration_images or args.eval_images):
        parser.error("--calibration-images and --eval-images apply to image graphs (--checkpoint or --demo)")
    for flag, value in (("--calibration-size", args.calibration_size), ("--eval-size", args.eval_size),
                        ("--sensitivity-images", args.sensitivity_images)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--min-top10-agreement", args.min_top10_agreement), ("--max-flip-rate", args.max_flip_rate),
                        ("--max-probability-error", args.max_probability_error)):
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"{flag} must be within 0 and 1, got {value}")
    try:
        check_export_options(precision=args.precision, opset=args.opset, max_batch=args.max_batch,
                             vocab_dtype=args.vocab_dtype, text_precision=args.text_precision,
                             calibration_images=args.calibration_images)
    except ExportError as e:
        parser.error(str(e))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_arguments(parser, args)
    except SystemExit as e:  # --help / --version (0) or a usage error (2): return it, for callers
        return int(e.code or 0)
    configure_logging(args, "ram-export")
    started = time.perf_counter()

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    say("importing torch and the exporter")
    try:
        from ram_edge.calibration import AccuracyLimits
        from ram_edge.export import AccuracyError, CalibrationOptions, ExportError, VerificationError, add_text_encoder, export_bundle
        from ram_edge.export.bundle import check_output_dir
        from ram_edge.models import CheckpointError, demo_model, load_checkpoint
        from ram_edge.models.checkpoint import as_tag_set
        from ram_edge.models.demo import demo_config
        from ram_edge.models.clip_text import ClipCheckpointError, demo_clip_text, load_clip_text

        text_encoder = None
        if args.text_encoder:
            say(f"loading the text encoder {args.text_encoder}")
            text_encoder = load_clip_text(args.text_encoder, heads=args.text_heads, activation=args.text_activation)
            c = text_encoder.config
            say(f"text encoder: width {c.width}, {c.layers} layers, {c.heads} heads, {c.activation}, embeddings {c.embed_dim}")
        if not (args.checkpoint or args.demo):
            result = add_text_encoder(args.out, text_encoder, text_precision=args.text_precision,
                                      overwrite=args.overwrite, verify=not args.no_verify, progress=say)
            print(result.directory)
            return EXIT_OK

        check_output_dir(args.out, args.overwrite)
        if args.checkpoint:
            say(f"loading {args.checkpoint}")
            model = load_checkpoint(
                args.checkpoint, image_size=args.image_size, decoder_heads=args.decoder_heads, tags=args.tags, variant=args.variant,
                captioning=args.captioning, caption_heads=args.caption_heads,
            )
            source = args.checkpoint.replace("\\", "/").split("/")[-1]
        else:
            say(f"building {args.demo} with demo weights (seed {args.seed})")
            model = demo_model(demo_config(args.demo, args.captioning), seed=args.seed,
                               tags=as_tag_set(args.tags) if args.tags else None, num_tags=args.num_tags)
            source = f"demo:seed={args.seed}"
            # Tag2Text's vocabulary is its learned table: no text encoder (open-set vocabularies) applies.
            if text_encoder is None and not args.no_text_encoder and model.config.kind != "tag2text":
                text_preset = "clip_tiny" if "_tiny_" in args.demo else "clip_vit_b_16"
                say(f"building the demo text encoder ({text_preset}, seed {args.seed})")
                text_encoder = demo_clip_text(text_preset, seed=args.seed)
        calibration = None
        if args.calibration_images:
            calibration = CalibrationOptions(args.calibration_images, size=args.calibration_size,
                                             method=args.calibration_method, sensitivity_images=args.sensitivity_images,
                                             weight_bits=args.int8_weight_bits)
        config = model.config
        say(
            f"model: {config.kind} {config.variant}, image {config.image_size}, Swin {config.swin.embed_dim}/"
            f"{'-'.join(map(str, config.swin.depths))}, {config.num_tags} tags x {config.descriptions_per_tag} descriptions"
        )
        result = export_bundle(
            model,
            args.out,
            precision=args.precision,
            opset=args.opset,
            max_batch=args.max_batch,
            source=source,
            vocab_dtype=args.vocab_dtype,
            text_encoder=text_encoder,
            text_precision=args.text_precision,
            captioning=args.captioning,
            overwrite=args.overwrite,
            verify=not args.no_verify,
            progress=say,
            calibration=calibration,
            eval_images=args.eval_images,
            eval_size=args.eval_size,
            accuracy_limits=AccuracyLimits(args.min_top10_agreement, args.max_flip_rate, args.max_probability_error),
        )
    except KeyboardInterrupt:
        print("ram-export: interrupted; no bundle was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (VerificationError, AccuracyError) as e:
        print(f"ram-export: {e}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    except (CheckpointError, ClipCheckpointError, ExportError, ValueError, KeyError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ram-export: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(result.directory)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
