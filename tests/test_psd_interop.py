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

from layerctl import psd as lpsd
from layerctl.compose import Layer

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
