"""YAML recipes: many gen / decompose / compose jobs from one file, checked before anything runs.

    defaults: {model: tiny, width: 64, height: 64, steps: 2}
    output_dir: out/cups
    jobs:
      - name: cups
        gen:
          prompts: [glass cup, paper cup]
          seeds: [1, 2, 3]
          out: "{name}/{prompt_slug}-{seed}.png"
      - name: street
        gen: {fg_prompt: a cat, bg: "${other.blended}"}

Planning (`plan_recipe`) does everything that needs no model: schema
validation with line numbers, matrix expansion (prompts x seeds), output
templates, `${job.role}` references (unknown or cyclic ones are errors), path
checks (outputs stay inside output_dir), input files exist, outputs do not
collide. `run_plan` then runs the jobs on one `api.Session` (the base model is
loaded once; layer weights are merged in and restored between jobs by the
session). Under `accelerate launch`, `shard` splits the jobs between processes
so that jobs connected by references stay on one process.

Paths: inputs (images, prompt files) are relative to the recipe's folder;
`output_dir` is relative to the current folder; output templates are
relative to `output_dir` and may not leave it (unless allow_outside).
"""

from __future__ import annotations

import json
import os
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from layerctl import yamlio
from layerctl.errors import JobFailed, LayerctlError
from layerctl.requests import DecomposeRequest, GenRequest

MAX_JOBS = 100_000
PLACEHOLDERS = ("name", "prompt_slug", "seed", "i")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# ${job.role}, ${job[2].role}, ${job[i].role}  ($${ is a literal "${")
REF_RE = re.compile(r"(?<!\$)\$\{([^}]*)\}")
REF_BODY_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)(?:\[\s*(\d+|i)\s*\])?\.([A-Za-z_]+)\s*$")
OUTPUT_KEYS = ("out", "out_dir", "psd")
MATRIX_KEYS = ("prompts", "prompts_file", "seeds", "seed_range", "images", "size")
# request fields that name input files (checked to exist before a model loads)
INPUT_KEYS = ("fg", "bg", "image", "init", "mask", "control_image")
# request fields that may name local files or hub ids (made recipe-relative when such a file exists)
MAYBE_FILE_KEYS = ("weights_dir", "transparent_decoder", "transparent_encoder", "layer_weights", "lora", "controlnet")
MUST_EXIST = ("weights_dir", "transparent_decoder", "transparent_encoder", "layer_weights", "lora")
ROLE_ALIASES = {"image": "rgba", "png": "rgba"}


# ---------------------------------------------------------------- schema


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


# ---------------------------------------------------------------- plan


@dataclass
class Job:
    """One expanded job, its references resolved, ready to run."""

    index: int  # position in run order
    name: str  # the recipe job's name
    item: int  # index in `jobs:`
    i: int  # index within the item's matrix
    n: int  # size of the item's matrix
    kind: str  # gen / decompose / compose
    mode: str  # rgba / fg2bg / bg2fg / joint / decompose / compose
    request: Any  # GenRequest / DecomposeRequest / ComposeStep (paths resolved)
    outputs: dict  # role -> Path
    inputs: list  # (key, Path) input files read
    deps: set  # indexes of jobs this one needs
    where: str  # file:line of the recipe job
    group: int = -1  # jobs connected by references share a group

    @property
    def label(self) -> str:
        return self.name if self.n == 1 else f"{self.name}[{self.i}]"

    def describe(self) -> dict:
        req = self.request.model_dump(mode="json", exclude_defaults=True)
        return {
            "index": self.index,
            "job": self.label,
            "kind": self.kind,
            "mode": self.mode,
            "seed": getattr(self.request, "seed", None),
            "prompt": _prompt_of(self.request),
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "inputs": [str(p) for _k, p in self.inputs],
            "depends_on": sorted(self.deps),
            "request": req,
        }


@dataclass
class Plan:
    source: str
    base_dir: Path  # the recipe's folder (inputs)
    output_dir: Path
    jobs: list[Job]
    recipe: Any = None


class _Errors:
    """Collects `where: path: message` lines; raises them together."""

    def __init__(self, source: str):
        self.source = source
        self.lines: list[str] = []

    def add(self, where: str, path, msg: str) -> None:
        p = yamlio.format_path(path) if not isinstance(path, str) else path
        self.lines.append(f"{where}: {p + ': ' if p else ''}{msg}")

    def raise_if_any(self) -> None:
        if self.lines:
            lines = list(dict.fromkeys(self.lines))
            n = len(lines)
            head = [f"{self.source}: {n} problems:"] if n > 1 else []
            raise LayerctlError("\n".join(head + lines))


def slugify(text: Optional[str], max_len: int = 40) -> str:
    """'A glass cup, high quality!' -> 'a-glass-cup-high-quality'."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text or "").lower()).strip("-")
    s = s[:max_len].rstrip("-")
    return s or "untitled"


def _prompt_of(req) -> Optional[str]:
    for k in ("prompt", "fg_prompt", "bg_prompt"):
        v = getattr(req, k, None)
        if v:
            return v
    return None


def check_template(tpl: str) -> None:
    """Only {name}, {prompt_slug}, {seed}, {i} (with optional format specs) are allowed. Raises ValueError."""
    try:
        parsed = list(string.Formatter().parse(tpl))
    except ValueError as exc:
        raise ValueError(f"bad output template {tpl!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _lit, fname, spec, conv in parsed:
        if fname is None:
            continue
        if fname not in PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{fname}}} in {tpl!r} (use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
            )
        if spec and "{" in spec:
            raise ValueError(f"nested placeholders are not allowed in {tpl!r}")
        if conv not in (None, "s"):
            raise ValueError(f"conversion !{conv} is not allowed in {tpl!r}")


def render_template(tpl: str, values: dict) -> str:
    check_template(tpl)
    try:
        return tpl.format(**values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot fill output template {tpl!r}: {exc}") from None


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"prompts file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read prompts file {path}: {exc.strerror}") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"the prompt list is empty (no prompts in {path})")
    return prompts


def gen_outputs(req: GenRequest, mode: str) -> dict:
    """role -> path that `api.Session.gen(req)` writes (batch 1)."""
    out: dict = {}
    if mode == "rgba":
        out["rgba"] = Path(req.out)
    else:
        d = Path(req.out_dir)
        made = {"joint": ("fg", "bg", "blended"), "bg2fg": ("fg", "blended"), "fg2bg": ("bg", "blended")}[mode]
        for role in made:
            out[role] = d / getattr(req, f"{role}_name")
    if req.preview:  # api writes NAME.preview.png next to each transparent layer
        for role in [r for r in out if r in ("rgba", "fg")]:
            out[f"{role}_preview"] = out[role].with_name(out[role].stem + ".preview.png")
    if req.psd:
        out["psd"] = Path(req.psd)
    return out


def decompose_outputs(req: DecomposeRequest) -> dict:
    d = Path(req.out_dir)
    out = {}
    if not req.fg:
        out["fg"] = d / req.fg_name
    if not req.bg:
        out["bg"] = d / req.bg_name
    if req.psd:
        out["psd"] = Path(req.psd)
    return out


class _Planner:
    def __init__(self, path, overrides=(), allow_outside=False, force=False, output_dir=None, overwrite=False, text=None):
        self.path = Path(path)
        self.source = str(path)
        self.allow_outside = allow_outside
        self.force = force
        self.overwrite = overwrite
        self.output_dir_arg = output_dir
        self.errors = _Errors(self.source)
        self._prompts_cache: dict[int, list[str]] = {}
        if text is None:
            data, self.loc = yamlio.load_yaml(self.path)
        else:
            data, self.loc = yamlio.loads_yaml(text, self.source)
        if data is None and not list(overrides or ()):
            raise LayerctlError(f"{self.source}: the recipe is empty (it needs at least `jobs:`)")
        data = yamlio.apply_overrides(data, self.loc, overrides)
        if not isinstance(data, dict):
            raise LayerctlError(f"{self.loc.where(())}: a recipe is a mapping with `jobs:` (got {type(data).__name__})")
        if not data.get("jobs") and "jobs" in data and isinstance(data.get("jobs"), (list, type(None))):
            raise LayerctlError(f"{self.loc.where(('jobs',))}: jobs: the job list is empty")
        self.data = data
        self.recipe: Recipe = yamlio.validate(data, Recipe, self.loc, self.source)
        self.base_dir = self.path.parent

    # -- helpers
    def where(self, path) -> str:
        return self.loc.where(path)

    def err(self, path, msg) -> None:
        self.errors.add(self.where(path), path, msg)

    def input_path(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base_dir / p

    def _output_dir(self) -> Path:  # called once, by plan()
        if self.output_dir_arg is not None:
            return Path(os.path.expanduser(str(self.output_dir_arg)))
        od = self.recipe.output_dir
        if od is None:  # out/<recipe name>, made safe as a folder name
            stem = self.path.stem if self.source != "<stdin>" else "recipe"
            return Path("out") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", self.recipe.name or stem).strip(".-") or "recipe")
        p = Path(od)
        from_cli = self.loc.where(("output_dir",)).startswith("--set")
        if not self.allow_outside and not from_cli and (p.is_absolute() or od.startswith("~") or ".." in p.parts):
            self.err(("output_dir",), f"output_dir {od!r} leaves the current folder (use --allow-outside or --output-dir)")
        return p

    def output_path(self, path, tpl: str, values: dict, out_dir: Path) -> Optional[Path]:
        try:
            rendered = render_template(tpl, values)
        except ValueError as exc:
            self.err(path, str(exc))
            return None
        if not rendered.strip():
            self.err(path, f"output template {tpl!r} gives an empty path")
            return None
        if "{" in rendered or "}" in rendered:
            self.err(path, f"output path {rendered!r}: braces are not allowed in file names")
            return None
        rp = Path(rendered)
        if not self.allow_outside:
            if rp.is_absolute() or rendered.startswith("~"):
                self.err(path, f"output path {rendered!r} is absolute; outputs go inside output_dir (or use --allow-outside)")
                return None
            if ".." in rp.parts:
                self.err(path, f"output path {rendered!r} leaves output_dir (no '..'; or use --allow-outside)")
                return None
            full = out_dir / rp
            # the file itself is replaced by os.replace (a link there is replaced, not followed):
            # only its folder has to resolve inside output_dir. Cached: 100,000 jobs share few folders.
            try:
                inside = self._resolved(full.parent).is_relative_to(self._resolved(out_dir))
            except OSError:
                inside = False
            if not inside:
                self.err(path, f"output path {rendered!r} leaves output_dir (through a link?); use --allow-outside")
                return None
            return full
        rp = Path(os.path.expanduser(rendered))
        return rp if rp.is_absolute() else out_dir / rp

    def _resolved(self, p: Path) -> Path:
        cache = self.__dict__.setdefault("_resolve_cache", {})
        if p not in cache:
            cache[p] = p.resolve()
        return cache[p]

    # -- main
    def plan(self) -> Plan:
        recipe = self.recipe
        out_dir = self._output_dir()
        items = recipe.jobs
        names: dict[str, int] = {}
        for k, item in enumerate(items):
            if item.name is None:
                continue
            if item.name in names:
                self.err(("jobs", k, "name"), f"job name {item.name!r} is used twice (first by jobs[{names[item.name]}])")
            names.setdefault(item.name, k)
        self.errors.raise_if_any()
        item_names = []
        for k, item in enumerate(items):  # unnamed jobs: job1, job2, ... (never an explicit name)
            name = item.name
            if name is None:
                name = f"job{k + 1}"
                while name in names:
                    name += "_"
                names[name] = k
            item_names.append(name)

        # 1. expand matrices (count first: refuse huge ones before building them)
        counts = [self._count(k, item) for k, item in enumerate(items)]
        self.errors.raise_if_any()
        total = sum(counts)
        if total > MAX_JOBS and not self.force:
            big = max(range(len(items)), key=lambda k: counts[k])
            raise LayerctlError(
                f"{self.where(('jobs', big))}: the recipe expands to {total:,} jobs (more than {MAX_JOBS:,}; "
                f"jobs[{big}] alone gives {counts[big]:,}); use --force if you mean it"
            )
        raw: list[list[dict]] = []
        for k, item in enumerate(items):
            raw.append(self._expand(k, item, item_names[k], out_dir))
        self.errors.raise_if_any()
        for k, entries in enumerate(raw):
            if not entries:
                self.err(("jobs", k), "the job expands to nothing")
        self.errors.raise_if_any()

        # 2. references: item graph, cycles, order
        item_deps: list[set] = [set() for _ in items]
        for k, entries in enumerate(raw):
            for e in entries:
                for path, value in _strings(e["fields"], ("jobs", k, items[k].kind)):
                    for ref in _find_refs(value):
                        m = REF_BODY_RE.match(ref)
                        if not m:
                            self.err(path, f"bad reference ${{{ref}}} (write ${{job.role}}, e.g. ${{street.blended}})")
                            continue
                        target = m.group(1)
                        if target not in names:
                            hint = _close(target, names)
                            self.err(path, f"unknown job {target!r} in ${{{ref}}}" + (f" (did you mean {hint!r}?)" if hint else ""))
                            continue
                        if names[target] == k:
                            self.err(path, f"job {target!r} refers to its own output in ${{{ref}}}")
                            continue
                        item_deps[k].add(names[target])
        self.errors.raise_if_any()
        order = self._topo(item_deps, item_names)

        # 3. run order, global indexes, resolve references
        jobs: list[Job] = []
        first_index: dict[int, int] = {}
        for k in order:
            first_index[k] = len(jobs)
            for e in raw[k]:
                jobs.append(
                    Job(
                        index=len(jobs), name=item_names[k], item=k, i=e["i"], n=len(raw[k]), kind=items[k].kind,
                        mode=e["mode"], request=None, outputs=e["outputs"], inputs=[], deps=set(),
                        where=self.where(("jobs", k)),
                    )
                )
        by_item = {k: jobs[first_index[k] : first_index[k] + len(raw[k])] for k in order}
        for job in jobs:
            e = raw[job.item][job.i]
            fields = self._resolve(job, e, by_item, names)
            if fields is None:
                continue
            job.request = self._build(job, fields, e)
        self.errors.raise_if_any()

        # 4. files: inputs exist, outputs do not collide
        producers: dict[Path, Job] = {}
        for job in jobs:
            for role, p in job.outputs.items():
                key = _norm(p)
                if key in producers:
                    other = producers[key]
                    self.err(
                        ("jobs", job.item),
                        f"{job.label} and {other.label} both write {p} (add {{i}} or {{seed}} to the output template)",
                    )
                producers[key] = job
        for job in jobs:
            for key, p in job.inputs:
                if _norm(p) in producers:
                    dep = producers[_norm(p)]
                    if dep.index != job.index:
                        job.deps.add(dep.index)
                    continue
                if not p.exists():
                    self.err(("jobs", job.item, job.kind, key), f"input file not found: {p}")
                elif p.is_dir():
                    self.err(("jobs", job.item, job.kind, key), f"input is a folder, not a file: {p}")
        self.errors.raise_if_any()
        for job in jobs:
            bad = [d for d in job.deps if d >= job.index]
            if bad:  # an input path written by a later job without a ${ref}: the order would be wrong
                self.err(
                    ("jobs", job.item),
                    f"{job.label} reads a file that {jobs[bad[0]].label} writes later; refer to it as ${{{jobs[bad[0]].name}.ROLE}}",
                )
        self.errors.raise_if_any()
        _group(jobs)
        return Plan(self.source, self.base_dir, out_dir, jobs, recipe)

    def _count(self, k: int, item: JobItem) -> int:
        step = getattr(item, item.kind)
        if item.kind == "compose":
            return 1
        nseeds = 1
        src = step
        if not ({"seed", "seeds", "seed_range"} & step.model_fields_set):
            src = self.recipe.defaults  # the job takes its seeds from defaults
        if getattr(src, "seeds", None) is not None:
            nseeds = len(src.seeds)
        elif getattr(src, "seed_range", None) is not None:
            nseeds = src.seed_range[1] - src.seed_range[0] + 1
        if item.kind == "gen":
            if step.prompts is not None:
                n = len(step.prompts)
            elif step.prompts_file is not None:
                try:
                    self._prompts_cache[k] = read_prompts_file(self.input_path(step.prompts_file))
                    n = len(self._prompts_cache[k])
                except ValueError as exc:
                    self.err(("jobs", k, "gen", "prompts_file"), str(exc))
                    return 0
            else:
                n = 1
        else:
            n = len(step.images) if step.images is not None else 1
        return n * nseeds

    def _expand(self, k: int, item: JobItem, name: str, out_dir: Path) -> list[dict]:
        kind = item.kind
        jpath = ("jobs", k, kind)
        step = getattr(item, kind)
        if kind == "compose":
            fields = step.model_dump(exclude_unset=True)
            if self.overwrite:
                fields["overwrite"] = True
            tpl = step.out or "{name}.psd"
            values = {"name": name, "prompt_slug": slugify(name), "seed": 0, "i": 0}
            outp = self.output_path(jpath + ("out",) if step.out else jpath, tpl, values, out_dir)
            if outp is None:
                return []
            role = "psd" if outp.suffix.lower() == ".psd" else "out"
            fields["out"] = str(outp)
            return [{"i": 0, "mode": "compose", "fields": fields, "outputs": {role: outp}, "origin": {}}]

        # merge: the job's own keys over `defaults:` (only keys this kind of job has)
        defaults = self.recipe.defaults
        target_model = GenRequest if kind == "gen" else DecomposeRequest
        allowed = set(target_model.model_fields) | {"seeds", "seed_range"}
        origin: dict[str, tuple] = {}
        merged: dict[str, Any] = {}
        own_seed = bool({"seed", "seeds", "seed_range"} & step.model_fields_set)
        for key in sorted(defaults.model_fields_set):
            if key not in allowed or getattr(defaults, key) is None:
                continue
            if own_seed and key in ("seed", "seeds", "seed_range"):
                continue
            if kind == "decompose" and key == "image" and step.images is not None:
                continue
            merged[key] = getattr(defaults, key)
            origin[key] = ("defaults", key)
        for key in step.model_fields_set - {"size"}:
            merged[key] = getattr(step, key)
            origin[key] = jpath + (key,)
        # width/height: the job's own > the job's size > defaults' own > defaults' size
        for idx, side in enumerate(("width", "height")):
            if side in step.model_fields_set:
                continue
            if step.size is not None:
                merged[side], origin[side] = step.size[idx], jpath + ("size",)
            elif side in merged:
                continue
            elif getattr(defaults, "size", None) is not None:
                merged[side], origin[side] = defaults.size[idx], ("defaults", "size")
        if self.overwrite:
            merged["overwrite"] = True

        # matrix axes: prompts (gen) or images (decompose), times seeds
        if kind == "gen":
            if merged.get("prompts") is not None:
                axis = [("prompt", p) for p in merged["prompts"]]
                origin["prompt"] = origin["prompts"]
            elif merged.get("prompts_file") is not None:
                axis = [("prompt", p) for p in self._prompts_cache.get(k, [])]
                origin["prompt"] = origin["prompts_file"]
            else:
                axis = [("prompt", merged.get("prompt"))]
        else:
            if merged.get("images") is not None:
                axis = [("image", p) for p in merged["images"]]
                origin["image"] = origin["images"]
            else:
                axis = [("image", merged.get("image"))]
        if merged.get("seeds") is not None:
            seeds = list(merged["seeds"])
            origin["seed"] = origin["seeds"]
        elif merged.get("seed_range") is not None:
            a, b = merged["seed_range"]
            seeds = list(range(a, b + 1))
            origin["seed"] = origin["seed_range"]
        else:
            # a recipe always renders the same pictures: no seed means seed 0
            seeds = [merged.get("seed") if merged.get("seed") is not None else 0]
        for key in ("prompts", "prompts_file", "images", "seeds", "seed_range"):
            merged.pop(key, None)

        n = len(axis) * len(seeds)
        entries = []
        i = 0
        for akey, aval in axis:
            for seed in seeds:
                fields = dict(merged)
                fields[akey] = aval
                fields["seed"] = seed
                mode = "decompose"
                if kind == "gen":
                    try:
                        mode = GenRequest.mode(_light(GenRequest, fields))
                    except ValueError as exc:
                        self.err(jpath, str(exc))
                        return []
                    slug_src = _prompt_of(_light(GenRequest, fields))
                else:
                    slug_src = fields.get("prompt") or Path(str(fields.get("image") or "image")).stem
                values = {"name": name, "prompt_slug": slugify(slug_src), "seed": seed, "i": i}
                many = "{i:04d}-{prompt_slug}-{seed}"
                if kind == "gen" and mode == "rgba":
                    own_dir_only = origin.get("out_dir", ("defaults",))[0] != "defaults" and origin.get("out", ("defaults",))[0] == "defaults"
                    if fields.get("out") is not None and not own_dir_only:
                        tpl, tpath = fields["out"], origin["out"]
                    elif fields.get("out_dir") is not None:
                        tpl = fields["out_dir"].rstrip("/") + "/" + (many if n > 1 else "{prompt_slug}-{seed}") + ".png"
                        tpath = origin["out_dir"]
                    else:
                        tpl, tpath = ("{name}.png" if n == 1 else "{name}/" + many + ".png"), jpath
                    p = self.output_path(tpath, tpl, values, out_dir)
                    fields["out"] = str(p) if p else None
                    fields.pop("out_dir", None)
                else:
                    if kind == "gen" and fields.get("out") is not None:
                        if origin["out"][0] != "defaults":
                            self.err(origin["out"], f"mode {mode} writes several layers: give out_dir (a folder), not out")
                            return []
                        fields.pop("out")  # a default file template is for the plain (rgba) jobs
                    tpl = fields.get("out_dir") or ("{name}" if n == 1 else "{name}/" + many)
                    p = self.output_path(origin.get("out_dir", jpath), tpl, values, out_dir)
                    fields["out_dir"] = str(p) if p else None
                if p is None:
                    return []
                if fields.get("psd"):
                    p = self.output_path(origin.get("psd", jpath), fields["psd"], values, out_dir)
                    if p is None:
                        return []
                    fields["psd"] = str(p)
                req = _light(target_model, fields)
                outs = gen_outputs(req, mode) if kind == "gen" else decompose_outputs(req)
                entries.append({"i": i, "mode": mode, "fields": fields, "outputs": outs, "origin": origin})
                i += 1
        return entries

    def _topo(self, deps: list[set], names: list[str]) -> list[int]:
        """Items in run order (file order where references allow); cycles are errors."""
        n = len(deps)
        done: list[int] = []
        placed = [False] * n
        while len(done) < n:
            progress = False
            for k in range(n):
                if not placed[k] and all(placed[d] for d in deps[k]):
                    placed[k] = True
                    done.append(k)
                    progress = True
                    break
            if not progress:
                left = [k for k in range(n) if not placed[k]]
                cycle = _find_cycle(deps, left)
                chain = " -> ".join(names[c] for c in cycle + [cycle[0]])
                raise LayerctlError(f"{self.where(('jobs', cycle[0]))}: jobs[{cycle[0]}]: cyclic references: {chain}")
        return done

    def _resolve(self, job: Job, e: dict, by_item: dict, names: dict) -> Optional[dict]:
        """Replace ${job.role} references in every string field; note inputs and dependencies."""
        fields = json.loads(json.dumps(e["fields"], default=str))
        base = ("jobs", job.item, job.kind)
        ok = True

        def sub(value: str, path) -> str:
            nonlocal ok

            def one(m):
                nonlocal ok
                body = REF_BODY_RE.match(m.group(1))
                target, idx, role = body.group(1), body.group(2), body.group(3)
                role = ROLE_ALIASES.get(role, role)
                tjobs = by_item[names[target]]
                if idx is None:
                    if len(tjobs) > 1:
                        self.err(path, f"{target} expands to {len(tjobs)} jobs: say which, e.g. ${{{target}[0].{role}}} or ${{{target}[i].{role}}}")
                        ok = False
                        return m.group(0)
                    tj = tjobs[0]
                elif idx == "i":
                    if job.i >= len(tjobs):
                        self.err(path, f"{job.label}: {target} has no job [{job.i}] (it expands to {len(tjobs)})")
                        ok = False
                        return m.group(0)
                    tj = tjobs[job.i]
                else:
                    if int(idx) >= len(tjobs):
                        self.err(path, f"{target} has no job [{idx}] (it expands to {len(tjobs)})")
                        ok = False
                        return m.group(0)
                    tj = tjobs[int(idx)]
                if role == "out" and len(tj.outputs) == 1:
                    role = next(iter(tj.outputs))
                avail = dict(tj.outputs)
                for given in ("fg", "bg", "image"):  # a given layer (an input) can be referred to as well
                    gv = getattr(tj.request, given, None) if tj.request is not None else None
                    role_of = "blended" if given == "image" else given
                    if gv and role_of not in avail:
                        avail[role_of] = Path(gv)
                if role not in avail:
                    have = ", ".join(sorted(avail))
                    self.err(path, f"{tj.label} has no output {role!r} (it has: {have})")
                    ok = False
                    return m.group(0)
                job.deps.add(tj.index)
                return str(avail[role])

            out = REF_RE.sub(one, value)
            return out.replace("$${", "${")

        def walk(obj, path):
            if isinstance(obj, str):
                return sub(obj, path)
            if isinstance(obj, dict):
                return {kk: walk(v, path + (kk,)) for kk, v in obj.items()}
            if isinstance(obj, list):
                return [walk(v, path + (n,)) for n, v in enumerate(obj)]
            return obj

        skip = {"out", "out_dir", "psd"}  # already rendered output paths
        resolved = {}
        for key, v in fields.items():
            opath = e["origin"].get(key, base + (key,))
            resolved[key] = v if key in skip else walk(v, opath)
        if not ok:
            return None
        # inputs: make recipe-relative, remember them
        for key in INPUT_KEYS:
            if key not in resolved or resolved[key] in (None, [], ""):
                continue
            vals = resolved[key] if isinstance(resolved[key], list) else [resolved[key]]
            from_ref = _has_ref(fields.get(key))
            new = []
            for v in vals:
                p = Path(v) if from_ref else self.input_path(v)
                job.inputs.append((key, p))
                new.append(str(p))
            resolved[key] = new if isinstance(resolved[key], list) else new[0]
        for key in MAYBE_FILE_KEYS:
            if key not in resolved or not resolved[key] or _has_ref(fields.get(key)):
                continue
            vals = resolved[key] if isinstance(resolved[key], list) else [resolved[key]]
            new = []
            for v in vals:
                cand = self.input_path(v)
                given = Path(os.path.expanduser(v))
                use = cand if cand.exists() else given
                if key in MUST_EXIST and not use.exists():
                    opath = e["origin"].get(key, base + (key,))
                    self.err(opath, f"{job.label + ': ' if job.n > 1 else ''}{key}: file not found: {v}"
                             + (f" (looked in {self.base_dir} and the current folder)"
                                if not given.is_absolute() and self.base_dir.resolve() != Path.cwd().resolve() else ""))
                    ok = False
                elif key == "weights_dir" and use.exists() and not use.is_dir():
                    self.err(e["origin"].get(key, base + (key,)), f"weights_dir is a file, not a folder: {v}")
                    ok = False
                new.append(str(use) if use.exists() else v)
            resolved[key] = new if isinstance(resolved[key], list) else new[0]
        if not ok:
            return None
        if job.kind == "compose":
            layers = []
            for n, layer in enumerate(resolved["layers"]):
                spec = {"path": layer} if isinstance(layer, str) else dict(layer)
                raw_layer = fields["layers"][n]
                raw_path = raw_layer if isinstance(raw_layer, str) else raw_layer.get("path")
                p = Path(spec["path"]) if _has_ref(raw_path) else self.input_path(spec["path"])
                spec["path"] = str(p)
                job.inputs.append(("layers", p))
                layers.append(spec)
            resolved["layers"] = layers
        return resolved

    def _build(self, job: Job, fields: dict, e: dict):
        model = {"gen": GenRequest, "decompose": DecomposeRequest, "compose": ComposeStep}[job.kind]
        try:
            req = model.model_validate(fields)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = err.get("loc", ())
                key = loc[0] if loc else None
                path = e["origin"].get(key, ("jobs", job.item, job.kind) + ((key,) if key else ()))
                msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
                self.errors.add(self.where(path), path, f"{job.label}: {msg}" if job.n > 1 else msg)
            return None
        if job.kind == "gen":
            try:
                req.mode()
            except ValueError as exc:
                self.err(("jobs", job.item, "gen"), str(exc))
        return req


_DEFAULTS: dict = {}


def _light(model, fields: dict):
    """A cheap stand-in for model(**fields) before validation (attribute access only).

    pydantic's model_construct costs ~2 ms a call (it inspects default factories), which
    is minutes for a 100,000-job matrix.
    """
    import types

    if model not in _DEFAULTS:
        _DEFAULTS[model] = {n: f.get_default(call_default_factory=True) for n, f in model.model_fields.items()}
    return types.SimpleNamespace(**{**_DEFAULTS[model], **fields})


def _strings(obj, path):
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for n, v in enumerate(obj):
            yield from _strings(v, path + (n,))


def _find_refs(value: str) -> list[str]:
    return [m.group(1) for m in REF_RE.finditer(value)]


def _has_ref(value) -> bool:
    return any(True for _p, s in _strings(value, ()) if REF_RE.search(s))


def _close(word: str, options) -> Optional[str]:
    import difflib

    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return m[0] if m else None


def _find_cycle(deps: list[set], left: list[int]) -> list[int]:
    left_set = set(left)
    start = left[0]
    path = [start]
    seen = {start: 0}
    cur = start
    while True:
        nxt = min(d for d in deps[cur] if d in left_set)
        if nxt in seen:
            return path[seen[nxt]:]
        seen[nxt] = len(path)
        path.append(nxt)
        cur = nxt


def _norm(p: Path) -> str:
    return os.path.normcase(os.path.abspath(p))


def _group(jobs: list[Job]) -> None:
    """Connected components of the reference graph (union-find); group id = smallest index in it."""
    parent = list(range(len(jobs)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for job in jobs:
        for d in job.deps:
            a, b = find(job.index), find(d)
            if a != b:
                parent[max(a, b)] = min(a, b)
    for job in jobs:
        job.group = find(job.index)


def plan_recipe(path, overrides: Iterable[str] = (), allow_outside: bool = False, force: bool = False,
                output_dir=None, overwrite: bool = False, text: Optional[str] = None) -> Plan:
    """Load, validate and expand a recipe. Raises LayerctlError listing every problem with its line."""
    return _Planner(path, overrides, allow_outside, force, output_dir, overwrite, text).plan()


# ---------------------------------------------------------------- sharding


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This process's jobs: whole groups (jobs joined by references), balanced by count, in index order.

    Deterministic: every process computes the same assignment. Groups are
    placed largest first on the least loaded process (ties: the lower rank).
    """
    if world <= 1:
        return list(jobs)
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    load = [0] * world
    owner: dict[int, int] = {}
    for gid in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        r = min(range(world), key=lambda x: (load[x], x))
        owner[gid] = r
        load[r] += len(groups[gid])
    return [job for job in jobs if owner[job.group] == rank]


def owners(jobs: list[Job], world: int) -> dict[int, int]:
    """job index -> process rank (for listings)."""
    out = {}
    for r in range(world):
        for job in shard(jobs, r, world):
            out[job.index] = r
    return out


# ---------------------------------------------------------------- resume


def _meta_mismatch(job: Job, meta: dict) -> Optional[str]:
    """Why an existing output's metadata does not match the job (None when it matches)."""
    if not meta:
        return "it has no layerctl metadata"
    req = job.request
    checks = {
        "prompt": getattr(req, "prompt", None),
        "seed": getattr(req, "seed", None),
        "negative": getattr(req, "negative", None),
        "steps": getattr(req, "steps", None),
        "cfg": getattr(req, "cfg", None),
        "model": getattr(req, "model", None),
        "mode": job.mode if job.kind == "gen" else None,
        "fg_prompt": getattr(req, "fg_prompt", None),
        "bg_prompt": getattr(req, "bg_prompt", None),
        "tta": getattr(req, "tta", None),
    }
    for key, want in checks.items():
        if want is None or key not in meta or meta[key] is None:
            continue
        have = meta[key]
        if isinstance(want, float) or isinstance(have, float):
            try:
                if abs(float(have) - float(want)) <= 1e-9:
                    continue
            except (TypeError, ValueError):
                pass
        if have != want and str(have) != str(want):
            return f"its {key} is {have!r}, the job's is {want!r}"
    lw = getattr(req, "layer_weights", None)
    used = meta.get("layer_weights")
    if lw and isinstance(used, list) and Path(lw).name not in used:
        return f"it was made with layer weights {used}, the job asks for {Path(lw).name}"
    w, h = getattr(req, "width", None), getattr(req, "height", None)
    size = meta.get("size")
    if w and h and isinstance(size, (list, tuple)) and len(size) == 2 and (int(size[0]), int(size[1])) != (w, h):
        return f"its size is {size[0]}x{size[1]}, the job's is {w}x{h}"
    return None


def output_state(job: Job) -> tuple[str, str]:
    """('done'|'partial'|'missing'|'stale', reason) from the files on disk."""
    present = [(r, p) for r, p in job.outputs.items() if p.exists()]
    if not present:
        return "missing", ""
    for role, p in present:
        if p.suffix.lower() != ".png":
            continue
        try:
            from layerctl.imageio import read_metadata

            meta = read_metadata(p)
        except Exception as exc:  # noqa: BLE001 - unreadable counts as not ours
            return "stale", f"{p} cannot be read ({type(exc).__name__})"
        why = _meta_mismatch(job, meta)
        if why:
            return "stale", f"{p} was made by another job: {why}"
    if len(present) < len(job.outputs):
        return "partial", ""
    return "done", ""


# ---------------------------------------------------------------- run


@dataclass
class Result:
    index: int
    job: str
    status: str  # done / skipped / failed / not run
    reason: str = ""
    outputs: dict = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0

    def as_dict(self) -> dict:
        return {
            "index": self.index, "job": self.job, "status": self.status, "reason": self.reason,
            "outputs": {k: str(v) for k, v in self.outputs.items()}, "seconds": round(self.seconds, 3), "process": self.rank,
        }


def preflight(jobs: list[Job], resume: bool) -> dict[int, str]:
    """Decide from the disk what to skip, before any model loads: index -> 'skip' | 'run' | 'rerun'.

    Existing outputs without --resume (and without overwrite) are an error;
    with --resume, outputs made by another job (metadata differs) are an error
    unless the job has overwrite.
    """
    decision: dict[int, str] = {}
    exists, stale = [], []
    rerun_deps: set = set()
    for job in jobs:
        overwrite = bool(getattr(job.request, "overwrite", False))
        state, why = output_state(job)
        upstream_rerun = any(d in rerun_deps for d in job.deps)
        if overwrite:
            decision[job.index] = "run"
        elif not resume:
            if state != "missing":
                exists.append(next(str(p) for p in job.outputs.values() if p.exists()))
            decision[job.index] = "run"
        elif state == "done" and not upstream_rerun:
            decision[job.index] = "skip"
            continue
        elif state == "stale" and not upstream_rerun:
            stale.append(f"{job.label}: {why}")
            decision[job.index] = "run"
        elif state in ("partial", "done", "stale"):
            decision[job.index] = "rerun"  # our own partial outputs, or inputs about to change
        else:
            decision[job.index] = "run"
        rerun_deps.add(job.index)
    if exists:
        more = f" (and {len(exists) - 3} more)" if len(exists) > 3 else ""
        raise LayerctlError(
            f"{len(exists)} output{'s' if len(exists) > 1 else ''} exist already: {', '.join(exists[:3])}{more}; "
            "use --resume to skip finished jobs, or --overwrite"
        )
    if stale:
        more = f" (and {len(stale) - 3} more)" if len(stale) > 3 else ""
        raise LayerctlError(f"cannot resume: {'; '.join(stale[:3])}{more}; use --overwrite to redo them")
    if resume:
        for job in jobs:
            if decision[job.index] != "skip":
                remove_partial_writes(job)
    return decision


def remove_partial_writes(job: Job) -> list[Path]:
    """Delete the hidden temporary files (.NAME.xxxx.png) a killed run may have left for this job's outputs."""
    import glob

    removed = []
    for p in job.outputs.values():
        if not p.parent.is_dir():
            continue
        for t in p.parent.glob(glob.escape(f".{p.name}.") + "*" + glob.escape(p.suffix)):
            try:
                t.unlink()
                removed.append(t)
            except OSError:
                pass
    return removed


def run_plan(
    plan: Plan,
    jobs: list[Job],
    session_factory: Callable[[], Any],
    resume: bool = False,
    continue_on_error: bool = False,
    on_result: Optional[Callable[[Result], None]] = None,
    log: Optional[Callable[[str], None]] = None,
    rank: int = 0,
    decision: Optional[dict] = None,
) -> list[Result]:
    """Run `jobs` (a plan's jobs, or one process's shard) in order. Returns one Result per job."""
    log = log or (lambda s: None)
    decision = decision if decision is not None else preflight(jobs, resume)
    results: list[Result] = []
    failed: dict[int, str] = {}
    session = None
    stop = False
    try:
        for n, job in enumerate(jobs):
            if stop:
                results.append(Result(job.index, job.label, "not run", "an earlier job failed", rank=rank))
                continue
            if decision.get(job.index) == "skip":
                r = Result(job.index, job.label, "skipped", "outputs exist", dict(job.outputs), rank=rank)
                results.append(r)
                if on_result:
                    on_result(r)
                continue
            bad = [d for d in job.deps if d in failed]
            if bad:
                r = Result(job.index, job.label, "failed", f"needs job {bad[0]} which failed", rank=rank)
                failed[job.index] = r.reason
                results.append(r)
                if on_result:
                    on_result(r)
                if not continue_on_error:
                    stop = True
                continue
            log(f"[{n + 1}/{len(jobs)}] {job.label} ({job.mode}{', seed ' + str(job.request.seed) if getattr(job.request, 'seed', None) is not None else ''})")
            req = job.request
            if decision.get(job.index) == "rerun" and hasattr(req, "overwrite"):
                req = req.model_copy(update={"overwrite": True})
            t0 = time.perf_counter()
            try:
                if job.kind == "compose":
                    written = run_compose(req)
                else:
                    if session is None:
                        session = session_factory()
                    records = session.gen(req) if job.kind == "gen" else session.decompose(req)
                    written = _written(records)
                missing = [str(p) for p in job.outputs.values() if not p.exists()]
                if missing:
                    raise JobFailed(f"finished but did not write {', '.join(missing)}")
                r = Result(job.index, job.label, "done", "", written or dict(job.outputs), time.perf_counter() - t0, rank)
            except KeyboardInterrupt:
                raise
            except LayerctlError as exc:
                r = Result(job.index, job.label, "failed", _one_line(str(exc)), seconds=time.perf_counter() - t0, rank=rank)
            except Exception as exc:  # noqa: BLE001 - a job's failure is reported, not a crash
                if os.environ.get("LAYERCTL_DEBUG"):
                    import traceback

                    traceback.print_exc()
                r = Result(job.index, job.label, "failed", _one_line(f"{type(exc).__name__}: {exc}"), seconds=time.perf_counter() - t0, rank=rank)
            if r.status == "failed":
                failed[job.index] = r.reason
                log(f"  failed: {r.reason}")
                if not continue_on_error:
                    stop = True
            results.append(r)
            if on_result:
                on_result(r)
    finally:
        if session is not None and hasattr(session, "close"):
            session.close()
    return results


def _written(records) -> dict:
    """role -> Path from api OutputRecords; a preview is named after the image before it (fg_preview)."""
    out: dict = {}
    last = "out"
    for k, r in enumerate(records or []):
        role = str(getattr(r, "role", f"out{k}"))
        if role == "preview":
            role = f"{last}_preview"
        else:
            last = role
        while role in out:
            role += "_"
        out[role] = Path(r.path)
    return out


def _one_line(s: str) -> str:
    return " ".join(s.split())


def run_compose(req: ComposeStep) -> dict:
    """Stack the layers (bottom -> top) into a PSD (with layers) or a flat PNG."""
    from layerctl import compose as C
    from layerctl.imageio import save_png

    specs = [
        C.LayerSpec(path=Path(l["path"] if isinstance(l, dict) else l.path),
                    name=(l.get("name") if isinstance(l, dict) else l.name),
                    at=(tuple(l["at"]) if isinstance(l, dict) and l.get("at") else (tuple(l.at) if not isinstance(l, dict) and l.at else None)),
                    scale=(l.get("scale", 1.0) if isinstance(l, dict) else l.scale),
                    opacity=(l.get("opacity", 1.0) if isinstance(l, dict) else l.opacity),
                    visible=(l.get("visible", True) if isinstance(l, dict) else l.visible))
        for l in req.layers
    ]
    empty: list = []
    layers, first_canvas, _warnings = C.load_stack(specs, empty=empty)
    if not layers:
        raise LayerctlError("no layers to compose: " + ("; ".join(empty) or "the inputs hold no drawable layers"))
    if req.size is not None:
        size = tuple(req.size)
    elif first_canvas is not None:
        size = tuple(first_canvas)
    else:
        size = (max(l.offset[0] + l.size[0] for l in layers), max(l.offset[1] + l.size[1] for l in layers))
    out = Path(req.out)
    if out.suffix.lower() == ".psd":
        from layerctl import psd as P

        P.write_psd(out, layers, size, overwrite=req.overwrite)
        return {"psd": out}
    save_png(out, C.flatten(layers, size), {"layers": [l.name for l in layers]}, overwrite=req.overwrite)
    return {"out": out}
