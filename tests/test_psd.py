"""layerctl.io.psd: layered PSD writing (alpha in the transparency channel, a correct merged
composite) and reading (groups, masks, hidden layers, kinds it cannot rasterise)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from layerctl.io import psd as lpsd
from layerctl.core.compose import Layer, flatten
from layerctl.errors import LayerctlError


def _rand_layer(rng, h, w, opaque=False):
    px = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if opaque:
        px[..., 3] = 255
    else:
        px[0, :, 3] = 0  # fully transparent row
        px[1, :, 3] = 255  # fully opaque row
    return px


@pytest.fixture()
def stack():
    rng = np.random.default_rng(7)
    return [
        ("Background", _rand_layer(rng, 24, 32, opaque=True), (0, 0)),
        ("Vordergrund ü", _rand_layer(rng, 10, 12), (7, 5)),
        ("edge", _rand_layer(rng, 6, 40), (-5, 20)),  # reaches past left, right and bottom
    ]


def _rgb_close_where_visible(got, want, tol=1):
    vis = want[..., 3] > 0
    if not vis.any():
        return True
    return int(np.abs(got[..., :3].astype(int) - want[..., :3].astype(int))[vis].max()) <= tol


def test_round_trip_through_psd_tools(tmp_path, stack):
    out = lpsd.write_psd(tmp_path / "s.psd", stack, size=(32, 24))
    doc = PSDImage.open(out)
    assert (doc.width, doc.height) == (32, 24)
    assert doc.depth == 8 and doc.color_mode.name == "RGB"
    got = list(doc)
    assert [layer.name for layer in got] == [name for name, _, _ in stack]
    for layer, (name, px, (x, y)) in zip(got, stack):
        assert layer.kind == "pixel"
        assert layer.offset == (x, y)
        assert layer.size == (px.shape[1], px.shape[0])
        # alpha lives in the transparency channel, not in a user mask
        assert not layer.has_mask()
        arr = np.asarray(layer.topil().convert("RGBA"))
        assert np.array_equal(arr[..., 3], px[..., 3]), name
        assert _rgb_close_where_visible(arr, px), name


def test_read_psd_gives_back_the_layers(tmp_path, stack):
    out = lpsd.write_psd(tmp_path / "s.psd", stack)
    doc = lpsd.open_psd(out)
    assert doc.size == (32, 24)  # the bottom layer's size by default
    assert doc.warnings == []
    assert [layer.name for layer in doc.layers] == [name for name, _, _ in stack]
    for layer, (_, px, xy) in zip(doc.layers, stack):
        assert layer.offset == xy
        assert np.array_equal(layer.pixels[..., 3], px[..., 3])
        assert _rgb_close_where_visible(layer.pixels, px)
        assert layer.opacity == 1.0 and layer.visible


def test_merged_composite_is_the_flattened_picture(tmp_path, stack):
    out = lpsd.write_psd(tmp_path / "s.psd", stack)
    want = flatten([Layer(n, px, xy) for n, px, xy in stack], (32, 24))
    doc = PSDImage.open(out)
    # the layer count is negative: the merged image's first alpha channel is its transparency
    assert doc._record.layer_and_mask_information.layer_info.layer_count == -3
    assert doc.has_preview()
    stored = np.asarray(doc.topil().convert("RGBA"))  # psd-tools un-mattes the white it is stored on
    assert np.array_equal(stored[..., 3], want[..., 3])
    assert _rgb_close_where_visible(stored, want)
    # and what a naive reader gets (colour matted on white, as Photoshop stores it)
    raw = doc._record.image_data.get_data(doc._record.header)
    planes = np.stack([np.frombuffer(p, np.uint8).reshape(24, 32) for p in raw], -1).astype(float)
    a = want[..., 3:4] / 255.0
    on_white = want[..., :3] / 255.0 * a + (1 - a)
    assert np.abs(planes[..., :3] / 255.0 - on_white).max() <= 1.5 / 255


def test_composite_is_transparent_where_nothing_is_drawn(tmp_path):
    fg = np.zeros((4, 4, 4), np.uint8)
    fg[..., 0] = 255
    fg[..., 3] = 128
    out = lpsd.write_psd(tmp_path / "t.psd", [("fg", fg, (2, 2))], size=(8, 8))
    stored = np.asarray(PSDImage.open(out).topil().convert("RGBA")).astype(int)
    assert stored[0, 0, 3] == 0
    assert stored[3, 3, 3] == 128
    assert abs(stored[3, 3, 0] - 255) <= 1 and stored[3, 3, 1] <= 1


def test_opacity_and_hidden_layers(tmp_path):
    rng = np.random.default_rng(3)
    bg = _rand_layer(rng, 8, 8, opaque=True)
    fg = _rand_layer(rng, 8, 8)
    layers = [Layer("bg", bg), Layer("fg", fg, opacity=0.5), Layer("ghost", fg, visible=False)]
    out = lpsd.write_psd(tmp_path / "o.psd", layers)
    doc = PSDImage.open(out)
    assert [layer.opacity for layer in doc] == [255, 128, 255]
    assert [layer.visible for layer in doc] == [True, True, False]
    back = lpsd.read_psd(out)
    assert back[1].opacity == pytest.approx(128 / 255)
    assert back[2].visible is False
    want = flatten([Layer("bg", bg), Layer("fg", fg, opacity=128 / 255)], (8, 8))
    assert np.array_equal(lpsd.flatten(out), want)
    stored = np.asarray(doc.topil().convert("RGBA"))
    assert np.abs(stored.astype(int) - want).max() <= 1


def test_float_layers_and_single_layer(tmp_path):
    px = np.zeros((5, 6, 4), np.float32)
    px[..., 1] = 0.5
    px[..., 3] = np.linspace(0, 1, 6)[None, :]
    out = lpsd.write_psd(tmp_path / "f.psd", [("only", px, (0, 0))])
    back = lpsd.read_psd(out)[0]
    assert back.pixels.dtype == np.uint8
    assert np.array_equal(back.pixels[..., 3], np.rint(px[..., 3] * 255).astype(np.uint8))


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path, stack):
    path = tmp_path / "s.psd"
    path.write_bytes(b"precious")
    with pytest.raises(LayerctlError, match="exists"):
        lpsd.write_psd(path, stack)
    assert path.read_bytes() == b"precious"
    lpsd.write_psd(path, stack, overwrite=True)
    assert path.read_bytes()[:4] == b"8BPS"
    assert [p.name for p in tmp_path.iterdir()] == ["s.psd"]  # no temporary files left


def test_bad_layers_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        lpsd.write_psd(tmp_path / "x.psd", [])
    with pytest.raises(ValueError):
        lpsd.write_psd(tmp_path / "x.psd", [("la", np.zeros((4, 4, 2), np.uint8), (0, 0))])
    with pytest.raises(ValueError):
        lpsd.write_psd(tmp_path / "x.psd", [("empty", np.zeros((0, 4, 4), np.uint8), (0, 0))])
    assert not (tmp_path / "x.psd").exists()


def test_rgb_layers_are_opaque(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    back = lpsd.read_psd(lpsd.write_psd(tmp_path / "rgb.psd", [("background", rgb, (0, 0))]))[0]
    assert np.array_equal(back.pixels[..., :3], rgb) and (back.pixels[..., 3] == 255).all()


# ---------------------------------------------------------------- reading other people's PSDs


def _group_psd(path):
    """A PSD made with psd-tools directly: a group at 50% with two overlapping layers, a masked layer."""
    doc = PSDImage.new("RGBA", (16, 16), color=(255, 255, 255, 0))

    def square(n, rgb):
        px = np.zeros((n, n, 4), np.uint8)
        px[..., :3] = rgb
        px[..., 3] = 255
        return Image.fromarray(px, "RGBA")

    doc.create_pixel_layer(square(16, (255, 0, 0)), name="base")
    group = doc.create_group(name="grp", opacity=128)
    group.create_pixel_layer(square(6, (0, 0, 255)), name="a", top=1, left=1)
    group.create_pixel_layer(square(6, (0, 255, 0)), name="b", top=4, left=4)  # overlaps a
    masked = doc.create_pixel_layer(square(4, (0, 255, 0)), name="masked", top=12, left=0)
    mask = np.full((4, 4), 255, np.uint8)
    mask[:, :2] = 0
    masked.create_mask(Image.fromarray(mask, "L"), top=12, left=0)
    doc.save(path)
    return path


def test_groups_are_flattened_in_order(tmp_path):
    path = _group_psd(tmp_path / "g.psd")
    doc = lpsd.open_psd(path)
    assert [layer.name for layer in doc.layers] == ["base", "grp/a", "grp/b", "masked"]
    a = doc.layers[1]
    assert a.offset == (1, 1) and a.opacity == 1.0
    assert a.groups == (("grp", pytest.approx(128 / 255)),) and a.effective_opacity == pytest.approx(128 / 255)
    flat = lpsd.flatten(path)
    # only layer a: blue at 50% over red
    assert np.abs(flat[2, 2].astype(int) - [127, 0, 128, 255]).max() <= 1
    # where b covers a inside the group, the group is green and then 50% over red
    # (folding the group's opacity into each layer would give about (64, 128, 64))
    assert np.abs(flat[5, 5].astype(int) - [127, 128, 0, 255]).max() <= 1
    # the mask hides the left half of the green layer
    assert tuple(flat[13, 0]) == (255, 0, 0, 255)
    assert np.abs(flat[13, 3].astype(int) - [0, 255, 0, 255]).max() <= 1


def test_groups_survive_a_rewrite(tmp_path):
    src = lpsd.open_psd(_group_psd(tmp_path / "g.psd"))
    out = lpsd.write_psd(tmp_path / "again.psd", src.layers, size=src.size)
    doc = PSDImage.open(out)
    assert [layer.name for layer in doc] == ["base", "grp", "masked"]
    grp = list(doc)[1]
    assert grp.is_group() and grp.opacity == 128 and [layer.name for layer in grp] == ["a", "b"]
    assert [layer.name for layer in lpsd.read_psd(out)] == ["base", "grp/a", "grp/b", "masked"]
    assert np.array_equal(lpsd.flatten(out), lpsd.flatten(src.layers, src.size))
    stored = np.asarray(doc.topil().convert("RGBA")).astype(int)
    assert np.abs(stored - lpsd.flatten(src.layers, src.size)).max() <= 1


def test_damaged_psds_give_clear_errors(tmp_path, stack):
    good = lpsd.write_psd(tmp_path / "s.psd", stack)
    cut = tmp_path / "cut.psd"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(LayerctlError, match="truncated or damaged"):
        lpsd.read_psd(cut)
    notpsd = tmp_path / "n.psd"
    notpsd.write_bytes(b"hello world, not a psd at all")
    with pytest.raises(LayerctlError, match="not a PSD"):
        lpsd.read_psd(notpsd)
    with pytest.raises(LayerctlError, match="not found"):
        lpsd.read_psd(tmp_path / "missing.psd")


# ---------------------------------------------------------------- an independent reader


def _imagemagick():
    for exe in ("magick", "convert"):
        path = shutil.which(exe)
        if not path:
            continue
        try:
            ver = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "ImageMagick" in ver:
            return path
    return None


def test_imagemagick_reads_the_same_layers(tmp_path, stack):
    exe = _imagemagick()
    if exe is None:
        pytest.skip("ImageMagick (magick/convert) not installed")
    out = lpsd.write_psd(tmp_path / "s.psd", stack)
    dest = tmp_path / "im"
    dest.mkdir()
    subprocess.run(
        [exe, str(out), "-set", "filename:i", "%p", "+adjoin", f"PNG32:{dest}/layer-%[filename:i].png"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    files = sorted(dest.glob("layer-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    # ImageMagick gives the merged composite first, then one image per layer
    assert len(files) == 1 + len(stack)
    composite = np.asarray(Image.open(files[0]).convert("RGBA"))
    want = flatten([Layer(n, px, xy) for n, px, xy in stack], (32, 24))
    assert composite.shape == want.shape
    assert np.array_equal(composite[..., 3], want[..., 3])
    assert _rgb_close_where_visible(composite, want)
    for f, (name, px, _) in zip(files[1:], stack):
        got = np.asarray(Image.open(f).convert("RGBA"))
        assert got.shape == px.shape, name
        assert np.array_equal(got[..., 3], px[..., 3]), name
        assert _rgb_close_where_visible(got, px), name
    # offsets, as ImageMagick reports them (page geometry)
    geo = subprocess.run(
        [exe, str(out), "-format", "%X %Y\n", "info:"], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split("\n")
    offsets = [tuple(int(v) for v in line.split()) for line in geo if line.strip()][1:]
    assert offsets == [xy for _, _, xy in stack]


def test_role_psd_orders_layers_bottom_to_top(tmp_path):
    rng = np.random.default_rng(11)
    fg, bg, bl = (rng.integers(0, 256, (8, 8, 4), dtype=np.uint8) for _ in range(3))
    out = lpsd.write_role_psd(tmp_path / "r.psd", {"foreground": fg, "background": bg[..., :3], "blended": bl[..., :3]})
    layers = lpsd.read_psd(out)
    assert [layer.name for layer in layers] == ["background", "blended", "foreground"]
    assert np.array_equal(layers[2].pixels[..., 3], fg[..., 3])
    single = lpsd.read_psd(lpsd.write_role_psd(tmp_path / "t.psd", {"transparent": fg}))
    assert [layer.name for layer in single] == ["transparent"]
