"""`layerctl dataset rgba`: finding RGBA sources, captions, checks, de-duplication and the imagefolder."""

from __future__ import annotations

import csv
import glob as globmod
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
import numpy as np
from layerctl.core.naming import slug
from layerctl.errors import LayerctlError
from layerctl.io.jsonl import iter_rows, read_text

from layerctl.dataset.layout import CAPTION_KEYS, FILE_KEYS, IMAGE_EXTS, METADATA
from layerctl.dataset.requests import RgbaDatasetRequest
from layerctl.dataset.images import alpha_coverage, choose_bucket, fit_to_bucket, hash_distance, perceptual_hash, sha16
from layerctl.dataset.state import DatasetSummary, Event, Shard, _append_line, _earlier_runs, _noop, _prepare, _state, _summarize, _write_jsonl, check_out_dir, latest_by_key, read_parts


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _walk_images(root: Path, exclude: Optional[Path]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        dirnames[:] = sorted(
            x for x in dirnames if not x.startswith(".") and not (exclude and _same(d / x, exclude))
        )
        out.extend(d / n for n in sorted(filenames) if _is_image_name(Path(n)))
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


@dataclass
class Source:
    path: Path  # as found
    root: Optional[Path]  # the folder it was found under (for relative caption keys)

    @property
    def key(self) -> str:
        return str(self.path.resolve())


def find_sources(sources: list[str], exclude: Optional[Path] = None) -> list[Source]:
    """Files, folders (recursive, image extensions) and globs -> a sorted, de-duplicated list."""
    found: dict[str, Source] = {}
    excl = exclude.resolve() if exclude else None

    def add(p: Path, root: Optional[Path]) -> None:
        rp = p.resolve()
        if excl is not None and (rp == excl or excl in rp.parents):
            return
        found.setdefault(str(rp), Source(p, root))

    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            for f in _walk_images(p, excl):
                add(f, p)
        elif p.is_file():
            add(p, p.parent)
        elif any(c in s for c in "*?["):
            for m in sorted(globmod.glob(os.path.expanduser(s), recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    for f in _walk_images(mp, excl):
                        add(f, mp)
                elif mp.is_file() and _is_image_name(mp):
                    add(mp, mp.parent)
        else:
            raise LayerctlError(f"source not found: {s}")
    return sorted(found.values(), key=lambda x: x.key)


def load_captions(path: str) -> dict[str, str]:
    """A captions table from CSV (header with a file and a caption column) or JSONL -> {file key: caption}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerctlError(f"captions file not found: {p}")
    text = read_text(p, "captions file")
    table: dict[str, str] = {}
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        cols = reader.fieldnames or []
        fcol = next((c for c in FILE_KEYS if c in cols), None)
        ccol = next((c for c in CAPTION_KEYS if c in cols), None)
        if not fcol or not ccol:
            raise LayerctlError(
                f"{p}: the CSV header needs a file column ({', '.join(FILE_KEYS)}) and a caption column "
                f"({', '.join(CAPTION_KEYS)}); got {', '.join(cols) or 'nothing'}"
            )
        for row in reader:
            if row.get(fcol):
                table[row[fcol].strip()] = (row.get(ccol) or "").strip()
        return table
    for i, row in iter_rows(p, "captions file"):
        fkey = next((k for k in FILE_KEYS if isinstance(row.get(k), str)), None)
        ckey = next((k for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
        if not fkey or not ckey:
            raise LayerctlError(f"{p}:{i}: each line needs a file ({'/'.join(FILE_KEYS)}) and a caption ({'/'.join(CAPTION_KEYS)})")
        table[row[fkey].strip()] = row[ckey].strip()
    return table


def caption_for(src: Source, table: Optional[dict[str, str]]) -> str:
    """From the captions table (full path, path relative to its folder, file name, stem), else a sidecar .txt."""
    if table:
        keys = [str(src.path), src.key, src.path.as_posix(), src.path.name, src.path.stem]
        if src.root is not None:
            try:
                keys.insert(0, src.path.relative_to(src.root).as_posix())
            except ValueError:
                pass
        for k in keys:
            if k in table:
                return table[k]
    side = src.path.with_suffix(".txt")
    if side.is_file():
        try:
            return " ".join(side.read_text(encoding="utf-8", errors="replace").split())
        except OSError:
            return ""
    return ""


# ---------------------------------------------------------------- rgba


def _check_rgba(arr: np.ndarray, req: RgbaDatasetRequest) -> tuple[Optional[str], Optional[np.ndarray], float]:
    """(reason or None, bucketed image, coverage) for one decoded RGBA image."""
    a = arr[..., 3]
    if a.min() == 255:
        return "opaque", None, 1.0
    if a.max() == 0:
        return "transparent", None, 0.0
    h, w = a.shape
    if min(w, h) < max(64, req.min_size):
        return "too_small", None, alpha_coverage(a)
    bucket = choose_bucket(w, h, req.resolution, max_aspect=req.max_aspect, upscale=req.upscale)
    img = fit_to_bucket(arr, bucket, req.fit) if (w, h) != bucket else arr
    cov = alpha_coverage(img[..., 3])
    if img[..., 3].max() == 0:
        return "transparent", None, 0.0
    if cov < req.min_coverage:
        return "low_coverage", None, cov
    if cov > req.max_coverage:
        return "high_coverage", None, cov
    return None, img, cov


def _read_source(src: Source) -> tuple[Optional[bytes], Optional[str]]:
    try:
        return src.path.read_bytes(), None
    except OSError as exc:
        return None, exc.strerror or str(exc)


def _ingest_one(src: Source, data: Optional[bytes], req: RgbaDatasetRequest, out: Path, captions, kept: list[tuple[str, str]]) -> dict:
    """Process one source file (its bytes already read) -> a part row (status ok/skipped)."""
    from layerctl.io.imageio import load_image, save_png

    row = {"key": src.key, "source": str(src.path)}
    if data is None:
        return {**row, "status": "skipped", "reason": "corrupt", "detail": "cannot read the file"}
    row["hash"] = sha16(data)
    try:
        im = load_image(src.path, "RGBA")
        arr = np.asarray(im, dtype=np.uint8)
    except LayerctlError as exc:
        return {**row, "status": "skipped", "reason": "corrupt", "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt file
        return {**row, "status": "skipped", "reason": "corrupt", "detail": f"{type(exc).__name__}: {exc}"}
    reason, img, cov = _check_rgba(arr, req)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    ph = perceptual_hash(img)
    row["phash"] = ph
    if req.dedup:
        for other_ph, other_src in kept:
            if hash_distance(ph, other_ph) <= req.dedup_distance:
                return {**row, "status": "skipped", "reason": "duplicate", "duplicate_of": other_src}
    name = f"{slug(src.path.stem)}-{row['hash'][:8]}.png"
    save_png(out / name, img, None, overwrite=True)
    record = {
        "file_name": name,
        "caption": caption_for(src, captions),
        "width": int(img.shape[1]),
        "height": int(img.shape[0]),
        "alpha_coverage": round(cov, 6),
        "source": str(src.path),
        "hash": row["hash"],
        "phash": ph,
    }
    return {**row, "status": "ok", "record": record}


def _merge_rgba(out: Path, req: RgbaDatasetRequest, plan_keys: list[str], run_id: str) -> dict[str, dict]:
    """Main process: final rows (with duplicates across processes/runs resolved) and metadata.jsonl."""
    final = latest_by_key(read_parts(out))
    pos = {k: i for i, k in enumerate(plan_keys)}
    ok = sorted((r for r in final.values() if r["status"] == "ok"), key=lambda r: (pos.get(r["key"], len(pos)), r["key"]))
    kept: list[dict] = []
    merge_part = _state(out) / "part-merge.jsonl"
    for r in ok:
        dup = None
        if req.dedup:
            dup = next((k for k in kept if hash_distance(r["phash"], k["phash"]) <= req.dedup_distance), None)
        if dup is None:
            kept.append(r)
            continue
        f = out / r["record"]["file_name"]
        if f.is_file() and not any(k["record"]["file_name"] == r["record"]["file_name"] for k in kept):
            f.unlink()
        new = {k: v for k, v in r.items() if k != "record"}
        new.update(status="skipped", reason="duplicate", duplicate_of=dup["source"], merge=True, time=time.time(), run=run_id)
        _append_line(merge_part, new)
        final[r["key"]] = new
    _write_jsonl(out / METADATA, [r["record"] for r in kept])
    return final


def build_rgba_dataset(req: RgbaDatasetRequest, on_event: Event = _noop, shard: Optional[Shard] = None) -> DatasetSummary:
    """Ingest RGBA images into an imagefolder (see the module doc). Returns the summary (main process)."""
    shard = shard or Shard()
    out = Path(req.out).expanduser()
    sources = find_sources(req.sources, exclude=out)
    if not sources:
        raise LayerctlError(f"no images found in {', '.join(req.sources)} (looked for {', '.join(IMAGE_EXTS)})")
    captions = load_captions(req.captions) if req.captions else None
    mode = check_out_dir(out, "rgba", req.settings(), req.resume, req.overwrite)
    shard.barrier()  # every process has looked at the folder before the main one changes it
    run_id = _prepare(out, "rgba", req.settings(), mode, shard)

    plan_keys = [s.key for s in sources]
    previous = _earlier_runs(out, run_id)
    kept = [(r["phash"], r["source"]) for r in previous.values() if r["status"] == "ok" and r.get("phash")]
    part = _state(out) / f"part-{shard.rank}.jsonl"
    mine = sources[shard.rank :: shard.world]
    done = 0
    try:
        for src in mine:
            data, _err = _read_source(src)
            old = previous.get(src.key)
            if old is not None and (data is None or old.get("hash") != sha16(data)):
                # the file changed since that run: do it again (and drop the old output)
                if old.get("status") == "ok":
                    f = out / old["record"]["file_name"]
                    if f.is_file():
                        f.unlink()
                    kept = [k for k in kept if k[1] != old["source"]]
                old = None
            if old is not None:
                ev = {"event": "record", "status": "done", "source": str(src.path)}
                if old["status"] != "ok":
                    ev["reason"] = old.get("reason")
                else:
                    ev["file_name"] = old["record"]["file_name"]
            else:
                row = _ingest_one(src, data, req, out, captions, kept)
                row.update(time=time.time(), run=run_id, rank=shard.rank)
                _append_line(part, row)
                if row["status"] == "ok":
                    kept.append((row["phash"], row["source"]))
                ev = {"event": "record", "status": row["status"], "source": str(src.path)}
                if row["status"] == "ok":
                    ev["file_name"] = row["record"]["file_name"]
                else:
                    ev["reason"] = row["reason"]
            done += 1
            ev.update(done=done, total=len(mine), rank=shard.rank)
            on_event(ev)
    finally:
        if shard.world == 1:
            final = _merge_rgba(out, req, plan_keys, run_id)
    if shard.world > 1:
        shard.barrier()
        if not shard.main:
            return DatasetSummary(kind="rgba", out=str(out))
        final = _merge_rgba(out, req, plan_keys, run_id)
    return _summarize("rgba", out, plan_keys, final, run_id)


# ---------------------------------------------------------------- layers: inputs
