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

from .graphs import sample_tag_prompts, sample_token_ids


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


@dataclass
class CaptionVerification:
    """The captioning graphs in onnxruntime against torch: the tag encoder on two tag prompts (one padded),
    then the text decoder as the runtime drives it (the prompt with an empty cache, then single tokens,
    each step fed the cache onnxruntime returned), on ``rows`` rows."""

    tag_states_max_abs_error: float
    cross_kv_max_abs_error: float
    step_logits_max_abs_error: float
    present_kv_max_abs_error: float
    tolerance: float
    steps: int
    rows: int
    reference: str = "torch fp32, same token ids"

    @property
    def passed(self) -> bool:
        return bool(self.step_logits_max_abs_error <= self.tolerance)

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
    per_tag = {name: np.array(array) for name, array in vocabulary.per_tag.items()}  # Tag2Text's classifier rows
    with torch.no_grad():
        ref_embeds = model.encode_image(torch.from_numpy(pixels))
        ref_logits = model.decode(ref_embeds, torch.from_numpy(label_embed), torch.from_numpy(label_mask),
                                  **{name: torch.from_numpy(array) for name, array in per_tag.items()}).numpy()
    embeds = encoder.run(None, {bf.PIXEL_VALUES: pixels})[0]
    logits = decoder.run(None, {bf.IMAGE_EMBEDS: embeds, bf.LABEL_EMBED: label_embed, bf.LABEL_MASK: label_mask,
                                **per_tag})[0]
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


def verify_caption_graphs(model: RAMTagger, directory: Path, tolerance: float, beams: int = 3,
                          steps: int = 4) -> CaptionVerification:
    """``tag_encoder.onnx`` and ``text_decoder.onnx`` in onnxruntime vs the model's captioning branch in
    torch: tag states and cross keys / values for 2 images, then ``steps`` decoder steps on 2 x ``beams``
    rows: the prompt with an empty cache (past length 0), then one token at a time, every step fed the
    cache that onnxruntime returned, as the runtime does (errors of earlier steps are included)."""
    caption = model.config.captioning
    tag_encoder = _session(directory / bf.TAG_ENCODER_FILE)
    text_decoder = _session(directory / bf.TEXT_DECODER_FILE)
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, model.config.swin.num_tokens, model.config.image_embed_dim, generator=generator)
    ids, mask = sample_tag_prompts(caption, (13, caption.tag_max_length), caption.tag_max_length, seed=3)
    with torch.no_grad():
        ref_states = model.encode_tags(embeds, ids, mask)
        ref_cross = model.text_decoder.cross_kv(ref_states)
    states, cross = tag_encoder.run(None, {bf.TAG_INPUT_IDS: ids.numpy(), bf.TAG_ATTENTION_MASK: mask.numpy(),
                                           bf.IMAGE_EMBEDS: embeds.numpy()})
    errors = {"states": float(np.abs(states - ref_states.numpy()).max()),
              "cross": float(np.abs(cross - ref_cross.numpy()).max()), "logits": 0.0, "present": 0.0}

    rows = 2 * beams
    cross = np.repeat(cross, beams, axis=2)
    ref_cross = ref_cross.repeat_interleave(beams, dim=2)
    text = caption.text_decoder
    past = np.zeros((text.num_layers, 2, rows, text.num_heads, 0, text.head_dim), dtype=np.float32)
    ref_past = torch.from_numpy(past)
    tokens = torch.tensor(caption.prompt_ids).repeat(rows, 1)
    for _ in range(steps):
        with torch.no_grad():
            ref_logits, ref_past = model.text_decoder.step(tokens, ref_cross, ref_past)
        logits, past = text_decoder.run(None, {bf.INPUT_IDS: tokens.numpy(), bf.CROSS_KV: cross, bf.PAST_KV: past})
        if logits.shape != tuple(ref_logits.shape) or past.shape != tuple(ref_past.shape):
            raise RuntimeError(f"text decoder returned {logits.shape} / {past.shape}, expected "
                               f"{tuple(ref_logits.shape)} / {tuple(ref_past.shape)}")
        errors["logits"] = max(errors["logits"], float(np.abs(logits - ref_logits.numpy()).max()))
        errors["present"] = max(errors["present"], float(np.abs(past - ref_past.numpy()).max()))
        tokens = torch.randint(1000, text.vocab_size - 2, (rows, 1), generator=generator)
    return CaptionVerification(errors["states"], errors["cross"], errors["logits"], errors["present"], tolerance,
                               steps, rows)
