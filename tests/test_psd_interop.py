"""PSD files that open everywhere (issue 18, interoperability): Unicode layer names, 16-bit
files, designers' files with type/shape/fill/adjustment layers, what a `compose` re-save keeps.

Readers: psd-tools always; ImageMagick where installed (`convert`/`identify`, tests skip
without it). ImageMagick 6.9 reads a layer's name from the MacRoman Pascal string only (it
ignores the Unicode "luni" block), so with it the fallback copy is checked byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from layerctl.io import psd as lpsd
from layerctl.core.compose import Layer

NAMES = {
    "accents": "café au lait – crème brûlée",
    "cyrillic": "Ёжик и ёлка",
    "cjk": "ハリネズミ 刺猬",
    "emoji": "e0=🦔 ハリネズミ",
    "long": "".join(chr(ord("a") + i % 26) for i in range(300)),
    "long_accents": "é" * 300,
}


def _px(h=4, w=5, seed=0):
    px = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    px[..., 3] = 255
    return px


def run_cli(argv, expect=0):
    from layerctl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == expect, argv
    return exc.value.code


def _identify():
    path = shutil.which("identify")
    if not path:
        return None
    try:
        ver = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "ImageMagick" in ver else None


# ---------------------------------------------------------------- names


def test_pascal_fallback_is_macroman_cut_to_255_bytes():
    assert lpsd.pascal_fallback("café") == "café"  # é is in MacRoman (0x8E)
    assert lpsd.pascal_fallback("Ёжик 🦔") == "???? ?"  # one '?' per character, emoji included
    assert len(lpsd.pascal_fallback("x" * 300)) == 255
    assert len(lpsd.pascal_fallback("é" * 300).encode("mac_roman")) == 255
    assert lpsd.clean_name("bad\udcff") == "bad\ufffd"  # a lone surrogate from an undecodable file name


def test_unicode_names_round_trip_through_psd_tools(tmp_path):
    layers = [Layer(name, _px(seed=i), (i, 0)) for i, name in enumerate(NAMES.values())]
    layers[2].groups = layers[3].groups = (("Группа 🦔", 1.0),)
    out = lpsd.write_psd(tmp_path / "names.psd", layers)
    doc = PSDImage.open(out)
    top = list(doc)
    assert [layer.name for layer in top] == [NAMES["accents"], NAMES["cyrillic"], "Группа 🦔", NAMES["long"], NAMES["long_accents"]]
    assert [layer.name for layer in top[2]] == [NAMES["cjk"], NAMES["emoji"]]
    # the record's own Pascal string: MacRoman, at most 255 bytes, '?' for what MacRoman lacks
    records = [layer._record.name for layer in doc.descendants()]
    assert NAMES["accents"] in records  # every character of it is in MacRoman (the dash is 0xD0)
    assert "???? ? ????" in records  # Cyrillic: one '?' a character
    assert all(len(r.encode("mac_roman")) <= 255 for r in records)
    # and layerctl reads the Unicode names back, group paths included
    assert [layer.name for layer in lpsd.read_psd(out)] == [
        NAMES["accents"],
        NAMES["cyrillic"],
        "Группа 🦔/" + NAMES["cjk"],
        "Группа 🦔/" + NAMES["emoji"],
        NAMES["long"],
        NAMES["long_accents"],
    ]


def test_imagemagick_reads_the_macroman_fallback(tmp_path):
    exe = _identify()
    if exe is None:
        pytest.skip("ImageMagick (identify) not installed")
    names = list(NAMES.values())
    out = lpsd.write_psd(tmp_path / "names.psd", [Layer(n, _px(seed=i)) for i, n in enumerate(names)])
    raw = subprocess.run([exe, "-format", "%l\n", str(out)], check=True, capture_output=True, timeout=60).stdout
    labels = raw.split(b"\n")[1 : 1 + len(names)]  # the merged composite comes first, without a label
    assert labels == [lpsd.pascal_fallback(n).encode("mac_roman") for n in names]
    assert labels[4] == NAMES["long"][:255].encode()  # plain ASCII comes through whole, cut at 255


def test_cli_psd_with_unicode_names_and_a_cyrillic_resave(tmp_path, capsys):
    px = _px(6, 6)
    Image.fromarray(px, "RGBA").save(tmp_path / "Ёжик и ёлка.png")
    Image.fromarray(_px(6, 6, seed=1), "RGBA").save(tmp_path / "b.png")
    first = tmp_path / "first.psd"
    run_cli(["compose", str(tmp_path / "Ёжик и ёлка.png"), str(tmp_path / "b.png"), "--name", "b=🦔 ハリネズミ",
             "--out", str(first)])
    assert [layer.name for layer in PSDImage.open(first)] == ["Ёжик и ёлка", "🦔 ハリネズミ"]
    # a designer's PSD with Cyrillic names, re-saved through compose
    doc = PSDImage.new("RGBA", (6, 6), color=(255, 255, 255, 0))
    layer = doc.create_pixel_layer(Image.fromarray(px, "RGBA"), name="x")
    layer.name = "Слой 1"
    doc.save(tmp_path / "designer.psd")
    again = tmp_path / "again.psd"
    run_cli(["compose", str(tmp_path / "designer.psd"), "--out", str(again)])
    assert [layer.name for layer in PSDImage.open(again)] == ["Слой 1"]
    capsys.readouterr()
    run_cli(["compose", str(again), "--list", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["Слой 1"]


# ---------------------------------------------------------------- 16 bits


def _want8(v):
    return ((np.asarray(v, np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def test_16bit_layers_are_rounded_not_truncated(tmp_path):
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    arr = np.stack([v, v[::-1], v.T, v[:, ::-1]], -1)  # every 16-bit value in every channel
    doc = PSDImage.new("RGBA", (260, 260), depth=16)
    doc.create_pixel_layer_from_array(arr, name="deep", top=2, left=3)
    doc.save(tmp_path / "deep.psd")
    assert (v >> 8 != _want8(v)).mean() > 0.24  # truncation and rounding differ on a quarter of the values
    layer = lpsd.read_psd(tmp_path / "deep.psd")[0]
    assert layer.offset == (3, 2) and layer.pixels.dtype == np.uint8
    for c in range(4):
        assert np.array_equal(layer.pixels[..., c], _want8(arr[..., c])), c
    # e.g. 255 is 0.992 in 8-bit terms: 1 (truncation gives 0); 32767 is 127.498: 127
    assert _want8([255, 32767]).tolist() == [1, 127] and (255 >> 8) == 0


def test_16bit_merged_image_is_rounded(tmp_path):
    from layerctl.io.imageio import load_image

    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    doc = PSDImage.new("RGB", (256, 256), depth=16)
    doc.save(tmp_path / "flat.psd")  # no layers: the merged image is the picture
    doc = PSDImage.open(tmp_path / "flat.psd")
    record = doc._record
    record.image_data.set_data([p.astype(">u2").tobytes() for p in (v, v.T, v[::-1])], record.header)
    with open(tmp_path / "flat.psd", "wb") as f:
        record.write(f)
    layers = lpsd.read_psd(tmp_path / "flat.psd")
    assert [layer.name for layer in layers] == ["composite"]
    want = np.stack([_want8(v), _want8(v.T), _want8(v[::-1]), np.full(v.shape, 255, np.uint8)], -1)
    assert np.array_equal(layers[0].pixels, want)
    assert np.array_equal(np.asarray(load_image(tmp_path / "flat.psd", "RGBA")), want)


# ---------------------------------------------------------------- designers' files

DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_designer_psd_lists_every_layer_with_its_kind(capsys):
    run_cli(["compose", str(DATA / "designer.psd"), "--list", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["name"], r["kind"]) for r in rows] == [
        (1, "Фон", "pixel"),
        (2, "Заголовок ✨", "type"),
        (3, "Rectangle 1", "shape"),
        (4, "Color Fill 1", "fill"),
        (5, "Gradient Fill 1", "fill"),
        (None, "Группа", "group"),
        (6, "Группа/Logo", "smart object"),
        (None, "Группа/Invert 1", "adjustment"),
        (None, "Curves 1", "adjustment"),
        (None, "Frame", "artboard"),
        (7, "Frame/Inside", "pixel"),
    ]
    by_name = {r["name"]: r for r in rows}
    assert by_name["Color Fill 1"]["mask"] is True  # the fill's mask stays a mask
    assert "not applied" in by_name["Curves 1"]["note"]
    assert "applied to 'Logo'" in by_name["Группа/Invert 1"]["note"]
    run_cli(["compose", str(DATA / "designer.psd"), "--list"])
    text = capsys.readouterr().out
    assert "fill (gradient)" in text and "adjustment (curves)" in text and "smart object" in text


def test_designer_psd_flattens_type_shape_fill_and_smart_object_layers(tmp_path, capsys):
    out = tmp_path / "flat.png"
    run_cli(["compose", str(DATA / "designer.psd"), "--out", str(out)])
    err = capsys.readouterr().err
    img = np.asarray(Image.open(out)).astype(int)
    assert img.shape == (32, 48, 4) and (img[..., 3] == 255).all()
    assert img[1, 1].tolist() == [8, 8, 100, 255]  # background, colour (8x, 8y, 100)
    # type layer: red (230, 20, 20) at alpha 200 over the background at (6, 6) = (48, 48, 100)
    a = 200 / 255
    assert img[6, 6, :3].tolist() == [round(230 * a + 48 * (1 - a)), round(20 * a + 48 * (1 - a)), round(20 * a + 100 * (1 - a))]
    assert img[10, 30].tolist() == [0, 0, 255, 255]  # the vector rectangle, drawn by psd-tools
    assert img[10, 23].tolist() == [184, 80, 100, 255]  # just left of it: background
    assert img[25, 2].tolist() == [0, 200, 0, 255]  # solid fill where its mask shows it
    assert img[25, 20].tolist() == [160, 200, 100, 255]  # ... and not where the mask hides it
    assert img[30, 36, 0] == round(36 / 47 * 255) and img[30, 36, 0] == img[30, 36, 2]  # gradient fill
    assert img[4, 44].tolist() == [0, 35, 255, 255]  # the yellow smart object, inverted by its clipped adjustment
    assert img[30, 1].tolist() == [255, 255, 255, 255]  # inside the artboard
    # one warning per changed layer, naming what changed; one for the adjustment not applied
    lines = [ln for ln in err.splitlines() if ln.startswith("layerctl: warning:")]
    for name in ("Заголовок ✨", "Rectangle 1", "Color Fill 1", "Gradient Fill 1", "Группа/Logo"):
        mine = [ln for ln in lines if f"layer {name!r}" in ln]
        assert len(mine) == 1 and "rasterised" in mine[0], name
    adjustments = [ln for ln in lines if "adjustment layer" in ln and "not applied" in ln]
    assert len(adjustments) == 1 and "'Curves 1'" in adjustments[0] and "Invert" not in adjustments[0]
    assert not any("'Фон'" in ln for ln in lines)  # a plain pixel layer changes in no way


def test_designer_psd_extract_writes_every_drawable_layer(tmp_path, capsys):
    run_cli(["compose", str(DATA / "designer.psd"), "--extract", str(tmp_path / "x")])
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert len(names) == 7 and names[1].startswith("02-") and names[2] == "03-Rectangle 1.png"
    text = np.asarray(Image.open(tmp_path / "x" / names[1]))
    assert text.shape == (8, 16, 4) and (text == [230, 20, 20, 200]).all()
    rect = np.asarray(Image.open(tmp_path / "x" / "03-Rectangle 1.png"))
    assert rect.shape == (16, 16, 4) and (rect == [0, 0, 255, 255]).all()


def test_a_psd_with_nothing_drawable_is_refused_with_the_reason(tmp_path, capsys):
    out = tmp_path / "n.png"
    run_cli(["compose", str(DATA / "nothing.psd"), "--out", str(out)], expect=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("layerctl: error: no layers to compose")
    assert "nothing drawable" in err[-1] and "'Curves 1'" in err[-1] and "'Empty group'" in err[-1]
    assert not out.exists()
    run_cli(["compose", str(DATA / "nothing.psd"), "--extract", str(tmp_path / "x")], expect=2)
    assert not (tmp_path / "x").exists()
    # --list alone still shows what is there
    run_cli(["compose", str(DATA / "nothing.psd"), "--list", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["kind"], r["index"]) for r in rows] == [("Curves 1", "adjustment", None), ("Empty group", "group", None)]


def test_without_psd_tools_renderer_stored_pixels_are_used_or_the_layer_is_named(monkeypatch):
    import psd_tools.composite as pc

    def missing(*args, **kwargs):
        raise ImportError("Vector shape rendering requires: aggdraw")

    monkeypatch.setattr(pc, "composite", missing)
    doc = lpsd.open_psd(DATA / "designer.psd")
    names = [layer.name for layer in doc.layers]
    assert "Заголовок ✨" in names  # the type layer has stored pixels
    assert "Rectangle 1" not in names  # the shape has none: named, with what to install
    text = "\n".join(doc.warnings)
    assert "'Rectangle 1'" in text and "pip install 'psd-tools[composite]'" in text
    assert "stored pixels" in text


# ---------------------------------------------------------------- what a compose re-save keeps


def _square(h, w, rgba):
    return Image.fromarray(np.broadcast_to(np.array(rgba, np.uint8), (h, w, 4)).copy(), "RGBA")


def _editable_psd(path):
    """A designer's PSD with what psd-tools can write: blend modes, fill opacity, masks (one with
    a white default colour, one disabled), a hidden screen-mode group at 50%, a visible group."""
    from psd_tools.constants import BlendMode

    doc = PSDImage.new("RGBA", (16, 16), color=(255, 255, 255, 0))
    doc.create_pixel_layer(_square(16, 16, (200, 40, 40, 255)), name="base")
    mul = doc.create_pixel_layer(_square(8, 8, (40, 40, 200, 255)), name="mul", top=0, left=8)
    mul.blend_mode = BlendMode.MULTIPLY
    mul.opacity = 200
    mul.fill_opacity = 128
    masked = doc.create_pixel_layer(_square(8, 8, (0, 255, 0, 255)), name="masked", top=8, left=0)
    m = np.full((4, 4), 255, np.uint8)
    m[:, :2] = 0
    masked.create_mask(Image.fromarray(m, "L"), top=10, left=2)
    masked._record.mask_data.background_color = 255  # outside the mask's rectangle: shown
    off = doc.create_pixel_layer(_square(4, 4, (255, 255, 0, 255)), name="mask off", top=12, left=12)
    off.create_mask(Image.fromarray(np.zeros((4, 4), np.uint8), "L"), top=12, left=12)
    off.mask.disabled = True
    hidden = doc.create_group(name="Hidden group", opacity=128, blend_mode=BlendMode.SCREEN)
    hidden.create_pixel_layer(_square(4, 4, (255, 255, 255, 255)), name="inner", top=0, left=0)
    gone = hidden.create_pixel_layer(_square(4, 4, (0, 0, 0, 255)), name="inner hidden", top=0, left=4)
    gone.visible = False
    hidden.visible = False
    shown = doc.create_group(name="Shown")
    shown.create_pixel_layer(_square(2, 2, (9, 9, 9, 255)), name="child", top=14, left=6)
    doc.save(path)
    return path


def test_compose_resave_keeps_blend_modes_masks_fill_and_group_visibility(tmp_path, capsys):
    from psd_tools.constants import BlendMode

    src = _editable_psd(tmp_path / "src.psd")
    again = tmp_path / "again.psd"
    run_cli(["compose", str(src), "--out", str(again)])
    err = capsys.readouterr().err
    doc = PSDImage.open(again)
    top = {layer.name: layer for layer in doc}
    assert list(top) == ["base", "mul", "masked", "mask off", "Hidden group", "Shown"]
    mul = top["mul"]
    assert (mul.blend_mode, mul.opacity, mul.fill_opacity) == (BlendMode.MULTIPLY, 200, 128)
    masked = top["masked"]
    assert masked.has_mask() and masked.mask.bbox == (2, 10, 6, 14) and masked.mask.background_color == 255
    assert not masked.mask.disabled
    assert np.array_equal(np.asarray(masked.mask.topil()), np.array([[0, 0, 255, 255]] * 4, np.uint8))
    assert np.asarray(masked.topil())[..., 3].min() == 255  # the mask is not baked into the pixels
    assert top["mask off"].has_mask() and top["mask off"].mask.disabled
    grp = top["Hidden group"]
    assert grp.is_group() and grp.visible is False  # a hidden group stays a hidden group
    assert (grp.blend_mode, grp.opacity) == (BlendMode.SCREEN, 128)
    assert [(c.name, c.visible) for c in grp] == [("inner", True), ("inner hidden", False)]
    assert top["Shown"].visible and top["Shown"].blend_mode == BlendMode.PASS_THROUGH
    # the same picture either way (layerctl composites blend modes as normal, and says so)
    assert np.array_equal(lpsd.flatten(again), lpsd.flatten(src))
    assert "'mul'" in err and "blend mode multiply: kept in a PSD" in err
    assert "'Hidden group'" in err and "blend mode screen" in err
    assert "'masked'" not in err and "'mask off'" not in err  # nothing about them changed


def test_masks_fill_and_hidden_groups_in_the_flattened_picture(tmp_path):
    src = _editable_psd(tmp_path / "src.psd")
    flat = lpsd.flatten(src).astype(int)
    # mul: (40, 40, 200) at opacity 200/255 x fill 128/255 over (200, 40, 40), composited as normal
    a = 200 / 255 * 128 / 255
    assert flat[2, 12, :3].tolist() == [round(40 * a + 200 * (1 - a)), 40, round(200 * a + 40 * (1 - a))]
    assert flat[11, 2].tolist() == [200, 40, 40, 255]  # masked: hidden by the mask's black half
    assert flat[11, 4].tolist() == [0, 255, 0, 255]  # ... shown by its white half
    assert flat[9, 0].tolist() == [0, 255, 0, 255]  # ... and outside its rectangle (white default)
    assert flat[13, 13].tolist() == [255, 255, 0, 255]  # a disabled mask hides nothing
    assert flat[1, 1].tolist() == [200, 40, 40, 255]  # the hidden group draws nothing
    assert flat[15, 7].tolist() == [9, 9, 9, 255]


def test_moving_and_scaling_a_masked_layer_moves_and_scales_its_mask(tmp_path):
    src = _editable_psd(tmp_path / "src.psd")
    out = tmp_path / "moved.psd"
    run_cli(["compose", str(src), "--at", "masked=4,2", "--scale", "masked=2", "--out", str(out), "--size", "32x32"])
    masked = {layer.name: layer for layer in PSDImage.open(out)}["masked"]
    assert masked.offset == (4, 2) and masked.size == (16, 16)
    # the mask sat at (+2, +2) from the layer, 4x4: now at (+4, +4), 8x8
    assert masked.mask.bbox == (8, 6, 16, 14) and masked.mask.background_color == 255


def test_recipe_compose_job_on_a_psd_with_nothing_drawable_fails_with_the_reason(tmp_path, monkeypatch, capsys):
    import shutil as sh

    monkeypatch.chdir(tmp_path)
    sh.copy(DATA / "nothing.psd", tmp_path / "nothing.psd")
    (tmp_path / "r.yaml").write_text("output_dir: o\njobs:\n  - compose: {layers: [nothing.psd], out: x.png}\n", encoding="utf-8")
    run_cli(["run", "r.yaml"], expect=1)
    err = capsys.readouterr().err
    assert "no layers to compose" in err and "nothing drawable" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "x.png").exists()
