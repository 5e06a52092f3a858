"""PSD files through psd-tools: write a layered document, read one back as layers.

    from layerctl.io.psd import write_psd, read_psd, flatten
    write_psd("out.psd", [("background", bg, (0, 0)), ("foreground", fg, (32, 16))])
    layers = read_psd("out.psd")          # list[layerctl.core.compose.Layer], bottom -> top
    rgba = flatten("out.psd")             # HxWx4 uint8 of the visible layers

What the writer produces (checked by tests/test_psd.py, with psd-tools and ImageMagick):
- an 8-bit RGB document with one transparency channel (made as psd-tools mode
  "RGBA"): each layer's alpha goes into the layer's own transparency channel,
  not into a layer mask (an "RGB" document would put it into a user mask);
- one pixel layer per input, named (Unicode names kept), at its offset, with
  its opacity; names go into the Unicode name block ("luni", what Photoshop, GIMP,
  Krita, ag-psd and psd-tools read) with a MacRoman fallback of at most 255 bytes;
- what a layer read from a PSD carried and psd-tools can write: blend mode, fill
  opacity, layer mask (default colour, disabled flag), hidden groups and their
  blend modes;
- a flattened composite in the merged image section, computed here (straight
  "over" in float, rounded once), stored the way Photoshop stores it: colour
  matted on white, the first extra channel being the composite's transparency
  (the layer count is written negative to say so). Viewers that read only the
  composite show the right picture.

What the reader gives (open_psd): pixel layers exactly (16/32-bit rounded to 8 bits);
type, shape, fill and smart-object layers rendered by psd-tools (masks kept apart,
opacity and fill kept as numbers); adjustment layers clipped to a layer applied to
it, others named in one warning; every node in `outline`, for listings.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from layerctl.core.compose import GroupStyle, Layer, LayerMask, as_float, check_side, composite_layers, group_style
from layerctl.errors import LayerctlError
from layerctl.core.imagemath import to_uint8

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
    # Every node of the layer tree, in order (groups, adjustments, empty layers included): PsdNode
    outline: list = field(default_factory=list)


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


def psd_blend_mode(name: str):
    """psd-tools' BlendMode for a name as layerctl keeps it ('multiply', 'pass_through', ...)."""
    from psd_tools.constants import BlendMode

    key = str(name or "normal").strip().lower().replace(" ", "_")
    for mode in BlendMode:
        if mode.name.lower() == key:
            return mode
    raise LayerctlError(f"unknown blend mode {name!r}")


def _write_mask(psd_layer, mask: LayerMask, x: int, y: int) -> None:
    """Attach `mask` (offset relative to the layer at x, y) as the layer's user mask."""
    from PIL import Image

    pixels = np.asarray(mask.pixels)
    if pixels.dtype != np.uint8:
        pixels = to_uint8(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"a layer mask is HxW pixels, got shape {pixels.shape}")
    mx, my = x + int(mask.offset[0]), y + int(mask.offset[1])
    psd_layer.create_mask(Image.fromarray(np.ascontiguousarray(pixels), "L"), top=my, left=mx)
    data = psd_layer._record.mask_data  # psd-tools' MaskData: where the default colour and flags live
    data.background_color = 255 if int(mask.default) >= 128 else 0
    if mask.disabled:
        psd_layer.mask.disabled = True


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
        styles = tuple(group_style(item, i) for i in range(len(groups)))
        # Close groups this layer is not in, open the ones it is in (psd-tools groups, in order).
        keep = 0
        while (
            keep < len(open_groups)
            and keep < len(groups)
            and open_groups[keep][0] == (tuple(groups[keep]), styles[keep])
        ):
            keep += 1
        del open_groups[keep:]
        for (gpath, gop), style in zip(groups[keep:], styles[keep:]):
            parent = open_groups[-1][1] if open_groups else doc
            g255 = int(round(min(max(float(gop), 0.0), 1.0) * 255))
            psd_group = parent.create_group(name="Group", opacity=g255, blend_mode=psd_blend_mode(style.blend))
            set_psd_name(psd_group, str(gpath).rsplit("/", 1)[-1])
            if not style.visible:
                psd_group.visible = False
            open_groups.append(((tuple((gpath, gop)), style), psd_group))
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
        blend = str(getattr(item, "blend", "normal") or "normal")
        if blend not in ("normal",):
            psd_layer.blend_mode = psd_blend_mode(blend)
        fill255 = int(round(min(max(float(getattr(item, "fill", 1.0)), 0.0), 1.0) * 255))
        if fill255 != 255:
            psd_layer.fill_opacity = fill255
        mask = getattr(item, "mask", None)
        if mask is not None:
            _write_mask(psd_layer, mask, int(x), int(y))
        # What a reader sees: 8-bit pixels, opacities in 1/255 steps.
        stored.append(
            Layer(
                item.name,
                px,
                (int(x), int(y)),
                opacity=op255 / 255.0,
                visible=item.visible,
                groups=tuple((gp, round(min(max(float(go), 0.0), 1.0) * 255) / 255.0) for gp, go in groups),
                blend=blend,
                fill=fill255 / 255.0,
                mask=mask,
                group_styles=styles,
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
    optional 4th item opacity in [0,1], or a layerctl.core.compose.Layer. `size` (w, h) defaults to the
    bottom layer's size. Layers may reach outside the canvas (kept whole, as editors do).
    """
    from layerctl.io.files import atomic_write

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

    from layerctl.io.files import check_pixel_limit

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


# ---------------------------------------------------------------- reading: kinds, pixels, rounding

_FILL_KINDS = {"solidcolorfill", "gradientfill", "patternfill", "fill"}
_KIND_WORDS = {"pixel": "pixel", "type": "type", "shape": "shape", "smartobject": "smart object", "group": "group",
               "artboard": "artboard"}
_RASTER_NOTES = {
    "type": "rasterised (the text is no longer editable)",
    "shape": "rasterised (the vector shape is no longer editable)",
    "smartobject": "rasterised (its embedded source is not kept)",
}


def kind_label(kind: str) -> str:
    """A PSD layer kind in words: pixel, type, shape, fill, smart object, adjustment, group, artboard."""
    kind = str(kind or "pixel")
    if kind in _KIND_WORDS:
        return _KIND_WORDS[kind]
    if kind in _FILL_KINDS or kind.endswith("fill"):
        return "fill"
    return "adjustment"


def kind_text(kind: str) -> str:
    """kind_label plus what sort, for listings: 'fill (gradient)', 'adjustment (curves)'."""
    label = kind_label(kind)
    kind = str(kind or "pixel")
    if label == "fill" and kind not in ("fill",):
        sort = {"solidcolorfill": "solid colour", "gradientfill": "gradient", "patternfill": "pattern"}
        return f"fill ({sort.get(kind, kind[: -len('fill')] or kind)})"
    if label == "adjustment" and kind != "adjustment":
        return f"adjustment ({kind})"
    return label


@dataclass
class PsdNode:
    """One entry of a PSD's layer tree, for listings: what it is and what layerctl made of it."""

    name: str  # 'group/layer'
    kind: str  # psd-tools' kind: pixel, type, shape, smartobject, solidcolorfill, curves, group, ...
    depth: int  # how many groups it is in
    visible: bool  # shown: its own eye and all its groups' are on
    bbox: tuple  # (left, top, right, bottom) on the canvas
    layer: Optional[Layer] = None  # the layer it became (None: it draws nothing by itself)
    note: str = ""  # why it draws nothing by itself


@dataclass
class _Leaf:
    pixels: Optional[np.ndarray]
    offset: tuple
    opacity: float = 1.0
    fill: float = 1.0
    mask: Optional[LayerMask] = None
    notes: list = field(default_factory=list)  # what changed on the way, for the one warning


def _color_mode(doc) -> str:
    return str(getattr(getattr(doc, "color_mode", None), "name", "") or "")


def _float_path(doc) -> bool:
    """Whether layerctl rounds this document's pixels itself (RGB and greyscale, any depth)."""
    return _color_mode(doc) in ("RGB", "GRAYSCALE")


def _to_srgb(rgba: np.ndarray, doc, grey: bool) -> np.ndarray:
    """Apply the document's ICC profile, as psd-tools' topil()/composite() do (colour only)."""
    from PIL import Image
    from psd_tools.constants import Resource

    try:
        resources = doc.image_resources
        icc = resources.get_data(Resource.ICC_PROFILE) if Resource.ICC_PROFILE in resources else None
    except Exception:  # noqa: BLE001
        icc = None
    if not icc:
        return rgba
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        im = Image.fromarray(np.ascontiguousarray(rgba[..., 0] if grey else rgba[..., :3]), "L" if grey else "RGB")
        conv = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        out = rgba.copy()
        out[..., :3] = np.asarray(conv, dtype=np.uint8)
        return out
    except Exception:  # noqa: BLE001 - a profile little-cms cannot use: keep the colours, as psd-tools does
        return rgba


def _float_rgba8(color: np.ndarray, alpha: Optional[np.ndarray], doc) -> np.ndarray:
    """Float colour (HxWx3 RGB or HxWx1 grey, [0,1]) and alpha -> HxWx4 uint8, rounded once, sRGB."""
    grey = color.shape[2] < 3
    rgb = np.repeat(color[..., :1], 3, axis=2) if grey else color[..., :3]
    if alpha is None:
        alpha = np.ones(color.shape[:2] + (1,), dtype=np.float32)
    return _to_srgb(to_uint8(np.concatenate([rgb, alpha], axis=2)), doc, grey)


def _stored_pixels(layer) -> Optional[np.ndarray]:
    """A layer's own stored pixels (no mask, no opacity) as HxWx4 uint8, rounded from 16/32 bits."""
    doc = getattr(layer, "_psd", None)
    depth = int(getattr(doc, "depth", 8) or 8)
    if doc is None or depth == 8 or not _float_path(doc):
        im = layer.topil()
        return None if im is None else np.asarray(im.convert("RGBA"), dtype=np.uint8)
    arr = layer.numpy()
    if arr is None or arr.size == 0:
        return None
    nc = 1 if _color_mode(doc) == "GRAYSCALE" else 3
    alpha = arr[..., nc : nc + 1] if arr.shape[2] > nc else None
    return _float_rgba8(arr[..., :nc], alpha, doc)


def _stored_mask(layer) -> Optional[LayerMask]:
    """The layer's user mask as a LayerMask (offset relative to the layer), or None."""
    mask = layer.mask
    if mask is None:
        return None
    doc = getattr(layer, "_psd", None)
    depth = int(getattr(doc, "depth", 8) or 8)
    left, top = mask.bbox[0], mask.bbox[1]
    if mask.width <= 0 or mask.height <= 0:
        pixels = np.zeros((0, 0), np.uint8)
    elif depth == 8:
        im = mask.topil()
        pixels = np.zeros((0, 0), np.uint8) if im is None else np.asarray(im.convert("L"), dtype=np.uint8)
    else:
        arr = layer.numpy("mask")
        pixels = np.zeros((0, 0), np.uint8) if arr is None else to_uint8(arr[..., 0])
    if pixels.size == 0:
        pixels = np.zeros((1, 1), np.uint8) + np.uint8(mask.background_color)
        left, top = layer.left, layer.top
    return LayerMask(
        pixels,
        (int(left) - int(layer.left), int(top) - int(layer.top)),
        default=255 if int(mask.background_color) else 0,
        disabled=bool(mask.disabled),
    )


def _missing_renderer(exc: ImportError) -> str:
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else "an optional package"
    return f"{what}; pip install 'psd-tools[composite]'"


def _render(layer) -> tuple[Optional[np.ndarray], tuple[int, int]]:
    """psd-tools renders the layer on its own (mask, vector mask, clipped layers, effects, vector
    shapes, fills, text from its stored pixels); layerctl rounds the result once."""
    doc = getattr(layer, "_psd", None)
    keep = lambda other: other is layer or bool(other.visible)  # noqa: E731 - its own eye may be off
    if doc is not None and _float_path(doc):
        from psd_tools.composite import composite

        color, _shape, alpha = composite(layer, color=1.0, alpha=0.0, layer_filter=keep)
        if color.size == 0:
            return None, (0, 0)
        pixels = _float_rgba8(color, alpha, doc)
    else:
        im = layer.composite(layer_filter=keep)
        if im is None:
            return None, (0, 0)
        pixels = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    left, top = layer.bbox[0], layer.bbox[1]
    return pixels, (int(left), int(top))


def _read_leaf(layer) -> _Leaf:
    """A non-group layer's pixels: stored pixels when psd-tools gives them exactly (a user mask
    kept apart), else psd-tools' rendering at full opacity (the opacity stays a number)."""
    from psd_tools.constants import Tag

    kind = layer.kind
    opacity = layer.opacity / 255.0
    fill = getattr(layer, "fill_opacity", 255) / 255.0
    try:
        effects = bool(layer.has_effects())
    except Exception:  # noqa: BLE001
        effects = False
    mask = layer.mask if layer.has_mask() else None
    mask_plain = mask is None or getattr(mask, "parameters", None) is None
    plain = (
        kind in _PIXEL_KINDS
        and mask_plain
        and not layer.has_vector_mask()
        and not layer.has_clip_layers(visible=True)
        and not effects
    )
    if plain:
        return _Leaf(_stored_pixels(layer), layer.offset, opacity, fill, _stored_mask(layer) if mask is not None else None)

    notes = []
    if kind in _RASTER_NOTES:
        notes.append(_RASTER_NOTES[kind])
    elif kind_label(kind) == "fill":
        notes.append("rasterised (no longer editable as a fill)")
    if effects:
        notes.append("layer effects rendered into the pixels by psd-tools (may differ from Photoshop)")
    if layer.has_vector_mask() and kind != "shape":
        notes.append("vector mask applied to the pixels")
    # A mask stays a mask unless effects are drawn from the masked shape (as Photoshop does) or
    # it has density/feather settings; then psd-tools applies it and it is baked in.
    kept_mask = _stored_mask(layer) if mask is not None and mask_plain and not effects else None
    if mask is not None and kept_mask is None:
        why = "its effects follow the masked shape" if mask_plain else "it has density/feather settings"
        notes.append(f"layer mask applied to the pixels ({why})")
    clipped = [clean_name(c.name or "") for c in layer.clip_layers if c.visible] if layer.has_clip_layers(visible=True) else []
    if clipped:
        notes.append("clipped layers merged into it: " + ", ".join(repr(c) for c in clipped))
    # Render at full opacity: the opacity (and, without effects, the fill) stays a number.
    record = layer._record
    saved_opacity = record.opacity
    saved_fill = layer.tagged_blocks.get(Tag.BLEND_FILL_OPACITY) if layer.tagged_blocks is not None else None
    keep_fill = effects and fill < 1.0
    mask_flags = mask.flags if kept_mask is not None else None
    saved_disabled = mask_flags.mask_disabled if mask_flags is not None else None
    try:
        record.opacity = 255
        if saved_fill is not None and not keep_fill:
            layer.tagged_blocks.set_data(Tag.BLEND_FILL_OPACITY, 255)
        if mask_flags is not None:
            mask_flags.mask_disabled = True  # rendered without it: the mask stays a mask
        try:
            pixels, offset = _render(layer)
        except ImportError as exc:
            stored = _stored_pixels(layer)
            if stored is None:
                raise
            notes.append(f"drawn from its stored pixels (psd-tools' renderer needs {_missing_renderer(exc)})")
            pixels, offset = stored, layer.offset
    finally:
        record.opacity = saved_opacity
        if saved_fill is not None:
            layer.tagged_blocks[Tag.BLEND_FILL_OPACITY] = saved_fill
        if mask_flags is not None:
            mask_flags.mask_disabled = saved_disabled
    if keep_fill:
        notes.append(f"fill opacity {round(fill * 100)}% baked into the pixels (it does not apply to effects)")
    if kept_mask is not None and pixels is not None:
        # the mask was stored relative to the layer's record; the rendering may start elsewhere
        dx, dy = int(layer.left) - int(offset[0]), int(layer.top) - int(offset[1])
        kept_mask = dataclasses.replace(kept_mask, offset=(kept_mask.offset[0] + dx, kept_mask.offset[1] + dy))
    return _Leaf(pixels, offset, opacity, 1.0 if keep_fill else fill, kept_mask, notes)


def _group_notes(layer) -> list:
    notes = []
    if layer.kind == "artboard":
        notes.append("artboard kept as a plain group (its background colour is not drawn)")
    try:
        if layer.has_mask() or layer.has_vector_mask():
            notes.append("group mask not applied (dropped)")
        if layer.has_effects():
            notes.append("group effects not applied (dropped)")
    except Exception:  # noqa: BLE001
        pass
    return notes


def _walk(
    group,
    prefix: str,
    groups: tuple,
    visible: bool,
    out: list,
    warnings: list,
    path: Path,
    styles: tuple = (),
    outline: Optional[list] = None,
    adjustments: Optional[list] = None,
) -> None:
    """Walk a psd-tools layer tree bottom -> top: drawable layers go to `out` (as Layers), every
    node to `outline`, one warning per layer that changes on the way (what changed), and one
    warning per file naming the adjustment layers that are not applied."""
    top_level = adjustments is None
    if top_level:
        adjustments = []
    if outline is None:
        outline = []
    depth = len(groups)
    for layer in group:
        name = prefix + clean_name(layer.name or "")
        kind = layer.kind
        own_visible = bool(layer.visible)
        this_visible = visible and own_visible
        bbox = tuple(int(v) for v in getattr(layer, "bbox", (0, 0, 0, 0)))
        blend = _blend_name(layer)
        if kind in _GROUP_KINDS or layer.is_group():
            notes = _group_notes(layer)
            if blend not in _NORMAL_BLENDS:
                notes.append(f"blend mode {blend}: kept in a PSD, composited as normal by layerctl")
            if notes:
                warnings.append(f"{path}: {kind_label(kind)} {name!r}: " + "; ".join(notes))
            node = PsdNode(name, kind, depth, this_visible, bbox, None, kind_label(kind))
            outline.append(node)
            start = len(out)
            inner = groups + ((name, layer.opacity / 255.0),)
            inner_styles = styles + (GroupStyle(visible=own_visible, blend=blend),)
            _walk(layer, name + "/", inner, this_visible, out, warnings, path, inner_styles, outline, adjustments)
            if len(out) == start:
                node.note = f"empty {kind_label(kind)}"
            continue
        label = kind_label(kind)
        if getattr(layer, "clipping", False):
            # Clipped layers are rendered into the layer they clip to (see _read_leaf).
            base = _clip_base(layer)
            where = f" {base!r}" if base else " the layer below"
            what = "adjustment applied to" if label == "adjustment" else "merged into"
            warnings.append(f"{path}: layer {name!r} ({kind_text(kind)}): clipped to{where}; {what} it")
            outline.append(PsdNode(name, kind, depth, this_visible, bbox, None, f"clipped: {what}{where}"))
            continue
        if label == "adjustment":
            if this_visible:  # a hidden adjustment changes nothing anyway
                adjustments.append(f"{name!r} ({kind})")
            outline.append(PsdNode(name, kind, depth, this_visible, bbox, None, "not applied"))
            continue
        try:
            leaf = _read_leaf(layer)
        except ImportError as exc:
            warnings.append(f"{path}: layer {name!r} ({kind_text(kind)}): skipped, it cannot be drawn here ({_missing_renderer(exc)})")
            outline.append(PsdNode(name, kind, depth, this_visible, bbox, None, "cannot be drawn here"))
            continue
        except Exception as exc:  # noqa: BLE001
            warnings.append(f"{path}: layer {name!r} ({kind_text(kind)}): could not be rasterised ({type(exc).__name__}); skipped")
            outline.append(PsdNode(name, kind, depth, this_visible, bbox, None, "could not be rasterised"))
            continue
        if leaf.pixels is None or leaf.pixels.size == 0:
            outline.append(PsdNode(name, kind, depth, this_visible, bbox, None, "empty"))
            continue
        notes = list(leaf.notes)
        if blend not in _NORMAL_BLENDS:
            notes.append(f"blend mode {blend}: kept in a PSD, composited as normal by layerctl")
        if notes:
            warnings.append(f"{path}: layer {name!r} ({kind_text(kind)}): " + "; ".join(notes))
        made = Layer(
            name,
            leaf.pixels,
            (int(leaf.offset[0]), int(leaf.offset[1])),
            opacity=leaf.opacity,
            visible=own_visible,
            kind=kind,
            groups=groups,
            blend=blend,
            fill=leaf.fill,
            mask=leaf.mask,
            group_styles=styles,
        )
        out.append(made)
        outline.append(PsdNode(name, kind, depth, this_visible, bbox, made))
    if top_level and adjustments:
        n = len(adjustments)
        warnings.append(
            f"{path}: {n} adjustment layer{'s' if n != 1 else ''} not applied (skipped; layerctl composites "
            f"pixels only): " + ", ".join(adjustments)
        )


def _clip_base(layer) -> str:
    """The name of the layer a clipped layer clips to ('' when not found)."""
    parent = getattr(layer, "parent", None)
    try:
        siblings = list(parent) if parent is not None else []
        i = siblings.index(layer)
    except (TypeError, ValueError):
        return ""
    for other in reversed(siblings[:i]):
        if not getattr(other, "clipping", False):
            return clean_name(other.name or "")
    return ""


def nothing_drawable(doc: "PsdDocument", path) -> str:
    """Why a PSD gave no drawable layers, in one line (its nodes by kind, a few named)."""
    if not doc.outline:
        return f"{path} has no layers"
    parts = []
    for node in doc.outline[:4]:
        parts.append(f"{node.name!r} ({kind_text(node.kind)}: {node.note or 'nothing to draw'})")
    more = f" and {len(doc.outline) - 4} more" if len(doc.outline) > 4 else ""
    return f"{path} has nothing drawable: " + ", ".join(parts) + more


def open_psd(path) -> PsdDocument:
    """Read a PSD's layers (groups walked in order, names 'group/layer') with warnings for what is approximate."""
    p = Path(path)
    doc = _open(p)
    layers: list[Layer] = []
    warnings: list[str] = []
    outline: list[PsdNode] = []
    try:
        _walk(doc, "", (), True, layers, warnings, p, outline=outline)
    except LayerctlError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read PSD {p}: truncated or damaged ({type(exc).__name__}: {exc})") from None
    if not layers and len(list(doc)) == 0:
        # No layers at all: the merged image is the picture.
        pixels = _merged_pixels(doc)
        if pixels is None:
            raise LayerctlError(f"PSD {p} has neither layers nor a composite image")
        layers.append(Layer("composite", pixels, (0, 0)))
        outline.append(PsdNode("composite", "pixel", 0, True, (0, 0, int(doc.width), int(doc.height)), layers[0]))
    return PsdDocument((int(doc.width), int(doc.height)), layers, warnings, outline)


def _merged_pixels(doc) -> Optional[np.ndarray]:
    """The document's stored merged image as HxWx4 uint8, or None. psd-tools' topil() reads a 16-
    or 32-bit one by truncation; for RGB and greyscale the planes are read here and rounded (the
    same transparency channel and the same un-matting from white as topil())."""
    depth = int(getattr(doc, "depth", 8) or 8)
    if depth in (16, 32) and _float_path(doc) and doc.has_preview():
        from psd_tools.api.utils import get_transparency_index, has_transparency

        w, h = int(doc.width), int(doc.height)
        record = doc._record
        planes = record.image_data.get_data(record.header)
        dtype = ">u2" if depth == 16 else ">f4"
        arrays = [np.frombuffer(p, dtype)[: w * h].reshape(h, w).astype(np.float64) for p in planes]
        if depth == 16:
            arrays = [a / 65535.0 for a in arrays]
        nc = 1 if _color_mode(doc) == "GRAYSCALE" else 3
        if len(arrays) >= nc:
            color = np.clip(np.stack(arrays[:nc], axis=-1), 0.0, 1.0)
            alpha = None
            index = get_transparency_index(doc) if has_transparency(doc) else -1
            if 0 <= index < len(arrays):
                a = np.clip(arrays[index], 0.0, 1.0)[..., None]
                # stored matted on white (as Photoshop does): un-matte where anything shows
                color = np.where(a > 0, (color + a - 1.0) / np.maximum(a, 1e-12), color)
                alpha = a
            return _float_rgba8(np.clip(color, 0.0, 1.0), alpha, doc)
    im = doc.topil()
    return None if im is None else np.asarray(im.convert("RGBA"), dtype=np.uint8)


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
    from layerctl.core.compose import flatten as _flatten

    return _flatten(layers, size)


def read_composite(path):
    """The PSD's picture as a PIL image, via psd-tools (its stored composite when present)."""
    p = Path(path)
    doc = _open(p)
    try:
        if int(getattr(doc, "depth", 8) or 8) in (16, 32) and _float_path(doc) and doc.has_preview():
            from PIL import Image

            return Image.fromarray(_merged_pixels(doc), "RGBA")  # rounded, not truncated
        im = doc.composite()
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read PSD {p}: truncated or damaged ({type(exc).__name__}: {exc})") from None
    if im is None:
        raise LayerctlError(f"PSD {p} has no picture to read")
    return im
