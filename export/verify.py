"""Run the exported graphs in onnxruntime against the torch model, end to end."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ram_edge import bundle_format as bf
from ram_edge.models import RAMTagger
from ram_edge.models.clip_text import ClipTextModel
from ram_edge.vocabulary import Vocabulary

from .graphs import sample_token_ids


@dataclass
class Verification:
    image_embeds_max_abs_error: float
    logits_max_abs_error: float
    probability_max_abs_error: float
    tolerance: float
    batch: int
    num_tags: int
    reference: str = "torch fp32, same inputs"

    @property
    def passed(self) -> bool:
        return bool(self.logits_max_abs_error <= self.tolerance)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class TextVerification:
    text_embeds_max_abs_error: float
    min_cosine: float
    tolerance: float
    lengths: list
    reference: str = "torch fp32, same token ids"

    @property
    def passed(self) -> bool:
        return bool(self.text_embeds_max_abs_error <= self.tolerance)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_text_encoder(model: ClipTextModel, path: Path, tolerance: float) -> TextVerification:
    """``text_encoder.onnx`` in onnxruntime vs ``model`` in torch on token batches of several lengths: a
    full context (77) and one cut to its longest sequence, as the runtime feeds them."""
    session = _session(path)
    context = model.config.context_length
    worst, min_cos, lengths = 0.0, 1.0, []
    for batch in ((context, 9, 2, 30), (5, 12, 3)):
        batch = tuple(min(n, context) for n in batch)
        ids = sample_token_ids(model, batch, seed=len(batch))
        with torch.no_grad():
            expected = model(ids).numpy()
        got = session.run(None, {bf.INPUT_IDS: ids.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"text encoder returned {got.shape}, expected {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
        cos = (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
        min_cos = min(min_cos, float(cos.min()))
        lengths.extend(batch)
    return TextVerification(worst, min_cos, tolerance, lengths)


def sample_pixels(image_size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Normalised pixels of seeded uniform-noise images: every value in the range real images reach."""
    rng = np.random.default_rng(seed)
    mean = np.asarray(bf.IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(bf.IMAGENET_STD, dtype=np.float32)[:, None, None]
    return ((rng.random((batch, 3, image_size, image_size), dtype=np.float32) - mean) / std).astype(np.float32)


def verify_bundle_graphs(model: RAMTagger, directory: Path, vocabulary: Vocabulary, tolerance: float) -> Verification:
    """Both graphs in onnxruntime (CPU) vs ``model`` in torch fp32, on two sample images and ``vocabulary``."""
    encoder = _session(directory / bf.ENCODER_FILE)
    decoder = _session(directory / bf.DECODER_FILE)

    pixels = sample_pixels(model.config.image_size)
    # Copies: the vocabulary's arrays are read-only, torch wants writable ones.
    label_embed = np.array(vocabulary.embeddings, dtype=np.float32)
    label_mask = np.array(vocabulary.mask)
    with torch.no_grad():
        ref_embeds = model.encode_image(torch.from_numpy(pixels))
        ref_logits = model.decode(ref_embeds, torch.from_numpy(label_embed), torch.from_numpy(label_mask)).numpy()
    embeds = encoder.run(None, {bf.PIXEL_VALUES: pixels})[0]
    logits = decoder.run(None, {bf.IMAGE_EMBEDS: embeds, bf.LABEL_EMBED: label_embed, bf.LABEL_MASK: label_mask})[0]
    if logits.shape != ref_logits.shape:
        raise RuntimeError(f"decoder returned logits of shape {logits.shape}, expected {ref_logits.shape}")

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))

    return Verification(
        image_embeds_max_abs_error=float(np.abs(embeds - ref_embeds.numpy()).max()),
        logits_max_abs_error=float(np.abs(logits - ref_logits).max()),
        probability_max_abs_error=float(np.abs(sigmoid(logits) - sigmoid(ref_logits)).max()),
        tolerance=tolerance,
        batch=pixels.shape[0],
        num_tags=len(vocabulary),
    )
