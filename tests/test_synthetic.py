"""The procedural RGBA source: deterministic, covers the alpha cases, enumerable, captioned."""

import numpy as np
import pytest

from layerctl.training.synthetic import (
    COLOURS,
    MATERIALS,
    SHAPES,
    SyntheticSource,
    coverage_hard,
    coverage_soft,
    draw_object,
    SyntheticObject,
    _grid,
    sd_box,
    sd_circle,
    sd_polygon,
)


def test_same_seed_same_pixels_other_seed_differs():
    a = SyntheticSource(seed=7).sample(3, 64)
    b = SyntheticSource(seed=7).sample(3, 64)
    c = SyntheticSource(seed=8).sample(3, 64)
    assert a.rgba.shape == (64, 64, 4) and a.rgba.dtype == np.float32
    assert np.array_equal(a.rgba, b.rgba) and a.caption == b.caption
    assert not np.array_equal(a.rgba, c.rgba)
    # sample order does not matter (random access by index)
    src = SyntheticSource(seed=7)
    src.sample(10, 64)
    assert np.array_equal(src.sample(3, 64).rgba, a.rgba)


def test_values_in_range_and_invisible_rgb_zero():
    src = SyntheticSource(seed=1)
    for i in range(12):
        s = src.sample(i, 64)
        assert s.rgba.min() >= 0.0 and s.rgba.max() <= 1.0
        a = s.rgba[..., 3]
        assert np.all(s.rgba[a == 0][:, :3] == 0)
        assert a.max() > 0.05, f"sample {i} is empty"


def test_alpha_cases_are_all_present():
    """Over a few dozen samples: hard edges, feathering, glass (semi-transparent fill), strands."""
    src = SyntheticSource(seed=0)
    semi_fraction = []
    for i in range(40):
        a = src.sample(i, 64).rgba[..., 3]
        semi_fraction.append(((a > 0.02) & (a < 0.98)).mean())
    assert max(semi_fraction) > 0.15  # glass / soft objects: large semi-transparent areas
    assert min(semi_fraction) < 0.06  # solid objects: only an anti-aliased rim


def test_each_material_behaves():
    x, y = _grid(64, 64)
    rng = np.random.default_rng(0)
    solid = draw_object(x, y, SyntheticObject("disc", "solid", "red", None, 32, 32, 16), rng)[1]
    soft = draw_object(x, y, SyntheticObject("disc", "soft", "red", None, 32, 32, 16), rng)[1]
    glass = draw_object(x, y, SyntheticObject("box", "glass", "blue", None, 32, 32, 16), rng)[1]
    hair = draw_object(x, y, SyntheticObject("strands", "solid", "brown", None, 32, 32, 16), rng)[1]
    assert solid[32, 32] == 1.0 and solid[0, 0] == 0.0
    ramp = lambda a: ((a > 0.01) & (a < 0.99)).sum()  # noqa: E731
    assert ramp(soft) > 3 * ramp(solid)
    assert 0.1 < glass[32, 34] < 0.99 or 0.1 < glass[30, 36] < 0.99  # semi-transparent inside
    assert hair.max() > 0.2 and (hair > 0.9).mean() < 0.2  # thin, partly covered pixels


def test_restricted_source_and_captions():
    src = SyntheticSource(seed=3, shapes=["disc"], materials=["glass"], max_objects=1)
    for i in range(5):
        s = src.sample(i, 64)
        assert s.caption == "glass ball"
        assert [o.shape for o in s.objects] == ["disc"]
    src = SyntheticSource(seed=3, shapes=["disc"], materials=["solid"], colours=["red"], max_objects=1)
    assert src.sample(0, 64).caption == "red ball"
    multi = SyntheticSource(seed=3, min_objects=3, max_objects=3).sample(0, 64)
    assert len(multi.objects) == 3 and multi.caption.count(", ") == 2


def test_enumerations_and_bad_names():
    assert {"disc", "strands", "cup"} <= set(SHAPES)
    assert set(MATERIALS) == {"solid", "soft", "glass", "gradient"}
    assert "red" in COLOURS and len(COLOURS) >= 8
    with pytest.raises(ValueError, match="unknown shape"):
        SyntheticSource(shapes=["dodecahedron"])
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticSource(min_objects=3, max_objects=2)


def test_signed_distances_on_known_points():
    x = np.array([[0.0, 10.0, 13.0]], dtype=np.float32)
    y = np.zeros_like(x)
    np.testing.assert_allclose(sd_circle(x, y, 10, 0, 2), [[8, -2, 1]])
    np.testing.assert_allclose(sd_box(x, y, 10, 0, 2, 2), [[8, -2, 1]], atol=1e-6)
    square = np.array([[8, -2], [12, -2], [12, 2], [8, 2]], dtype=np.float32)
    np.testing.assert_allclose(sd_polygon(x, y, square), [[8, -2, 1]], atol=1e-6)
    np.testing.assert_allclose(coverage_hard(np.array([-1.0, 0.0, 1.0])), [1.0, 0.5, 0.0])
    soft = coverage_soft(np.array([-10.0, 0.0, 10.0]), 4.0)
    np.testing.assert_allclose(soft, [1.0, 0.5, 0.0])


def test_non_square_size():
    s = SyntheticSource(seed=2).sample(0, (64, 128))
    assert s.rgba.shape == (64, 128, 4)
