"""The denoising loop and the transparent decode, shared by every mode and backend.

One loop serves text→RGBA, the multi-frame layer modes (frame-fastest
batches, pinned frames), the concat-conditioned SDXL modes, img2img and
masked inpainting. Latents inside the loop are *scaled* (times the model's
latent scale), as diffusers UNets expect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from layerctl.backends.base import LoadedModel, PromptEmbeds


@dataclass
class DenoiseSpec:
    embeds: PromptEmbeds  # batch [negatives..., positives...] when cfg > 1
    noise: torch.Tensor  # [B, 4, h, w] standard normal, B = images * frames, frame-fastest
    steps: int
    cfg: float
    frames: int = 1
    concat: Optional[torch.Tensor] = None  # clean condition latents [B, C, h, w] (scaled), both CFG halves
    concat_until: float = 1.0  # fraction of steps after which `handover` is called and concat is dropped
    handover: Optional[Callable[[], None]] = None
    pinned: dict = field(default_factory=dict)  # frame index -> known scaled latent [images, 4, h, w]
    init: Optional[torch.Tensor] = None  # img2img: known scaled latent [B, 4, h, w]
    strength: float = 1.0
    mask: Optional[torch.Tensor] = None  # [B, 1, h, w], 1 = repaint, 0 = keep init
    before_unet: Optional[Callable[[int, torch.Tensor], None]] = None  # (step, unet batch) hook
    # (unet input, t, hidden, extra) -> more UNet kwargs, e.g. ControlNet's
    # down_block_additional_residuals / mid_block_additional_residual (layerctl.pipelines.controlnet)
    unet_extra: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], dict]] = None
    progress: Optional[Callable[[int, int], None]] = None  # (done, total)


def fresh_scheduler(model: LoadedModel):
    """A scheduler of the model's kind with its own state (the model's one stays untouched)."""
    sched = model.scheduler
    return type(sched).from_config(sched.config)


def _noised(sched, x: torch.Tensor, noise: torch.Tensor, sigma_index: int) -> torch.Tensor:
    """x noised to the level of sched.sigmas[sigma_index] (0 at the end: x itself)."""
    sigma = sched.sigmas[sigma_index].to(x.device, torch.float32)
    if hasattr(sched, "scale_noise"):  # flow matching (FLUX.1): a straight line from x to the noise
        return sigma * noise + (1.0 - sigma) * x
    if hasattr(sched, "_sigma_to_alpha_sigma_t"):
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * x + sigma_t * noise
    return x + sigma * noise  # k-diffusion style (Euler, ...): x + sigma * eps


def plan_timesteps(sched, steps: int, strength: float, device, model=None, latent_hw=None) -> tuple[torch.Tensor, int]:
    """Timesteps to run and the sigma index they start at (img2img skips the first part).
    With `model`, the model sets the schedule (FLUX.1: shifted by the latent size)."""
    if model is not None:
        model.set_schedule(sched, steps, latent_hw)
    else:
        sched.set_timesteps(steps, device=device)
    timesteps = sched.timesteps
    if strength >= 1.0:
        return timesteps, 0
    run = min(max(int(round(steps * strength)), 1), steps)
    start = (steps - run) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return timesteps[start:], start


@torch.no_grad()
def denoise(model: LoadedModel, spec: DenoiseSpec) -> torch.Tensor:
    """Run the sampler; returns scaled latents [B, 4, h, w] (float32)."""
    device = model.device
    sched = fresh_scheduler(model)
    use_cfg = model.uses_cfg(spec.cfg)  # FLUX.1: never (spec.cfg is its distilled guidance)
    strength = spec.strength if spec.init is not None else 1.0
    timesteps, start = plan_timesteps(sched, spec.steps, strength, device, model, tuple(spec.noise.shape[-2:]))
    noise = spec.noise.to(device, torch.float32)
    F = spec.frames

    if spec.init is not None and strength < 1.0:
        latents = _noised(sched, spec.init.to(device, torch.float32), noise, start)
    else:
        latents = noise * getattr(sched, "init_noise_sigma", 1.0)
        if spec.init is not None and spec.mask is not None:  # inpainting from scratch: keep what is known
            m = spec.mask.to(device, torch.float32)
            latents = m * latents + (1 - m) * _noised(sched, spec.init.to(device, torch.float32), noise, start)

    def pin(lat: torch.Tensor, sigma_index: int) -> torch.Tensor:
        for f, known in spec.pinned.items():
            known = known.to(device, torch.float32)
            lat[f::F] = _noised(sched, known, noise[f::F], sigma_index)
        return lat

    concat = spec.concat.to(device, model.dtype) if spec.concat is not None else None
    if concat is not None and use_cfg:
        concat = torch.cat([concat, concat])
    total = len(timesteps)
    stop_step = int(round(total * spec.concat_until)) if concat is not None else total
    hidden = spec.embeds.hidden
    extra = spec.embeds.extra
    for i, t in enumerate(timesteps):
        if spec.pinned:
            latents = pin(latents, start + i)
        if concat is not None and i == stop_step:
            concat = None
            if spec.handover is not None:
                spec.handover()
        x = torch.cat([latents, latents]) if use_cfg else latents
        if hasattr(sched, "scale_model_input"):  # flow matching has no input scaling
            x = sched.scale_model_input(x, t)
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if spec.before_unet is not None:
            spec.before_unet(i, x)
        x = x.to(model.dtype)
        more = spec.unet_extra(x, t, hidden, extra) if spec.unet_extra is not None else {}
        eps = model.predict(x, t, spec.embeds, spec.cfg, more).float()
        if use_cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + spec.cfg * (cond - uncond)
        latents = sched.step(eps, t, latents).prev_sample
        if spec.mask is not None and spec.init is not None:
            keep = _noised(sched, spec.init.to(device, torch.float32), noise, start + i + 1)
            m = spec.mask.to(device, torch.float32)
            latents = m * latents + (1 - m) * keep
        if spec.progress is not None:
            spec.progress(i + 1, total)
    if spec.pinned:
        for f, known in spec.pinned.items():
            latents[f::F] = known.to(device, torch.float32)
    return latents


def make_noise(seeds: list[int], frames: int, height: int, width: int, channels: int = 4) -> torch.Tensor:
    """Noise for images with these seeds, frame-fastest: image i frame f at row i*frames+f.

    Each image's noise comes from its own CPU generator, so image i of a batch
    equals a single run with seed seeds[i] (and pixels do not depend on the device).
    """
    rows = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        rows.append(torch.randn((frames, channels, height // 8, width // 8), generator=g, dtype=torch.float32))
    return torch.cat(rows)


@torch.no_grad()
def encode_rgb(model: LoadedModel, rgb01: torch.Tensor, generator_seed: Optional[int] = None) -> torch.Tensor:
    """RGB pixels [B,3,H,W] in [0,1] -> scaled latent (posterior mean, deterministic)."""
    mean, _std = model.vae_encode(rgb01 * 2 - 1)
    return model.scale_latents(mean)


@torch.no_grad()
def decode_rgb(model: LoadedModel, latents_scaled: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> RGB pixels [B,3,H,W] in [0,1]."""
    return model.vae_decode(model.unscale_latents(latents_scaled))


@torch.no_grad()
def decode_transparent(model: LoadedModel, decoder, latents_scaled: torch.Tensor, tta: bool = True, chunk=None):
    """Scaled latent -> RGBA [B,4,H,W] in [0,1] (straight alpha, R,G,B,A order): the frozen VAE, then
    the transparent decoder, with the model family's conventions (layerctl.models.codec)."""
    from layerctl.models.codec import decode_scaled

    return decode_scaled(model, decoder, latents_scaled, tta=tta, chunk=chunk)
