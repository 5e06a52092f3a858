"""Layer stacks from files: images, PSDs and YAML stack files read into `core.compose.Layer`s,
and the CLI's placement options applied to them. The only module that combines image files, PSD
files and compositing (those three do not import each other's readers)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from layerctl.core.compose import GroupStyle, Layer, check_side, group_style, scale_mask, scale_pixels
from layerctl.errors import LayerctlError


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


def gather_specs(inputs) -> tuple[list[LayerSpec], Optional[tuple[int, int]], Optional[Path]]:
    """Command-line inputs (image files, PSDs, YAML stacks), bottom -> top, as layer specs, with the
    first canvas size and output path any YAML stack names."""
    specs: list[LayerSpec] = []
    size = out = None
    for arg in inputs:
        p = Path(arg)
        if is_yaml(p):
            more, ysize, yout = read_stack_yaml(p)
            specs.extend(more)
            size = size if size is not None else ysize
            out = out if out is not None else yout
        elif not p.exists():
            raise LayerctlError(f"image not found: {p}")
        else:
            specs.append(LayerSpec(path=p, source=arg))
    return specs, size, out


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
