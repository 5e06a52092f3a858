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


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model reference, beyond device/dtype/attention (--family, --config, --no-variant)."""

    family: Optional[str] = None  # "sd15" / "sdxl": overrides detection
    config: Optional[str] = None  # a diffusers-layout folder of configs for a single-file checkpoint
    variant: bool = True  # False (--no-variant): the hub's default files even when an fp16 variant exists
    quiet: bool = False

    @classmethod
    def of(cls, opts, quiet: bool = False) -> "LoadOptions":
        """From request options with `family`, `config`, `no_variant` fields (absent ones: the defaults)."""
        return cls(family=getattr(opts, "family", None), config=getattr(opts, "config", None),
                   variant=not getattr(opts, "no_variant", False), quiet=quiet)

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
    refine_strength: float = 0.5  # default strength of a refine at a larger size (upscale, gen --hires)
    notes: str = ""  # e.g. "tiny: random weights, pictures are noise"
    attention: str = "sdpa"  # what the UNet's attention runs on
    tiny: bool = False  # a built-in test model (random weights; layer weights made in memory)
    # what the checkpoint says about itself (single files: a `v_pred` / `ztsnr` key); None = it does not say
    prediction_type: Optional[str] = None  # "v_prediction" or "epsilon"
    zero_terminal_snr: Optional[bool] = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def encode_prompt(self, prompts: list[str], negatives: list[str], cfg: bool, width: int, height: int,
                      clip_skip: int = 1, min_chunks: int = 1) -> PromptEmbeds:
        """Encode a batch of prompts; negatives first when cfg (diffusers order).

        Prompts longer than the text encoder's window are encoded in chunks (A1111's long prompts,
        BREAK starts a chunk: layerctl.core.prompts); every text of the batch gets the same number
        of chunks, at least `min_chunks`. `clip_skip`: 1 = the last layer (A1111's meaning)."""
        raise NotImplementedError

    def prompt_chunks(self, texts) -> int:
        """How many chunks the longest of `texts` needs (1 for a backend without chunking)."""
        return 1

    def notice_cut(self, text: str, chunks: int) -> None:
        """Say once per text that a prompt is longer than the chunks layerctl encodes."""
        from layerctl.core.prompts import MAX_CHUNKS
        from layerctl.progress import log

        told = self.__dict__.setdefault("_told_cut", set())
        if text in told:
            return
        told.add(text)
        log(f"layerctl: a prompt of {len(text)} characters needs {chunks} chunks of tokens; only the first "
            f"{MAX_CHUNKS} chunks are used, the rest is ignored ('{text[:40]}...')", bool(getattr(self, "quiet", False)))

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

    # ------------------------------------------------------------ what the sampling loop asks the model
    # (layerctl.pipelines.sampling.denoise). These are the UNet families' answers; a family with
    # another denoiser (FLUX.1: a transformer on packed latents, flow matching, distilled
    # guidance) overrides them, and the one loop stays the same.

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent (SD1.5/SDXL: 4)."""
        return int(getattr(self.vae.config, "latent_channels", 4))

    @property
    def denoiser_in_channels(self) -> int:
        """Input channels of the denoiser (4: a base UNet, 9: an inpainting UNet)."""
        return int(getattr(self.unet.config, "in_channels", 4))

    def uses_cfg(self, cfg: float) -> bool:
        """Whether `cfg` means classifier-free guidance (a negative batch half) on this model."""
        return cfg > 1.0

    def scale_latents(self, raw):
        """VAE space -> the denoiser's latent space."""
        return raw * self.latent_scale

    def unscale_latents(self, scaled):
        """The denoiser's latent space -> VAE space."""
        return scaled / self.latent_scale

    def sampler_scheduler(self, sampling):
        """A fresh scheduler for `sampling` (a layerctl.core.samplers.Sampling) built from this model's
        scheduler config; the model's own scheduler stays untouched."""
        from layerctl.core.samplers import build_scheduler

        return build_scheduler(sampling, self.scheduler.config)

    def set_schedule(self, sched, steps: int, latent_hw: tuple) -> None:
        """Set `steps` sampling steps on `sched` for latents of height x width `latent_hw`."""
        sched.set_timesteps(steps, device=self.device)

    def predict(self, x, t, embeds: PromptEmbeds, cfg: float, more: dict):
        """The denoiser's output for the (scheduler-scaled) batch x at timestep t."""
        return self.unet(x, t, encoder_hidden_states=embeds.hidden, **embeds.extra, **more).sample

    def sampling_metadata(self, cfg: float) -> dict:
        """Family-specific sampling settings for the output metadata (none for SD1.5/SDXL)."""
        return {}


class Backend:
    """Base class of a backend plugin. Subclasses set the class attributes and implement load()."""

    name: str = ""
    family: str = ""
    description: str = ""

    def accepts(self, ref: str) -> bool:
        """Whether this backend recognises a model reference (for auto-detection)."""
        return False

    def load(self, ref: str, device, dtype, attention: str = "auto", options: Optional[LoadOptions] = None) -> LoadedModel:
        """Load a model. `options` is passed only to backends whose load() takes it (older plugins do not)."""
        raise NotImplementedError


class SD15Model(LoadedModel):
    """An SD1.5-shaped model: one CLIP text encoder, latent scale 0.18215 by default."""

    def _text_pairs(self):
        return [(self.pipe.tokenizer, self.pipe.text_encoder)]

    def prompt_chunks(self, texts) -> int:
        from layerctl.backends.clip_text import chunk_count

        return chunk_count(self._text_pairs(), list(texts))

    def encode_prompt(self, prompts, negatives, cfg, width, height, clip_skip=1, min_chunks=1):
        from layerctl.backends.clip_text import encode_sd15

        texts = (list(negatives) + list(prompts)) if cfg else list(prompts)
        tok, enc = self._text_pairs()[0]
        hidden = encode_sd15(tok, enc, texts, clip_skip, min_chunks, self.device, self.notice_cut)
        return PromptEmbeds(hidden=hidden.to(self.dtype))


class SDXLModel(LoadedModel):
    """An SDXL-shaped model: two text encoders, pooled embeddings and time ids."""

    def _text_pairs(self):
        pipe = self.pipe
        return [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
                if t is not None and e is not None]

    def prompt_chunks(self, texts) -> int:
        from layerctl.backends.clip_text import chunk_count

        return chunk_count(self._text_pairs(), list(texts))

    def encode_prompt(self, prompts, negatives, cfg, width, height, clip_skip=1, min_chunks=1):
        from layerctl.backends.clip_text import encode_sdxl

        pipe = self.pipe
        texts = (list(negatives) + list(prompts)) if cfg else list(prompts)
        hidden, text_embeds = encode_sdxl(self._text_pairs(), texts, clip_skip, min_chunks, self.device, self.notice_cut)
        proj_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else text_embeds.shape[-1]
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=hidden.dtype, text_encoder_projection_dim=proj_dim
        ).to(self.device)
        time_ids = time_ids.repeat(len(texts), 1)
        extra = {"added_cond_kwargs": {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids.to(self.dtype)}}
        return PromptEmbeds(hidden=hidden.to(self.dtype), extra=extra)


def default_scheduler(config: dict | None = None):
    """DPM++ 2M Karras (the official demos' sampler) from a model's scheduler config."""
    from diffusers import DPMSolverMultistepScheduler

    base = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )
    if config:
        base.update({k: v for k, v in dict(config).items() if k in base or k in ("timestep_spacing",)})
    return DPMSolverMultistepScheduler(
        **base, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LayerctlError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LayerctlError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cpu" and dt == torch.float16:
        raise LayerctlError("--dtype fp16 is not supported on the CPU (use fp32 or bf16)")
    return dt


def setup_attention(unet, attention: str, device) -> str:
    """Choose SDPA or xformers for the UNet; returns the name of what is used."""
    import importlib.util

    has_x = importlib.util.find_spec("xformers") is not None
    if attention == "xformers":
        if not has_x:
            raise LayerctlError("--attention xformers: xformers is not installed (pip install 'layerctl[xformers]')")
        if device.type != "cuda":
            raise LayerctlError("--attention xformers needs a CUDA device (its kernels do not run on the CPU)")
    use_x = attention == "xformers" or (attention == "auto" and has_x and device.type == "cuda")
    if use_x:
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:  # noqa: BLE001
            if attention == "xformers":
                raise LayerctlError(f"--attention xformers cannot run here: {exc}") from None
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def diagnose_diffusers_folder(folder) -> str | None:
    """The first missing or broken file of a diffusers folder (model_index.json, each component's
    config and weights), as one phrase; None when nothing obvious is wrong."""
    import json
    from pathlib import Path

    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return f"{index} is missing (not a diffusers folder)"
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{index} is not valid JSON ({exc})"
    if not isinstance(spec, dict):
        return f"{index} is not a JSON object"
    for name, entry in sorted(spec.items()):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            return f"the '{name}' folder is missing ({sub})"
        if name in ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor"):
            continue  # small text files; diffusers/transformers say clearly what is wrong there
        cfg = sub / "config.json"
        if not cfg.is_file():
            return f"{cfg} is missing"
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{cfg} is not valid JSON ({exc})"
        weights = [f for f in sub.iterdir() if f.suffix in (".safetensors", ".bin")]
        if not weights:
            return f"no weights in {sub} (expected a .safetensors or .bin file)"
        for f in weights:
            if f.suffix == ".safetensors" and not _safetensors_ok(f):
                return f"{f} is damaged (not a readable .safetensors file)"
    return None


def _safetensors_ok(path) -> bool:
    """The safetensors header parses and the data it describes is all there."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end <= size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def load_diffusers_pipeline(pipeline_cls, ref: str, dtype, what: str, device=None, options: Optional[LoadOptions] = None):
    """A diffusers pipeline from a folder, a single-file .safetensors, or a hub id (cache first)."""
    return load_base_pipeline(pipeline_cls, ref, dtype, what, device, options)[0]


def load_base_pipeline(pipeline_cls, ref: str, dtype, what: str, device=None, options: Optional[LoadOptions] = None):
    """(pipeline, facts): facts are a single file's CheckpointFacts (None for a folder or hub id)."""
    from pathlib import Path

    options = options or LoadOptions()
    family = "sdxl" if "XL" in pipeline_cls.__name__ else "sd15"
    kwargs = dict(torch_dtype=dtype)
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    p = Path(ref)
    facts = None
    try:
        if p.suffix == ".safetensors":
            from layerctl.backends.single_file import detect_family, load_single_file

            _, facts = detect_family(p, options.family)
            extra = {k: v for k, v in kwargs.items() if k != "torch_dtype"}
            return load_single_file(pipeline_cls, p, dtype, family, facts, options.config, extra), facts
        if p.is_dir():
            return pipeline_cls.from_pretrained(str(p), **kwargs), None
        from layerctl.backends.hub import load_from_hub

        return load_from_hub(pipeline_cls, ref, kwargs, device, options), None
    except LayerctlError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _load_error(exc, ref, p, what) from None


def _load_error(exc, ref, p, what) -> LayerctlError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if p.is_dir():  # a local folder: say what in it is missing or broken, not "offline?"
        problem = diagnose_diffusers_folder(p) or first
        return LayerctlError(f"cannot load {what} model from the folder {ref}: {problem}")
    if p.suffix == ".safetensors" and p.exists():
        return LayerctlError(f"cannot load {what} checkpoint {ref}: the file is damaged or not a checkpoint ({first})")
    return LayerctlError(
        f"cannot load {what} model '{ref}': {first}. Offline? Download it once with network access "
        f"(it is then taken from the Hugging Face cache), or give a local diffusers folder or a "
        f".safetensors checkpoint with --model"
    )


def checkpoint_hints(facts, quiet: bool = False) -> dict:
    """LoadedModel fields from what a single file says about itself, with a notice when it says something."""
    if facts is None:
        return {}
    hints = {"prediction_type": facts.prediction_type, "zero_terminal_snr": True if facts.ztsnr else None}
    said = [w for w, on in (("v-prediction (a 'v_pred' key)", facts.v_pred), ("zero terminal SNR (a 'ztsnr' key)", facts.ztsnr)) if on]
    if said:
        from layerctl.progress import log

        log(f"layerctl: the checkpoint says it was trained for {' and '.join(said)}", quiet)
    return hints
