"""ram-tag's output files and inputs: destinations checked before the bundle loads, formats from the
suffix, no silent replacement, resume in the same format only, a full disk mid-run, nothing to tag,
loading feedback and timings, --version, and errors that name the input in the Python API."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ram_edge.runtime import ImageError, Tagger
from ram_edge.runtime.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("out, message", [
    ("{folder}", "is a folder; give a file name"),
    ("/proc/ram-edge-test.jsonl", "cannot write there"),
    ("/dev/full", "not a regular file"),
    ("{missing}/tags.jsonl", "does not exist"),
])
def test_bad_destinations_exit_2_before_loading(test_bundle, image_dir, tmp_path, capsys, out, message):
    out = out.format(folder=tmp_path, missing=tmp_path / "nope")
    code, _, err = run(capsys, test_bundle, image_dir, "--out", out)
    assert code == 2 and message in err
    assert "loading" not in err  # refused before the bundle was touched
    assert not Path(out).is_file() or out == "/dev/full"


def test_format_from_suffix_and_no_silent_replacement(test_bundle, image_dir, tmp_path, capsys):
    csv_out = tmp_path / "tags.csv"
    assert run(capsys, test_bundle, image_dir, "--out", csv_out, "--threshold", "0")[0] == 0
    assert csv_out.read_text().splitlines()[0] == "path,tags,probabilities,error"
    before = csv_out.read_bytes()
    code, _, err = run(capsys, test_bundle, image_dir, "--out", csv_out)
    assert code == 2 and "--resume to continue it or --overwrite to replace it" in err
    assert csv_out.read_bytes() == before
    assert run(capsys, test_bundle, image_dir, "--out", csv_out, "--overwrite", "--top-k", "1", "--threshold", "0")[0] == 0
    assert csv_out.read_bytes() != before and len(csv_out.read_text().splitlines()) == 4
    jsonl = tmp_path / "t.jsonl"
    assert run(capsys, test_bundle, image_dir, "--out", jsonl)[0] == 0
    assert all(json.loads(line)["path"] for line in jsonl.read_text().splitlines())


def test_resume_refuses_another_format(test_bundle, image_dir, tmp_path, capsys):
    out = tmp_path / "tags.log"
    assert run(capsys, test_bundle, image_dir, "--out", out, "--format", "jsonl")[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, test_bundle, image_dir, "--out", out, "--format", "csv", "--resume")
    assert code == 2 and "holds jsonl records but the format is csv" in err
    assert out.read_bytes() == before
    assert run(capsys, test_bundle, image_dir, "--out", out, "--format", "jsonl", "--resume")[0] == 0


def test_nothing_to_tag_is_an_error(test_bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no images here")
    for folder in ("empty", "texts"):
        code, _, err = run(capsys, test_bundle, tmp_path / folder)
        assert code == 2 and "nothing to tag: no image files in" in err


def test_loading_feedback_timings_and_default_batch(test_bundle, image_dir, capsys):
    code, _, err = run(capsys, test_bundle, image_dir)
    assert code == 0
    assert "loading " in err and "checking every file's sha256" in err
    assert "loaded in" in err and "batch 1" in err  # one image per call on a CPU
    assert "loading took" in err and "images/s" in err


def test_version_and_quiet(test_bundle, image_dir, capsys):
    assert main(["--version"]) == 0 and "ram-tag (ram-edge)" in capsys.readouterr().out
    code, out, err = run(capsys, test_bundle, image_dir, "-q")
    assert code == 0 and err == "" and len(out.splitlines()) == 3


def test_full_disk_mid_run_keeps_finished_records(test_bundle, image_dir, tmp_path):
    """A file-size limit stands in for a full disk: the run stops with exit 1 and a clear message, and the
    file holds only complete records (the batch being written is cut off), which --resume continues."""
    out = tmp_path / "tags.jsonl"
    limit = 300  # bytes: room for a couple of one-image batches

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    images = [image_dir / f"copy{i}.png" for i in range(6)]
    for path in images:
        path.write_bytes((image_dir / "a.png").read_bytes())
    command = [sys.executable, "-m", "ram_edge.runtime.cli", str(test_bundle), *map(str, images),
               "--out", str(out), "--threshold", "0", "--batch-size", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "failed: File too large" in proc.stderr and "run again with --resume" in proc.stderr
    lines = out.read_text().splitlines()
    assert 0 < len(lines) < 6 and out.read_text().endswith("\n")
    assert all(json.loads(line)["path"] for line in lines)
    proc = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == sorted(map(str, images))


def test_python_api_names_the_input_and_can_return_per_item(test_bundle, image_dir, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not a jpeg at all")
    good = image_dir / "a.png"
    with Tagger(test_bundle) as tagger:
        with pytest.raises(ImageError, match=r"corrupt\.jpg: not an image"):
            tagger.tag([good, bad])
        with pytest.raises(ImageError, match=r"^image 1: empty input"):
            tagger.tag([good.read_bytes(), b""])
        results = tagger.tag([good, bad, good], errors="return", threshold=0)
        assert [r.ok for r in results] == [True, False, True]
        assert "corrupt.jpg: not an image" in results[1].error and results[1].tags == ()
        assert results[0].tags == tagger.tag(good, threshold=0).tags == results[2].tags
        with pytest.raises(ValueError, match="errors must be"):
            tagger.tag(good, errors="ignore")


def test_undecodable_tiff_is_named_as_such(test_bundle, tmp_path, capsys):
    """A multi-page TIFF with a compression Pillow lacks: not 'not an image'."""
    import io
    import struct

    from PIL import Image

    frames = [Image.new("RGB", (20, 10), (i * 80, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:])
    data = bytearray(buffer.getvalue())
    offset = struct.unpack("<I", data[4:8])[0]
    while offset:  # every page: Compression (tag 259) = 34712 (JPEG 2000), which Pillow cannot decode
        count = struct.unpack("<H", data[offset:offset + 2])[0]
        for entry in range(offset + 2, offset + 2 + 12 * count, 12):
            if struct.unpack("<H", data[entry:entry + 2])[0] == 259:
                data[entry + 8:entry + 10] = struct.pack("<H", 34712)
        offset = struct.unpack("<I", data[offset + 2 + 12 * count:offset + 6 + 12 * count])[0]
    path = tmp_path / "scan.tif"
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, test_bundle, path, "--format", "jsonl")
    assert code == 1
    assert json.loads(out)["error"] == "a TIFF file that Pillow cannot decode (unsupported variant, or damaged)"


def test_lang_error_speaks_flags(tmp_path, image_dir, bundle_factory, capsys):
    from conftest import make_test_vocabulary

    bundle = bundle_factory(vocabulary=make_test_vocabulary(with_zh=False))
    code, _, err = run(capsys, bundle, image_dir, "--lang", "zh")
    assert code == 2 and "--lang zh" in err and "use --lang en" in err and "lang=" not in err
