"""Reading what datasets are made of: images, panoptic PNGs, JSON annotation files.

Every reader gives one :class:`~odise_pl.errors.DatasetError` naming the file and the fix for a
missing, corrupt, oversized or mistyped input, never a library's traceback.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from odise_pl.errors import DatasetError

try:
    import pyspng as _spng
except ImportError:  # optional speed-up; Pillow is the fallback
    _spng = None


def max_image_pixels() -> int:
    """Largest image (pixels) we decode: ``ODISE_MAX_IMAGE_PIXELS`` (0 = no limit), else Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (about 89 MPixels; COCO's largest image has 0.4).
    """
    env = os.environ.get("ODISE_MAX_IMAGE_PIXELS")
    if env is not None:
        try:
            return int(env)
        except ValueError as err:
            raise DatasetError(f"ODISE_MAX_IMAGE_PIXELS={env!r} is not an integer") from err
    return int(Image.MAX_IMAGE_PIXELS or 0)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding its pixels (a 0.2 MB PNG can
    claim 64 MPixels: check this before :func:`load_image`). :class:`DatasetError` if the file is
    missing or not an image Pillow reads.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the caller's limit, not Pillow's
    try:
        with Image.open(path) as im:
            return im.width, im.height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied; a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"image not found: {path} (check the dataset root / the image folder in the config)"
        )
    try:
        # Our limit replaces Pillow's own check (which would refuse images over 2x its limit at
        # open time, whatever ODISE_MAX_IMAGE_PIXELS says).
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            opened = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        with opened as im:
            _check_pixels(path, im.width, im.height, "image")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, don't clip
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"cannot decode image {path}: {err}. The file is corrupt or not an image; re-download it or "
            "remove its entry from the annotation JSON"
        ) from err


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 ids, id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header (its IHDR chunk), or None when ``data`` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _check_pixels(path: Path, width: int, height: int, what: str) -> None:
    limit = max_image_pixels()
    if limit and width * height > limit:  # checked on the header, before decoding
        raise DatasetError(
            f"{what} {path} is {width}x{height} = {width * height / 1e6:.0f} MPixels, over the limit of "
            f"{limit / 1e6:.0f} MPixels (a guard against decompression bombs and out-of-memory workers). "
            "Downscale the file, or raise the limit with the environment variable "
            "ODISE_MAX_IMAGE_PIXELS=<pixels> (0: no limit)"
        )


def read_ids(path: str | Path) -> np.ndarray:
    """Panoptic PNG -> (H, W) uint32 ids, id = R + 256 G + 256^2 B.

    Its size is checked against :func:`max_image_pixels` on the header, before anything is decoded
    (training, evaluation and the PQ command all read through here). Decoded straight into an RGBA
    buffer read as little-endian uint32 (alpha masked off): one pass after PNG decoding instead of
    three channel casts and shifts. libspng (pyspng) decodes ~2x faster than Pillow and dominates
    evaluation time; Pillow reads what it cannot (e.g. palette PNGs).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read panoptic PNG {path}: {err.strerror or err}") from err
    size = png_size(data)
    if size is not None:
        _check_pixels(path, *size, "panoptic PNG")
    if _spng is not None and size is not None:
        try:
            rgba = _spng.load(data, format="RGBA")
        except Exception:  # not a PNG libspng reads (or corrupt): Pillow decides and explains
            rgba = None
        if rgba is not None and rgba.dtype == np.uint8 and rgba.ndim == 3:
            ids = np.ascontiguousarray(rgba).view("<u4")[..., 0]
            return ids & np.uint32(0xFFFFFF)
    try:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit, checked below
        try:
            opened = Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        with opened as im:
            _check_pixels(path, im.width, im.height, "panoptic PNG")
            im = im.convert("RGBA") if im.mode != "RGBA" else im
            ids = np.frombuffer(im.tobytes(), dtype="<u4").reshape(im.height, im.width)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot decode panoptic PNG {path}: {err}; re-download or regenerate it") from err
    return ids & np.uint32(0xFFFFFF)


def ids_to_rgb(seg: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B (COCO panoptic PNG encoding)."""
    return np.stack([seg % 256, seg // 256 % 256, seg // 256**2 % 256], -1).astype(np.uint8)


def read_json(path: Path, what: str, fix: str):
    """A JSON file's contents; a missing file, bytes that are not UTF-8 or text that is not JSON is a
    :class:`DatasetError` naming the file (and where in it).
    """
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}. {fix}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r}); "
            "JSON files must be UTF-8: re-download it or re-save it as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{what} {path} is not valid JSON ({err}); re-download or regenerate it") from None


def is_json(value, kind: type) -> bool:
    """Whether a JSON value has the Python type ``kind`` (a boolean is not an integer)."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def json_kind(value) -> str:
    """JSON's name for a value's type."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
