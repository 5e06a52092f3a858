"""--offload model|sequential: a generic option (diffusers' CPU offload on the model's pipeline),
refused on machines without CUDA before anything loads."""

from __future__ import annotations

import pytest
import torch

from clihelp import run_cli
from layerctl.errors import LayerctlError

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")


@needs_no_cuda
@pytest.mark.parametrize("model", ["tiny-flux", "tiny"])
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_refused_without_cuda(tmp_path, model, mode):
    out = tmp_path / "o.png"
    code, stdout, stderr = run_cli("gen", "glass bottle", "--model", model, "--out", out, "--offload", mode)
    assert code == 2 and not out.exists() and stdout == ""
    assert f"--offload {mode}" in stderr and "CUDA" in stderr and "Traceback" not in stderr
    assert "random weights" not in stderr  # refused before the model loaded (its notice never came)


def test_offload_value_checked(tmp_path):
    code, _, stderr = run_cli("gen", "x", "--model", "tiny", "--out", tmp_path / "o.png", "--offload", "disk")
    assert code == 2 and "offload" in stderr


def test_offload_on_cpu_device_refused_even_with_cuda(tmp_path):
    code, _, stderr = run_cli("gen", "x", "--model", "tiny", "--out", tmp_path / "o.png", "--offload", "model",
                              "--device", "cpu")
    assert code == 2 and "this run is on cpu" in stderr


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, kind):
        return lambda device=None: self.calls.append((kind, str(device)))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_enabled_once_after_the_weights_are_merged(mode, tmp_path, monkeypatch):
    from layerctl.backends.registry import load_model
    from layerctl.models.flux_lora import save_flux_lora, tiny_layer_lora
    from layerctl.models.kit import ModelKit
    from layerctl.requests import GenRequest

    model = load_model("tiny-flux", "cpu", "fp32")
    rec = _Recorder()
    monkeypatch.setattr(model.pipe, "enable_model_cpu_offload", rec("model"), raising=False)
    monkeypatch.setattr(model.pipe, "enable_sequential_cpu_offload", rec("sequential"), raising=False)
    kit = ModelKit(model, {}, quiet=True, offload=mode)
    before = model.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"].clone()
    kit.use_weights("rgba", GenRequest(prompt="x"))
    assert rec.calls == [(mode, "cpu")]
    assert not torch.equal(model.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"], before)
    kit.use_weights("rgba", GenRequest(prompt="x"))  # the same weights: nothing to do
    assert rec.calls == [(mode, "cpu")]
    lora = save_flux_lora(tiny_layer_lora(model.transformer, seed=9), tmp_path / "l.safetensors")
    other = GenRequest(prompt="x", lora=[str(lora)])
    if mode == "sequential":  # weights live on the meta device now: no merge possible, a clear error
        with pytest.raises(LayerctlError, match="--offload sequential"):
            kit.use_weights("rgba", other)
    else:
        assert kit.use_weights("rgba", other).names == ["l.safetensors", "tiny-rgba"]
        assert rec.calls == [(mode, "cpu")]
    kit.clear_weights()
