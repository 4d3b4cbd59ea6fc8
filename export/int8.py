"""The accuracy report of an export, and static int8: calibration, per-group sensitivity, what stays float.

:class:`AccuracyCheck` holds what the report needs while a bundle is written: held-out images, fp32 copies
of both image graphs (kept in a scratch folder beside the bundle as they are traced) and the vocabulary.
``report`` runs the bundle's graphs and the fp32 ones on the images (onnxruntime CPU, the runtime's
session settings) and compares their tags (``ram_edge.calibration.accuracy``).

:class:`Int8Calibration` is the calibration context ``_write_graph`` hands the fp32 graph to for
``--precision int8``. For each graph, in the order they are written:

1. **calibrate** (``export.precision.to_int8``, onnxruntime's calibrator over ``ram_edge.calibration``
   readers) and keep the tensor ranges, so every later variant reuses them;
2. **measure each group alone**: a group is one kind of product in one place (``quantization_groups``:
   the node's module with the Swin block index dropped, e.g. every ``mlp.fc2`` of stage 2); a variant
   with only that group int8 runs on the sensitivity images (the first ``sensitivity_images``
   calibration images) and its tags are compared with fp32's: the table ``ram-export`` prints;
3. **choose what stays float**: start from everything int8; while the limits do not hold on the
   sensitivity images, keep the group with the largest mean probability error (step 2) float and measure
   again. The encoder must meet half of each error budget (1 - top-10 agreement, flips, probability
   error), measured through the fp32 decoder; the decoder then the whole budget, measured end to end
   behind the chosen int8 encoder. Everything float is fp32, so the search always ends.

The encoder is calibrated on the calibration images (the runtime's preprocessing); the decoder on the
embeddings the chosen int8 encoder makes of the same images, with the bundle's vocabulary. While the
encoder is chosen the decoder graph is not traced yet, so its fp32 decoder is the torch model's
(equal to the fp32 decoder graph within 1e-5, as every fp32 export verifies). The held-out report at the
end compares both bundle graphs with both fp32 graphs.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch

from ram_edge import bundle_format as bf
from ram_edge.calibration import (
    DEFAULT_CALIBRATION_SIZE, AccuracyLimits, AccuracyReport, CalibrationError, EmbeddingReader,
    ImageReader, compare_logits, split_images,
)
from ram_edge.models import RAMTagger
from ram_edge.runtime.preprocess import Preprocessor
from ram_edge.tags import DEFAULT_THRESHOLD
from ram_edge.vocabulary import Vocabulary

from .graphs import GraphSpec
from .options import DEFAULT_SENSITIVITY_IMAGES
from .precision import (
    CALIBRATION_METHODS, INT8_OP_TYPES, WEIGHT_BITS, WEIGHT_RANGES, quantized_nodes, to_int8, with_quantized_subset,
)

#: Share of each error budget the encoder may use (the decoder gets the rest).
ENCODER_BUDGET = 0.5

Progress = Callable[[str], None]

_REPEATED_BLOCK = re.compile(r"^blocks\.\d+$")


@dataclass(frozen=True)
class QuantGroup:
    """Products quantized or kept float together."""

    name: str
    nodes: Tuple[str, ...]
    #: "weights" (activation x weight), "activations" (activation x activation, e.g. attention) or "conv".
    kind: str


def quantization_groups(proto: onnx.ModelProto) -> Dict[str, QuantGroup]:
    """The graph's :data:`INT8_OP_TYPES` nodes grouped by module, in graph order.

    A node named ``/visual_encoder/layers.2/blocks.7/mlp/fc2/MatMul`` (torch.onnx scope names) belongs to
    ``visual_encoder.layers.2.mlp.fc2``: its module path without the repeated block index. A product of
    two activations, computed in a module's own forward, keeps the op's name: attention's ``q @ kᵀ`` and
    ``attn @ v`` are ``visual_encoder.layers.2.attn.MatMul`` and ``...attn.MatMul_1``; RAM++'s
    reweighting in the decoder (``cls @ label_embedᵀ``, weights @ label_embed) is ``MatMul`` / ``MatMul_1``.
    The same names come out of the fp32 graph and of its int8 version.
    """
    weights = {init.name for init in proto.graph.initializer}
    # In an int8 graph a weight reaches its product through a DequantizeLinear of an int8 initializer.
    weights |= {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    grouped: Dict[str, Tuple[List[str], str]] = {}
    for node in proto.graph.node:
        if node.op_type not in INT8_OP_TYPES:
            continue
        parts = [p for p in node.name.strip("/").split("/") if p]
        scope, op = parts[:-1], parts[-1] if parts else node.op_type
        scope = [p for p in scope if not _REPEATED_BLOCK.match(p)]
        if node.op_type == "Conv":
            kind = "conv"
        else:
            kind = "weights" if any(i in weights for i in node.input[:2]) else "activations"
        if kind == "activations" or not scope:  # the module's own product, not a Linear submodule's
            scope = scope + [op]
        name = ".".join(scope)
        nodes, _ = grouped.setdefault(name, ([], kind))
        nodes.append(node.name)
    return {name: QuantGroup(name, tuple(nodes), kind) for name, (nodes, kind) in grouped.items()}


@dataclass
class GraphChoice:
    """What the int8 search found for one graph (the manifest's record of it)."""

    graph: str
    sensitivity: List[Tuple[QuantGroup, AccuracyReport]] = field(default_factory=list)
    kept_float: List[str] = field(default_factory=list)
    report: Optional[AccuracyReport] = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "groups": len(self.sensitivity),
            "quantized_nodes": sum(len(g.nodes) for g, _ in self.sensitivity if g.name not in self.kept_float),
            "kept_float": list(self.kept_float),
            "sensitivity": [
                {"group": g.name, "kind": g.kind, "nodes": len(g.nodes), "top10_agreement": r.top10_agreement,
                 "flip_rate": r.flip_rate, "max_probability_error": r.max_probability_error,
                 "mean_probability_error": r.mean_probability_error}
                for g, r in self.sensitivity
            ],
            "sensitivity_images_report": None if self.report is None else self.report.to_dict(),
            "seconds": round(self.seconds, 1),
        }


def _session(graph):
    """An onnxruntime CPU session with the runtime's settings, of a graph file or serialized graph bytes."""
    import onnxruntime as ort

    from ram_edge.ort_tuning import session_options

    options = session_options()
    options.log_severity_level = 3
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class AccuracyCheck:
    """Held-out images, the vocabulary and fp32 copies of the image graphs: the accuracy report of an export.

    ``scratch``: a folder for the fp32 copies (and int8 variants), removed by the caller afterwards.
    """

    def __init__(self, scratch: Path, vocabulary: Vocabulary, image_size: int, eval_paths: Sequence[str],
                 limits: AccuracyLimits, evaluation_source: str, say: Progress):
        self.scratch = Path(scratch)
        self.limits = limits
        self.say = say
        self.preprocessor = Preprocessor(image_size)
        reader = ImageReader(eval_paths, self.preprocessor, what="evaluation images")
        if not len(reader):
            raise CalibrationError("none of the evaluation images could be read")
        self.eval_pixels = [reader.pixels(i) for i in range(len(reader))]
        self.evaluation_source = evaluation_source
        self.label_embed = np.array(vocabulary.embeddings, dtype=np.float32)
        self.label_mask = np.array(vocabulary.mask, dtype=np.bool_)
        # Tag2Text's classifier rows: further decoder inputs, one row per tag.
        self.per_tag = {name: np.array(array, dtype=np.float32) for name, array in vocabulary.per_tag.items()}
        self.thresholds = vocabulary.threshold_array(DEFAULT_THRESHOLD)
        self.fp32: Dict[str, Path] = {}
        self._reference: Optional[np.ndarray] = None

    # -- hooks for _write_graph ---------------------------------------------------------------------
    def keep_fp32(self, spec: GraphSpec, path: Path) -> None:
        """Copy the just-traced fp32 graph ``path`` before it is converted in place."""
        if spec.name in ("encoder", "decoder"):
            copy = self.scratch / f"fp32.{spec.file}"
            shutil.copyfile(path, copy)
            self.fp32[spec.name] = copy

    # -- running graphs ------------------------------------------------------------------------------
    def decoder_feeds(self, embeds: np.ndarray) -> Dict[str, np.ndarray]:
        return {bf.IMAGE_EMBEDS: embeds, bf.LABEL_EMBED: self.label_embed, bf.LABEL_MASK: self.label_mask,
                **self.per_tag}

    @staticmethod
    def encode(session, pixels: Sequence[np.ndarray]) -> List[np.ndarray]:
        return [session.run(None, {bf.PIXEL_VALUES: p})[0] for p in pixels]

    def decode(self, session, embeds: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([session.run(None, self.decoder_feeds(e))[0] for e in embeds])

    def compare(self, reference: np.ndarray, logits: np.ndarray, reference_name: str) -> AccuracyReport:
        return compare_logits(reference, logits, self.thresholds, reference_name=reference_name)

    def report(self, directory: Path) -> AccuracyReport:
        """The graphs in ``directory`` against the fp32 graphs on the held-out images."""
        if self._reference is None:
            encoder, decoder = _session(self.fp32["encoder"]), _session(self.fp32["decoder"])
            self._reference = self.decode(decoder, self.encode(encoder, self.eval_pixels))
            del encoder, decoder
        encoder, decoder = _session(directory / bf.ENCODER_FILE), _session(directory / bf.DECODER_FILE)
        logits = self.decode(decoder, self.encode(encoder, self.eval_pixels))
        return self.compare(self._reference, logits, "fp32 graphs, onnxruntime CPU")

    def convert(self, spec: GraphSpec, fp32_path: Path) -> Optional[onnx.ModelProto]:
        """The graph's precision conversion, if this check does it (only :class:`Int8Calibration`)."""
        return None

    def manifest_section(self, report: AccuracyReport) -> dict:
        violations = self.limits.violations(report)
        return {**report.to_dict(), "evaluation_images": self.evaluation_source, "limits": self.limits.to_dict(),
                "passed": not violations, "violations": violations}


@dataclass(frozen=True)
class CalibrationOptions:
    """``ram-export --precision int8``'s calibration settings (the split: ``ram_edge.calibration.images``)."""

    images: str
    size: int = DEFAULT_CALIBRATION_SIZE
    method: str = "minmax"
    sensitivity_images: int = DEFAULT_SENSITIVITY_IMAGES
    weight_bits: int = 7

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise CalibrationError(f"--calibration-method {self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if self.weight_bits not in WEIGHT_BITS:
            raise CalibrationError(f"--int8-weight-bits {self.weight_bits!r}: choose one of "
                                   f"{', '.join(map(str, WEIGHT_BITS))}")
        if self.sensitivity_images < 1:
            raise CalibrationError(f"--sensitivity-images must be at least 1, got {self.sensitivity_images}")


class Int8Calibration(AccuracyCheck):
    """The calibration context of one ``--precision int8`` export (see the module docstring)."""

    def __init__(self, model: RAMTagger, scratch: Path, vocabulary: Vocabulary, options: CalibrationOptions,
                 eval_images: Optional[str], eval_size: int, limits: AccuracyLimits, say: Progress):
        split = split_images(options.images, eval_images, calibration_size=options.size, eval_size=eval_size)
        super().__init__(scratch, vocabulary, model.config.image_size, split.evaluation, limits,
                         split.evaluation_source, say)
        self.options = options
        self.model = model
        self.calibration = ImageReader(split.calibration, self.preprocessor, progress=say)
        if not len(self.calibration):
            raise CalibrationError("none of the calibration images could be read")
        count = min(options.sensitivity_images, len(self.calibration))
        self.sensitivity_pixels = [self.calibration.pixels(i) for i in range(count)]
        self.split = split
        self.choices: Dict[str, GraphChoice] = {}
        self._int8_encoder: Optional[Path] = None
        self._fp32_embeds: List[np.ndarray] = []  # the fp32 encoder graph's, of the sensitivity images

    # -- the precision step ---------------------------------------------------------------------------
    def convert(self, spec: GraphSpec, fp32_path: Path) -> Optional[onnx.ModelProto]:
        if spec.name == "encoder":
            return self._encoder(fp32_path)
        if spec.name == "decoder":
            return self._decoder(fp32_path)
        return None

    def _torch_decode(self, embeds: Sequence[np.ndarray]) -> np.ndarray:
        per_tag = {name: torch.from_numpy(array) for name, array in self.per_tag.items()}
        with torch.no_grad():
            return np.concatenate([
                self.model.decode(torch.from_numpy(e), torch.from_numpy(self.label_embed),
                                  torch.from_numpy(self.label_mask), **per_tag).numpy()
                for e in embeds
            ])

    def _encoder(self, fp32_path: Path) -> onnx.ModelProto:
        self._fp32_embeds = self.encode(_session(fp32_path), self.sensitivity_pixels)
        reference = self._torch_decode(self._fp32_embeds)

        def isolated(graph) -> AccuracyReport:
            return self.compare(reference, self._torch_decode(self.encode(_session(graph), self.sensitivity_pixels)),
                                "fp32 encoder graph + fp32 decoder")

        self.calibration.rewind()
        chosen = self._choose("encoder", fp32_path, self.calibration, isolated, isolated,
                              self.limits.share(ENCODER_BUDGET))
        self._int8_encoder = chosen
        return onnx.load(str(chosen))

    def _decoder(self, fp32_path: Path) -> onnx.ModelProto:
        if self._int8_encoder is None:
            raise RuntimeError("the decoder is quantized after the encoder: its calibration reads the int8 encoder")
        encoder = _session(self._int8_encoder)
        self.say(f"running the int8 encoder on the {len(self.calibration)} calibration images (decoder calibration data)")
        self.calibration.rewind()
        embeds = []
        while (feeds := self.calibration.get_next()) is not None:
            embeds.append(encoder.run(None, feeds)[0])
        reader = EmbeddingReader(embeds, self.label_embed, self.label_mask, per_tag=self.per_tag, progress=self.say)
        fp32 = _session(fp32_path)
        int8_embeds = embeds[: len(self.sensitivity_pixels)]
        behind_int8 = self.decode(fp32, int8_embeds)
        end_to_end = self.decode(fp32, self._fp32_embeds)
        del encoder

        def isolated(graph) -> AccuracyReport:
            return self.compare(behind_int8, self.decode(_session(graph), int8_embeds),
                                "fp32 decoder graph behind the same int8 encoder")

        def pipeline(graph) -> AccuracyReport:
            return self.compare(end_to_end, self.decode(_session(graph), int8_embeds), "fp32 graphs")

        return onnx.load(str(self._choose("decoder", fp32_path, reader, isolated, pipeline, self.limits)))

    def _choose(self, graph: str, fp32_path: Path, reader, isolated: Callable[[object], AccuracyReport],
                pipeline: Callable[[object], AccuracyReport], limits: AccuracyLimits) -> Path:
        """Calibrate ``graph``, measure every group alone, keep the most sensitive float until ``limits``
        hold on the sensitivity images; returns the chosen int8 graph's path.

        ``isolated`` / ``pipeline`` measure a graph given as a path or as serialized bytes. The variants
        measured are the fp32 graph with some of onnxruntime's Q/DQ pairs (``with_quantized_subset``); the
        graph returned is onnxruntime's own output for the chosen exclusions, checked to quantize exactly
        the nodes that were measured.
        """
        started = time.perf_counter()
        say = self.say
        method = self.options.method
        fp32 = onnx.load(str(fp32_path))
        groups = list(quantization_groups(fp32).values())
        cache = self.scratch / f"{graph}.calibration.json"
        full = self.scratch / f"int8.{graph}.onnx"
        say(f"calibrating the {graph} on {len(reader)} images ({method}, symmetric int8, {len(groups)} groups of "
            f"{'/'.join(INT8_OP_TYPES)})")
        bits = self.options.weight_bits
        qdq = to_int8(fp32_path, full, reader=reader, cache_path=cache, method=method, weight_bits=bits)

        def variant(nodes: Sequence[str]) -> bytes:
            return with_quantized_subset(fp32, qdq, nodes).SerializeToString()

        choice = GraphChoice(graph)
        say(f"  {graph} sensitivity, one group int8 at a time, on {len(self.sensitivity_pixels)} calibration images:")
        say(f"  {'group':50s} {'kind':>11s} {'nodes':>5s} {'top-10':>7s} {'flipped':>8s} {'max|dp|':>8s} {'mean|dp|':>9s}")
        for group in groups:
            report = isolated(variant(group.nodes))
            choice.sensitivity.append((group, report))
            say(f"  {group.name:50s} {group.kind:>11s} {len(group.nodes):5d} {report.top10_agreement:7.3f} "
                f"{report.flip_rate:8.3%} {report.max_probability_error:8.4f} {report.mean_probability_error:9.5f}")
        ranked = [g for g, r in sorted(choice.sensitivity, key=lambda gr: -gr[1].mean_probability_error)]

        report = pipeline(full)
        say(f"  {graph}, every group int8: {report.summary()}")
        while limits.violations(report) and len(choice.kept_float) < len(ranked):
            group = ranked[len(choice.kept_float)]
            choice.kept_float.append(group.name)
            quantized = [n for g in ranked[len(choice.kept_float):] for n in g.nodes]
            report = pipeline(variant(quantized) if quantized else fp32_path)
            say(f"  keeping {group.name} float: {report.summary()}")
        kept = [n for g in groups if g.name in choice.kept_float for n in g.nodes]
        quantized = [n for g in groups if g.name not in choice.kept_float for n in g.nodes]
        if not quantized:
            shutil.copyfile(fp32_path, full)  # nothing left to quantize
        else:
            if kept:
                to_int8(fp32_path, full, cache_path=cache, method=method, weight_bits=bits, nodes_to_exclude=kept)
            measured = quantized_nodes(with_quantized_subset(fp32, qdq, quantized))
            written = quantized_nodes(onnx.load(str(full), load_external_data=False))
            if measured != written:
                differ = sorted(set(measured.items()) ^ set(written.items()))
                raise RuntimeError(f"onnxruntime's int8 {graph} is not the variant that was measured: {differ[:4]}")
        choice.report = report
        choice.seconds = time.perf_counter() - started
        self.choices[graph] = choice
        say(f"  {graph}: {len(choice.kept_float)} of {len(groups)} groups kept float "
            f"({', '.join(choice.kept_float) or 'none'}), {choice.seconds:.0f} s")
        return full

    def manifest_quantization(self) -> dict:
        return {
            "format": "QDQ",
            "quantizer": "onnxruntime.quantization.quantize_static",
            "op_types": list(INT8_OP_TYPES),
            "weights": "int8, symmetric, per output channel",
            "weight_bits": self.options.weight_bits,
            "weight_range": list(WEIGHT_RANGES[self.options.weight_bits]),
            "activations": "int8, symmetric, per tensor (inputs of the quantized products only)",
            "calibration_method": self.options.method,
            "calibration_images": len(self.calibration),
            "skipped_images": list(self.calibration.skipped),
            "split": self.split.to_dict(),
            "sensitivity_images": len(self.sensitivity_pixels),
            "rule": (f"every group int8, then keep the group with the largest mean probability error (alone) float "
                     f"until the limits hold on the sensitivity images; the encoder within {ENCODER_BUDGET:g} of each "
                     "error budget, the decoder end to end within all of it"),
            "graphs": {name: choice.to_dict() for name, choice in self.choices.items()},
        }
