"""Image math on known numbers, and pad_rgb parity with the official fixtures."""

from pathlib import Path

import numpy as np
import pytest
import torch

from layerctl.core.imagemath import (
    checkerboard,
    composite_over,
    flatten_on_grey,
    pad_rgb,
    pad_rgb_torch,
    premultiply,
    to_float,
    to_uint8,
)

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-v1"


def _fixture(name):
    path = REF / "fixtures" / name
    if not path.exists():
        pytest.skip(f"reference fixtures not found: {path}")
    return np.load(path)


def _rgba(rgb, a, h=4, w=4):
    out = np.empty((h, w, 4), np.float32)
    out[..., :3] = rgb
    out[..., 3] = a
    return out


# ---------------------------------------------------------------- conversions


def test_to_uint8_rounds_once_and_clips():
    x = np.array([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 127.5 / 255 - 1e-4, 0.5, 1.0, 1.7], np.float32)
    assert to_uint8(x).tolist() == [0, 0, 0, 1, 127, 128, 255, 255]
    assert to_uint8(x).dtype == np.uint8


def test_to_float_roundtrip_every_byte():
    u = np.arange(256, dtype=np.uint8)
    f = to_float(u)
    assert f.dtype == np.float32 and f[0] == 0.0 and f[-1] == 1.0
    assert np.array_equal(to_uint8(f), u)


# ---------------------------------------------------------------- compositing


def test_premultiply_and_flatten_on_grey():
    img = _rgba([1.0, 0.2, 0.0], 0.5, 2, 2)
    pm = premultiply(img)
    np.testing.assert_allclose(pm[0, 0], [0.5, 0.1, 0.0, 0.5], atol=1e-7)
    flat = flatten_on_grey(img)
    np.testing.assert_allclose(flat[0, 0], [0.75, 0.35, 0.25], atol=1e-7)
    assert np.allclose(flatten_on_grey(_rgba([0.9, 0.1, 0.3], 0.0)), 0.5)
    assert np.allclose(flatten_on_grey(_rgba([0.9, 0.1, 0.3], 1.0)), [0.9, 0.1, 0.3])
    assert np.allclose(flatten_on_grey(_rgba([0.9, 0.1, 0.3], 0.0), grey=0.25), 0.25)


def test_composite_opaque_top_wins_and_transparent_top_vanishes():
    bg = _rgba([0.1, 0.2, 0.3], 0.6)
    top = _rgba([0.9, 0.8, 0.7], 1.0)
    np.testing.assert_allclose(composite_over(top, bg), top, atol=1e-7)
    invisible = _rgba([0.9, 0.8, 0.7], 0.0)
    np.testing.assert_allclose(composite_over(invisible, bg), bg, atol=1e-7)


def test_composite_half_grey_over_white_and_opaque_rgb_background():
    fg = _rgba([0.5, 0.5, 0.5], 0.5)
    white = np.ones((4, 4, 3), np.float32)  # HxWx3: opaque
    out = composite_over(fg, white)
    np.testing.assert_allclose(out[0, 0], [0.75, 0.75, 0.75, 1.0], atol=1e-7)


def test_composite_semi_over_semi():
    red = _rgba([1, 0, 0], 0.5)
    blue = _rgba([0, 0, 1], 0.5)
    out = composite_over(red, blue)
    # a = 0.5 + 0.5*0.5 = 0.75; rgb = (0.5*red + 0.25*blue) / 0.75
    np.testing.assert_allclose(out[0, 0], [2 / 3, 0, 1 / 3, 0.75], atol=1e-6)
    # both empty: alpha 0, colour 0 (no NaN)
    none = composite_over(_rgba([1, 1, 1], 0), _rgba([1, 1, 1], 0))
    assert np.all(none == 0)


def test_composite_rejects_size_mismatch():
    with pytest.raises(ValueError):
        composite_over(_rgba(0, 1, 4, 4), np.zeros((4, 5, 3), np.float32))


def test_checkerboard_preview():
    img = _rgba([1, 0, 0], 0.0, 8, 8)
    img[0, 0] = [1, 0, 0, 1]
    prev = checkerboard(img, cell=4)
    assert prev.shape == (8, 8, 3)
    np.testing.assert_allclose(prev[0, 0], [1, 0, 0])
    np.testing.assert_allclose(prev[1, 1], [0.45] * 3, atol=1e-7)  # top-left cell dark
    np.testing.assert_allclose(prev[0, 4], [0.55] * 3, atol=1e-7)
    np.testing.assert_allclose(prev[4, 0], [0.55] * 3, atol=1e-7)
    np.testing.assert_allclose(prev[5, 5], [0.45] * 3, atol=1e-7)


# ---------------------------------------------------------------- pad_rgb on known numbers


def test_pad_rgb_opaque_is_unchanged():
    rng = np.random.default_rng(0)
    img = rng.random((13, 17, 4)).astype(np.float32)
    img[..., 3] = 1.0
    np.testing.assert_array_equal(pad_rgb(img), img[..., :3])


def test_pad_rgb_single_visible_colour_fills_everything():
    rng = np.random.default_rng(1)
    img = rng.random((20, 30, 4)).astype(np.float32)  # loud colours under alpha 0
    alpha = np.zeros((20, 30), np.float32)
    alpha[5:9, 3:12] = rng.random((4, 9)).astype(np.float32) * 0.9 + 0.1
    img[..., 3] = alpha
    img[alpha > 0, :3] = [0.2, 0.6, 0.9]
    np.testing.assert_allclose(pad_rgb(img), np.broadcast_to([0.2, 0.6, 0.9], (20, 30, 3)), atol=2e-6)


def test_pad_rgb_invisible_pixel_gets_alpha_weighted_mean():
    img = np.zeros((2, 2, 4), np.float32)
    img[0, 0] = [1, 0, 0, 1.0]
    img[0, 1] = [0, 0, 1, 0.5]
    img[1, 0] = [0, 1, 0, 0.0]  # invisible: its green must not leak
    img[1, 1] = [0.3, 0.3, 0.3, 0.0]
    out = pad_rgb(img)
    mean = (1.0 * np.array([1, 0, 0]) + 0.5 * np.array([0, 0, 1])) / 1.5
    np.testing.assert_allclose(out[1, 0], mean, atol=1e-6)
    np.testing.assert_allclose(out[1, 1], mean, atol=1e-6)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0], atol=1e-7)
    # semi-transparent pixel: c*a + fill*(1-a), not c
    np.testing.assert_allclose(out[0, 1], 0.5 * np.array([0, 0, 1]) + 0.5 * mean, atol=1e-6)


def test_pad_rgb_ignores_colour_under_zero_alpha_and_transparent_is_zero():
    rng = np.random.default_rng(2)
    a = rng.random((33, 21, 4)).astype(np.float32)
    a[..., 3] = (rng.random((33, 21)) > 0.6) * rng.random((33, 21)).astype(np.float32)
    b = a.copy()
    hidden = b[..., 3] == 0
    b[hidden, :3] = rng.random((int(hidden.sum()), 3)).astype(np.float32)
    np.testing.assert_array_equal(pad_rgb(a), pad_rgb(b))
    empty = rng.random((16, 16, 4)).astype(np.float32)
    empty[..., 3] = 0
    assert np.all(pad_rgb(empty) == 0)


def test_pad_rgb_accepts_uint8():
    rng = np.random.default_rng(3)
    u = rng.integers(0, 256, (9, 14, 4), dtype=np.uint8)
    np.testing.assert_array_equal(pad_rgb(u), pad_rgb(u.astype(np.float32) / np.float32(255)))


# ---------------------------------------------------------------- pad_rgb parity (official fixtures)


def _pad_cases():
    z = _fixture("pad_rgb.npz")
    cases = sorted({k.split("__")[0] for k in z.files})
    assert len(cases) == 9
    return z, cases


def test_pad_rgb_matches_official_fixtures():
    z, cases = _pad_cases()
    for case in cases:
        out = pad_rgb(z[f"{case}__rgba"])
        exp = z[f"{case}__padded"]
        assert out.shape == exp.shape and out.dtype == np.float32
        err = float(np.abs(out - exp).max())
        assert err <= 1e-6, f"{case}: max abs diff {err}"
    assert np.all(pad_rgb(z["transparent_64x64__rgba"]) == 0)
    opaque = z["opaque_48x64__rgba"]
    np.testing.assert_array_equal(pad_rgb(opaque), opaque[..., :3].astype(np.float32) / np.float32(255))


def test_pad_rgb_torch_matches_numpy_on_fixtures_and_batches():
    z, cases = _pad_cases()
    for case in cases:
        rgba = z[f"{case}__rgba"]
        t = torch.from_numpy(rgba).permute(2, 0, 1)[None].float() / 255.0
        out = pad_rgb_torch(t)[0].permute(1, 2, 0).numpy()
        err = float(np.abs(out - z[f"{case}__padded"]).max())
        assert err <= 1e-6, f"{case}: torch max abs diff {err}"
    # a batch pads each image on its own
    a = z["strands_128x128__rgba"]
    b = z["gradient_128x128__rgba"]
    batch = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 255.0
    out = pad_rgb_torch(batch).permute(0, 2, 3, 1).numpy()
    assert np.abs(out[0] - z["strands_128x128__padded"]).max() <= 1e-6
    assert np.abs(out[1] - z["gradient_128x128__padded"]).max() <= 1e-6
