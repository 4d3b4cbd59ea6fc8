import builtins
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ram_edge.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, Preprocessor, normalize, pil_to_rgb

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_levels(pixel_values: np.ndarray) -> np.ndarray:
    """Invert the normalisation back to uint8 levels (exact for our outputs)."""
    return np.rint((pixel_values.transpose(1, 2, 0) * STD + MEAN) * 255).astype(np.int64)


@pytest.mark.parametrize("golden, size", [("ram_tiny_224", 224), ("ram_plus_tiny_384", 384)])
def test_pixel_values_equal_the_goldens(reference, golden, size):
    expected = np.load(reference / "golden" / f"{golden}.npz")["pixel_values"]
    pre = Preprocessor(size, exif_transpose=False)
    for i, name in enumerate(["demo4.jpg", "tagging_results.jpg"]):
        ours = pre(reference / "images" / name)
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected[i])  # bit for bit


def test_opencv_resize_is_close_but_not_equal():
    rng = np.random.default_rng(0)
    smooth = (rng.random((9, 12, 3)) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(smooth).resize((480, 360), Image.BICUBIC))
    a = Preprocessor(64)(big)
    b = Preprocessor(64, resize="opencv")(big)
    diff = np.abs(to_levels(a) - to_levels(b))
    assert diff.mean() < 2.0 and diff.max() <= 16


def test_normalize_matches_torchvision_formula():
    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    ours = normalize(pixels)
    # ToTensor then Normalize: (x / 255 - mean) / std
    expected = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert ours.shape == (3, 16, 16) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_inputs_path_bytes_pil_and_arrays_agree(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    pre = Preprocessor(32)
    reference = pre(tmp_path / "x.png")
    np.testing.assert_array_equal(pre(str(tmp_path / "x.png")), reference)
    np.testing.assert_array_equal(pre((tmp_path / "x.png").read_bytes()), reference)
    np.testing.assert_array_equal(pre(Image.fromarray(rgb)), reference)
    np.testing.assert_array_equal(pre(rgb), reference)
    np.testing.assert_array_equal(pre(np.ascontiguousarray(rgb[:, :, ::-1]), channel_order="bgr"), reference)
    rgba = np.concatenate([rgb, np.zeros((40, 70, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(pre(rgba), reference)  # alpha dropped
    assert not np.array_equal(pre(rgb[:, :, ::-1].copy()), reference)
    with pytest.raises(ValueError, match="uint8"):
        pre(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="channel_order"):
        pre(rgb, channel_order="rbg")


def test_alpha_drop_matches_upstream_and_white_composites():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    img = Image.fromarray(rgba, "RGBA")
    dropped = np.asarray(pil_to_rgb(img, "drop"))
    np.testing.assert_array_equal(dropped, np.asarray(img.convert("RGB")))
    assert (dropped[..., 0] == 200).all()
    white = np.asarray(pil_to_rgb(img, "white"))
    assert (white == 255).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 128]], dtype=np.uint16)
    img = Image.fromarray(values)  # mode I;16
    assert img.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(pil_to_rgb(img))[0, :, 0], [0, 100, 255, 128])
    as_i = Image.fromarray(values.astype(np.int32))  # mode I
    np.testing.assert_array_equal(np.asarray(pil_to_rgb(as_i))[0, :, 0], [0, 100, 255, 128])


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA", "YCbCr"])
def test_other_modes_become_rgb(mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    img = base.convert(mode)
    out = pil_to_rgb(img)
    assert out.mode == "RGB" and out.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_exif_orientation_is_applied_unless_disabled(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = 255  # left half white
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    upright = Preprocessor(32, exif_transpose=True).to_rgb(tmp_path / "o.jpg")
    raw = Preprocessor(32, exif_transpose=False).to_rgb(tmp_path / "o.jpg")
    assert raw.size == (64, 32) and upright.size == (32, 64)
    top = np.asarray(upright)[:16].mean()
    assert top > 200  # the white left half is on top after the rotation


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgb = np.asarray(Preprocessor(16).to_rgb(tmp_path / "a.gif"))
    assert rgb[..., 0].min() > 200 and rgb[..., 2].max() < 50


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear reason each


def bomb_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height, streamed through zlib (no big buffer is ever allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)))
    parts.append(compressor.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join(parts)))
        f.write(chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb_png(tmp_path / "bomb.png", 30_000, 30_000)
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    # Pillow's own guard (the same limit as our default) fires while the header is read; a smaller
    # max_pixels is checked by us (test_max_pixels_is_configurable).
    with pytest.raises(ImageError, match="image too large: .*900000000 pixels"):
        Preprocessor(32)(tmp_path / "bomb.png")


def test_max_pixels_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "x.png")
    assert DEFAULT_MAX_PIXELS > 100 * 100
    with pytest.raises(ImageError, match="over the limit of 9,999"):
        Preprocessor(32, max_pixels=9_999)(tmp_path / "x.png")
    assert Preprocessor(32, max_pixels=10_000)(tmp_path / "x.png").shape == (3, 32, 32)
    assert Preprocessor(32, max_pixels=None)(tmp_path / "x.png").shape == (3, 32, 32)


def test_bad_files_raise_image_error_with_reason(tmp_path, monkeypatch):
    pre = Preprocessor(32)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all\n")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "dir.jpg").mkdir()
    cases = {
        "empty.jpg": "not an image",
        "text.jpg": "not an image",
        "cut.jpg": "truncated",
        "dir.jpg": "is a directory",
        "missing.jpg": "cannot read the file: No such file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=reason):
            pre(tmp_path / name)
    with pytest.raises(ImageError, match="empty input"):
        pre(b"")

    real_open = builtins.open
    locked = str(tmp_path / "locked.jpg")
    (tmp_path / "locked.jpg").write_bytes(buffer.getvalue())

    def fake_open(file, *args, **kwargs):  # tests run as root, where chmod 000 does not stop reading
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(ImageError, match="cannot read the file: Permission denied"):
        pre(locked)
