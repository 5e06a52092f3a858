"""`layerctl compose`: stack layers into a PNG or a layered PSD; list / extract / flatten PSDs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

OUT_SUFFIXES = (".png", ".psd")


def _warn(msg: str) -> None:
    sys.stderr.write(f"layerctl: warning: {msg}\n")


def _safe_filename(name: str) -> str:
    s = re.sub(r"[^\w.\- ]+", "_", name, flags=re.UNICODE).strip(" .")
    return s[:80] or "layer"


def _check_target(path: Path, overwrite: bool) -> None:
    """Early output check that creates nothing (the writers create folders when they write)."""
    from layerctl.errors import LayerctlError

    if path.exists() and not overwrite:
        raise LayerctlError(f"{path} exists (use --overwrite to replace it)")
    if path.exists() and path.is_dir():
        raise LayerctlError(f"{path} is a folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise LayerctlError(f"cannot write {path}: {parent} is not a folder")


def compose(
    inputs: List[str] = typer.Argument(
        ...,
        metavar="LAYER",
        help="Layers bottom -> top: image files (PNG/WebP/JPEG/TIFF/PSD; a PSD adds its layers) "
        "or a YAML layer stack.",
        show_default=False,
    ),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="OUT", help="Output file: .png (flattened) or .psd (layered)."),
    at: List[str] = typer.Option([], "--at", metavar="NAME=X,Y", help="Put layer NAME's top-left corner at X,Y."),
    scale: List[str] = typer.Option([], "--scale", metavar="NAME=F", help="Resize layer NAME by factor F."),
    opacity: List[str] = typer.Option([], "--opacity", metavar="NAME=F", help="Layer NAME's opacity, 0..1."),
    name: List[str] = typer.Option(
        [], "--name", metavar="OLD=NEW", help="Rename a layer (default names: file stems; PSD layer names)."
    ),
    size: Optional[str] = typer.Option(None, "--size", metavar="WxH", help="Canvas size (default: the bottom layer's)."),
    list_layers: bool = typer.Option(False, "--list", help="Print the layers (name, kind, size, offset, opacity)."),
    extract: Optional[str] = typer.Option(
        None, "--extract", metavar="DIR", help="Write each layer as an RGBA PNG into DIR (opacity not applied)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of plain text."),
    force: bool = typer.Option(False, "--force", help="Allow canvases and layers over 16384 pixels a side."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Stack layers into one picture (PNG) or a layered PSD; list, extract or flatten a PSD.

    Example: layerctl compose bg.png fg.png --at fg=120,40 --opacity fg=0.9 --out scene.psd
    """
    from layerctl.core.compose import check_side
    from layerctl.io.stack import apply_options, gather_specs, load_stack, parse_size
    from layerctl.errors import LayerctlError

    # 1. Everything that can be checked before reading a pixel.
    if out is None and not list_layers and extract is None:
        raise LayerctlError("say where to write: --out OUT.png or OUT.psd (or --list / --extract DIR)")
    canvas = parse_size(size) if size is not None else None
    if canvas is not None:
        check_side("--size", canvas[0], canvas[1], force)
    specs, yaml_size, yaml_out = gather_specs(inputs)
    if out is None and yaml_out is not None and not list_layers and extract is None:
        out = str(yaml_out)
    out_path = _out_target(out, overwrite) if out is not None else None
    if canvas is None and yaml_size is not None:
        canvas = (int(yaml_size[0]), int(yaml_size[1]))
        check_side("canvas size", canvas[0], canvas[1], force)

    # 2. Load, apply options, settle the canvas.
    outline: list = []
    empty: list = []
    layers, psd_canvas, warnings = load_stack(specs, force=force, outline=outline, empty=empty)
    if not layers:
        why = "; ".join(empty) if empty else "the inputs hold no drawable layers"
        if out_path is not None or extract is not None or not outline:
            raise LayerctlError(f"no layers to compose: {why}")
        warnings.append(f"nothing to compose: {why}")  # --list alone still shows what is there
    apply_options(layers, at=at, scale=scale, opacity=opacity, rename=name, force=force)
    if canvas is None and layers:
        canvas = psd_canvas or layers[0].size
        check_side("canvas (the bottom layer's size)", canvas[0], canvas[1], force)
    for w in warnings:
        _warn(w)

    # 3. Every output path is checked before anything is written.
    extract_paths = _extract_targets(Path(extract), layers, overwrite) if extract is not None else []

    # 4. List, extract, write.
    if list_layers:
        _list(layers, outline, as_json)
    _write_extract(layers, extract_paths, overwrite, as_json)
    if out_path is not None:
        _write_out(out_path, layers, canvas, overwrite, as_json)


def _out_target(out: str, overwrite: bool) -> Path:
    from layerctl.errors import LayerctlError

    out_path = Path(out)
    if out_path.suffix.lower() not in OUT_SUFFIXES:
        raise LayerctlError(f"cannot write {out_path.suffix or 'files without an extension'!s}: --out must end in .png or .psd")
    _check_target(out_path, overwrite)
    return out_path


def _extract_targets(folder: Path, layers: list, overwrite: bool) -> list[Path]:
    """`--extract DIR`: one numbered PNG per drawable layer, every name checked before any write."""
    from layerctl.errors import LayerctlError

    if folder.exists() and not folder.is_dir():
        raise LayerctlError(f"--extract {folder}: exists and is not a folder")
    targets = [folder / f"{i:02d}-{_safe_filename(layer.name)}.png" for i, layer in enumerate(layers, 1)]
    for target in targets:
        _check_target(target, overwrite)
    return targets


def _write_extract(layers: list, targets: list[Path], overwrite: bool, as_json: bool) -> None:
    from layerctl.core.imagemath import to_uint8
    from layerctl.io.imageio import save_png

    for layer, target in zip(layers, targets):
        px = layer.pixels if layer.pixels.dtype.name == "uint8" else to_uint8(layer.pixels)
        written = save_png(target, px, overwrite=overwrite)
        typer.echo(json.dumps({"layer": layer.name, "path": str(written)}) if as_json else str(written))


def _write_out(out_path: Path, layers: list, canvas, overwrite: bool, as_json: bool) -> None:
    """The composed stack: a layered PSD, or a flattened PNG."""
    if out_path.suffix.lower() == ".psd":
        from layerctl.io.psd import write_psd

        written = write_psd(out_path, layers, size=canvas, overwrite=overwrite)
    else:
        from layerctl.core.compose import flatten
        from layerctl.io.imageio import save_png

        written = save_png(out_path, flatten(layers, canvas), overwrite=overwrite)
    typer.echo(json.dumps({"path": str(written), "size": list(canvas), "layers": len(layers)}) if as_json else str(written))


def _list(layers: list, outline: list, as_json: bool) -> None:
    """`--list`: every entry of the stack in order; what draws is numbered (as --extract numbers
    its files), a PSD's groups, adjustment and empty layers are shown with '-' and why."""
    from layerctl.core.compose import Layer
    from layerctl.io.psd import kind_label, kind_text

    index = {id(layer): i for i, layer in enumerate(layers, 1)}
    for entry in outline or layers:
        if not isinstance(entry, Layer):
            row = {
                "index": None,
                "name": entry.name,
                "kind": kind_label(entry.kind),
                "psd_kind": entry.kind,
                "note": entry.note,
                "depth": entry.depth,
                "visible": entry.visible,
            }
            if as_json:
                typer.echo(json.dumps(row, ensure_ascii=False))
            else:
                flags = "" if entry.visible else "  hidden"
                note = f"  ({entry.note})" if entry.note and entry.note != kind_label(entry.kind) else ""
                typer.echo(f"  -  {entry.name}\t{kind_text(entry.kind)}{note}{flags}")
            continue
        layer = entry
        i = index.get(id(layer))
        if i is None:
            continue
        w, h = layer.size
        row = {
            "index": i,
            "name": layer.name,
            "kind": kind_label(layer.kind),
            "psd_kind": layer.kind,
            "width": w,
            "height": h,
            "x": layer.offset[0],
            "y": layer.offset[1],
            "opacity": round(layer.opacity, 4),
            "fill": round(layer.fill, 4),
            "effective_opacity": round(layer.effective_opacity, 4),
            "blend": layer.blend,
            "mask": layer.mask is not None,
            "groups": [g for g, _ in layer.groups],
            "visible": layer.shown,
        }
        if as_json:
            typer.echo(json.dumps(row, ensure_ascii=False))
        else:
            flags = "" if layer.shown else "  hidden"
            if layer.blend not in ("normal",):
                flags += f"  {layer.blend}"
            if layer.mask is not None:
                flags += "  mask" + (" (disabled)" if layer.mask.disabled else "")
            typer.echo(
                f"{i:3d}  {layer.name}\t{kind_text(layer.kind)}  {w}x{h}  at {layer.offset[0]},{layer.offset[1]}"
                f"  opacity {layer.effective_opacity:.3g}{flags}"
            )


def register(app: typer.Typer) -> None:
    app.command("compose")(compose)
