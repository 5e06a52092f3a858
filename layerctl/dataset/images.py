"""Pixel helpers of the dataset builders: compositing, perceptual hash, buckets, masks, hashes."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Optional
import numpy as np
from layerctl.core.imagemath import composite_over, flatten_on_grey




def composite_rgb(fg_rgba: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """`fg over bg` with straight alpha, an opaque background: HxWx3 float32."""
    return composite_over(np.asarray(fg_rgba, dtype=np.float32), np.asarray(bg_rgb, dtype=np.float32))[..., :3]


def _dhash_bits(channel: np.ndarray, size: int = 8, eps: float = 2.0 / 255.0) -> tuple[int, int]:
    """Horizontal and vertical difference hashes (size*size bits each) of one float channel."""
    from PIL import Image

    src = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), "F")
    wide = np.asarray(src.resize((size + 1, size), Image.Resampling.BOX), dtype=np.float32)
    tall = np.asarray(src.resize((size, size + 1), Image.Resampling.BOX), dtype=np.float32)
    hbits = (wide[:, 1:] - wide[:, :-1]) > eps
    vbits = (tall[1:, :] - tall[:-1, :]) > eps
    out = []
    for bits in (hbits, vbits):
        v = 0
        for b in bits.ravel():
            v = (v << 1) | int(b)
        out.append(v)
    return out[0], out[1]


HASH_BITS = 512


def perceptual_hash(rgba) -> str:
    """A 512-bit difference hash of an RGBA image, as 128 hex digits.

    For R, G, B of the picture flattened on grey and for alpha: 64 horizontal
    and 64 vertical gradient-sign bits on a 9x8 / 8x9 area-resized copy (a
    gradient counts when it exceeds 2/255, so flat areas are stable). Resizing
    and re-encoding change few bits; other pictures differ in many.
    """
    f = np.asarray(rgba)
    f = f.astype(np.float32) / 255.0 if f.dtype == np.uint8 else f.astype(np.float32)
    if f.ndim != 3 or f.shape[-1] != 4:
        raise ValueError(f"expected an HxWx4 RGBA image, got shape {f.shape}")
    flat = flatten_on_grey(np.clip(f, 0.0, 1.0))
    value = 0
    for ch in (flat[..., 0], flat[..., 1], flat[..., 2], f[..., 3]):
        h, v = _dhash_bits(ch)
        value = (value << 128) | (h << 64) | v
    return f"{value:0{HASH_BITS // 4}x}"


def hash_distance(a: str, b: str) -> int:
    """Hamming distance of two hex hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def alpha_coverage(alpha: np.ndarray) -> float:
    """Mean alpha in [0, 1] (uint8 or float input)."""
    a = np.asarray(alpha)
    return float(a.mean() / 255.0) if a.dtype == np.uint8 else float(a.mean())


def choose_bucket(width: int, height: int, resolution: int, step: int = 64, max_aspect: float = 4.0, upscale: bool = False) -> tuple[int, int]:
    """The (w, h) bucket, multiples of `step`, for an image of width x height.

    resolution 0 keeps the size (rounded down to multiples of `step`).
    Otherwise the target area is resolution^2 (without `upscale`, at most the
    image's own area); among the buckets not larger than it, with aspect ratios
    up to max_aspect:1, the one with the least |log(aspect / image aspect)| +
    0.5 * log(target area / bucket area) wins (ties: the larger one).
    """
    if width < step or height < step:
        raise ValueError(f"image {width}x{height} is smaller than {step} px on a side")
    if resolution == 0:
        return (width // step * step, height // step * step)
    area = resolution * resolution if upscale else min(resolution * resolution, width * height)
    ar = width / height
    best = None
    max_side = max(step, int(math.sqrt(area * max_aspect)) // step * step)
    for bw in range(step, max_side + 1, step):
        for bh in range(step, (area // bw) // step * step + 1, step):
            r = bw / bh
            if max(r, 1.0 / r) > max_aspect + 1e-9:
                continue
            score = abs(math.log(r / ar)) + 0.5 * math.log(area / (bw * bh))
            key = (round(score, 12), -(bw * bh))
            if best is None or key < best[0]:
                best = (key, (bw, bh))
    return best[1] if best else (step, step)


def resize_rgba(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWx4 uint8 RGBA array (Lanczos on premultiplied colour: no halo from invisible pixels)."""
    from PIL import Image

    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    im = Image.fromarray(arr, "RGBA").convert("RGBa").resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGBA"))


def fit_to_bucket(arr: np.ndarray, bucket: tuple[int, int], fit: str = "crop") -> np.ndarray:
    """Resize + centre-crop ("crop": cover the bucket) or resize + transparent padding ("pad": fit inside)."""
    bw, bh = bucket
    h, w = arr.shape[:2]
    if fit == "crop":
        s = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
        r = resize_rgba(arr, (nw, nh))
        x0, y0 = (nw - bw) // 2, (nh - bh) // 2
        return np.ascontiguousarray(r[y0 : y0 + bh, x0 : x0 + bw])
    if fit == "pad":
        s = min(bw / w, bh / h)
        nw, nh = min(bw, max(1, round(w * s))), min(bh, max(1, round(h * s)))
        r = resize_rgba(arr, (nw, nh))
        out = np.zeros((bh, bw, 4), dtype=np.uint8)
        x0, y0 = (bw - nw) // 2, (bh - nh) // 2
        out[y0 : y0 + nh, x0 : x0 + nw] = r
        return out
    raise ValueError(f"fit must be crop or pad (got {fit})")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of `radius` px (Euclidean: offsets with dx^2 + dy^2 <= r^2)."""
    m = np.asarray(mask).astype(bool)
    r = int(radius)
    if r <= 0 or not m.any():
        return m.copy()
    h, w = m.shape
    runs: dict[int, np.ndarray] = {}

    def row_any(k: int) -> np.ndarray:  # out[y, x] = any(m[y, x-k .. x+k])
        if k not in runs:
            p = np.pad(m.astype(np.int32), ((0, 0), (k + 1, k)))
            cs = np.cumsum(p, axis=1)
            runs[k] = (cs[:, 2 * k + 1 :] - cs[:, : w]) > 0
        return runs[k]

    out = np.zeros_like(m)
    for dy in range(-r, r + 1):
        k = int(math.isqrt(r * r - dy * dy))
        rows = row_any(k)
        y0, y1 = max(0, -dy), min(h, h - dy)
        if y0 < y1:
            out[y0:y1] |= rows[y0 + dy : y1 + dy]
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a disk: pixels whose whole disk of `radius` px lies in the mask (outside the image counts as in)."""
    m = np.asarray(mask).astype(bool)
    return ~dilate(~m, radius)


def feather_inside(mask: np.ndarray, width: int) -> np.ndarray:
    """A float weight that is 0 outside `mask` and ramps up to 1 over `width` px inside it.

    w = mean over k = 0..width-1 of erode(mask, k): 1/width on the mask's border
    pixels, 1 from `width` px deep. width <= 1 gives the mask itself.
    """
    m = np.asarray(mask).astype(bool)
    if width <= 1:
        return m.astype(np.float32)
    acc = np.zeros(m.shape, np.float32)
    for k in range(width):
        acc += erode(m, k)
    return acc / np.float32(width)


def place_on_canvas(rgba: np.ndarray, size: Optional[tuple[int, int]] = None, step: int = 64) -> np.ndarray:
    """Centre an RGBA foreground on a transparent canvas.

    Without `size` the canvas is the image grown to the next multiples of
    `step`; with (W, H) the image is scaled down to fit (never up) first.
    """
    h, w = rgba.shape[:2]
    if size is None:
        cw, ch = -(-w // step) * step, -(-h // step) * step
    else:
        cw, ch = size
        s = min(1.0, cw / w, ch / h)
        if s < 1.0:
            rgba = resize_rgba(rgba, (max(1, round(w * s)), max(1, round(h * s))))
            h, w = rgba.shape[:2]
    out = np.zeros((ch, cw, 4), dtype=np.uint8)
    x0, y0 = (cw - w) // 2, (ch - h) // 2
    out[y0 : y0 + h, x0 : x0 + w] = rgba
    return out


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _json_hash(obj) -> str:
    return sha16(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8"))


# ---------------------------------------------------------------- finding inputs
