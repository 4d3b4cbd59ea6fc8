"""ram-vocab build / info, and ram-tag --tags / --descriptions / --classify / --format prompt, on a tiny demo
bundle with its demo text encoder (the runtime side is torch-free; the bundle is exported here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ram_edge.runtime.cli import main as tag_main
from ram_edge.runtime.vocab_cli import main as vocab_main
from ram_edge.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    pytest.importorskip("torch", reason="exporting the demo bundle needs torch")
    from ram_edge.export.cli import main as export_main

    out = tmp_path_factory.mktemp("demo") / "bundle"
    assert export_main(["--demo", "ram_plus_tiny_384", "--num-tags", "30", "--out", str(out), "-q"]) == 0
    return out


def test_vocab_build_from_names_and_info(demo_bundle, tmp_path, capsys):
    out = tmp_path / "vocab"
    assert vocab_main(["build", str(demo_bundle), "--tags", "otter, kayak,paddle board", "--out", str(out), "-q"]) == 0
    vocab = Vocabulary.load(out)
    assert vocab.names == ["otter", "kayak", "paddle board"]
    assert vocab.num_descriptions.tolist() == [63] * 3 and vocab.thresholds.tolist() == [0.5] * 3
    capsys.readouterr()
    assert vocab_main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_tags"] == 3 and summary["info"]["recipe"] == "names"
    assert vocab_main(["info", str(out)]) == 0
    assert "3 tags" in capsys.readouterr().out


def test_vocab_build_descriptions_thresholds_and_merge(demo_bundle, tmp_path):
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps([{"otter": ["an otter in a river", "a furry swimmer"]}, {"kayak": ["a small boat"]}]))
    thresholds = tmp_path / "t.csv"
    thresholds.write_text("name,threshold,name_zh\notter,0.6,水獭\n", encoding="utf-8")
    out = tmp_path / "merged"
    assert vocab_main(["build", str(demo_bundle), "--descriptions", str(descriptions), "--thresholds", str(thresholds),
                       "--merge-default", "--out", str(out), "-q"]) == 0
    vocab = Vocabulary.load(out)
    assert vocab.num_tags == 32 and vocab.names[-2:] == ["otter", "kayak"]
    assert vocab.num_descriptions[-2:].tolist() == [2, 1]
    assert vocab.thresholds[-2:].tolist() == pytest.approx([0.6, 0.5])
    assert vocab.names_zh[-2:] == ["水獭", "kayak"]


@pytest.mark.parametrize("args, message", [
    (["--tags", "otter,,kayak"], "empty name at position 1"),
    (["--tags", "otter,kayak,otter"], "duplicate tag names 'otter'"),
    (["--tags", "a", "--threshold", "2"], "--threshold must be in [0, 1]"),
    (["--descriptions", "{missing}"], "cannot read"),
])
def test_vocab_build_bad_input_writes_nothing(demo_bundle, tmp_path, capsys, args, message):
    args = [a.replace("{missing}", str(tmp_path / "missing.json")) for a in args]
    out = tmp_path / "v"
    assert vocab_main(["build", str(demo_bundle), *args, "--out", str(out), "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".v.*"))


def test_vocab_build_refuses_a_bundle_without_text_encoder(test_bundle, tmp_path, capsys):
    assert vocab_main(["build", str(test_bundle), "--tags", "a,b", "--out", str(tmp_path / "v")]) == 2
    assert "ram-export --text-encoder" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_vocab_build_refuses_existing_out(demo_bundle, tmp_path, capsys):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "keep.txt").write_text("mine")
    assert vocab_main(["build", str(demo_bundle), "--tags", "a,b", "--out", str(tmp_path / "v")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "v" / "keep.txt").read_text() == "mine"


def test_ram_tag_with_tags_on_the_fly_equals_a_built_vocabulary(demo_bundle, tmp_path, image_dir):
    vocab_dir = tmp_path / "vocab"
    assert vocab_main(["build", str(demo_bundle), "--tags", "otter,kayak,sky", "--out", str(vocab_dir), "-q"]) == 0
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = [str(demo_bundle), str(image_dir), "--threshold", "0", "--format", "jsonl", "-q"]
    assert tag_main([*common, "--tags", "otter,kayak,sky", "--out", str(a)]) == 0
    assert tag_main([*common, "--vocab", str(vocab_dir), "--out", str(b)]) == 0
    rows_a = [json.loads(line) for line in a.read_text().splitlines()]
    rows_b = [json.loads(line) for line in b.read_text().splitlines()]
    assert rows_a == rows_b and len(rows_a) == 3
    assert all(sorted(r["tags"]) == ["kayak", "otter", "sky"] for r in rows_a)


def test_ram_tag_classify(demo_bundle, tmp_path, image_dir):
    out = tmp_path / "c.jsonl"
    assert tag_main([str(demo_bundle), str(image_dir), "--classify", "cat,dog,bird", "--format", "jsonl",
                     "--out", str(out), "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert sorted(row["classes"]) == ["bird", "cat", "dog"]
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-3)
    assert tag_main([str(demo_bundle), str(image_dir), "--classify", "cat", "-q"]) == 2


def test_ram_tag_prompt_format(demo_bundle, tmp_path, image_dir):
    out = tmp_path / "p.txt"
    assert tag_main([str(demo_bundle), str(image_dir), "--top-k", "3", "--threshold", "0", "--format", "prompt",
                     "--out", str(out), "-q"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        path, prompt = line.split("\t")
        parts = prompt.split(" . ")
        assert prompt.endswith(" .") and len(parts) == 3
    # --resume understands the format
    assert tag_main([str(demo_bundle), str(image_dir), "--format", "prompt", "--out", str(out), "--resume", "-q"]) == 0
    assert out.read_text().splitlines() == lines
