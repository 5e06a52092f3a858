"""PSD files through psd-tools: write a layered document, read one back as layers.

    from layerctl.psd import write_psd, read_psd, flatten
    write_psd("out.psd", [("background", bg, (0, 0)), ("foreground", fg, (32, 16))])
    layers = read_psd("out.psd")          # list[layerctl.compose.Layer], bottom -> top
    rgba = flatten("out.psd")             # HxWx4 uint8 of the visible layers

What the writer produces (checked by tests/test_psd.py, with psd-tools and ImageMagick):
- an 8-bit RGB document with one transparency channel (made as psd-tools mode
  "RGBA"): each layer's alpha goes into the layer's own transparency channel,
  not into a layer mask (an "RGB" document would put it into a user mask);
- one pixel layer per input, named (Unicode names kept), at its offset, with
  its opacity;
- a flattened composite in the merged image section, computed here (straight
  "over" in float, rounded once), stored the way Photoshop stores it: colour
  matted on white, the first extra channel being the composite's transparency
  (the layer count is written negative to say so). Viewers that read only the
  composite show the right picture.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from layerctl.compose import Layer, as_float, check_side, composite_layers
from layerctl.errors import LayerctlError
from layerctl.imagemath import to_uint8

__all__ = ["Layer", "PsdDocument", "write_psd", "write_role_psd", "read_psd", "open_psd", "flatten"]

LayerInput = Union[Layer, tuple]

# Kinds whose pixels psd-tools gives us exactly.
_PIXEL_KINDS = {"pixel"}
# Kinds with stored or drawable pixels that may not match what an editor renders.
_APPROX_KINDS = {"type", "smartobject", "shape", "solidcolorfill", "gradientfill", "patternfill"}
_GROUP_KINDS = {"group", "artboard"}
_NORMAL_BLENDS = {"normal", "pass_through", "passthrough", "pass through"}


@dataclass
class PsdDocument:
    """A PSD read as layers: canvas size (w, h), leaf layers bottom -> top, and warnings."""

    size: tuple[int, int]
    layers: list[Layer]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- writing


def _as_layer(item: LayerInput) -> Layer:
    if isinstance(item, Layer):
        return item
    if not isinstance(item, (tuple, list)) or len(item) not in (3, 4):
        raise TypeError("a PSD layer is (name, HxWx4 pixels, (x, y)) or (name, pixels, (x, y), opacity)")
    name, pixels, offset = item[0], item[1], item[2]
    opacity = float(item[3]) if len(item) == 4 else 1.0
    return Layer(str(name), np.asarray(pixels), (int(offset[0]), int(offset[1])), opacity=opacity)


def _layer_uint8(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 3:  # RGB: an opaque layer
        full = np.uint8(255) if pixels.dtype == np.uint8 else 1.0
        pixels = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), full, dtype=pixels.dtype)], axis=-1)
    if pixels.ndim != 3 or pixels.shape[2] != 4:
        raise ValueError(f"PSD layer pixels must be HxWx4 RGBA (or HxWx3 RGB), got shape {pixels.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError("PSD layer pixels must not be empty")
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    return to_uint8(as_float(pixels))


# Layer and group names: Photoshop keeps two copies. The Unicode name block ("luni", UTF-16,
# 4-byte length) is what Photoshop, GIMP, Krita, ag-psd and psd-tools read; the record's Pascal
# string (one length byte, MacRoman) is the fallback for readers without "luni" (ImageMagick 6
# reads only this one). A Pascal string holds at most 255 bytes.
PASCAL_NAME_MAX = 255


def clean_name(name) -> str:
    """A layer name as it can be stored: text, lone surrogates (from undecodable file names)
    replaced by U+FFFD, trailing NULs dropped."""
    text = str(name)
    text = text.encode("utf-16-be", "surrogatepass").decode("utf-16-be", "replace")
    return text.rstrip("\x00")


def pascal_fallback(name: str) -> str:
    """The MacRoman Pascal-string copy of a name: characters MacRoman lacks become '?', cut to
    255 bytes (MacRoman is one byte a character, so the cut never splits one)."""
    data = clean_name(name).encode("mac_roman", "replace")[:PASCAL_NAME_MAX]
    return data.decode("mac_roman")


def set_psd_name(psd_layer, name: str) -> None:
    """Write `name` on a psd-tools layer or group as Photoshop does: the full name in the
    Unicode block, the MacRoman fallback in the record. (psd-tools' own setter refuses names
    of 256+ characters and falls back to a single '?' for any non-MacRoman name.)"""
    from psd_tools.constants import Tag

    text = clean_name(name)
    record = psd_layer._record  # psd-tools' LayerRecord: the writer already works at this level
    record.name = pascal_fallback(text)
    record.tagged_blocks.set_data(Tag.UNICODE_LAYER_NAME, text)


def build_psd(layers: Sequence[LayerInput], size: Optional[tuple[int, int]] = None):
    """The psd_tools.PSDImage for `layers` (bottom -> top), merged image included. Not saved."""
    from PIL import Image
    from psd_tools import PSDImage

    items = [_as_layer(item) for item in layers]
    if not items:
        raise ValueError("a PSD needs at least one layer")
    # validated, 8-bit, 4 channels (copies: the caller's layers are left alone)
    items = [dataclasses.replace(item, pixels=_layer_uint8(item.pixels)) for item in items]
    if size is None:
        size = items[0].size
    w, h = int(size[0]), int(size[1])
    check_side("PSD canvas", w, h, force=True)
    if w > 30000 or h > 30000:
        raise LayerctlError(f"a PSD canvas is at most 30000 pixels a side (got {w}x{h}); write a PNG instead")

    # Mode "RGBA": an RGB document with a transparency channel, so that
    # PixelLayer.frompil stores each layer's alpha as its transparency (not a mask).
    doc = PSDImage.new("RGBA", (w, h), color=(255, 255, 255, 0))
    stored: list[Layer] = []
    open_groups: list = []  # [(key, psd group)], outermost first
    for item in items:
        px = item.pixels
        opacity = min(max(float(item.opacity), 0.0), 1.0)
        op255 = int(round(opacity * 255))
        groups = tuple(item.groups or ())
        # Close groups this layer is not in, open the ones it is in (psd-tools groups, in order).
        keep = 0
        while keep < len(open_groups) and keep < len(groups) and open_groups[keep][0] == groups[keep]:
            keep += 1
        del open_groups[keep:]
        for gpath, gop in groups[keep:]:
            parent = open_groups[-1][1] if open_groups else doc
            g255 = int(round(min(max(float(gop), 0.0), 1.0) * 255))
            psd_group = parent.create_group(name="Group", opacity=g255)
            set_psd_name(psd_group, str(gpath).rsplit("/", 1)[-1])
            open_groups.append(((gpath, gop), psd_group))
        parent = open_groups[-1][1] if open_groups else doc
        name = item.name
        if groups and name.startswith(str(groups[-1][0]) + "/"):
            name = name[len(str(groups[-1][0])) + 1 :]
        x, y = item.offset
        psd_layer = parent.create_pixel_layer(
            Image.fromarray(px, "RGBA"), name="Layer", top=int(y), left=int(x), opacity=op255
        )
        set_psd_name(psd_layer, name)
        if not item.visible:
            psd_layer.visible = False
        # What a reader sees: 8-bit pixels, opacities in 1/255 steps.
        stored.append(
            Layer(
                item.name,
                px,
                (int(x), int(y)),
                opacity=op255 / 255.0,
                visible=item.visible,
                groups=tuple((gp, round(min(max(float(go), 0.0), 1.0) * 255) / 255.0) for gp, go in groups),
            )
        )

    # The merged image: our own composite, matted on white as Photoshop stores it.
    rgba = composite_layers(stored, (w, h))
    alpha = rgba[..., 3:4]
    matted = rgba[..., :3] * alpha + (1.0 - alpha)
    planes8 = to_uint8(np.concatenate([matted, alpha], axis=-1))
    record = doc._record  # psd-tools' low-level PSD structure (psd_tools.psd.PSD)
    record.image_data.set_data([planes8[..., c].tobytes() for c in range(4)], record.header)
    # A negative layer count says "the merged image's first alpha channel is its transparency".
    info = record.layer_and_mask_information.layer_info
    info.layer_count = -abs(info.layer_count)
    return doc


def write_psd(
    path: str | os.PathLike,
    layers: Sequence[LayerInput],
    size: Optional[tuple[int, int]] = None,
    overwrite: bool = False,
) -> Path:
    """Write `layers` (bottom -> top) as a layered 8-bit RGB PSD with a flattened composite, atomically.

    Each layer is (name, HxWx4 RGBA uint8 (or float [0,1]) straight-alpha pixels, (x, y)) with an
    optional 4th item opacity in [0,1], or a layerctl.compose.Layer. `size` (w, h) defaults to the
    bottom layer's size. Layers may reach outside the canvas (kept whole, as editors do).
    """
    from layerctl.imageio import atomic_write

    doc = build_psd(layers, size)
    record = doc._record

    def write(tmp: str) -> None:
        # record.write, not doc.save: save() would recompute the merged image with psd-tools'
        # own compositor and overwrite the one built above.
        with open(tmp, "wb") as f:
            record.write(f)

    return atomic_write(path, write, overwrite=overwrite, suffix=".psd")


ROLE_ORDER = ("background", "blended", "foreground")


def write_role_psd(path, roles: dict, overwrite: bool = False) -> Path:
    """`gen`/`decompose --psd`: one PSD whose layers are named by role, all at (0, 0).

    roles maps a role name to HxWx4 (or HxWx3) pixels; "background", "blended", "foreground"
    go bottom -> top in that order, any other role (e.g. "transparent" for the single RGBA
    of plain `gen`) follows in the dict's order. The canvas is the first layer's size.
    """
    ordered = [r for r in ROLE_ORDER if r in roles] + [r for r in roles if r not in ROLE_ORDER]
    layers = [(role, roles[role], (0, 0)) for role in ordered if roles[role] is not None]
    return write_psd(path, layers, overwrite=overwrite)


# ---------------------------------------------------------------- reading


def _open(path):
    from psd_tools import PSDImage

    from layerctl.imageio import check_pixel_limit

    p = Path(path)
    if not p.exists():
        raise LayerctlError(f"PSD not found: {p}")
    if not p.is_file():
        raise LayerctlError(f"not a file: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(26)
    except OSError as exc:
        raise LayerctlError(f"cannot read {p}: {exc.strerror}") from None
    if head[:4] != b"8BPS":
        raise LayerctlError(f"not a PSD file: {p}")
    if len(head) == 26:
        height = int.from_bytes(head[14:18], "big")
        width = int.from_bytes(head[18:22], "big")
        check_pixel_limit(p, width, height)
    try:
        return PSDImage.open(p)
    except Exception as exc:  # noqa: BLE001 - psd-tools raises many kinds on damaged files
        raise LayerctlError(f"cannot read PSD {p}: truncated or damaged ({type(exc).__name__}: {exc})") from None


def _blend_name(layer) -> str:
    mode = getattr(layer, "blend_mode", None)
    name = getattr(mode, "name", None) or str(mode or "normal")
    return name.lower()


def _leaf_pixels(layer) -> tuple[Optional[np.ndarray], tuple[int, int], bool]:
    """(HxWx4 uint8 or None, (x, y), opacity_baked) for a non-group layer."""
    plain = (
        layer.kind in _PIXEL_KINDS
        and not layer.has_mask()
        and not layer.has_vector_mask()
        and not layer.has_clip_layers(visible=True)
        and not layer.has_effects()
    )
    if plain:
        im = layer.topil()
        if im is None:
            return None, layer.offset, False
        return np.asarray(im.convert("RGBA"), dtype=np.uint8), layer.offset, False
    # Masks, vector masks, clipping layers, effects, text, shapes, smart objects: let psd-tools
    # render the layer on its own (it applies the layer's opacity as it does so).
    im = layer.composite()
    if im is None:
        return None, layer.offset, True
    left, top = layer.bbox[0], layer.bbox[1]
    return np.asarray(im.convert("RGBA"), dtype=np.uint8), (left, top), True


def _walk(group, prefix: str, groups: tuple, visible: bool, out: list, warnings: list, path: Path) -> None:
    for layer in group:
        name = prefix + clean_name(layer.name or "")
        kind = layer.kind
        this_visible = visible and bool(layer.visible)
        if kind in _GROUP_KINDS or layer.is_group():
            if _blend_name(layer) not in _NORMAL_BLENDS:
                warnings.append(f"{path}: group {name!r} uses blend mode {_blend_name(layer)}; flattened as normal")
            inner = groups + ((name, layer.opacity / 255.0),)
            _walk(layer, name + "/", inner, this_visible, out, warnings, path)
            continue
        if getattr(layer, "clipping", False):
            # Clipped layers are rendered into the layer they clip to (see _leaf_pixels).
            warnings.append(f"{path}: layer {name!r} is clipped to the layer below; merged into it")
            continue
        if kind not in _PIXEL_KINDS and kind not in _APPROX_KINDS:
            warnings.append(f"{path}: layer {name!r} is a {kind} layer, which layerctl cannot apply; skipped")
            continue
        if kind in _APPROX_KINDS:
            warnings.append(
                f"{path}: layer {name!r} is a {kind} layer; rasterised from its stored pixels, may differ from an editor"
            )
        if _blend_name(layer) not in _NORMAL_BLENDS:
            warnings.append(f"{path}: layer {name!r} uses blend mode {_blend_name(layer)}; composited as normal")
        try:
            if layer.has_effects():
                warnings.append(f"{path}: layer {name!r} has layer effects; rendered by psd-tools, may differ from an editor")
        except Exception:  # noqa: BLE001
            pass
        try:
            pixels, offset, baked = _leaf_pixels(layer)
        except Exception as exc:  # noqa: BLE001
            warnings.append(f"{path}: layer {name!r} ({kind}) could not be rasterised ({type(exc).__name__}); skipped")
            continue
        if pixels is None or pixels.size == 0:
            continue  # an empty layer
        own = 1.0 if baked else layer.opacity / 255.0 * getattr(layer, "fill_opacity", 255) / 255.0
        out.append(
            Layer(name, pixels, (int(offset[0]), int(offset[1])), opacity=own, visible=this_visible, kind=kind, groups=groups)
        )


def open_psd(path) -> PsdDocument:
    """Read a PSD's layers (groups walked in order, names 'group/layer') with warnings for what is approximate."""
    p = Path(path)
    doc = _open(p)
    layers: list[Layer] = []
    warnings: list[str] = []
    try:
        _walk(doc, "", (), True, layers, warnings, p)
    except LayerctlError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read PSD {p}: truncated or damaged ({type(exc).__name__}: {exc})") from None
    if not layers and len(list(doc)) == 0:
        # No layers at all: the merged image is the picture.
        im = doc.topil()
        if im is None:
            raise LayerctlError(f"PSD {p} has neither layers nor a composite image")
        layers.append(Layer("composite", np.asarray(im.convert("RGBA"), dtype=np.uint8), (0, 0)))
    return PsdDocument((int(doc.width), int(doc.height)), layers, warnings)


def read_psd(path) -> list[Layer]:
    """The layers of a PSD, bottom -> top (see open_psd)."""
    return open_psd(path).layers


def flatten(source: Union[str, os.PathLike, Iterable[Layer]], size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """HxWx4 uint8 of a PSD's (or a layer list's) visible layers, composited in float, rounded once.

    For a path, size defaults to the document's canvas; for a list, to the bottom layer's size.
    """
    if isinstance(source, (str, os.PathLike)):
        doc = open_psd(source)
        return flatten(doc.layers, size or doc.size)
    layers = list(source)
    if size is None:
        if not layers:
            raise ValueError("flatten needs layers or a size")
        size = layers[0].size
    from layerctl.compose import flatten as _flatten

    return _flatten(layers, size)


def read_composite(path):
    """The PSD's picture as a PIL image, via psd-tools (its stored composite when present)."""
    p = Path(path)
    doc = _open(p)
    try:
        im = doc.composite()
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read PSD {p}: truncated or damaged ({type(exc).__name__}: {exc})") from None
    if im is None:
        raise LayerctlError(f"PSD {p} has no picture to read")
    return im
