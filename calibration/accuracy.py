"""How far a lower-precision bundle's tags are from the fp32 graphs' on the same images: the accuracy
report that ``ram-export`` prints, stores in the manifest and checks against limits, and that the
benchmarks print beside each configuration's speed. numpy only.

Three numbers, each about what a user of the tagger sees rather than raw logits:

* **top-10 agreement**: per image, the share of the fp32 top-10 tags (by probability) that are also in
  the candidate's top-10, averaged over images (1.0: the same ten tags, in any order);
* **flip rate**: the share of (image, tag) decisions ``probability > threshold`` (the runtime's rule,
  with the vocabulary's per-tag thresholds) that differ from fp32's;
* **max probability error**: the largest |probability - fp32 probability| over every image and tag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

TOP_K = 10

#: Limits ``ram-export`` applies by default to every accuracy report (see docs/precision.md).
DEFAULT_MIN_TOP10_AGREEMENT = 0.95
DEFAULT_MAX_FLIP_RATE = 0.01


def _sigmoid64(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


@dataclass(frozen=True)
class AccuracyReport:
    """One configuration against the fp32 reference on the same images (see the module docstring)."""

    images: int
    tags: int
    top10_agreement: float
    worst_image_top10_agreement: float
    flip_rate: float
    flips: int
    max_probability_error: float
    mean_probability_error: float
    max_logit_error: float
    reference: str = "fp32 graphs, onnxruntime CPU"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"top-10 agreement {self.top10_agreement:.4f} (worst image {self.worst_image_top10_agreement:.2f}), "
                f"flipped decisions {self.flip_rate:.4%} ({self.flips} of {self.images * self.tags}), "
                f"max |probability error| {self.max_probability_error:.4f} over {self.images} images")


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    thresholds: Union[np.ndarray, float],
    *,
    k: int = TOP_K,
    reference_name: str = "fp32 graphs, onnxruntime CPU",
) -> AccuracyReport:
    """The accuracy report of ``candidate`` (B, T) logits against ``reference`` (B, T) logits of the same
    images, deciding tags with ``thresholds`` (per tag (T,) or one float). ``k`` is capped at T."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.size == 0:
        raise ValueError(f"logits must be two equal, non-empty (images, tags) arrays, got {reference.shape} "
                         f"and {candidate.shape}")
    images, tags = reference.shape
    k = min(k, tags)
    p_ref, p_new = _sigmoid64(reference), _sigmoid64(candidate)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    # float32 probabilities decide tags in the runtime; compare them at the same precision.
    flipped = (p_ref.astype(np.float32) > thresholds) != (p_new.astype(np.float32) > thresholds)
    top_ref = np.argpartition(-p_ref, k - 1, axis=1)[:, :k]
    top_new = np.argpartition(-p_new, k - 1, axis=1)[:, :k]
    agreement = np.array([len(np.intersect1d(a, b)) / k for a, b in zip(top_ref, top_new)])
    error = np.abs(p_new - p_ref)
    return AccuracyReport(
        images=int(images),
        tags=int(tags),
        top10_agreement=float(agreement.mean()),
        worst_image_top10_agreement=float(agreement.min()),
        flip_rate=float(flipped.mean()),
        flips=int(flipped.sum()),
        max_probability_error=float(error.max()),
        mean_probability_error=float(error.mean()),
        max_logit_error=float(np.abs(candidate.astype(np.float64) - reference).max()),
        reference=reference_name,
    )


@dataclass(frozen=True)
class AccuracyLimits:
    """What an export accepts. ``max_probability_error`` None: reported, not limited."""

    min_top10_agreement: float = DEFAULT_MIN_TOP10_AGREEMENT
    max_flip_rate: float = DEFAULT_MAX_FLIP_RATE
    max_probability_error: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.min_top10_agreement <= 1.0:
            raise ValueError(f"the minimum top-10 agreement must be within [0, 1], got {self.min_top10_agreement}")
        if not 0.0 <= self.max_flip_rate <= 1.0:
            raise ValueError(f"the maximum flip rate must be within [0, 1], got {self.max_flip_rate}")
        if self.max_probability_error is not None and not 0.0 <= self.max_probability_error <= 1.0:
            raise ValueError(f"the maximum probability error must be within [0, 1], got {self.max_probability_error}")

    def violations(self, report: AccuracyReport) -> List[str]:
        """What ``report`` breaks, in words (empty: within the limits)."""
        broken = []
        if report.top10_agreement < self.min_top10_agreement:
            broken.append(f"top-10 agreement {report.top10_agreement:.4f} < {self.min_top10_agreement:g}")
        if report.flip_rate > self.max_flip_rate:
            broken.append(f"flipped decisions {report.flip_rate:.4%} > {self.max_flip_rate:.4%}")
        if self.max_probability_error is not None and report.max_probability_error > self.max_probability_error:
            broken.append(f"max |probability error| {report.max_probability_error:.4f} > {self.max_probability_error:g}")
        return broken

    def accepts(self, report: AccuracyReport) -> bool:
        return not self.violations(report)

    def share(self, fraction: float) -> "AccuracyLimits":
        """The limits with only ``fraction`` of each error budget: 1 - agreement, flips, probability error."""
        return AccuracyLimits(
            min_top10_agreement=1.0 - fraction * (1.0 - self.min_top10_agreement),
            max_flip_rate=fraction * self.max_flip_rate,
            max_probability_error=None if self.max_probability_error is None else fraction * self.max_probability_error,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def report_table(rows: Sequence[tuple]) -> List[str]:
    """Lines of a fixed-width table of ``(name, AccuracyReport)`` rows, for logs and CLIs."""
    lines = [f"{'configuration':34s} {'top-10':>8s} {'flipped':>9s} {'max |dp|':>9s} {'mean |dp|':>10s}"]
    for name, r in rows:
        lines.append(f"{name:34s} {r.top10_agreement:8.4f} {r.flip_rate:9.4%} {r.max_probability_error:9.4f} "
                     f"{r.mean_probability_error:10.5f}")
    return lines
