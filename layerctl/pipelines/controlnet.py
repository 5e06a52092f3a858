"""ControlNet next to the transparent weights: diffusers ControlNetModel(s) feeding the base UNet.

    controls = load_controls(kit, model, refs, images, scales, width, height, resize)
    spec = DenoiseSpec(..., unet_extra=residual_hook(controls, use_cfg))

A ControlNet is a separate network that reads the same noisy latent, timestep and text
conditioning as the UNet and adds residuals to the UNet's skip connections and mid block
(``down_block_additional_residuals`` / ``mid_block_additional_residual``). The LayerDiffuse
weights live in the base UNet (merged patches for SDXL, attention processors for the SD1.5
attention-sharing file), so the two compose without touching each other. Several
ControlNets add their residuals (diffusers' MultiControlNetModel does the same).

References: a local diffusers folder (``config.json`` + weights), a single-file
``.safetensors`` ControlNet, or a hub id (the Hugging Face cache first, the network when
online). The family (SD1.5 vs SDXL) is read from the config before any weights load: an
SDXL ControlNet has ``addition_embed_type: text_time``. Control images are flattened on
grey 0.5 when they have alpha (docs/architecture.md: the method) and fitted to the output size with --resize;
they go in as RGB in [0, 1] like diffusers' ControlNet pipelines feed them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from layerctl.errors import LayerctlError

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


@dataclass
class Control:
    """One ControlNet with its control image and scale, ready for the denoising loop."""

    ref: str  # as given (for metadata)
    net: Any  # diffusers ControlNetModel on the model's device and dtype
    family: str  # "sd15" or "sdxl"
    image_path: str
    image_sha256: str
    source: Any  # HxWx4 float32 straight RGBA of the control image, as read
    scale: float
    resize: str = "crop"
    cond: Any = None  # [1, 3, H, W] tensor in [0, 1] at the current output size

    def fit(self, width: int, height: int, device=None, dtype=None) -> None:
        """(Re)build the control tensor for an output of width x height."""
        import numpy as np
        import torch

        from layerctl.core.geometry import fit_image
        from layerctl.core.imagemath import flatten_grey

        rgb = flatten_grey(fit_image(self.source, width, height, self.resize))
        t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
        self.cond = t.to(device or self.net.device, dtype or self.net.dtype)

    def describe(self) -> dict:
        return {
            "model": self.ref,
            "family": self.family,
            "image": self.image_path,
            "image_sha256": self.image_sha256,
            "scale": self.scale,
        }


# ---------------------------------------------------------------- pure helpers


def controlnet_family(config: dict) -> str:
    """'sdxl' for a ControlNet with SDXL's text+time embedding, else 'sd15'."""
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"


def _norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    return v


def check_fits(config: dict, ref: str, model) -> str:
    """Raise a one-line error when a ControlNet config does not fit the base model; returns its family."""
    fam = controlnet_family(config)
    if fam != model.family:
        raise LayerctlError(
            f"ControlNet '{ref}' is an {FAMILY_NAMES.get(fam, fam)} ControlNet, but the base model '{model.ref}' is "
            f"{FAMILY_NAMES.get(model.family, model.family)}: use an {FAMILY_NAMES.get(model.family, model.family)} ControlNet"
        )
    ucfg = model.unet.config
    for key in ("cross_attention_dim", "block_out_channels"):
        mine, theirs = _norm(config.get(key)), _norm(getattr(ucfg, key, None))
        if mine is not None and theirs is not None and mine != theirs:
            raise LayerctlError(
                f"ControlNet '{ref}' does not fit the base model '{model.ref}' (both {FAMILY_NAMES.get(fam, fam)}): "
                f"its {key} is {mine}, the UNet's is {theirs}"
            )
    if int(config.get("in_channels", 4)) != 4:
        raise LayerctlError(f"ControlNet '{ref}' takes {config.get('in_channels')} latent channels; layerctl feeds it 4")
    return fam


def pair_options(refs: Sequence[str], images: Sequence[str], scales: Sequence[float]) -> list[tuple[str, str, float]]:
    """(model, image, scale) per ControlNet: one --control-image each; no scale = 1.0, one scale = all."""
    refs, images, scales = list(refs or []), list(images or []), [float(s) for s in (scales or [])]
    if not refs:
        if images:
            raise LayerctlError("--control-image needs --controlnet (the ControlNet model it is for)")
        if scales:
            raise LayerctlError("--control-scale needs --controlnet")
        return []
    if len(images) != len(refs):
        raise LayerctlError(
            f"give one --control-image per --controlnet (got {len(refs)} ControlNet(s) and {len(images)} image(s))"
        )
    if not scales:
        scales = [1.0] * len(refs)
    elif len(scales) == 1:
        scales = scales * len(refs)
    elif len(scales) != len(refs):
        raise LayerctlError(
            f"give one --control-scale for all ControlNets or one per --controlnet (got {len(scales)} for {len(refs)})"
        )
    for s in scales:
        if not (s == s) or abs(s) == float("inf"):  # NaN / inf
            raise LayerctlError(f"--control-scale must be a finite number (got {s})")
    return list(zip(refs, images, scales))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- loading


def _source(ref: str) -> tuple[str, str]:
    """('folder' | 'file' | 'hub', location) for a ControlNet reference, or a one-line error."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            if (p / "controlnet" / "config.json").is_file():
                return "folder", str(p / "controlnet")
            raise LayerctlError(f"ControlNet folder {p} has no config.json (not a diffusers ControlNet)")
        return "folder", str(p)
    if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise LayerctlError(f"refusing to unpickle ControlNet {ref}: pickle files can run code; convert it to .safetensors")
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise LayerctlError(f"ControlNet file not found: {p}")
        return "file", str(p)
    if p.exists():
        raise LayerctlError(f"ControlNet '{ref}' is not a diffusers folder or a .safetensors file")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return "hub", ref
    raise LayerctlError(f"ControlNet not found: '{ref}' (give a diffusers folder, a .safetensors file or a hub id 'owner/name')")


def _hub_call(fn, ref: str, what: str, **kwargs):
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return fn(ref, local_files_only=True, **kwargs)
    except Exception as first:  # noqa: BLE001 - not cached: try the network unless offline
        if offline:
            raise LayerctlError(
                f"ControlNet '{ref}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1: download it once online "
                f"or give a local folder ({type(first).__name__})"
            ) from None
        try:
            return fn(ref, **kwargs)
        except Exception as exc:  # noqa: BLE001
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LayerctlError(f"cannot load {what} '{ref}': {line}") from None


def read_config(ref: str) -> Optional[dict]:
    """The ControlNet's config (None for a single .safetensors file: checked after loading)."""
    from diffusers import ControlNetModel

    kind, loc = _source(ref)
    if kind == "file":
        return None
    try:
        if kind == "folder":
            return dict(ControlNetModel.load_config(loc))
        return dict(_hub_call(ControlNetModel.load_config, loc, "ControlNet config"))
    except LayerctlError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read the config of ControlNet '{ref}': {exc}") from None


def load_net(ref: str, device, dtype):
    from diffusers import ControlNetModel

    kind, loc = _source(ref)
    try:
        if kind == "folder":
            net = ControlNetModel.from_pretrained(loc, torch_dtype=dtype)
        elif kind == "file":
            net = ControlNetModel.from_single_file(loc, torch_dtype=dtype)
        else:
            net = _hub_call(ControlNetModel.from_pretrained, loc, "ControlNet", torch_dtype=dtype)
    except LayerctlError:
        raise
    except Exception as exc:  # noqa: BLE001
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerctlError(f"cannot load ControlNet '{ref}': {line}") from None
    return net.to(device).eval().requires_grad_(False)


def read_control_image(path: str):
    """HxWx4 float32 straight RGBA of a control image (one-line error when unreadable)."""
    import numpy as np

    from layerctl.io.imageio import load_image
    from layerctl.core.imagemath import to_float

    return to_float(np.asarray(load_image(path, "RGBA")))


def load_controls(kit, model, options: Sequence[tuple[str, str, float]], width: int, height: int,
                  resize: str = "crop", images: Optional[dict] = None) -> list[Control]:
    """Check, load (cached on the model's kit) and prepare ControlNets for an output of width x height.

    `options` from :func:`pair_options`; `images` may hold already-read control images by path.
    """
    cache = kit.controlnets
    controls = []
    for ref, image_path, scale in options:
        key = (ref, str(model.device), model.dtype, id(model))
        if key not in cache:
            config = read_config(ref)
            if config is not None:
                check_fits(config, ref, model)  # before any weights load
            net = load_net(ref, model.device, model.dtype)
            fam = check_fits(dict(net.config), ref, model)
            cache[key] = (net, fam)
        net, fam = cache[key]
        src = (images or {}).get(image_path)
        if src is None:
            src = read_control_image(image_path)
        c = Control(ref=ref, net=net, family=fam, image_path=str(image_path), image_sha256=file_sha256(image_path),
                    source=src, scale=float(scale), resize=resize)
        c.fit(width, height)
        controls.append(c)
    return controls


# ---------------------------------------------------------------- the denoising hook


def residual_hook(controls: Sequence[Control], use_cfg: bool) -> Callable:
    """A DenoiseSpec.unet_extra: runs every ControlNet on the UNet's input and sums their residuals.

    The UNet batch is [uncond..., cond...] under CFG. A ControlNet with global_pool_conditions
    (e.g. shuffle) runs on the cond half only, zeros for the rest (diffusers' guess mode).
    """
    import torch

    def hook(x, t, hidden, extra):
        downs, mid = None, None
        b = x.shape[0]
        for c in controls:
            guess = bool(getattr(c.net.config, "global_pool_conditions", False)) and use_cfg
            rows = slice(b // 2, b) if guess else slice(0, b)
            xs = x[rows, :4]
            cond = c.cond.to(x.device, c.net.dtype).expand(xs.shape[0], -1, -1, -1)
            added = extra.get("added_cond_kwargs")
            if added is not None:
                added = {k: v[rows] for k, v in added.items()}
            d, m = c.net(
                xs.to(c.net.dtype), t, encoder_hidden_states=hidden[rows].to(c.net.dtype), controlnet_cond=cond,
                conditioning_scale=c.scale, added_cond_kwargs=added, guess_mode=guess, return_dict=False,
            )
            if guess:
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            downs = list(d) if downs is None else [a + r for a, r in zip(downs, d)]
            mid = m if mid is None else mid + m
        if downs is None:
            return {}
        return {
            "down_block_additional_residuals": [r.to(x.dtype) for r in downs],
            "mid_block_additional_residual": mid.to(x.dtype),
        }

    return hook
