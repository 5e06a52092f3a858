"""The one table of LayerDiffuse modes: which frames (layers) each mode denoises, what conditions
it, and which official file carries its weights.

Roles are spelled ``fg``, ``bg`` and ``blended`` everywhere. Every other module reads these
tables; none keeps its own copy. See docs/layer-modes.md for what each mode does.
"""

from __future__ import annotations

ROLES = ("fg", "bg", "blended")
STACK_ORDER = ("bg", "blended", "fg")  # bottom -> top, in PSD files and layer stacks

# SD1.5 attention-sharing layouts: mode -> (frames in the official batch order, the known layer
# fed to the control encoder or None). "rgba" is the one-frame text -> transparent model.
SD15_LAYOUTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "rgba": (("fg",), None),
    "joint": (("fg", "bg", "blended"), None),
    "bg2fg": (("fg", "blended"), "bg"),
    "fg2bg": (("bg", "blended"), "fg"),
}
LAYER_MODES = ("joint", "bg2fg", "fg2bg")  # the multi-layer modes of `gen`
FRAMES = {mode: SD15_LAYOUTS[mode][0] for mode in LAYER_MODES}
SD15_CONTROL = {mode: SD15_LAYOUTS[mode][1] for mode in LAYER_MODES}
# official SD1.5 file kind -> (frame count, takes a control image)
FILE_SPECS = {mode: (len(frames), control is not None) for mode, (frames, control) in SD15_LAYOUTS.items()}
# what each gen layer mode writes (the frames it denoises)
GEN_OUTPUTS = FRAMES

# SDXL: gen mode -> (stage 1 role, stage 2 role); stage 1 makes the blended picture
SDXL_STAGES = {"bg2fg": ("bg2ble", "bgble2fg"), "fg2bg": ("fg2ble", "fgble2bg")}
# SDXL concat layout of each role: which known latents, in order, join the UNet input
SDXL_CONCAT = {"bg2ble": ("bg",), "fg2ble": ("fg",), "bgble2fg": ("bg", "blended"), "fgble2bg": ("fg", "blended")}

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
