"""Image files: RGBA loading, PNG writing with metadata (atomic), previews.

Output PNGs hold straight alpha. Every PNG carries its recipe in a
`parameters` text chunk (A1111 style) and a `layerctl` JSON chunk.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from layerctl.errors import LayerctlError


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (exit 2) when an output cannot be written; returns the resolved Path."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise LayerctlError(f"{p} exists (use --overwrite to replace it)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayerctlError(f"cannot create folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise LayerctlError(f"cannot write to folder {parent}")
    return p


def atomic_write(path: str | os.PathLike, write, overwrite: bool = False, suffix: str | None = None) -> Path:
    """Call write(tmp_path) then rename onto path; the temporary file is removed on any failure."""
    p = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix or p.suffix or ".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        if p.exists() and not overwrite:
            raise LayerctlError(f"{p} exists (use --overwrite to replace it)")
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def a1111_parameters(meta: dict) -> str:
    """The A1111-style `parameters` text: prompt, 'Negative prompt:', then 'Key: value' pairs."""
    lines = [str(meta.get("prompt") or "")]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    pairs = []
    for key, label in [
        ("steps", "Steps"),
        ("sampler", "Sampler"),
        ("cfg", "CFG scale"),
        ("seed", "Seed"),
        ("size", "Size"),
        ("model", "Model"),
        ("mode", "LayerDiffuse mode"),
        ("layer", "Layer"),
        ("layerctl_version", "layerctl"),
    ]:
        if meta.get(key) is not None:
            val = meta[key]
            if isinstance(val, (list, tuple)) and key == "size":
                val = f"{val[0]}x{val[1]}"
            pairs.append(f"{label}: {val}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def save_png(path, image, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write an image (PIL image or HxWxC uint8 array) as PNG with metadata, atomically."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    if isinstance(image, np.ndarray):
        mode = {2: "LA", 3: "RGB", 4: "RGBA"}.get(image.shape[-1] if image.ndim == 3 else 1, "L")
        image = Image.fromarray(image if image.ndim == 3 else image, mode=None if image.ndim == 2 else mode)
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text("parameters", a1111_parameters(metadata))
        info.add_text("layerctl", json.dumps(metadata, sort_keys=True, default=str))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite, suffix=".png")


def read_metadata(path) -> dict:
    """The layerctl JSON metadata of a PNG written by layerctl ({} when absent)."""
    from PIL import Image

    with Image.open(path) as im:
        raw = im.info.get("layerctl") or (im.text.get("layerctl") if hasattr(im, "text") else None)
    return json.loads(raw) if raw else {}


def load_image(path, mode: str = "RGBA"):
    """Open any image Pillow reads, apply EXIF orientation, convert to `mode`. Clear errors."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise LayerctlError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                import numpy as np

                arr = np.asarray(im).astype("float64")
                im = Image.fromarray((arr / (65535.0 if arr.max() > 255 else 255.0) * 255).round().astype("uint8"), "L")
            return im.convert(mode)
    except UnidentifiedImageError:
        raise LayerctlError(f"not an image (or a format Pillow cannot read): {p}") from None
    except Image.DecompressionBombError as exc:
        raise LayerctlError(f"{p}: image too large ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise LayerctlError(f"cannot read image {p}: {exc}") from None
