"""Smoke test of the benchmarks under bench/: each main runs with --quick and prints its ratio lines.

In-process (torch and diffusers are imported once), tiny sizes; the timings
themselves are not checked, only that every benchmark measures what it says
and prints it. The GPU benchmark must skip cleanly without CUDA.
"""

from __future__ import annotations

import json
import re

import pytest
from benchhelp import BENCH, load_bench

RATIO = re.compile(r"^ratio (.+?): (\d+\.\d+)x ", re.M)


def load(name: str):
    if not (BENCH / f"{name}.py").exists():
        pytest.skip(f"bench/{name}.py not present")
    return load_bench(name)


def ratios(text: str) -> dict[str, float]:
    return {label: float(r) for label, r in RATIO.findall(text)}


def test_cli_startup_quick(capsys, tmp_path):
    mod = load("cli_startup")
    out_json = tmp_path / "cli.json"
    assert mod.main(["--quick", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    r = ratios(out)
    assert "layerctl --help / python -c pass" in r and "layerctl --version / python -c pass" in r
    # starting layerctl costs something on top of a bare interpreter: a ratio below 1 means broken timing
    assert all(v > 1.0 for v in r.values()), r
    assert re.search(r"^value layerctl --help median: [\d.]+ s  target < 0.3 s: (MET|MISSED)$", out, re.M)
    assert "value heavy modules imported by layerctl.cli: none" in out
    data = json.loads(out_json.read_text())
    assert data["bench"] == "cli_startup" and len(data["ratios"]) == 2 and data["machine"]["commit"]


def test_gen_overhead_quick(capsys):
    mod = load("gen_overhead")
    assert mod.main(["--quick", "--families", "sd15"]) == 0
    out = capsys.readouterr().out
    r = ratios(out)
    for label in ("sd15: layerctl / plain-bare, decode excluded",
                  "sd15: layerctl / plain-same (orchestration only), decode excluded",
                  "sd15: layerctl+decode / plain+decode"):
        assert label in r and r[label] > 0, out
    # layerctl's loop and diffusers' loop, given the same UNet, produce the same latents
    m = re.search(r"^value sd15: max \|latent\(layerctl\) - latent\(plain-same\)\|: (\S+) ", out, re.M)
    assert m and float(m.group(1)) < 1e-3, out
    # the decode-included run is slower than the one with the decode stubbed out
    assert r["sd15: layerctl+decode / plain+decode"] > r["sd15: layerctl / plain-bare, decode excluded"]


def test_decode_quick(capsys):
    mod = load("decode")
    assert mod.main(["--quick", "--no-memory", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    r = ratios(out)
    assert "cpu fp32 64px batch8 / seq8 (one batch of 8 vs 8 single passes)" in r, out
    assert "cpu fp32 64px seq8 / single (cost of 8-way TTA)" in r
    # 8 passes cost more than one
    assert r["cpu fp32 64px seq8 / single (cost of 8-way TTA)"] > 1.5
    # batching the passes changes the arithmetic order only
    m = re.search(r"^value cpu fp32 64px max \|batch8 - seq8\| output: (\S+)", out, re.M)
    assert m and float(m.group(1)) < 1e-4
    assert re.search(r"^note: cpu fp32 64px: measured best chunk [18], default 1: (agrees|DISAGREES)$", out, re.M)


def test_decode_memory_child(capsys):
    """The peak-memory probe (normally a child process) measures a batch of 8 above a single pass."""
    mod = load("decode")
    assert mod.child_main(["128", "single,batch8", "cpu", "1", "1", "1"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    peaks = data["peak_mb"]
    if peaks["single"] is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert peaks["batch8"] > peaks["single"] > 0


def test_gpu_sdxl_quick_skips_without_cuda(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU benchmark is too long for a smoke test")
    mod = load("gpu_sdxl")
    assert mod.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^skip: no CUDA device here", out, re.M)


def test_attention_sharing_quick(capsys):
    mod = load("attention_sharing")
    assert mod.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    r = ratios(out)
    assert "shared-1f / bare (1-frame attention sharing over the base UNet)" in r, out
    assert "fast-1f / shared-1f (prototype over layerctl's unit)" in r
    assert "shared-3f / bare-3 (3-frame joint over the base UNet, same rows)" in r
    # the folded 1-frame prototype computes the same UNet output as layerctl's unit
    m = re.search(r"^value max \|fast-1f - shared-1f\| UNet output \(relative to max \|output\|\): (\S+) ", out, re.M)
    assert m and float(m.group(1)) < 1e-3, out


def test_sampler_overhead_quick(capsys):
    mod = load("sampler_overhead")
    assert mod.main(["--quick", "--samplers", "dpmpp_2m,euler_a,dpmpp_sde"]) == 0
    out = capsys.readouterr().out
    r = ratios(out)
    assert "cfg 1 / cfg 7, same steps (DPM++ 2M Karras, layerctl)" in r
    for label in ("dpmpp_2m (DPM++ 2M Karras): layerctl / plain diffusers",
                  "euler_a (Euler a Normal): layerctl / plain diffusers",
                  "dpmpp_sde (DPM++ SDE Karras): layerctl / plain diffusers"):
        assert label in r and r[label] > 0, (label, r)
    # same components and scheduler: the plain pipeline reproduces layerctl's latents exactly
    assert re.search(r"^value dpmpp_2m: max \|latent\(layerctl\) - latent\(plain\)\|: [\d.e-]+ .*MET$", out, re.M), out
    assert re.search(r"^value dpmpp_sde: layerctl ms per UNet evaluation \(3 evaluations\)", out, re.M)


def test_toy_base_shapes_quick(capsys, tmp_path):
    """bench/toy_base_shapes.py: the base model's own pictures, classified through the grey mask; the same
    measure on the toy world's scenes (its ceiling) gets balls and cups right; a prompt with no shape the
    classifier knows is refused."""
    mod = load("toy_base_shapes")
    out = tmp_path / "base.json"
    assert mod.main(["--quick", "--prompts", "red cup,green ball", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "red cup: base model right " in text and "green ball: base model right " in text
    r = json.loads(out.read_text())["prompts"]
    assert r["red cup"]["of"] == 2 and sum(r["red cup"]["drawn"].values()) == 2
    assert r["green ball"]["ceiling"] > 0.9 and r["red cup"]["ceiling"] > 0.7
    assert r["red cup"]["seed_spread"] > 0.0
    # the world's own cups differ from each other (position, size, colour shade): the spread a model should reach
    assert 0.01 < r["red cup"]["world_spread"] < 0.2
    assert "(the scenes' own " in text
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--prompts", "red zebra"])
    assert e.value.code == 2


def test_toy_base_shapes_vae_ceiling(capsys, tmp_path):
    """--vae-only: the scenes' own shapes before and after the folder's base VAE (no UNet drawn). A yellow
    bottle survives the shipped VAE's round trip, not an untrained VAE's."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from layerctl.backends import toy

    mod = load("toy_base_shapes")
    runs = {}
    for name in ("shipped", "untrained"):
        folder = tmp_path / name
        folder.mkdir()
        for key in ("vae", "text_encoder", "unet"):
            shutil.copy(toy.weight_path(key), folder / toy.FILES[key])
        if name == "untrained":
            vae = toy.build_components(seed=0)[0]
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"),
                      metadata={"scaling_factor": "1.0"})
        out = tmp_path / f"{name}.json"
        args = ["--vae-only", "--reference", "12", "--prompts", "yellow bottle", "--model-dir", str(folder), "--json", str(out)]
        assert mod.main(args) == 0
        runs[name] = json.loads(out.read_text())["prompts"]["yellow bottle"]
    text = capsys.readouterr().out
    assert "yellow bottle: same measure on the scenes" in text and "base model right" not in text
    assert runs["shipped"]["of"] == 0 and runs["shipped"]["size"] == 64
    assert runs["shipped"]["ceiling"] == runs["untrained"]["ceiling"] > 0.9
    assert runs["shipped"]["vae_ceiling"] > 0.9 > runs["untrained"]["vae_ceiling"]
