"""Losses of the transparency VAE: identity, reconstruction, and a PatchGAN discriminator.

    identity  = mean((frozen_decode(mean + std * offset) - target)^2)      in [-1,1] pixels
    recon     = mean(w_c * |D_a(...) - [alpha, padded RGB]|^p)             p = 2 (l2) or 1 (l1)
    adv (G)   = -mean(D(fake))               (hinge)   or  softplus(-D(fake))   (bce)
    disc (D)  = mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))   or the BCE pair

The discriminator sees 4-channel [alpha, R, G, B] maps scaled to [-1,1]: the
true [alpha, padded RGB] as real, the transparent decoder's output as fake.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix's NLayerDiscriminator), GroupNorm instead of BatchNorm.

    Output: one logit per ~70x70 patch (n_layers=3). GroupNorm keeps it
    independent of the batch size and of how a batch is split across processes.
    """

    def __init__(self, in_channels: int = 4, channels: int = 64, n_layers: int = 3, groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = channels
        for i in range(1, n_layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(ch, nxt, 4, stride, 1, bias=False),
                nn.GroupNorm(min(groups, nxt), nxt),
                nn.LeakyReLU(0.2, True),
            ]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def to_disc_input(argb01: torch.Tensor) -> torch.Tensor:
    """[B,4,H,W] [alpha, R, G, B] in [0,1] -> [-1,1]."""
    return argb01 * 2.0 - 1.0


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
    if kind == "bce":
        return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r} (hinge or bce)")


def g_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "bce":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r} (hinge or bce)")


def edge_band(alpha01: torch.Tensor, width: int) -> torch.Tensor:
    """[B,1,H,W] 0/1 map of the pixels within `width` px of the object's outline (alpha 0.5), on
    both sides: the anti-aliased rim and the ring just outside it, where a decoder that is not sure
    where the edge lies draws a faint halo."""
    if width <= 0:
        return torch.zeros_like(alpha01)
    solid = (alpha01 > 0.5).float()
    k = 2 * width + 1
    grown = F.max_pool2d(solid, k, stride=1, padding=width)
    shrunk = -F.max_pool2d(-solid, k, stride=1, padding=width)
    return grown - shrunk


def recon_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", alpha_weight: float = 1.0,
    edge_weight: float = 0.0, edge_width: int = 2,
) -> torch.Tensor:
    """[B,4,H,W] [alpha, R, G, B] prediction vs target; channel 0 (alpha) weighted by alpha_weight.

    Normalised by the channel weights, so alpha_weight = 1 is the plain mean. With edge_weight > 0
    the alpha error of the pixels in edge_band(target alpha, edge_width) counts 1 + edge_weight
    times (a weighted mean, so the alpha term keeps its scale).
    """
    d = (pred.float() - target.float()).abs()
    if kind == "l2":
        d = d * d
    elif kind != "l1":
        raise ValueError(f"unknown reconstruction loss {kind!r} (l2 or l1)")
    per_c = d.mean(dim=(0, 2, 3))  # [4]
    if edge_weight > 0:
        w_px = 1.0 + edge_weight * edge_band(target[:, :1].float(), edge_width)
        per_c = torch.cat([((d[:, :1] * w_px).sum() / w_px.sum()).reshape(1), per_c[1:]])
    w = torch.ones_like(per_c)
    w[0] = alpha_weight
    return (per_c * w).sum() / w.sum()


def identity_loss(decoded_m11: torch.Tensor, target_m11: torch.Tensor) -> torch.Tensor:
    """MSE between the frozen decode of the transparent latent and its target, both in [-1,1]."""
    return F.mse_loss(decoded_m11.float(), target_m11.float())
