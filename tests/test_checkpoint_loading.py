"""``load_checkpoint``: the file formats it reads, the files it refuses (and how it says so), and what it
infers or takes as overrides (image size, tag names).

Format tests compare against the goldens on one image of the 224 golden to stay fast.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ram_edge.models import CheckpointError, demo_model, load_checkpoint, preset, read_state_dict
from ram_edge.tags import OFFICIAL_NUM_TAGS, TagSet

try:
    from _shared import golden_paths, needs_shared
except ImportError:  # tests/ imported as a package
    from tests._shared import golden_paths, needs_shared

TOL = 1e-4
TAGS16 = [f"t{i}" for i in range(16)]


def golden_state(name: str) -> dict:
    """The golden's raw state dict, exactly as in the file (buffers and captioning keys included)."""
    return torch.load(golden_paths(name)[0], map_location="cpu", weights_only=True)["model"]


def golden_arrays(name: str) -> dict:
    return {k: torch.from_numpy(v) for k, v in np.load(golden_paths(name)[1]).items()}


def assert_golden_logits(model, name: str, images: slice = slice(0, 1)) -> None:
    g = golden_arrays(name)
    with torch.no_grad():
        logits = model(g["pixel_values"][images])
    assert logits.shape == g["logits"][images].shape
    assert (logits - g["logits"][images]).abs().max().item() <= TOL


# -- 3. formats ------------------------------------------------------------------------------------

@needs_shared
def test_official_layout_is_model_entry(tmp_path):
    # The golden file itself is the official layout: {"model": state_dict} with buffers inside.
    raw = torch.load(golden_paths("ram_tiny_224")[0], map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    assert any(k.endswith(".relative_position_index") for k in raw["model"])
    assert any(k.endswith(".attn_mask") for k in raw["model"])
    assert any(k.startswith("text_decoder.") for k in raw["model"])
    model = load_checkpoint(golden_paths("ram_tiny_224")[0], tags=TAGS16)
    assert_golden_logits(model, "ram_tiny_224")
    assert not model.training
    notes = " ".join(model.load_notes)
    assert "captioning branch" in notes and "relative_position_index" in notes


@pytest.mark.parametrize(
    "layout",
    ["bare", "state_dict", "module_prefix", "vision_multi", "safetensors"],
)
@needs_shared
def test_checkpoint_formats_load_and_match_golden(tmp_path, layout):
    sd = golden_state("ram_tiny_224")
    if layout == "bare":
        path = tmp_path / "bare.pth"
        torch.save(sd, path)
    elif layout == "state_dict":
        path = tmp_path / "wrapped.pt"
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif layout == "module_prefix":
        path = tmp_path / "ddp.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "vision_multi":
        renamed = {k.replace("tagging_head", "vision_multi"): v for k, v in sd.items()}
        assert sum("vision_multi" in k for k in renamed) > 10
        path = tmp_path / "old_release.pth"
        torch.save({"model": renamed}, path)
    else:
        path = tmp_path / "golden.safetensors"
        # safetensors refuses shared storage; give every tensor its own.
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    model = load_checkpoint(path, tags=TAGS16)
    assert_golden_logits(model, "ram_tiny_224", slice(0, 2) if layout == "safetensors" else slice(0, 1))
    if layout == "vision_multi":
        assert any("renamed" in note and "vision_multi" in note for note in model.load_notes)


@needs_shared
def test_safetensors_ram_plus_golden(tmp_path):
    sd = golden_state("ram_plus_tiny_384")
    path = tmp_path / "plus.safetensors"
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    model = load_checkpoint(path, tags=TAGS16)
    assert model.config.kind == "ram_plus" and model.config.descriptions_per_tag == 3
    assert_golden_logits(model, "ram_plus_tiny_384")


@needs_shared
def test_read_state_dict_returns_only_tensors():
    sd = read_state_dict(golden_paths("ram_plus_tiny_384")[0])
    assert sd.keys() == golden_state("ram_plus_tiny_384").keys()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


# -- 4. refusals -----------------------------------------------------------------------------------


def _save(tmp_path, name, sd):
    path = tmp_path / name
    torch.save({"model": sd}, path)
    return path


@needs_shared
def test_refuses_missing_key(tmp_path):
    sd = golden_state("ram_tiny_224")
    del sd["visual_encoder.layers.1.blocks.0.mlp.fc2.bias"]
    path = _save(tmp_path, "missing_key.pth", sd)
    with pytest.raises(CheckpointError, match=r"missing key.*visual_encoder\.layers\.1\.blocks\.0\.mlp\.fc2\.bias") as e:
        load_checkpoint(path, tags=TAGS16)
    assert "missing_key.pth" in str(e.value)


@needs_shared
def test_refuses_missing_essential_key(tmp_path):
    sd = golden_state("ram_tiny_224")
    del sd["label_embed"]
    path = _save(tmp_path, "no_label_embed.pth", sd)
    with pytest.raises(CheckpointError, match=r"no_label_embed\.pth: missing key 'label_embed'"):
        load_checkpoint(path)


@needs_shared
def test_refuses_wrong_shape(tmp_path):
    sd = golden_state("ram_tiny_224")
    sd["visual_encoder.norm.weight"] = torch.ones(200)
    path = _save(tmp_path, "wrong_shape.pth", sd)
    with pytest.raises(CheckpointError, match=r"wrong shape.*visual_encoder\.norm\.weight: checkpoint \(200,\) vs model \(256,\)") as e:
        load_checkpoint(path, tags=TAGS16)
    assert "wrong_shape.pth" in str(e.value)


@needs_shared
def test_refuses_unexpected_key(tmp_path):
    sd = golden_state("ram_plus_tiny_384")
    sd["tagging_head.pooler.dense.weight"] = torch.zeros(64, 64)
    path = _save(tmp_path, "extra_key.pth", sd)
    with pytest.raises(CheckpointError, match=r"extra_key\.pth.*1 unexpected key\(s\): tagging_head\.pooler\.dense\.weight"):
        load_checkpoint(path, tags=TAGS16)


@needs_shared
def test_refuses_truncated_pth(tmp_path):
    data = golden_paths("ram_plus_tiny_384")[0].read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pth: not a readable PyTorch checkpoint, probably truncated or corrupt"):
        load_checkpoint(path, tags=TAGS16)


@pytest.mark.parametrize(
    "content",
    [b"", b"<!DOCTYPE html><html><body>404</body></html>", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"],
    ids=["empty", "html", "lfs_pointer"],
)
def test_refuses_files_that_are_no_checkpoint(tmp_path, content):
    path = tmp_path / "download.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"download\.pth: not a PyTorch checkpoint") as e:
        read_state_dict(path)
    assert "run code" not in str(e.value)


class _RunsCode:
    """Unpickling this would call os.system; weights_only loading must refuse it before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
def test_refuses_pickle_that_runs_code(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"model": {"fc.bias": torch.zeros(1)}, "extra": _RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused, .*would run code") as e:
        load_checkpoint(path)
    assert not marker.exists(), "unpickling executed code"
    assert "system" in str(e.value)  # names what it blocked
    assert "weights_only` set to `False`" not in str(e.value)  # and does not advise the unsafe way


def test_refuses_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing_here\.pth: no such checkpoint file"):
        load_checkpoint(tmp_path / "nothing_here.pth")


@needs_shared
def test_refuses_truncated_safetensors(tmp_path):
    sd = golden_state("ram_tiny_224")
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(full))
    data = full.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file, truncated or corrupt"):
        load_checkpoint(path, tags=TAGS16)


def test_refuses_non_tensor_entries_and_non_dicts(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"list\.pth: holds list, expected a state dict"):
        read_state_dict(path)
    path = tmp_path / "mixed.pth"
    torch.save({"model": {"a": torch.zeros(1), "step": 5}}, path)
    with pytest.raises(CheckpointError, match=r"mixed\.pth: entries that are not tensors: step"):
        read_state_dict(path)


def test_refuses_a_checkpoint_of_something_else(tmp_path):
    path = _save(tmp_path, "resnet.pth", {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)})
    with pytest.raises(CheckpointError, match=r"resnet\.pth: missing key 'visual_encoder\.patch_embed\.proj\.weight'.*not a RAM"):
        load_checkpoint(path)


# -- 5. overrides and inference --------------------------------------------------------------------


@needs_shared
def test_image_size_defaults_from_window():
    plus = load_checkpoint(golden_paths("ram_plus_tiny_384")[0], tags=TAGS16)
    ram = load_checkpoint(golden_paths("ram_tiny_224")[0])
    assert plus.config.swin.window_size == 12 and plus.config.image_size == 384
    assert ram.config.swin.window_size == 7 and ram.config.image_size == 224
    assert plus.config.swin.num_tokens == 145 and ram.config.swin.num_tokens == 50


@needs_shared
def test_explicit_image_size():
    model = load_checkpoint(golden_paths("ram_tiny_224")[0], image_size=224)
    assert_golden_logits(model, "ram_tiny_224")
    # 448 with window 7: grids 112, 56, 28, 14, all divisible; the weights do not depend on the size.
    big = load_checkpoint(golden_paths("ram_tiny_224")[0], image_size=448)
    assert big.config.image_size == 448 and big.config.swin.num_tokens == 1 + 14 * 14


@pytest.mark.parametrize(
    "name, size, message",
    [
        ("ram_plus_tiny_384", 224, r"image_size 224 gives a 56x56 token grid at stage 0, not divisible by window 12"),
        ("ram_tiny_224", 384, r"image_size 384 gives a 96x96 token grid at stage 0, not divisible by window 7"),
        ("ram_tiny_224", 226, r"image_size 226 is not a multiple of patch 4"),
    ],
)
@needs_shared
def test_image_size_not_divisible_is_refused(name, size, message):
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(golden_paths(name)[0], image_size=size, tags=TAGS16)
    assert f"{name}.pth" in str(e.value)
    assert isinstance(e.value, ValueError)


@needs_shared
def test_ram_plus_without_tags_asks_for_the_tag_list():
    with pytest.raises(CheckpointError, match=r"label_embed has 48 rows, not a multiple of the official 4585 tags; pass the tag list") as e:
        load_checkpoint(golden_paths("ram_plus_tiny_384")[0])
    assert "ram_plus_tiny_384.pth" in str(e.value)


@needs_shared
def test_ram_plus_tag_count_must_divide_rows():
    with pytest.raises(CheckpointError, match=r"48 rows, not divisible by 5 tags"):
        load_checkpoint(golden_paths("ram_plus_tiny_384")[0], tags=[f"x{i}" for i in range(5)])


@needs_shared
def test_ram_tag_count_must_match():
    with pytest.raises(CheckpointError, match=r"RAM checkpoint has 16 tag embeddings but 15 tags were given"):
        load_checkpoint(golden_paths("ram_tiny_224")[0], tags=TAGS16[:15])


@needs_shared
def test_ram_without_tags_gets_generic_names():
    model = load_checkpoint(golden_paths("ram_tiny_224")[0])
    assert list(model.tags.names) == [f"tag_{i}" for i in range(16)]
    assert model.tags.source == "generic"
    assert model.tags.names_zh is None and model.tags.thresholds is None


@needs_shared
def test_tags_as_list_tagset_or_file(tmp_path):
    pth = golden_paths("ram_plus_tiny_384")[0]
    names = [f"thing {i}" for i in range(16)]
    from_list = load_checkpoint(pth, tags=names)
    assert list(from_list.tags.names) == names

    tag_set = TagSet(names, thresholds=[0.5] * 16, source="mine")
    from_set = load_checkpoint(pth, tags=tag_set)
    assert from_set.tags is tag_set

    tag_file = tmp_path / "my_tags.txt"
    tag_file.write_text("\n".join(names) + "\n\n", encoding="utf-8")  # blank lines are ignored
    for tags in (tag_file, str(tag_file)):
        from_file = load_checkpoint(pth, tags=tags)
        assert list(from_file.tags.names) == names
        assert from_file.tags.source == str(tag_file)
    assert from_file.config.num_tags == 16 and from_file.config.descriptions_per_tag == 3


@pytest.mark.parametrize("kind_preset", ["ram_tiny_224", "ram_plus_tiny_384"])
def test_official_vocabulary_gets_official_names(tmp_path, kind_preset):
    # A tiny model with the official 4,585 tags (RAM++ with one description per tag keeps the file small).
    config = preset(kind_preset)
    if config.kind == "ram_plus":
        config = replace(config, descriptions_per_tag=1)
    model = demo_model(config, seed=1)
    path = tmp_path / "official_4585.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.config.num_tags == OFFICIAL_NUM_TAGS
    tags = loaded.tags
    assert tags.source == "official" and len(tags) == 4585
    assert tags.names[0] == "3D CG rendering" and tags.names_zh[0] == "三维CG渲染"
    assert tags.names[7] == "accessory" and tags.names_zh[7] == "附件" and tags.thresholds[7] == pytest.approx(0.8)
    assert tags.names[4584] == "zoo" and tags.names_zh[4584] == "动物园" and tags.thresholds[4584] == pytest.approx(0.76)
    assert tags.thresholds[0] == pytest.approx(0.65)
    if kind_preset == "ram_tiny_224":
        assert loaded.config.variant == "ram_tiny_224"  # matched to its preset
        assert load_checkpoint(path, variant="ram_tiny_224").config.variant == "ram_tiny_224"
        with pytest.raises(CheckpointError, match=r"official_4585\.pth: the weights are not a ram_swin_l_384 model"):
            load_checkpoint(path, variant="ram_swin_l_384")
        with pytest.raises(CheckpointError, match=r"unknown variant 'ram_huge'"):
            load_checkpoint(path, variant="ram_huge")


@needs_shared
def test_decoder_heads_override_is_checked():
    with pytest.raises(CheckpointError, match=r"hidden 64 not divisible by 3 heads"):
        load_checkpoint(golden_paths("ram_tiny_224")[0], decoder_heads=3)
