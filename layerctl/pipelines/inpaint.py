"""Masked inpainting of a plain RGB picture with a LoadedModel.

    from layerctl.backends.registry import load_model
    from layerctl.pipelines.inpaint import inpaint
    m = load_model("tiny", device="cpu")
    res = inpaint(m, image, mask, "a beach at noon", seed=1)   # res.image: HxWx3 float32 in [0,1]

`image` is HxWx3 (uint8, or float in [0,1]); `mask` is HxW in [0,1] (or bool),
**1 = repaint, 0 = keep**. Two methods, chosen from the model's UNet:

- ``latent-blend`` (any base model, UNet with 4 input channels): the picture is
  encoded with the frozen VAE (posterior mean); denoising starts from noise and
  after every scheduler step the known latents, re-noised to the *next*
  timestep with the same noise, replace the latent outside the (latent) mask.
  At the end the known region holds the clean known latents.
- ``pipeline`` (an inpainting checkpoint, UNet with 9 input channels): the
  diffusers inpainting pipeline of the model's family
  (``AutoPipelineForInpainting.from_pipe``) on the same components.

The latent mask is the pixel mask max-pooled over each 8x8 cell: a latent cell
is repainted when any of its pixels is. With ``paste_back`` (default) the known
pixels are put back exactly afterwards (``out = decoded*mask + image*(1-mask)``),
so outside the mask the result equals the input; without it, outside the mask
it differs from the input by the VAE round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from layerctl.core.geometry import latent_mask
from layerctl.errors import LayerctlError


@dataclass
class InpaintResult:
    image: np.ndarray  # HxWx3 float32 in [0,1]
    method: str  # "latent-blend" or "pipeline"
    seed: int
    steps: int
    cfg: float


def _as_float_rgb(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _as_float_mask(mask, shape) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match the image {tuple(shape)}")
    if m.dtype == np.bool_:
        return m.astype(np.float32)
    if m.dtype == np.uint8:
        return m.astype(np.float32) / np.float32(255.0)
    return np.clip(m.astype(np.float32), 0.0, 1.0)


def vae_factor(model) -> int:
    cfg = getattr(model.vae, "config", None)
    blocks = getattr(cfg, "block_out_channels", None) if cfg is not None else None
    return 2 ** (len(blocks) - 1) if blocks else 8


def unet_in_channels(model) -> int:
    return int(getattr(model.unet.config, "in_channels", 4))


def inpaint(
    model,
    image,
    mask,
    prompt: str,
    negative: str = "bad, ugly",
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    seed: int = 0,
    paste_back: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
    clip_skip: int = 1,
) -> InpaintResult:
    """Repaint the masked part of `image` (see the module doc). Deterministic for a seed on one device."""
    img = _as_float_rgb(image)
    m = _as_float_mask(mask, img.shape[:2])
    h, w = img.shape[:2]
    f = vae_factor(model)
    if h % f or w % f:
        raise LayerctlError(f"inpainting needs a size that is a multiple of {f} (got {w}x{h})")
    steps = int(steps or model.default_steps)
    cfg = float(model.default_cfg if cfg is None else cfg)
    if steps <= 0:
        raise LayerctlError(f"steps must be > 0 (got {steps})")
    n_in = unet_in_channels(model)
    # long prompts (chunks, BREAK) and clip skip: the backend's own encoding, for both methods
    embeds = model.encode_prompt([prompt], [negative], cfg > 1.0, w, h, clip_skip=clip_skip)
    if n_in == 9:
        out = _inpaint_pipeline(model, img, m, embeds, steps, cfg, seed, progress)
        method = "pipeline"
    elif n_in == 4:
        out = _inpaint_latent_blend(model, img, m, embeds, steps, cfg, seed, f, progress)
        method = "latent-blend"
    else:
        raise LayerctlError(
            f"cannot inpaint with a UNet of {n_in} input channels (a base model has 4, an inpainting model 9)"
        )
    if paste_back:
        out = out * m[..., None] + img * (1.0 - m[..., None])
    return InpaintResult(image=out.astype(np.float32), method=method, seed=int(seed), steps=steps, cfg=cfg)


def _inpaint_latent_blend(model, img, m, embeds, steps, cfg, seed, factor, progress):
    """A base (4-channel) UNet: the shared sampling loop with the known latents blended back
    outside the mask after every step (and at the start)."""
    import torch

    from layerctl.pipelines.sampling import DenoiseSpec, denoise

    h, w = img.shape[:2]
    pixels = torch.from_numpy(img).permute(2, 0, 1)[None] * 2.0 - 1.0
    mean, _std = model.vae_encode(pixels)
    known = mean.float().cpu() * model.latent_scale
    lm = torch.from_numpy(latent_mask(m, factor))[None, None]
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(known.shape, generator=gen, dtype=torch.float32)
    spec = DenoiseSpec(embeds=embeds, noise=noise, steps=steps, cfg=cfg, init=known, mask=lm, progress=progress)
    x = denoise(model, spec)
    out = model.vae_decode(x / model.latent_scale)
    return out[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)


def _embeds_kwargs(embeds, cfg: float) -> dict:
    """PromptEmbeds ([negative, positive] rows when cfg > 1) as a diffusers pipeline's embeds keywords."""
    hidden = embeds.hidden
    pooled = embeds.extra.get("added_cond_kwargs", {}).get("text_embeds")
    use_cfg = cfg > 1.0
    kw = {"prompt_embeds": hidden[1:] if use_cfg else hidden}
    if use_cfg:
        kw["negative_prompt_embeds"] = hidden[:1]
    if pooled is not None:
        kw["pooled_prompt_embeds"] = pooled[1:] if use_cfg else pooled
        if use_cfg:
            kw["negative_pooled_prompt_embeds"] = pooled[:1]
    return kw


def _inpaint_pipeline(model, img, m, embeds, steps, cfg, seed, progress):
    import torch
    from diffusers import AutoPipelineForInpainting
    from PIL import Image

    pipe = getattr(model, "_layerctl_inpaint_pipe", None)
    if pipe is None:
        pipe = AutoPipelineForInpainting.from_pipe(model.pipe)
        pipe.set_progress_bar_config(disable=True)
        try:
            model._layerctl_inpaint_pipe = pipe
        except Exception:  # noqa: BLE001 - a frozen object: just rebuild next time
            pass
    from layerctl.pipelines.sampling import fresh_scheduler

    pipe.scheduler = fresh_scheduler(model)
    h, w = img.shape[:2]
    image = Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), "RGB")
    mask_image = Image.fromarray(np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8), "L")
    gen = torch.Generator("cpu").manual_seed(int(seed))

    def _cb(p, i, t, kwargs):
        if progress is not None:
            progress(i + 1, steps)
        return {}

    with torch.no_grad():
        res = pipe(
            **_embeds_kwargs(embeds, cfg),
            image=image,
            mask_image=mask_image,
            height=h,
            width=w,
            num_inference_steps=steps,
            guidance_scale=cfg,
            strength=1.0,
            generator=gen,
            output_type="np",
            callback_on_step_end=_cb,
        )
    out = np.asarray(res.images[0], dtype=np.float32)
    if out.shape[:2] != (h, w):
        raise LayerctlError(f"the inpainting pipeline returned {out.shape[1]}x{out.shape[0]}, expected {w}x{h}")
    return np.clip(out, 0.0, 1.0)
