"""Presets against the official checkpoints' key lists (on the meta device: no full-size weights are
ever allocated), ``infer_config`` from shapes alone, load-time cleaning, and the config dataclasses.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from ram_edge.models import (
    PRESETS,
    CaptionConfig,
    CheckpointError,
    DecoderConfig,
    RAMConfig,
    RAMTagger,
    SwinConfig,
    TextConfig,
    clean_state_dict,
    infer_config,
    official_captioning,
    preset,
)
from ram_edge.models.checkpoint import BUFFER_SUFFIXES, match_preset
from ram_edge.tags import OFFICIAL_NUM_TAGS, TAG2TEXT_NUM_TAGS

try:
    from _shared import SKIP_REASON, golden_paths, needs_shared, reference_dir
except ImportError:  # tests/ imported as a package
    from tests._shared import SKIP_REASON, golden_paths, needs_shared, reference_dir

KEY_FILES = sorted((reference_dir() / "state_dict_keys").glob("*.keys.json"))
DROPPED_SUFFIXES = (".relative_position_index", ".attn_mask")
DROPPED_PREFIXES = ("tag_encoder.", "text_decoder.")


def key_file_params():
    if not KEY_FILES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))]
    return [pytest.param(path, id=path.name[: -len(".keys.json")]) for path in KEY_FILES]


def load_keys(path) -> dict:
    return {key: tuple(shape) for key, shape in json.loads(path.read_text()).items()}


def tagging_path(keys: dict) -> dict:
    return {k: s for k, s in keys.items() if not k.endswith(DROPPED_SUFFIXES) and not k.startswith(DROPPED_PREFIXES)}


def test_key_files_cover_the_official_variants():
    if not KEY_FILES:
        pytest.skip(SKIP_REASON)
    names = {p.name[: -len(".keys.json")] for p in KEY_FILES}
    assert {"ram_plus_swin_l_384", "ram_swin_l_384"} <= names
    assert names <= set(PRESETS), f"key files without a preset: {names - set(PRESETS)}"


@pytest.mark.parametrize("path", key_file_params())
def test_preset_on_meta_has_exactly_the_tagging_keys(path):
    name = path.name[: -len(".keys.json")]
    expected = tagging_path(load_keys(path))
    with torch.device("meta"):
        model = RAMTagger(PRESETS[name])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, wrong
    # Spot checks of the sizes ARCHITECTURE.md names.
    kind = PRESETS[name].kind
    rows = OFFICIAL_NUM_TAGS * (51 if kind == "ram_plus" else 1)
    assert ours["label_embed"] == (rows, 512)
    assert ours["wordvec_proj.weight"] == (768, 512)
    assert ours["tagging_head.encoder.layer.1.intermediate.dense.weight"] == (3072, 768)
    assert ours["fc.weight"] == (1, 768)
    assert ("reweight_scale" in ours) == (kind == "ram_plus")


@pytest.mark.parametrize("path", key_file_params())
def test_infer_config_from_meta_shapes(path):
    name = path.name[: -len(".keys.json")]
    keys = load_keys(path)
    fake = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}

    cleaned, notes = clean_state_dict(fake)
    assert set(cleaned) == set(tagging_path(keys))
    assert not any(k.endswith(DROPPED_SUFFIXES) or k.startswith(DROPPED_PREFIXES) for k in cleaned)
    buffers = sum(k.endswith(DROPPED_SUFFIXES) for k in keys)
    assert buffers > 0 and any(f"dropped {buffers} " in n for n in notes)
    captioning = sum(k.startswith(DROPPED_PREFIXES) for k in keys)
    if captioning:
        assert any(f"ignored {captioning} tensors of the captioning branch" in n for n in notes)
    else:
        assert not any("captioning" in n for n in notes)

    want = PRESETS[name]
    for state in (cleaned, fake):  # buffers and captioning keys do not confuse inference either
        config = infer_config(state)
        assert config.kind == want.kind
        assert config.swin.embed_dim == want.swin.embed_dim
        assert config.swin.depths == want.swin.depths == (2, 2, 18, 2)
        assert config.swin.num_heads == want.swin.num_heads
        assert config.swin.window_size == want.swin.window_size
        assert config.image_size == want.image_size == (384 if want.swin.window_size == 12 else 224)
        assert config.decoder == want.decoder == DecoderConfig(768, 4, 3072, 2, 1e-12)
        assert config.embed_dim == 512
        assert config.num_tags == OFFICIAL_NUM_TAGS
        assert config.descriptions_per_tag == (51 if want.kind == "ram_plus" else 1)
        assert replace(config, variant=name) == want
        assert match_preset(config) == name


@pytest.mark.parametrize("path", key_file_params())
def test_ram_with_captioning_on_meta_has_every_official_key(path):
    """RAM's captioning branch (official_captioning over the 512-wide image_proj output) has exactly the
    official tag_encoder.* / text_decoder.* keys and shapes; infer_config finds the same sizes."""
    name = path.name[: -len(".keys.json")]
    keys = load_keys(path)
    fake = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    if PRESETS[name].kind == "ram_plus":
        assert not any(k.startswith(DROPPED_PREFIXES) for k in keys)
        with pytest.raises(CheckpointError, match=r"RAM\+\+ has no captioning branch"):
            infer_config(fake, captioning=True)
        return
    want = replace(PRESETS[name], captioning=official_captioning(512))
    with torch.device("meta"):
        model = RAMTagger(want)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in keys.items() if not k.endswith(BUFFER_SUFFIXES)}
    assert ours == expected
    assert ours["tag_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 512)
    assert ours["text_decoder.bert.encoder.layer.11.crossattention.self.key.weight"] == (768, 768)
    cleaned, _ = clean_state_dict(fake, captioning=True)
    assert set(cleaned) == set(expected)
    config = infer_config(cleaned, captioning=True)
    assert replace(config, variant=name) == want and match_preset(config) == name
    assert config.captioning.tie_word_embeddings  # meta tensors carry no values: the architecture's default


def _key_pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


@needs_shared
def test_tag2text_preset_on_meta_has_the_official_layout():
    """No key list of tag2text_swin_14m.pth is at hand: the full-size preset must have the golden's keys
    (the official layout, built by upstream's class) up to layer counts, with the official widths."""
    golden = torch.load(golden_paths("tag2text_tiny_384")[0], map_location="meta", weights_only=True)["model"]
    expected = {_key_pattern(k) for k in golden if not k.endswith(BUFFER_SUFFIXES)}
    with torch.device("meta"):
        model = RAMTagger(PRESETS["tag2text_swin_b_384"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {_key_pattern(k).replace("label_embed", "label_embed.weight") for k in ours} == expected
    assert ours["label_embed"] == (TAG2TEXT_NUM_TAGS, 768)
    assert ours["fc.W"] == (1, TAG2TEXT_NUM_TAGS, 768) and ours["fc.b"] == (1, TAG2TEXT_NUM_TAGS)
    assert ours["tagging_head.encoder.layer.1.crossattention.self.key.weight"] == (768, 1024)
    assert ours["tag_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert ours["text_decoder.bert.encoder.layer.11.crossattention.self.key.weight"] == (768, 768)
    assert ours["text_decoder.cls.predictions.decoder.weight"] == (30524, 768)
    assert "image_proj.weight" not in ours and "wordvec_proj.weight" not in ours
    config = model.config
    assert config.image_embed_dim == 1024 and config.swin.num_tokens == 145
    assert config.captioning.tag_encoder.num_heads == config.captioning.text_decoder.num_heads == 12


def test_caption_config_validation():
    with pytest.raises(ValueError, match=r"reads 768-wide states but the tag encoder emits 64-wide"):
        CaptionConfig(tag_encoder=TextConfig(hidden_size=64, num_heads=4))
    with pytest.raises(ValueError, match=r"hidden 32 not divisible by 12 heads"):
        TextConfig(hidden_size=32)
    with pytest.raises(ValueError, match=r"must start with \[DEC\]"):
        CaptionConfig(prompt_ids=(101, 1037))
    with pytest.raises(ValueError, match=r"len\(prompt_ids\) 4 < min_length 3"):
        CaptionConfig(min_length=3)
    tag2text = PRESETS["tag2text_tiny_384"]
    with pytest.raises(ValueError, match=r"RAM\+\+ has no captioning branch"):
        replace(PRESETS["ram_plus_tiny_384"], captioning=tag2text.captioning)
    with pytest.raises(ValueError, match=r"tag encoder's cross-attention reads 128-wide states, the image embeddings are 512"):
        replace(PRESETS["ram_tiny_224"], captioning=tag2text.captioning)
    with pytest.raises(ValueError, match=r"must match the tag encoder's first layers"):
        replace(PRESETS["ram_tiny_224"], captioning=official_captioning(512))  # head 64 wide, encoder 768


def test_official_variant_widths():
    assert preset("ram_plus_swin_l_384").swin.num_features == 1536
    assert preset("ram_swin_b_384").swin.num_features == 1024
    assert preset("ram_plus_swin_l_384").swin.num_tokens == 145
    assert preset("ram_plus_swin_l_224").swin.num_tokens == 50
    assert preset("ram_plus_swin_l_384").label_rows == 233835
    for name, config in PRESETS.items():
        assert config.variant == name
        assert (config.image_size, config.swin.window_size) in ((384, 12), (224, 7))
        assert name.startswith(config.kind + "_")


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown variant 'ram_plus_swin_h_384'; known: .*ram_plus_swin_l_384"):
        preset("ram_plus_swin_h_384")


def test_config_round_trips_through_dict():
    for config in PRESETS.values():
        data = json.loads(json.dumps(config.to_dict()))  # lists, as in a bundle's JSON
        assert RAMConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=230), r"image_size 230 is not a multiple of patch 4"),
        (dict(image_size=224, window_size=12), r"56x56 token grid at stage 0, not divisible by window 12"),
        (dict(image_size=384, window_size=7), r"96x96 token grid at stage 0, not divisible by window 7"),
        (dict(depths=(2, 2), num_heads=(1, 2, 4)), r"2 stage depths but 3 head counts"),
        (dict(embed_dim=30, num_heads=(4, 8, 16, 32)), r"stage 0 width 30 not divisible by 4 heads"),
    ],
)
def test_swin_config_refuses_inconsistent_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SwinConfig(**kwargs)


def test_swin_config_stage_windows():
    config = SwinConfig(image_size=384, window_size=12, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    assert [config.stage_resolution(i) for i in range(4)] == [96, 48, 24, 12]
    assert [config.stage_window(i) for i in range(4)] == [12, 12, 12, 12]
    config = SwinConfig(image_size=224, window_size=7)
    assert [config.stage_resolution(i) for i in range(4)] == [56, 28, 14, 7]
    # A window larger than the grid shrinks to the grid (and then never shifts).
    config = SwinConfig(image_size=192, window_size=12, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    assert [config.stage_resolution(i) for i in range(4)] == [48, 24, 12, 6]
    assert config.stage_window(3) == 6


def test_ram_and_decoder_config_validation():
    with pytest.raises(ValueError, match=r"kind must be one of \('ram_plus', 'ram', 'tag2text'\), got 'blip'"):
        RAMConfig(kind="blip")
    with pytest.raises(ValueError, match=r"Tag2Text feeds its label embeddings to the tagging head as is, so embed_dim 512"):
        RAMConfig(kind="tag2text")
    with pytest.raises(ValueError, match=r"RAM has one embedding per tag"):
        RAMConfig(kind="ram", descriptions_per_tag=51)
    with pytest.raises(ValueError, match=r"hidden 768 not divisible by 5 heads"):
        DecoderConfig(num_heads=5)


def test_with_image_size():
    config = preset("ram_tiny_224").with_image_size(448)
    assert config.image_size == 448 and config.swin.window_size == 7
    with pytest.raises(ValueError, match="not divisible by window 7"):
        preset("ram_tiny_224").with_image_size(384)


def test_tagger_refuses_tag_count_mismatch():
    from ram_edge.tags import generic_tags

    with pytest.raises(ValueError, match=r"RAMTagger: 3 tag names for a model with 4585 tags"):
        with torch.device("meta"):
            RAMTagger(preset("ram_tiny_224"), generic_tags(3))
