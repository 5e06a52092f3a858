"""Hub models in the precision that will run: the repo's fp16 files when layerctl runs in fp16 or
bf16 on a GPU (half the download for repos that keep fp32 as the default files), the default
files otherwise or with --no-variant. The cache is tried first; offline, only the cache.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

from layerctl.progress import log

FP16_FILE = re.compile(r"\.fp16(-\d+-of-\d+)?\.(safetensors|bin)$")


def wants_half(dtype, device, variant: bool = True) -> bool:
    """Whether half-precision files would serve: fp16/bf16 on CUDA or MPS, unless --no-variant."""
    import torch

    dev = getattr(device, "type", device)
    return bool(variant) and dev in ("cuda", "mps") and dtype in (torch.float16, torch.bfloat16)


def choose_variant(dtype, device, repo_files: Optional[Iterable[str]], variant: bool = True) -> Optional[str]:
    """"fp16" when half precision will run and the repo lists fp16 weight files; None = the default files."""
    if not wants_half(dtype, device, variant) or repo_files is None:
        return None
    return "fp16" if any(FP16_FILE.search(str(f)) for f in repo_files) else None


def why_default(dtype, device, variant: bool) -> str:
    """Why the default files are used, in a few words (for the notice)."""
    if not variant:
        return "--no-variant"
    if not wants_half(dtype, device):
        return f"running in {str(dtype).removeprefix('torch.')} on {getattr(device, 'type', device)}"
    return "the repo has no fp16 variant"


def _repo_files(ref: str) -> Optional[list[str]]:
    try:
        from huggingface_hub import list_repo_files

        return list_repo_files(ref)
    except Exception:  # noqa: BLE001 - no network / private repo: the default files, as before
        return None


def load_from_hub(pipeline_cls, ref: str, kwargs: dict, device, options):
    """from_pretrained for a hub id: the cache first (fp16 files when wanted), then a download."""
    dtype = kwargs.get("torch_dtype")
    half = wants_half(dtype, device, options.variant)
    for variant in (["fp16", None] if half else [None]):
        try:
            pipe = pipeline_cls.from_pretrained(ref, local_files_only=True, variant=variant, **kwargs)
        except Exception:  # noqa: BLE001 - not cached in this variant
            continue
        log(f"layerctl: {ref}: using the cached {variant or 'default'} files", options.quiet)
        return pipe
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return pipeline_cls.from_pretrained(ref, local_files_only=True, **kwargs)  # raises the cache's own error
    files = _repo_files(ref) if half else None
    variant = choose_variant(dtype, device, files, options.variant)
    pipe = pipeline_cls.from_pretrained(ref, variant=variant, **kwargs)
    why = "the repo's file list could not be read" if half and files is None else why_default(dtype, device, options.variant)
    what = "fp16 files" if variant else f"default files ({why})"
    log(f"layerctl: {ref}: downloaded and using the {what}", options.quiet)
    return pipe
