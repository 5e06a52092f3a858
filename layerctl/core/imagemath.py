"""Small pure functions for alpha, padding and compositing.

Arrays are float32 in [0, 1], HxWxC (numpy) unless a function says otherwise;
alpha is straight (not premultiplied). torch is imported inside the functions
that need it, so importing this module stays cheap.

`pad_rgb` reproduces the official LayerDiffuse colour padding (a premultiplied
pyramid, each level 1/1.2 of the previous, area-resized; filled from coarse to
fine). OpenCV is not a dependency: the two resizes it used (INTER_AREA for
shrinking, INTER_LINEAR for growing the fill) are re-derived here as 1-D
weighted sums applied along W and then H, evaluated in float32 in the same
order as OpenCV does, so the result matches the official fixtures to ~1e-7.
"""

from __future__ import annotations

import functools
import math

import numpy as np

PYRAMID_STEP = 1.2  # each pyramid level is int(size / 1.2) of the previous one


# ---------------------------------------------------------------- conversions


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0,1] (x / 255). Float input is returned as float32 unchanged."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.0)
    return img.astype(np.float32, copy=False)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """float in [0,1] -> uint8: scale by 255, round once (half to even), clip to [0,255]."""
    img = np.asarray(img, dtype=np.float64)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _split(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rgba = to_float(rgba)
    if rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"expected an HxWx4 RGBA array, got shape {rgba.shape}")
    return rgba[..., :3], rgba[..., 3:4]


# ---------------------------------------------------------------- compositing


def premultiply(rgba: np.ndarray) -> np.ndarray:
    """Straight RGBA -> premultiplied RGBA (rgb*a, a)."""
    rgb, a = _split(rgba)
    return np.concatenate([rgb * a, a], axis=-1)


def flatten_on_grey(rgba: np.ndarray, grey: float = 0.5) -> np.ndarray:
    """RGBA composited on a solid grey: grey + (rgb - grey) * a (HxWx3)."""
    rgb, a = _split(rgba)
    g = np.float32(grey)
    return g + (rgb - g) * a


def composite_over(fg_rgba: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Porter-Duff "over" with straight alpha, for colour and alpha.

    fg_rgba: HxWx4. bg: HxWx4, or HxWx3 (treated as opaque). Returns HxWx4
    straight RGBA: a = af + ab(1-af); rgb = (cf af + cb ab (1-af)) / a (0 where a = 0).
    """
    cf, af = _split(fg_rgba)
    bg = to_float(bg)
    if bg.ndim != 3 or bg.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 or HxWx4 background, got shape {bg.shape}")
    if bg.shape[:2] != cf.shape[:2]:
        raise ValueError(f"size mismatch: foreground {cf.shape[:2]}, background {bg.shape[:2]}")
    cb = bg[..., :3]
    ab = bg[..., 3:4] if bg.shape[-1] == 4 else np.ones_like(af)
    wb = ab * (1.0 - af)
    a = af + wb
    premult = cf * af + cb * wb
    with np.errstate(divide="ignore", invalid="ignore"):
        rgb = np.where(a > 0, premult / np.where(a > 0, a, 1), 0)
    return np.concatenate([rgb, a], axis=-1).astype(np.float32)


def checkerboard(rgba: np.ndarray, cell: int = 16, light: float = 0.55, dark: float = 0.45) -> np.ndarray:
    """Preview: the RGBA image over a grey checkerboard (top-left cell dark), HxWx3.

    Same tones as the official preview (0.45 / 0.55); the cell size is a parameter.
    """
    rgb, a = _split(rgba)
    if cell < 1:
        raise ValueError("cell must be >= 1")
    h, w = rgb.shape[:2]
    yy = (np.arange(h) // cell)[:, None]
    xx = (np.arange(w) // cell)[None, :]
    board = np.where((yy + xx) % 2 == 0, np.float32(dark), np.float32(light)).astype(np.float32)
    return rgb * a + board[..., None] * (1.0 - a)


# ---------------------------------------------------------------- OpenCV-exact resizes
#
# The official code used cv2.resize on float32 data. Measured against
# opencv-python-headless 5.0 (the version that made the fixtures):
# - INTER_AREA (shrinking): separable; along each axis out[d] = sum_k x[idx[d,k]] * w[d,k],
#   accumulated in float32 left to right, first along W then along H. A 2x2 -> 1x1
#   shrink takes the integer-scale path: (((x00 + x01) + x10) + x11) * 0.25.
# - INTER_LINEAR (growing the fill), source at least 2x2: separable lerp
#   a + (b - a) * t with a fused multiply-add, t = float32 of the fractional part of
#   the double-precision coordinate (d + 0.5) * scale - 0.5 (a t that rounds to 1.0
#   selects b); W first, then H. A source with a side of 1 takes OpenCV's generic
#   path: a*(1-t) + b*t with t from the float32 coordinate.


def _scale(src: int, dst: int) -> float:
    return 1.0 / (dst / src)  # OpenCV: scale = 1 / inv_scale, inv_scale = dst / src


@functools.lru_cache(maxsize=512)
def _area_table(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """INTER_AREA (shrinking) weights for one axis: (index, weight) lists, zero-padded."""
    scale = _scale(src, dst)
    rows = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1 = math.ceil(f1)
        s2 = min(math.floor(f2), src - 1)
        s1 = min(s1, s2)
        entries = []
        if s1 - f1 > 1e-3:
            entries.append((s1 - 1, np.float32((s1 - f1) / cell)))
        for s in range(s1, s2):
            entries.append((s, np.float32(1.0 / cell)))
        if f2 - s2 > 1e-3:
            entries.append((s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
        rows.append(entries)
    n = max(len(r) for r in rows)
    idx = np.zeros((dst, n), dtype=np.int64)
    wts = np.zeros((dst, n), dtype=np.float32)
    for d, entries in enumerate(rows):
        for k, (s, w) in enumerate(entries):
            idx[d, k] = s
            wts[d, k] = w
    return idx, wts


@functools.lru_cache(maxsize=512)
def _lerp_table(src: int, dst: int, generic: bool, vertical: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INTER_LINEAR along one axis: left index, right index, float32 t.

    OpenCV's generic path clamps t to 0 outside the source only horizontally; vertically
    it clamps the row indices and keeps t (border rows then mix a row with itself).
    """
    scale = _scale(src, dst)
    left = np.zeros(dst, dtype=np.int64)
    t = np.zeros(dst, dtype=np.float32)
    for d in range(dst):
        pos = (d + 0.5) * scale - 0.5
        if generic:
            fpos = np.float32(pos)
            s = int(math.floor(fpos))
            frac = np.float32(fpos - np.float32(s))
        else:
            s = int(math.floor(pos))
            frac = np.float32(pos - s)
            if frac == 1.0:
                s, frac = s + 1, np.float32(0.0)
        if generic and vertical:
            left[d], t[d] = s, frac
            continue
        if s < 0:
            s, frac = 0, np.float32(0.0)
        if s >= src - 1:
            s, frac = src - 1, np.float32(0.0)
        left[d], t[d] = s, frac
    return np.clip(left, 0, src - 1), np.clip(left + 1, 0, src - 1), t


def _fma_lerp_np(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """float32 fma(b - a, t, a), correctly rounded (float64 product is exact; ties fixed)."""
    d = (b - a).astype(np.float64)
    p = d * t.astype(np.float64)  # exact: 24-bit x 24-bit
    a64 = a.astype(np.float64)
    s = a64 + p
    bp = s - a64  # two-sum error term: s + e == a + p exactly
    e = (a64 - (s - bp)) + (p - bp)
    r = s.astype(np.float32)
    diff = s - r.astype(np.float64)
    toward = np.where(diff >= 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
    other = np.nextafter(r, toward)
    tie = (diff != 0) & (np.abs(diff) * 2 == np.abs(other.astype(np.float64) - r.astype(np.float64)))
    fix = tie & (e != 0) & (np.sign(e) == np.sign(diff))
    return np.where(fix, other, r)


class _Ops:
    """The few array operations the resizes need, for numpy or torch.

    `axis` is -1 (W) or -2 (H); per-position weights broadcast along that axis.
    """

    def __init__(self, torch_module=None, device=None):
        self.torch = torch_module
        self.device = device

    def const(self, arr, axis: int = -1):
        arr = np.asarray(arr)
        if arr.ndim == 1 and axis == -2:
            arr = arr[:, None]
        if self.torch is None:
            return arr
        return self.torch.as_tensor(arr, device=self.device)

    def take(self, x, idx, axis: int):
        if self.torch is None:
            return np.take(x, idx, axis=axis)
        i = self.torch.as_tensor(idx, device=self.device)
        return x[..., i] if axis == -1 else x[..., i, :]

    def fma_lerp(self, a, b, t, axis: int):
        if self.torch is None:
            return _fma_lerp_np(a, b, self.const(t, axis))
        torch = self.torch
        t = self.const(t, axis)
        if a.device.type == "mps":  # no float64 there: plain float32, within an ulp
            return a + (b - a) * t
        # the float64 product is exact, so this rounds like a fused multiply-add (ties aside)
        return (a.double() + (b - a).double() * t.double()).to(torch.float32)


def _area_axis(x, src: int, dst: int, axis: int, ops: _Ops):
    idx, wts = _area_table(src, dst)
    out = None
    for k in range(idx.shape[1]):
        term = ops.take(x, idx[:, k], axis) * ops.const(wts[:, k], axis)
        out = term if out is None else out + term
    return out


def _linear_axis(x, src: int, dst: int, generic: bool, axis: int, ops: _Ops):
    left, right, t = _lerp_table(src, dst, generic, axis == -2)
    a, b = ops.take(x, left, axis), ops.take(x, right, axis)
    if generic:
        return a * ops.const(np.float32(1.0) - t, axis) + b * ops.const(t, axis)
    return ops.fma_lerp(a, b, t, axis)


def _resize(x, src_hw, dst_hw, kind: str, ops: _Ops):
    """Resize x [..., H, W] like cv2.resize (INTER_AREA or INTER_LINEAR) on float32 data."""
    (sh, sw), (dh, dw) = src_hw, dst_hw
    if (sh, sw) == (dh, dw):
        return x
    if kind == "area":
        if (sh, sw) == (2, 2) and (dh, dw) == (1, 1):
            s = x[..., 0:1, 0:1] + x[..., 0:1, 1:2]
            s = s + x[..., 1:2, 0:1]
            s = s + x[..., 1:2, 1:2]
            return s * ops.const(np.float32(0.25))
        x = _area_axis(x, sw, dw, -1, ops)
        return _area_axis(x, sh, dh, -2, ops)
    generic = min(sh, sw) == 1
    x = _linear_axis(x, sw, dw, generic, -1, ops)
    return _linear_axis(x, sh, dh, generic, -2, ops)


def _pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Level sizes, finest first: int(size / 1.2) of the previous level until min(H, W) == 1."""
    sizes = [(h, w)]
    while min(h, w) > 1:
        h, w = int(h / PYRAMID_STEP), int(w / PYRAMID_STEP)
        sizes.append((h, w))
    return sizes


def _pad_core(color, alpha, ops: _Ops, total):
    """color [..., 3, H, W], alpha [..., 1, H, W] float32 -> padded colour [..., 3, H, W]."""
    h, w = color.shape[-2], color.shape[-1]
    sizes = _pyramid_sizes(h, w)
    levels = [(color * alpha, alpha)]
    for src, dst in zip(sizes[:-1], sizes[1:]):
        c, a = levels[-1]
        levels.append((_resize(c, src, dst, "area", ops), _resize(a, src, dst, "area", ops)))
    levels.reverse()
    sizes.reverse()
    top_c, top_a = levels[0]
    fill = total(top_c) / total(top_a).clip(1e-8, 1e32)  # shape [..., C, 1, 1]
    prev = (1, 1)
    for (c, a), size in zip(levels, sizes):
        if prev == (1, 1):
            fill = fill + (c * 0)  # broadcast a 1x1 fill to the level size (exact)
        else:
            fill = _resize(fill, prev, size, "linear", ops)
        fill = c + fill * (1.0 - a)
        prev = size
    return fill


def pad_rgb(rgba: np.ndarray) -> np.ndarray:
    """Colour padding of LayerDiffuse: HxWx4 RGBA (float in [0,1] or uint8) -> HxWx3 float32.

    Visible pixels keep c*a + fill*(1-a) (exactly c where a = 1); invisible ones get
    a smooth fill spreading the visible colours outward (alpha-weighted mean at the
    coarsest level). A fully transparent image gives zeros.
    """
    rgb, a = _split(rgba)
    color = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))  # 3xHxW
    alpha = np.ascontiguousarray(np.moveaxis(a, -1, 0))  # 1xHxW

    def total(x):  # alpha-weighted sums over the (tiny) top level, as numpy sums HxWxC
        hwc = np.ascontiguousarray(np.moveaxis(x, 0, -1))
        return np.moveaxis(np.sum(hwc, axis=(0, 1), keepdims=True), -1, 0)

    out = _pad_core(color, alpha, _Ops(), total)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1)).astype(np.float32, copy=False)


def pad_rgb_torch(rgba):
    """Batched `pad_rgb` in torch: [B,4,H,W] RGBA in [0,1] -> [B,3,H,W] (same device, float32)."""
    import torch

    if rgba.ndim != 4 or rgba.shape[1] != 4:
        raise ValueError(f"expected a [B,4,H,W] RGBA tensor, got shape {tuple(rgba.shape)}")
    x = rgba.to(torch.float32)
    color, alpha = x[:, :3], x[:, 3:4]

    def total(t):
        return t.sum(dim=(-2, -1), keepdim=True)

    return _pad_core(color.contiguous(), alpha.contiguous(), _Ops(torch, x.device), total)


def flatten_grey(rgba: np.ndarray) -> np.ndarray:
    """Straight RGBA -> RGB on grey 0.5: 0.5 + (rgb - 0.5) * a (how the official code feeds images)."""
    return flatten_on_grey(np.asarray(rgba, np.float32), 0.5)


def rgba_to_uint8(t) -> np.ndarray:
    """[C,H,W] float tensor in [0,1] -> HxWxC uint8 array (rounded once)."""
    arr = t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return np.round(arr * 255.0).astype(np.uint8)
