import csv
import json

import numpy as np
import pytest

from ram_edge.runtime import cli
from ram_edge.runtime.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_formats_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for text in ("--resume", "jsonl", "exit status", "130", "--providers", "--max-pixels"):
        assert text in out


def test_folder_to_jsonl_tags_every_image(test_bundle, image_dir, tmp_path, capsys):
    out_file = tmp_path / "tags.jsonl"
    code, _, err = run(capsys, test_bundle, image_dir, "--format", "jsonl", "--out", out_file,
                       "--threshold", "0", "--batch-size", "2")
    assert code == 0
    records = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["path"].replace(str(image_dir), "") for r in records] == ["/a.png", "/b.jpg", "/sub/c.png"]
    for r in records:
        assert len(r["tags"]) == 6 and r["probabilities"] == sorted(r["probabilities"], reverse=True)
    assert "3 tagged, 0 failed" in err and "images/s" in err


def test_bad_inputs_are_records_with_reasons_and_exit_1(test_bundle, image_dir, tmp_path, capsys):
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "notes.jpg").write_text("hello")
    good = (image_dir / "b.jpg").read_bytes()
    (image_dir / "cut.jpg").write_bytes(good[: len(good) // 3])
    out_file = tmp_path / "tags.json"
    code, _, err = run(capsys, test_bundle, image_dir, tmp_path / "nothing-here.png", "--format", "json",
                       "--out", out_file, "--threshold", "0.5")
    assert code == 1
    records = json.loads(out_file.read_text(encoding="utf-8"))  # a valid JSON array
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    assert set(by_name) == {"a.png", "b.jpg", "c.png", "empty.jpg", "notes.jpg", "cut.jpg", "nothing-here.png"}
    assert "not an image" in by_name["empty.jpg"]["error"]
    assert "not an image" in by_name["notes.jpg"]["error"]
    assert "truncated" in by_name["cut.jpg"]["error"]
    assert "no such file" in by_name["nothing-here.png"]["error"]
    assert "tags" in by_name["a.png"]
    assert err.count("ram-tag: ") >= 4 and "cut.jpg: cannot decode" in err


def test_text_and_csv_formats(test_bundle, image_dir, tmp_path, capsys):
    code, out, _ = run(capsys, test_bundle, image_dir / "a.png", "--threshold", "0", "--top-k", "2", "-q")
    assert code == 0
    path, body = out.strip().split("\t")
    assert path.endswith("a.png") and body.count("(") == 2
    csv_file = tmp_path / "t.csv"
    assert run(capsys, test_bundle, image_dir, "--format", "csv", "--out", csv_file, "--lang", "zh",
               "--threshold", "0", "-q")[0] == 0
    rows = list(csv.DictReader(csv_file.open(encoding="utf-8")))
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)
    assert all(len(r["tags"].split("|")) == 6 and r["tags"].startswith("标签") for r in rows)


def test_resume_skips_what_the_output_holds(test_bundle, image_dir, tmp_path, capsys, monkeypatch):
    out_file = tmp_path / "tags.jsonl"
    assert run(capsys, test_bundle, image_dir / "a.png", "--format", "jsonl", "--out", out_file)[0] == 0
    with out_file.open("a", encoding="utf-8") as f:
        f.write('{"path": "half a rec')  # a crash in the middle of a line
    seen = []
    original = cli.tag_files

    def spy(tagger, paths, **kwargs):
        seen.extend(paths)
        return original(tagger, paths, **kwargs)

    monkeypatch.setattr(cli, "tag_files", spy)
    code, _, err = run(capsys, test_bundle, image_dir, "--format", "jsonl", "--out", out_file, "--resume")
    assert code == 0 and "1 of 3 inputs already" in err
    assert [p.rsplit("/", 1)[-1] for p in seen] == ["b.jpg", "c.png"]
    lines = out_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line)["path"] for line in lines)


def test_json_resume_repairs_an_unclosed_array(test_bundle, image_dir, tmp_path, capsys):
    out_file = tmp_path / "tags.json"
    first = str(image_dir / "a.png")
    out_file.write_text('[\n{"path": "%s", "tags": [], "probabilities": []},\n{"path": "x' % first,
                        encoding="utf-8")
    assert run(capsys, test_bundle, image_dir, "--format", "json", "--out", out_file, "--resume")[0] == 0
    records = json.loads(out_file.read_text(encoding="utf-8"))
    assert [r["path"] for r in records][0] == first and len(records) == 3


def test_interrupt_keeps_finished_batches_and_exits_130(test_bundle, image_dir, tmp_path, capsys, monkeypatch):
    original = cli.tag_files

    def interrupted_after_first_batch(*args, **kwargs):
        batches = original(*args, **kwargs)
        yield next(batches)
        batches.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "tag_files", interrupted_after_first_batch)
    out_file = tmp_path / "tags.json"
    code, _, err = run(capsys, test_bundle, image_dir, "--format", "json", "--out", out_file, "--batch-size", "1")
    assert code == 130 and "--resume" in err
    assert len(json.loads(out_file.read_text(encoding="utf-8"))) == 1  # closed, valid, one record


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "2"], "--threshold"),
    (["--top-k", "0"], "--top-k"),
    (["--resume"], "--resume needs --out"),
    (["--backend", "tensorrt"], "tensorrt"),
    (["--providers", "NoSuchExecutionProvider"], "not available"),
])
def test_usage_errors_exit_2(test_bundle, image_dir, capsys, extra, message):
    code, _, err = run(capsys, test_bundle, image_dir, *extra)
    assert code == 2 and message in err


def test_broken_bundle_and_vocabulary_exit_2(test_bundle, image_dir, tmp_path, capsys):
    from ram_edge.vocabulary import Vocabulary

    Vocabulary(["x", "y"], np.ones((2, 16), np.float32)).save(tmp_path / "wide")
    code, _, err = run(capsys, test_bundle, image_dir, "--vocab", tmp_path / "wide")
    assert code == 2 and "16 wide" in err
    code, _, err = run(capsys, tmp_path / "no-bundle", image_dir)
    assert code == 2 and "no such bundle folder" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, tmp_path / "file", image_dir)
    assert code == 2 and "a file, not a bundle folder" in err
    assert main(["--no-such-option"]) == 2


def test_unreadable_file_does_not_stop_the_run(test_bundle, image_dir, tmp_path, capsys, monkeypatch):
    import builtins

    real_open = builtins.open
    locked = str(image_dir / "b.jpg")

    def fake_open(file, *args, **kwargs):  # tests run as root: chmod 000 would not stop reading
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    code, out, err = run(capsys, test_bundle, image_dir, "--format", "jsonl", "--threshold", "0")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(records) == 3
    assert records[1] == {"path": locked, "error": "cannot read the file: Permission denied"}
    assert "tags" in records[0] and "tags" in records[2]
