"""The FLUX.1 benchmarks run: gen_overhead's flux family (tiny-flux against a plain FluxPipeline of the
same components, latents identical) and bench/gpu_flux.py (a `skip:` line without CUDA; its code path
on tiny-flux configs on the CPU)."""

from __future__ import annotations

import re

import pytest
import torch
from benchhelp import load_bench as load


def test_gen_overhead_flux_family(capsys):
    assert load("gen_overhead").main(["--quick", "--families", "flux", "--no-decode"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^value flux: max \|latent\(layerctl\) - latent\(plain-same\)\|: (\S+) ", out, re.M)
    assert m and float(m.group(1)) == 0.0, out  # the one loop gives FluxPipeline's latents exactly
    assert re.search(r"^ratio flux: layerctl / plain-bare, decode excluded: [\d.]+x", out, re.M), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip")
def test_gpu_flux_skips_without_cuda(capsys, tmp_path):
    import json

    assert load("gpu_flux").main(["--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^skip: no CUDA device here: the FLUX.1 GPU benchmark", out, re.M), out
    assert json.loads((tmp_path / "r.json").read_text())["notes"][0].startswith("SKIPPED")


def test_gpu_flux_code_path_on_tiny_configs(capsys):
    assert load("gpu_flux").main(["--tiny", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^value max \|latent\(layerctl\) - latent\(plain\)\|: (\S+) ", out, re.M)
    assert m and float(m.group(1)) == 0.0, out
    assert "ratio layerctl / plain FluxPipeline, decode excluded" in out
    assert len(re.findall(r"^value 8-way TTA decode \(VAE \+ D_a\) at 64 px, chunk [148]: ", out, re.M)) == 3
