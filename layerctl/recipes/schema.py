"""The YAML schema of a recipe: pydantic models of `defaults:`, `jobs:` and each job kind's step.

A gen / decompose step is the CLI's request model (`layerctl.requests`) plus the
recipe-only matrix keys (prompts, prompts_file, images, seeds, seed_range, size).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from layerctl.requests import DecomposeRequest, GenRequest

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _parse_size(v):
    """64 -> (64, 64); '64x128' -> (64, 128); [64, 128] -> (64, 128)."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError("size must be a number, WIDTHxHEIGHT or [W, H]")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", v)
        if not m:
            raise ValueError(f"size must look like 512 or 768x512 (got {v!r})")
        w = int(m.group(1))
        return (w, int(m.group(2)) if m.group(2) else w)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (v[0], v[1])
    raise ValueError(f"size must look like 512, 768x512 or [768, 512] (got {v!r})")


class _MatrixMixin(BaseModel):
    """Recipe-only keys of a gen/decompose step: matrices and the size shorthand."""

    seeds: Optional[list[int]] = None
    seed_range: Optional[tuple[int, int]] = Field(None, description="[first, last], inclusive")
    size: Union[int, str, tuple[int, int], None] = Field(None, description="512, '768x512' or [768, 512]")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v):
        return _parse_size(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is not None and not v:
            raise ValueError("the seed list is empty")
        return v

    @field_validator("seed_range")
    @classmethod
    def _seed_range(cls, v):
        if v is not None and v[0] > v[1]:
            raise ValueError(f"seed_range is [first, last] with first <= last (got {list(v)})")
        return v

    @model_validator(mode="after")
    def _one_seed_source(self):
        given = [k for k in ("seed", "seeds", "seed_range") if getattr(self, k, None) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of seed, seeds, seed_range (got {', '.join(given)})")
        return self


class GenStep(GenRequest, _MatrixMixin):
    """A `gen` job in a recipe: every `layerctl gen` option, plus prompts x seeds matrices."""

    prompts: Optional[list[str]] = None
    prompts_file: Optional[str] = None

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v):
        if v is not None:
            if not v:
                raise ValueError("the prompt list is empty")
            for k, p in enumerate(v):
                if not str(p).strip():
                    raise ValueError(f"prompt {k} is empty")
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self):
        given = [k for k in ("prompt", "prompts", "prompts_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of prompt, prompts, prompts_file (got {', '.join(given)})")
        return self


class DecomposeStep(DecomposeRequest, _MatrixMixin):
    """A `decompose` job in a recipe: every `layerctl decompose` option, plus images x seeds."""

    image: Optional[str] = None  # type: ignore[assignment]  # required unless `images`
    images: Optional[list[str]] = None

    @model_validator(mode="after")
    def _one_image_source(self):
        if self.image is None and not self.images:
            raise ValueError("decompose needs image (or images)")
        if self.image is not None and self.images is not None:
            raise ValueError("give one of image, images")
        return self


class ComposeLayer(BaseModel):
    """One layer of a compose step (bottom -> top)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    name: Optional[str] = None
    at: Optional[tuple[int, int]] = None
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    opacity: float = Field(1.0, ge=0, le=1)
    visible: bool = True


class ComposeStep(BaseModel):
    """A `compose` job: stack layers (files or ${job.role} references) into a PSD or a flat PNG."""

    model_config = ConfigDict(extra="forbid")
    layers: list[Union[str, ComposeLayer]] = Field(min_length=1)
    out: Optional[str] = None
    size: Union[int, str, tuple[int, int], None] = None
    overwrite: bool = False

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v):
        return _parse_size(v)


def _defaults_model():
    """Every gen/decompose option, all optional: what `defaults:` may hold."""
    fields: dict[str, Any] = {}
    for model in (GenStep, DecomposeStep):
        for name, f in model.model_fields.items():
            if name in ("prompts", "prompts_file", "images", "image", "prompt", "fg_prompt", "bg_prompt"):
                continue
            fields.setdefault(name, (Optional[f.annotation], None))
    model = create_model(
        "Defaults",
        __config__=ConfigDict(extra="forbid"),
        __validators__={
            "size_": field_validator("size", mode="before")(lambda cls, v: _parse_size(v)),
            "seeds_": field_validator("seeds")(lambda cls, v: _MatrixMixin._seeds.__func__(cls, v)),
            "seed_range_": field_validator("seed_range")(lambda cls, v: _MatrixMixin._seed_range.__func__(cls, v)),
            "one_seed_": model_validator(mode="after")(lambda self: _MatrixMixin._one_seed_source(self)),
        },
        **fields,
    )
    return model


Defaults = _defaults_model()


class JobItem(BaseModel):
    """One entry of `jobs:`: a name and exactly one of gen / decompose / compose."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    gen: Optional[GenStep] = None
    decompose: Optional[DecomposeStep] = None
    compose: Optional[ComposeStep] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"a job name is letters, digits, _ and - and starts with a letter (got {v!r})")
        return v

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("gen", "decompose", "compose") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a job has exactly one of gen, decompose, compose" + (f" (got {', '.join(kinds)})" if kinds else ""))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("gen", "decompose", "compose") if getattr(self, k) is not None)


class Recipe(BaseModel):
    """A whole recipe file."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    name: Optional[str] = None
    description: Optional[str] = None
    output_dir: Optional[str] = None
    defaults: Defaults = Field(default_factory=Defaults)  # type: ignore[valid-type]
    jobs: list[JobItem] = Field(min_length=1)
