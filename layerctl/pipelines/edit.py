"""Editing transparent images: img2img, masked inpainting, hires refinement, upscale, ControlNet.

`layerctl gen PROMPT --init/--mask/--hires/--controlnet` comes here through
:meth:`layerctl.session.Session.gen` (:func:`gen_edit`); `layerctl upscale` calls :func:`upscale`.

img2img (``--init IMAGE --strength S``)
    The output keeps the image's size (the run mirrors it up to multiples of 64 and crops
    back) unless --width/--height ask for another. The image (RGBA; RGB is opaque) goes through ``pad_rgb`` and the latent-transparency
    encoder into a transparent latent (``mean + std * 300 * E_a(...)`` of the frozen VAE's
    posterior, docs/architecture.md: the method), is noised to the level where the last ``round(steps * S)``
    sampler steps begin (at least one), denoised with the transparent weights and decoded
    by the transparent decoder. S = 1 starts from pure noise (the image is ignored).

inpainting (``--mask MASK``, white = repaint)
    On a base UNet (4 input channels) the latents outside the mask are replaced after every
    step by the image's latent noised to the next level (clean at the end). The latent mask
    is the pixel mask max-pooled over each 8x8 cell. On an inpainting UNet (9 channels) the
    UNet gets [latent, mask, masked-image latent] like diffusers' inpainting pipeline (the
    masked image is the init with alpha 0 under the mask, through the transparent encoder)
    and nothing is blended. Afterwards the input's pixels are put back outside the mask
    (premultiplied blend by the grey level of the mask), so there the output *is* the input.
    A mask must be greyscale (colour is an error); transparent mask pixels count as black.

hires (``--hires F [--hires-strength S]``) and ``upscale``
    The RGBA result (or the given image) is resized to round(size x F) (Lanczos on
    premultiplied colour), mirrored up to multiples of 64, encoded again with the transparent
    encoder and refined by img2img at the larger size; the transparent decoder then decodes
    a real alpha at the final size, which is cropped back to round(size x F).

ControlNet (``--controlnet MODEL --control-image IMG [--control-scale X]``, repeatable)
    see :mod:`layerctl.pipelines.controlnet`; used in every pass (control images refitted per size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from layerctl.core.geometry import MAX_SIDE, ceil64, edit_size, fit_image, fit_mask, hires_size, latent_mask
from layerctl.core.budget import check_memory
from layerctl.core.naming import batch_seeds, new_seed
from layerctl.errors import LayerctlError
from layerctl.models.kit import precheck_files
from layerctl.outputs import base_metadata, check_outputs, plan_outputs, preview_path, write_images


MASK_SNAP = 8.0 / 255.0  # mask values this close to 0 or 1 count as exactly 0 or 1 (JPEG noise)
COLOUR_SPREAD = 16.0 / 255.0  # max - min of R, G, B above this: the mask has colour


# ================================================================= pure helpers


def mask_from_rgba(rgba: np.ndarray, path: str = "mask") -> np.ndarray:
    """HxWx4 float RGBA -> HxW float32 mask in [0,1] (1 = repaint).

    The grey level is the mask; transparent pixels count as black (keep). A pixel whose R, G,
    B differ by more than COLOUR_SPREAD is colour: an error (a mask is greyscale). Values
    within MASK_SNAP of 0 or 1 snap to 0 or 1.
    """
    rgba = np.asarray(rgba, np.float32)
    rgb, a = rgba[..., :3], rgba[..., 3]
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    bad = (spread > COLOUR_SPREAD) & (a > 0)
    if bad.any():
        y, x = (int(v[0]) for v in np.nonzero(bad))
        r, g, b = (int(round(float(c) * 255)) for c in rgb[y, x])
        raise LayerctlError(
            f"mask {path} is not greyscale: pixel ({x}, {y}) is RGB ({r}, {g}, {b}); "
            f"use a greyscale mask (white = repaint, black = keep)"
        )
    m = rgb.mean(axis=-1) * a
    m = np.where(m <= MASK_SNAP, 0.0, np.where(m >= 1.0 - MASK_SNAP, 1.0, m))
    return m.astype(np.float32)


def paste_outside(new, old, mask):
    """Put `old` back where mask < 1: a premultiplied blend new*m + old*(1-m) of straight RGBA.

    new, old: [N,4,H,W] straight RGBA tensors; mask: [1 or N,1,H,W] in [0,1]. Where m = 0 the
    result is `old` exactly, where m = 1 it is `new` exactly.
    """
    import torch

    m = mask.to(new.dtype)
    a = new[:, 3:4] * m + old[:, 3:4] * (1 - m)
    pre = new[:, :3] * new[:, 3:4] * m + old[:, :3] * old[:, 3:4] * (1 - m)
    straight = torch.where(a > 1e-6, pre / a.clamp_min(1e-6), new[:, :3] * m + old[:, :3] * (1 - m))
    blended = torch.cat([straight.clamp(0, 1), a], dim=1)
    out = torch.where(m >= 1, new, blended)
    return torch.where(m <= 0, old, out)


def upscale_rgba(rgba, width: int, height: int):
    """[N,4,h,w] straight RGBA tensor -> [N,4,height,width] (Lanczos on premultiplied colour)."""
    import torch

    outs = []
    for img in rgba:
        arr = img.detach().float().cpu().permute(1, 2, 0).numpy()
        outs.append(torch.from_numpy(np.ascontiguousarray(fit_image(arr, width, height, "stretch").transpose(2, 0, 1))))
    return torch.stack(outs)


def pad_reflect(t, width: int, height: int):
    """[N,C,h,w] tensor -> [N,C,height,width]: extended right and down by mirroring (any amount).

    The hires pass pads to multiples of 64 this way (the content continues, no hard edge for
    the model to draw) and crops the result back to [:h, :w]."""
    import torch

    n, c, h, w = t.shape
    if (w, h) == (width, height):
        return t
    arr = np.pad(t.detach().cpu().numpy(), ((0, 0), (0, 0), (0, height - h), (0, width - w)), mode="symmetric")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(t.device, t.dtype)


def to_tensor(arr: np.ndarray):
    """HxWxC float array -> [1,C,H,W] float32 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(arr, np.float32).transpose(2, 0, 1)))[None]


# ================================================================= inputs


@dataclass
class InputImage:
    path: str
    sha256: str
    source: np.ndarray  # HxWx4 float32 straight RGBA as read
    opaque: bool  # no transparent pixel (an RGB file, or alpha 255 everywhere)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.source.shape[1]), int(self.source.shape[0])


def read_image(path: str, what: str = "init image") -> InputImage:
    from layerctl.pipelines.controlnet import file_sha256
    from layerctl.io.imageio import load_image
    from layerctl.core.imagemath import to_float

    arr = np.asarray(load_image(path, "RGBA"))
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise LayerctlError(f"empty {what}: {path}")
    return InputImage(str(path), file_sha256(path), to_float(arr), bool((arr[..., 3] == 255).all()))


def read_mask(path: str) -> tuple[np.ndarray, str]:
    """(HxW mask in [0,1], sha256) of a mask file; one-line errors for unreadable or colour files."""
    from layerctl.pipelines.controlnet import file_sha256
    from layerctl.io.imageio import load_image
    from layerctl.core.imagemath import to_float

    arr = to_float(np.asarray(load_image(path, "RGBA")))
    return mask_from_rgba(arr, str(path)), file_sha256(path)


def _resize_given(req) -> bool:
    """Whether --resize / `resize:` was given explicitly (the CLI leaves it unset unless typed)."""
    return "resize" in getattr(req, "model_fields_set", set())


# ================================================================= the job


@dataclass
class EditJob:
    """Everything a gen-edit or upscale run needs, resolved and checked; nothing written yet."""

    req: object
    kind: str  # "gen" or "upscale"
    kit: object  # layerctl.models.kit.ModelKit: the model and its LayerDiffuse parts
    prompt: str
    seeds: list
    steps: int
    cfg: float
    width: int  # base size (gen) / the source image's size (upscale)
    height: int
    paths: list
    psd_paths: list = field(default_factory=list)  # per image: Path or None
    init: Optional[InputImage] = None
    init_rgba: Optional[np.ndarray] = None  # HxWx4 at the base size
    mask_path: Optional[str] = None
    mask_sha256: Optional[str] = None
    mask: Optional[np.ndarray] = None  # HxW at the base size
    strength: float = 1.0
    hires: Optional[float] = None
    hires_wh: Optional[tuple[int, int]] = None
    hires_strength: float = 0.5
    control_options: list = field(default_factory=list)
    controls: list = field(default_factory=list)
    control_images: dict = field(default_factory=dict)
    resized: bool = False
    notes: list = field(default_factory=list)
    # filled while running
    weights: list = field(default_factory=list)
    decoder_name: Optional[str] = None
    encoder_name: Optional[str] = None
    mask_method: Optional[str] = None
    sampling: object = None  # layerctl.core.samplers.Sampling

    @property
    def model(self):
        return self.kit.model

    @property
    def final_size(self) -> tuple[int, int]:
        return self.hires_wh or (self.width, self.height)


@dataclass
class EditResult:
    rgba: object  # [N,4,H,W] float tensor in [0,1], the final images
    latent: object  # the final scaled latents
    base_rgba: object = None  # gen with --hires: the base pass's images (after paste-back)
    base_latent: object = None


def _check_common(req) -> list:
    from layerctl.pipelines.controlnet import pair_options

    options = pair_options(req.controlnet, req.control_image, req.control_scale)
    for _ref, image, _s in options:
        from layerctl.models.weights import check_file

        check_file(image, "control image")
    return options


def _sampling(models, req, model):
    from layerctl.pipelines.sampling import job_sampling

    return job_sampling(req, model, models.quiet)


def _settings(req, model) -> tuple[int, float]:
    steps = req.steps or model.default_steps
    cfg = req.cfg if req.cfg is not None else model.default_cfg
    return int(steps), float(cfg)


def refine_strength(given: Optional[float], model) -> float:
    """The strength of a refine at a larger size: as given, else the model's default (toy 0.2, others 0.5)."""
    return float(given) if given is not None else float(model.refine_strength)


def _inpainting_unet(model) -> bool:
    """An inpainting denoiser: [latent, mask, masked-image latent] in (SD: 9 = 4 + 1 + 4 channels)."""
    return model.denoiser_in_channels == 2 * model.latent_channels + 1


def _check_unet(model) -> None:
    n_in, c = model.denoiser_in_channels, model.latent_channels
    if n_in not in (c, 2 * c + 1):
        raise LayerctlError(
            f"the base model's UNet has {n_in} input channels; editing needs a base UNet ({c}) or an "
            f"inpainting UNet ({2 * c + 1})"
        )


def _check_hires(req) -> None:
    """--hires and --hires-strength ranges (also for requests built without validation)."""
    if req.hires_strength is not None and not (0.0 < req.hires_strength <= 1.0):
        raise LayerctlError(f"hires_strength must be in (0, 1] (got {req.hires_strength})")
    if req.hires is not None and not (req.hires > 1.0):
        raise LayerctlError(f"hires factor must be > 1 (got {req.hires})")


def plan_gen_edit(models, req) -> EditJob:
    """Validate a gen request with --init/--mask/--hires/--controlnet, read its inputs, load the model."""
    if not req.out:
        raise LayerctlError("--out is required (the PNG to write; {i} and {seed} fill in for batches)")
    if req.mask and not req.init:
        raise LayerctlError("--mask needs --init (the image to inpaint)")
    n = req.batch
    seeds = batch_seeds(req.seed, n)
    paths, psds = plan_outputs(req, n, seeds, req.prompt)  # every output path, before reading inputs
    _check_hires(req)
    options = _check_common(req)
    # inputs first (cheap, before any model loads)
    init = read_image(req.init, "init image") if req.init else None
    mask = mask_sha = None
    if req.mask:
        mask, mask_sha = read_mask(req.mask)
    images = {}
    from layerctl.pipelines.controlnet import read_control_image

    for _ref, image, _s in options:
        if image not in images:
            images[image] = read_control_image(image)
    notes = []
    if init is not None:
        width, height = edit_size(*init.size, req.width, req.height)
        if max(ceil64(width), ceil64(height)) > MAX_SIDE:
            raise LayerctlError(f"the init image gives an output of {width}x{height}, over the limit of {MAX_SIDE} px a side")
        if mask is not None and (mask.shape[1], mask.shape[0]) != init.size:
            if not _resize_given(req):
                raise LayerctlError(
                    f"the mask is {mask.shape[1]}x{mask.shape[0]} but the init image is {init.size[0]}x{init.size[1]}: "
                    f"give a mask of the same size, or --resize crop|fit|stretch to fit the mask to the image"
                )
            mask = fit_mask(mask, *init.size, req.resize)
            notes.append(f"mask fitted to the init image's {init.size[0]}x{init.size[1]} (--resize {req.resize})")
    else:
        width = height = None
        if req.width and req.height:
            width, height = req.width, req.height
    if width is not None:  # a hires size over the limit fails here, before any model loads
        hw = hires_size(width, height, req.hires) if req.hires is not None else (width, height)
        check_memory(req, frames=1, width=hw[0], height=hw[1])
    else:
        check_memory(req, frames=1, scale=req.hires or 1.0)
    precheck_files(req)
    kit = models.kit(req)
    model = kit.model
    _check_unet(model)
    if width is None:
        width, height = req.width or model.native_size, req.height or model.native_size
    hires_wh = hires_size(width, height, req.hires) if req.hires is not None else None
    steps, cfg = _settings(req, model)
    job = EditJob(
        req=req, kind="gen", kit=kit, prompt=req.prompt, seeds=seeds, steps=steps, cfg=cfg, width=width,
        height=height, paths=paths, psd_paths=psds, init=init, mask_path=req.mask, mask_sha256=mask_sha,
        strength=req.strength if init is not None else 1.0, hires=req.hires, hires_wh=hires_wh,
        hires_strength=refine_strength(req.hires_strength, model), control_options=options, control_images=images, notes=notes,
        sampling=_sampling(models, req, model),
    )
    if init is not None:
        if init.size != (width, height):
            job.resized = True
            notes.append(f"init image {init.size[0]}x{init.size[1]} fitted to {width}x{height} (--resize {req.resize})")
            job.init_rgba = fit_image(init.source, width, height, req.resize)
        else:
            job.init_rgba = init.source.copy()
        if mask is not None:
            job.mask = fit_mask(mask, width, height, req.resize)
    job.controls = _load_controls(job, width, height)
    return job


def _load_controls(job: EditJob, width: int, height: int) -> list:
    if not job.control_options:
        return []
    from layerctl.pipelines.controlnet import load_controls

    return load_controls(job.kit, job.model, job.control_options, width, height, job.req.resize, job.control_images)


def plan_upscale(models, req) -> EditJob:
    options = _check_common(req)
    src = read_image(req.image, "image")
    from layerctl.pipelines.controlnet import read_control_image

    images = {img: read_control_image(img) for _r, img, _s in options}
    w, h = src.size
    w2, h2 = hires_size(w, h, req.scale)
    out = req.out or str(Path(req.image).with_name(f"{Path(req.image).stem}_x{req.scale:g}.png"))
    seed = req.seed if req.seed is not None else new_seed()
    paths = [Path(out)]
    check_outputs(paths, req.overwrite)
    if req.preview:
        check_outputs([preview_path(paths[0])], req.overwrite)
    check_memory(req, frames=1, width=w2, height=h2)
    precheck_files(req)
    kit = models.kit(req)
    model = kit.model
    _check_unet(model)
    steps, cfg = _settings(req, model)
    strength = refine_strength(req.strength, model)
    job = EditJob(
        req=req, kind="upscale", kit=kit, prompt=req.prompt, seeds=[seed], steps=steps, cfg=cfg, width=w,
        height=h, paths=paths, init=src, init_rgba=src.source.copy(), strength=strength, hires=req.scale,
        hires_wh=(w2, h2), hires_strength=strength, control_options=options, control_images=images,
        sampling=_sampling(models, req, model),
    )
    job.controls = _load_controls(job, w2, h2)
    return job


# ================================================================= running


def encode_transparent(job: EditJob, rgba):
    """[N,4,H,W] straight RGBA in [0,1] -> scaled transparent latent (pad_rgb + E_a x 300 offset)."""
    from layerctl.models.codec import encode_scaled

    encoder, name = job.kit.encoder(job.req)
    job.encoder_name = name
    return encode_scaled(job.model, encoder, rgba)  # the family's conventions (FLUX.1: alpha last, shifted)


def decode(job: EditJob, latents):
    from layerctl.pipelines.sampling import decode_transparent

    decoder, name = job.kit.decoder(job.req)
    job.decoder_name = name
    return decode_transparent(job.model, decoder, latents, tta=job.req.tta).float().cpu()


def round_trip(job: EditJob, rgba):
    """The model's own encode -> decode of an RGBA batch, without denoising (what strength -> 0 tends to)."""
    return decode(job, encode_transparent(job, rgba))


def _inpaint_concat(job: EditJob, init_rgba, pixel_mask, n: int):
    """[n, 5, h, w] = [latent mask, masked-image latent] for a 9-channel inpainting UNet."""
    import torch

    _, _, H, W = init_rgba.shape
    if pixel_mask is None:
        lm = torch.ones((1, 1, H // 8, W // 8))
        masked = torch.zeros_like(init_rgba)
    else:
        lm = torch.from_numpy(latent_mask(pixel_mask))[None, None]
        keep = torch.from_numpy((pixel_mask < 0.5).astype(np.float32))[None, None]
        masked = init_rgba.clone()
        masked[:, 3:4] = masked[:, 3:4] * keep
    lat = encode_transparent(job, masked)
    return torch.cat([lm.to(lat), lat], dim=1).expand(n, -1, -1, -1).contiguous()


def _denoise(job: EditJob, active, width: int, height: int, init=None, strength: float = 1.0,
             latent_mask_t=None, concat=None, label: str = "generating", content: Optional[tuple[int, int]] = None,
             stream: int = 0):
    """Denoise at width x height (multiples of 64); `content` is the part that is kept (control
    images are fitted to it and mirrored into the rest, like the image)."""
    from layerctl.pipelines.controlnet import residual_hook
    from layerctl.pipelines.sampling import DenoiseSpec, denoise, make_noise
    from layerctl.progress import steps_bar

    model, req = job.model, job.req
    n = len(job.seeds)
    use_cfg = model.uses_cfg(job.cfg)
    embeds = model.encode_prompt([job.prompt] * n, [req.negative] * n, use_cfg, width, height, clip_skip=req.clip_skip)
    patcher = active.patcher
    if patcher is not None:
        from layerctl.models.attention_sharing import make_cond_mark

        patcher.set_control(None)
        patcher.set_prompt_overrides(None)
        patcher.set_cond_mark(make_cond_mark([True] * n + [False] * n if use_cfg else [False] * n, 1))
    cw, ch = content or (width, height)
    for c in job.controls:
        c.fit(cw, ch)
        if (cw, ch) != (width, height):
            c.cond = pad_reflect(c.cond, width, height)
    hook = residual_hook(job.controls, use_cfg) if job.controls else None
    try:
        with steps_bar(label, job.kit.quiet) as bar:
            spec = DenoiseSpec(
                embeds=embeds, noise=make_noise(job.seeds, 1, height, width, model.latent_channels), steps=job.steps, cfg=job.cfg,
                init=init, strength=strength, mask=latent_mask_t, concat=concat, unet_extra=hook, progress=bar,
                sampling=job.sampling, seeds=job.seeds, stream=stream,
            )
            return denoise(model, spec)
    finally:
        if patcher is not None:
            patcher.set_cond_mark(None)


def run_edit(job: EditJob) -> EditResult:
    """Denoise and decode (nothing written)."""
    import torch

    from layerctl.progress import log

    model, req = job.model, job.req
    for note in job.notes:
        log(f"layerctl: {note}", job.kit.quiet)
    n = len(job.seeds)
    active = job.kit.use_weights("rgba", req, getattr(req, "weight", 1.0))
    job.weights = list(active.names)
    nine = _inpainting_unet(model)
    base_rgba = base_lat = None
    if job.kind == "gen":
        w, h = job.width, job.height
        pw, ph = ceil64(w), ceil64(h)  # an init image keeps its size: mirrored up to 64s, cropped back
        init_lat = lm = concat = mask_p = None
        init_t = to_tensor(job.init_rgba) if job.init_rgba is not None else None
        init_p = pad_reflect(init_t, pw, ph) if init_t is not None else None
        if init_p is not None:
            init_lat = encode_transparent(job, init_p).expand(n, -1, -1, -1).contiguous()
        if job.mask is not None:
            job.mask_method = "inpainting-unet" if nine else "latent-blend"
            mask_p = pad_reflect(torch.from_numpy(job.mask)[None, None], pw, ph)[0, 0].numpy()
            if not nine:
                lm = torch.from_numpy(latent_mask(mask_p))[None, None].expand(n, -1, -1, -1)
        if nine:
            concat = _inpaint_concat(job, init_p if init_p is not None else torch.zeros(1, 4, ph, pw), mask_p, n)
        label = "inpainting" if job.mask is not None else ("img2img" if init_t is not None else "generating")
        base_lat = _denoise(job, active, pw, ph, init=init_lat, strength=job.strength,
                            latent_mask_t=lm, concat=concat, label=label, content=(w, h))
        base_rgba = decode(job, base_lat)[:, :, :h, :w].contiguous()
        if job.mask is not None:
            base_rgba = paste_outside(base_rgba, init_t.expand(n, -1, -1, -1), torch.from_numpy(job.mask)[None, None])
        if job.hires_wh is None:
            return EditResult(rgba=base_rgba, latent=base_lat)
        source = base_rgba
    else:
        source = to_tensor(job.init_rgba)
    w2, h2 = job.hires_wh
    pw, ph = ceil64(w2), ceil64(h2)
    big = pad_reflect(upscale_rgba(source, w2, h2), pw, ph)
    big_lat = encode_transparent(job, big)
    if big_lat.shape[0] != n:
        big_lat = big_lat.expand(n, -1, -1, -1).contiguous()
    concat = _inpaint_concat(job, big[:1], None, n) if nine else None
    label = "upscale" if job.kind == "upscale" else f"hires x{job.hires:g}"
    lat = _denoise(job, active, pw, ph, init=big_lat, strength=job.hires_strength, concat=concat, label=label,
                   content=(w2, h2), stream=1)
    rgba = decode(job, lat)[:, :, :h2, :w2].contiguous()
    return EditResult(rgba=rgba, latent=lat, base_rgba=base_rgba, base_latent=base_lat)


# ================================================================= writing


def edit_metadata(job: EditJob) -> dict:
    model, req = job.model, job.req
    w, h = job.final_size
    meta = base_metadata(model, req, "rgba", job.steps, job.cfg, w, h, job.sampling)
    ops = []
    meta.update(layer_weights=job.weights, transparent_decoder=job.decoder_name, role="rgba")
    if job.encoder_name:
        meta["transparent_encoder"] = job.encoder_name
    if job.init is not None:
        meta.update(
            init=job.init.path, init_sha256=job.init.sha256, init_size=list(job.init.size), init_opaque=job.init.opaque,
            strength=job.strength,
        )
        if job.resized:
            meta["resize"] = req.resize
    if job.kind == "upscale":
        ops.append("upscale")
        meta.update(upscale=job.hires, base_size=[job.width, job.height])
    else:
        if job.mask is not None:
            ops.append("inpaint")
            meta.update(mask=job.mask_path, mask_sha256=job.mask_sha256, mask_method=job.mask_method, mask_paste_back=True)
        elif job.init is not None:
            ops.append("img2img")
        if job.hires_wh is not None:
            ops.append("hires")
            meta.update(hires=job.hires, hires_strength=job.hires_strength, base_size=[job.width, job.height])
    if job.controls:
        ops.append("controlnet")
        meta["controlnets"] = [c.describe() for c in job.controls]
        meta.setdefault("resize", req.resize)
    meta["edit"] = ops
    return meta


def write_edit(job: EditJob, result: EditResult):
    meta = edit_metadata(job)
    req = job.req
    items = [("rgba", p, result.rgba[i], job.seeds[i], i) for i, p in enumerate(job.paths)]
    return write_images(items, meta, req.overwrite, preview=getattr(req, "preview", False), psd=job.psd_paths or None)


def gen_edit(models, req):
    """`layerctl gen PROMPT` with --init / --mask / --hires / --controlnet: writes PNGs, returns OutputRecords."""
    job = plan_gen_edit(models, req)
    return write_edit(job, run_edit(job))


def upscale(models, req):
    """`layerctl upscale IMAGE --scale F`: writes the refined, larger RGBA PNG; returns OutputRecords."""
    job = plan_upscale(models, req)
    return write_edit(job, run_edit(job))
