"""Shape and alpha measures for the toy world (bench/toy_quality.py, tests/test_toy.py).

A template-IoU classifier names the toy shape of an alpha map; the body alpha is the mean alpha
of the object without its anti-aliased rim. Pure numpy on [H,W] alpha arrays in [0,1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from layerctl.training.scenes import SHAPES, SceneObject, draw_scene_object

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
