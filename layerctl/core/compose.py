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

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
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


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", str(text))
    if not m:
        raise LayerctlError(f"--size must look like WIDTHxHEIGHT, e.g. 1024x768 (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def _split_option(option: str, text: str) -> tuple[str, str]:
    name, sep, value = str(text).rpartition("=")
    if not sep or not name:
        raise LayerctlError(f"{option} takes NAME=VALUE (got {text!r})")
    return name, value


def parse_xy(option: str, value: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*([+-]?\d+)\s*,\s*([+-]?\d+)\s*", value)
    if not m:
        raise LayerctlError(f"{option} wants X,Y in whole pixels, e.g. 40,-12 (got {value!r})")
    return int(m.group(1)), int(m.group(2))


def parse_float(option: str, value, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise LayerctlError(f"{option} wants a number (got {value!r})") from None
    if not math.isfinite(f):
        raise LayerctlError(f"{option} wants a finite number (got {value!r})")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        rng = f"({lo}, {hi}]" if lo_open and hi is not None else (f"[{lo}, {hi}]" if hi is not None else f"> {lo}")
        raise LayerctlError(f"{option} must be in {rng} (got {value})")
    if hi is not None and f > hi:
        raise LayerctlError(f"{option} must be in [{lo}, {hi}] (got {value})")
    return f


# ---------------------------------------------------------------- stacks from files


@dataclass
class LayerSpec:
    """One requested layer before loading: a file and how to place it."""

    path: Path
    name: Optional[str] = None
    at: Optional[tuple[int, int]] = None
    scale: float = 1.0
    opacity: float = 1.0
    visible: bool = True
    source: str = ""  # where it was asked for (for messages)


def _stack_model():
    """The pydantic schema of a YAML layer stack (built lazily)."""
    from typing import Union

    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class StackLayer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str = Field(description="image or PSD file, relative to the YAML file")
        name: Optional[str] = None
        at: Union[tuple[int, int], str, None] = None
        scale: float = Field(1.0, gt=0, allow_inf_nan=False)
        opacity: float = Field(1.0, ge=0, le=1)
        visible: bool = True

        @field_validator("at")
        @classmethod
        def _at(cls, v):
            if isinstance(v, str):
                try:
                    return parse_xy("at", v)
                except LayerctlError as exc:
                    raise ValueError(str(exc)) from None
            return v

    class StackFile(BaseModel):
        """layers: bottom -> top."""

        model_config = ConfigDict(extra="forbid")
        size: Union[tuple[int, int], str, None] = None
        out: Optional[str] = None
        layers: list[StackLayer] = Field(min_length=1)

        @field_validator("size")
        @classmethod
        def _size(cls, v):
            if isinstance(v, str):
                try:
                    return parse_size(v)
                except LayerctlError:
                    raise ValueError(f"size must look like WIDTHxHEIGHT or [W, H] (got {v!r})") from None
            return v

    return StackFile


def is_yaml(path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def read_stack_yaml(path) -> tuple[list[LayerSpec], Optional[tuple[int, int]], Optional[Path]]:
    """A YAML layer stack -> (specs, size or None, out or None); paths relative to the YAML file."""
    from layerctl.io.yamlio import load_model_yaml

    p = Path(path)
    if not p.is_file():
        raise LayerctlError(f"layer stack not found: {p}")
    cfg = load_model_yaml(p, _stack_model())
    base = p.parent
    specs = []
    for i, item in enumerate(cfg.layers):
        lp = Path(os.path.expanduser(item.path))
        specs.append(
            LayerSpec(
                path=lp if lp.is_absolute() else base / lp,
                name=item.name,
                at=tuple(item.at) if item.at is not None else None,
                scale=item.scale,
                opacity=item.opacity,
                visible=item.visible,
                source=f"{p}: layers[{i}]",
            )
        )
    out = None
    if cfg.out:
        o = Path(os.path.expanduser(cfg.out))
        out = o if o.is_absolute() else base / o
    return specs, (tuple(cfg.size) if cfg.size is not None else None), out


def _unique(name: str, taken: set) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}-{i}" in taken:
        i += 1
    return f"{name}-{i}"


def load_stack(
    specs: Sequence[LayerSpec], force: bool = False, outline: Optional[list] = None, empty: Optional[list] = None
) -> tuple[list[Layer], Optional[tuple[int, int]], list[str]]:
    """Load each spec (images; PSDs expand into their layers) -> (layers, PSD canvas of the bottom input, warnings).

    Names default to the file stem (a PSD's layers keep theirs) and are made unique with -2, -3, ...
    With `outline` (a list), every entry of the stack is appended to it in order: the Layer for
    what draws, layerctl.io.psd.PsdNode for a PSD's groups, adjustment and empty layers. With
    `empty` (a list), a one-line reason is appended for each PSD that has nothing drawable.
    """
    from layerctl.io.imageio import is_psd, load_image

    layers: list[Layer] = []
    warnings: list[str] = []
    taken: set = set()
    first_canvas = None
    for k, spec in enumerate(specs):
        if is_psd(spec.path):
            from layerctl.io.psd import open_psd

            doc = open_psd(spec.path)
            warnings.extend(doc.warnings)
            if k == 0:
                first_canvas = doc.size
            if empty is not None and not doc.layers:
                from layerctl.io.psd import nothing_drawable

                empty.append(nothing_drawable(doc, spec.path))
            dx, dy = spec.at or (0, 0)
            made: dict = {}
            for layer in doc.layers:
                pixels = layer.pixels if spec.scale == 1.0 else scale_pixels(layer.pixels, spec.scale)
                ox, oy = layer.offset
                if spec.scale != 1.0:
                    ox, oy = round(ox * spec.scale), round(oy * spec.scale)
                if spec.scale != 1.0 and k == 0:
                    first_canvas = (max(1, round(doc.size[0] * spec.scale)), max(1, round(doc.size[1] * spec.scale)))
                prefix = f"{spec.name}/" if spec.name else ""
                name = _unique(prefix + layer.name, taken)
                taken.add(name)
                groups = tuple((prefix + gpath, gop) for gpath, gop in layer.groups)
                styles = tuple(group_style(layer, i) for i in range(len(layer.groups)))
                if spec.opacity != 1.0:
                    # the whole document at this opacity: one more enclosing group
                    groups = ((spec.name or spec.path.stem, spec.opacity),) + groups
                    styles = (GroupStyle(),) + styles
                layers.append(
                    Layer(
                        name,
                        pixels,
                        (ox + dx, oy + dy),
                        opacity=layer.opacity,
                        visible=layer.visible and spec.visible,
                        kind=layer.kind,
                        groups=groups,
                        blend=layer.blend,
                        fill=layer.fill,
                        mask=scale_mask(layer.mask, spec.scale),
                        group_styles=styles,
                    )
                )
                made[id(layer)] = layers[-1]
            if outline is not None:
                import dataclasses

                prefix = f"{spec.name}/" if spec.name else ""
                for node in getattr(doc, "outline", None) or doc.layers:
                    if isinstance(node, Layer):
                        outline.append(made.get(id(node), node))
                    elif node.layer is not None:
                        outline.append(made.get(id(node.layer), node.layer))
                    else:
                        outline.append(dataclasses.replace(node, name=prefix + node.name))
            continue
        im = load_image(spec.path, "RGBA")
        pixels = np.asarray(im, dtype=np.uint8)
        if spec.scale != 1.0:
            w, h = pixels.shape[1], pixels.shape[0]
            check_side(f"layer {spec.path.name} scaled by {spec.scale:g} to", round(w * spec.scale), round(h * spec.scale), force)
            pixels = scale_pixels(pixels, spec.scale)
        name = _unique(spec.name or spec.path.stem or f"layer{k + 1}", taken)
        taken.add(name)
        layers.append(Layer(name, pixels, spec.at or (0, 0), opacity=spec.opacity, visible=spec.visible))
        if outline is not None:
            outline.append(layers[-1])
    return layers, first_canvas, warnings


def apply_options(
    layers: list[Layer],
    at: Sequence[str] = (),
    scale: Sequence[str] = (),
    opacity: Sequence[str] = (),
    rename: Sequence[str] = (),
    force: bool = False,
) -> None:
    """Apply the CLI's NAME=VALUE options to loaded layers (in place). Unknown names are errors.

    --name OLD=NEW renames first; later options may use the old or the new name.
    """
    index = {layer.name: i for i, layer in enumerate(layers)}
    old_names: dict[str, int] = {}

    def find(option: str, name: str) -> int:
        if name in index:
            return index[name]
        if name in old_names:
            return old_names[name]
        known = ", ".join(layer.name for layer in layers)
        raise LayerctlError(f"{option}: no layer named {name!r} (layers: {known})")

    for text in rename:
        old, new = _split_option("--name", text)
        new = new.strip()
        if not new:
            raise LayerctlError(f"--name {text!r}: the new name is empty")
        i = find("--name", old)
        if new in index and index[new] != i:
            raise LayerctlError(f"--name {text!r}: another layer is already named {new!r}")
        del index[layers[i].name]
        old_names[layers[i].name] = i
        layers[i].name = new
        index[new] = i
    for text in at:
        name, value = _split_option("--at", text)
        layers[find("--at", name)].offset = parse_xy(f"--at {name}", value)
    for text in opacity:
        name, value = _split_option("--opacity", text)
        layers[find("--opacity", name)].opacity = parse_float(f"--opacity {name}", value, 0.0, 1.0)
    for text in scale:
        name, value = _split_option("--scale", text)
        i = find("--scale", name)
        f = parse_float(f"--scale {name}", value, 0.0, None, lo_open=True)
        w, h = layers[i].size
        check_side(f"layer {layers[i].name} scaled by {f:g} to", max(1, round(w * f)), max(1, round(h * f)), force)
        layers[i].pixels = scale_pixels(layers[i].pixels, f)
        layers[i].mask = scale_mask(layers[i].mask, f)
