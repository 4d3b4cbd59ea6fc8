"""Configurations of the RAM family and the named presets of the official checkpoints.

Everything a checkpoint's tensors cannot tell (image size, decoder heads, the tag list) is a field
here with the official default; ``ram_edge.models.checkpoint`` infers the rest from the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Tuple

from ram_edge.tags import OFFICIAL_NUM_TAGS

KINDS = ("ram_plus", "ram")


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
class RAMConfig:
    """A whole tagging model. ``kind`` is ``"ram_plus"`` (per-image reweighted descriptions) or ``"ram"``."""

    kind: str = "ram_plus"
    swin: SwinConfig = field(default_factory=SwinConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 512
    num_tags: int = OFFICIAL_NUM_TAGS
    descriptions_per_tag: int = 51
    variant: str = "custom"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"RAMConfig: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "ram" and self.descriptions_per_tag != 1:
            raise ValueError("RAMConfig: RAM has one embedding per tag (descriptions_per_tag=1)")

    @property
    def image_size(self) -> int:
        return self.swin.image_size

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
        return cls(swin=SwinConfig(**swin), decoder=DecoderConfig(**data.pop("decoder")), **data)

    def with_image_size(self, image_size: int) -> "RAMConfig":
        return replace(self, swin=replace(self.swin, image_size=image_size))


SWIN_L = SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
SWIN_B = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
# Small, fast model of the real shape family (the goldens' sizes): tests and quick demos.
SWIN_TINY = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
DECODER_TINY = DecoderConfig(hidden_size=64, num_heads=4, intermediate_size=128, num_layers=2)


def _preset(kind: str, swin: SwinConfig, size: int, name: str, decoder: DecoderConfig = DecoderConfig()) -> RAMConfig:
    window = 12 if size == 384 else 7
    return RAMConfig(
        kind=kind,
        swin=replace(swin, image_size=size, window_size=window),
        decoder=decoder,
        descriptions_per_tag=51 if kind == "ram_plus" else 1,
        variant=name,
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
    return presets


#: Official variants (``ram_plus_swin_l_384`` is ``ram_plus_swin_large_14m.pth``) and their 224 twins,
#: plus ``*_tiny_*``: the goldens' small sizes with the official vocabulary, for tests and quick demos.
PRESETS: Dict[str, RAMConfig] = _build_presets()


def preset(name: str) -> RAMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(sorted(PRESETS))}") from None
