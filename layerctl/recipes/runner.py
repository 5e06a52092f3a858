"""Running a plan: resume decisions from the disk, one Session for every job, one Result per job."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from layerctl.errors import JobFailed, LayerctlError
from layerctl.recipes.planner import Job, Plan
from layerctl.recipes.schema import ComposeStep


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
    if meta.get("guidance") is not None:  # FLUX.1: the job's cfg is the distilled guidance (metadata cfg is 1)
        checks["guidance"] = checks.pop("cfg")
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
            from layerctl.io.imageio import read_metadata

            meta = read_metadata(p)
        except Exception as exc:  # noqa: BLE001 - unreadable counts as not ours
            return "stale", f"{p} cannot be read ({type(exc).__name__})"
        why = _meta_mismatch(job, meta)
        if why:
            return "stale", f"{p} was made by another job: {why}"
    if len(present) < len(job.outputs):
        return "partial", ""
    return "done", ""


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
    from layerctl.core import compose as C
    from layerctl.io import stack as S
    from layerctl.io.imageio import save_png

    specs = [
        S.LayerSpec(path=Path(l["path"] if isinstance(l, dict) else l.path),
                    name=(l.get("name") if isinstance(l, dict) else l.name),
                    at=(tuple(l["at"]) if isinstance(l, dict) and l.get("at") else (tuple(l.at) if not isinstance(l, dict) and l.at else None)),
                    scale=(l.get("scale", 1.0) if isinstance(l, dict) else l.scale),
                    opacity=(l.get("opacity", 1.0) if isinstance(l, dict) else l.opacity),
                    visible=(l.get("visible", True) if isinstance(l, dict) else l.visible))
        for l in req.layers
    ]
    empty: list = []
    layers, first_canvas, _warnings = S.load_stack(specs, empty=empty)
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
        from layerctl.io import psd as P

        P.write_psd(out, layers, size, overwrite=req.overwrite)
        return {"psd": out}
    save_png(out, C.flatten(layers, size), {"layers": [l.name for l in layers]}, overwrite=req.overwrite)
    return {"out": out}
