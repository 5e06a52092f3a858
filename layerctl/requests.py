"""Validated job descriptions shared by the CLI and YAML recipes.

One schema per job kind, so that a CLI flag and a recipe key never drift
apart: the CLI builds these models from its options, recipes build them from
YAML. Imported lazily (pydantic costs start-up time).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from layerctl.core.geometry import MAX_SIDE
from layerctl.core.samplers import check_pair, check_prediction, check_sampler, check_schedule

MAX_STEPS = 1000  # most sampling steps a job may ask for
MAX_CLIP_SKIP = 48  # above every CLIP text encoder's layer count (CLIP-L 12, OpenCLIP-G 32); the model's own is checked once loaded
SEED_LIMIT = 2**32  # seeds are in [0, 2**32); -1 means "pick a random seed" (as A1111)


def _multiple_of_64(name: str, v: Optional[int]) -> Optional[int]:
    if v is None:
        return v
    if v <= 0 or v % 64:
        raise ValueError(f"{name} must be a positive multiple of 64 (got {v})")
    if v > MAX_SIDE:
        raise ValueError(f"{name} must be at most {MAX_SIDE} (got {v})")
    return v


class ModelOptions(BaseModel):
    """Which model, where its weights are, and how it runs."""

    # allow_inf_nan=False: every float field (and list of floats) refuses nan/inf, in the CLI and in recipes
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Optional[str] = None
    weights_dir: Optional[str] = None
    transparent_decoder: Optional[str] = None
    transparent_encoder: Optional[str] = None
    layer_weights: Optional[str] = None
    lora: list[str] = Field(default_factory=list)
    lora_scale: float = 1.0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    family: Optional[Literal["sd15", "sdxl"]] = None  # overrides what the model reference looks like
    config: Optional[str] = None  # diffusers config folder for a single-file checkpoint
    no_variant: bool = False  # hub downloads: the default files even when running in fp16/bf16
    offload: Literal["none", "model", "sequential"] = "none"  # diffusers' CPU offload (CUDA only)

    @field_validator("config")
    @classmethod
    def _config(cls, v):
        return check_config_folder(v)


def check_config_folder(v: Optional[str]) -> Optional[str]:
    """--config: a diffusers-layout folder (model_index.json inside). A folder that is not here (yet) is
    left to the recipe planner (recipe-relative paths) and to the loader, which both say so before any load."""
    if v is None:
        return v
    from pathlib import Path

    p = Path(v).expanduser()
    if p.exists() and not (p / "model_index.json").is_file():
        raise ValueError(f"config folder {v} has no model_index.json (a diffusers-layout folder of configs is needed)")
    return v


class SamplingOptions(BaseModel):
    """Sampler, schedule type and prediction type (layerctl.core.samplers), shared by every job that
    samples. A1111 names; None = the defaults: DPM++ 2M Karras, the model's own prediction type, and
    with v-prediction zero terminal SNR and CFG rescale 0.7."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sampler: Optional[str] = None
    schedule: Optional[str] = None
    prediction_type: Optional[str] = None  # auto, epsilon or v
    zero_snr: Optional[bool] = None
    cfg_rescale: Optional[float] = None

    _sampler = field_validator("sampler")(classmethod(lambda cls, v: check_sampler(v)))
    _schedule = field_validator("schedule")(classmethod(lambda cls, v: check_schedule(v)))
    _prediction = field_validator("prediction_type")(classmethod(lambda cls, v: check_prediction(v)))

    @field_validator("cfg_rescale")
    @classmethod
    def _cfg_rescale(cls, v):
        if v is not None and not (0.0 <= v <= 1.0):
            raise ValueError(f"cfg_rescale must be in [0, 1] (got {v})")
        return v

    @model_validator(mode="after")
    def _sampling_pair(self):
        check_pair(self.sampler, self.schedule, self.prediction_type, self.zero_snr)
        return self


class JobOptions(ModelOptions, SamplingOptions):
    """What every generating job shares: text, sampling settings, seed, outputs policy."""

    negative: str = "bad, ugly"
    steps: Optional[int] = None
    cfg: Optional[float] = None
    seed: Optional[int] = None
    clip_skip: int = 1  # A1111's meaning: 1 = the text encoder's last layer, 2 = the one before
    tta: bool = True
    overwrite: bool = False

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, v):
        return check_clip_skip(v)

    @field_validator("negative")
    @classmethod
    def _negative(cls, v):
        return check_break_only(v, "negative prompt")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        if v is not None and v <= 0:
            raise ValueError(f"steps must be > 0 (got {v})")
        if v is not None and v > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS} (got {v})")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v == -1:
            return None  # -1 = random, as in A1111: the seed actually used is written to the files
        if v is not None and not (0 <= v < SEED_LIMIT):
            raise ValueError(f"seed must be in [0, 2**32) or -1 for a random one (got {v})")
        return v

    @field_validator("cfg")
    @classmethod
    def _cfg(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"cfg must be >= 0 (got {v})")
        return v


class LayerJob(JobOptions):
    """What `gen` and `decompose` jobs share: the prompts and layer files of the layer modes, the size,
    the PSD, and the conditional model's weight and stop point."""

    prompt: Optional[str] = None
    fg: Optional[str] = None
    bg: Optional[str] = None
    fg_prompt: Optional[str] = None
    bg_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    resize: Literal["crop", "fit", "stretch"] = "crop"
    psd: Optional[str] = None
    fg_name: str = "fg.png"
    bg_name: str = "bg.png"
    blended_name: str = "blended.png"
    weight: float = 1.0  # strength of the SDXL patch file
    stop_at: float = 1.0  # fraction of steps run by the conditional model

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v, info):
        return _multiple_of_64(info.field_name, v)

    @field_validator("prompt", "fg_prompt", "bg_prompt")
    @classmethod
    def _prompts(cls, v, info):
        return check_break_only(v, info.field_name.replace("_", " "))

    @field_validator("stop_at")
    @classmethod
    def _stop_at(cls, v):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"stop_at must be in [0, 1] (got {v})")
        return v


class GenRequest(LayerJob):
    """One `layerctl gen` job (every mode)."""

    out: Optional[str] = None
    out_dir: Optional[str] = None
    batch: int = 1
    preview: bool = False

    # layer modes
    joint: bool = False

    # img2img / inpainting / hires / controlnet
    init: Optional[str] = None
    strength: float = 0.75
    mask: Optional[str] = None
    hires: Optional[float] = None
    hires_strength: Optional[float] = None  # None: the model's refine_strength (toy 0.2, others 0.5)
    controlnet: list[str] = Field(default_factory=list)
    control_image: list[str] = Field(default_factory=list)
    control_scale: list[float] = Field(default_factory=list)

    # set by `gen --prompts-file` (not a recipe key): where this job's images fall among all the
    # images of the command, so {i} counts them all and a plain name gets _0000, _0001, ...
    _first_index: int = PrivateAttr(0)
    _total_images: Optional[int] = PrivateAttr(None)

    @field_validator("batch")
    @classmethod
    def _batch(cls, v):
        if v <= 0:
            raise ValueError(f"batch must be > 0 (got {v})")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v):
        if not (0.0 < v <= 1.0):
            raise ValueError(f"strength must be in (0, 1] (got {v})")
        return v

    @field_validator("hires")
    @classmethod
    def _hires(cls, v):
        if v is not None and v <= 1.0:
            raise ValueError(f"hires factor must be > 1 (got {v})")
        return v

    @field_validator("hires_strength")
    @classmethod
    def _hires_strength(cls, v):
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"hires_strength must be in (0, 1] (got {v})")
        return v

    @model_validator(mode="after")
    def _mode_flags(self):
        if self.seed is not None and self.seed + self.batch - 1 >= SEED_LIMIT:
            raise ValueError(f"seed + batch - 1 must stay below 2**32 (seed {self.seed}, batch {self.batch})")
        # Which mode is asked for is decided in layerctl.pipelines.sampling.gen_mode();
        # here only what no mode can accept.
        if self.fg and self.bg:
            raise ValueError("--fg and --bg cannot both be given to gen (decompose takes one known layer)")
        return self

    def mode(self) -> str:
        """'rgba', 'bg2fg', 'fg2bg' or 'joint' (raises ValueError on mixed-up flags)."""
        if self.joint:
            if self.fg or self.bg:
                raise ValueError("--joint generates every layer; it takes no --fg/--bg")
            if not (self.fg_prompt or self.bg_prompt or self.prompt):
                raise ValueError("--joint needs --fg-prompt, --bg-prompt or a prompt")
            return "joint"
        if self.bg:
            if self.bg_prompt:
                raise ValueError("--bg-prompt makes no sense with --bg (the background is given)")
            if not (self.fg_prompt or self.prompt):
                raise ValueError("--bg needs --fg-prompt (what to draw in front of it)")
            return "bg2fg"
        if self.fg:
            if self.fg_prompt:
                raise ValueError("--fg-prompt makes no sense with --fg (the foreground is given)")
            if not (self.bg_prompt or self.prompt):
                raise ValueError("--fg needs --bg-prompt (what to draw behind it)")
            return "fg2bg"
        if self.fg_prompt:
            raise ValueError("--fg-prompt needs --bg (a given background) or --joint")
        if self.bg_prompt:
            raise ValueError("--bg-prompt needs --fg (a given foreground) or --joint")
        if not self.prompt:
            raise ValueError("a prompt is required")
        return "rgba"


class DecomposeRequest(LayerJob):
    """One `layerctl decompose` job."""

    image: str
    out_dir: str = "."


class UpscaleRequest(JobOptions):
    """One `layerctl upscale` job: resize an RGBA image by `scale` and refine it (img2img)."""

    image: str
    scale: float = 2.0
    prompt: str = ""
    strength: Optional[float] = None  # None: the model's refine_strength (toy 0.2, others 0.5)
    out: Optional[str] = None
    weight: float = 1.0
    preview: bool = False
    resize: Literal["crop", "fit", "stretch"] = "crop"  # for control images
    controlnet: list[str] = Field(default_factory=list)
    control_image: list[str] = Field(default_factory=list)
    control_scale: list[float] = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return check_break_only(v)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v):
        if not (v > 1.0):
            raise ValueError(f"scale must be > 1 (got {v})")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v):
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"strength must be in (0, 1] (got {v})")
        return v


def check_clip_skip(v: int) -> int:
    if not 1 <= v <= MAX_CLIP_SKIP:
        raise ValueError(f"clip_skip must be >= 1 (1 = the last layer, 2 = the one before; got {v})"
                         if v < 1 else f"clip_skip must be at most {MAX_CLIP_SKIP} (got {v})")
    return v


def check_break_only(v: Optional[str], what: str = "prompt") -> Optional[str]:
    """A prompt made only of BREAK keywords is refused (nothing to draw)."""
    from layerctl.core.prompts import only_break

    if only_break(v):
        raise ValueError(f"{what} {v.strip()!r} is only BREAK keywords, nothing to draw (BREAK starts a new 75-token chunk)")
    return v


def validation_message(exc) -> str:
    """One line from a pydantic ValidationError; the field is named once ("width must be ...",
    not "width: width must be ...")."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        field = str(err.get("loc", ("",))[-1]) if err.get("loc") else ""
        if loc and field and (msg.startswith(field + " ") or msg.startswith(field.replace("_", " ") + " ")):
            parts.append(msg if loc == field else f"{loc.rsplit('.', 1)[0]}: {msg}")
        elif loc:
            if err.get("type") == "finite_number":
                msg = f"must be a finite number (got {err.get('input')!r})"
            parts.append(f"{loc}: {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts)
