"""Swin Transformer image encoder, as in the RAM / RAM++ checkpoints (``visual_encoder.*``).

Follows ARCHITECTURE.md step by step. Written for export: the relative position bias is gathered from
its table once (after init and after every ``load_state_dict``), not on each forward, and the shifted
window masks are built once per stage; the batch dimension is never unrolled, and every shape the
tracer sees apart from the batch comes from the configuration.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SwinConfig

# Added to attention scores between tokens of different regions of a shifted window (upstream value).
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table; N = w*w, (dy, dx) = query minus key position."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C), windows in row-major order."""
    _, height, width, channels = x.shape
    x = x.reshape(-1, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, (height // window) * (width // window), window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B, nW, w*w, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, 1, N, N) additive mask: pairs of tokens from different regions of the rolled grid get -100."""
    labels = torch.zeros(1, height, width, 1)
    regions = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for rows in regions:
        for cols in regions:
            labels[:, rows, cols, :] = count
            count += 1
    windows = window_partition(labels, window).reshape(-1, window * window)  # (nW, N)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.where(different, SHIFT_MASK_VALUE, 0.0).unsqueeze(1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        # (heads, N, N), gathered from the table; kept in sync by refresh_bias() (see the load hook).
        self.register_buffer("relative_position_bias", torch.empty(0), persistent=False)
        self.refresh_bias()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_bias())

    @torch.no_grad()
    def refresh_bias(self) -> None:
        """Re-gather the bias from the table; call after changing the table in place."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        n = index.shape[0]
        self.relative_position_bias = table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, nW, N, C); mask: (nW, 1, N, N) or None."""
        num_windows, tokens, channels = x.shape[1], x.shape[2], x.shape[3]
        qkv = self.qkv(x).reshape(-1, num_windows, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, head_dim)
        scores = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias
        if mask is not None:
            scores = scores + mask
        out = scores.softmax(dim=-1) @ v  # (B, nW, heads, N, head_dim)
        return self.proj(out.transpose(2, 3).reshape(-1, num_windows, tokens, channels))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        res, window, shift = self.resolution, self.window, self.shift
        channels = x.shape[-1]
        h = self.norm1(x).reshape(-1, res, res, channels)
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, window), mask), window, res, res)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + h.reshape(-1, res * res, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours -> channels (order: [even,even], [odd,even], [even,odd], [odd,odd]), LN, Linear 4C->2C."""

    def __init__(self, dim: int, resolution: int, eps: float):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half, channels = self.resolution // 2, x.shape[-1]
        # (B, row/2, row%2, col/2, col%2, C) -> (B, row/2, col/2, col%2, row%2, C): one transpose gives the
        # upstream concatenation order x0 (r0,c0), x1 (r1,c0), x2 (r0,c1), x3 (r1,c1).
        x = x.reshape(-1, half, 2, half, 2, channels).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(-1, half * half, 4 * channels)))


class SwinStage(nn.Module):
    def __init__(self, config: SwinConfig, stage: int):
        super().__init__()
        dim, res, window = config.stage_dim(stage), config.stage_resolution(stage), config.stage_window(stage)
        # Windows as large as the grid cover it whole: nothing to shift (the last stage at 384).
        shift = window // 2 if res > config.window_size else 0
        self.blocks = nn.ModuleList(
            SwinBlock(dim, res, config.num_heads[stage], window, shift if j % 2 else 0, config.mlp_ratio, config.norm_eps)
            for j in range(config.depths[stage])
        )
        # One mask for all shifted blocks of the stage, built once.
        mask = shifted_window_mask(res, res, window, shift) if shift and config.depths[stage] > 1 else None
        self.register_buffer("shift_mask", mask, persistent=False)
        last = stage == config.num_stages - 1
        self.downsample = None if last else PatchMerging(dim, res, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self.shift_mask if block.shift else None)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pixel_values).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """pixels (B, 3, S, S) -> (B, 1 + (S/32)^2, C_out): the mean token, then the last stage's tokens."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.layers = nn.ModuleList(SwinStage(config, i) for i in range(config.num_stages))
        self.norm = nn.LayerNorm(config.num_features, eps=config.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
