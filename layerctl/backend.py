"""Backends: from a model reference to diffusers components plus the facts about them.

A backend module lives in backends/ (installed as layerctl.backends) or in a
third-party package, registered under the entry-point group
"layerctl.backends". Everything LayerDiffuse-specific lives in layerctl/ and
works on the LoadedModel any backend returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from layerctl.errors import LayerctlError

ENTRY_POINT_GROUP = "layerctl.backends"

# Official LayerDiffuse file names per family and role (hub repo LayerDiffusion/layerdiffusion-v1).
OFFICIAL_REPO = "LayerDiffusion/layerdiffusion-v1"
OFFICIAL_FILES = {
    "sd15": {
        "decoder": "layer_sd15_vae_transparent_decoder.safetensors",
        "encoder": "layer_sd15_vae_transparent_encoder.safetensors",
        "rgba": "layer_sd15_transparent_attn.safetensors",
        "joint": "layer_sd15_joint.safetensors",
        "fg2bg": "layer_sd15_fg2bg.safetensors",
        "bg2fg": "layer_sd15_bg2fg.safetensors",
    },
    "sdxl": {
        "decoder": "vae_transparent_decoder.safetensors",
        "encoder": "vae_transparent_encoder.safetensors",
        "rgba": "layer_xl_transparent_attn.safetensors",
        "rgba_conv": "layer_xl_transparent_conv.safetensors",
        "fg2ble": "layer_xl_fg2ble.safetensors",
        "bg2ble": "layer_xl_bg2ble.safetensors",
        "fgble2bg": "layer_xl_fgble2bg.safetensors",
        "bgble2fg": "layer_xl_bgble2fg.safetensors",
    },
}


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch, already ordered [negatives..., positives...] when CFG is on.

    `extra` holds family-specific UNet kwargs (SDXL: added_cond_kwargs with
    text_embeds and time_ids), already batched the same way.
    """

    hidden: Any  # torch.Tensor [B, T, C]
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """What every LayerDiffuse code path needs from a base model."""

    backend: str  # registry name: "tiny", "sd15", ...
    family: str  # "sd15" or "sdxl": which official files and modes apply
    ref: str  # the model reference as given (for metadata)
    pipe: Any  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline holding the components
    device: Any  # torch.device
    dtype: Any  # torch dtype of the UNet / text encoders
    vae_dtype: Any  # torch dtype the VAE runs in (SDXL: bf16 or fp32, never fp16)
    latent_scale: float
    native_size: int
    default_steps: int
    default_cfg: float
    official: dict = field(default_factory=dict)  # role -> official file name
    modes: tuple = ("rgba",)  # layer modes this backend can run
    notes: str = ""  # e.g. "tiny: random weights, pictures are noise"

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def encode_prompt(self, prompts: list[str], negatives: list[str], cfg: bool, width: int, height: int) -> PromptEmbeds:
        """Encode a batch of prompts; negatives first when cfg (diffusers order)."""
        raise NotImplementedError

    def vae_encode(self, pixels):
        """pixels [B,3,H,W] in [-1,1] -> (mean, std) of the frozen VAE posterior, unscaled."""
        import torch

        vae = self.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def vae_decode(self, latents_unscaled):
        """Unscaled latent [B,4,h,w] -> pixels [B,3,H,W] in [0,1] (float32)."""
        import torch

        with torch.no_grad():
            out = self.vae.decode(latents_unscaled.to(self.device, self.vae_dtype)).sample
        return (out.float() / 2 + 0.5).clamp(0, 1)


class Backend:
    """Base class of a backend plugin. Subclasses set the class attributes and implement load()."""

    name: str = ""
    family: str = ""
    description: str = ""

    def accepts(self, ref: str) -> bool:
        """Whether this backend recognises a model reference (for auto-detection)."""
        return False

    def load(self, ref: str, device, dtype, attention: str = "auto") -> LoadedModel:
        raise NotImplementedError


def available_backends() -> dict[str, type]:
    """Registry name -> Backend class, from the entry-point group (built-ins always present)."""
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep
    # Built-ins even when the package metadata is stale (e.g. running from a checkout).
    for name, target in {
        "tiny": "layerctl.backends.tiny:TinyBackend",
        "tiny-xl": "layerctl.backends.tiny:TinyXLBackend",
        "sd15": "layerctl.backends.sd15:SD15Backend",
        "sdxl": "layerctl.backends.sdxl:SDXLBackend",
    }.items():
        found.setdefault(name, target)
    return found


def _resolve(target) -> type:
    import importlib

    if isinstance(target, str):
        mod, _, attr = target.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return target.load()


def get_backend(name: str) -> Backend:
    backends = available_backends()
    if name not in backends:
        raise LayerctlError(f"unknown backend '{name}' (known: {', '.join(sorted(backends))})")
    return _resolve(backends[name])()
