"""Will a job fit in memory? A cheap estimate made before any model loads.

The rule (also in docs/limits.md): a job needs at least

    width x height x images x frames x BYTES_PER_PIXEL

bytes, where `images` is --batch, `frames` the pictures made per image (1 for RGBA, 2 for
--bg/--fg, 3 for --joint and decompose) and the size the largest one the job works at (after
--hires or --scale). BYTES_PER_PIXEL = 1024: the VAE decoder and the transparent decoder hold
several 128-channel float32 feature maps at the full output size (512 bytes a pixel each), so
this is a lower bound, not a promise. A job whose estimate is over the memory of its device
(the GPU's total memory for cuda, the machine's RAM otherwise) is refused with exit 2; a job
under it can still run out of memory.
"""

from __future__ import annotations

import os

from layerctl.errors import LayerctlError

BYTES_PER_PIXEL = 1024


def device_memory(device: str) -> tuple[str, int | None]:
    """(what, bytes) of the memory a job on `device` can use; bytes None when unknown."""
    if device in ("auto", "cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return "GPU memory", int(torch.cuda.get_device_properties(0).total_memory)
        except Exception:  # noqa: BLE001 - no torch / no driver: fall back to RAM
            pass
    try:
        return "RAM", int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return "RAM", None


def estimate_bytes(width: int, height: int, images: int = 1, frames: int = 1) -> int:
    return int(width) * int(height) * max(1, int(images)) * max(1, int(frames)) * BYTES_PER_PIXEL


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(req, frames: int = 1, width: int | None = None, height: int | None = None, scale: float = 1.0) -> None:
    """Refuse (exit 2) a job that clearly cannot fit on its device. Unknown sides count as 64 px
    (the model's native size is not known before it loads: the estimate stays a lower bound)."""
    w = width or getattr(req, "width", None) or 64
    h = height or getattr(req, "height", None) or 64
    w, h = int(w * scale), int(h * scale)
    images = getattr(req, "batch", 1) or 1
    need = estimate_bytes(w, h, images, frames)
    what, have = device_memory(getattr(req, "device", "auto") or "auto")
    if have and need > have:
        raise LayerctlError(
            f"{w}x{h} x {images} image(s) x {frames} frame(s) needs at least {_gib(need)}, more than the "
            f"{_gib(have)} of {what} here (rule: width x height x images x frames x {BYTES_PER_PIXEL} bytes; "
            f"see docs/limits.md): use a smaller size or batch"
        )
