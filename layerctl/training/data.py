"""Training data for the transparency VAE: RGBA folders, Hugging Face imagefolders, synthetic.

What every source gives, per sample, at a fixed square resolution (a multiple of 64):

    rgba    [4,H,W] float32 in [0,1], straight RGB + alpha
    padded  [3,H,W] float32: the colour padding of `layerctl.core.imagemath.pad_rgb`
                    (the same function the inference path uses)

Sample order is a pure function of (seed, position): position p of a
training stream is epoch p // N of a seeded permutation, and its augmentation
(random crop/resize, flips) comes from a generator seeded by (seed, p). A run
that resumes at position p therefore sees exactly the images and crops an
uninterrupted run would have seen; nothing but the step counter has to be
saved. With several processes, micro-batch m of process r of W takes
positions ((m*W + r)*B ... (m*W + r)*B + B-1).

Folder scanning (`scan_folder`) only opens file headers, so it can run
before any model loads and fail early with a clear message.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from layerctl.errors import LayerctlError

IMAGE_EXTS = (".png", ".webp", ".tif", ".tiff")
SPLIT_TRAIN = ("train",)
SPLIT_VAL = ("validation", "valid", "val", "test")
CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass
class ImageRecord:
    path: Path
    caption: Optional[str] = None


@dataclass
class FolderScan:
    """What a folder holds: usable RGBA images, and what was left out (with counts)."""

    root: Path
    records: list[ImageRecord]
    layout: str  # "folder" or "imagefolder"
    n_files: int = 0  # image files looked at
    no_alpha: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # named in metadata.jsonl but absent

    def summary(self) -> str:
        parts = [f"{len(self.records)} RGBA image(s)"]
        if self.no_alpha:
            parts.append(f"{len(self.no_alpha)} without alpha ignored")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        if self.missing:
            parts.append(f"{len(self.missing)} listed in metadata.jsonl but missing")
        return f"{self.root} ({self.layout}): " + ", ".join(parts)


def has_alpha(im) -> bool:
    """Whether a PIL image (opened lazily) carries transparency."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    if "A" in im.getbands():
        return True
    return "transparency" in im.info  # palette or colour-key transparency


def probe_image(path: Path) -> str:
    """'rgba', 'opaque' or 'unreadable' from the file header (no full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return "rgba" if has_alpha(im) else "opaque"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "unreadable"


def _list_images(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTS):
                out.append(Path(dirpath) / name)
    return out


def _read_metadata(meta: Path) -> list[ImageRecord]:
    recs = []
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
            raise LayerctlError(f"{meta}:{i}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise LayerctlError(f"{meta}:{i}: each line needs a \"file_name\" string")
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
        recs.append(ImageRecord(meta.parent / row["file_name"], caption))
    return recs


def scan_folder(root: str | os.PathLike, what: str = "dataset", require: bool = True) -> FolderScan:
    """Find the RGBA images of a folder (recursive) or a Hugging Face imagefolder split.

    A `metadata.jsonl` in `root` (HF imagefolder) lists the files (`file_name`)
    and optional captions (`text`/`caption`/`prompt`); otherwise every
    PNG/WebP/TIFF below `root` is a candidate. Raises LayerctlError when the
    folder is missing or empty, or holds no image with alpha (when `require`).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise LayerctlError(f"{what} folder not found: {root}")
    if not root.is_dir():
        raise LayerctlError(f"{what} must be a folder of images, got a file: {root}")
    meta = root / "metadata.jsonl"
    if meta.is_file():
        candidates = _read_metadata(meta)
        layout = "imagefolder"
    else:
        candidates = [ImageRecord(p) for p in _list_images(root)]
        layout = "folder"
    scan = FolderScan(root=root, records=[], layout=layout)
    for rec in candidates:
        if not rec.path.exists():
            scan.missing.append(rec.path)
            continue
        scan.n_files += 1
        kind = probe_image(rec.path)
        if kind == "rgba":
            scan.records.append(rec)
        elif kind == "opaque":
            scan.no_alpha.append(rec.path)
        else:
            scan.unreadable.append(rec.path)
    if require:
        exts = "/".join(e.lstrip(".") for e in IMAGE_EXTS)
        if not candidates:
            raise LayerctlError(f"{what} folder {root} holds no images ({exts}, searched recursively)")
        if not scan.records:
            bits = [f"read {scan.n_files} image(s)"]
            if scan.no_alpha:
                bits.append(f"{len(scan.no_alpha)} without an alpha channel")
            if scan.unreadable:
                bits.append(f"{len(scan.unreadable)} unreadable")
            if scan.missing:
                bits.append(f"{len(scan.missing)} missing from metadata.jsonl")
            raise LayerctlError(
                f"{what} folder {root}: no image with an alpha channel ({', '.join(bits)}); "
                "training a transparency VAE needs RGBA images"
            )
    return scan


def find_splits(root: str | os.PathLike) -> tuple[Path, Optional[Path]]:
    """(train folder, validation folder or None) of a dataset root.

    A root with a `train/` subfolder is read as a Hugging Face imagefolder with
    splits (`validation/`, `valid/`, `val/` or `test/` held out); otherwise the
    root itself is the training split and there is no separate validation folder.
    """
    root = Path(root).expanduser()
    if root.is_dir() and (root / "train").is_dir():
        val = next((root / s for s in SPLIT_VAL if (root / s).is_dir()), None)
        return root / "train", val
    return root, None


def split_holdout(records: Sequence[ImageRecord], count: int, seed: int) -> tuple[list, list]:
    """Deterministically hold out `count` records (chosen by a seeded hash of the path)."""
    if count <= 0 or len(records) < 2:
        return list(records), []
    count = min(count, len(records) // 2)
    keyed = sorted(records, key=lambda r: (zlib.crc32(f"{seed}:{r.path.as_posix()}".encode()), r.path.as_posix()))
    held = set(id(r) for r in keyed[:count])
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


# ---------------------------------------------------------------- image ops (float, premultiplied)


def load_rgba(path: Path) -> np.ndarray:
    """HxWx4 float32 straight RGBA in [0,1]; raises OSError/ValueError on unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
            return np.concatenate([np.repeat(arr[..., None], 3, -1), np.ones_like(arr)[..., None]], -1)
        im = im.convert("RGBA")
        return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def crop_resize(rgba: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop box (top, left, h, w) and resize to size x size, antialiased, on premultiplied colour."""
    import torch
    import torch.nn.functional as F

    t, l, h, w = box
    crop = rgba[t : t + h, l : l + w]
    if crop.shape[0] == size and crop.shape[1] == size:
        return np.ascontiguousarray(crop)
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
    prem = torch.cat([x[:, :3] * x[:, 3:], x[:, 3:]], 1)
    out = F.interpolate(prem, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.clamp(0, 1)[0]
    a = out[3:]
    rgb = torch.where(a > 1e-6, out[:3] / a.clamp_min(1e-6), torch.zeros_like(out[:3])).clamp(0, 1)
    return torch.cat([rgb, a], 0).permute(1, 2, 0).numpy()


def random_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random square box whose side is a fraction in `scale` of the short side."""
    short = min(h, w)
    frac = rng.uniform(scale[0], scale[1]) if scale[1] > scale[0] else scale[0]
    side = max(1, min(short, int(round(short * frac))))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return top, left, side, side


def centre_box(h: int, w: int) -> tuple[int, int, int, int]:
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


# ---------------------------------------------------------------- datasets (map-style, by position)


class RGBAStream:
    """Base: item(position) -> dict(rgba, padded, caption, bad), deterministic per position."""

    def __init__(self, resolution: int, seed: int, augment: bool, hflip: bool = True, vflip: bool = False):
        if resolution <= 0 or resolution % 64:
            raise ValueError(f"resolution must be a positive multiple of 64 (got {resolution})")
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.augment = augment
        self.hflip = hflip
        self.vflip = vflip

    def aug_rng(self, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, 0xA06, int(pos)])

    def _finish(self, rgba: np.ndarray, rng: Optional[np.random.Generator], caption, bad) -> dict:
        from layerctl.core.imagemath import pad_rgb

        if rng is not None:
            if self.hflip and rng.random() < 0.5:
                rgba = rgba[:, ::-1]
            if self.vflip and rng.random() < 0.5:
                rgba = rgba[::-1]
        rgba = np.ascontiguousarray(rgba, dtype=np.float32)
        padded = pad_rgb(rgba)
        import torch

        return {
            "rgba": torch.from_numpy(rgba).permute(2, 0, 1).contiguous(),
            "padded": torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1).contiguous(),
            "caption": caption or "",
            "bad": list(bad),
        }

    def __getitem__(self, pos: int) -> dict:
        raise NotImplementedError


class SyntheticStream(RGBAStream):
    """Procedural RGBA images (layerctl.training.synthetic), drawn at the training resolution."""

    def __init__(self, resolution: int, seed: int, augment: bool = True, source=None, length: Optional[int] = None, **kw):
        super().__init__(resolution, seed, augment, **kw)
        from layerctl.training.synthetic import SyntheticSource

        self.source = source or SyntheticSource(seed=seed)
        self.length = length  # None: an endless stream (positions are sample indices)

    def __len__(self):
        return self.length if self.length is not None else 2**62

    def __getitem__(self, pos: int) -> dict:
        s = self.source.sample(int(pos), self.resolution)
        return self._finish(s.rgba, self.aug_rng(pos) if self.augment else None, s.caption, [])


class FolderStream(RGBAStream):
    """RGBA image files: a seeded permutation per epoch, random square crops (augment) or centre crops."""

    MAX_TRIES = 64

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        seed: int,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        **kw,
    ):
        super().__init__(resolution, seed, augment, **kw)
        if not records:
            raise ValueError("no images")
        self.records = list(records)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.records) if not self.augment else 2**62

    def index(self, pos: int) -> int:
        n = len(self.records)
        if not self.augment:
            return int(pos) % n
        epoch, k = divmod(int(pos), n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xE90C, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def __getitem__(self, pos: int) -> dict:
        bad = []
        idx = self.index(pos)
        for attempt in range(min(self.MAX_TRIES, len(self.records))):
            rec = self.records[(idx + attempt) % len(self.records)]
            try:
                rgba = load_rgba(rec.path)
            except Exception:  # noqa: BLE001 - unreadable: skip, count, take the next one
                bad.append(str(rec.path))
                continue
            h, w = rgba.shape[:2]
            if self.augment:
                rng = self.aug_rng(pos)
                box = random_box(h, w, rng, self.crop_scale)
            else:
                rng, box = None, centre_box(h, w)
            rgba = crop_resize(rgba, box, self.resolution)
            return self._finish(rgba, rng, rec.caption, bad)
        raise LayerctlError(f"{len(bad)} images in a row could not be read (last: {bad[-1] if bad else '?'})")


def collate(items: list[dict]) -> dict:
    import torch

    return {
        "rgba": torch.stack([it["rgba"] for it in items]),
        "padded": torch.stack([it["padded"] for it in items]),
        "caption": [it["caption"] for it in items],
        "bad": [b for it in items for b in it["bad"]],
    }


class PositionBatches:
    """Batch sampler: micro-batch m of process `rank` takes positions ((m*world + rank)*B + b).

    Endless; starts at micro-batch `start` (resume). Works with DataLoader workers
    because every item depends on its position only.
    """

    def __init__(self, batch_size: int, start: int = 0, rank: int = 0, world: int = 1, stop: Optional[int] = None):
        self.batch_size, self.start, self.rank, self.world, self.stop = batch_size, start, rank, world, stop

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while self.stop is None or m < self.stop:
            base = (m * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))
            m += 1

    def __len__(self):
        return (self.stop - self.start) if self.stop is not None else 2**62


def fixed_batches(stream, count: int, batch_size: int) -> Iterator[dict]:
    """Positions 0..count-1 of a (non-augmenting) stream, in batches (validation/eval)."""
    for start in range(0, count, batch_size):
        yield collate([stream[p] for p in range(start, min(count, start + batch_size))])
