"""Image files: RGBA loading, PNG writing with metadata (atomic), previews.

Output PNGs hold straight alpha. Every PNG carries its recipe in a
`parameters` text chunk (A1111 style) and a `layerctl` JSON chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

from layerctl.errors import LayerctlError
from layerctl.io.files import NAME_MAX, atomic_write, check_pixel_limit, check_writable  # noqa: F401 - re-exported


def strict_json(obj, **kw) -> str:
    """JSON without NaN/Infinity (which strict readers refuse): a non-finite number is a bug upstream,
    reported as one line instead of written."""
    try:
        return json.dumps(obj, allow_nan=False, default=str, **kw)
    except ValueError:
        raise LayerctlError("refusing to write non-finite numbers (NaN/Infinity) into metadata") from None


def a1111_parameters(meta: dict) -> str:
    """The A1111-style `parameters` text: prompt, 'Negative prompt:', then 'Key: value' pairs.

    A layer file (meta['layer'] with its text in meta['prompts']) carries the prompt that made that
    layer; the JSON chunk keeps every prompt."""
    prompt = meta.get("prompt")
    per_layer = meta.get("prompts") if isinstance(meta.get("prompts"), dict) else {}
    if meta.get("layer") in per_layer and per_layer[meta["layer"]]:
        prompt = per_layer[meta["layer"]]
    lines = [str(prompt or "")]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    pairs = []
    meta = dict(meta, sampler_label=meta.get("sampler_label") or meta.get("sampler"))  # older files: one label
    for key, label in [
        ("steps", "Steps"),
        ("sampler_label", "Sampler"),
        ("schedule_label", "Schedule type"),
        ("cfg", "CFG scale"),
        ("cfg_rescale", "CFG rescale"),
        ("guidance", "Distilled CFG Scale"),  # FLUX.1-dev (Forge's label)
        ("seed", "Seed"),
        ("size", "Size"),
        ("model", "Model"),
        ("clip_skip", "Clip skip"),
        ("mode", "LayerDiffuse mode"),
        ("layer", "Layer"),
        ("layerctl_version", "layerctl"),
    ]:
        if meta.get(key) is not None and not (key == "cfg_rescale" and not meta[key]):
            val = meta[key]
            if key == "clip_skip" and val == 1:
                continue  # A1111 writes "Clip skip" only above 1
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
        info.add_text("layerctl", strict_json(metadata, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite, suffix=".png")


def read_metadata(path) -> dict:
    """The layerctl JSON metadata of a PNG written by layerctl ({} when absent)."""
    from PIL import Image

    with Image.open(path) as im:
        raw = im.info.get("layerctl") or (im.text.get("layerctl") if hasattr(im, "text") else None)
    return json.loads(raw) if raw else {}


def is_psd(path) -> bool:
    """True when the file starts with the PSD/PSB signature (whatever its extension)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"8BPS"
    except OSError:
        return False


def _icc_to_srgb(im):
    """Convert with the embedded ICC profile to sRGB when it matters (CMYK, or a non-sRGB profile)."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im
    try:
        import io

        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = (ImageCms.getProfileDescription(src) or "").lower()
        if im.mode != "CMYK" and "srgb" in desc:
            return im
        if im.mode not in ("CMYK", "RGB", "RGBA", "L", "LA"):
            return im
        alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
        base = im.convert("L" if im.mode == "LA" else "RGB") if im.mode in ("RGBA", "LA") else im
        out_mode = "L" if base.mode == "L" else "RGB"
        dst = ImageCms.createProfile("sRGB") if out_mode == "RGB" else None
        if dst is None:
            return im  # grey with a grey profile: leave it
        out = ImageCms.profileToProfile(base, src, dst, outputMode=out_mode)
        if alpha is not None:
            out.putalpha(alpha)
        return out
    except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain conversion
        return im


def _normalize_mode(im):
    """Bring Pillow's many modes to L/LA/RGB/RGBA (8-bit) without losing transparency or range."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    trns = im.info.get("transparency")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "I" and arr.size and arr.max() <= 255 and im.format not in ("PNG",):
            scale = 1.0  # 32-bit integer data that holds 8-bit values
        else:
            scale = 255.0 / 65535.0
        grey = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
        if isinstance(trns, int):
            a = np.where(np.asarray(im) == trns, 0, 255).astype(np.uint8)
            grey = Image.merge("LA", (grey, Image.fromarray(a, "L")))
        return grey
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8), "L")
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        return im.convert("RGBA") if (mode == "PA" or trns is not None) else im.convert("RGB")
    if mode in ("L", "RGB") and trns is not None:
        return im.convert("LA" if mode == "L" else "RGBA")
    if mode == "CMYK":
        return _icc_to_srgb(im).convert("RGB")
    if mode in ("RGB", "RGBA", "L", "LA"):
        return _icc_to_srgb(im)
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode == "La":
        return im.convert("LA")
    return im.convert("RGBA" if "A" in im.getbands() else "RGB")


def load_image(path, mode: str = "RGBA"):
    """Open any image Pillow reads (or a PSD, via psd-tools), apply EXIF orientation, convert to `mode`.

    Palette transparency, LA, 16-bit, float, CMYK (through its ICC profile when it has one) are
    converted with their transparency and range kept. Errors are one clear LayerctlError line:
    missing file, not an image, truncated or damaged, over Pillow's decompression-bomb limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise LayerctlError(f"image not found: {p}")
    if not p.is_file():
        raise LayerctlError(f"not a file: {p}")
    if is_psd(p):
        from layerctl.io.psd import read_composite

        im = read_composite(p)
        return im.convert(mode) if im.mode != mode else im
    try:
        with Image.open(p) as im:
            im.load()  # decode now, so a truncated file fails here
            im = ImageOps.exif_transpose(im)
            im = _normalize_mode(im)
            return im.convert(mode) if im.mode != mode else im.copy()
    except UnidentifiedImageError:
        raise LayerctlError(f"not an image (or a format Pillow cannot read): {p}") from None
    except Image.DecompressionBombError as exc:
        raise LayerctlError(f"{p}: image too large, over Pillow's decompression-bomb limit ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncat" in msg.lower() or isinstance(exc, EOFError):
            raise LayerctlError(f"cannot read image {p}: the file is truncated ({msg})") from None
        raise LayerctlError(f"cannot read image {p}: damaged or unsupported ({msg})") from None
