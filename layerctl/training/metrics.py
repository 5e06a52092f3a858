"""Quality numbers for a transparency VAE (the AlphaVAE protocol) — pure torch functions.

- alpha PSNR: predicted vs true alpha, per image, in dB (peak 1.0);
- RGB PSNR of composites: the predicted and the true RGBA composited "over"
  each of 9 solid backgrounds (black, grey, white, R, G, B, Y, C, M), per
  image and background; the summary averages the per-image values;
- identity error: how well the frozen VAE decoder still shows the picture when
  it decodes the transparent latent: the PSNR of its decode vs the
  premultiplied image (the picture on mid-grey), and the mean squared change
  the offset causes vs decoding the plain posterior mean (0 for a zero offset).

PSNR is capped at 100 dB (an exact match).
"""

from __future__ import annotations

import math
from typing import Optional

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}

PSNR_CAP = 100.0


def psnr_from_mse(mse):
    """10*log10(1/mse) for a tensor or float, capped at PSNR_CAP."""
    import torch

    if isinstance(mse, torch.Tensor):
        return (10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).clamp(max=PSNR_CAP)
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


def per_image_mse(a, b):
    """Mean squared error per image: [B,...] x [B,...] -> [B] (float32)."""
    d = (a.float() - b.float()) ** 2
    return d.flatten(1).mean(1)


def alpha_psnr(pred_alpha, true_alpha):
    """[B,1,H,W] (or [B,H,W]) alphas in [0,1] -> [B] PSNR in dB."""
    return psnr_from_mse(per_image_mse(pred_alpha.clamp(0, 1), true_alpha))


def composite(rgb, alpha, bg: tuple[float, float, float]):
    """Straight RGB [B,3,H,W] and alpha [B,1,H,W] over a solid colour -> [B,3,H,W]."""
    import torch

    c = torch.tensor(bg, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return rgb * alpha + c * (1.0 - alpha)


def composite_psnr(pred_rgb, pred_alpha, true_rgb, true_alpha, backgrounds: Optional[dict] = None) -> dict:
    """{background name: [B] PSNR} of the composites over each solid background."""
    bgs = BACKGROUNDS if backgrounds is None else backgrounds
    pr, pa = pred_rgb.float().clamp(0, 1), pred_alpha.float().clamp(0, 1)
    tr, ta = true_rgb.float(), true_alpha.float()
    return {name: psnr_from_mse(per_image_mse(composite(pr, pa, c), composite(tr, ta, c))) for name, c in bgs.items()}


def premultiplied_target(rgba):
    """The frozen VAE's input for an RGBA batch: (2c-1)*a in [-1,1] (the picture on mid-grey)."""
    return (rgba[:, :3] * 2.0 - 1.0) * rgba[:, 3:4]


def identity_psnr(decoded01, rgba):
    """PSNR of the frozen decode ([0,1]) vs the premultiplied picture mapped to [0,1]: [B]."""
    target01 = premultiplied_target(rgba.float()) / 2 + 0.5
    return psnr_from_mse(per_image_mse(decoded01.clamp(0, 1), target01))


def identity_delta(decoded01, decoded_plain01):
    """Mean squared change ([0,1] scale) the offset makes to the frozen decode: [B]."""
    return per_image_mse(decoded01, decoded_plain01)


class MetricSums:
    """Accumulates per-image metric values; summary() gives their means (and the image count)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict) -> None:
        """values: name -> [B] tensor (all the same B)."""
        n = None
        for k, v in values.items():
            v = v.detach().double().cpu()
            n = v.numel() if n is None else n
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
        self.count += n or 0

    def summary(self) -> dict:
        out = {k: (s / self.count if self.count else float("nan")) for k, s in self.sums.items()}
        out["images"] = self.count
        return out


def batch_metrics(pred_rgba, true_rgba, decoded01=None, decoded_plain01=None) -> dict:
    """All per-image metrics of one batch. pred/true: [B,4,H,W] straight [R,G,B,A] in [0,1].

    Returns name -> [B]: alpha_psnr, rgb_psnr (mean over the 9 backgrounds),
    rgb_psnr_<bg> per background, and when the frozen decodes are given
    identity_psnr and identity_delta.
    """
    import torch

    pr, pa = pred_rgba[:, :3], pred_rgba[:, 3:4]
    tr, ta = true_rgba[:, :3], true_rgba[:, 3:4]
    out = {"alpha_psnr": alpha_psnr(pa, ta)}
    per_bg = composite_psnr(pr, pa, tr, ta)
    out["rgb_psnr"] = torch.stack(list(per_bg.values()), 0).mean(0)
    for name, v in per_bg.items():
        out[f"rgb_psnr_{name}"] = v
    if decoded01 is not None:
        out["identity_psnr"] = identity_psnr(decoded01, true_rgba)
        if decoded_plain01 is not None:
            out["identity_delta"] = identity_delta(decoded01, decoded_plain01)
    return out
