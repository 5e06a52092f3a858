"""`layerctl doctor`: device, attention, versions, backends and the official files found / missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from layerctl.core.frames import OFFICIAL_FILES, OFFICIAL_REPO


def _doctor(tmp_path, *args, weights=None):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_OFFLINE="1")
    env.pop("LAYERCTL_WEIGHTS_DIR", None)
    if weights is not None:
        env["LAYERCTL_WEIGHTS_DIR"] = str(weights)
    return subprocess.run([sys.executable, "-m", "layerctl", "doctor", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_doctor_json_lists_backends_device_and_missing_files(tmp_path):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    found = OFFICIAL_FILES["sd15"]["decoder"]
    (wdir / found).write_bytes(b"x")
    r = _doctor(tmp_path, "--json", weights=wdir)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    names = {b["name"] for b in rep["backends"]}
    assert {"toy", "tiny", "tiny-xl", "sd15", "sdxl"} <= names
    assert rep["cuda"] == torch.cuda.is_available()
    if not torch.cuda.is_available():  # this machine: no CUDA -> CPU, fp32, SDPA
        assert (rep["device"], rep["dtype"], rep["gpus"]) == ("cpu", "float32", [])
        assert rep["attention"]["auto_uses"] == "sdpa" and rep["attention"]["sdpa"] is True
    assert rep["versions"]["torch"] == torch.__version__ and rep["versions"]["diffusers"]
    rows = {(f["family"], f["role"]): f for f in rep["official_files"]}
    assert rows[("sd15", "decoder")]["found"] and rows[("sd15", "decoder")]["where"] == "weights-dir"
    assert rows[("sd15", "decoder")]["path"] == str(wdir / found)
    missing = {m["file"]: m for m in rep["missing"]}
    assert found not in missing
    assert OFFICIAL_FILES["sdxl"]["fg2ble"] in missing and OFFICIAL_FILES["sd15"]["joint"] in missing
    joint = missing[OFFICIAL_FILES["sd15"]["joint"]]
    assert joint["used_for"] == "gen --joint" and joint["put_in"] == str(wdir)
    assert joint["download_from"] == f"hub repo {OFFICIAL_REPO}"
    flux_uses = " ".join(f["used_for"] for f in rep["official_files"] if f["family"] == "flux")
    assert "FLUX.1" in flux_uses and "--fg" not in flux_uses and "decompose" not in flux_uses  # no FLUX layer modes
    assert len(rep["missing"]) == len(rep["official_files"]) - 1


def test_doctor_text_names_where_to_put_missing_files(tmp_path):
    r = _doctor(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "backends: " in r.stdout and "tiny-xl (sdxl)" in r.stdout
    assert "layer_xl_transparent_attn.safetensors" in r.stdout and "MISSING" in r.stdout
    assert "--weights-dir or LAYERCTL_WEIGHTS_DIR" in r.stdout


def test_doctor_bad_device_is_a_usage_error(tmp_path):
    r = _doctor(tmp_path, "--device", "tpu")
    assert r.returncode == 2 and "--device must be" in r.stderr and "Traceback" not in r.stderr
