"""`layerctl dataset layers`: (fg, bg, blended) records built by two inpainting passes, and their reader."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
import numpy as np
from layerctl import __version__
from layerctl.core.naming import slug
from layerctl.errors import LayerctlError
from layerctl.io.jsonl import iter_rows
from layerctl.core.imagemath import flatten_on_grey, to_uint8

from layerctl.dataset.layout import CAPTION_KEYS, FILE_KEYS, IMAGE_EXTS, LAYER_DIRS, METADATA
from layerctl.dataset.requests import LayersDatasetRequest
from layerctl.dataset.images import _json_hash, composite_rgb, dilate, feather_inside, place_on_canvas, sha16
from layerctl.dataset.state import DatasetSummary, Event, Shard, _append_line, _earlier_runs, _noop, _prepare, _state, _summarize, _write_jsonl, check_out_dir, latest_by_key, read_parts
from layerctl.dataset.rgba import Source, _walk_images, caption_for


@dataclass
class Foreground:
    path: Path
    rel: str  # path relative to the RGBA folder (posix): the key prompts refer to
    caption: str


def find_foregrounds(rgba_dir: str, exclude: Optional[Path] = None) -> list[Foreground]:
    """The foregrounds of a folder: its metadata.jsonl (an rgba dataset) or every image below it.

    `exclude`: a folder not to search (the output folder, when it lies inside).
    """
    root = Path(rgba_dir).expanduser()
    if not root.is_dir():
        raise LayerctlError(f"RGBA folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    meta = root / METADATA
    fgs: list[Foreground] = []
    if meta.is_file():
        for i, row in iter_rows(meta, hint="a \"file_name\" string"):
            if not isinstance(row.get("file_name"), str):
                raise LayerctlError(f"{meta}:{i}: each line needs a \"file_name\" string")
            p = root / row["file_name"]
            if not p.is_file():
                raise LayerctlError(f"{meta}:{i}: {row['file_name']} is listed but missing")
            cap = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), "")
            fgs.append(Foreground(p, Path(row["file_name"]).as_posix(), cap or _stem_caption(p)))
    else:
        excl = exclude.resolve() if exclude is not None else None
        for p in _walk_images(root, excl):
            if excl is not None and (p.resolve() == excl or excl in p.resolve().parents):
                continue
            src = Source(p, root)
            fgs.append(Foreground(p, p.relative_to(root).as_posix(), caption_for(src, None) or _stem_caption(p)))
    if not fgs:
        raise LayerctlError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTS)})")
    return fgs


def _stem_caption(p: Path) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", p.stem).split()) or "object"


PROMPT_KEYS = ("fg", "bg", "whole")


def read_prompt_records(path: str) -> list[dict]:
    """JSONL prompt records: fg, bg, whole (strings); optional file_name, negative, seed. Errors name the line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerctlError(f"prompts file not found: {p}")
    out = []
    for i, row in iter_rows(p, "prompts file", ", ".join(PROMPT_KEYS)):
        missing = [k for k in PROMPT_KEYS if k not in row]
        if missing:
            raise LayerctlError(f"{p}:{i}: missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)} (each line needs fg, bg, whole)")
        for k in PROMPT_KEYS + ("negative",):
            if k in row and not isinstance(row[k], str):
                raise LayerctlError(f"{p}:{i}: {k!r} must be a string")
        if not row["whole"].strip():
            raise LayerctlError(f"{p}:{i}: 'whole' is empty")
        fkey = next((k for k in FILE_KEYS if k in row), None)
        if fkey is not None and not isinstance(row[fkey], str):
            raise LayerctlError(f"{p}:{i}: {fkey!r} must be a string")
        if "seed" in row and (not isinstance(row["seed"], int) or isinstance(row["seed"], bool) or row["seed"] < 0):
            raise LayerctlError(f"{p}:{i}: 'seed' must be a non-negative integer")
        rec = {"fg": row["fg"], "bg": row["bg"], "whole": row["whole"], "line": i}
        if fkey is not None:
            rec["file_name"] = row[fkey]
        for k in ("negative", "seed"):
            if k in row:
                rec[k] = row[k]
        out.append(rec)
    if not out:
        raise LayerctlError(f"no prompt records in {p}")
    return out


def read_backgrounds(items: list[str], path: Optional[str]) -> list[str]:
    bgs = [b.strip() for b in items if b and b.strip()]
    if path:
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise LayerctlError(f"cannot read backgrounds file {p}: {exc.strerror}") from None
        bgs += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return bgs


def check_template(tpl: str) -> None:
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(tpl) if f is not None}
    except ValueError as exc:
        raise LayerctlError(f"bad --prompt-template '{tpl}': {exc}") from None
    bad = sorted(f for f in fields if f not in ("fg", "bg"))
    if bad:
        raise LayerctlError(f"bad --prompt-template '{tpl}': unknown field {{{bad[0]}}} (fields: {{fg}}, {{bg}})")


@dataclass
class RecordJob:
    index: int
    fg: Foreground
    k: int  # variant number for this foreground
    fg_prompt: str
    bg_prompt: str
    prompt: str
    negative: str
    seed: Optional[int] = None  # explicit seed from the prompts file

    @property
    def key(self) -> str:
        return f"{self.fg.rel}#{self.k}"


def plan_layer_jobs(req: LayersDatasetRequest, fgs: list[Foreground]) -> tuple[list[RecordJob], list[str]]:
    """(jobs, foregrounds without prompts) from a prompts file or the template + backgrounds."""
    jobs: list[RecordJob] = []
    unprompted: list[str] = []
    if req.prompts:
        recs = read_prompt_records(req.prompts)
        named = [r for r in recs if "file_name" in r]
        if named and len(named) != len(recs):
            first = next(r for r in recs if "file_name" not in r)
            raise LayerctlError(f"{req.prompts}:{first['line']}: no \"file_name\" (give it on every line or on none)")
        if named:
            by_rel = {f.rel: f for f in fgs}
            by_name: dict[str, list[Foreground]] = {}
            for f in fgs:
                by_name.setdefault(f.path.name, []).append(f)
            counts: Counter = Counter()
            for r in recs:
                fg = by_rel.get(Path(r["file_name"]).as_posix())
                if fg is None and len(by_name.get(Path(r["file_name"]).name, [])) == 1:
                    fg = by_name[Path(r["file_name"]).name][0]
                if fg is None:
                    raise LayerctlError(f"{req.prompts}:{r['line']}: {r['file_name']} is not a foreground in {req.rgba_dir}")
                jobs.append(_job(len(jobs), fg, counts[fg.rel], r, req))
                counts[fg.rel] += 1
            unprompted = [f.rel for f in fgs if counts[f.rel] == 0]
        else:
            if len(recs) != len(fgs):
                raise LayerctlError(
                    f"{req.prompts} has {len(recs)} record(s) but {req.rgba_dir} has {len(fgs)} foreground(s); "
                    "give one line per foreground in order, or a \"file_name\" on each line"
                )
            for fg, r in zip(fgs, recs):
                jobs.append(_job(len(jobs), fg, 0, r, req))
        return jobs, unprompted
    check_template(req.prompt_template)
    bgs = read_backgrounds(req.backgrounds, req.backgrounds_file)
    if not bgs:
        raise LayerctlError("no prompts: give --prompts PROMPTS.jsonl, or backgrounds (--bg / --backgrounds FILE) for --prompt-template")
    n = 0
    for fg in fgs:
        for k in range(req.per_foreground):
            bg = bgs[n % len(bgs)]
            whole = req.prompt_template.format(fg=fg.caption, bg=bg)
            jobs.append(RecordJob(len(jobs), fg, k, fg.caption, bg, whole, req.negative))
            n += 1
    return jobs, unprompted


def _job(index: int, fg: Foreground, k: int, r: dict, req: LayersDatasetRequest) -> RecordJob:
    return RecordJob(index, fg, k, r["fg"], r["bg"], r["whole"], r.get("negative", req.negative), r.get("seed"))


# ---------------------------------------------------------------- layers: reading a dataset back

LAYER_KEYS = ("id", "fg", "bg", "blended", "fg_prompt", "bg_prompt", "prompt")


@dataclass
class LayerRecord:
    """One record of a layers dataset, paths resolved against the dataset folder."""

    id: str
    fg: Path  # RGBA, straight alpha
    bg: Path  # RGB
    blended: Path  # RGB = fg over bg
    fg_prompt: str
    bg_prompt: str
    prompt: str
    meta: dict  # the whole metadata.jsonl object (seed, size, stages, ...)


def read_layer_records(root: str | os.PathLike, check_files: bool = True) -> list[LayerRecord]:
    """The records of a folder written by `layerctl dataset layers` (what train-lora mode: layers reads).

    Raises LayerctlError naming the file and line for a missing metadata.jsonl,
    a broken line, a missing key or (with check_files) a missing image.
    """
    root = Path(root).expanduser()
    meta = root / METADATA
    if not root.is_dir():
        raise LayerctlError(f"layers dataset folder not found: {root}")
    if not meta.is_file():
        raise LayerctlError(f"{root} is not a layers dataset: no {METADATA} (make one with 'layerctl dataset layers')")
    out = []
    for i, row in iter_rows(meta):
        missing = [k for k in LAYER_KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise LayerctlError(f"{meta}:{i}: missing {', '.join(missing)} (not a 'layerctl dataset layers' record)")
        paths = {k: root / row[k] for k in ("fg", "bg", "blended")}
        if check_files:
            for k, p in paths.items():
                if not p.is_file():
                    raise LayerctlError(f"{meta}:{i}: {k} file {row[k]} is missing")
        out.append(LayerRecord(row["id"], paths["fg"], paths["bg"], paths["blended"], row["fg_prompt"],
                               row["bg_prompt"], row["prompt"], row))
    if not out:
        raise LayerctlError(f"{meta} holds no records")
    return out


# ---------------------------------------------------------------- layers: the construction


def make_layer_record(model, rgba: np.ndarray, prompt: str, bg_prompt: str, negative: str, seed: int,
                      steps: Optional[int] = None, cfg: Optional[float] = None, mask_radius: int = 16,
                      alpha_threshold: float = 1.0 / 255.0, mask_feather: int = 4, progress=None,
                      clip_skip: int = 1, sampling=None) -> dict:
    """The three stages for one foreground already on its canvas (HxWx4 uint8, sides multiples of 64).

    1. inpaint around the foreground (mask = 1 - alpha) with the whole prompt,
       seed `seed`: the intermediate is `fg over` that picture;
    2. inpaint the foreground's area of the intermediate (mask = alpha >=
       threshold, dilated by mask_radius px) with the background prompt, seed
       `seed + 1`; the result is blended back with the known pixels by a weight
       that is 0 outside the mask and ramps to 1 over `mask_feather` px inside it
       (at most mask_radius, so no foreground pixel is blended back): the clean
       background, equal to the intermediate outside the mask;
    3. blended = fg over bg.
    Returns uint8 arrays: fg, intermediate, mask (the blend weight * 255), bg,
    blended, and a 'stages' list.
    """
    from layerctl.pipelines.inpaint import inpaint

    fg8 = np.ascontiguousarray(rgba, dtype=np.uint8)
    fgf = fg8.astype(np.float32) / 255.0
    a = fgf[..., 3]
    canvas = flatten_on_grey(fgf)
    r1 = inpaint(model, canvas, 1.0 - a, prompt, negative, steps, cfg, seed, paste_back=False, progress=progress,
                 clip_skip=clip_skip, sampling=sampling)
    inter8 = to_uint8(composite_rgb(fgf, r1.image))
    fg_mask = a >= alpha_threshold - 1e-6
    m2 = dilate(fg_mask, mask_radius)
    feather = max(0, min(int(mask_feather), int(mask_radius)))
    w2 = feather_inside(m2, feather)
    r2 = inpaint(model, inter8, w2, bg_prompt, negative, steps, cfg, seed + 1, paste_back=True, progress=progress,
                 clip_skip=clip_skip, sampling=sampling)
    bg8 = to_uint8(r2.image)
    blended8 = to_uint8(composite_rgb(fgf, bg8.astype(np.float32) / 255.0))
    stages = [
        {"stage": "background", "prompt": prompt, "seed": int(seed), "mask": "outside the foreground (1 - alpha)",
         "method": r1.method, "steps": r1.steps, "cfg": r1.cfg},
        {"stage": "clean", "prompt": bg_prompt, "seed": int(seed + 1),
         "mask": f"alpha >= {alpha_threshold:.6g} dilated by {mask_radius} px", "mask_radius": int(mask_radius),
         "mask_feather": feather, "method": r2.method, "steps": r2.steps, "cfg": r2.cfg, "paste_back": True},
        {"stage": "blend", "formula": "fg over bg (straight alpha)"},
    ]
    return {"fg": fg8, "intermediate": inter8, "mask": to_uint8(w2), "bg": bg8,
            "blended": blended8, "stages": stages}


def _layer_one(job: RecordJob, req: LayersDatasetRequest, model, out: Path, model_ref: str, progress=None) -> dict:
    from layerctl.io.imageio import load_image, save_png

    row = {"key": job.key, "source": str(job.fg.path)}
    try:
        data = job.fg.path.read_bytes()
        rgba = np.asarray(load_image(job.fg.path, "RGBA"), dtype=np.uint8)
    except (OSError, LayerctlError) as exc:
        return {**row, "status": "skipped", "reason": "corrupt", "detail": str(exc)}
    fg_hash = sha16(data)
    h = _json_hash({"fg": fg_hash, "k": job.k, "fg_prompt": job.fg_prompt, "bg_prompt": job.bg_prompt,
                    "prompt": job.prompt, "negative": job.negative, "seed": job.seed})
    row["hash"] = h
    a = rgba[..., 3]
    if a.max() < req.alpha_threshold * 255.0 - 1e-6 or a.max() == 0:
        return {**row, "status": "skipped", "reason": "no_opaque_pixels"}
    if a.min() == 255:
        return {**row, "status": "skipped", "reason": "opaque"}
    canvas = place_on_canvas(rgba, req.size)
    if canvas[..., 3].max() == 0:
        return {**row, "status": "skipped", "reason": "no_opaque_pixels"}
    seed = job.seed if job.seed is not None else (req.seed + int(h[:8], 16)) % (2**31 - 2)
    from layerctl.pipelines.sampling import job_sampling

    sampling = job_sampling(req, model, quiet=True)
    res = make_layer_record(model, canvas, job.prompt, job.bg_prompt, job.negative, seed, req.steps, req.cfg,
                            req.mask_radius, req.alpha_threshold, req.mask_feather, progress, req.clip_skip, sampling)
    rid = f"{slug(Path(job.fg.rel).stem, 32)}-{h[:8]}"
    hh, ww = canvas.shape[:2]
    files = {k: f"{k}/{rid}.png" for k in LAYER_DIRS}
    s1 = res["stages"][0]
    common = {"seed": seed, "steps": s1["steps"], "cfg": s1["cfg"], "size": [ww, hh], "model": model_ref,
              "negative": job.negative, "clip_skip": req.clip_skip, "layerctl_version": __version__, **sampling.metadata()}
    png_meta = {
        "fg": {**common, "prompt": job.fg_prompt, "layer": "fg"},
        "intermediate": {**common, "prompt": job.prompt, "layer": "intermediate"},
        "mask": {**common, "prompt": job.bg_prompt, "layer": "mask", "mask_radius": req.mask_radius},
        "bg": {**common, "prompt": job.bg_prompt, "layer": "bg", "seed": seed + 1},
        "blended": {**common, "prompt": job.prompt, "layer": "blended"},
    }
    for k in ("fg", "intermediate", "mask", "bg", "blended"):  # blended last: it needs the others
        save_png(out / files[k], res[k], png_meta[k], overwrite=True)
    record = {
        "id": rid,
        "hash": h,
        **files,
        "fg_prompt": job.fg_prompt,
        "bg_prompt": job.bg_prompt,
        "prompt": job.prompt,
        "negative": job.negative,
        "seed": seed,
        "width": ww,
        "height": hh,
        "source": str(job.fg.path),
        "fg_hash": fg_hash,
        "model": model_ref,
        "backend": getattr(model, "backend", None),
        "inpaint_method": s1["method"],
        "steps": s1["steps"],
        "cfg": s1["cfg"],
        "mask_radius": req.mask_radius,
        "mask_feather": res["stages"][1]["mask_feather"],
        "alpha_threshold": req.alpha_threshold,
        "stages": res["stages"],
        "layerctl_version": __version__,
    }
    return {**row, "status": "ok", "record": record}


def _merge_layers(out: Path, plan_keys: list[str]) -> dict[str, dict]:
    final = latest_by_key(read_parts(out))
    pos = {k: i for i, k in enumerate(plan_keys)}
    ok = sorted((r for r in final.values() if r["status"] == "ok"), key=lambda r: (pos.get(r["key"], len(pos)), r["key"]))
    _write_jsonl(out / METADATA, [r["record"] for r in ok])
    return final


def _job_hash_cheap(job: RecordJob, fg_hashes: dict[str, str]) -> Optional[str]:
    fh = fg_hashes.get(job.fg.rel)
    if fh is None:
        return None
    return _json_hash({"fg": fh, "k": job.k, "fg_prompt": job.fg_prompt, "bg_prompt": job.bg_prompt,
                       "prompt": job.prompt, "negative": job.negative, "seed": job.seed})


def default_model_ref(ref: Optional[str], log: Callable[[str], None] = lambda m: None) -> str:
    if ref:
        return ref
    env = os.environ.get("LAYERCTL_MODEL")
    if env:
        return env
    log("layerctl: no --model given (nor LAYERCTL_MODEL): using the built-in 'tiny' model, whose pictures are noise")
    return "tiny"


def build_layers_dataset(req: LayersDatasetRequest, on_event: Event = _noop, shard: Optional[Shard] = None,
                         model=None, log: Callable[[str], None] = lambda m: None) -> DatasetSummary:
    """Build (fg, bg, blended) records from foregrounds (see the module doc). `model`: an already loaded one."""
    shard = shard or Shard()
    out = Path(req.out).expanduser()
    fgs = find_foregrounds(req.rgba_dir, exclude=out)
    jobs, unprompted = plan_layer_jobs(req, fgs)
    if unprompted:
        log(f"layerctl: {len(unprompted)} foreground(s) have no prompt record and are left out (first: {unprompted[0]})")
    model_ref = model.ref if model is not None else default_model_ref(req.model, log if shard.main else (lambda m: None))
    settings = req.settings(model_ref)
    mode = check_out_dir(out, "layers", settings, req.resume, req.overwrite)
    shard.barrier()
    run_id = _prepare(out, "layers", settings, mode, shard)
    if shard.main:
        for d in LAYER_DIRS:
            (out / d).mkdir(exist_ok=True)
    plan_keys = [j.key for j in jobs] + [f"{rel}#-" for rel in unprompted]
    previous = _earlier_runs(out, run_id)
    part = _state(out) / f"part-{shard.rank}.jsonl"
    if shard.main and unprompted:
        for rel in unprompted:
            _append_line(part, {"key": f"{rel}#-", "status": "skipped", "reason": "no_prompt", "time": time.time(), "run": run_id})
    mine = jobs[shard.rank :: shard.world]

    # Which of mine are finished (same key and same content hash): no model needed for those.
    todo: list[RecordJob] = []
    fg_hashes: dict[str, str] = {}
    for job in mine:
        old = previous.get(job.key)
        if old is not None and old.get("hash"):
            if job.fg.rel not in fg_hashes:
                try:
                    fg_hashes[job.fg.rel] = sha16(job.fg.path.read_bytes())
                except OSError:
                    pass
            if _job_hash_cheap(job, fg_hashes) == old["hash"]:
                continue
        todo.append(job)

    done = len(mine) - len(todo)
    if done:
        on_event({"event": "resume", "done": done, "total": len(mine), "rank": shard.rank})
    try:
        if todo and model is None:
            from layerctl.backends.base import LoadOptions
            from layerctl.backends.registry import load_model

            device = req.device
            if shard.world > 1 and device == "auto" and shard.device:
                device = shard.device
            model = load_model(model_ref, device, req.dtype, req.attention, LoadOptions.of(req))
            if getattr(model, "notes", "") and shard.main:
                log(f"layerctl: {model.notes}")
        for job in todo:
            row = _layer_one(job, req, model, out, model_ref)
            row.update(time=time.time(), run=run_id, rank=shard.rank)
            _append_line(part, row)
            done += 1
            ev = {"event": "record", "status": row["status"], "source": str(job.fg.path), "done": done,
                  "total": len(mine), "rank": shard.rank}
            if row["status"] == "ok":
                ev["id"] = row["record"]["id"]
            else:
                ev["reason"] = row["reason"]
            on_event(ev)
    finally:
        if shard.world == 1:
            final = _merge_layers(out, plan_keys)
    if shard.world > 1:
        shard.barrier()
        if not shard.main:
            return DatasetSummary(kind="layers", out=str(out))
        final = _merge_layers(out, plan_keys)
    return _summarize("layers", out, plan_keys, final, run_id)
