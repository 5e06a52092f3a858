"""Finding LayerDiffuse weight files, and the in-memory stand-ins the tiny backends use.

Official files are looked up by their released names in --weights-dir /
LAYERCTL_WEIGHTS_DIR, then in the Hugging Face cache, then downloaded when
online. Offline and missing: one error naming the files and where they go.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from layerctl.core.frames import OFFICIAL_REPO
from layerctl.core.flux_facts import official_repo_for
from layerctl.errors import LayerctlError


def weights_dir(explicit: Optional[str]) -> Optional[Path]:
    d = explicit or os.environ.get("LAYERCTL_WEIGHTS_DIR")
    return Path(d).expanduser() if d else None


def check_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerctlError(f"{what} not found: {p}")
    if not os.access(p, os.R_OK):
        raise LayerctlError(f"{what} is not readable: {p}")
    return p


def locate_official(filename: str, wdir: Optional[str]) -> tuple[Optional[str], Optional[Path]]:
    """Where an official file is now, without downloading: ("weights-dir" | "hf-cache", path) or (None, None)."""
    d = weights_dir(wdir)
    if d is not None and (d / filename).is_file():
        return "weights-dir", d / filename
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(official_repo_for(filename, OFFICIAL_REPO), filename)
    except Exception:  # noqa: BLE001 - no usable cache
        hit = None
    if isinstance(hit, str) and Path(hit).is_file():
        return "hf-cache", Path(hit)
    return None, None


def find_official(filenames: list[str], wdir: Optional[str]) -> list[Path]:
    """Paths of official files by released name: weights dir, HF cache, then download (when online)."""
    d = weights_dir(wdir)
    found: dict[str, Path] = {}
    for name in filenames:
        if Path(name).is_absolute():  # a backend that ships its own files (e.g. toy)
            if Path(name).is_file():
                found[name] = Path(name)
        elif d is not None and (d / name).is_file():
            found[name] = d / name
    missing = [n for n in filenames if n not in found]
    if missing:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover - a dependency
            hf_hub_download = None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        for name in list(missing):
            if hf_hub_download is None or Path(name).is_absolute():
                break
            for local_only in (True, False):
                if not local_only and offline:
                    break
                try:
                    repo = official_repo_for(name, OFFICIAL_REPO)  # the FLUX.1 files live in their own repo
                    found[name] = Path(hf_hub_download(repo, name, local_files_only=local_only))
                    missing.remove(name)
                    break
                except Exception:  # noqa: BLE001 - not cached / no network
                    continue
    if missing:
        where = f"--weights-dir {d}" if d else "a folder given by --weights-dir or LAYERCTL_WEIGHTS_DIR"
        repos = ", ".join(sorted({official_repo_for(n, OFFICIAL_REPO) for n in missing}))
        raise LayerctlError(
            f"missing LayerDiffuse weights: {', '.join(missing)}. Download them from the Hugging Face repo "
            f"{repos} into {where} (or run once online to fill the Hugging Face cache)"
        )
    return [found[n] for n in filenames]


# ---------------------------------------------------------------- tiny stand-ins


def _seeded_(module, seed: int, std: float = 0.05) -> None:
    """Fill every parameter deterministically (random weights so every code path matters)."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            elif "temporal_n.weight" in name or p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) * (std if "lora" in name else fan_in**-0.5))


def tiny_decoder():
    """A narrow transparent decoder with seeded random weights for the tiny backends."""
    from layerctl.models.transparent_vae import new_decoder

    dec = new_decoder(seed=7, block_out_channels=(8, 8, 16, 16, 32, 32, 32))
    _seeded_(dec, 7)
    return dec.eval()


def tiny_encoder():
    from layerctl.models.transparent_vae import new_encoder

    enc = new_encoder(seed=8)
    _seeded_(enc, 8)
    return enc.eval()


def tiny_attention_sharing(model, frames: int, use_control: bool, seed: int):
    import torch

    from layerctl.models.attention_sharing import AttentionSharingPatcher

    patcher = AttentionSharingPatcher(model.unet, frames, use_control, rank=4)
    _seeded_(patcher, seed, std=0.05)
    patcher = patcher.to(model.device, model.dtype)
    if patcher.kwargs_encoder is not None:  # the official code runs the control encoder in float32 on the CPU
        patcher.kwargs_encoder.to("cpu", torch.float32)
    return patcher


def tiny_patch(model, role: str):
    """In-memory stand-ins for the SDXL patch files on the tiny-xl UNet (same shapes rules)."""
    import torch

    from layerctl.models.patches import Patch, diff_to_patch_entries, lora_to_patch_entries

    unet = model.unet
    g = torch.Generator("cpu").manual_seed(sum(map(ord, role)))
    if role == "rgba":
        pairs = {}
        for name, mod in sorted(unet.named_modules()):
            if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")) or name.endswith(
                ("attn1.to_out.0", "attn2.to_out.0")
            ):
                w = mod.weight
                pairs[name] = (
                    torch.randn((w.shape[0], 4), generator=g) * 0.05,
                    torch.randn((4, w.shape[1]), generator=g) * 0.05,
                )
        return Patch(lora_to_patch_entries(pairs), source=f"tiny-{role}")
    extra = {"fg2ble": 4, "bg2ble": 4, "fgble2bg": 8, "bgble2fg": 8}[role]
    w = unet.conv_in.weight
    deltas = {"conv_in.weight": torch.cat(
        [torch.zeros_like(w, dtype=torch.float32), torch.randn((w.shape[0], extra, *w.shape[2:]), generator=g) * 0.05], dim=1
    )}
    for name, p in sorted(unet.named_parameters()):
        if name.startswith(("down_blocks.0.resnets", "mid_block.resnets")) and name.endswith("weight") and p.ndim > 1:
            deltas[name] = torch.randn(p.shape, generator=g) * 0.01
    return Patch(diff_to_patch_entries(deltas), source=f"tiny-{role}")


def is_attention_sharing_file(path) -> bool:
    """True for SD1.5 attention-sharing files (hookers.* / kwargs_encoder.* keys), False for patch files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(k.startswith(("hookers.", "kwargs_encoder.")) for k in f.keys())
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read weights file {path}: {exc}") from None
