"""Training datasets: RGBA ingestion and the multi-layer construction by inpainting.

Two jobs, each a validated request plus a function (the CLI and recipes call
the same ones):

    from layerctl.dataset import RgbaDatasetRequest, build_rgba_dataset
    summary = build_rgba_dataset(RgbaDatasetRequest(sources=["cutouts/"], out="data/rgba"))

    from layerctl.dataset import LayersDatasetRequest, build_layers_dataset
    summary = build_layers_dataset(LayersDatasetRequest(rgba_dir="data/rgba", out="data/layers",
                                                        backgrounds=["a beach"], model="tiny"))

Layouts (documented for users and for the readers in docs/datasets.md):

- rgba: a Hugging Face *imagefolder*: ``OUT/<name>.png`` plus ``OUT/metadata.jsonl``
  with one object per image: file_name, caption, width, height, alpha_coverage,
  source, hash (sha256 of the source file, 16 hex) and phash (perceptual hash).
- layers: ``OUT/metadata.jsonl``, one object per record, with paths relative to
  OUT: fg (RGBA), bg, blended, intermediate, mask; fg_prompt, bg_prompt, prompt;
  id, hash, seed, and how every stage was made.

Both are resumable: finished records are appended, one JSON line each, to
``OUT/.layerctl/part-<rank>.jsonl`` right after their files are written;
``metadata.jsonl`` is (re)written from those at the end of a run. Work is
split across ``accelerate launch`` processes by record position (each record
exactly once); the main process merges.
"""

from __future__ import annotations

import csv
import glob as globmod
import hashlib
import io
import json
import math
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from layerctl import __version__
from layerctl.core.naming import slug
from layerctl.errors import LayerctlError
from layerctl.core.imagemath import composite_over, flatten_on_grey, to_uint8

IMAGE_EXTS = (".png", ".webp", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif")
METADATA = "metadata.jsonl"
STATE_DIR = ".layerctl"
STATE_FILE = "dataset.json"
CAPTION_KEYS = ("caption", "text", "prompt")
FILE_KEYS = ("file_name", "file", "image", "path", "filename")
LAYER_DIRS = ("fg", "bg", "blended", "intermediate", "mask")

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

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        if v is not None and v <= 0:
            raise ValueError(f"steps must be > 0 (got {v})")
        return v

    @field_validator("cfg")
    @classmethod
    def _cfg(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"cfg must be >= 0 (got {v})")
        return v

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
        }


# ---------------------------------------------------------------- small pure functions


def composite_rgb(fg_rgba: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """`fg over bg` with straight alpha, an opaque background: HxWx3 float32."""
    return composite_over(np.asarray(fg_rgba, dtype=np.float32), np.asarray(bg_rgb, dtype=np.float32))[..., :3]


def _dhash_bits(channel: np.ndarray, size: int = 8, eps: float = 2.0 / 255.0) -> tuple[int, int]:
    """Horizontal and vertical difference hashes (size*size bits each) of one float channel."""
    from PIL import Image

    src = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), "F")
    wide = np.asarray(src.resize((size + 1, size), Image.Resampling.BOX), dtype=np.float32)
    tall = np.asarray(src.resize((size, size + 1), Image.Resampling.BOX), dtype=np.float32)
    hbits = (wide[:, 1:] - wide[:, :-1]) > eps
    vbits = (tall[1:, :] - tall[:-1, :]) > eps
    out = []
    for bits in (hbits, vbits):
        v = 0
        for b in bits.ravel():
            v = (v << 1) | int(b)
        out.append(v)
    return out[0], out[1]


HASH_BITS = 512


def perceptual_hash(rgba) -> str:
    """A 512-bit difference hash of an RGBA image, as 128 hex digits.

    For R, G, B of the picture flattened on grey and for alpha: 64 horizontal
    and 64 vertical gradient-sign bits on a 9x8 / 8x9 area-resized copy (a
    gradient counts when it exceeds 2/255, so flat areas are stable). Resizing
    and re-encoding change few bits; other pictures differ in many.
    """
    f = np.asarray(rgba)
    f = f.astype(np.float32) / 255.0 if f.dtype == np.uint8 else f.astype(np.float32)
    if f.ndim != 3 or f.shape[-1] != 4:
        raise ValueError(f"expected an HxWx4 RGBA image, got shape {f.shape}")
    flat = flatten_on_grey(np.clip(f, 0.0, 1.0))
    value = 0
    for ch in (flat[..., 0], flat[..., 1], flat[..., 2], f[..., 3]):
        h, v = _dhash_bits(ch)
        value = (value << 128) | (h << 64) | v
    return f"{value:0{HASH_BITS // 4}x}"


def hash_distance(a: str, b: str) -> int:
    """Hamming distance of two hex hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def alpha_coverage(alpha: np.ndarray) -> float:
    """Mean alpha in [0, 1] (uint8 or float input)."""
    a = np.asarray(alpha)
    return float(a.mean() / 255.0) if a.dtype == np.uint8 else float(a.mean())


def choose_bucket(width: int, height: int, resolution: int, step: int = 64, max_aspect: float = 4.0, upscale: bool = False) -> tuple[int, int]:
    """The (w, h) bucket, multiples of `step`, for an image of width x height.

    resolution 0 keeps the size (rounded down to multiples of `step`).
    Otherwise the target area is resolution^2 (without `upscale`, at most the
    image's own area); among the buckets not larger than it, with aspect ratios
    up to max_aspect:1, the one with the least |log(aspect / image aspect)| +
    0.5 * log(target area / bucket area) wins (ties: the larger one).
    """
    if width < step or height < step:
        raise ValueError(f"image {width}x{height} is smaller than {step} px on a side")
    if resolution == 0:
        return (width // step * step, height // step * step)
    area = resolution * resolution if upscale else min(resolution * resolution, width * height)
    ar = width / height
    best = None
    max_side = max(step, int(math.sqrt(area * max_aspect)) // step * step)
    for bw in range(step, max_side + 1, step):
        for bh in range(step, (area // bw) // step * step + 1, step):
            r = bw / bh
            if max(r, 1.0 / r) > max_aspect + 1e-9:
                continue
            score = abs(math.log(r / ar)) + 0.5 * math.log(area / (bw * bh))
            key = (round(score, 12), -(bw * bh))
            if best is None or key < best[0]:
                best = (key, (bw, bh))
    return best[1] if best else (step, step)


def resize_rgba(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWx4 uint8 RGBA array (Lanczos on premultiplied colour: no halo from invisible pixels)."""
    from PIL import Image

    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    im = Image.fromarray(arr, "RGBA").convert("RGBa").resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGBA"))


def fit_to_bucket(arr: np.ndarray, bucket: tuple[int, int], fit: str = "crop") -> np.ndarray:
    """Resize + centre-crop ("crop": cover the bucket) or resize + transparent padding ("pad": fit inside)."""
    bw, bh = bucket
    h, w = arr.shape[:2]
    if fit == "crop":
        s = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
        r = resize_rgba(arr, (nw, nh))
        x0, y0 = (nw - bw) // 2, (nh - bh) // 2
        return np.ascontiguousarray(r[y0 : y0 + bh, x0 : x0 + bw])
    if fit == "pad":
        s = min(bw / w, bh / h)
        nw, nh = min(bw, max(1, round(w * s))), min(bh, max(1, round(h * s)))
        r = resize_rgba(arr, (nw, nh))
        out = np.zeros((bh, bw, 4), dtype=np.uint8)
        x0, y0 = (bw - nw) // 2, (bh - nh) // 2
        out[y0 : y0 + nh, x0 : x0 + nw] = r
        return out
    raise ValueError(f"fit must be crop or pad (got {fit})")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of `radius` px (Euclidean: offsets with dx^2 + dy^2 <= r^2)."""
    m = np.asarray(mask).astype(bool)
    r = int(radius)
    if r <= 0 or not m.any():
        return m.copy()
    h, w = m.shape
    runs: dict[int, np.ndarray] = {}

    def row_any(k: int) -> np.ndarray:  # out[y, x] = any(m[y, x-k .. x+k])
        if k not in runs:
            p = np.pad(m.astype(np.int32), ((0, 0), (k + 1, k)))
            cs = np.cumsum(p, axis=1)
            runs[k] = (cs[:, 2 * k + 1 :] - cs[:, : w]) > 0
        return runs[k]

    out = np.zeros_like(m)
    for dy in range(-r, r + 1):
        k = int(math.isqrt(r * r - dy * dy))
        rows = row_any(k)
        y0, y1 = max(0, -dy), min(h, h - dy)
        if y0 < y1:
            out[y0:y1] |= rows[y0 + dy : y1 + dy]
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a disk: pixels whose whole disk of `radius` px lies in the mask (outside the image counts as in)."""
    m = np.asarray(mask).astype(bool)
    return ~dilate(~m, radius)


def feather_inside(mask: np.ndarray, width: int) -> np.ndarray:
    """A float weight that is 0 outside `mask` and ramps up to 1 over `width` px inside it.

    w = mean over k = 0..width-1 of erode(mask, k): 1/width on the mask's border
    pixels, 1 from `width` px deep. width <= 1 gives the mask itself.
    """
    m = np.asarray(mask).astype(bool)
    if width <= 1:
        return m.astype(np.float32)
    acc = np.zeros(m.shape, np.float32)
    for k in range(width):
        acc += erode(m, k)
    return acc / np.float32(width)


def place_on_canvas(rgba: np.ndarray, size: Optional[tuple[int, int]] = None, step: int = 64) -> np.ndarray:
    """Centre an RGBA foreground on a transparent canvas.

    Without `size` the canvas is the image grown to the next multiples of
    `step`; with (W, H) the image is scaled down to fit (never up) first.
    """
    h, w = rgba.shape[:2]
    if size is None:
        cw, ch = -(-w // step) * step, -(-h // step) * step
    else:
        cw, ch = size
        s = min(1.0, cw / w, ch / h)
        if s < 1.0:
            rgba = resize_rgba(rgba, (max(1, round(w * s)), max(1, round(h * s))))
            h, w = rgba.shape[:2]
    out = np.zeros((ch, cw, 4), dtype=np.uint8)
    x0, y0 = (cw - w) // 2, (ch - h) // 2
    out[y0 : y0 + h, x0 : x0 + w] = rgba
    return out


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _json_hash(obj) -> str:
    return sha16(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8"))


# ---------------------------------------------------------------- finding inputs


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
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LayerctlError(f"cannot read captions file {p}: {exc}") from None
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
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LayerctlError(f"{p}:{i}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LayerctlError(f"{p}:{i}: each line must be a JSON object")
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


# ---------------------------------------------------------------- output folder, state, sharding


@dataclass
class Shard:
    """Which share of the records this process does; `barrier` waits for every process."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: Optional[str] = None  # the process's device under accelerate (multi-process only)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_accelerate(cls) -> "Shard":
        """process_index / num_processes of `accelerate launch` (one process without it)."""
        import torch
        from accelerate import PartialState

        # Without CUDA, processes started by torchrun / accelerate share the work over gloo only
        # when PartialState is told it runs on the CPU (else it reports a single process).
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        st = PartialState(cpu=cpu)
        dev = str(st.device) if st.num_processes > 1 else None
        return cls(st.process_index, st.num_processes, st.wait_for_everyone, dev)


def _state(out: Path) -> Path:
    return out / STATE_DIR


def _read_state(out: Path) -> Optional[dict]:
    f = _state(out) / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_out_dir(out: Path, kind: str, settings: dict, resume: bool, overwrite: bool) -> str:
    """'new', 'resume' or 'overwrite'; a clear error for a folder that is not ours to fill."""
    if out.exists() and not out.is_dir():
        raise LayerctlError(f"output {out} exists and is not a folder")
    entries = [e for e in out.iterdir()] if out.is_dir() else []
    if not entries:
        return "new"
    state = _read_state(out)
    if overwrite:
        if state is None:
            raise LayerctlError(
                f"output folder {out} is not empty and was not written by 'layerctl dataset' "
                f"(no {STATE_DIR}/{STATE_FILE}); --overwrite only replaces a dataset folder. Choose an empty --out"
            )
        return "overwrite"
    if not resume:
        raise LayerctlError(f"output folder {out} is not empty (use --resume to continue that run, or --overwrite to start over)")
    if state is None:
        raise LayerctlError(f"cannot resume into {out}: it was not written by 'layerctl dataset' (no {STATE_DIR}/{STATE_FILE})")
    if state.get("kind") != kind:
        raise LayerctlError(f"cannot resume into {out}: it holds a '{state.get('kind')}' dataset, not '{kind}'")
    old = state.get("settings", {})
    diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if diff:
        k = diff[0]
        raise LayerctlError(
            f"cannot resume into {out}: {k} was {old.get(k)!r} there, now {settings.get(k)!r} "
            f"(use the same settings, --overwrite, or a new --out)"
        )
    return "resume"


def read_parts(out: Path) -> list[dict]:
    """Every finished-record line of every process and run, in time order (broken lines ignored)."""
    rows = []
    st = _state(out)
    if not st.is_dir():
        return rows
    for f in sorted(st.glob("part-*.jsonl")):
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict) and "key" in row and "status" in row:
                rows.append(row)
    rows.sort(key=lambda r: (r.get("time", 0.0), 1 if r.get("merge") else 0))
    return rows


def latest_by_key(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        out[r["key"]] = r
    return out


def _append_line(path: Path, row: dict) -> None:
    data = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from layerctl.io.imageio import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write, overwrite=True, suffix=".jsonl")


def _record_files(record: dict) -> list[str]:
    if "file_name" in record:
        return [record["file_name"]]
    return [record[k] for k in LAYER_DIRS if isinstance(record.get(k), str)]


def _clean_previous(out: Path) -> int:
    """--overwrite: remove the files the previous run listed (ours only), its metadata and state."""
    removed = 0
    rows = read_parts(out)
    meta = out / METADATA
    listed = [r.get("record") for r in rows if isinstance(r.get("record"), dict)]
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                listed.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    root = out.resolve()
    for rec in listed:
        for rel in _record_files(rec) if isinstance(rec, dict) else []:
            p = (out / rel).resolve()
            if root in p.parents and p.is_file():
                p.unlink()
                removed += 1
    if meta.is_file():
        meta.unlink()
    for f in _state(out).glob("*"):
        if f.is_file():
            f.unlink()
    return removed


def _earlier_runs(out: Path, run_id: str) -> dict[str, dict]:
    """The rows finished by earlier runs. Rows of this run are left out: with several processes another
    one may already have written some, and seeing them would make this process's choices (which of two
    near-duplicates is kept) depend on timing."""
    return latest_by_key(r for r in read_parts(out) if r.get("run") != run_id)


def _prepare(out: Path, kind: str, settings: dict, mode: str, shard: Shard) -> str:
    """Main process: clean (overwrite), write the state file and a run id; every process returns the run id."""
    if shard.main:
        if mode == "overwrite":
            _clean_previous(out)
        _state(out).mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        state = {"kind": kind, "settings": settings, "layerctl_version": __version__, "run": run_id}
        from layerctl.io.imageio import atomic_write

        atomic_write(
            _state(out) / STATE_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8"),
            overwrite=True,
            suffix=".json",
        )
    shard.barrier()
    return (_read_state(out) or {}).get("run", "")


# ---------------------------------------------------------------- summary / events


@dataclass
class DatasetSummary:
    kind: str
    out: str
    total: int = 0  # records planned
    written: int = 0  # records in metadata.jsonl from this plan (incl. earlier runs)
    new: int = 0  # records made in this run
    resumed: int = 0  # records finished by an earlier run and kept
    skipped: dict = field(default_factory=dict)  # reason -> count
    metadata: str = ""

    def as_json(self) -> dict:
        return {
            "event": "summary",
            "kind": self.kind,
            "out": self.out,
            "metadata": self.metadata,
            "total": self.total,
            "written": self.written,
            "new": self.new,
            "resumed": self.resumed,
            "skipped": dict(sorted(self.skipped.items())),
        }


def _summarize(kind: str, out: Path, plan_keys: list[str], final: dict[str, dict], run_id: str) -> DatasetSummary:
    s = DatasetSummary(kind=kind, out=str(out), total=len(plan_keys), metadata=str(out / METADATA))
    reasons: Counter = Counter()
    for k in plan_keys:
        row = final.get(k)
        if row is None:
            reasons["unfinished"] += 1
            continue
        if row.get("status") == "ok":
            s.written += 1
            if row.get("run") == run_id:
                s.new += 1
            else:
                s.resumed += 1
        else:
            reasons[row.get("reason", "unknown")] += 1
    s.skipped = dict(reasons)
    return s


Event = Callable[[dict], None]


def _noop(_ev: dict) -> None:
    pass


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
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LayerctlError(f"cannot read {meta}: {exc}") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LayerctlError(f"{meta}:{i}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
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
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LayerctlError(f"cannot read prompts file {p}: {exc}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LayerctlError(f"{p}:{i}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise LayerctlError(f"{p}:{i}: each line must be a JSON object with {', '.join(PROMPT_KEYS)}")
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
class LayerJob:
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


def plan_layer_jobs(req: LayersDatasetRequest, fgs: list[Foreground]) -> tuple[list[LayerJob], list[str]]:
    """(jobs, foregrounds without prompts) from a prompts file or the template + backgrounds."""
    jobs: list[LayerJob] = []
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
            jobs.append(LayerJob(len(jobs), fg, k, fg.caption, bg, whole, req.negative))
            n += 1
    return jobs, unprompted


def _job(index: int, fg: Foreground, k: int, r: dict, req: LayersDatasetRequest) -> LayerJob:
    return LayerJob(index, fg, k, r["fg"], r["bg"], r["whole"], r.get("negative", req.negative), r.get("seed"))


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
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LayerctlError(f"cannot read {meta}: {exc}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LayerctlError(f"{meta}:{i}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LayerctlError(f"{meta}:{i}: each line must be a JSON object")
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
                      alpha_threshold: float = 1.0 / 255.0, mask_feather: int = 4, progress=None) -> dict:
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
    r1 = inpaint(model, canvas, 1.0 - a, prompt, negative, steps, cfg, seed, paste_back=False, progress=progress)
    inter8 = to_uint8(composite_rgb(fgf, r1.image))
    fg_mask = a >= alpha_threshold - 1e-6
    m2 = dilate(fg_mask, mask_radius)
    feather = max(0, min(int(mask_feather), int(mask_radius)))
    w2 = feather_inside(m2, feather)
    r2 = inpaint(model, inter8, w2, bg_prompt, negative, steps, cfg, seed + 1, paste_back=True, progress=progress)
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


def _layer_one(job: LayerJob, req: LayersDatasetRequest, model, out: Path, model_ref: str, progress=None) -> dict:
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
    res = make_layer_record(model, canvas, job.prompt, job.bg_prompt, job.negative, seed, req.steps, req.cfg,
                            req.mask_radius, req.alpha_threshold, req.mask_feather, progress)
    rid = f"{slug(Path(job.fg.rel).stem, 32)}-{h[:8]}"
    hh, ww = canvas.shape[:2]
    files = {k: f"{k}/{rid}.png" for k in LAYER_DIRS}
    s1 = res["stages"][0]
    common = {"seed": seed, "steps": s1["steps"], "cfg": s1["cfg"], "size": [ww, hh], "model": model_ref,
              "negative": job.negative, "layerctl_version": __version__}
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


def _job_hash_cheap(job: LayerJob, fg_hashes: dict[str, str]) -> Optional[str]:
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
    todo: list[LayerJob] = []
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
            from layerctl.backends.registry import load_model

            device = req.device
            if shard.world > 1 and device == "auto" and shard.device:
                device = shard.device
            model = load_model(model_ref, device, req.dtype, req.attention)
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
