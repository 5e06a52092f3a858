"""Layer stacks: placement, scaling, opacity and straight-alpha "over" compositing.

A stack is a list of `Layer`s, bottom -> top, each with straight (not
premultiplied) RGBA pixels and an (x, y) offset of its top-left corner on the
canvas. Compositing happens in float; `flatten` rounds once at the end. Parts
of a layer outside the canvas are clipped.

    from layerctl.core.compose import Layer, flatten
    out = flatten([Layer("bg", bg), Layer("fg", fg, (40, 12), opacity=0.8)], size=(512, 512))

This module is pure (numpy + Pillow for resampling); the CLI is in
layerctl/commands/compose.py, PSD files in layerctl/psd.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from layerctl.errors import LayerctlError
from layerctl.core.imagemath import composite_over, to_uint8

from layerctl.core.geometry import MAX_SIDE  # canvas / layer side above which --force is needed


@dataclass
class Layer:
    """One layer: straight RGBA pixels (HxWx4 uint8, or float in [0,1]) at offset (x, y)."""

    name: str
    pixels: np.ndarray
    offset: tuple[int, int] = (0, 0)
    opacity: float = 1.0
    visible: bool = True
    kind: str = "pixel"  # what it was in its source (PSD layer kind), for listings
    # Enclosing groups, outermost first, as (path, opacity): consecutive layers that share a
    # group are composited together first and the result placed with the group's opacity.
    groups: tuple = ()
    # What a PSD layer carries besides pixels, kept so that re-saving a PSD keeps it:
    blend: str = "normal"  # blend mode (psd-tools' name: "multiply", ...); composited as normal here
    fill: float = 1.0  # fill opacity: multiplies the pixels like opacity does
    mask: Optional["LayerMask"] = None  # a layer mask, applied when compositing
    # One GroupStyle per entry of `groups` (missing entries: a visible pass-through group).
    group_styles: tuple = ()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    @property
    def effective_opacity(self) -> float:
        """The layer's opacity (times its fill opacity) times its groups' opacities."""
        out = float(self.opacity) * float(self.fill)
        for _, op in self.groups:
            out *= float(op)
        return out

    @property
    def shown(self) -> bool:
        """Visible, and so are all its groups."""
        return bool(self.visible) and all(group_style(self, i).visible for i in range(len(self.groups)))


@dataclass(frozen=True)
class GroupStyle:
    """How a PSD group draws, besides its opacity: its eye and its blend mode."""

    visible: bool = True
    blend: str = "pass_through"


@dataclass
class LayerMask:
    """A layer mask: HxW uint8 (255 shows the layer, 0 hides it) whose top-left corner sits at
    `offset` from the layer's own top-left corner (so it moves with the layer, as a linked mask
    does in Photoshop); `default` is its value outside its rectangle."""

    pixels: np.ndarray
    offset: tuple[int, int] = (0, 0)
    default: int = 0
    disabled: bool = False


def group_style(layer: Layer, i: int) -> GroupStyle:
    """The GroupStyle of layer.groups[i] (a visible pass-through group when none is recorded)."""
    styles = getattr(layer, "group_styles", ()) or ()
    return styles[i] if i < len(styles) and styles[i] is not None else GroupStyle()


def mask_coverage(mask: LayerMask, size: tuple[int, int]) -> np.ndarray:
    """HxW float in [0,1]: the mask over a layer of size (w, h)."""
    w, h = size
    cover = np.full((h, w), mask.default / 255.0, dtype=np.float64)
    mp = np.asarray(mask.pixels)
    mh, mw = mp.shape[:2]
    x, y = int(mask.offset[0]), int(mask.offset[1])
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + mw, w), min(y + mh, h)
    if x0 < x1 and y0 < y1:
        part = mp[y0 - y : y1 - y, x0 - x : x1 - x]
        cover[y0:y1, x0:x1] = part.astype(np.float64) / 255.0 if part.dtype == np.uint8 else np.clip(part, 0.0, 1.0)
    return cover


def masked_pixels(layer: Layer) -> np.ndarray:
    """The layer's pixels with its (enabled) mask applied to their alpha; unchanged without one."""
    mask = getattr(layer, "mask", None)
    if mask is None or mask.disabled:
        return layer.pixels
    out = as_float(layer.pixels).copy()
    out[..., 3] *= mask_coverage(mask, layer.size)
    return out


def scale_mask(mask: Optional[LayerMask], factor: float) -> Optional[LayerMask]:
    """A mask for the layer scaled by `factor` (bilinear; offset scaled and rounded)."""
    if mask is None or factor == 1.0:
        return mask
    from PIL import Image

    mp = np.asarray(mask.pixels, dtype=np.uint8)
    h, w = mp.shape[:2]
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    resized = np.asarray(Image.fromarray(mp, "L").resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.uint8)
    offset = (round(mask.offset[0] * factor), round(mask.offset[1] * factor))
    return LayerMask(resized, offset, mask.default, mask.disabled)


@dataclass
class Stack:
    """A resolved layer stack and its canvas size (width, height)."""

    layers: list[Layer]
    size: tuple[int, int]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- pure math


def as_float(pixels: np.ndarray) -> np.ndarray:
    """HxWx4 uint8 (or float in [0,1]) -> float64 in [0,1]."""
    if pixels.ndim != 3 or pixels.shape[2] != 4:
        raise ValueError(f"expected HxWx4 RGBA pixels, got shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float64) / 255.0
    return np.clip(pixels.astype(np.float64), 0.0, 1.0)


def place_over(canvas: np.ndarray, pixels: np.ndarray, offset: tuple[int, int], opacity: float = 1.0) -> None:
    """Composite `pixels` (straight RGBA) over `canvas` (HxWx4 float, in place) at offset, clipped.

    The layer's alpha is multiplied by `opacity` first.
    """
    ch, cw = canvas.shape[:2]
    lh, lw = pixels.shape[:2]
    x, y = int(offset[0]), int(offset[1])
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + lw, cw), min(y + lh, ch)
    if x0 >= x1 or y0 >= y1:
        return  # entirely outside the canvas
    top = as_float(pixels[y0 - y : y1 - y, x0 - x : x1 - x])
    if opacity != 1.0:
        top[..., 3] *= float(opacity)
    canvas[y0:y1, x0:x1] = composite_over(top, canvas[y0:y1, x0:x1])


def composite_layers(layers: Sequence[Layer], size: tuple[int, int]) -> np.ndarray:
    """Float HxWx4 straight RGBA of the visible layers over a transparent canvas of size (w, h)."""
    w, h = size
    canvas = np.zeros((h, w, 4), dtype=np.float32)
    _composite_into(canvas, list(layers), 0)
    return canvas


def _composite_into(canvas: np.ndarray, layers: list, depth: int) -> None:
    i = 0
    while i < len(layers):
        layer = layers[i]
        if len(layer.groups) > depth:
            group = layer.groups[depth]
            j = i
            while j < len(layers) and len(layers[j].groups) > depth and layers[j].groups[depth] == group:
                j += 1
            if group[1] > 0 and group_style(layer, depth).visible:
                # A group is composited on its own, then placed with its opacity. For normal
                # blending this equals a pass-through group too.
                sub = np.zeros_like(canvas)
                _composite_into(sub, layers[i:j], depth + 1)
                place_over(canvas, sub, (0, 0), group[1])
            i = j
            continue
        opacity = float(layer.opacity) * float(getattr(layer, "fill", 1.0))
        if layer.visible and opacity > 0:
            place_over(canvas, masked_pixels(layer), layer.offset, opacity)
        i += 1


def flatten(layers: Sequence[Layer], size: tuple[int, int]) -> np.ndarray:
    """HxWx4 uint8 of the visible layers composited bottom -> top, rounded once."""
    return to_uint8(composite_layers(layers, size))


def scale_pixels(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Resize straight RGBA by `factor` (Lanczos on premultiplied float; no 8-bit rounding).

    Returns float HxWx4 in [0,1]. Premultiplying first keeps the colour of
    invisible pixels from bleeding into soft edges.
    """
    from PIL import Image

    src = as_float(pixels)
    h, w = src.shape[:2]
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    if (nw, nh) == (w, h):
        return src
    alpha = src[..., 3]
    planes = [src[..., c] * alpha for c in range(3)] + [alpha]
    out = np.stack(
        [np.asarray(Image.fromarray(p.astype(np.float32), "F").resize((nw, nh), Image.Resampling.LANCZOS)) for p in planes],
        axis=-1,
    ).astype(np.float64)
    out = np.clip(out, 0.0, 1.0)
    a = out[..., 3:4]
    rgb = np.where(a > 1e-6, out[..., :3] / np.maximum(a, 1e-6), 0.0)
    return np.concatenate([np.clip(rgb, 0.0, 1.0), a], axis=-1)


# ---------------------------------------------------------------- validation helpers


def check_side(what: str, w: int, h: int, force: bool = False) -> None:
    """A canvas/layer size must be positive and, without force, at most MAX_SIDE a side."""
    if w <= 0 or h <= 0:
        raise LayerctlError(f"{what} must be positive on both sides (got {w}x{h})")
    if not force and (w > MAX_SIDE or h > MAX_SIDE):
        raise LayerctlError(f"{what} {w}x{h} is over {MAX_SIDE} pixels on a side (use --force if you mean it)")


# ---------------------------------------------------------------- stacks from files


