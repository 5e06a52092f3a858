"""Validated requests of `layerctl dataset rgba` and `layerctl dataset layers`."""

from __future__ import annotations

import re
from typing import Literal, Optional
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from layerctl.requests import JobOptions




# ---------------------------------------------------------------- requests


def _size_pair(v):
    """None, N, "N", "WxH", [W, H] -> None or (W, H), each a positive multiple of 64."""
    if v is None:
        return None
    if isinstance(v, int):
        w = h = v
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", v)
        if not m:
            raise ValueError(f"size must be N or WxH (got '{v}')")
        w = int(m.group(1))
        h = int(m.group(2) or m.group(1))
    elif isinstance(v, (list, tuple)) and len(v) == 2:
        w, h = int(v[0]), int(v[1])
    else:
        raise ValueError(f"size must be N or WxH (got {v!r})")
    for name, s in (("width", w), ("height", h)):
        if s <= 0 or s % 64:
            raise ValueError(f"canvas {name} must be a positive multiple of 64 (got {s})")
    return (w, h)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str
    resume: bool = False
    overwrite: bool = False

    @model_validator(mode="after")
    def _resume_xor_overwrite(self):
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        return self


class RgbaDatasetRequest(_Common):
    """`layerctl dataset rgba`: RGBA images -> a checked, de-duplicated, bucketed imagefolder."""

    sources: list[str]
    resolution: int = 1024  # bucket area ~ resolution^2; 0 = keep the size (cropped to multiples of 64)
    fit: Literal["crop", "pad"] = "crop"
    upscale: bool = False
    max_aspect: float = 4.0
    min_size: int = 64  # shorter side in px, before resizing
    min_coverage: float = 0.0
    max_coverage: float = 1.0
    dedup: bool = True
    dedup_distance: int = 12  # of 512 perceptual-hash bits
    captions: Optional[str] = None  # CSV or JSONL: file name -> caption

    @field_validator("sources")
    @classmethod
    def _sources(cls, v):
        if not v:
            raise ValueError("give at least one source (folder, file or glob)")
        return v

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v):
        if v != 0 and (v < 64 or v % 64):
            raise ValueError(f"resolution must be 0 (keep size) or a multiple of 64 (got {v})")
        return v

    @field_validator("min_coverage", "max_coverage")
    @classmethod
    def _cov(cls, v, info):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{info.field_name} must be in [0, 1] (got {v})")
        return v

    @field_validator("max_aspect")
    @classmethod
    def _aspect(cls, v):
        if v < 1.0:
            raise ValueError(f"max_aspect must be >= 1 (got {v})")
        return v

    @field_validator("min_size", "dedup_distance")
    @classmethod
    def _nonneg(cls, v, info):
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0 (got {v})")
        return v

    @model_validator(mode="after")
    def _cov_order(self):
        if self.min_coverage > self.max_coverage:
            raise ValueError(f"min_coverage {self.min_coverage} is above max_coverage {self.max_coverage}")
        return self

    def settings(self) -> dict:
        """What changes the written records (a resumed run must use the same)."""
        return {
            k: getattr(self, k)
            for k in ("resolution", "fit", "upscale", "max_aspect", "min_size", "min_coverage", "max_coverage", "dedup", "dedup_distance")
        }


class LayersDatasetRequest(_Common):
    """`layerctl dataset layers`: foregrounds -> (fg, bg, blended) records by two inpainting passes."""

    rgba_dir: str
    prompts: Optional[str] = None  # JSONL with fg, bg, whole (and optionally file_name, negative, seed)
    prompt_template: str = "{fg} on {bg}"
    backgrounds: list[str] = Field(default_factory=list)
    backgrounds_file: Optional[str] = None
    per_foreground: int = 1
    negative: str = "bad, ugly"
    steps: Optional[int] = None
    cfg: Optional[float] = None
    seed: int = 0
    clip_skip: int = 1  # as gen's --clip-skip (1 = the text encoder's last layer)
    mask_radius: int = 16
    mask_feather: int = 4
    alpha_threshold: float = 1.0 / 255.0
    size: Optional[tuple[int, int]] = None
    model: Optional[str] = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    attention: Literal["auto", "sdpa", "xformers"] = "auto"

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v):
        return _size_pair(v)

    @field_validator("per_foreground")
    @classmethod
    def _per(cls, v):
        if v < 1:
            raise ValueError(f"per_foreground must be >= 1 (got {v})")
        return v

    # the same rule as a gen / decompose job's steps
    _steps = field_validator("steps")(JobOptions._steps.__func__)

    # the same rule as a gen / decompose job's cfg
    _cfg = field_validator("cfg")(JobOptions._cfg.__func__)

    # the same rules as a gen job's clip_skip and negative prompt
    _clip_skip = field_validator("clip_skip")(JobOptions._clip_skip.__func__)
    _negative = field_validator("negative")(JobOptions._negative.__func__)

    @field_validator("mask_radius", "mask_feather")
    @classmethod
    def _radius(cls, v, info):
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0 (got {v})")
        return v

    @field_validator("alpha_threshold")
    @classmethod
    def _thr(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"alpha_threshold must be in (0, 1] (got {v})")
        return v

    def settings(self, model_ref: str) -> dict:
        return {
            "model": model_ref,
            "steps": self.steps,
            "cfg": self.cfg,
            "seed": self.seed,
            "mask_radius": self.mask_radius,
            "mask_feather": self.mask_feather,
            "alpha_threshold": self.alpha_threshold,
            "size": list(self.size) if self.size else None,
            **({"clip_skip": self.clip_skip} if self.clip_skip != 1 else {}),  # runs made before --clip-skip resume
        }


# ---------------------------------------------------------------- small pure functions
