"""What a job hands back and writes: output records, path checks, PNG (+ preview) and PSD files.

Pipelines call these once their pixels are ready; every file goes through the atomic writers
of layerctl.io (temporary file + rename, never a half-written output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from layerctl import __version__
from layerctl.errors import LayerctlError



@dataclass
class OutputRecord:
    role: str  # "rgba", "fg", "bg", "blended", "psd"
    path: str
    seed: Optional[int] = None
    index: int = 0
    metadata: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"role": self.role, "path": self.path, "seed": self.seed, "index": self.index}


def check_outputs(paths, overwrite: bool, suffixes=(".png",)) -> None:
    """Every path ends in one of `suffixes` and may be written (exists only with --overwrite)."""
    from layerctl.io.files import check_writable

    for p in paths:
        if suffixes and Path(p).suffix.lower() not in suffixes:
            raise LayerctlError(f"cannot write '{p}': output must end in {' or '.join(suffixes)}")
        check_writable(p, overwrite)


def plan_outputs(req, n: int, seeds: list, prompt: str = "") -> tuple[list, list]:
    """Every file one RGBA job writes, checked before any model loads: the PNGs from --out, their
    previews, and one PSD per image from --psd (both templates expand the same way). Returns
    (png paths, psd paths or [None] * n)."""
    from layerctl.core.naming import expand_out

    start, total = getattr(req, "_first_index", 0), getattr(req, "_total_images", None) or n
    paths = expand_out(req.out, n, seeds, prompt, start=start, total=total)
    check_outputs(paths, req.overwrite)
    planned = list(paths)
    if getattr(req, "preview", False):
        previews = [preview_path(p) for p in paths]
        check_outputs(previews, req.overwrite)
        planned += previews
    psds = [None] * n
    if getattr(req, "psd", None):
        psds = expand_out(req.psd, n, seeds, prompt, start=start, total=total)
        check_outputs(psds, req.overwrite, suffixes=(".psd",))
        planned += psds
    if len(set(planned)) != len(planned):
        raise LayerctlError("two outputs of this job have the same file name (check --out, --psd and the previews)")
    return paths, psds


def base_metadata(model, req, mode: str, steps: int, cfg: float, width: int, height: int, sampling=None) -> dict:
    """The recipe every output file carries (the JSON chunk; the A1111 text is made from it).

    `sampling`: the job's layerctl.core.samplers.Sampling (None: the defaults, DPM++ 2M Karras)."""
    from layerctl.core.samplers import Sampling

    meta = {
        "prompt": getattr(req, "prompt", None),
        "negative": req.negative,
        "steps": steps,
        "cfg": cfg,
        "size": [width, height],
        "model": model.ref,
        "backend": model.backend,
        "family": model.family,
        "mode": mode,
        "clip_skip": getattr(req, "clip_skip", 1),
        "tta": req.tta,
        "layerctl_version": __version__,
        **(sampling or Sampling()).metadata(),
    }
    hook = getattr(model, "sampling_metadata", None)  # FLUX.1: Euler flow matching, distilled guidance
    meta.update(hook(cfg) if hook is not None else {})
    return meta


def preview_path(path) -> Path:
    """NAME.png -> NAME.preview.png (the checkerboard preview of a transparent image)."""
    p = Path(path)
    return p.with_name(p.stem + ".preview.png")


def write_images(items, meta: dict, overwrite: bool, preview: bool = False, psd=None) -> list[OutputRecord]:
    """items: (role, path, [4 or 3,H,W] tensor, seed, index). Writes PNGs (+ previews, + PSDs).

    `psd`: one path for all items, or a list with one path (or None) per item."""
    from layerctl.core.imagemath import checkerboard, rgba_to_uint8, to_float, to_uint8
    from layerctl.io.imageio import save_png

    records = []
    layers_for_psd = []
    for role, path, img, seed, index in items:
        arr = rgba_to_uint8(img)
        m = dict(meta, seed=seed, role=role)
        save_png(path, arr, m, overwrite=overwrite)
        records.append(OutputRecord(role, str(path), seed, index, m))
        layers_for_psd.append((role, arr))
        if preview and arr.shape[-1] == 4:
            prev = preview_path(path)
            save_png(prev, to_uint8(checkerboard(to_float(arr))), dict(m, role="preview"), overwrite=overwrite)
            records.append(OutputRecord("preview", str(prev), seed, index, m))
    if isinstance(psd, (list, tuple)):
        for (role, arr), (_r, _p, _img, seed, index), one in zip(layers_for_psd, items, psd):
            if one is not None:
                rec = write_psd(one, [(role, arr)], overwrite, dict(meta, seed=seed))
                rec.index = index
                records.append(rec)
    elif psd:
        records.append(write_psd(psd, layers_for_psd, overwrite, meta))
    return records


def write_psd(path, layers, overwrite: bool, meta: dict) -> OutputRecord:
    """Layers (role, HxWx{3,4} uint8) bottom -> top, named by role, as one PSD."""
    import numpy as np

    from layerctl.io.psd import write_psd as write_psd_file

    order = {"bg": 0, "blended": 1, "fg": 2, "rgba": 3}
    ordered = sorted(layers, key=lambda kv: order.get(kv[0], 9))
    named, seen = [], {}
    for role, arr in ordered:
        if arr.shape[-1] == 3:
            arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        seen[role] = seen.get(role, 0) + 1
        name = role if seen[role] == 1 else f"{role} {seen[role]}"
        named.append((name, arr, (0, 0)))
    write_psd_file(path, named, overwrite=overwrite)
    return OutputRecord("psd", str(path), meta.get("seed"), 0, meta)
