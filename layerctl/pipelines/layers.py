"""Layer modes: foreground / background / blended layers, generated together or from a known layer.

`layerctl gen --bg/--fg/--joint` call :func:`gen_layers`; `layerctl decompose` calls
:func:`decompose`. How each family does it (facts from the official sd-forge-layerdiffuse
script; see docs/layer-modes.md):

SD1.5 — attention sharing, one denoising run, a frame-fastest batch ``(b f)``:

- ``joint``  3 frames [fg, bg, blended] (``layer_sd15_joint``);
- ``bg2fg``  2 frames [fg, blended], the background through the control encoder;
- ``fg2bg``  2 frames [bg, blended], the grey-flattened foreground through the control encoder.

Every frame's cond rows get their own prompt (``cond_overwrite``); the fg frame is a
transparent latent (decoded with the transparent decoder), the others plain RGB.
Decompose pins the known frames of the joint model: their latent is replaced by the
known latent noised to the current level at every step (clean at the end).

SDXL — conditional UNets, condition latents concatenated to the UNet input (clean, both
CFG halves), two stages for gen: ``bg2ble`` then ``bgble2fg`` (or ``fg2ble`` then
``fgble2bg``); the second stage takes [known, blended]. Decompose with a known layer is
the second stage alone; the picture alone has no official SDXL model.

Conditioning images: any Pillow mode; RGBA flattened on grey 0.5; resized to the output
size by ``crop`` (cover + centre crop, the official default), ``fit`` (contain + pad with
the median border colour) or ``stretch``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from layerctl.core.frames import FRAMES, GEN_OUTPUTS, SD15_CONTROL, SDXL_CONCAT, SDXL_STAGES, STACK_ORDER
from layerctl.core.budget import check_memory
from layerctl.core.geometry import auto_size, fit_image
from layerctl.core.imagemath import flatten_grey, rgba_to_uint8
from layerctl.core.naming import batch_seeds, expand_out, new_seed
from layerctl.errors import LayerctlError
from layerctl.outputs import base_metadata, check_outputs, preview_path, write_images, write_psd

# ================================================================= pure helpers


def join_prompts(*parts: Optional[str]) -> str:
    """Non-empty parts joined with ', ' (the official '<layer prompt>, <main prompt>')."""
    return ", ".join(p.strip() for p in parts if p and p.strip())


def layer_prompts(prompt: Optional[str], fg_prompt: Optional[str], bg_prompt: Optional[str]) -> dict:
    """Prompt text per layer.

    fg = "<fg prompt>, <prompt>", bg = "<bg prompt>, <prompt>"; the blended picture gets the
    main prompt, or (without one) the fg and bg prompts together.
    """
    fg = join_prompts(fg_prompt, prompt) or join_prompts(prompt)
    bg = join_prompts(bg_prompt, prompt) or join_prompts(prompt)
    blended = join_prompts(prompt) or join_prompts(fg_prompt, bg_prompt)
    return {"fg": fg, "bg": bg, "blended": blended}


# ================================================================= conditioning images


@dataclass
class KnownLayer:
    """A given layer image: the file, its RGBA at the source size, and (after `resize`) at the output size."""

    role: str
    path: str
    source: np.ndarray  # HxWx4 float straight RGBA, original size
    rgba: Optional[np.ndarray] = None  # at the output size

    @property
    def size(self) -> tuple[int, int]:
        return int(self.source.shape[1]), int(self.source.shape[0])

    def resize(self, width: int, height: int, how: str) -> None:
        self.rgba = fit_image(self.source, width, height, how)

    def rgb_tensor(self):
        """[1,3,H,W] float32 in [0,1], flattened on grey."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(flatten_grey(self.rgba).transpose(2, 0, 1)))[None].float()

    def rgba_tensor(self):
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.rgba.transpose(2, 0, 1)))[None].float()

    def psd_pixels(self) -> np.ndarray:
        """uint8 pixels for the PSD stack: RGBA for a foreground, flattened RGB otherwise."""
        from layerctl.core.imagemath import to_uint8

        return to_uint8(self.rgba if self.role == "fg" else flatten_grey(self.rgba))


def read_known(role: str, path: str) -> KnownLayer:
    """Load a layer image (any Pillow mode, EXIF orientation applied); one-line error when unreadable."""
    from layerctl.io.imageio import load_image
    from layerctl.core.imagemath import to_float

    im = load_image(path, "RGBA")
    arr = to_float(np.asarray(im))
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise LayerctlError(f"empty image: {path}")
    return KnownLayer(role, str(path), arr)


# ================================================================= what a backend can do


def capabilities(model) -> list[str]:
    """Human-readable list of the layer jobs this model can run."""
    modes = set(getattr(model, "modes", ()))
    can = []
    if "rgba" in modes:
        can.append("gen PROMPT (text -> RGBA)")
    if "bg2fg" in modes:
        can.append("gen --bg")
    if "fg2bg" in modes:
        can.append("gen --fg")
    if "joint" in modes:
        can.append("gen --joint")
    if model.family == "sd15" and "joint" in modes:
        can += ["decompose --bg", "decompose --fg", "decompose IMAGE"]
    elif model.family == "sdxl":
        if "bg2fg" in modes:
            can.append("decompose --bg")
        if "fg2bg" in modes:
            can.append("decompose --fg")
    return can


def _cannot(model, what: str, why: str = "") -> LayerctlError:
    can = capabilities(model)
    return LayerctlError(
        f"the {model.backend} backend cannot {what}{why}; it can: {', '.join(can) if can else 'nothing of this kind'}"
    )


def check_gen_mode(model, mode: str, own_weights: bool = False) -> None:
    """`own_weights`: --layer-weights names the files (SD1.5: their layout is checked when loaded)."""
    if model.family not in ("sd15", "sdxl"):
        raise _cannot(model, f"run layer mode '{mode}'", " (layer modes exist for the sd15 and sdxl families)")
    if own_weights and model.family == "sd15":
        return
    if mode not in getattr(model, "modes", ()) or (model.family == "sdxl" and mode == "joint"):
        why = " (no official SDXL joint model)" if model.family == "sdxl" and mode == "joint" else ""
        raise _cannot(model, f"run 'gen {'--joint' if mode == 'joint' else ('--bg' if mode == 'bg2fg' else '--fg')}'", why)


def check_decompose(model, known: Optional[str]) -> None:
    flag = {None: "IMAGE", "bg": "--bg", "fg": "--fg"}[known]
    if model.family == "sd15":
        if "joint" not in getattr(model, "modes", ()):
            raise _cannot(model, f"run 'decompose {flag}'", " (it needs the joint model)")
        return
    if model.family == "sdxl":
        need = {"bg": "bg2fg", "fg": "fg2bg"}.get(known)
        if need is None:
            raise _cannot(
                model, "decompose a picture alone",
                " (the official SDXL files need a known layer: give --bg or --fg)",
            )
        if need not in getattr(model, "modes", ()):
            raise _cannot(model, f"run 'decompose {flag}'")
        return
    raise _cannot(model, "decompose", " (layer modes exist for the sd15 and sdxl families)")


# ================================================================= a job, as both commands see it


@dataclass
class LayerJob:
    """Everything one layer run needs, resolved from a GenRequest or DecomposeRequest."""

    req: object
    kit: object  # layerctl.models.kit.ModelKit: the model and its LayerDiffuse parts
    kind: str  # gen mode ('joint', 'bg2fg', 'fg2bg') or 'decompose'
    known: dict  # role -> KnownLayer
    produce: tuple  # roles written as PNG files
    texts: dict  # role -> prompt text
    width: int
    height: int
    steps: int
    cfg: float
    seeds: list
    weight: float = 1.0
    stop_at: float = 1.0
    weights_used: list = field(default_factory=list)
    decoder_name: Optional[str] = None
    encoder_name: Optional[str] = None
    paths: list = field(default_factory=list)  # per image: role -> Path
    psd_paths: list = field(default_factory=list)  # per image: Path or None

    @property
    def model(self):
        return self.kit.model

    @property
    def n(self) -> int:
        return len(self.seeds)


def check_layer_name(role: str, name) -> str:
    """--fg-name/--bg-name/--blended-name are file names inside --out-dir, not paths."""
    flag = f"--{role}-name"
    if not name or not str(name).strip():
        raise LayerctlError(f"{flag}: empty file name for the {role} layer")
    name = str(name)
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise LayerctlError(f"{flag} '{name}' must be a file name inside --out-dir, not a path")
    return name


def check_out_dir(out_dir: str) -> None:
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise LayerctlError(f"--out-dir {out_dir} is a file, not a folder")


def _counting(req) -> dict:
    """{i} counts every image of the command (gen --prompts-file runs one request per prompt)."""
    return {"start": getattr(req, "_first_index", 0) or 0, "total": getattr(req, "_total_images", None)}


def _plan_paths(job: LayerJob, out_dir: str, prompt: str) -> None:
    req = job.req
    check_out_dir(out_dir)
    per_role = {}
    for role in job.produce:
        name = check_layer_name(role, getattr(req, f"{role}_name"))
        per_role[role] = expand_out(str(Path(out_dir) / name), job.n, job.seeds, prompt, **_counting(req))
    all_paths = [p for paths in per_role.values() for p in paths]
    if len(set(all_paths)) != len(all_paths):
        raise LayerctlError("the layer file names collide (give --fg-name/--bg-name/--blended-name different names)")
    previews = []
    if getattr(req, "preview", False) and "fg" in per_role:  # write_images adds NAME.preview.png for RGBA
        previews = [preview_path(p) for p in per_role["fg"]]
    if len(set(all_paths + previews)) != len(all_paths) + len(previews):
        raise LayerctlError("a layer file name collides with the foreground's .preview.png")
    check_outputs(all_paths + previews, req.overwrite)
    job.paths = [{role: per_role[role][i] for role in job.produce} for i in range(job.n)]
    if getattr(req, "psd", None):
        psds = expand_out(req.psd, job.n, job.seeds, prompt, **_counting(req))
        check_outputs(psds, req.overwrite, suffixes=(".psd",))
        if set(psds) & set(all_paths + previews):
            raise LayerctlError("--psd names one of the layer PNG files")
        job.psd_paths = psds
    else:
        job.psd_paths = [None] * job.n


def _settings(job_req, model) -> tuple[int, float]:
    steps = job_req.steps or model.default_steps
    cfg = job_req.cfg if job_req.cfg is not None else model.default_cfg
    return steps, cfg


# ================================================================= gen


def _check_gen_flags(req, mode: str) -> None:
    if req.out:
        raise LayerctlError("layer modes write several files: use --out-dir DIR instead of --out")
    if not req.out_dir:
        raise LayerctlError(f"gen {'--joint' if mode == 'joint' else '--bg/--fg'} needs --out-dir DIR (the folder for the layer files)")
    for flag, value in (("--init", req.init), ("--mask", req.mask), ("--hires", req.hires), ("--controlnet", req.controlnet)):
        if value:
            raise LayerctlError(f"{flag} does not combine with the layer modes (--bg/--fg/--joint)")


def plan_gen(models, req, mode: str) -> LayerJob:
    """Validate a layer-mode gen request, read its images, load the model; nothing written yet."""
    _check_gen_flags(req, mode)
    known = {}
    if mode == "bg2fg":
        known["bg"] = read_known("bg", req.bg)
    elif mode == "fg2bg":
        known["fg"] = read_known("fg", req.fg)
    texts = layer_prompts(req.prompt, req.fg_prompt, req.bg_prompt)
    seeds = batch_seeds(req.seed, req.batch)
    # every output path is checked before the model loads
    paths = LayerJob(req=req, kit=None, kind=mode, known=known, produce=GEN_OUTPUTS[mode], texts=texts,
                     width=0, height=0, steps=0, cfg=0.0, seeds=seeds)
    _plan_paths(paths, req.out_dir, texts["blended"])
    check_memory(req, frames=len(FRAMES[mode]))
    kit = models.kit(req)
    model = kit.model
    check_gen_mode(model, mode, own_weights=bool(getattr(req, "layer_weights", None)))
    first = next(iter(known.values()), None)
    if first is not None:
        width, height = auto_size(*first.size, model.native_size, req.width, req.height)
    else:
        width, height = req.width or model.native_size, req.height or model.native_size
    for k in known.values():
        k.resize(width, height, req.resize)
    steps, cfg = _settings(req, model)
    job = LayerJob(
        req=req, kit=kit, kind=mode, known=known, produce=GEN_OUTPUTS[mode], texts=texts,
        width=width, height=height, steps=steps, cfg=cfg, seeds=seeds, weight=req.weight, stop_at=req.stop_at,
        paths=paths.paths, psd_paths=paths.psd_paths,
    )
    return job


def gen_layers(models, req, mode: str):
    """`layerctl gen --bg/--fg/--joint`: writes the layer PNGs (+ PSD); returns OutputRecords."""
    job = plan_gen(models, req, mode)
    layers = run_job(job)
    return write_job(job, layers)


# ================================================================= decompose


def plan_decompose(models, req, outputs: bool = True) -> LayerJob:
    """Validate a decompose request, read its images, load the model; `outputs=False` skips
    planning the output files (for :func:`decompose_layers`)."""
    if req.fg and req.bg:
        raise LayerctlError("decompose takes one known layer: give --bg or --fg, not both")
    if req.fg and req.fg_prompt:
        raise LayerctlError("--fg-prompt makes no sense with --fg (the foreground is given)")
    if req.bg and req.bg_prompt:
        raise LayerctlError("--bg-prompt makes no sense with --bg (the background is given)")
    known_role = "fg" if req.fg else ("bg" if req.bg else None)
    known = {"blended": read_known("blended", req.image)}
    if known_role:
        known[known_role] = read_known(known_role, getattr(req, known_role))
    seed = req.seed if req.seed is not None else new_seed()
    produce = tuple(r for r in ("fg", "bg") if r != known_role)
    texts = layer_prompts(req.prompt, req.fg_prompt, req.bg_prompt)
    planned = LayerJob(req=req, kit=None, kind="decompose", known=known, produce=produce, texts=texts,
                       width=0, height=0, steps=0, cfg=0.0, seeds=[seed])
    if outputs:  # every output path is checked before the model loads
        _plan_paths(planned, req.out_dir or ".", texts["blended"])
    check_memory(req, frames=3)
    kit = models.kit(req)
    model = kit.model
    check_decompose(model, known_role)
    width, height = auto_size(*known["blended"].size, model.native_size, req.width, req.height)
    for k in known.values():
        k.resize(width, height, req.resize)
    steps, cfg = _settings(req, model)
    job = LayerJob(
        req=req, kit=kit, kind="decompose", known=known, produce=produce,
        texts=texts, width=width, height=height,
        steps=steps, cfg=cfg, seeds=[seed], weight=float(getattr(req, "weight", 1.0)),
        stop_at=float(getattr(req, "stop_at", 1.0)), paths=planned.paths, psd_paths=planned.psd_paths,
    )
    return job


def decompose(models, req):
    """`layerctl decompose IMAGE [--bg BG | --fg FG]`: writes the unknown layers (+ PSD)."""
    job = plan_decompose(models, req)
    layers = run_job(job)
    return write_job(job, layers)


def decompose_layers(models, req) -> dict:
    """Every layer of a decompose run (known ones as the model returns them), nothing written.

    role -> [1, C, H, W] float tensor in [0,1] (fg RGBA, others RGB).
    """
    return run_job(plan_decompose(models, req, outputs=False))


# ================================================================= running


def run_job(job: LayerJob) -> dict:
    """Denoise and decode; role -> [n, C, H, W] float tensor in [0,1]."""
    if job.model.family == "sd15":
        return _run_sd15(job)
    return _run_sdxl(job)


def _scaled_latent(model, rgb01) -> "object":
    from layerctl.pipelines.sampling import encode_rgb

    return encode_rgb(model, rgb01.to(model.device))


def _transparent_scaled_latent(job: LayerJob, known: KnownLayer):
    from layerctl.models.transparent_vae import transparent_latent

    model = job.model
    encoder, name = job.kit.encoder(job.req)
    job.encoder_name = name
    p = next(encoder.parameters())
    lat = transparent_latent(encoder, known.rgba_tensor().to(p.device, p.dtype), model.vae_encode)
    return lat.float() * model.latent_scale


def _decoder(job: LayerJob):
    dec, name = job.kit.decoder(job.req)
    job.decoder_name = name
    return dec


def _run_sd15(job: LayerJob) -> dict:
    import torch

    from layerctl.models.attention_sharing import make_cond_mark, repeat_frames
    from layerctl.pipelines.sampling import DenoiseSpec, decode_rgb, decode_transparent, denoise, make_noise
    from layerctl.progress import log, steps_bar

    model, req = job.model, job.req
    if job.kind == "decompose":
        layout = "joint"
    else:
        layout = job.kind
    frames = FRAMES[layout]
    F, n = len(frames), job.n
    active = job.kit.use_weights(layout, req, job.weight)
    patcher = active.patcher
    want_control = SD15_CONTROL[layout] is not None
    if patcher is None or patcher.frames != F or bool(patcher.use_control) != want_control:
        have = "no attention-sharing units" if patcher is None else (
            f"{patcher.frames} frame(s){' with' if patcher.use_control else ' without'} a control encoder"
        )
        raise LayerctlError(
            f"the layer weights ({', '.join(active.names)}) have {have}; mode {layout} needs {F} frames "
            f"[{', '.join(frames)}]{' with' if want_control else ' without'} a control encoder"
        )
    if job.weight != 1.0:
        log("layerctl: --weight applies to the SDXL patch files; the SD1.5 attention-sharing units run at full strength", job.kit.quiet)
    job.weights_used = list(active.names)
    use_cfg = job.cfg > 1.0
    negative = req.negative
    # every frame's prompt and the negative must give the same token count (the attention-sharing
    # units swap a frame's context for its own prompt): encode all of them to the longest's chunks
    chunks = model.prompt_chunks([job.texts[r] for r in frames] + [job.texts["blended"], negative])
    encode = functools.partial(model.encode_prompt, width=job.width, height=job.height, clip_skip=req.clip_skip,
                               min_chunks=chunks)
    embeds = encode([job.texts["blended"]] * n, [negative] * n, use_cfg)
    embeds.hidden = repeat_frames(embeds.hidden, F)
    overrides = [encode([job.texts[role]], [negative], False).hidden[:1] for role in frames]
    groups = ([True] * n + [False] * n) if use_cfg else [False] * n
    pinned = {}
    for f, role in enumerate(frames):
        k = job.known.get(role)
        if k is None:
            continue
        if role == "fg":
            lat = _transparent_scaled_latent(job, k)
        else:
            lat = _scaled_latent(model, k.rgb_tensor())
        pinned[f] = lat.expand(n, -1, -1, -1).contiguous()
    # in the control layouts the known layer goes to the control encoder instead of a frame
    control_role = SD15_CONTROL[layout]
    stop_step = int(round(job.steps * job.stop_at))

    def before_unet(i, x):
        if i == stop_step and patcher.installed:
            patcher.remove()  # hand over to the plain UNet (the official "stop at")
            active.mark_stale()

    enc = patcher.kwargs_encoder
    if enc is not None and next(enc.parameters()).dtype != torch.float32:
        enc.float()  # the control encoder runs in float32 (as set_control feeds it), whatever the units' dtype
    try:
        patcher.set_cond_mark(make_cond_mark(groups, F))
        patcher.set_prompt_overrides(overrides)
        patcher.set_control(job.known[control_role].rgb_tensor() if control_role else None)
        with steps_bar(f"layers ({layout})", job.kit.quiet) as bar:
            spec = DenoiseSpec(
                embeds=embeds, noise=make_noise(job.seeds, F, job.height, job.width), steps=job.steps, cfg=job.cfg,
                frames=F, pinned=pinned, before_unet=before_unet if job.stop_at < 1.0 else None, progress=bar,
            )
            latents = denoise(model, spec)
    finally:
        patcher.set_prompt_overrides(None)
        patcher.set_cond_mark(None)
        if patcher.use_control:
            patcher.set_control(None)
    out = {}
    for f, role in enumerate(frames):
        lat = latents[f::F]
        if role == "fg":
            out[role] = decode_transparent(model, _decoder(job), lat, tta=req.tta).float().cpu()
        else:
            out[role] = decode_rgb(model, lat).float().cpu()
    return out


def _sdxl_stage(job: LayerJob, role: str, concat, noise, text: str, progress_label: str):
    from layerctl.pipelines.sampling import DenoiseSpec, denoise
    from layerctl.progress import steps_bar

    model, req = job.model, job.req
    active = job.kit.use_weights(role, req, job.weight)
    want = 4 + concat.shape[1]
    have = int(model.unet.conv_in.in_channels)
    if have != want:
        raise LayerctlError(
            f"the layer weights ({', '.join(active.names)}) give a UNet with {have} input channels; "
            f"'{role}' needs {want} (4 + {concat.shape[1]} condition channels [{', '.join(SDXL_CONCAT[role])}])"
        )
    for name in active.names:
        if name not in job.weights_used:
            job.weights_used.append(name)
    n = job.n
    use_cfg = job.cfg > 1.0
    embeds = model.encode_prompt([text] * n, [req.negative] * n, use_cfg, job.width, job.height, clip_skip=req.clip_skip)

    def handover():
        # the official "stop at": after this fraction of steps the plain UNet finishes, without concat
        if active.handles:
            active.handles.pop().restore()
        active.mark_stale()

    with steps_bar(progress_label, job.kit.quiet) as bar:
        spec = DenoiseSpec(
            embeds=embeds, noise=noise, steps=job.steps, cfg=job.cfg, concat=concat,
            concat_until=job.stop_at, handover=handover, progress=bar,
        )
        return denoise(model, spec)


def _run_sdxl(job: LayerJob) -> dict:
    import torch

    from layerctl.pipelines.sampling import decode_rgb, decode_transparent, encode_rgb, make_noise

    model, req = job.model, job.req
    n = job.n
    if req.layer_weights and job.kind != "decompose":
        raise LayerctlError(
            "--layer-weights names one file, but SDXL gen --bg/--fg runs two models "
            f"({' then '.join(SDXL_STAGES[job.kind])}); put replacements under their official names in --weights-dir"
        )
    cond = {role: _scaled_latent(model, k.rgb_tensor()).expand(n, -1, -1, -1) for role, k in job.known.items()}
    # image i: rows 2i (stage 1) and 2i+1 (stage 2) of its seed's noise, so that decompose of a
    # written blended.png with the same seed repeats gen's second stage exactly
    both = make_noise(job.seeds, 2, job.height, job.width)
    noise = both[1::2]
    if job.kind == "decompose":
        unknown = job.produce[0]
        known_role = "bg" if unknown == "fg" else "fg"
        stage2 = f"{known_role}ble2{unknown}"
        blended_lat = cond["blended"]
    else:
        stage1, stage2 = SDXL_STAGES[job.kind]
        known_role = SDXL_CONCAT[stage1][0]
        unknown = "fg" if known_role == "bg" else "bg"
        lat1 = _sdxl_stage(job, stage1, cond[known_role], both[0::2], job.texts["blended"], f"blended ({stage1})")
        blended = decode_rgb(model, lat1).float()
        # stage 2 sees the blended picture as written (8-bit), VAE-encoded, like the official chain
        blended8 = torch.round(blended * 255.0) / 255.0
        blended_lat = encode_rgb(model, blended8)
    concat = torch.cat([cond[known_role], blended_lat.to(cond[known_role])], dim=1)
    lat2 = _sdxl_stage(job, stage2, concat, noise, job.texts[unknown], f"{unknown} ({stage2})")
    out = {}
    if unknown == "fg":
        out["fg"] = decode_transparent(model, _decoder(job), lat2, tta=req.tta).float().cpu()
    else:
        out["bg"] = decode_rgb(model, lat2).float().cpu()
    if job.kind != "decompose":
        out["blended"] = blended.cpu()
    return out


# ================================================================= writing


def _stack(job: LayerJob, i: int) -> list:
    """The layer stack of image i, bottom -> top: role, file (written) or given (input path)."""
    stack = []
    for role in STACK_ORDER:
        entry = {"role": role}
        if role in job.paths[i]:
            entry["file"] = job.paths[i][role].name
        elif role in job.known:
            entry["given"] = job.known[role].path
        else:
            continue
        stack.append(entry)
    return stack


def write_job(job: LayerJob, layers: dict):

    model, req = job.model, job.req
    mode = job.kind if job.kind != "decompose" else "decompose-" + ("alone" if len(job.known) == 1 else
                                                                    next(r for r in job.known if r != "blended"))
    meta = base_metadata(model, req, mode, job.steps, job.cfg, job.width, job.height)
    meta.update(
        layer_weights=job.weights_used,
        prompts={r: job.texts[r] for r in ("fg", "bg", "blended")},
        fg_prompt=getattr(req, "fg_prompt", None),
        bg_prompt=getattr(req, "bg_prompt", None),
        given={r: k.path for r, k in job.known.items()},
        resize=req.resize,
    )
    if model.family == "sdxl":
        meta.update(weight=job.weight, stop_at=job.stop_at)
    if job.decoder_name:
        meta["transparent_decoder"] = job.decoder_name
    if job.encoder_name:
        meta["transparent_encoder"] = job.encoder_name
    preview = getattr(req, "preview", False)
    records = []
    for i in range(job.n):
        m = dict(meta, layers=_stack(job, i))
        items = [(role, job.paths[i][role], layers[role][i], job.seeds[i], i) for role in job.produce]
        for role, path, img, seed, index in items:
            one = write_images([(role, path, img, seed, index)], dict(m, layer=role), req.overwrite, preview=preview)
            records.extend(one)
        if job.psd_paths[i] is not None:
            psd_layers = []
            for role in STACK_ORDER:  # given layers as given (resized), the others as made
                if role in job.known:
                    psd_layers.append((role, job.known[role].psd_pixels()))
                elif role in layers:
                    psd_layers.append((role, rgba_to_uint8(layers[role][i])))
            rec = write_psd(job.psd_paths[i], psd_layers, req.overwrite, dict(m, seed=job.seeds[i]))
            rec.index = i
            records.append(rec)
    return records
