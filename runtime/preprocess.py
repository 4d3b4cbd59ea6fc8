"""Image decoding and preprocessing, equal to upstream RAM / RAM++ (numpy + Pillow; OpenCV only on request).

Upstream (``ram.transform.get_transform``)::

    Image.open(path).convert("RGB") -> Resize((S, S)) (Pillow bilinear, antialiased when shrinking)
    -> ToTensor (/255) -> Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

:class:`Preprocessor` reproduces that bit for bit with ``resize="pillow"`` and ``exif_transpose=False``
(docs/runtime.md states the measured difference to the golden pixel values). Two deliberate defaults
differ from a bare ``Image.open``: EXIF orientation is applied (phone photos come out upright), and
16-bit grayscale is scaled to 8 bits instead of being clipped at 255 (Pillow's ``convert``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from ram_edge.bundle_format import IMAGENET_MEAN, IMAGENET_STD

#: Largest image (width x height) decoded by default: Pillow's own hard limit (2 x MAX_IMAGE_PIXELS),
#: stated here so that it is explicit and configurable. A 179-megapixel RGB image needs ~540 MB decoded.
DEFAULT_MAX_PIXELS = 178_956_970

#: Extensions a folder walk picks up (lower case). Files named explicitly are tried whatever their name.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k"}
)

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

_EXIF_ORIENTATION = 0x0112

RESIZE_METHODS = ("pillow", "opencv")
ALPHA_MODES = ("drop", "white")
CHANNEL_ORDERS = ("rgb", "bgr")


class ImageError(ValueError):
    """An input could not be turned into pixels (unreadable, not an image, truncated, too large).

    ``reason`` says why; ``source`` names the input (its path, or "image 3" of a list) when known, and
    ``str()`` starts with it, so a message always says which input failed."""

    def __init__(self, reason: str, source: Optional[str] = None):
        self.reason, self.source = reason, source
        super().__init__(f"{source}: {reason}" if source else reason)

    def with_source(self, source: str) -> "ImageError":
        return ImageError(self.reason, source)


#: Leading bytes of formats Pillow can open, to tell "not an image" from "an image Pillow cannot decode".
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)


def _sniff_format(head: bytes) -> Optional[str]:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def _normalization_lut() -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level per channel.

    ``float32(level / 255)`` (ToTensor), then ``(x - mean) / std`` with mean and std as Python floats
    (double precision), rounded to float32 once at the end: the reference pixel values in the goldens
    are reproduced bit for bit by exactly this order. A table look-up then costs one gather per pixel
    instead of four float passes.
    """
    levels = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float64)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64)[:, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float64)[:, None]
    return np.ascontiguousarray((levels[None, :] - mean) / std, dtype=np.float32)


_LUT = _normalization_lut()


@dataclass(frozen=True)
class Preprocessor:
    """Turns one image into a (3, S, S) float32 array for the encoder.

    image_size:     S, from the bundle's manifest.
    resize:         "pillow" (default, exactly upstream) or "opencv" (cv2.INTER_AREA when shrinking,
                    INTER_LINEAR when enlarging; faster on large images, pixel values differ slightly:
                    see docs/runtime.md).
    exif_transpose: apply the EXIF orientation tag (default). False gives upstream's exact behaviour.
    alpha:          "drop" (default, as upstream's ``convert("RGB")``: transparent pixels keep whatever
                    colour they store) or "white" (composite on white, what a viewer shows).
    max_pixels:     refuse images with more than this many pixels (decompression bombs) before decoding
                    them; None disables the limit.
    """

    image_size: int
    resize: str = "pillow"
    exif_transpose: bool = True
    alpha: str = "drop"
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {self.alpha!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive or None, got {self.max_pixels!r}")
        if self.resize == "opencv":
            _import_cv2()  # fail at construction, not on the first image

    def __call__(self, image: ImageInput, channel_order: str = "rgb") -> np.ndarray:
        return self.to_pixel_values(self.to_rgb(image, channel_order))

    # ------------------------------------------------------------------------------------------------
    def to_rgb(self, image: ImageInput, channel_order: str = "rgb") -> Union[Image.Image, np.ndarray]:
        """Decode ``image`` to RGB: a PIL image, or an (H, W, 3) uint8 array for array inputs."""
        if isinstance(image, np.ndarray):
            return array_to_rgb(image, channel_order)
        if isinstance(image, Image.Image):
            return self._pil_to_rgb(image, name="<PIL image>")
        if isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) == 0:
                raise ImageError("empty input (0 bytes)")
            return self._open_and_convert(io.BytesIO(bytes(image)), name="<bytes>")
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            try:
                f = open(path, "rb")
            except IsADirectoryError:
                raise ImageError("is a directory, not an image file", str(path)) from None
            except OSError as e:
                raise ImageError(f"cannot read the file: {e.strerror or e}", str(path)) from None
            with f:
                try:
                    return self._open_and_convert(f, name=str(path))
                except ImageError as e:
                    raise e.with_source(str(path)) from None
        raise TypeError(
            f"expected a path, bytes, a PIL image or an HWC uint8 numpy array, got {type(image).__name__}"
        )

    def to_pixel_values(self, rgb: Union[Image.Image, np.ndarray]) -> np.ndarray:
        """Resize an RGB image to S x S and normalise: (3, S, S) float32, C-contiguous."""
        size = self.image_size
        if self.resize == "pillow":
            if isinstance(rgb, np.ndarray):
                rgb = Image.fromarray(rgb, mode=None)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
        else:
            cv2 = _import_cv2()
            pixels = np.asarray(rgb, dtype=np.uint8)
            h, w = pixels.shape[:2]
            if (h, w) != (size, size):
                # INTER_AREA averages every source pixel when shrinking (antialiased, like Pillow);
                # for enlarging it equals INTER_LINEAR in spirit but is slower, so use that.
                interpolation = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
                pixels = cv2.resize(np.ascontiguousarray(pixels), (size, size), interpolation=interpolation)
        return normalize(pixels)

    # ------------------------------------------------------------------------------------------------
    def _open_and_convert(self, fp, name: str) -> Image.Image:
        # Not `with Image.open(...)`: closing a Pillow image frees its pixels, and the image may be returned
        # as is. The caller owns and closes ``fp``; after ``load()`` the image no longer needs it.
        try:
            img = Image.open(fp)
            self._check_size(img.size)  # from the header, before any pixel is decoded
            return self._pil_to_rgb(img, name=name)
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            # Pillow's own guard fired before ours could (its global limit is lower than max_pixels).
            raise ImageError(
                f"image too large: {e} Raise PIL.Image.MAX_IMAGE_PIXELS together with max_pixels if the "
                "image is trusted."
            ) from None
        except Image.UnidentifiedImageError:
            fp.seek(0)
            kind = _sniff_format(fp.read(16))
            if kind is not None:  # e.g. a TIFF with a compression or layout Pillow does not support
                raise ImageError(f"a {kind} file that Pillow cannot decode (unsupported variant, or damaged)") from None
            raise ImageError("not an image (Pillow recognises no image format in it)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # Pillow reports truncated / corrupt data as OSError ("image file is truncated"), SyntaxError
            # (bad header fields) or ValueError, depending on the plugin.
            raise ImageError(f"cannot decode the image: {e}") from None

    def _check_size(self, size) -> None:
        width, height = size
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width} x {height})")
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ImageError(
                f"image is {width} x {height} = {width * height:,} pixels, over the limit of "
                f"{self.max_pixels:,} (max_pixels, a guard against decompression bombs); raise it if the "
                "image is trusted"
            )

    def _pil_to_rgb(self, img: Image.Image, name: str) -> Image.Image:
        self._check_size(img.size)
        # Animated GIF / APNG / WebP and multi-page TIFF: Image.open leaves frame 0 selected; use it.
        img.load()
        # exif_transpose copies the image even when there is nothing to do: only call it when needed.
        if self.exif_transpose and img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
            img = ImageOps.exif_transpose(img)
        return pil_to_rgb(img, alpha=self.alpha)


# ----------------------------------------------------------------------------------------------------
# Building blocks (public so that callers with their own decoding can reuse them)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised with ImageNet mean / std."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"normalize expects (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
    out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], pixels[:, :, c], out=out[c])
    return out


def pil_to_rgb(img: Image.Image, alpha: str = "drop") -> Image.Image:
    """Any Pillow mode -> RGB.

    * 16-bit / 32-bit integer grayscale ("I;16*", "I"): scaled from 0..65535 to 0..255 (Pillow's
      ``convert`` would clip everything above 255 to white).
    * Alpha ("RGBA", "LA", "PA", "P" with transparency): dropped like upstream, or composited on white.
    * CMYK, YCbCr, LAB, HSV, palette, 1-bit, "L", "F": Pillow's ``convert("RGB")`` (ICC profiles are not
      applied).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        if mode == "I" and values.size and int(values.max()) <= 255 and int(values.min()) >= 0:
            scaled = values.astype(np.uint8)  # 8-bit data stored as 32-bit ints: already in range
        else:
            values = np.clip(values.astype(np.float64), 0, 65535)
            scaled = np.rint(values / 257.0).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha and alpha == "white":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def array_to_rgb(array: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """An HWC uint8 array -> (H, W, 3) uint8 RGB.

    (H, W) is grayscale; (H, W, 3) is RGB (``channel_order="rgb"``, what Pillow and most libraries give)
    or BGR (``"bgr"``, what ``cv2.imread`` gives); (H, W, 4) is RGBA / BGRA and its alpha is dropped.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if array.dtype != np.uint8:
        raise ValueError(
            f"numpy images must be uint8 (H, W, 3), got dtype {array.dtype}; convert with "
            "np.clip(x, 0, 255).astype(np.uint8), or pass float pixel values to encode() directly"
        )
    if array.ndim == 2:
        array = array[:, :, None].repeat(3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = array.repeat(3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[:, :, :3]
        if channel_order == "bgr":
            array = array[:, :, ::-1]
    else:
        raise ValueError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4) uint8, got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(f"image has no pixels (shape {array.shape})")
    return np.ascontiguousarray(array)


def is_image_path(path: Union[str, os.PathLike]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - opencv-python-headless is a declared dependency
        raise ImportError(
            "resize='opencv' needs OpenCV: pip install opencv-python-headless (or use resize='pillow')"
        ) from e
    return cv2
