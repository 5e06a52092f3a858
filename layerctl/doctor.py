"""`layerctl doctor`: what this machine and installation give layerctl, as one report.

Device, dtype and attention as a job would choose them, library versions, the registered
backends, and which official LayerDiffuse files are found where (weights folder, Hugging Face
cache), which are missing, what they are needed for and where to put them. Nothing is
downloaded and no model is loaded.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

from layerctl import __version__

PACKAGES = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "peft", "accelerate", "xformers")

# what each official file is needed for (role -> the commands/modes that load it)
ROLE_USES = {
    "decoder": "every mode (decodes the transparent picture)",
    "encoder": "transparent inputs: gen --fg/--bg, --init/--mask, upscale, decompose",
    "rgba": "gen (text -> RGBA), --init/--mask/--hires, upscale",
    "rgba_conv": "gen --layer-weights (the conv alternative to rgba)",
    "joint": "gen --joint",
    "fg2bg": "gen --fg (SD1.5)",
    "bg2fg": "gen --bg (SD1.5)",
    "fg2ble": "gen --fg (SDXL, stage 1: blended)",
    "fgble2bg": "gen --fg (SDXL, stage 2: background)",
    "bg2ble": "gen --bg (SDXL, stage 1: blended)",
    "bgble2fg": "gen --bg (SDXL, stage 2: foreground)",
}
# FLUX.1 has no layer modes: its two files serve text/image -> RGBA only
FLUX_ROLE_USES = {
    "decoder": "every FLUX.1 job (TransparentVAE.pth: decodes the transparent picture)",
    "encoder": "FLUX.1 transparent inputs: --init/--mask, upscale (TransparentVAE.pth)",
    "rgba": "FLUX.1 gen (text -> RGBA), --init/--mask/--hires, upscale",
}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"layerctl": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_report(device: str = "auto", dtype: str = "auto") -> dict:
    import importlib.util

    import torch

    from layerctl.backends.base import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    has_x = importlib.util.find_spec("xformers") is not None
    return {
        "device": dev.type,
        "dtype": str(dt).removeprefix("torch."),
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps": mps,
        "cpu_threads": torch.get_num_threads(),
        "attention": {
            "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
            "xformers": has_x,
            "auto_uses": "xformers" if has_x and dev.type == "cuda" else "sdpa",
        },
    }


def backends_report() -> list[dict]:
    from layerctl.backends.registry import _resolve, available_backends

    rows = []
    for name, target in sorted(available_backends().items()):
        try:
            cls = _resolve(target)
            rows.append({"name": name, "family": cls.family, "description": cls.description})
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, not fatal
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def official_files(wdir: Optional[str]) -> list[dict]:
    from layerctl.core.flux_facts import FLUX_OFFICIAL_FILES, official_repo_for
    from layerctl.core.frames import OFFICIAL_FILES, OFFICIAL_REPO
    from layerctl.models.weights import locate_official

    tables = dict(OFFICIAL_FILES, flux=FLUX_OFFICIAL_FILES)
    rows = []
    for family, table in tables.items():
        for role, filename in table.items():
            where, path = locate_official(filename, wdir)
            rows.append({
                "family": family, "role": role, "file": filename, "found": where is not None, "where": where,
                "path": str(path) if path else None, "used_for": (FLUX_ROLE_USES if family == "flux" else ROLE_USES).get(role, role),
                "repo": official_repo_for(filename, OFFICIAL_REPO),
            })
    return rows


def report(weights_dir: Optional[str] = None, device: str = "auto", dtype: str = "auto") -> dict:
    from layerctl.models.weights import weights_dir as resolve_wdir

    try:
        from huggingface_hub import constants

        hf_cache = str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        hf_cache = None
    wdir = resolve_wdir(weights_dir)
    files = official_files(weights_dir)
    put = str(wdir) if wdir else "a folder given by --weights-dir or LAYERCTL_WEIGHTS_DIR"
    return {
        "versions": versions(),
        "platform": platform.platform(),
        **device_report(device, dtype),
        "backends": backends_report(),
        "weights_dir": str(wdir) if wdir else None,
        "weights_dir_exists": bool(wdir and wdir.is_dir()),
        "hf_cache": hf_cache,
        "offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        "official_files": files,
        "missing": [
            {"file": f["file"], "family": f["family"], "role": f["role"], "used_for": f["used_for"],
             "put_in": put, "download_from": f"hub repo {f['repo']}"}
            for f in files if not f["found"]
        ],
    }


def text_lines(r: dict) -> list[str]:
    """The report for a person."""
    v = r["versions"]
    att = r["attention"]
    lines = [
        f"layerctl {v['layerctl']} (python {v['python']}, {r['platform']})",
        "libraries: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("torch", "diffusers", "transformers",
                                                                                "huggingface_hub", "peft", "accelerate", "xformers")),
        f"device: {r['device']} ({r['dtype']}); CUDA: {', '.join(r['gpus']) if r['cuda'] else 'not available'}; "
        f"MPS: {'available' if r['mps'] else 'not available'}",
        f"attention: {att['auto_uses']} (SDPA {'yes' if att['sdpa'] else 'no'}, xformers "
        f"{'installed' if att['xformers'] else 'not installed'})",
        "backends: " + ", ".join(b["name"] + (f" [error: {b['error']}]" if "error" in b else f" ({b['family']})") for b in r["backends"]),
        f"weights folder: {r['weights_dir'] or 'not set (--weights-dir / LAYERCTL_WEIGHTS_DIR)'}"
        + ("" if r["weights_dir_exists"] or not r["weights_dir"] else " (does not exist)"),
        f"Hugging Face cache: {r['hf_cache']}" + (" (offline)" if r["offline"] else ""),
        "official LayerDiffuse files:",
    ]
    for f in r["official_files"]:
        where = f"{f['where']}: {f['path']}" if f["found"] else "MISSING"
        lines.append(f"  {f['family']:5} {f['role']:9} {f['file']:48} {where}  -- {f['used_for']}")
    if r["missing"]:
        by_repo = sorted({m["download_from"] for m in r["missing"]})
        lines.append(f"{len(r['missing'])} missing: download them from the {' / '.join(by_repo)} into "
                     f"{r['missing'][0]['put_in']} (or run once online to fill the Hugging Face cache)")
    return lines
