"""Hub downloads in the precision that runs: which files to ask for (no network)."""

from __future__ import annotations

import pytest
import torch

from layerctl.backends.base import LoadOptions
from layerctl.backends.hub import choose_variant, load_from_hub, wants_half, why_default

SDXL_FILES = [
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
]
SHARDED = ["unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "unet/config.json"]
PLAIN = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.json"]


@pytest.mark.parametrize("dtype,device,files,variant,expected", [
    (torch.float16, "cuda", SDXL_FILES, True, "fp16"),
    (torch.bfloat16, "cuda", SDXL_FILES, True, "fp16"),  # fp16 files cast to bf16 load half the bytes
    (torch.float16, "mps", SHARDED, True, "fp16"),
    (torch.float16, "cuda", SDXL_FILES, False, None),  # --no-variant
    (torch.float32, "cuda", SDXL_FILES, True, None),  # full precision runs: full precision files
    (torch.float32, "cpu", SDXL_FILES, True, None),
    (torch.bfloat16, "cpu", SDXL_FILES, True, None),  # CPU: not a GPU half-precision run
    (torch.float16, "cuda", PLAIN, True, None),  # the repo has no fp16 weights
    (torch.float16, "cuda", None, True, None),  # listing unknown (offline): default files
])
def test_choose_variant(dtype, device, files, variant, expected):
    assert choose_variant(dtype, torch.device(device), files, variant) == expected


def test_why_default_says_why():
    assert why_default(torch.float16, torch.device("cuda"), False) == "--no-variant"
    assert "float32 on cpu" in why_default(torch.float32, torch.device("cpu"), True)
    assert why_default(torch.float16, torch.device("cuda"), True) == "the repo has no fp16 variant"
    assert wants_half(torch.float16, "cuda") and not wants_half(torch.float16, "cuda", variant=False)


class FakePipeline:
    """Records what from_pretrained was asked for; `cached` says which variants are in the cache."""

    calls: list = []
    cached: set = set()

    @classmethod
    def from_pretrained(cls, ref, local_files_only=False, variant=None, **kw):
        cls.calls.append((local_files_only, variant))
        if local_files_only and variant not in cls.cached:
            raise OSError("not cached")
        return (ref, variant)


@pytest.fixture
def fake(monkeypatch):
    FakePipeline.calls, FakePipeline.cached = [], set()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("layerctl.backends.hub._repo_files", lambda ref: SDXL_FILES)
    return FakePipeline


def test_download_asks_for_fp16_on_a_gpu_and_says_so(fake, capsys):
    got = load_from_hub(fake, "owner/xl", {"torch_dtype": torch.float16}, torch.device("cuda"), LoadOptions())
    assert got == ("owner/xl", "fp16")
    assert fake.calls == [(True, "fp16"), (True, None), (False, "fp16")]  # cache first, both kinds
    assert "owner/xl: downloaded and using the fp16 files" in capsys.readouterr().err


def test_no_variant_downloads_the_default_files(fake, capsys):
    got = load_from_hub(fake, "owner/xl", {"torch_dtype": torch.float16}, torch.device("cuda"), LoadOptions(variant=False))
    assert got == ("owner/xl", None) and fake.calls == [(True, None), (False, None)]
    assert "default files (--no-variant)" in capsys.readouterr().err


def test_cached_default_files_are_used_without_a_download(fake, capsys):
    fake.cached = {None}
    got = load_from_hub(fake, "owner/xl", {"torch_dtype": torch.float16}, torch.device("cuda"), LoadOptions())
    assert got == ("owner/xl", None) and all(local for local, _ in fake.calls)
    assert "using the cached default files" in capsys.readouterr().err


def test_offline_and_not_cached_raises_the_cache_error(fake, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not cached"):
        load_from_hub(fake, "owner/xl", {"torch_dtype": torch.float32}, torch.device("cpu"), LoadOptions())
    assert all(local for local, _ in fake.calls)


def test_unreadable_listing_falls_back_to_the_default_files(fake, monkeypatch, capsys):
    monkeypatch.setattr("layerctl.backends.hub._repo_files", lambda ref: None)
    got = load_from_hub(fake, "owner/xl", {"torch_dtype": torch.float16}, torch.device("cuda"), LoadOptions())
    assert got == ("owner/xl", None)
    assert "default files (the repo's file list could not be read)" in capsys.readouterr().err
