"""OpenAI CLIP's text transformer: the tower that turns words into the tag embeddings of RAM / RAM++.

Read like ``clip/model.py`` (``CLIP.encode_text``)::

    x = token_embedding(ids) + positional_embedding[:L]
    for each block:  x = x + attn(ln_1(x), causal mask);  x = x + mlp(ln_2(x))   (pre-LN, QuickGELU)
    x = ln_final(x)
    text_embeds = x[arange(N), ids.argmax(-1)] @ text_projection      (pooled at the end-of-text token)

Our module keeps OpenAI's key layout (``token_embedding.weight``, ``transformer.resblocks.{i}.attn.in_proj_weight``,
``ln_final``, ``text_projection``...), so OpenAI state dicts load unchanged; :func:`clip_text_state_dict`
maps the other layouts users have (the TorchScript ``ViT-B-16.pt``, open_clip, Hugging Face
``CLIPTextModelWithProjection``) onto it, the way timm's ``checkpoint_filter_fn`` does.

Written for export: the sequence length L is whatever the input has (<= context length), the causal
mask is built from L, so a batch can be cut to its longest sequence. That is exact: with the causal
mask, tokens after the end-of-text token never reach the pooled output.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

ACTIVATIONS = ("quick_gelu", "gelu")
#: OpenAI's rule for the number of heads (``clip.model.build_model``): right for every published CLIP.
HEAD_WIDTH = 64


@dataclass(frozen=True)
class ClipTextConfig:
    """The text tower. Everything but ``heads`` and ``activation`` is read off the weights."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_width: int = 2048
    embed_dim: int = 512
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    variant: str = "custom"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ClipTextConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(
                f"ClipTextConfig: width {self.width} is not divisible by {self.heads} heads "
                f"(OpenAI's rule is width // {HEAD_WIDTH}; pass the right number of heads)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


#: ``clip_vit_b_16``: the text tower of OpenAI's ViT-B/16, the one RAM and RAM++ were trained against.
#: ``clip_tiny``: the golden's size (width 64, 2 layers), for tests and quick demos.
TEXT_PRESETS: Dict[str, ClipTextConfig] = {
    "clip_vit_b_16": ClipTextConfig(variant="clip_vit_b_16"),
    "clip_tiny": ClipTextConfig(width=64, layers=2, heads=2, mlp_width=256, variant="clip_tiny"),
}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (open_clip's non-OpenAI models use exact GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed ``in_proj``), computed without it: a plain graph."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """x (N, L, W); future (L, L) bool, true where the key comes after the query."""
        n, length, width = x.shape
        head_dim = width // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(n, length, 3, self.heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = Mlp(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), future)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class ClipTextModel(nn.Module):
    """input_ids (N, L) int64, L <= context_length -> text_embeds (N, embed_dim), as ``encode_text``
    returns them (not normalised). ``logit_scale`` (CLIP's learned temperature, exp'ed) is kept from the
    checkpoint when it has one, for zero-shot classification."""

    def __init__(self, config: ClipTextConfig, logit_scale: float = 100.0):
        super().__init__()
        self.config = config
        self.logit_scale = float(logit_scale)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        positions = torch.arange(length, device=input_ids.device)
        future = positions[None, :] > positions[:, None]  # (L, L): key after query
        for block in self.transformer.resblocks:
            x = block(x, future)
        x = self.ln_final(x)
        # The end-of-text token has the largest id; argmax gives its (first) position, as CLIP pools.
        eot = input_ids.argmax(dim=-1)
        pooled = x.gather(1, eot[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        return pooled @ self.text_projection


# ------------------------------------------------------------------------------------------------------
# Checkpoint layouts


class ClipCheckpointError(ValueError):
    """A text checkpoint that cannot be loaded; the message names the file and the problem."""


#: Keys of the image tower and other parts of a full CLIP checkpoint that the text tower ignores.
_IGNORED_PREFIXES = ("visual.", "vision_model.", "visual_projection.")
_IGNORED_KEYS = {"logit_scale", "input_resolution", "context_length", "vocab_size", "logit_bias",
                 "text_model.embeddings.position_ids", "attn_mask"}


def detect_layout(keys) -> str:
    """"openai" (OpenAI / open_clip key names), "open_clip_text" (open_clip's CustomTextCLIP: ``text.``
    prefix) or "hf" (Hugging Face ``CLIPTextModel(WithProjection)`` / ``CLIPModel``)."""
    keys = set(keys)
    if "token_embedding.weight" in keys:
        return "openai"
    if "text.token_embedding.weight" in keys:
        return "open_clip_text"
    if "text_model.embeddings.token_embedding.weight" in keys:
        return "hf"
    return "unknown"


def _strip_prefixes(state_dict: StateDict) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _from_hf(state_dict: StateDict) -> StateDict:
    """Hugging Face CLIP text keys -> OpenAI's (q/k/v packed into in_proj, projection transposed)."""
    out: StateDict = {}
    prefix = "text_model."
    layer_re = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)$")
    per_layer: Dict[int, Dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for key, value in state_dict.items():
        m = layer_re.match(key)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key.startswith(prefix) and key[len(prefix):] in simple:
            out[simple[key[len(prefix):]]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        else:
            out[key] = value  # reported as unexpected unless ignored
    for i, tensors in per_layer.items():
        base = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            parts = [tensors.pop(f"self_attn.{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                out[base + f"attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        for key, value in tensors.items():
            for old, new in renames.items():
                if key.startswith(old + "."):
                    key = new + key[len(old):]
                    break
            out[base + key] = value
    return out


def clip_text_state_dict(state_dict: StateDict, source: str = "checkpoint") -> Tuple[StateDict, Dict[str, object]]:
    """The text tower's tensors in OpenAI's layout, and what was found besides (layout, logit_scale,
    ignored key count). Raises :class:`ClipCheckpointError` when this is no CLIP text checkpoint."""
    state_dict = _strip_prefixes(state_dict)
    layout = detect_layout(state_dict)
    if layout == "unknown":
        sample = ", ".join(sorted(state_dict)[:5])
        raise ClipCheckpointError(
            f"{source}: not a CLIP text encoder (no token_embedding.weight, text.token_embedding.weight or "
            f"text_model.embeddings.token_embedding.weight; keys start {sample}). Pass OpenAI's ViT-B-16.pt, "
            "an open_clip checkpoint or Hugging Face openai/clip-vit-base-patch16 (model.safetensors)."
        )
    info: Dict[str, object] = {"layout": layout}
    scale = state_dict.get("logit_scale")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        info["logit_scale"] = float(scale.float().exp())
    if layout == "open_clip_text":
        state_dict = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state_dict.items()}
        if "text_projection.weight" in state_dict:  # open_clip with a Linear projection
            state_dict["text_projection"] = state_dict.pop("text_projection.weight").t().contiguous()
    elif layout == "hf":
        state_dict = _from_hf(state_dict)
    text: StateDict = {}
    ignored = 0
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES) or key in _IGNORED_KEYS or key.endswith(".attn_mask"):
            ignored += 1
            continue
        text[key] = value
    info["ignored_keys"] = ignored
    return text, info


def infer_text_config(state_dict: StateDict, *, heads: Optional[int] = None, activation: str = "quick_gelu",
                      source: str = "checkpoint") -> ClipTextConfig:
    """The tower's shape from its tensors (OpenAI layout); ``heads`` defaults to width // 64."""

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ClipCheckpointError(f"{source}: missing key {key!r}; the file is truncated or not a CLIP text tower")
        return state_dict[key]

    vocab_size, width = need("token_embedding.weight").shape
    context_length = need("positional_embedding").shape[0]
    projection = need("text_projection")
    if projection.ndim != 2 or projection.shape[0] != width:
        raise ClipCheckpointError(f"{source}: text_projection has shape {tuple(projection.shape)}, expected ({width}, E)")
    block_re = re.compile(r"transformer\.resblocks\.(\d+)\.")
    layers = sorted({int(m.group(1)) for m in map(block_re.match, state_dict) if m})
    if not layers or layers != list(range(len(layers))):
        raise ClipCheckpointError(f"{source}: cannot find the transformer blocks transformer.resblocks.<i>")
    mlp_width = need("transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    if heads is None:
        heads = max(1, width // HEAD_WIDTH)
    try:
        return ClipTextConfig(
            vocab_size=int(vocab_size), context_length=int(context_length), width=int(width), layers=len(layers),
            heads=int(heads), mlp_width=int(mlp_width), embed_dim=int(projection.shape[1]), activation=activation,
        )
    except ValueError as e:
        raise ClipCheckpointError(f"{source}: {e}") from e


def _hf_config_beside(path: Path) -> Dict[str, object]:
    """Hugging Face keeps heads and activation in config.json next to the weights; read them if present."""
    config_path = path.with_name("config.json")
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text = config.get("text_config", config) if isinstance(config, dict) else {}
    return text if isinstance(text, dict) else {}


def match_text_preset(config: ClipTextConfig) -> str:
    for name, candidate in TEXT_PRESETS.items():
        if replace(candidate, variant=config.variant) == config:
            return name
    return "custom"


def load_clip_text(
    path: PathLike, *, heads: Optional[int] = None, activation: Optional[str] = None
) -> ClipTextModel:
    """The CLIP text tower in ``path``, in eval mode, float32.

    Reads OpenAI's TorchScript ``ViT-B-16.pt`` (tensors only: no pickled or TorchScript code runs), a
    state dict in OpenAI / open_clip layout (``.pt``/``.pth``/``.bin``, ``.safetensors``) and Hugging Face
    ``CLIPTextModelWithProjection`` / ``CLIPModel`` safetensors. ``heads`` is not in the weights: default
    width // 64 (OpenAI's rule; a Hugging Face ``config.json`` beside the file is read when present).
    ``activation``: "quick_gelu" (OpenAI's models, default) or "gelu" (open_clip's own trainings).
    """
    from .checkpoint import CheckpointError, read_state_dict, state_dict_problems

    path = Path(path)
    source = str(path)
    try:
        raw = read_state_dict(path)
    except CheckpointError as e:
        raise ClipCheckpointError(str(e)) from e
    state_dict, info = clip_text_state_dict(raw, source)
    if info["layout"] == "hf":
        hf = _hf_config_beside(path)
        if heads is None and isinstance(hf.get("num_attention_heads"), int):
            heads = hf["num_attention_heads"]
        if activation is None and hf.get("hidden_act") in ACTIVATIONS:
            activation = str(hf["hidden_act"])
    config = infer_text_config(state_dict, heads=heads, activation=activation or "quick_gelu", source=source)
    config = replace(config, variant=match_text_preset(config))
    model = ClipTextModel(config, logit_scale=float(info.get("logit_scale", 100.0)))
    problems = state_dict_problems(model.state_dict(), state_dict)
    if problems:
        raise ClipCheckpointError(f"{source}: does not match a CLIP text tower: " + " | ".join(problems))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    model.source = path.name
    model.layout = str(info["layout"])
    log.info("%s: CLIP text tower (%s layout) width %d, %d layers, %d heads, embed %d; %d other keys ignored",
             path.name, info["layout"], config.width, config.layers, config.heads, config.embed_dim,
             info["ignored_keys"])
    return model.eval()


@torch.no_grad()
def demo_clip_text(config: Union[str, ClipTextConfig] = "clip_vit_b_16", seed: int = 0) -> ClipTextModel:
    """Seeded random weights with CLIP's own initialisation (``CLIP.initialize_parameters``), eval mode."""
    if isinstance(config, str):
        try:
            config = TEXT_PRESETS[config]
        except KeyError:
            raise KeyError(f"unknown text encoder preset {config!r}; known: {', '.join(TEXT_PRESETS)}") from None
    model = ClipTextModel(config)
    generator = torch.Generator().manual_seed(seed)
    width, layers = config.width, config.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    stds = {
        "token_embedding.weight": 0.02,
        "positional_embedding": 0.01,
        "text_projection": width**-0.5,
    }
    for name, param in model.named_parameters():
        if name in stds:
            std = stds[name]
        elif name.endswith("in_proj_weight"):
            std = attn_std
        elif name.endswith(("out_proj.weight", "c_proj.weight")):
            std = proj_std
        elif name.endswith("c_fc.weight"):
            std = fc_std
        elif name.endswith("weight") and param.ndim == 1:  # LayerNorm
            param.fill_(1.0)
            continue
        else:  # biases
            param.zero_()
            continue
        param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.source = f"demo:{config.variant}:seed={seed}"
    model.layout = "demo"
    return model.eval()


def text_config_summary(model: ClipTextModel) -> Dict[str, object]:
    """What the bundle manifest records about the tower."""
    config = model.config
    return {
        **config.to_dict(),
        "source": getattr(model, "source", "unknown"),
        "layout": getattr(model, "layout", "unknown"),
        "logit_scale": model.logit_scale,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


__all__: List[str] = [
    "ACTIVATIONS", "ClipCheckpointError", "ClipTextConfig", "ClipTextModel", "TEXT_PRESETS", "clip_text_state_dict",
    "demo_clip_text", "detect_layout", "infer_text_config", "load_clip_text", "match_text_preset",
    "text_config_summary",
]
