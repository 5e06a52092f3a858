"""layerctl.core.compose and `layerctl compose`: compositing numbers, placement, clipping, options,
YAML stacks, PSD in/out, and the error cases (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from layerctl.core.compose import Layer, composite_layers, flatten, scale_pixels
from layerctl.errors import LayerctlError


def solid(h, w, rgba):
    return np.broadcast_to(np.array(rgba, np.uint8), (h, w, 4)).copy()


# ---------------------------------------------------------------- compositing on known numbers


def test_opaque_over_anything_is_the_top():
    rng = np.random.default_rng(0)
    bottom = rng.integers(0, 256, (5, 5, 4), dtype=np.uint8)
    top = rng.integers(0, 256, (5, 5, 4), dtype=np.uint8)
    top[..., 3] = 255
    out = flatten([Layer("b", bottom), Layer("t", top)], (5, 5))
    assert np.array_equal(out, top)


def test_alpha_zero_leaves_the_bottom():
    rng = np.random.default_rng(1)
    bottom = rng.integers(0, 256, (5, 5, 4), dtype=np.uint8)
    bottom[..., 3] = rng.integers(1, 256, (5, 5))
    top = rng.integers(0, 256, (5, 5, 4), dtype=np.uint8)
    top[..., 3] = 0
    out = flatten([Layer("b", bottom), Layer("t", top)], (5, 5))
    assert np.array_equal(out, bottom)


def test_half_grey_over_white():
    out = flatten([Layer("w", solid(2, 2, (255, 255, 255, 255))), Layer("g", solid(2, 2, (128, 128, 128, 128)))], (2, 2))
    a = 128 / 255
    want = round((128 / 255 * a + 1.0 * (1 - a)) * 255)  # 191.25... -> 191
    assert out[0, 0].tolist() == [want, want, want, 255]
    assert want == 191


def test_semi_over_semi_colour_and_alpha():
    # red at alpha 0.6 over blue at alpha 0.5: a = 0.6 + 0.5*0.4 = 0.8,
    # rgb = (1*0.6, 0, 1*0.5*0.4) / 0.8 = (0.75, 0, 0.25)
    red = np.zeros((1, 1, 4), np.float32)
    red[..., 0], red[..., 3] = 1.0, 0.6
    blue = np.zeros((1, 1, 4), np.float32)
    blue[..., 2], blue[..., 3] = 1.0, 0.5
    f = composite_layers([Layer("blue", blue), Layer("red", red)], (1, 1))[0, 0]
    assert f == pytest.approx([0.75, 0.0, 0.25, 0.8], abs=1e-6)
    out = flatten([Layer("blue", blue), Layer("red", red)], (1, 1))[0, 0]
    assert out.tolist() == [191, 0, 64, 204]


def test_rounded_once_at_the_end():
    # ten layers of 1/255-ish alpha: rounding after each step would drift; float keeps it exact
    layers = [Layer("bg", solid(1, 1, (0, 0, 0, 255)))] + [Layer(f"l{i}", solid(1, 1, (255, 255, 255, 3))) for i in range(10)]
    a = 3 / 255
    want = 1 - (1 - a) ** 10
    assert flatten(layers, (1, 1))[0, 0, 0] == round(want * 255)


def test_opacity_multiplies_alpha():
    out = flatten([Layer("w", solid(1, 1, (255, 255, 255, 255))), Layer("k", solid(1, 1, (0, 0, 0, 255)), opacity=0.25)], (1, 1))
    assert out[0, 0].tolist() == [191, 191, 191, 255]
    hidden = flatten([Layer("w", solid(1, 1, (255, 255, 255, 255))), Layer("k", solid(1, 1, (0, 0, 0, 255)), visible=False)], (1, 1))
    assert hidden[0, 0].tolist() == [255, 255, 255, 255]


def test_placement_and_clipping():
    bg = solid(4, 6, (0, 0, 0, 255))
    fg = np.zeros((3, 3, 4), np.uint8)
    fg[..., 3] = 255
    fg[..., 0] = np.arange(9).reshape(3, 3) * 20 + 10  # each pixel distinct
    out = flatten([Layer("bg", bg), Layer("fg", fg, (-1, 2))], (6, 4))  # sticks out left and bottom
    assert out[2, 0, 0] == fg[0, 1, 0] and out[2, 1, 0] == fg[0, 2, 0]
    assert out[3, 0, 0] == fg[1, 1, 0]
    assert out[2, 2, 0] == 0 and out[1, 0, 0] == 0  # untouched
    far = flatten([Layer("bg", bg), Layer("fg", fg, (50, 50))], (6, 4))
    assert np.array_equal(far, bg)
    # an empty canvas stays transparent
    assert flatten([Layer("fg", fg, (10, 10))], (2, 2)).sum() == 0


def test_scaling_premultiplies_so_edges_keep_their_colour():
    px = np.zeros((8, 8, 4), np.uint8)
    px[2:6, 2:6] = (255, 0, 0, 255)  # red square; invisible pixels are black
    big = scale_pixels(px, 2.5)
    assert big.shape == (20, 20, 4)
    seen = big[..., 3] > 0.05
    assert seen.any() and (big[..., 3] < 0.95)[seen].any()  # there are soft edge pixels
    assert big[..., 0][seen].min() > 0.97  # no dark fringe from the black around it
    assert np.abs(big[..., 1:3][seen]).max() < 0.03


def fur_scene(h=96, w=96, strands=260, seed=0):
    """Float fg colour, a fur-like alpha (a soft disc with thin hairs) and a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    bg = np.stack([xx / (w - 1), yy / (h - 1), 0.5 + 0.25 * np.sin(xx / 5.0) * np.cos(yy / 7.0)], -1)
    bg = np.clip(bg + rng.normal(0, 0.03, bg.shape), 0, 1)
    fg = np.stack(
        [0.55 + 0.2 * np.sin(xx / 3.0), 0.35 + 0.1 * np.cos(yy / 4.0), 0.2 + 0.05 * np.sin((xx + yy) / 2.0)], -1
    )
    cy, cx, r = h / 2, w / 2, min(h, w) * 0.28
    body = np.clip((r - np.hypot(yy - cy, xx - cx)) / 1.5 + 0.5, 0, 1)
    keep = np.ones((h, w))
    for _ in range(strands):
        t = rng.uniform(0, 2 * np.pi)
        bend = rng.normal(0, 0.25)
        length = rng.uniform(0.25, 0.6) * min(h, w) * 0.5
        x0, y0 = cx + (r - 2) * np.cos(t), cy + (r - 2) * np.sin(t)
        vx, vy = length * np.cos(t + bend), length * np.sin(t + bend)
        s = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx * vx + vy * vy), 0, 1)
        dist = np.hypot(xx - (x0 + s * vx), yy - (y0 + s * vy))
        hair = np.exp(-0.5 * (dist / rng.uniform(0.35, 0.8)) ** 2) * (1 - s) ** 0.7 * rng.uniform(0.5, 1.0)
        keep *= 1 - hair
    return np.clip(fg, 0, 1), 1 - (1 - body) * keep, bg


def test_fur_foreground_over_its_background_reproduces_the_picture(tmp_path):
    fg, a, bg = fur_scene()
    soft = (a > 0.02) & (a < 0.98)
    assert soft.mean() > 0.3  # the alpha really is soft over much of the picture
    picture = np.rint((fg * a[..., None] + bg * (1 - a[..., None])) * 255).astype(np.uint8)
    fg8 = np.dstack([np.rint(fg * 255), np.rint(a * 255)]).astype(np.uint8)
    bg8 = np.rint(bg * 255).astype(np.uint8)
    Image.fromarray(fg8, "RGBA").save(tmp_path / "fg.png")
    Image.fromarray(bg8, "RGB").save(tmp_path / "bg.png")
    for out in ("flat.png", "layers.psd"):
        run_cli(["compose", str(tmp_path / "bg.png"), str(tmp_path / "fg.png"), "--out", str(tmp_path / out)])
    flat = np.asarray(Image.open(tmp_path / "flat.png"))
    err = np.abs(flat[..., :3].astype(int) - picture)
    # 8-bit layers (colour and alpha each rounded) recomposed: measured max 1/255, mean 0.124/255
    assert err.max() <= 1 and err.mean() < 0.2
    assert (flat[..., 3] == 255).all()
    from layerctl.io.psd import flatten as psd_flatten

    assert np.array_equal(psd_flatten(tmp_path / "layers.psd"), flat)


# ---------------------------------------------------------------- the command


def run_cli(argv, expect=0):
    from layerctl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == expect, argv
    return exc.value.code


@pytest.fixture()
def files(tmp_path):
    bg = np.zeros((20, 30, 3), np.uint8)
    bg[..., 2] = 200
    Image.fromarray(bg, "RGB").save(tmp_path / "bg.png")
    fg = np.zeros((8, 8, 4), np.uint8)
    fg[..., 0] = 255
    fg[..., 3] = 255
    fg[0, 0, 3] = 0
    Image.fromarray(fg, "RGBA").save(tmp_path / "fg.png")
    return tmp_path


def test_cli_png_with_position_opacity_and_rename(files, capsys):
    out = files / "o.png"
    run_cli(
        ["compose", str(files / "bg.png"), str(files / "fg.png"), "--name", "fg=sticker", "--at", "sticker=25,-2",
         "--opacity", "fg=0.5", "--out", str(out)]
    )
    assert capsys.readouterr().out.strip() == str(out)
    img = np.asarray(Image.open(out))
    assert img.shape == (20, 30, 4)  # the bottom layer's size
    assert img[0, 26].tolist() == [128, 0, 100, 255]  # red at 0.5 over (0, 0, 200)
    assert img[0, 24].tolist() == [0, 0, 200, 255]  # left of the sticker
    assert img[10, 26].tolist() == [0, 0, 200, 255]  # below it


def test_cli_psd_size_scale_and_list(files, capsys):
    out = files / "o.psd"
    run_cli(["compose", str(files / "bg.png"), str(files / "fg.png"), "--scale", "fg=2", "--at", "fg=3,4",
             "--size", "40x30", "--out", str(out)])
    capsys.readouterr()
    run_cli(["compose", str(out), "--list", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["width"], r["height"], r["x"], r["y"]) for r in rows] == [("bg", 30, 20, 0, 0), ("fg", 16, 16, 3, 4)]
    from psd_tools import PSDImage

    doc = PSDImage.open(out)
    assert (doc.width, doc.height) == (40, 30)


def test_cli_flatten_and_extract_psd(files, capsys):
    psd = files / "o.psd"
    run_cli(["compose", str(files / "bg.png"), str(files / "fg.png"), "--at", "fg=2,2", "--out", str(psd)])
    run_cli(["compose", str(files / "bg.png"), str(files / "fg.png"), "--at", "fg=2,2", "--out", str(files / "direct.png")])
    run_cli(["compose", str(psd), "--out", str(files / "flat.png")])
    assert np.array_equal(np.asarray(Image.open(files / "flat.png")), np.asarray(Image.open(files / "direct.png")))
    capsys.readouterr()
    run_cli(["compose", str(psd), "--extract", str(files / "ex")])
    paths = capsys.readouterr().out.split()
    assert [p.split("/")[-1] for p in paths] == ["01-bg.png", "02-fg.png"]
    fg = np.asarray(Image.open(files / "ex" / "02-fg.png"))
    assert fg.shape == (8, 8, 4) and fg[0, 0, 3] == 0 and fg[1, 1].tolist() == [255, 0, 0, 255]


def test_cli_yaml_stack(files):
    (files / "stack.yaml").write_text(
        "size: 12x10\nlayers:\n  - path: bg.png\n  - path: fg.png\n    name: top\n    at: [4, 2]\n    opacity: 1.0\n"
    )
    run_cli(["compose", str(files / "stack.yaml"), "--opacity", "top=0.5", "--out", str(files / "y.png")])
    img = np.asarray(Image.open(files / "y.png"))
    assert img.shape == (10, 12, 4)
    assert img[3, 5].tolist() == [128, 0, 100, 255]
    (files / "bad.yaml").write_text("layers:\n  - path: bg.png\n    opacityy: 1\n")
    run_cli(["compose", str(files / "bad.yaml"), "--out", str(files / "z.png")], expect=2)
    assert not (files / "z.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--at", "nope=1,2"], "no layer named 'nope'"),
        (["--opacity", "fg=1.5"], "opacity"),
        (["--opacity", "fg=-0.1"], "opacity"),
        (["--size", "0x10"], "positive"),
        (["--size", "20000x100"], "16384"),
        (["--scale", "fg=0"], "scale"),
        (["--at", "fg=1"], "X,Y"),
    ],
)
def test_cli_bad_options_exit_2_and_write_nothing(files, capsys, extra, message):
    out = files / "o.png"
    run_cli(["compose", str(files / "bg.png"), str(files / "fg.png"), *extra, "--out", str(out)], expect=2)
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_bad_files_and_outputs(files, capsys):
    (files / "text.png").write_text("not an image")
    good = (files / "fg.png").read_bytes()
    (files / "cut.png").write_bytes(good[: len(good) // 2])
    cases = [
        (["compose", str(files / "text.png"), "--out", str(files / "o.png")], "not an image"),
        (["compose", str(files / "cut.png"), "--out", str(files / "o.png")], "truncated"),
        (["compose", str(files / "missing.png"), "--out", str(files / "o.png")], "not found"),
        (["compose", str(files / "bg.png"), "--out", str(files / "o.jpg")], ".png or .psd"),
    ]
    for argv, message in cases:
        run_cli(argv, expect=2)
        assert message in capsys.readouterr().err
    assert not (files / "o.png").exists() and not (files / "o.jpg").exists()
    # an existing output is kept unless --overwrite
    (files / "o.png").write_bytes(b"keep me")
    run_cli(["compose", str(files / "bg.png"), "--out", str(files / "o.png")], expect=2)
    assert "--overwrite" in capsys.readouterr().err
    assert (files / "o.png").read_bytes() == b"keep me"
    run_cli(["compose", str(files / "bg.png"), "--out", str(files / "o.png"), "--overwrite"])
    assert Image.open(files / "o.png").size == (30, 20)


def test_force_allows_a_big_canvas_check(files):
    from layerctl.core.compose import check_side

    with pytest.raises(LayerctlError):
        check_side("canvas", 16385, 10)
    check_side("canvas", 16385, 10, force=True)
    with pytest.raises(LayerctlError):
        check_side("canvas", 0, 10, force=True)


def test_command_module_imports_nothing_heavy():
    code = (
        "import sys, layerctl.commands.compose as m; "
        "bad = [k for k in ('numpy', 'PIL', 'psd_tools', 'torch', 'pydantic') if k in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_psd_input_in_a_yaml_stack_keeps_its_groups(tmp_path):
    from test_psd import _group_psd

    from layerctl.io.psd import flatten as psd_flatten

    _group_psd(tmp_path / "g.psd")
    white = np.full((16, 16, 3), 255, np.uint8)
    Image.fromarray(white, "RGB").save(tmp_path / "white.png")
    (tmp_path / "s.yaml").write_text("layers:\n  - path: white.png\n  - path: g.psd\n    opacity: 0.5\n")
    run_cli(["compose", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o.png")])
    got = np.asarray(Image.open(tmp_path / "o.png")).astype(float)
    # the whole document at 50% over white, not each of its layers at 50%
    doc = psd_flatten(tmp_path / "g.psd").astype(float) / 255
    want = doc[..., :3] * (0.5 * doc[..., 3:]) + 1.0 * (1 - 0.5 * doc[..., 3:])
    assert np.abs(got[..., :3] - want * 255).max() <= 1.0


def test_failed_command_creates_no_folders(files):
    run_cli(["compose", str(files / "bg.png"), "--at", "nope=1,1", "--out", str(files / "new" / "o.png")], expect=2)
    run_cli(["compose", str(files / "bg.png"), "--at", "nope=1,1", "--extract", str(files / "ex")], expect=2)
    assert not (files / "new").exists() and not (files / "ex").exists()
    run_cli(["compose", str(files / "bg.png"), "--out", str(files / "new" / "o.png")])
    assert (files / "new" / "o.png").exists()
