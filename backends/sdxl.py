"""Stable Diffusion XL: diffusers folder, hub id or single .safetensors file."""

from __future__ import annotations

from layerctl.core.frames import OFFICIAL_FILES
from layerctl.backends.base import Backend, SDXLModel, checkpoint_hints, default_scheduler, load_base_pipeline


class SDXLBackend(Backend):
    name = "sdxl"
    family = "sdxl"
    description = "Stable Diffusion XL family (1024 px, latent scale 0.13025)"

    def load(self, ref, device, dtype, attention="auto", options=None):
        import torch
        from diffusers import StableDiffusionXLPipeline

        pipe, facts = load_base_pipeline(StableDiffusionXLPipeline, ref, dtype, "SDXL", device, options)
        pipe.scheduler = default_scheduler(pipe.scheduler.config)
        # The SDXL VAE overflows in fp16: decode in bf16 on GPU (fp32 elsewhere).
        vae_dtype = torch.float32 if dtype == torch.float32 or device.type != "cuda" else torch.bfloat16
        pipe.to(device)
        pipe.vae.to(dtype=vae_dtype)
        pipe.set_progress_bar_config(disable=True)
        return SDXLModel(
            backend=self.name,
            family="sdxl",
            ref=ref,
            pipe=pipe,
            device=device,
            dtype=dtype,
            vae_dtype=vae_dtype,
            latent_scale=float(getattr(pipe.vae.config, "scaling_factor", 0.13025)),
            native_size=1024,
            default_steps=25,
            default_cfg=7.0,
            official=dict(OFFICIAL_FILES["sdxl"]),
            **checkpoint_hints(facts, bool(options and options.quiet)),
            modes=("rgba", "fg2bg", "bg2fg"),
        )
