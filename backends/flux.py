"""FLUX.1 (dev, schnell and fine-tunes) through diffusers' FluxPipeline components.

Model references: a diffusers folder (model_index.json naming FluxPipeline), a hub id
(`black-forest-labs/FLUX.1-dev`; the Hugging Face cache first, then the network
unless HF_HUB_OFFLINE=1), or a single-file transformer `.safetensors` (BFL or
diffusers key names) with the rest of the pipeline (VAE, CLIP, T5, tokenizers,
scheduler) from LAYERCTL_FLUX_BASE (a folder or hub id; default FLUX.1-schnell when
the file name says "schnell", else FLUX.1-dev).

`FluxModel` is the LoadedModel of this family: prompt encoding (CLIP pooled + T5
sequence), latent packing, position ids, the flow-matching schedule, one transformer
call per step, and the VAE with FLUX's scaling *and shift*. It answers the questions of
layerctl's one sampling loop (`uses_cfg`, `set_schedule`, `predict`: see LoadedModel), so
`gen`, img2img, hires and recipes run FLUX.1 through the same pipelines as SD1.5/SDXL;
what needs a UNet (layer modes, ControlNet, SD LoRA files) gets a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from layerctl.backends.base import Backend, LoadedModel, PromptEmbeds
from layerctl.errors import LayerctlError
from layerctl.core.flux_facts import (
    FLUX_FOLDER_PARTS,
    FLUX_LATENT_CHANNELS,
    FLUX_NATIVE_SIZE,
    FLUX_OFFICIAL_FILES,
    FLUX_VAE_SCALING_FACTOR,
    FLUX_VARIANTS,
)

BASE_ENV = "LAYERCTL_FLUX_BASE"
NO_UNET = (
    "FLUX.1 models have a transformer, not a UNet: this command or option runs on SD1.5/SDXL models only"
)


def flux_mu(image_seq_len: int, config) -> float:
    """The resolution-dependent shift of the flow-matching schedule: a straight line
    through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len
    return image_seq_len * slope + intercept  # diffusers' order of operations (bit-identical sigmas)


@dataclass
class FluxModel(LoadedModel):
    """A FLUX.1-shaped model: CLIP (pooled) + T5 (sequence) text encoders, a transformer on
    packed 2x2 latent patches, a 16-channel VAE with scaling and shift, flow matching.

    Latents: "raw" = VAE space (what vae_encode/vae_decode and the transparent nets use);
    "scaled" = scaling * (raw - shift), [B,16,h,w] (what the transformer works on, after
    pack_latents: [B, h/2*w/2, 64]). `default_cfg` is the distilled guidance (dev 3.5,
    schnell 0: its transformer has no guidance input); FLUX has no true CFG here.
    """

    latent_shift: float = 0.0
    latent_channels: int = FLUX_LATENT_CHANNELS
    max_sequence_length: int = 512
    variant: str = "dev"  # "dev" (guidance-distilled) or "schnell" (no guidance input)
    # per-step inputs that only depend on the size / guidance value, made once (see step_inputs)
    _step_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------ components
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def unet(self):
        raise LayerctlError(NO_UNET)

    # ------------------------------------------------------------ what the sampling loop asks
    @property
    def denoiser_in_channels(self) -> int:
        """The latent width the transformer works on (before packing; no inpainting variant here)."""
        return self.latent_channels

    def uses_cfg(self, cfg: float) -> bool:
        """Never: FLUX.1's guidance is an input of the transformer (distilled), not a negative batch."""
        return False

    def sampler_scheduler(self, sampling):
        """FLUX.1 samples with its own flow-matching Euler scheduler (a fresh copy); the sampler options
        of SD1.5/SDXL are refused before it loads (layerctl.models.kit.precheck_family)."""
        return type(self.scheduler).from_config(self.scheduler.config)

    def set_schedule(self, sched, steps: int, latent_hw: tuple) -> None:
        """Flow-matching sigmas 1 .. 1/steps, shifted by mu for this many image tokens."""
        h, w = latent_hw
        self.set_timesteps(sched, steps, (h // 2) * (w // 2))

    def predict(self, x, t, embeds: PromptEmbeds, cfg: float, more: dict):
        """The flow velocity for unpacked latents x [B,16,h,w]: packed into 2x2 patches, one transformer
        call (cfg = the distilled guidance; ignored by schnell), unpacked again."""
        if more:
            raise LayerctlError("ControlNet and other UNet add-ons do not run on FLUX.1 models")
        h, w = x.shape[-2:]
        ids, guidance = self.step_inputs(h, w, x.dtype, x.shape[0], cfg)
        out = self.transformer_step(self.pack_latents(x), t, embeds, ids, guidance=guidance)
        return self._unpack(out, h, w)

    def step_inputs(self, h: int, w: int, dtype, batch: int, guidance: Optional[float]):
        """(image position ids, guidance input) for a [batch, C, h, w] latent: the same tensors every step
        of a run, so they are made once per size / value and kept (~0.1 ms a step on CPU otherwise)."""
        key = (h, w, dtype, batch, guidance, str(self.device))
        hit = self._step_cache.get(key)
        if hit is None:
            f = self.vae_scale_factor
            hit = (self.image_ids(h * f, w * f, dtype=dtype), self.guidance_input(guidance, batch))
            if len(self._step_cache) >= 16:  # a long session of many sizes: keep it small
                self._step_cache.clear()
            self._step_cache[key] = hit
        return hit

    def sampling_metadata(self, cfg: float) -> dict:
        """FLUX.1's settings in the output metadata: Euler flow matching, no true CFG (scale 1),
        the distilled guidance ("Distilled CFG Scale", as Forge writes it) on dev, no negative prompt."""
        dynamic = bool(getattr(self.scheduler.config, "use_dynamic_shifting", False))
        return {
            "sampler": "euler",
            "sampler_label": "Euler",
            "schedule": "flow_shift" if dynamic else "flow",
            "schedule_label": "Simple",  # Forge's name for FLUX.1's (shifted) flow-matching schedule
            "prediction_type": "flow",
            "zero_snr": None,
            "cfg_rescale": None,
            "cfg": 1.0,
            "guidance": float(cfg) if self.guidance_embeds else None,
            "negative": None,
            "flux_variant": self.variant,
        }

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes a guidance value (dev and its fine-tunes; not schnell)."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def configure_attention(self, attention: str) -> str:
        """FLUX attention runs on torch SDPA (diffusers' default dispatch); returns "sdpa"."""
        if attention == "xformers":
            raise LayerctlError("--attention xformers is not available for FLUX.1 models (they run on torch SDPA)")
        return "sdpa"

    # ------------------------------------------------------------ text
    def encode_prompt(self, prompts, negatives, cfg, width, height, clip_skip=1, min_chunks=1) -> PromptEmbeds:
        """hidden = T5 sequence [B, T, D]; extra = pooled_projections (CLIP pooled [B, P]) and
        txt_ids [T, 3] (zeros). FLUX.1 has no negative-prompt CFG: cfg must be False
        (negatives are then ignored, as for SD without CFG)."""
        import torch

        if cfg:
            raise LayerctlError(
                "FLUX.1 has no classifier-free guidance with a negative prompt: --cfg sets the distilled guidance "
                "(dev), and --negative is not supported"
            )
        if clip_skip != 1:
            raise LayerctlError("--clip-skip applies to SD1.5 and SDXL models; FLUX.1 reads T5 (and CLIP's pooled output only)")
        with torch.no_grad():
            hidden, pooled, txt_ids = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        extra = {"pooled_projections": pooled.to(self.dtype), "txt_ids": txt_ids.to(self.device, self.dtype)}
        return PromptEmbeds(hidden=hidden.to(self.dtype), extra=extra)

    # ------------------------------------------------------------ latent geometry
    def check_size(self, width: int, height: int) -> None:
        m = self.vae_scale_factor * 2
        if width % m or height % m:
            raise LayerctlError(f"FLUX.1 sizes must be multiples of {m} (latent 2x2 patches), got {width}x{height}")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the unpacked latent for an image of height x width pixels."""
        self.check_size(width, height)
        f = self.vae_scale_factor
        return self.latent_channels, height // f, width // f

    @staticmethod
    def pack_latents(latents):
        """[B, C, h, w] -> [B, (h/2)*(w/2), C*4]: each 2x2 patch one token, channel-major
        within the token (c, dy, dx), tokens row by row."""
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent height and width must be even to pack, got {h}x{w}")
        import torch.nn.functional as F

        # pixel_unshuffle puts each 2x2 patch in the channels as (c, dy, dx): the same values as a
        # reshape/permute, moved in one pass (faster on CPU)
        return F.pixel_unshuffle(latents, 2).flatten(2).transpose(1, 2).contiguous()

    def unpack_latents(self, packed, height: int, width: int):
        """The inverse of pack_latents for an image of height x width pixels -> [B, C, h, w]."""
        b, n, d = packed.shape
        _, h, w = self.latent_shape(height, width)
        if n != (h // 2) * (w // 2):
            raise ValueError(f"{n} tokens do not make a {height}x{width} image ({(h // 2) * (w // 2)} expected)")
        return self._unpack(packed, h, w)

    @staticmethod
    def _unpack(packed, h: int, w: int):
        """Packed tokens [B, N, C*4] -> [B, C, h, w] for a latent of h x w (unchecked)."""
        b, _n, d = packed.shape
        x = packed.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, h, w)

    def image_ids(self, height: int, width: int, dtype=None):
        """Position ids of the image tokens [(h/2)*(w/2), 3]: (0, row, column) per token."""
        import torch

        _, h, w = self.latent_shape(height, width)
        rows = torch.arange(h // 2).view(-1, 1).expand(h // 2, w // 2)
        cols = torch.arange(w // 2).view(1, -1).expand(h // 2, w // 2)
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        return ids.to(device=self.device, dtype=dtype or self.dtype)

    # ------------------------------------------------------------ schedule
    def new_scheduler(self):
        """A fresh copy of the model's FlowMatchEulerDiscreteScheduler."""
        sched = self.scheduler
        return type(sched).from_config(sched.config)

    def set_timesteps(self, sched, steps: int, image_seq_len: int, sigmas=None):
        """Set `steps` flow-matching steps on `sched` (linear sigmas 1 .. 1/steps, the
        resolution shift mu when the config asks for dynamic shifting); returns timesteps
        (= sigmas * 1000, what transformer_step takes)."""
        import numpy as np

        if sigmas is None and not getattr(sched.config, "use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = flux_mu(image_seq_len, sched.config)
        if sigmas is not None:
            sched.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        else:
            sched.set_timesteps(steps, device=self.device, mu=mu)
        sched.set_begin_index(0)
        return sched.timesteps

    def guidance_input(self, guidance: Optional[float], batch: int):
        """The transformer's guidance input [batch] (float32), or None when it has none (schnell)."""
        import torch

        if not self.guidance_embeds:
            return None
        value = self.default_cfg if guidance is None else float(guidance)
        return torch.full([1], value, device=self.device, dtype=torch.float32).expand(batch)

    # ------------------------------------------------------------ one step
    def transformer_step(self, latents, t, embeds: PromptEmbeds, img_ids, guidance=None):
        """The transformer's prediction (flow velocity) for packed latents [B, N, 64] at
        scheduler timestep t (0..1000, as in sched.timesteps; passed on as t / 1000).
        `guidance`: the distilled guidance value (None: the default), or already the
        transformer's guidance input (a tensor from guidance_input)."""
        import torch

        b = latents.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor(float(t), device=latents.device)
        timestep = t.expand(b).to(latents.dtype)
        if not torch.is_tensor(guidance):
            guidance = self.guidance_input(guidance, b)
        with torch.no_grad():
            return self.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=embeds.extra["pooled_projections"],
                encoder_hidden_states=embeds.hidden,
                txt_ids=embeds.extra["txt_ids"],
                img_ids=img_ids,
                return_dict=False,
            )[0]

    # ------------------------------------------------------------ VAE (scaling and shift)
    def scale_latents(self, raw):
        """VAE space -> transformer space: scaling * (raw - shift)."""
        return self.latent_scale * (raw - self.latent_shift)

    def unscale_latents(self, scaled):
        """Transformer space -> VAE space: scaled / scaling + shift."""
        return scaled / self.latent_scale + self.latent_shift

    def vae_decode(self, latents_unscaled, clip: bool = True):
        """VAE-space latent [B,16,h,w] -> pixels [B,3,H,W] = decode * 0.5 + 0.5 (float32);
        clip=False keeps the values outside [0,1] (what the FLUX transparent decoder takes)."""
        import torch

        with torch.no_grad():
            out = self.vae.decode(latents_unscaled.to(self.device, self.vae_dtype)).sample.float()
        pixels = out * 0.5 + 0.5
        return pixels.clamp(0, 1) if clip else pixels

    def encode_latents(self, pixels):
        """Pixels [B,3,H,W] in [-1,1] -> transformer-space latent (posterior mean, scaled and shifted)."""
        mean, _std = self.vae_encode(pixels)
        return self.scale_latents(mean)

    def decode_latents(self, latents_scaled, clip: bool = True):
        """Transformer-space latent [B,16,h,w] -> pixels [B,3,H,W] (see vae_decode)."""
        return self.vae_decode(self.unscale_latents(latents_scaled.float()), clip=clip)


def variant_of(transformer) -> str:
    """"dev" when the transformer takes a guidance value, else "schnell"."""
    return "dev" if getattr(transformer.config, "guidance_embeds", False) else "schnell"


def flux_dtype(dtype, device):
    """FLUX runs in bf16 where fp16 is asked (its activations overflow fp16); fp32/bf16 as asked."""
    import torch

    return torch.bfloat16 if dtype == torch.float16 else dtype


def model_from_pipeline(pipe, *, backend: str, ref: str, device, dtype, native_size: int = FLUX_NATIVE_SIZE,
                        default_steps: Optional[int] = None, max_sequence_length: Optional[int] = None,
                        official: Optional[dict] = None, notes: str = "", tiny: bool = False) -> FluxModel:
    """Wrap a FluxPipeline (already on its device) as a FluxModel with the variant's defaults."""
    variant = variant_of(pipe.transformer)
    facts = FLUX_VARIANTS[variant]
    cfg = pipe.vae.config
    return FluxModel(
        backend=backend,
        family="flux",
        ref=ref,
        pipe=pipe,
        device=device,
        dtype=dtype,
        vae_dtype=dtype,
        latent_scale=float(getattr(cfg, "scaling_factor", None) or FLUX_VAE_SCALING_FACTOR),
        native_size=native_size,
        default_steps=default_steps or facts["steps"],
        default_cfg=facts["guidance"],
        official=dict(FLUX_OFFICIAL_FILES) if official is None else official,
        modes=("rgba",),
        notes=notes,
        tiny=tiny,
        latent_shift=float(getattr(cfg, "shift_factor", None) or 0.0),
        latent_channels=int(cfg.latent_channels),
        max_sequence_length=max_sequence_length or facts["max_sequence_length"],
        variant=variant,
    )


# ---------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cannot_load(ref: str, exc: BaseException, base: Optional[str] = None) -> LayerctlError:
    where = f" (rest of the pipeline from {base})" if base else ""
    return LayerctlError(
        f"cannot load FLUX.1 model '{ref}'{where}: {_first_line(exc).rstrip('.')}. Offline? A FLUX.1 model is a diffusers folder "
        f"with {', '.join(FLUX_FOLDER_PARTS)}; download it once with network access (FLUX.1-dev is gated: accept its "
        f"licence on the hub and log in first; it is then taken from the Hugging Face cache), or give a local folder "
        f"with --model. A single-file transformer .safetensors takes the rest from {BASE_ENV} (a folder or hub id)"
    )


def _pretrained(cls, ref: str, **kwargs):
    """from_pretrained from a folder, or a hub id: the cache first, then the network unless offline."""
    if Path(ref).expanduser().is_dir():
        return cls.from_pretrained(str(Path(ref).expanduser()), **kwargs)
    try:
        return cls.from_pretrained(ref, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached: try the network unless offline
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return cls.from_pretrained(ref, **kwargs)


def base_for_single_file(path: Path) -> str:
    """Where the rest of the pipeline comes from for a single-file transformer."""
    env = os.environ.get(BASE_ENV)
    if env:
        return env
    return FLUX_VARIANTS["schnell" if "schnell" in path.name.lower() else "dev"]["hub_id"]


def load_transformer_file(path: Path, base: str, dtype):
    """A FluxTransformer2DModel from one .safetensors (BFL or diffusers names), config from `base`."""
    from diffusers import FluxTransformer2DModel

    local = Path(base).expanduser().is_dir()
    kwargs = dict(config=str(Path(base).expanduser()) if local else base, subfolder="transformer", torch_dtype=dtype)
    try:
        return FluxTransformer2DModel.from_single_file(str(path), local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - config not cached: try the network unless offline
        if local or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return FluxTransformer2DModel.from_single_file(str(path), **kwargs)


def load_flux_pipeline(ref: str, dtype):
    """A diffusers FluxPipeline from a folder, a hub id or a single-file transformer; LayerctlError otherwise."""
    from diffusers import FluxPipeline

    p = Path(ref).expanduser()
    if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise LayerctlError(f"refusing to unpickle {ref}: pickle checkpoints can run code. Convert it to .safetensors first")
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise LayerctlError(f"model file not found: {ref}")
        base = base_for_single_file(p)
        try:
            transformer = load_transformer_file(p, base, dtype)
            return _pretrained(FluxPipeline, base, transformer=transformer, torch_dtype=dtype)
        except LayerctlError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _cannot_load(ref, exc, base) from None
    if p.is_dir() and not (p / "model_index.json").exists():
        raise LayerctlError(f"unknown model reference '{ref}': a folder without model_index.json (not a diffusers model)")
    if not p.is_dir() and p.exists():
        raise LayerctlError(f"unknown model reference '{ref}': not a diffusers folder or a .safetensors file")
    if not p.is_dir() and (ref.count("/") != 1 or ref.startswith((".", "/", "~"))):
        raise LayerctlError(f"unknown model reference '{ref}': give a FLUX.1 diffusers folder, a hub id like "
                            f"'black-forest-labs/FLUX.1-dev', or a transformer .safetensors")
    try:
        return _pretrained(FluxPipeline, ref, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise _cannot_load(ref, exc) from None


def place_pipeline(pipe, device, dtype) -> Any:
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FluxBackend(Backend):
    name = "flux"
    family = "flux"
    description = "FLUX.1 dev / schnell and fine-tunes (1024 px, 16-channel latents, flow matching)"

    def accepts(self, ref):
        return "flux" in str(ref).lower()

    def load(self, ref, device, dtype, attention="auto"):
        dt = flux_dtype(dtype, device)
        pipe = place_pipeline(load_flux_pipeline(ref, dt), device, dt)
        note = "FLUX.1 runs in bf16 where fp16 is asked (fp16 overflows)" if dt != dtype else ""
        return model_from_pipeline(pipe, backend=self.name, ref=ref, device=device, dtype=dt, notes=note)
