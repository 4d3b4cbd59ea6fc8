"""The torch model definitions: golden parity with the upstream implementation, the exported split
(``encode_image`` / ``decode``), vocabulary independence, demo weights and the Swin details.

All on tiny models (the goldens' sizes): a few seconds on two CPU cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ram_edge.models import SwinConfig, SwinTransformer, demo_model, load_checkpoint, preset
from ram_edge.models.swin import SHIFT_MASK_VALUE, WindowAttention, relative_position_index, shifted_window_mask
from ram_edge.models.tagging import PADDING_SCORE

try:
    from _shared import golden_paths, needs_shared
except ImportError:  # tests/ imported as a package
    from tests._shared import golden_paths, needs_shared

GOLDENS = ("ram_plus_tiny_384", "ram_tiny_224")
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    """name -> (model loaded from golden/<name>.pth, npz arrays as tensors, golden json)."""
    cache = {}

    def get(name):
        if name not in cache:
            pth, npz, js = golden_paths(name)
            meta = json.loads(js.read_text())
            model = load_checkpoint(pth, tags=[f"t{i}" for i in range(meta["num_tags"])])
            arrays = {k: torch.from_numpy(v) for k, v in np.load(npz).items()}
            with torch.no_grad():  # computed once per module: the encoder is most of the test time
                arrays["our_embeds"] = model.encode_image(arrays["pixel_values"])
                arrays["our_logits"] = model(arrays["pixel_values"])
            cache[name] = (model, arrays, meta)
        return cache[name]

    return get


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


# -- 1. golden parity ------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", GOLDENS)
def test_golden_image_embeds_and_logits(golden, name):
    model, g, meta = golden(name)
    assert model.config.kind == meta["kind"]
    assert model.config.image_size == meta["image_size"]
    assert tuple(g["pixel_values"].shape) == tuple(meta["shapes"]["pixel_values"])
    embeds, logits = g["our_embeds"], g["our_logits"]
    assert embeds.dtype == torch.float32 and logits.dtype == torch.float32
    assert tuple(embeds.shape) == tuple(meta["shapes"]["image_embeds"])
    assert tuple(logits.shape) == tuple(meta["shapes"]["logits"])
    assert max_err(embeds, g["image_embeds"]) <= TOL
    assert max_err(logits, g["logits"]) <= TOL
    # Not trivially small numbers: the golden logits spread, so matching them means something.
    assert g["logits"].std().item() > 0.05


@needs_shared
def test_golden_ram_plus_reweights_three_descriptions(golden):
    model, g, meta = golden("ram_plus_tiny_384")
    assert meta["descriptions_per_tag"] == 3
    assert model.config.descriptions_per_tag == 3 and model.config.num_tags == 16
    assert tuple(model.label_embed.shape) == (48, 512) == tuple(g["label_embed"].shape)
    assert max_err(model.label_embed.detach(), g["label_embed"]) == 0.0
    embeds = g["our_embeds"]
    with torch.no_grad():
        label = g["label_embed"].reshape(16, 3, 512)
        per_tag = model.tag_embeddings(embeds, label, torch.ones(16, 3, dtype=torch.bool))
        # Reweighting by hand: softmax over the 3 descriptions of exp(scale) * cos(global token, row).
        cls = torch.nn.functional.normalize(embeds[:, 0], dim=-1)
        weights = (model.reweight_scale.exp() * torch.einsum("be,tde->btd", cls, label)).softmax(-1)
        expected = torch.einsum("btd,tde->bte", weights, label)
    assert per_tag.shape == (2, 16, 512)
    assert max_err(per_tag, expected) <= 1e-5
    # The weights depend on the image and are not uniform (else D=3 would collapse to a mean).
    assert (weights[0] - weights[1]).abs().max() > 1e-4
    assert (weights - 1 / 3).abs().max() > 1e-3


@needs_shared
@pytest.mark.parametrize("name", GOLDENS)
def test_decode_with_golden_label_embed_equals_forward(golden, name):
    model, g, meta = golden(name)
    t, d = meta["num_tags"], meta["descriptions_per_tag"]
    with torch.no_grad():
        logits = model.decode(g["our_embeds"], g["label_embed"].reshape(t, d, -1), torch.ones(t, d, dtype=torch.bool))
    forward = g["our_logits"]
    assert max_err(logits, forward) <= 1e-6
    assert max_err(logits, g["logits"]) <= TOL


# -- 6. demo weights and vocabulary independence ---------------------------------------------------


def test_demo_weights_are_seeded():
    a, b = demo_model("ram_tiny_224", seed=3, num_tags=20), demo_model("ram_tiny_224", seed=3, num_tags=20)
    c = demo_model("ram_tiny_224", seed=4, num_tags=20)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    same = [k for k in sa if torch.equal(sa[k], sc[k])]
    assert not same, f"identical under another seed: {same}"
    assert not torch.equal(a.label_embed, c.label_embed)
    assert not a.training


@pytest.mark.parametrize("name", ["ram_plus_tiny_384", "ram_tiny_224"])
def test_demo_label_embed_rows_unit_norm(name):
    model = demo_model(name, num_tags=20)
    config = model.config
    assert model.label_embed.shape == (20 * config.descriptions_per_tag, config.embed_dim)
    norms = model.label_embed.detach().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert len(model.tags) == 20 and model.tags.names[:2] == ["tag_0", "tag_1"]


@pytest.fixture(scope="module")
def demo_models():
    """name -> (demo model with 20 tags, two random images, their image_embeds): encoded once per module."""
    out = {}
    for name in ("ram_plus_tiny_384", "ram_tiny_224"):
        model = demo_model(name, seed=0, num_tags=20)
        px = _pixels(model, 2)
        with torch.no_grad():
            out[name] = (model, px, model.encode_image(px))
    return out


def _pixels(model, batch, seed=0):
    size = model.config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ram_plus_tiny_384", "ram_tiny_224"])
def test_demo_forward_finite_and_batch_not_looped(demo_models, name):
    model, px, embeds = demo_models[name]
    with torch.no_grad():
        both = model.decode(embeds, *model.default_vocabulary())
        singles = torch.cat([model(px[:1]), model(px[1:])])
    assert both.shape == (2, 20)
    assert torch.isfinite(both).all()
    assert embeds.shape == (2, model.config.swin.num_tokens, model.config.embed_dim)
    assert max_err(both, singles) <= 1e-5
    # The two images give different logits (the batch rows are not mixed up or broadcast).
    assert (both[0] - both[1]).abs().max() > 1e-3
    # Tags get different scores (the queries are not collapsed to one).
    assert both.std(dim=1).min() > 0.05


@pytest.mark.parametrize("name", ["ram_plus_tiny_384", "ram_tiny_224"])
def test_tag_independence_subset_equals_full(demo_models, name):
    model, _, embeds = demo_models[name]
    subset = torch.tensor([17, 3, 11, 0])
    with torch.no_grad():
        label, mask = model.default_vocabulary()
        full = model.decode(embeds, label, mask)
        alone = model.decode(embeds, label[subset], mask[subset])
        one = model.decode(embeds, label[5:6], mask[5:6])
    assert alone.shape == (2, 4)
    assert max_err(alone, full[:, subset]) <= 1e-5
    assert max_err(one, full[:, 5:6]) <= 1e-5


@pytest.mark.parametrize("name", ["ram_plus_tiny_384", "ram_tiny_224"])
def test_padding_rows_change_nothing(demo_models, name):
    model, _, embeds = demo_models[name]
    with torch.no_grad():
        label, mask = model.default_vocabulary()
        t, d, e = label.shape
        reference = model.decode(embeds, label, mask)
        # Grow D by 3 with masked-out rows: zeros, and for tag 1 one row of large values (the mask
        # must remove it, not merely its being zero).
        padded = torch.zeros(t, d + 3, e)
        padded[:, :d] = label
        padded[1, d + 1] = 5.0
        padded_mask = torch.zeros(t, d + 3, dtype=torch.bool)
        padded_mask[:, :d] = True
        padded_logits = model.decode(embeds, padded, padded_mask)
    assert padded_logits.shape == reference.shape == (2, t)
    assert max_err(padded_logits, reference) <= 1e-6


def test_padding_score_underflows_to_zero():
    # The masked rows' softmax weight must be exactly zero in fp32 even against the lowest real score.
    real = -torch.tensor(1 / 0.07)  # exp(scale) * cosine, cosine = -1 at worst
    weights = torch.stack([real, torch.tensor(PADDING_SCORE)]).softmax(0)
    assert weights[1].item() == 0.0
    assert torch.isfinite(torch.tensor(PADDING_SCORE).half())


def test_ram_plus_mixed_description_counts(demo_models):
    """RAM++ open-set vocabularies: tags with different D in one (T, Dmax, E) block with a mask."""
    model, _, embeds = demo_models["ram_plus_tiny_384"]
    rows = torch.nn.functional.normalize(torch.randn(2, 4, 512, generator=torch.Generator().manual_seed(9)), dim=-1)
    with torch.no_grad():
        tag_a = model.decode(embeds, rows[0:1, :2], torch.ones(1, 2, dtype=torch.bool))  # D = 2
        tag_b = model.decode(embeds, rows[1:2], torch.ones(1, 4, dtype=torch.bool))  # D = 4
        block = rows.clone()
        block[0, 2:] = 0
        mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
        both = model.decode(embeds, block, mask)
    # Same math, different GEMM shapes: float32 kernels may round differently (1.2e-6 seen on logits ~2.7,
    # ~5 ulp), so the bound is the vocabulary-composition bound used elsewhere, 1e-5.
    assert max_err(both, torch.cat([tag_a, tag_b], dim=1)) <= 1e-5


# -- 7. Swin specifics -----------------------------------------------------------------------------


def test_relative_position_index_window_2():
    # Window positions (row, col): 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1); index = (dy+1)*3 + (dx+1),
    # (dy, dx) = query - key.
    expected = torch.tensor(
        [
            [4, 3, 1, 0],
            [5, 4, 2, 1],
            [7, 6, 4, 3],
            [8, 7, 5, 4],
        ]
    )
    assert torch.equal(relative_position_index(2), expected)
    # Window 12: 144 x 144, covers the whole 23 x 23 table, centre on the diagonal.
    big = relative_position_index(12)
    assert big.shape == (144, 144)
    assert big.min() == 0 and big.max() == 23 * 23 - 1
    assert (big.diagonal() == 11 * 23 + 11).all()


def test_shift_mask_4x4_window_2_shift_1():
    # Region labels of the 4x4 grid (rows / cols sliced [0,2), [2,3), [3,4)):
    #   0 0 1 2
    #   0 0 1 2
    #   3 3 4 5
    #   6 6 7 8
    # windows (row-major): [0,0,0,0], [1,2,1,2], [3,3,6,6], [4,5,7,8]
    m = SHIFT_MASK_VALUE
    expected = torch.tensor(
        [
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0, m, 0, m], [m, 0, m, 0], [0, m, 0, m], [m, 0, m, 0]],
            [[0, 0, m, m], [0, 0, m, m], [m, m, 0, 0], [m, m, 0, 0]],
            [[0, m, m, m], [m, 0, m, m], [m, m, 0, m], [m, m, m, 0]],
        ]
    ).unsqueeze(1)
    mask = shifted_window_mask(4, 4, 2, 1)
    assert SHIFT_MASK_VALUE == -100.0
    assert mask.shape == (4, 1, 4, 4)
    assert torch.equal(mask, expected)


def test_stage_shifts_follow_the_window_rule():
    # 384 / window 12: grids 96, 48, 24, 12 -> the last stage's window covers it whole, never shifts.
    swin = SwinTransformer(preset("ram_plus_tiny_384").swin)
    shifts = [[block.shift for block in stage.blocks] for stage in swin.layers]
    windows = [[block.window for block in stage.blocks] for stage in swin.layers]
    assert shifts == [[0, 6], [0, 6], [0, 6], [0, 0]]
    assert windows == [[12, 12]] * 4
    assert swin.layers[3].shift_mask is None and swin.layers[0].shift_mask.shape == (64, 1, 144, 144)
    # 224 / window 7: grids 56, 28, 14, 7.
    swin = SwinTransformer(preset("ram_tiny_224").swin)
    assert [[b.shift for b in s.blocks] for s in swin.layers] == [[0, 3], [0, 3], [0, 3], [0, 0]]


def test_refresh_bias_runs_after_load_state_dict():
    # A small Swin: 32 px -> 8x8 grid, window 4 (shifted by 2 in block 1), then 4x4.
    torch.manual_seed(0)
    config = SwinConfig(image_size=32, window_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 2))
    swin = SwinTransformer(config).eval()
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    attn: WindowAttention = swin.layers[0].blocks[1].attn
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert attn.relative_position_bias.shape == (1, 16, 16)
    with torch.no_grad():
        before = swin(px)
        state = swin.state_dict()
        new_table = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(5))
        state[key] = new_table
        swin.load_state_dict(state)  # the parent's load: the hook of the nested module must run
        after = swin(px)
    gathered = new_table[relative_position_index(4).reshape(-1)].reshape(16, 16, 1).permute(2, 0, 1)
    assert torch.equal(attn.relative_position_bias, gathered)
    assert (after - before).abs().max() > 1e-3
    # A fresh model loading the same state computes the same thing (nothing stale anywhere).
    fresh = SwinTransformer(config).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert max_err(fresh(px), after) <= 1e-6
