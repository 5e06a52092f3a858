"""Shape and alpha measures for the toy world (bench/toy_quality.py, tests/test_toy.py).

A template-IoU classifier names the toy shape of an alpha map; the body alpha is the mean alpha
of the object without its anti-aliased rim. Pure numpy on [H,W] alpha arrays in [0,1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from layerctl.training.scenes import SHAPES, SceneObject, draw_scene_object
from layerctl.training.synthetic import COLOURS

CLASSIFY_SHAPES = [s for s in SHAPES if s not in ("puff", "tuft")]  # puff/tuft have no crisp outline


@lru_cache(maxsize=4)
def templates(size: int = 64) -> dict[str, list[np.ndarray]]:
    """shape -> binary masks at several radii and offsets (solid material)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out: dict[str, list[np.ndarray]] = {}
    for shape in CLASSIFY_SHAPES:
        masks = []
        for r in (0.26, 0.31, 0.36):
            for dx in (-0.08, 0.0, 0.08):
                for dy in (-0.08, 0.0, 0.08):
                    for k in range(2 if shape == "leaf" else 1):
                        rng = np.random.default_rng(k)
                        obj = SceneObject(shape, "solid", "red", size / 2 + dx * size, size / 2 + dy * size, r * size)
                        _, a = draw_scene_object(x, y, obj, rng)
                        masks.append(a > 0.5)
                        if shape in ("cup", "leaf"):
                            masks.append((a > 0.5)[:, ::-1])
        out[shape] = masks
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def object_mask(alpha: np.ndarray) -> np.ndarray:
    """The object: alpha above a quarter of its 95th percentile (and above 0.05)."""
    hi = float(np.percentile(alpha, 95))
    return alpha > max(0.05, 0.25 * hi)


def classify(alpha: np.ndarray, temps=None) -> tuple[str, float]:
    """Best-IoU toy shape of an alpha map and its IoU."""
    temps = temps if temps is not None else templates(alpha.shape[0])
    mask = object_mask(alpha)
    best, score = "none", 0.0
    for shape, masks in temps.items():
        s = max(iou(mask, m) for m in masks)
        if s > score:
            best, score = shape, s
    return best, score


def object_alpha_mean(alpha: np.ndarray) -> float:
    """Mean alpha over every pixel with alpha > 0.05 (rim included)."""
    m = alpha > 0.05
    return float(alpha[m].mean()) if m.any() else 0.0


def colour_error(rgba: np.ndarray, colour: str) -> float | None:
    """Mean |RGB - the colour's value| over the object's opaque pixels (alpha > 0.5), channels
    averaged: how far a "red ball" is from the toy world's red. None without an opaque pixel.
    The scenes' own objects score about 0.04 (their shading and a small colour jitter)."""
    m = rgba[..., 3] > 0.5
    if not m.any():
        return None
    return float(np.abs(rgba[..., :3][m] - np.asarray(COLOURS[colour], np.float32)).mean())


def nearest_colour(rgba: np.ndarray) -> str | None:
    """The toy world's colour name closest to the object's opaque pixels (by colour_error)."""
    errs = {name: colour_error(rgba, name) for name in COLOURS}
    return None if None in errs.values() else min(errs, key=errs.get)


def erode(mask: np.ndarray, r: int = 2) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        p = np.pad(out, 1, constant_values=False)
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def body_alpha_mean(alpha: np.ndarray) -> float:
    """Mean alpha of the object's body: its mask eroded by 2 px (the mask itself when that is empty)."""
    m = object_mask(alpha)
    body = erode(m)
    body = body if body.any() else m
    return float(alpha[body].mean()) if body.any() else 0.0


# ---------------------------------------------------------------- issue 14: what a person sees
# (rim included, holes, specks, glass rim vs body, layer agreement)

HOLED_SHAPES = ("ring", "cup")  # shapes whose outline encloses background by design (ring hole, cup handle)
THIN_SHAPES = ("cup", "ring", "star")  # handles, rings, star points: at the limit of an 8x8 latent


def _neighbours4(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, constant_values=False)
    return p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not touch the border filled in (4-connected)."""
    free = ~mask
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = (outside | _neighbours4(outside)) & free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def hole_pixels(alpha: np.ndarray, thr: float = 0.5) -> int:
    """Pixels enclosed by the object (alpha > thr) whose alpha is at or below thr."""
    m = alpha > thr
    return int((fill_holes(m) & ~m).sum())


def has_hole(alpha: np.ndarray, thr: float = 0.5, min_pixels: int = 2) -> bool:
    return hole_pixels(alpha, thr) >= min_pixels


def components(mask: np.ndarray) -> list[int]:
    """Sizes of the 8-connected components of a binary mask, largest first."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    sizes = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, n = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        sizes.append(n)
    return sorted(sizes, reverse=True)


def has_speck(alpha: np.ndarray, thr: float = 0.25, min_pixels: int = 2) -> bool:
    """A second blob apart from the object (alpha > thr, at least min_pixels 8-connected)."""
    sizes = components(alpha > thr)
    return len(sizes) > 1 and sizes[1] >= min_pixels


def rim_and_body(alpha: np.ndarray, r: int = 2) -> tuple[float, float]:
    """(mean alpha of the object's outer r-pixel band, mean alpha of the rest of the object)."""
    m = object_mask(alpha)
    body = erode(m, r)
    rim = m & ~body
    mean = lambda sel: float(alpha[sel].mean()) if sel.any() else 0.0  # noqa: E731
    return mean(rim), mean(body)


def over(fg_rgba: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """Straight-alpha fg over an RGB bg, [H,W,3] in [0,1]."""
    a = fg_rgba[..., 3:4]
    return fg_rgba[..., :3] * a + bg_rgb * (1 - a)


def layer_agreement(fg_rgba: np.ndarray, bg_rgb: np.ndarray, blended_rgb: np.ndarray, diff_thr: float = 0.08) -> dict:
    """Do three layers tell one story? All arrays float in [0,1].

    - `mae`: mean |blended - fg over bg| (RGB) over the object, the union of the foreground's
      object mask and the region where the blended picture differs from the background;
    - `iou`: the foreground's object mask vs that region of the blended picture
      (max over channels of |blended - bg| > diff_thr) — where the object is drawn in the picture.
    """
    fmask = object_mask(fg_rgba[..., 3])
    dmask = np.abs(blended_rgb - bg_rgb).max(axis=-1) > diff_thr
    region = fmask | dmask
    err = np.abs(blended_rgb - over(fg_rgba, bg_rgb)).mean(axis=-1)
    return {"mae": float(err[region].mean()) if region.any() else 0.0, "iou": iou(fmask, dmask),
            "mae_all": float(err.mean())}
