"""Planning a recipe: everything that needs no model, done before anything runs.

`plan_recipe` validates the YAML (schema errors with line numbers), expands each job
item into jobs (one expander per job kind: prompts x seeds for gen, images x seeds for
decompose, one for compose), fills output templates, puts every output path through
the containment check of `paths.OutputArea`, resolves `${job.role}` references, checks
that inputs exist and that no two jobs write the same file. Every problem found is
reported together, identical ones once (with the number of jobs they concern).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import ValidationError

from layerctl.core.naming import slug
from layerctl.errors import LayerctlError
from layerctl.io import yamlio
from layerctl.io.jsonl import read_text
from layerctl.recipes.graph import (
    REF_BODY_RE, REF_RE, ROLE_ALIASES, close_match, find_refs, group_jobs, has_ref, norm_path, run_order, strings_in,
)
from layerctl.recipes.paths import NAME_KEYS, OutputArea, decompose_outputs, gen_outputs, render_template
from layerctl.recipes.schema import ComposeStep, JobItem, Recipe
from layerctl.requests import DecomposeRequest, GenRequest

MAX_JOBS = 100_000
OUTPUT_KEYS = ("out", "out_dir", "psd")
SEED_KEYS = ("seed", "seeds", "seed_range")
MATRIX_KEYS = ("prompts", "prompts_file", "images", "seeds", "seed_range")
# request fields that name input files (checked to exist before a model loads)
INPUT_KEYS = ("fg", "bg", "image", "init", "mask", "control_image")
# request fields that may name local files or hub ids (made recipe-relative when such a file exists)
MAYBE_FILE_KEYS = ("weights_dir", "transparent_decoder", "transparent_encoder", "layer_weights", "lora", "controlnet", "config")
MUST_EXIST = ("weights_dir", "transparent_decoder", "transparent_encoder", "layer_weights", "lora", "config")
MANY = "{i:04d}-{prompt_slug}-{seed}"  # the file stem of one job of a matrix


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
            "prompt": prompt_of(self.request),
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
    """Collects `where: path: message` lines and raises them together.

    The same problem met by many jobs of a matrix (a bad default over 10,000 jobs) is
    one line: `where: path: message (in 10,000 jobs)`.
    """

    def __init__(self, source: str):
        self.source = source
        self.found: dict[tuple[str, str], list[str]] = {}  # (where: path, message) -> job labels

    def add(self, where: str, path, msg: str, label: Optional[str] = None) -> None:
        p = yamlio.format_path(path) if not isinstance(path, str) else path
        labels = self.found.setdefault((f"{where}: {p + ': ' if p else ''}", msg), [])
        if label is not None and label not in labels:
            labels.append(label)

    @staticmethod
    def _line(head: str, msg: str, labels: list[str]) -> str:
        if len(labels) == 1:
            return f"{head}{labels[0]}: {msg}"
        return head + msg + (f" (in {len(labels):,} jobs)" if labels else "")

    def raise_if_any(self) -> None:
        if self.found:
            lines = [self._line(head, msg, labels) for (head, msg), labels in self.found.items()]
            head = [f"{self.source}: {len(lines)} problems:"] if len(lines) > 1 else []
            raise LayerctlError("\n".join(head + lines))


def prompt_of(req) -> Optional[str]:
    """The prompt a job is known by (prompt, else fg_prompt, else bg_prompt)."""
    for k in ("prompt", "fg_prompt", "bg_prompt"):
        v = getattr(req, k, None)
        if v:
            return v
    return None


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not path.exists():
        raise ValueError(f"prompts file not found: {path}")
    try:
        text = read_text(path, "prompts file")
    except LayerctlError as exc:
        raise ValueError(str(exc)) from None
    prompts = [ln.strip() for ln in text.split("\n")]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"the prompt list is empty (no prompts in {path})")
    return prompts


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
        self.area = OutputArea(Path("out"), allow_outside)

    # -- helpers
    def where(self, path) -> str:
        return self.loc.where(path)

    def err(self, path, msg, label: Optional[str] = None) -> None:
        self.errors.add(self.where(path), path, msg, label)

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

    def output_path(self, path, tpl: str, values: dict) -> Optional[Path]:
        """The rendered output template `tpl`, inside output_dir; None (and an error at `path`) if not."""
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
        full, why = self.area.contain("output path", rendered)
        if full is None:
            self.err(path, why)
        return full

    def _check_names(self, fields: dict, origin: dict, jpath: tuple) -> bool:
        """fg_name / bg_name / blended_name are file names in the job's folder: the same containment check."""
        folder = Path(fields["out_dir"]) if fields.get("out_dir") else self.area.root
        ok = True
        for key in NAME_KEYS:
            value = fields.get(key)
            if value is None:
                continue
            full, why = self.area.contain(key, str(value), folder)
            if full is None:
                self.err(origin.get(key, jpath + (key,)), why)
                ok = False
        return ok

    # -- main
    def plan(self) -> Plan:
        out_dir = self._output_dir()
        self.area = OutputArea(out_dir, self.allow_outside)
        names, item_names = self._job_names()
        raw = self._expand_all(item_names)
        item_deps = self._item_deps(raw, names)
        order = run_order(item_deps, item_names, lambda k: self.where(("jobs", k)))
        jobs = self._make_jobs(order, raw, item_names, names)
        self._check_files(jobs)
        group_jobs(jobs)
        return Plan(self.source, self.base_dir, out_dir, jobs, self.recipe)

    def _job_names(self) -> tuple[dict[str, int], list[str]]:
        """(name -> item, each item's name): duplicates are errors; unnamed jobs are job1, job2, ..."""
        names: dict[str, int] = {}
        for k, item in enumerate(self.recipe.jobs):
            if item.name is None:
                continue
            if item.name in names:
                self.err(("jobs", k, "name"), f"job name {item.name!r} is used twice (first by jobs[{names[item.name]}])")
            names.setdefault(item.name, k)
        self.errors.raise_if_any()
        item_names = []
        for k, item in enumerate(self.recipe.jobs):  # never an explicit name
            name = item.name
            if name is None:
                name = f"job{k + 1}"
                while name in names:
                    name += "_"
                names[name] = k
            item_names.append(name)
        return names, item_names

    def _expand_all(self, item_names: list[str]) -> list[list[dict]]:
        """Each item's expanded entries; a huge matrix is refused before it is built."""
        items = self.recipe.jobs
        counts = [self._count(k, item) for k, item in enumerate(items)]
        self.errors.raise_if_any()
        total = sum(counts)
        if total > MAX_JOBS and not self.force:
            big = max(range(len(items)), key=lambda k: counts[k])
            raise LayerctlError(
                f"{self.where(('jobs', big))}: the recipe expands to {total:,} jobs (more than {MAX_JOBS:,}; "
                f"jobs[{big}] alone gives {counts[big]:,}); use --force if you mean it"
            )
        expanders = {"gen": self._expand_gen, "decompose": self._expand_decompose, "compose": self._expand_compose}
        raw = [expanders[item.kind](k, getattr(item, item.kind), item_names[k]) for k, item in enumerate(items)]
        self.errors.raise_if_any()
        for k, entries in enumerate(raw):
            if not entries:
                self.err(("jobs", k), "the job expands to nothing")
        self.errors.raise_if_any()
        return raw

    def _item_deps(self, raw: list[list[dict]], names: dict[str, int]) -> list[set]:
        """Which items each item refers to with ${job.role} (unknown and self references are errors)."""
        items = self.recipe.jobs
        item_deps: list[set] = [set() for _ in items]
        for k, entries in enumerate(raw):
            for e in entries:
                for path, value in strings_in(e["fields"], ("jobs", k, items[k].kind)):
                    for ref in find_refs(value):
                        m = REF_BODY_RE.match(ref)
                        if not m:
                            self.err(path, f"bad reference ${{{ref}}} (write ${{job.role}}, e.g. ${{street.blended}})")
                            continue
                        target = m.group(1)
                        if target not in names:
                            hint = close_match(target, names)
                            self.err(path, f"unknown job {target!r} in ${{{ref}}}" + (f" (did you mean {hint!r}?)" if hint else ""))
                            continue
                        if names[target] == k:
                            self.err(path, f"job {target!r} refers to its own output in ${{{ref}}}")
                            continue
                        item_deps[k].add(names[target])
        self.errors.raise_if_any()
        return item_deps

    def _make_jobs(self, order: list[int], raw: list[list[dict]], item_names: list[str], names: dict) -> list[Job]:
        """Jobs in run order with global indexes, their references resolved and requests validated."""
        items = self.recipe.jobs
        jobs: list[Job] = []
        by_item: dict[int, list[Job]] = {}
        for k in order:
            first = len(jobs)
            for e in raw[k]:
                jobs.append(Job(
                    index=len(jobs), name=item_names[k], item=k, i=e["i"], n=len(raw[k]), kind=items[k].kind,
                    mode=e["mode"], request=None, outputs=e["outputs"], inputs=[], deps=set(),
                    where=self.where(("jobs", k)),
                ))
            by_item[k] = jobs[first:]
        for job in jobs:
            e = raw[job.item][job.i]
            fields = self._resolve(job, e, by_item, names)
            if fields is not None:
                job.request = self._build(job, fields, e)
        self.errors.raise_if_any()
        return jobs

    def _check_files(self, jobs: list[Job]) -> None:
        """Outputs do not collide; inputs exist or are written by an earlier job."""
        producers: dict[str, Job] = {}
        for job in jobs:
            for p in job.outputs.values():
                key = norm_path(p)
                if key in producers:
                    other = producers[key]
                    self.err(("jobs", job.item), f"{job.label} and {other.label} both write {p} (add {{i}} or {{seed}} to the output template)")
                producers[key] = job
        for job in jobs:
            for key, p in job.inputs:
                if norm_path(p) in producers:
                    dep = producers[norm_path(p)]
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
                later = jobs[bad[0]]
                self.err(("jobs", job.item), f"{job.label} reads a file that {later.label} writes later; refer to it as ${{{later.name}.ROLE}}")
        self.errors.raise_if_any()

    # -- expansion: one expander per job kind
    def _count(self, k: int, item: JobItem) -> int:
        """How many jobs an item expands to (reads its prompts file)."""
        step = getattr(item, item.kind)
        if item.kind == "compose":
            return 1
        src = step if SEED_KEYS_SET & step.model_fields_set else self.recipe.defaults
        nseeds = 1
        if getattr(src, "seeds", None) is not None:
            nseeds = len(src.seeds)
        elif getattr(src, "seed_range", None) is not None:
            nseeds = src.seed_range[1] - src.seed_range[0] + 1
        if item.kind == "decompose":
            return (len(step.images) if step.images is not None else 1) * nseeds
        if step.prompts is not None:
            return len(step.prompts) * nseeds
        if step.prompts_file is not None:
            try:
                self._prompts_cache[k] = read_prompts_file(self.input_path(step.prompts_file))
            except ValueError as exc:
                self.err(("jobs", k, "gen", "prompts_file"), str(exc))
                return 0
            return len(self._prompts_cache[k]) * nseeds
        return nseeds

    def _expand_compose(self, k: int, step: ComposeStep, name: str) -> list[dict]:
        jpath = ("jobs", k, "compose")
        fields = step.model_dump(exclude_unset=True)
        if self.overwrite:
            fields["overwrite"] = True
        values = {"name": name, "prompt_slug": slug(name), "seed": 0, "i": 0}
        outp = self.output_path(jpath + ("out",) if step.out else jpath, step.out or "{name}.psd", values)
        if outp is None:
            return []
        role = "psd" if outp.suffix.lower() == ".psd" else "out"
        fields["out"] = str(outp)
        return [{"i": 0, "mode": "compose", "fields": fields, "outputs": {role: outp}, "origin": {}}]

    def _expand_gen(self, k: int, step, name: str) -> list[dict]:
        """prompts (or prompts_file, or one prompt) x seeds; the output files of each job."""
        jpath = ("jobs", k, "gen")
        merged, origin = self._merge(k, "gen", step, GenRequest)
        if merged.get("prompts") is not None:
            prompts, origin["prompt"] = merged["prompts"], origin["prompts"]
        elif merged.get("prompts_file") is not None:
            prompts, origin["prompt"] = self._prompts_cache.get(k, []), origin["prompts_file"]
        else:
            prompts = [merged.get("prompt")]
        seeds = self._seeds(merged, origin)
        n = len(prompts) * len(seeds)
        entries = []
        for i, (prompt, seed) in enumerate(product(prompts, seeds)):
            fields = {**merged, "prompt": prompt, "seed": seed}
            light = _light(GenRequest, fields)
            try:
                mode = GenRequest.mode(light)
            except ValueError as exc:
                self.err(jpath, str(exc))
                return []
            values = {"name": name, "prompt_slug": slug(prompt_of(light)), "seed": seed, "i": i}
            ok = self._gen_rgba_out(fields, origin, values, n, jpath) if mode == "rgba" else \
                self._layer_dir(fields, origin, values, n, jpath, mode)
            entry = ok and self._entry(i, mode, fields, origin, values, jpath, GenRequest)
            if not entry:
                return []
            entries.append(entry)
        return entries

    def _expand_decompose(self, k: int, step, name: str) -> list[dict]:
        """images (or one image) x seeds; the output files of each job."""
        jpath = ("jobs", k, "decompose")
        merged, origin = self._merge(k, "decompose", step, DecomposeRequest)
        if merged.get("images") is not None:
            images, origin["image"] = merged["images"], origin["images"]
        else:
            images = [merged.get("image")]
        seeds = self._seeds(merged, origin)
        n = len(images) * len(seeds)
        entries = []
        for i, (image, seed) in enumerate(product(images, seeds)):
            fields = {**merged, "image": image, "seed": seed}
            slug_src = fields.get("prompt") or Path(str(image or "image")).stem
            values = {"name": name, "prompt_slug": slug(slug_src), "seed": seed, "i": i}
            entry = self._layer_dir(fields, origin, values, n, jpath, "decompose") and \
                self._entry(i, "decompose", fields, origin, values, jpath, DecomposeRequest)
            if not entry:
                return []
            entries.append(entry)
        return entries

    def _merge(self, k: int, kind: str, step, target_model) -> tuple[dict, dict]:
        """The job's own keys over `defaults:` (only keys this kind of job has), and where each came from."""
        defaults = self.recipe.defaults
        jpath = ("jobs", k, kind)
        allowed = set(target_model.model_fields) | {"seeds", "seed_range"}
        own_seed = bool(SEED_KEYS_SET & step.model_fields_set)
        origin: dict[str, tuple] = {}
        merged: dict[str, Any] = {}
        for key in sorted(defaults.model_fields_set):
            if key not in allowed or getattr(defaults, key) is None:
                continue
            if (own_seed and key in SEED_KEYS) or (kind == "decompose" and key == "image" and step.images is not None):
                continue
            merged[key], origin[key] = getattr(defaults, key), ("defaults", key)
        for key in step.model_fields_set - {"size"}:
            merged[key], origin[key] = getattr(step, key), jpath + (key,)
        # width/height: the job's own > the job's size > defaults' own > defaults' size
        for idx, side in enumerate(("width", "height")):
            if side in step.model_fields_set:
                continue
            if step.size is not None:
                merged[side], origin[side] = step.size[idx], jpath + ("size",)
            elif side not in merged and getattr(defaults, "size", None) is not None:
                merged[side], origin[side] = defaults.size[idx], ("defaults", "size")
        if self.overwrite:
            merged["overwrite"] = True
        return merged, origin

    @staticmethod
    def _seeds(merged: dict, origin: dict) -> list[int]:
        """The seed axis (removes the matrix keys from `merged`); no seed means seed 0: a recipe always
        renders the same pictures."""
        if merged.get("seeds") is not None:
            seeds, origin["seed"] = list(merged["seeds"]), origin["seeds"]
        elif merged.get("seed_range") is not None:
            a, b = merged["seed_range"]
            seeds, origin["seed"] = list(range(a, b + 1)), origin["seed_range"]
        else:
            seeds = [merged.get("seed") if merged.get("seed") is not None else 0]
        for key in MATRIX_KEYS:
            merged.pop(key, None)
        return seeds

    def _gen_rgba_out(self, fields: dict, origin: dict, values: dict, n: int, jpath: tuple) -> bool:
        """A plain (rgba) gen job writes one file: `out`, else a file in `out_dir`, else `{name}...png`."""
        own_dir_only = origin.get("out_dir", ("defaults",))[0] != "defaults" and origin.get("out", ("defaults",))[0] == "defaults"
        if fields.get("out") is not None and not own_dir_only:
            tpl, tpath = fields["out"], origin["out"]
        elif fields.get("out_dir") is not None:
            tpl = fields["out_dir"].rstrip("/") + "/" + (MANY if n > 1 else "{prompt_slug}-{seed}") + ".png"
            tpath = origin["out_dir"]
        else:
            tpl, tpath = ("{name}.png" if n == 1 else "{name}/" + MANY + ".png"), jpath
        p = self.output_path(tpath, tpl, values)
        fields["out"] = str(p) if p else None
        fields.pop("out_dir", None)
        return p is not None

    def _layer_dir(self, fields: dict, origin: dict, values: dict, n: int, jpath: tuple, mode: str) -> bool:
        """A layer job (gen fg2bg/bg2fg/joint, decompose) writes into a folder: `out_dir`, else `{name}...`."""
        if fields.get("out") is not None:  # only gen has `out`
            if origin["out"][0] != "defaults":
                self.err(origin["out"], f"mode {mode} writes several layers: give out_dir (a folder), not out")
                return False
            fields.pop("out")  # a default file template is for the plain (rgba) jobs
        tpl = fields.get("out_dir") or ("{name}" if n == 1 else "{name}/" + MANY)
        p = self.output_path(origin.get("out_dir", jpath), tpl, values)
        fields["out_dir"] = str(p) if p else None
        return p is not None

    def _entry(self, i: int, mode: str, fields: dict, origin: dict, values: dict, jpath: tuple, model) -> Optional[dict]:
        """The PSD path and layer names checked, the output files listed: one expanded job."""
        if fields.get("psd"):
            p = self.output_path(origin.get("psd", jpath), fields["psd"], values)
            if p is None:
                return None
            fields["psd"] = str(p)
        if not self._check_names(fields, origin, jpath):
            return None
        req = _light(model, fields)
        outs = gen_outputs(req, mode) if model is GenRequest else decompose_outputs(req)
        for role, p in outs.items():  # every file, once its folder is known (an out_dir may be a link)
            if not self.area.inside(p):
                key = {"psd": "psd", "rgba": "out"}.get(role, "out_dir")
                self.err(origin.get(key, jpath), f"{role} output {str(p)!r} leaves output_dir (through a link?); use --allow-outside")
                return None
        return {"i": i, "mode": mode, "fields": fields, "outputs": outs, "origin": origin}

    # -- references and files
    def _resolve(self, job: Job, e: dict, by_item: dict, names: dict) -> Optional[dict]:
        """Replace ${job.role} references in every string field; note inputs and dependencies."""
        fields = json.loads(json.dumps(e["fields"], default=str))
        base = ("jobs", job.item, job.kind)
        refs = _References(self, job, by_item, names)
        resolved = {}
        for key, v in fields.items():  # output paths are rendered already
            resolved[key] = v if key in OUTPUT_KEYS else refs.walk(v, e["origin"].get(key, base + (key,)))
        if not refs.ok:
            return None
        self._note_inputs(job, resolved, fields)
        if not self._model_files(job, resolved, fields, e["origin"]):
            return None
        if job.kind == "compose":
            resolved["layers"] = self._compose_layers(job, resolved, fields)
        return resolved

    def _note_inputs(self, job: Job, resolved: dict, fields: dict) -> None:
        """Input files: made recipe-relative (unless they come from a reference) and remembered."""
        for key in INPUT_KEYS:
            if key not in resolved or resolved[key] in (None, [], ""):
                continue
            vals = resolved[key] if isinstance(resolved[key], list) else [resolved[key]]
            from_ref = has_ref(fields.get(key))
            new = []
            for v in vals:
                p = Path(v) if from_ref else self.input_path(v)
                job.inputs.append((key, p))
                new.append(str(p))
            resolved[key] = new if isinstance(resolved[key], list) else new[0]

    def _model_files(self, job: Job, resolved: dict, fields: dict, origin: dict) -> bool:
        """Weights and LoRA files: recipe-relative when such a file exists; the must-exist ones checked."""
        base = ("jobs", job.item, job.kind)
        ok = True
        for key in MAYBE_FILE_KEYS:
            if key not in resolved or not resolved[key] or has_ref(fields.get(key)):
                continue
            vals = resolved[key] if isinstance(resolved[key], list) else [resolved[key]]
            new = []
            for v in vals:
                cand = self.input_path(v)
                given = Path(os.path.expanduser(v))
                use = cand if cand.exists() else given
                if key in MUST_EXIST and not use.exists():
                    looked = (f" (looked in {self.base_dir} and the current folder)"
                              if not given.is_absolute() and self.base_dir.resolve() != Path.cwd().resolve() else "")
                    self.err(origin.get(key, base + (key,)), f"{key}: file not found: {v}{looked}",
                             job.label if job.n > 1 else None)
                    ok = False
                elif key == "weights_dir" and use.exists() and not use.is_dir():
                    self.err(origin.get(key, base + (key,)), f"weights_dir is a file, not a folder: {v}")
                    ok = False
                new.append(str(use) if use.exists() else v)
            resolved[key] = new if isinstance(resolved[key], list) else new[0]
        return ok

    def _compose_layers(self, job: Job, resolved: dict, fields: dict) -> list[dict]:
        layers = []
        for n, layer in enumerate(resolved["layers"]):
            spec = {"path": layer} if isinstance(layer, str) else dict(layer)
            raw_layer = fields["layers"][n]
            raw_path = raw_layer if isinstance(raw_layer, str) else raw_layer.get("path")
            p = Path(spec["path"]) if has_ref(raw_path) else self.input_path(spec["path"])
            spec["path"] = str(p)
            job.inputs.append(("layers", p))
            layers.append(spec)
        return layers

    def _build(self, job: Job, fields: dict, e: dict):
        model = {"gen": GenRequest, "decompose": DecomposeRequest, "compose": ComposeStep}[job.kind]
        label = job.label if job.n > 1 else None
        try:
            req = model.model_validate(fields)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = err.get("loc", ())
                key = loc[0] if loc else None
                path = e["origin"].get(key, ("jobs", job.item, job.kind) + ((key,) if key else ()))
                self.err(path, str(err.get("msg", "invalid")).removeprefix("Value error, "), label)
            return None
        if job.kind == "gen":
            try:
                req.mode()
            except ValueError as exc:
                self.err(("jobs", job.item, "gen"), str(exc))
        return req


SEED_KEYS_SET = frozenset(SEED_KEYS)


class _References:
    """Substitutes ${job.role} in one job's fields with the referred job's output path."""

    def __init__(self, planner: _Planner, job: Job, by_item: dict, names: dict):
        self.planner, self.job, self.by_item, self.names = planner, job, by_item, names
        self.ok = True

    def walk(self, obj, path):
        if isinstance(obj, str):
            return REF_RE.sub(lambda m: self._one(m, path), obj).replace("$${", "${")
        if isinstance(obj, dict):
            return {kk: self.walk(v, path + (kk,)) for kk, v in obj.items()}
        if isinstance(obj, list):
            return [self.walk(v, path + (n,)) for n, v in enumerate(obj)]
        return obj

    def _fail(self, path, msg: str, m) -> str:
        self.planner.err(path, msg)
        self.ok = False
        return m.group(0)

    def _one(self, m, path) -> str:
        body = REF_BODY_RE.match(m.group(1))
        target, idx, role = body.group(1), body.group(2), body.group(3)
        role = ROLE_ALIASES.get(role, role)
        tjobs = self.by_item[self.names[target]]
        job = self.job
        if idx is None:
            if len(tjobs) > 1:
                return self._fail(path, f"{target} expands to {len(tjobs)} jobs: say which, e.g. ${{{target}[0].{role}}} or ${{{target}[i].{role}}}", m)
            tj = tjobs[0]
        else:
            at = job.i if idx == "i" else int(idx)
            if at >= len(tjobs):
                who = f"{job.label}: {target} has no job [{job.i}]" if idx == "i" else f"{target} has no job [{idx}]"
                return self._fail(path, f"{who} (it expands to {len(tjobs)})", m)
            tj = tjobs[at]
        if role == "out" and len(tj.outputs) == 1:
            role = next(iter(tj.outputs))
        avail = dict(tj.outputs)
        for given in ("fg", "bg", "image"):  # a given layer (an input) can be referred to as well
            gv = getattr(tj.request, given, None) if tj.request is not None else None
            role_of = "blended" if given == "image" else given
            if gv and role_of not in avail:
                avail[role_of] = Path(gv)
        if role not in avail:
            return self._fail(path, f"{tj.label} has no output {role!r} (it has: {', '.join(sorted(avail))})", m)
        job.deps.add(tj.index)
        return str(avail[role])


def plan_recipe(path, overrides: Iterable[str] = (), allow_outside: bool = False, force: bool = False,
                output_dir=None, overwrite: bool = False, text: Optional[str] = None) -> Plan:
    """Load, validate and expand a recipe. Raises LayerctlError listing every problem with its line."""
    return _Planner(path, overrides, allow_outside, force, output_dir, overwrite, text).plan()
