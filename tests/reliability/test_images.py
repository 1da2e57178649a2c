"""Images users hand us: every mode becomes (H, W, 3) uint8 RGB, EXIF orientation applied; broken files
get an error naming the file."""

import numpy as np
import pytest
from PIL import Image

from odise_pl.data.io import load_image
from odise_pl.errors import DatasetError


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "RGB"])
def test_modes_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (12, 16), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    arr = load_image(path)
    assert arr.shape == (12, 16, 3) and arr.dtype == np.uint8
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert 0 < arr.mean() < 255 and arr.max() > 200


def test_exif_rotation_is_applied(tmp_path):
    im = Image.fromarray(np.zeros((10, 30, 3), np.uint8))  # 30 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "r.jpg"
    im.save(path, exif=exif)
    assert load_image(path).shape == (30, 10, 3)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_zero_bytes_and_truncated(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="bad.jpg"):
        load_image(path)


def test_truncated_png(tmp_path):
    good = tmp_path / "g.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "t.png"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="t.png"):
        load_image(bad)
