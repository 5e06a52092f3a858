"""Recipe sections shared by `train-vae` and `train-lora` (YAML → pydantic; unknown keys are errors).

Each trainer's own config class (`VAETrainConfig`, `LoraTrainConfig`) builds on these and sets its own
defaults; what a key means is the same in both.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticOptions(Section):
    """Restrict the procedural source (layerctl.training.synthetic); empty lists mean all."""

    shapes: list[str] = Field(default_factory=list)
    materials: list[str] = Field(default_factory=list)
    colours: list[str] = Field(default_factory=list)
    min_objects: int = 1
    max_objects: int = 3

    @model_validator(mode="after")
    def _check(self):
        from layerctl.training.synthetic import COLOURS, MATERIALS, SHAPES

        for name, given, known in (("shapes", self.shapes, SHAPES), ("materials", self.materials, MATERIALS), ("colours", self.colours, COLOURS)):
            bad = [g for g in given if g not in known]
            if bad:
                raise ValueError(f"unknown {name} {bad}; known: {', '.join(known)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        return self


class ImageDataOptions(Section):
    """What both trainers' `data:` sections share: size, crops, flips, loader workers, the synthetic source."""

    resolution: int = 512
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    workers: int = Field(2, ge=0)
    synthetic: SyntheticOptions = Field(default_factory=SyntheticOptions)

    @field_validator("resolution")
    @classmethod
    def _res(cls, v):
        if v <= 0 or v % 64:
            raise ValueError(f"resolution must be a positive multiple of 64 (got {v})")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _crop(cls, v):
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1 (got {list(v)})")
        return v


class RunOptions(Section):
    """The top-level keys of a training recipe that are about the run, not the model or the data."""

    seed: int = 0
    grad_accum: int = Field(1, gt=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    cpu_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads on the CPU (default: torch's choice)")
    save_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="dtype of the exported weight files (official: fp16)")
    keep_last: int = Field(3, gt=0)
    log_every: int = Field(10, gt=0)
    tensorboard: bool = False

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _mp(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false
