"""The wheel users install holds every subpackage, the backends and the toy weights."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("layerctl-*.whl")
    return zipfile.ZipFile(whl)


def test_every_subpackage_and_module_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "layerctl").rglob("*.py")}
    on_disk |= {"layerctl/backends/" + p.name for p in (ROOT / "backends").glob("*.py")}
    missing = sorted(on_disk - names)
    assert not missing, f"not in the wheel: {missing}"


def test_toy_weights_and_entry_points_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    weights = {p.name for p in (ROOT / "layerctl" / "toy_weights").iterdir() if p.suffix in (".safetensors", ".json")}
    assert weights and all(f"layerctl/toy_weights/{w}" in names for w in weights)
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(ep).decode()
    assert "[layerctl.backends]" in text and "toy = layerctl.backends.toy:ToyBackend" in text
    assert "layerctl = layerctl.cli:main" in text


def test_shipped_model_configs_and_clip_merges_are_in_the_wheel(wheel):
    """Single files load offline only if the diffusers configs and the CLIP merges ship with layerctl."""
    names = set(wheel.namelist())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "layerctl" / "configs").rglob("*") if p.is_file()}
    assert {"layerctl/configs/sd15/unet/config.json", "layerctl/configs/sdxl/text_encoder_2/config.json",
            "layerctl/configs/sdxl-inpainting/unet/config.json", "layerctl/configs/clip/bpe_simple_vocab_16e6.txt.gz",
            "layerctl/configs/clip/LICENSE.txt"} <= on_disk
    missing = sorted(on_disk - names)
    assert not missing, f"not in the wheel: {missing}"


def test_every_folder_of_the_package_is_listed_for_setuptools():
    """A folder under layerctl/ missing from `packages` still ships through package-data, but setuptools warns
    at every install ("Package would be ignored") and will drop it in a later release."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"layerctl"} | {
        ".".join(p.relative_to(ROOT).parts) for p in (ROOT / "layerctl").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(f.is_file() and f.suffix != ".pyc" for f in p.iterdir())
    }
    assert not sorted(folders - listed), f"folders not in [tool.setuptools] packages: {sorted(folders - listed)}"
