"""The denoising loop and the transparent decode, shared by every mode and backend.

One loop serves text→RGBA, the multi-frame layer modes (frame-fastest
batches, pinned frames), the concat-conditioned SDXL modes, img2img and
masked inpainting. Latents inside the loop are *scaled* (times the model's
latent scale), as diffusers UNets expect.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from layerctl.backends.base import LoadedModel, PromptEmbeds
from layerctl.core.samplers import Sampling, resolve


@dataclass
class DenoiseSpec:
    embeds: PromptEmbeds  # batch [negatives..., positives...] when cfg > 1
    noise: torch.Tensor  # [B, 4, h, w] standard normal, B = images * frames, frame-fastest
    steps: int
    cfg: float
    frames: int = 1
    concat: Optional[torch.Tensor] = None  # clean condition latents [B, C, h, w] (scaled), both CFG halves
    concat_until: float = 1.0  # fraction of the sampler's steps after which `handover` is called and concat dropped
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
    sampling: Optional[Sampling] = None  # sampler, schedule, prediction type, CFG rescale (None: the defaults)
    seeds: Optional[list] = None  # one per image: seeds the per-step noise of SDE/ancestral samplers
    stream: int = 0  # tells apart the step noise of several sampling runs of one image (SDXL layer stages)


def fresh_scheduler(model: LoadedModel, sampling: Optional[Sampling] = None):
    """A scheduler for `sampling` (default: DPM++ 2M Karras) built from the model's scheduler config,
    with its own state (the model's one stays untouched). FLUX.1 keeps its flow-matching Euler."""
    return model.sampler_scheduler(sampling or default_sampling(model))


def default_sampling(model: LoadedModel) -> Sampling:
    """The defaults for this model (DPM++ 2M Karras; v-prediction when its scheduler config says so)."""
    return resolve(model.scheduler.config)


def step_generators(seeds, frames: int, rows: int, stream: int = 0) -> list:
    """One CPU generator per latent row (image i, frame f at row i*frames+f), seeded from the image's
    seed and the frame, so image i of a batch draws the same step noise as a single run with its seed."""
    import numpy as np

    seeds = list(seeds) if seeds else list(range(max(rows // max(frames, 1), 1)))
    out = []
    for r in range(rows):
        seed, frame = int(seeds[r // frames]), r % frames
        state = np.random.SeedSequence([seed, frame, stream, 0x5A4D]).generate_state(1, np.uint64)[0]
        out.append(torch.Generator("cpu").manual_seed(int(state) & (2**63 - 1)))
    return out


def row_seeds(generators) -> list[int]:
    """Integer seeds (one per row) for the Brownian-tree noise of DPM++ SDE, from the row generators."""
    return [int(torch.randint(0, 2**62, (1,), generator=g).item()) for g in generators]


def _noised(sched, x: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """x noised to the level the sampler's input has before timestep `index` of its full schedule
    (past the last one: x itself). Four kinds of scheduler:

    - no sigmas (DDIM, LCM): sqrt(abar_t) x + sqrt(1 - abar_t) eps at t = timesteps[index];
    - DPM-Solver multistep / UniPC (_sigma_to_alpha_sigma_t): alpha_t x + sigma_t eps;
    - k-diffusion style (Euler, Euler a, Heun, DPM++ SDE): x + sigma eps, where DPM++ SDE's second
      evaluation of a step sits at its midpoint sigma, not at the next grid sigma;
    - flow matching (FLUX.1: scale_noise): a straight line, sigma eps + (1 - sigma) x.
    """
    if not hasattr(sched, "sigmas"):
        if index >= len(sched.timesteps):
            return x
        abar = sched.alphas_cumprod[int(sched.timesteps[index])].to(x.device, torch.float32)
        return abar.sqrt() * x + (1 - abar).sqrt() * noise
    sigma = sched.sigmas[index]
    if getattr(sched, "mid_point_sigma", None) is not None and not sched.state_in_first_order:
        sigma = sched.mid_point_sigma
    sigma = torch.as_tensor(sigma).to(x.device, torch.float32)
    if hasattr(sched, "scale_noise"):
        return sigma * noise + (1.0 - sigma) * x
    if hasattr(sched, "_sigma_to_alpha_sigma_t"):
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * x + sigma_t * noise
    return x + sigma * noise


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
    sampling = spec.sampling or default_sampling(model)
    sched = fresh_scheduler(model, sampling)
    use_cfg = model.uses_cfg(spec.cfg)  # FLUX.1: never (spec.cfg is its distilled guidance)
    strength = spec.strength if spec.init is not None else 1.0
    timesteps, start = plan_timesteps(sched, spec.steps, strength, device, model, tuple(spec.noise.shape[-2:]))
    noise = spec.noise.to(device, torch.float32)
    F = spec.frames
    step_kw = _step_noise(sched, sampling, step_generators(spec.seeds, F, noise.shape[0], spec.stream))

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
    handing_over = concat is not None or spec.handover is not None
    stop_step = int(round(total * spec.concat_until)) if handing_over else total  # total: UNet evaluations
    hidden = spec.embeds.hidden
    extra = spec.embeds.extra
    for i, t in enumerate(timesteps):
        if spec.pinned:
            latents = pin(latents, start + i)
        if handing_over and i == stop_step:
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
            eps = guide(eps, spec.cfg, sampling.cfg_rescale)
        with warnings.catch_warnings():  # torchsde (DPM++ SDE) warns about float32 rounding of its interval ends
            warnings.filterwarnings("ignore", message="Should have t[ab]>=t0", category=UserWarning)
            latents = sched.step(eps, t, latents, **step_kw).prev_sample
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


def guide(pred: torch.Tensor, cfg: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] batch, then CFG rescale (phi) as in "Common Diffusion
    Noise Schedules and Sample Steps are Flawed" (diffusers' rescale_noise_cfg)."""
    uncond, cond = pred.chunk(2)
    out = uncond + cfg * (cond - uncond)
    if rescale > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        out = rescale_noise_cfg(out, cond, guidance_rescale=rescale)
    return out


def _step_noise(sched, sampling: Sampling, gens: list) -> dict:
    """Keyword arguments of sched.step that make its fresh noise come from the per-row generators."""
    if sampling.info.noise == "none":
        return {}
    if sampling.info.noise == "brownian":  # DPM++ SDE: one Brownian tree per row, seeded
        sched.noise_sampler_seed = row_seeds(gens)
        return {}
    return {"generator": gens}


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


def job_sampling(req, model: LoadedModel, quiet: bool = False) -> Sampling:
    """The sampling settings of a request (its sampler/schedule/prediction_type/zero_snr/cfg_rescale
    fields) for this model; says once per model when it detected v-prediction, and when `lcm` runs on
    a model that does not look like an LCM one (a notice, not a refusal: an LCM LoRA may be given in a
    way layerctl cannot recognise)."""
    from layerctl.errors import LayerctlError
    from layerctl.progress import log

    g = lambda k: getattr(req, k, None)  # noqa: E731
    config = dict(model.scheduler.config)
    hint = getattr(model, "prediction_type", None)  # what a single file says of itself (a `v_pred` key)
    if hint:
        config["prediction_type"] = hint
    zero_snr = g("zero_snr")
    if zero_snr is None and getattr(model, "zero_terminal_snr", None) is not None:
        zero_snr = model.zero_terminal_snr  # a `ztsnr` key
    try:
        s = resolve(config, g("sampler"), g("schedule"), g("prediction_type"), zero_snr, g("cfg_rescale"))
    except ValueError as exc:
        raise LayerctlError(str(exc)) from None
    told = model.__dict__.setdefault("_told_sampling", set())
    if s.prediction == "v_prediction" and g("prediction_type") in (None, "auto") and "v" not in told:
        told.add("v")
        where = "checkpoint" if hint else "model's scheduler config"
        log(f"layerctl: the {where} says v-prediction: sampling with v-prediction, zero terminal "
            f"SNR {'on' if s.zero_snr else 'off'}, CFG rescale {s.cfg_rescale:g} (--prediction-type epsilon to "
            f"override)", quiet)
    names = " ".join([str(model.ref)] + [str(x) for x in (g("lora") or [])]).lower()
    if s.sampler == "lcm" and "lcm" not in names and "lcm" not in told:
        told.add("lcm")
        log("layerctl: --sampler lcm expects an LCM model or LCM LoRA (--lora ...lcm...); with a plain model the "
            "pictures come out soft and blurred", quiet)
    return s
