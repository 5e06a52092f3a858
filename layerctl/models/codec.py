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


def offset(model, encoder, rgba01):
    """The offset encoder's output x 300 for straight RGBA [B,4,H,W] in [0,1] (the family's input order)."""
    if is_flux(model):
        from layerctl.models.flux_vae import encode_offset
    else:
        from layerctl.models.transparent_vae import encode_offset
    return encode_offset(encoder, rgba01)


def decoder_pixels(model, latent_raw):
    """The frozen VAE's decode of a VAE-space latent as the transparent decoder takes it:
    [0,1] clipped (SD1.5/SDXL) or not clipped (FLUX.1)."""
    return model.vae_decode(latent_raw, clip=False) if is_flux(model) else model.vae_decode(latent_raw)


def decode_raw(model, decoder, pixels, latent_raw, tta: bool = True, chunk: Optional[int] = None):
    """Straight RGBA [B,4,H,W] in [0,1], R,G,B,A order, from decoder_pixels() and the VAE-space latent."""
    if is_flux(model):
        from layerctl.models.flux_vae import decode_rgba
    else:
        from layerctl.models.transparent_vae import decode_rgba
    p = next(decoder.parameters())
    return decode_rgba(decoder, pixels.to(p.device, p.dtype), latent_raw.to(p.device, p.dtype), tta=tta, chunk=chunk).float()


def decode_scaled(model, decoder, latents_scaled, tta: bool = True, chunk: Optional[int] = None):
    """A latent in the denoiser's space -> straight RGBA [B,4,H,W] in [0,1], R,G,B,A order (float32)."""
    import torch

    with torch.no_grad():
        unscaled = latents_scaled.float() / model.latent_scale
        if is_flux(model):
            unscaled = unscaled + model.latent_shift
        return decode_raw(model, decoder, decoder_pixels(model, unscaled), unscaled, tta=tta, chunk=chunk)
