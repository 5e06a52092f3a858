"""Facts about FLUX.1 and its LayerDiffuse port, importable without torch.

The FLUX.1 port of LayerDiffuse (hub repo RedAIGC/Flux-version-LayerDiffuse) ships
two files: `TransparentVAE.pth` (a torch pickle holding the offset encoder and the
transparent decoder as `encoder.*` / `decoder.*`, possibly with the FLUX VAE as
`sd_vae.*`) and `layerlora.safetensors` (a diffusers-format LoRA for the transformer).
See docs/flux.md for how they differ from the SD1.5/SDXL files.
"""

from __future__ import annotations

FLUX_REPO = "RedAIGC/Flux-version-LayerDiffuse"
FLUX_TRANSPARENT_VAE = "TransparentVAE.pth"
FLUX_LAYER_LORA = "layerlora.safetensors"

# role -> official file name, in the shape of layerctl.core.frames.OFFICIAL_FILES: both
# transparent nets come from the one TransparentVAE.pth.
FLUX_OFFICIAL_FILES = {
    "decoder": FLUX_TRANSPARENT_VAE,
    "encoder": FLUX_TRANSPARENT_VAE,
    "rgba": FLUX_LAYER_LORA,
}

# official file name -> hub repo holding it (files not listed here come from
# LayerDiffusion/layerdiffusion-v1)
FLUX_FILE_REPOS = {FLUX_TRANSPARENT_VAE: FLUX_REPO, FLUX_LAYER_LORA: FLUX_REPO}

FLUX_LATENT_CHANNELS = 16
FLUX_VAE_SCALING_FACTOR = 0.3611  # the FLUX.1 VAE's config
FLUX_VAE_SHIFT_FACTOR = 0.1159
FLUX_NATIVE_SIZE = 1024

# Defaults of the official demos / the models' own configs, per variant. "dev" is
# guidance-distilled (the guidance value is an input of the transformer, no true CFG);
# "schnell" is timestep-distilled (no guidance input, 4 steps).
FLUX_VARIANTS = {
    "dev": dict(steps=50, guidance=3.5, max_sequence_length=512, hub_id="black-forest-labs/FLUX.1-dev"),
    "schnell": dict(steps=4, guidance=0.0, max_sequence_length=256, hub_id="black-forest-labs/FLUX.1-schnell"),
}

# The scheduler configs the two hub repos ship (FlowMatchEulerDiscreteScheduler).
FLUX_SCHEDULER_CONFIGS = {
    "dev": dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    ),
    "schnell": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    ),
}

# what a FLUX.1 diffusers folder holds (for the "missing files" message)
FLUX_FOLDER_PARTS = (
    "model_index.json",
    "scheduler/",
    "text_encoder/ (CLIP ViT-L)",
    "text_encoder_2/ (T5-XXL)",
    "tokenizer/",
    "tokenizer_2/",
    "transformer/",
    "vae/",
)


def official_repo_for(filename: str, default: str) -> str:
    """The hub repo an official LayerDiffuse file is downloaded from."""
    return FLUX_FILE_REPOS.get(filename, default)
