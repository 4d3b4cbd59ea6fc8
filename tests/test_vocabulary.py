import json

import numpy as np
import pytest

from ram_edge.vocabulary import Vocabulary


def test_ragged_embeddings_are_padded_and_masked():
    vocab = Vocabulary(["a", "b"], [np.ones((2, 4)), 2 * np.ones((1, 4))])
    assert vocab.embeddings.shape == (2, 2, 4)
    assert vocab.embeddings.dtype == np.float32 and vocab.embeddings.flags.c_contiguous
    np.testing.assert_array_equal(vocab.mask, [[True, True], [True, False]])
    np.testing.assert_array_equal(vocab.embeddings[1, 1], 0.0)  # padding is zero
    np.testing.assert_array_equal(vocab.num_descriptions, [2, 1])


def test_two_dimensional_embeddings_mean_one_description_each():
    vocab = Vocabulary(["a", "b", "c"], np.arange(12, dtype=np.float64).reshape(3, 4))
    assert vocab.embeddings.shape == (3, 1, 4)
    assert vocab.mask.all()


def test_padded_embeddings_with_num_descriptions_zero_the_padding():
    emb = np.full((2, 3, 4), 7.0, dtype=np.float32)
    vocab = Vocabulary(["a", "b"], emb, num_descriptions=[3, 1])
    np.testing.assert_array_equal(vocab.mask, [[True, True, True], [True, False, False]])
    assert vocab.embeddings[1, 1:].sum() == 0.0
    assert emb[1, 1:].sum() > 0  # the caller's array is not modified


def test_arrays_are_cached_read_only():
    vocab = Vocabulary(["a"], np.ones((1, 4)))
    assert vocab.embeddings is vocab.embeddings and vocab.mask is vocab.mask
    with pytest.raises(ValueError):
        vocab.embeddings[0, 0, 0] = 1.0


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vocab = Vocabulary(["cat", "dog", "sky"], [rng.standard_normal((d, 6)) for d in (1, 3, 2)],
                       thresholds=[0.5, 0.7, 0.9], names_zh=["猫", "狗", "天空"])
    vocab.save(tmp_path / "v", dtype="float16")
    meta = json.loads((tmp_path / "v" / "vocabulary.json").read_text(encoding="utf-8"))
    assert meta == {"format_version": 1, "names": ["cat", "dog", "sky"], "names_zh": ["猫", "狗", "天空"],
                    "thresholds": pytest.approx([0.5, 0.7, 0.9]), "num_descriptions": [1, 3, 2],
                    "embed_dim": 6, "dtype": "float16"}
    stored = np.load(tmp_path / "v" / "embeddings.npy")
    assert stored.dtype == np.float16 and stored.shape == (3, 3, 6)
    assert not stored[0, 1:].any() and not stored[2, 2:].any()
    loaded = Vocabulary.load(tmp_path / "v")
    assert loaded.names == vocab.names and loaded.names_zh == vocab.names_zh
    np.testing.assert_array_equal(loaded.mask, vocab.mask)
    np.testing.assert_allclose(loaded.embeddings, vocab.embeddings, atol=2e-3, rtol=1e-3)  # float16 storage
    np.testing.assert_allclose(loaded.thresholds, [0.5, 0.7, 0.9], rtol=1e-6)
    assert loaded.embeddings.dtype == np.float32


def test_subset_by_name_and_index_keeps_order_and_trims_padding():
    vocab = Vocabulary(["a", "b", "c"], [np.full((d, 2), i, np.float32) for i, d in enumerate((3, 1, 2))],
                       thresholds=[0.1, 0.2, 0.3], names_zh=["甲", "乙", "丙"])
    sub = vocab.subset(["c", 1])
    assert sub.names == ["c", "b"] and sub.names_zh == ["丙", "乙"]
    assert sub.embeddings.shape == (2, 2, 2)
    np.testing.assert_allclose(sub.thresholds, [0.3, 0.2])
    np.testing.assert_array_equal(sub.embeddings[0], 2.0)
    with pytest.raises(KeyError, match="'zzz'"):
        vocab.subset(["zzz"])
    with pytest.raises(IndexError):
        vocab.subset([5])


@pytest.mark.parametrize("kwargs, message", [
    (dict(names=["a", "a"], embeddings=np.ones((2, 4))), r"duplicate tag names 'a' \(positions 0, 1\)"),
    (dict(names=["a", "b"], embeddings=np.ones((3, 4))), "3 tags, names has 2"),
    (dict(names=["a"], embeddings=np.array([[np.nan, 0, 0, 0]])), "NaN or inf"),
    (dict(names=["a"], embeddings=np.array([[np.inf, 0, 0, 0]])), "NaN or inf"),
    (dict(names=["a", "b"], embeddings=np.ones((2, 4)), thresholds=[0.5]), "thresholds has 1"),
    (dict(names=["a"], embeddings=np.ones((1, 4)), thresholds=[1.5]), r"in \[0, 1\]"),
    (dict(names=["a", "b"], embeddings=np.ones((2, 4)), names_zh=["甲"]), "names_zh has 1"),
    (dict(names=["a", "b"], embeddings=[np.ones((1, 4)), np.ones((1, 5))]), "different widths"),
    (dict(names=[], embeddings=np.ones((0, 4))), "at least one tag"),
    (dict(names=["a"], embeddings=np.ones((1, 2, 4)), num_descriptions=[0]), "at least one"),
    (dict(names=["a"], embeddings=np.ones((1, 4, 2, 2))), "expected"),
])
def test_invalid_vocabularies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary(**kwargs)


def test_load_refuses_shape_mismatch(tmp_path):
    Vocabulary(["a", "b"], np.ones((2, 4))).save(tmp_path / "v")
    np.save(tmp_path / "v" / "embeddings.npy", np.ones((2, 1, 5), np.float16))
    with pytest.raises(ValueError, match="embeddings.npy: shape"):
        Vocabulary.load(tmp_path / "v")


def test_save_refuses_values_beyond_float16(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        Vocabulary(["a"], np.full((1, 4), 1e6)).save(tmp_path / "v", dtype="float16")


def test_float32_storage_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    embeddings = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 4, 2)]
    vocab = Vocabulary(["a", "b", "c"], embeddings)
    loaded = Vocabulary.load(vocab.save(tmp_path / "v32", dtype="float32"))
    np.testing.assert_array_equal(loaded.embeddings, vocab.embeddings)
    assert json.loads((tmp_path / "v32" / "vocabulary.json").read_text())["dtype"] == "float32"
    half = Vocabulary.load(vocab.save(tmp_path / "v16", dtype="float16"))
    assert 0 < np.abs(half.embeddings - vocab.embeddings).max() < 2e-3
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        vocab.save(tmp_path / "v64", dtype="float64")


def test_save_auto_is_the_exporters_rule(tmp_path, monkeypatch):
    """One rule for Vocabulary.save and ram-export: float32 up to VOCAB_FLOAT32_MAX_BYTES, float16 above."""
    import ram_edge.vocabulary as vocabulary_module

    vocab = Vocabulary(["a", "b"], np.ones((2, 3, 16), np.float32) / 4)
    assert json.loads((vocab.save(tmp_path / "auto") / "vocabulary.json").read_text())["dtype"] == "float32"
    monkeypatch.setattr(vocabulary_module, "VOCAB_FLOAT32_MAX_BYTES", vocab.embeddings.nbytes - 1)
    assert vocab.storage_dtype() == "float16"
    assert json.loads((vocab.save(tmp_path / "big") / "vocabulary.json").read_text())["dtype"] == "float16"


def test_threshold_array_falls_back_to_default():
    vocab = Vocabulary(["a", "b"], np.ones((2, 4)))
    np.testing.assert_array_equal(vocab.threshold_array(0.68), np.float32([0.68, 0.68]))
    with pytest.raises(ValueError, match="no Chinese names"):
        vocab.display_names("zh")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_blockwise_npy_read_equals_numpy(tmp_path, dtype):
    """Vocabulary.load widens float16 to float32 block by block (peak: the float32 array + one block)."""
    from ram_edge.vocabulary import read_npy_float32

    values = np.random.default_rng(2).standard_normal((7, 5, 33)).astype(dtype)
    np.save(tmp_path / "e.npy", values)
    for block in (64, 1000, 1 << 20):  # block boundaries inside rows, and one block for everything
        out = read_npy_float32(tmp_path / "e.npy", block_bytes=block)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, values.astype(np.float32))
    data = (tmp_path / "e.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_npy_float32(tmp_path / "cut.npy")
    np.save(tmp_path / "i.npy", np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="expected C-order"):
        read_npy_float32(tmp_path / "i.npy")


# -- per-tag arrays (Tag2Text's classifier rows) ---------------------------------------------------------


def _tag2text_like(num_tags: int = 4, hidden: int = 3, seed: int = 0) -> Vocabulary:
    rng = np.random.default_rng(seed)
    return Vocabulary(
        [f"t{i}" for i in range(num_tags)], rng.standard_normal((num_tags, hidden)),
        thresholds=[0.68] * num_tags,
        per_tag={"label_fc_weight": rng.standard_normal((num_tags, hidden)),
                 "label_fc_bias": rng.standard_normal(num_tags)},
    )


def test_per_tag_arrays_are_float32_read_only_and_checked():
    vocab = _tag2text_like()
    per_tag = vocab.per_tag
    assert sorted(per_tag) == ["label_fc_bias", "label_fc_weight"]
    assert per_tag["label_fc_weight"].shape == (4, 3) and per_tag["label_fc_bias"].shape == (4,)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous and not a.flags.writeable for a in per_tag.values())
    assert "per_tag=['label_fc_bias', 'label_fc_weight']" in repr(vocab)
    assert Vocabulary(["a"], np.ones((1, 2))).per_tag == {}
    with pytest.raises(ValueError, match=r"per-tag array 'w' has shape \(3, 2\); its first axis must be the 2 tags"):
        Vocabulary(["a", "b"], np.ones((2, 2)), per_tag={"w": np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"name 'embeddings' must be an identifier"):
        Vocabulary(["a"], np.ones((1, 2)), per_tag={"embeddings": np.ones(1)})
    with pytest.raises(ValueError, match=r"name '\.\./x' must be an identifier"):
        Vocabulary(["a"], np.ones((1, 2)), per_tag={"../x": np.ones(1)})
    with pytest.raises(ValueError, match=r"per-tag array 'b' holds NaN or inf \(1 tags, e\.g\. 'y'\)"):
        Vocabulary(["x", "y"], np.ones((2, 2)), per_tag={"b": [0.0, np.nan]})


def test_per_tag_arrays_round_trip_beside_the_embeddings(tmp_path):
    vocab = _tag2text_like()
    vocab.save(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "vocabulary.json").read_text(encoding="utf-8"))
    assert meta["format_version"] == 1 and meta["dtype"] == "float32"
    assert meta["per_tag"] == {"label_fc_weight": {"shape": [3], "dtype": "float32"},
                               "label_fc_bias": {"shape": [], "dtype": "float32"}}
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
        "embeddings.npy", "label_fc_bias.npy", "label_fc_weight.npy", "vocabulary.json"]
    loaded = Vocabulary.load(tmp_path / "v")
    for name, array in vocab.per_tag.items():
        np.testing.assert_array_equal(loaded.per_tag[name], array)  # float32 storage: exact
    # float16 storage applies to every float array of the vocabulary alike.
    vocab.save(tmp_path / "h", dtype="float16")
    assert np.load(tmp_path / "h" / "label_fc_weight.npy").dtype == np.float16
    half = Vocabulary.load(tmp_path / "h")
    np.testing.assert_allclose(half.per_tag["label_fc_bias"], vocab.per_tag["label_fc_bias"], rtol=1e-3, atol=1e-3)
    # A file the json lists but that is missing is named.
    (tmp_path / "v" / "label_fc_bias.npy").unlink()
    with pytest.raises(ValueError, match=r"lists the per-tag array 'label_fc_bias' but label_fc_bias\.npy is missing"):
        Vocabulary.load(tmp_path / "v")


def test_files_without_per_tag_arrays_load_as_before(tmp_path):
    vocab = Vocabulary(["a", "b"], np.ones((2, 2)))
    vocab.save(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "vocabulary.json").read_text(encoding="utf-8"))
    assert "per_tag" not in meta  # what older readers know
    assert Vocabulary.load(tmp_path / "v").per_tag == {}


def test_subset_carries_per_tag_rows_and_concat_refuses_mixing():
    vocab = _tag2text_like(num_tags=5)
    part = vocab.subset(["t3", 0])
    np.testing.assert_array_equal(part.per_tag["label_fc_weight"], vocab.per_tag["label_fc_weight"][[3, 0]])
    np.testing.assert_array_equal(part.per_tag["label_fc_bias"], vocab.per_tag["label_fc_bias"][[3, 0]])
    # Subsets of one Tag2Text vocabulary join again.
    joined = Vocabulary.concat(vocab.subset([0, 1]), vocab.subset([4]))
    np.testing.assert_array_equal(joined.per_tag["label_fc_bias"], vocab.per_tag["label_fc_bias"][[0, 1, 4]])
    plain = Vocabulary(["z"], np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"part 0 has per-tag arrays label_fc_weight \(-1, 3\), label_fc_bias \(-1,\) "
                                         r"and part 1 has none; every part must carry the same ones"):
        Vocabulary.concat(vocab, plain)
    with pytest.raises(ValueError, match=r"part 0 has per-tag arrays none and part 1 has label_fc_weight"):
        Vocabulary.concat(plain, vocab)


def test_learned_tables_may_repeat_names_when_asked(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate tag names 'smile'"):
        Vocabulary(["smile", "cat", "smile"], np.ones((3, 2)))  # words: still refused
    vocab = Vocabulary(["smile", "cat", "smile"], np.arange(6.0).reshape(3, 2), unique_names=False)
    assert not vocab.unique_names and vocab.index("cat") == 1
    with pytest.raises(KeyError, match=r"tag name 'smile' stands for 2 tags of this vocabulary \(positions 0, 2\); "
                                       r"select them by index"):
        vocab.index("smile")
    part = vocab.subset([2, 1])
    assert part.names == ["smile", "cat"] and not part.unique_names
    np.testing.assert_array_equal(part.embeddings[:, 0], [[4.0, 5.0], [2.0, 3.0]])
    vocab.save(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "vocabulary.json").read_text(encoding="utf-8"))
    assert meta["unique_names"] is False and meta["names"] == ["smile", "cat", "smile"]
    assert not Vocabulary.load(tmp_path / "v").unique_names
    # Parts of one learned table join with their shared names; a part of words keeps the rule.
    assert Vocabulary.concat(vocab.subset([0]), vocab.subset([2])).names == ["smile", "smile"]
    with pytest.raises(ValueError, match=r"Vocabulary.concat: duplicate tag names 'smile'"):
        Vocabulary.concat(vocab, Vocabulary(["smile"], np.ones((1, 2))))
