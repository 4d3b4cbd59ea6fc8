"""Configurations of the RAM family and the named presets of the official checkpoints.

Everything a checkpoint's tensors cannot tell (image size, attention heads, the tag list, how upstream
generates captions) is a field here with the official default; ``ram_edge.models.checkpoint`` infers
the rest from the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Tuple

from ram_edge.tags import OFFICIAL_NUM_TAGS, TAG2TEXT_NUM_TAGS

#: ``ram_plus``: per-image reweighted descriptions; ``ram``: one CLIP embedding per tag; ``tag2text``:
#: a learned label table read by the tagging head as is, one classifier row per tag, and captions.
KINDS = ("ram_plus", "ram", "tag2text")


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer image encoder (``visual_encoder.*``), as in the RAM checkpoints."""

    image_size: int = 384
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depths: Tuple[int, ...] = (2, 2, 18, 2)
    num_heads: Tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"SwinConfig: {len(self.depths)} stage depths but {len(self.num_heads)} head counts")
        grid = self.image_size // self.patch_size
        if grid * self.patch_size != self.image_size:
            raise ValueError(f"SwinConfig: image_size {self.image_size} is not a multiple of patch {self.patch_size}")
        for stage in range(self.num_stages):
            res = self.stage_resolution(stage)
            window = self.stage_window(stage)
            if res % window:
                raise ValueError(
                    f"SwinConfig: image_size {self.image_size} gives a {res}x{res} token grid at stage {stage}, "
                    f"not divisible by window {window}; the official models use 384 with window 12 or 224 with window 7"
                )
            if stage < self.num_stages - 1 and res % 2:
                raise ValueError(f"SwinConfig: stage {stage} grid {res} is odd, patch merging needs it even")
        for stage, heads in enumerate(self.num_heads):
            if self.stage_dim(stage) % heads:
                raise ValueError(f"SwinConfig: stage {stage} width {self.stage_dim(stage)} not divisible by {heads} heads")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> int:
        return self.image_size // self.patch_size // 2**stage

    def stage_window(self, stage: int) -> int:
        # A window never exceeds the grid: where it would, it covers the whole grid and never shifts.
        return min(self.window_size, self.stage_resolution(stage))

    @property
    def num_features(self) -> int:
        return self.stage_dim(self.num_stages - 1)

    @property
    def num_tokens(self) -> int:
        """Output tokens: the global (mean) token plus the last stage's grid."""
        return 1 + self.stage_resolution(self.num_stages - 1) ** 2


@dataclass(frozen=True)
class DecoderConfig:
    """The alignment decoder (``tagging_head``): BERT-style cross-attention layers, post-LayerNorm."""

    hidden_size: int = 768
    num_heads: int = 4
    intermediate_size: int = 3072
    num_layers: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DecoderConfig: hidden {self.hidden_size} not divisible by {self.num_heads} heads")


@dataclass(frozen=True)
class TextConfig:
    """One BERT of the captioning branch (upstream's ``med_config.json``): the tag encoder or the text decoder.

    ``encoder_width`` is the width of the states its cross-attention reads: the image embeddings for
    the tag encoder, the tag encoder's output for the text decoder. The head count is not in the weights.
    """

    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 12
    vocab_size: int = 30524  # bert-base-uncased's 30,522 + [DEC] + [ENC]
    max_positions: int = 512
    encoder_width: int = 768
    norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TextConfig: hidden {self.hidden_size} not divisible by {self.num_heads} heads "
                "(the heads are not in the weights: the official models have 12)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class CaptionConfig:
    """The captioning branch (``tag_encoder.*``, ``text_decoder.*``) and how upstream's
    ``Tag2Text.generate`` drives it: token ids of its tokenizer and the search defaults.

    ``prompt_ids`` is ``tokenizer("a picture of ")`` with [CLS] replaced by [DEC] and [SEP] dropped; the
    tag encoder's input is the predicted tags joined with " | ", padded to ``tag_max_length``, with
    [ENC] in place of [CLS]. ``max_length`` and ``min_length`` count the prompt tokens; [SEP] ends a
    caption and is blocked while the sequence is shorter than ``min_length``.
    """

    tag_encoder: TextConfig = field(default_factory=TextConfig)
    text_decoder: TextConfig = field(default_factory=TextConfig)
    #: The LM head's projection is the text decoder's word-embedding table (upstream ties them).
    tie_word_embeddings: bool = True
    prompt: str = "a picture of "
    prompt_ids: Tuple[int, ...] = (30522, 1037, 3861, 1997)
    bos_token_id: int = 30522  # [DEC]
    enc_token_id: int = 30523  # [ENC]
    eos_token_id: int = 102  # [SEP]
    pad_token_id: int = 0  # [PAD]
    tag_max_length: int = 40
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 10

    def __post_init__(self):
        encoder, decoder = self.tag_encoder, self.text_decoder
        if decoder.encoder_width != encoder.hidden_size:
            # Upstream's RAM builds its text decoder from med_config.json with encoder_width 768 whatever
            # the hidden size: a shrunken RAM (like golden/ram_tiny_224.pth) cannot run generation.
            raise ValueError(
                f"CaptionConfig: the text decoder's cross-attention reads {decoder.encoder_width}-wide states "
                f"but the tag encoder emits {encoder.hidden_size}-wide ones; upstream's caption generation "
                "cannot run on these weights"
            )
        if not self.prompt_ids or self.prompt_ids[0] != self.bos_token_id:
            raise ValueError(f"CaptionConfig: prompt_ids {self.prompt_ids} must start with [DEC] ({self.bos_token_id})")
        if not len(self.prompt_ids) < self.min_length <= self.max_length <= decoder.max_positions:
            raise ValueError(
                f"CaptionConfig: need len(prompt_ids) {len(self.prompt_ids)} < min_length {self.min_length} <= "
                f"max_length {self.max_length} <= the decoder's {decoder.max_positions} positions"
            )
        if self.tag_max_length > encoder.max_positions:
            raise ValueError(f"CaptionConfig: tag_max_length {self.tag_max_length} > {encoder.max_positions} positions")
        ids = (*self.prompt_ids, self.bos_token_id, self.enc_token_id, self.eos_token_id, self.pad_token_id)
        if not all(0 <= i < min(encoder.vocab_size, decoder.vocab_size) for i in ids):
            raise ValueError(f"CaptionConfig: token ids {ids} outside the vocabularies of the tag encoder / text decoder")
        if self.num_beams < 1:
            raise ValueError(f"CaptionConfig: num_beams must be at least 1, got {self.num_beams}")

    @classmethod
    def from_dict(cls, data: dict) -> "CaptionConfig":
        data = dict(data)
        return cls(
            tag_encoder=TextConfig(**data.pop("tag_encoder")),
            text_decoder=TextConfig(**data.pop("text_decoder")),
            prompt_ids=tuple(data.pop("prompt_ids")),
            **data,
        )


def official_captioning(image_embed_dim: int) -> CaptionConfig:
    """The official captioning branch (12 + 12 layers of BERT-base) over image embeddings of this width."""
    return CaptionConfig(tag_encoder=TextConfig(encoder_width=image_embed_dim), text_decoder=TextConfig(encoder_width=768))


@dataclass(frozen=True)
class RAMConfig:
    """A whole model of the family: ``kind`` (see ``KINDS``), its tagging path and optionally its
    captioning branch. ``embed_dim`` is the width of a tag embedding (``label_embed`` rows)."""

    kind: str = "ram_plus"
    swin: SwinConfig = field(default_factory=SwinConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 512
    num_tags: int = OFFICIAL_NUM_TAGS
    descriptions_per_tag: int = 51
    variant: str = "custom"
    captioning: Optional[CaptionConfig] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"RAMConfig: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "ram" and self.descriptions_per_tag != 1:
            raise ValueError("RAMConfig: RAM has one embedding per tag (descriptions_per_tag=1)")
        if self.kind == "tag2text" and self.embed_dim != self.decoder.hidden_size:
            raise ValueError(
                f"RAMConfig: Tag2Text feeds its label embeddings to the tagging head as is, so embed_dim "
                f"{self.embed_dim} must equal the head's hidden size {self.decoder.hidden_size}"
            )
        if self.captioning is not None:
            self._check_captioning(self.captioning)

    def _check_captioning(self, captioning: CaptionConfig) -> None:
        if self.kind == "ram_plus":
            raise ValueError("RAMConfig: RAM++ has no captioning branch")
        encoder, decoder = captioning.tag_encoder, self.decoder
        if encoder.encoder_width != self.image_embed_dim:
            raise ValueError(
                f"RAMConfig: the tag encoder's cross-attention reads {encoder.encoder_width}-wide states, "
                f"the image embeddings are {self.image_embed_dim} wide"
            )
        # Upstream ties the tagging head's layers to the tag encoder's first layers (same tensors).
        if (decoder.hidden_size, decoder.intermediate_size) != (encoder.hidden_size, encoder.intermediate_size) or (
            decoder.num_layers > encoder.num_layers
        ):
            raise ValueError(
                f"RAMConfig: the tagging head ({decoder.num_layers} layers, {decoder.hidden_size}/"
                f"{decoder.intermediate_size}) must match the tag encoder's first layers "
                f"({encoder.num_layers} layers, {encoder.hidden_size}/{encoder.intermediate_size}): they share weights"
            )

    @property
    def image_size(self) -> int:
        return self.swin.image_size

    @property
    def image_embed_dim(self) -> int:
        """Width of ``encode_image``'s output: Swin's own for Tag2Text (no ``image_proj``), else ``embed_dim``."""
        return self.swin.num_features if self.kind == "tag2text" else self.embed_dim

    @property
    def label_rows(self) -> int:
        return self.num_tags * self.descriptions_per_tag

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RAMConfig":
        data = dict(data)
        swin = dict(data.pop("swin"))
        for key in ("depths", "num_heads"):
            swin[key] = tuple(swin[key])
        captioning = data.pop("captioning", None)
        return cls(
            swin=SwinConfig(**swin),
            decoder=DecoderConfig(**data.pop("decoder")),
            captioning=None if captioning is None else CaptionConfig.from_dict(captioning),
            **data,
        )

    def with_image_size(self, image_size: int) -> "RAMConfig":
        return replace(self, swin=replace(self.swin, image_size=image_size))


SWIN_L = SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
SWIN_B = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
# Small, fast model of the real shape family (the goldens' sizes): tests and quick demos.
SWIN_TINY = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
DECODER_TINY = DecoderConfig(hidden_size=64, num_heads=4, intermediate_size=128, num_layers=2)
# golden/tag2text_tiny_384's sizes: Swin width 16 -> 128, tagging head and BERTs 32 wide, 4 heads, 2 layers.
SWIN_TAG2TEXT_TINY = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
DECODER_TAG2TEXT_TINY = DecoderConfig(hidden_size=32, num_heads=4, intermediate_size=128, num_layers=2)
TEXT_TAG2TEXT_TINY = TextConfig(hidden_size=32, num_heads=4, intermediate_size=128, num_layers=2)


def _preset(kind: str, swin: SwinConfig, size: int, name: str, decoder: DecoderConfig = DecoderConfig()) -> RAMConfig:
    window = 12 if size == 384 else 7
    return RAMConfig(
        kind=kind,
        swin=replace(swin, image_size=size, window_size=window),
        decoder=decoder,
        descriptions_per_tag=51 if kind == "ram_plus" else 1,
        variant=name,
    )


def _tag2text_preset(swin: SwinConfig, decoder: DecoderConfig, text: TextConfig, name: str) -> RAMConfig:
    swin = replace(swin, image_size=384, window_size=12)
    captioning = CaptionConfig(
        tag_encoder=replace(text, encoder_width=swin.num_features),
        text_decoder=replace(text, encoder_width=text.hidden_size),
    )
    return RAMConfig(
        kind="tag2text",
        swin=swin,
        decoder=decoder,
        embed_dim=decoder.hidden_size,
        num_tags=TAG2TEXT_NUM_TAGS,
        descriptions_per_tag=1,
        variant=name,
        captioning=captioning,
    )


def _build_presets() -> Dict[str, RAMConfig]:
    presets = {}
    for kind, prefix in (("ram_plus", "ram_plus"), ("ram", "ram")):
        for swin, width in ((SWIN_L, "l"), (SWIN_B, "b")):
            for size in (384, 224):
                name = f"{prefix}_swin_{width}_{size}"
                presets[name] = _preset(kind, swin, size, name)
        for size in (384, 224):
            name = f"{prefix}_tiny_{size}"
            presets[name] = _preset(kind, SWIN_TINY, size, name, DECODER_TINY)
    presets["tag2text_swin_b_384"] = _tag2text_preset(SWIN_B, DecoderConfig(), TextConfig(), "tag2text_swin_b_384")
    presets["tag2text_tiny_384"] = _tag2text_preset(
        SWIN_TAG2TEXT_TINY, DECODER_TAG2TEXT_TINY, TEXT_TAG2TEXT_TINY, "tag2text_tiny_384"
    )
    return presets


#: Official variants (``ram_plus_swin_l_384`` is ``ram_plus_swin_large_14m.pth``, ``tag2text_swin_b_384``
#: is ``tag2text_swin_14m.pth``) and the RAM / RAM++ 224 twins, plus ``*_tiny_*``: the goldens' small
#: sizes with the official vocabulary, for tests and quick demos. RAM presets describe the tagging path
#: only (``captioning=None``); ``official_captioning`` adds RAM's captioning branch.
PRESETS: Dict[str, RAMConfig] = _build_presets()


def preset(name: str) -> RAMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(sorted(PRESETS))}") from None
