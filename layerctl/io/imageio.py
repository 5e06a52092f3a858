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


NAME_MAX = 255  # bytes of one file name on the common file systems (ext4, APFS, NTFS: 255 units)


def _exists(p: Path) -> bool:
    """Exists, or is a symlink (even a dangling one): writing there would replace something."""
    return os.path.lexists(p)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (exit 2, one line) when an output cannot be written; creates nothing.

    Refused: an existing file or symlink without --overwrite, a folder of that name (even with
    --overwrite), a file name over NAME_MAX bytes, a parent that is a file, a folder that cannot
    be created or written to.
    """
    p = Path(path)
    if not p.name:
        raise LayerctlError(f"cannot write '{p}': no file name")
    if len(os.fsencode(p.name)) > NAME_MAX:
        raise LayerctlError(f"cannot write '{str(p)[:60]}...': the file name is {len(os.fsencode(p.name))} bytes, over the limit of {NAME_MAX}")
    if p.is_dir() and not p.is_symlink():
        raise LayerctlError(f"cannot write '{p}': a folder of that name exists")
    if _exists(p) and not overwrite:
        what = " as a symlink" if p.is_symlink() else ""
        raise LayerctlError(f"{p} exists{what} (use --overwrite to replace it)")
    for part in p.parent.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise LayerctlError(f"cannot write '{str(p)[:60]}...': a folder name is over {NAME_MAX} bytes")
    # the nearest existing ancestor must be a writable folder (missing folders are made when writing)
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():
        if probe.is_symlink():
            raise LayerctlError(f"cannot write '{p}': {probe} is a broken symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise LayerctlError(f"cannot write '{p}': {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LayerctlError(f"cannot write to folder {probe}")
    return p


def _publish_exclusive(tmp: str, p: Path) -> None:
    """Put tmp at p only if p does not exist yet, atomically: a hard link fails when the name is taken
    (two writers: one wins, the other gets a one-line error), then the temporary name goes."""
    try:
        os.link(tmp, p)
    except FileExistsError:
        raise LayerctlError(f"{p} exists (use --overwrite to replace it)") from None
    except OSError:
        # no hard links on this file system: reserve the name with O_EXCL, then rename onto it
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise LayerctlError(f"{p} exists (use --overwrite to replace it)") from None
        os.close(fd)
        os.replace(tmp, p)
        return
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write, overwrite: bool = False, suffix: str | None = None) -> Path:
    """Call write(tmp_path) then move it onto path; the temporary file is removed on any failure.

    Without `overwrite` the final step is an exclusive create (never replaces a file or symlink that
    appeared meanwhile); with it, an atomic rename.
    """
    p = check_writable(path, overwrite)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LayerctlError(f"cannot create folder {parent}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name[:200]}.", suffix=suffix or p.suffix or ".tmp", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            if p.is_dir() and not p.is_symlink():
                raise LayerctlError(f"cannot write '{p}': a folder of that name exists")
            os.replace(tmp, p)
        else:
            _publish_exclusive(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


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


def check_pixel_limit(path, width: int, height: int) -> None:
    """Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), for readers that bypass Pillow."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise LayerctlError(
            f"{path}: {width}x{height} is {width * height} pixels, over Pillow's decompression-bomb limit "
            f"of {2 * limit}; refusing to open it (could be a decompression bomb)"
        )


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
