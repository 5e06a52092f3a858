"""The transparent VAE of each model family behind one interface.

SD1.5/SDXL and FLUX.1 have the same two LayerDiffuse nets (the offset encoder E_a and the
transparent decoder D_a) with different conventions (docs/flux.md has the table): 4 vs 16
latent channels, alpha first vs last in the encoder's input, clipped vs unclipped decoder
pixels, [A,R,G,B] vs [R,G,B,A] out, latents scaled vs scaled *and shifted*. The pipelines and
the sampling loop call these functions and never ask which family they run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX.1"}


def is_flux(model_or_family) -> bool:
    family = model_or_family if isinstance(model_or_family, str) else getattr(model_or_family, "family", "")
    return family == "flux"


def load_net(path, part: str, family: str, device, dtype):
    """The transparent `part` ("encoder"/"decoder") for `family` from a file; a file of the other
    family (4 vs 16 latent channels) is a one-line error naming the tensor and both shapes."""
    from layerctl.models.flux_vae import load_transparent_net

    return load_transparent_net(Path(path), part, family, device=device, dtype=dtype)


def tiny_net(part: str, family: str):
    """The in-memory stand-in of a tiny test model's transparent net (seeded random weights)."""
    if is_flux(family):
        from layerctl.models.flux_vae import tiny_flux_decoder, tiny_flux_encoder

        return tiny_flux_decoder() if part == "decoder" else tiny_flux_encoder()
    from layerctl.models.weights import tiny_decoder, tiny_encoder

    return tiny_decoder() if part == "decoder" else tiny_encoder()


def encode_scaled(model, encoder, rgba01):
    """Straight RGBA [B,4,H,W] in [0,1] -> the transparent latent in the denoiser's space."""
    import torch

    rgba01 = rgba01.to(model.device, torch.float32)
    with torch.no_grad():
        if is_flux(model):
            from layerctl.models.flux_vae import encode_latent

            return encode_latent(encoder, rgba01, model.vae_encode, model.latent_scale, model.latent_shift).float()
        from layerctl.models.transparent_vae import transparent_latent

        return transparent_latent(encoder, rgba01, model.vae_encode).float() * model.latent_scale


def decode_scaled(model, decoder, latents_scaled, tta: bool = True, chunk: Optional[int] = None):
    """A latent in the denoiser's space -> straight RGBA [B,4,H,W] in [0,1], R,G,B,A order (float32)."""
    import torch

    p = next(decoder.parameters())
    with torch.no_grad():
        if is_flux(model):
            from layerctl.models.flux_vae import decode_rgba

            unscaled = latents_scaled.float() / model.latent_scale + model.latent_shift
            pixels = model.vae_decode(unscaled, clip=False)  # the FLUX decoder takes unclipped pixels
        else:
            from layerctl.models.transparent_vae import decode_rgba

            unscaled = latents_scaled.float() / model.latent_scale
            pixels = model.vae_decode(unscaled)
        out = decode_rgba(decoder, pixels.to(p.device, p.dtype), unscaled.to(p.device, p.dtype), tta=tta, chunk=chunk)
    return out.float()
