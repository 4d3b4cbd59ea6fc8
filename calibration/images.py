"""Which images calibrate and which evaluate: a deterministic split of image folders.

Folders are walked as ``ram-tag`` walks them (recursively, image extensions, sorted: the runtime's
``find_images``), then shuffled with a fixed seed, so a folder sorted by class still calibrates on a
mix, and the same folder always gives the same split.

* ``--calibration-images DIR`` alone: the last ``min(eval_size, 20 %)`` images of the shuffled folder are
  held out for the accuracy report (at least one once the folder has two images), the first
  ``calibration_size`` of the rest calibrate.
* with ``--eval-images DIR``: that folder (its first ``eval_size`` after the same shuffle) evaluates, and
  calibration never uses an image that is also in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np

from ram_edge.runtime.pipeline import find_images

#: Images that calibrate by default (docs/precision.md: agreement measured at 32, 128 and 512).
DEFAULT_CALIBRATION_SIZE = 128
#: Held-out images the accuracy report is measured on by default.
DEFAULT_EVAL_SIZE = 64
#: Share of --calibration-images held out for the report when no --eval-images folder is given.
HOLD_OUT_FRACTION = 0.2
SPLIT_SEED = 0

PathLike = Union[str, os.PathLike]


class CalibrationError(ValueError):
    """The calibration or evaluation images cannot be used (missing folder, no images, too few)."""


@dataclass(frozen=True)
class ImageSplit:
    calibration: Tuple[str, ...]
    evaluation: Tuple[str, ...]
    #: Where the evaluation images come from, in words (for the report and the manifest).
    evaluation_source: str

    def to_dict(self) -> dict:
        return {"calibration_images": len(self.calibration), "evaluation_images": len(self.evaluation),
                "evaluation_source": self.evaluation_source, "split_seed": SPLIT_SEED}


def list_images(folder: PathLike, flag: str = "--calibration-images") -> List[str]:
    """The images under ``folder`` in a seeded shuffle of ``ram-tag``'s order; CalibrationError if none."""
    if not os.path.isdir(folder):
        raise CalibrationError(f"{flag} {folder}: not a folder")
    paths, _ = find_images([os.fspath(folder)])
    if not paths:
        raise CalibrationError(f"{flag} {folder}: no images in it (looked for .jpg, .png, .webp, ... recursively)")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(paths))
    return [paths[i] for i in order]


def split_images(
    calibration_dir: PathLike,
    eval_dir: Optional[PathLike] = None,
    *,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
) -> ImageSplit:
    """Calibration and evaluation images from the folders (see the module docstring)."""
    if calibration_size < 1:
        raise CalibrationError(f"--calibration-size must be at least 1, got {calibration_size}")
    if eval_size < 1:
        raise CalibrationError(f"--eval-size must be at least 1, got {eval_size}")
    images = list_images(calibration_dir)
    if eval_dir is not None:
        evaluation = list_images(eval_dir, "--eval-images")[:eval_size]
        held = {os.path.abspath(p) for p in evaluation}
        calibration = [p for p in images if os.path.abspath(p) not in held]
        source = f"--eval-images ({len(evaluation)} images)"
        if not calibration:
            raise CalibrationError(f"--calibration-images {calibration_dir}: every image is also in --eval-images; "
                                   "calibrate and evaluate on different images")
    else:
        held_out = min(eval_size, int(len(images) * HOLD_OUT_FRACTION))
        if len(images) >= 2:
            held_out = max(1, held_out)
        if held_out == 0:
            raise CalibrationError(f"--calibration-images {calibration_dir}: one image cannot both calibrate and be "
                                   "held out for the accuracy report; add images or pass --eval-images")
        calibration, evaluation = images[: len(images) - held_out], images[len(images) - held_out:]
        source = f"held out of --calibration-images ({held_out} of {len(images)} images)"
    return ImageSplit(tuple(calibration[:calibration_size]), tuple(evaluation), source)


def evaluation_images(eval_dir: PathLike, eval_size: int = DEFAULT_EVAL_SIZE) -> Tuple[str, ...]:
    """``--eval-images`` for a precision without calibration (fp16, int8-dynamic): its first ``eval_size``."""
    if eval_size < 1:
        raise CalibrationError(f"--eval-size must be at least 1, got {eval_size}")
    return tuple(list_images(eval_dir, "--eval-images")[:eval_size])

