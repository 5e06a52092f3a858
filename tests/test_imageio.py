"""layerctl.io.imageio: load_image for every Pillow mode, EXIF orientation, PSD input, damaged
files and the decompression-bomb limit; save_png / read_metadata."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from layerctl.errors import LayerctlError
from layerctl.io.imageio import load_image, read_metadata, save_png


def arr(im):
    return np.asarray(im).astype(int)


def _png16(path, data: np.ndarray, color_type: int):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB/RGBA). data: HxWxC uint16."""
    h, w = data.shape[:2]
    raw = b"".join(b"\x00" + data[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putdata([0, 1, 0, 1])
    im.save(tmp_path / "p.png", transparency=1)
    got = arr(load_image(tmp_path / "p.png"))
    assert got[0, 0].tolist() == [255, 0, 0, 255]
    assert got[0, 1, 3] == 0


def test_la_and_rgb(tmp_path):
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = [[10, 20], [30, 40]]
    la[..., 1] = [[0, 100], [200, 255]]
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = arr(load_image(tmp_path / "la.png"))
    assert got[..., 0].tolist() == got[..., 2].tolist() == la[..., 0].tolist()
    assert got[..., 3].tolist() == la[..., 1].tolist()
    rgb = arr(load_image(tmp_path / "la.png", mode="RGB"))
    assert rgb.shape == (2, 2, 3)


def test_16_bit_grey_keeps_its_range(tmp_path):
    Image.fromarray(np.array([[0, 65535, 32896, 1000]], np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = arr(load_image(tmp_path / "g16.png"))
    assert got[0, :, 0].tolist() == [0, 255, 128, 4]
    assert (got[..., 3] == 255).all()


def test_16_bit_rgba(tmp_path):
    data = np.zeros((2, 3, 4), np.uint16)
    data[..., 0] = 65535
    data[..., 1] = 257 * 100
    data[..., 3] = [[0, 257 * 128, 65535], [65535, 65535, 65535]]
    _png16(tmp_path / "rgba16.png", data, color_type=6)
    got = arr(load_image(tmp_path / "rgba16.png"))
    assert np.abs(got - data / 257.0).max() <= 1


def test_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    got = arr(load_image(tmp_path / "f.tif"))
    assert got[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_without_profile(tmp_path):
    im = Image.new("CMYK", (2, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # pure cyan
    im.putpixel((1, 0), (0, 0, 0, 255))  # black ink
    im.save(tmp_path / "c.tif")
    got = arr(load_image(tmp_path / "c.tif"))
    assert got[0, 0].tolist() == [0, 255, 255, 255]
    assert got[0, 1].tolist() == [0, 0, 0, 255]
    im.convert("RGB").convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    got = arr(load_image(tmp_path / "c.jpg"))
    assert abs(got[0, 0, 0] - 0) <= 12 and got[0, 0, 2] >= 240


def test_exif_orientation_is_applied(tmp_path):
    px = np.zeros((16, 24, 3), np.uint8)
    px[:8, :8] = (255, 0, 0)  # top-left marker
    im = Image.fromarray(px, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "o.jpg", exif=exif, quality=100, subsampling=0)
    got = arr(load_image(tmp_path / "o.jpg"))
    assert got.shape == (24, 16, 4)
    # after a 90 degree clockwise turn the stored top-left corner sits at the top-right
    assert got[2:6, 10:14, 0].min() > 200 and got[2:6, 2:6, 0].max() < 60


def test_webp_and_tiff_rgba(tmp_path):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.webp", lossless=True, exact=True)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.tif")
    for name in ("a.webp", "a.tif"):
        got = arr(load_image(tmp_path / name))
        assert np.array_equal(got[..., 3], px[..., 3]), name
        vis = px[..., 3] > 0
        assert np.abs(got[..., :3] - px[..., :3])[vis].max() <= 0, name


def test_psd_input_uses_the_composite(tmp_path):
    from layerctl.io.psd import flatten, write_psd

    rng = np.random.default_rng(1)
    bg = rng.integers(0, 256, (10, 10, 4), dtype=np.uint8)
    bg[..., 3] = 255
    fg = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    path = write_psd(tmp_path / "in.psd", [("bg", bg, (0, 0)), ("fg", fg, (3, 3))])
    got = arr(load_image(path))
    want = flatten(path).astype(int)
    assert np.array_equal(got[..., 3], want[..., 3])
    assert np.abs(got - want).max() <= 1
    # the extension does not matter, the signature does
    renamed = tmp_path / "in.png"
    renamed.write_bytes(path.read_bytes())
    assert np.abs(arr(load_image(renamed)) - want).max() <= 1


def test_damaged_and_missing_files(tmp_path):
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(LayerctlError, match="not an image"):
        load_image(tmp_path / "t.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerctlError, match="truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(LayerctlError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(LayerctlError, match="not a file"):
        load_image(tmp_path)


def test_decompression_bomb_limit_is_kept(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    from layerctl.io.psd import write_psd

    write_psd(tmp_path / "big.psd", [("l", np.zeros((40, 40, 4), np.uint8), (0, 0))])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x 100
    for name in ("big.png", "big.psd"):
        with pytest.raises(LayerctlError, match="decompression-bomb"):
            load_image(tmp_path / name)


def test_save_png_round_trip_and_metadata(tmp_path):
    px = np.zeros((3, 4, 4), np.uint8)
    px[..., 3] = 77
    path = save_png(tmp_path / "m.png", px, metadata={"prompt": "cup", "seed": 3})
    assert read_metadata(path) == {"prompt": "cup", "seed": 3}
    assert np.array_equal(np.asarray(load_image(path)), px)
    with pytest.raises(LayerctlError, match="exists"):
        save_png(path, px)
