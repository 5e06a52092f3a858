"""Sizes, fits and masks: the pure geometry every pipeline shares (numpy + Pillow, no torch).

Output sides are multiples of 64 (the transparent decoder's rule); conditioning images are
fitted to the output size by ``crop`` (cover + centre crop, the official default), ``fit``
(contain + pad with the median border colour) or ``stretch``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from layerctl.errors import LayerctlError

MAX_SIDE = 16384  # largest output side accepted anywhere


RESIZE_MODES = ("crop", "fit", "stretch")


def auto_size(img_w: int, img_h: int, native: int, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    """Output size for a conditioning image of img_w x img_h.

    Both given: as given. One given: the other from the image's aspect ratio. None: the image's
    aspect ratio at the model's native area (native x native). Results are multiples of 64.
    """
    if width and height:
        return int(width), int(height)
    aspect = img_w / img_h
    if width:
        return int(width), round64(width / aspect)
    if height:
        return round64(height * aspect), int(height)
    area = float(native) * native
    return round64(math.sqrt(area * aspect)), round64(math.sqrt(area / aspect))


def resize_channels(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """HxWxC float32 -> height x width x C; area average when shrinking, Lanczos when growing
    (the official rule: INTER_AREA when the target has fewer pixels, else LANCZOS4)."""
    from PIL import Image

    h, w, c = arr.shape
    if (h, w) == (height, width):
        return arr.astype(np.float32, copy=True)
    resample = Image.Resampling.BOX if width * height < w * h else Image.Resampling.LANCZOS
    out = np.empty((height, width, c), np.float32)
    for i in range(c):
        plane = Image.fromarray(np.ascontiguousarray(arr[..., i], dtype=np.float32), mode="F")
        out[..., i] = np.asarray(plane.resize((width, height), resample=resample), dtype=np.float32)
    return out


def fit_image(rgba: np.ndarray, width: int, height: int, how: str = "crop") -> np.ndarray:
    """Straight RGBA float HxWx4 -> width x height straight RGBA, resized the `how` way.

    crop: scale to cover, centre crop (official default); fit: scale to fit inside, pad with the
    median border colour (transparent for a cut-out); stretch: resize to the size as is.
    Resampling is done on premultiplied colour, so invisible pixels do not bleed into edges.
    """
    if how not in RESIZE_MODES:
        raise LayerctlError(f"unknown resize mode '{how}' (use {', '.join(RESIZE_MODES)})")
    rgba = np.asarray(rgba, np.float32)
    if rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"expected an HxWx4 RGBA array, got shape {rgba.shape}")
    pm = np.concatenate([rgba[..., :3] * rgba[..., 3:4], rgba[..., 3:4]], axis=-1)
    h0, w0 = pm.shape[:2]
    if how == "stretch":
        out = resize_channels(pm, width, height)
    else:
        k = (max if how == "crop" else min)(height / h0, width / w0)
        nw, nh = max(1, int(round(w0 * k))), max(1, int(round(h0 * k)))
        scaled = resize_channels(pm, nw, nh)
        if how == "crop":
            top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
            out = scaled[top:top + height, left:left + width]
        else:
            border = np.concatenate([pm[0], pm[-1], pm[:, 0], pm[:, -1]], axis=0)
            fill = np.median(border, axis=0).astype(np.float32)
            fill[:3] = np.minimum(fill[:3], fill[3])
            out = np.tile(fill[None, None], (height, width, 1))
            top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
            out[top:top + nh, left:left + nw] = scaled[: height - top, : width - left]
    a = np.clip(out[..., 3:4], 0.0, 1.0)
    rgb = np.clip(out[..., :3], 0.0, a)
    straight = np.where(a > 1e-6, rgb / np.maximum(a, 1e-6), 0.0)
    return np.concatenate([np.clip(straight, 0.0, 1.0), a], axis=-1).astype(np.float32)


def round64(x: float) -> int:
    """Nearest multiple of 64, at least 64."""
    return max(64, int(round(x / 64.0)) * 64)


def edit_size(img_w: int, img_h: int, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    """Output size for an init image: --width/--height (one given: the other from the aspect
    ratio, a multiple of 64), else the image's own size (run padded to multiples of 64)."""
    if width or height:
        return auto_size(img_w, img_h, 64, width, height)
    return int(img_w), int(img_h)


def ceil64(x: int) -> int:
    """Smallest multiple of 64 >= x."""
    return max(64, -(-int(x) // 64) * 64)


def hires_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """round(width * factor) x round(height * factor); one-line errors when not larger or too big.

    The refinement runs at that size padded up to multiples of 64 (see :func:`pad_reflect`)
    and is cropped back, so any factor gives the exact size."""
    if not (factor > 1.0) or factor == float("inf"):
        raise LayerctlError(f"hires factor must be > 1 (got {factor})")
    w2, h2 = int(round(width * factor)), int(round(height * factor))
    if max(ceil64(w2), ceil64(h2)) > MAX_SIDE:
        raise LayerctlError(
            f"x{factor:g} of {width}x{height} is {w2}x{h2}, over the limit of {MAX_SIDE} px a side"
        )
    if w2 <= width and h2 <= height:
        raise LayerctlError(f"x{factor:g} of {width}x{height} is {w2}x{h2}, not larger: use a bigger factor")
    return w2, h2


def fit_mask(mask: np.ndarray, width: int, height: int, how: str) -> np.ndarray:
    """An HxW mask fitted to width x height the same way fit_image fits the init image."""
    h, w = mask.shape
    if (w, h) == (width, height):
        return mask.astype(np.float32, copy=True)
    rgba = np.concatenate([np.repeat(mask[..., None], 3, axis=-1), np.ones((h, w, 1), np.float32)], axis=-1)
    out = fit_image(rgba, width, height, how)[..., 0]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def latent_mask(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """HxW pixel mask (1 = repaint) -> (H/f)x(W/f) float32 {0,1} mask: a latent cell is repainted
    when any pixel of it is > 0."""
    m = np.asarray(mask, dtype=np.float32)
    h, w = m.shape
    if h % factor or w % factor:
        raise ValueError(f"mask size {w}x{h} is not a multiple of {factor}")
    cells = m.reshape(h // factor, factor, w // factor, factor)
    return (cells.max(axis=(1, 3)) > 0).astype(np.float32)
