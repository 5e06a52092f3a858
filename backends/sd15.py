"""Stable Diffusion 1.5 (and fine-tunes of it): diffusers folder, hub id or single .safetensors file."""

from __future__ import annotations

from layerctl.core.frames import OFFICIAL_FILES
from layerctl.backends.base import Backend, SD15Model, checkpoint_hints, default_scheduler, load_base_pipeline


class SD15Backend(Backend):
    name = "sd15"
    family = "sd15"
    description = "Stable Diffusion 1.5 family (512 px, latent scale 0.18215)"

    def load(self, ref, device, dtype, attention="auto", options=None):
        from diffusers import StableDiffusionPipeline

        pipe, facts = load_base_pipeline(StableDiffusionPipeline, ref, dtype, "SD1.5", device, options)
        pipe.scheduler = default_scheduler(pipe.scheduler.config)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return SD15Model(
            backend=self.name,
            family="sd15",
            ref=ref,
            pipe=pipe,
            device=device,
            dtype=dtype,
            vae_dtype=dtype,
            latent_scale=float(getattr(pipe.vae.config, "scaling_factor", 0.18215)),
            native_size=512,
            default_steps=20,
            default_cfg=7.0,
            official=dict(OFFICIAL_FILES["sd15"]),
            **checkpoint_hints(facts, bool(options and options.quiet)),
            modes=("rgba", "joint", "fg2bg", "bg2fg"),
        )
