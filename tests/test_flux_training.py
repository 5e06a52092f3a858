"""eval-vae and train-vae on tiny-flux: the nets take their latent width (16) from the backend and
the FLUX.1 conventions (alpha-last encoder input, unclipped decoder pixels, [R,G,B,A] out)."""

from __future__ import annotations

import json

import pytest
import torch

from clihelp import run_cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def frozen():
    from layerctl.training.vae import load_frozen_vae

    return load_frozen_vae("tiny-flux", torch.device("cpu"))


def _rgba(n=2, size=64, seed=3):
    from layerctl.training.synthetic import SyntheticSource

    src = SyntheticSource(seed=seed)
    arr = [torch.from_numpy(src.sample(i, size).to_uint8()).permute(2, 0, 1).float() / 255 for i in range(n)]
    return torch.stack(arr)


def test_frozen_flux_vae_drops_the_transformer(frozen):
    assert frozen.family == "flux" and frozen.pipe.transformer is None and frozen.latent_channels == 16


def test_evaluate_uses_the_flux_conventions(frozen):
    """eval-vae's numbers equal the FLUX.1 inference path written out by hand."""
    from layerctl.core.imagemath import pad_rgb_torch
    from layerctl.models.flux_vae import decode_rgba, encode_offset, tiny_flux_decoder, tiny_flux_encoder
    from layerctl.training.metrics import MetricSums, batch_metrics
    from layerctl.training.vae import evaluate

    enc, dec = tiny_flux_encoder(), tiny_flux_decoder()
    rgba = _rgba()
    batch = {"rgba": rgba, "padded": pad_rgb_torch(rgba)}
    got = evaluate(frozen, enc, dec, [batch])
    mean, std = frozen.vae_encode((rgba[:, :3] * 2 - 1) * rgba[:, 3:4])
    latent = mean + std * encode_offset(enc, rgba)
    pixels = frozen.vae_decode(latent, clip=False)
    assert pixels.min() < 0 or pixels.max() > 1  # the unclipped values matter on this VAE
    pred = decode_rgba(dec, pixels, latent, tta=False)
    sums = MetricSums()
    sums.add(batch_metrics(pred, rgba, pixels.clamp(0, 1), frozen.vae_decode(mean)))
    want = sums.summary()
    assert got["images"] == 2 and got["alpha_psnr"] == pytest.approx(want["alpha_psnr"], abs=1e-5)
    assert got["rgb_psnr"] == pytest.approx(want["rgb_psnr"], abs=1e-5)


def test_training_pair_speaks_flux_at_the_boundary(frozen):
    from layerctl.core.imagemath import pad_rgb_torch
    from layerctl.models.flux_vae import encode_offset, tiny_flux_decoder, tiny_flux_encoder
    from layerctl.training.vae import encoder_input, frozen_decode, make_pair

    enc, dec = tiny_flux_encoder(), tiny_flux_decoder()
    pair = make_pair(enc, dec, flux=True)
    rgba = _rgba()
    padded = pad_rgb_torch(rgba)
    mean, std = frozen.vae_encode((rgba[:, :3] * 2 - 1) * rgba[:, 3:4])
    with torch.no_grad():
        latent, decoded, pred = pair(encoder_input(rgba, padded), mean, std, lambda z: frozen_decode(frozen, z))
        want_latent = mean + std * encode_offset(enc, rgba)
        raw = dec(decoded / 2 + 0.5, latent)  # unclipped pixels in, [R, G, B, A] out
    assert torch.allclose(latent, want_latent, atol=1e-5)
    assert torch.equal(pred[:, 0], raw[:, 3]) and torch.equal(pred[:, 1:], raw[:, :3])  # handed back as [A, R, G, B]


def test_train_vae_smoke_on_tiny_flux_then_eval_and_gen(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "train-vae-flux-smoke.yaml"
    code, out, err = run_cli("train-vae", recipe, "--set", "steps=4", "--set", "out_dir=run", "--set", "val_every=4",
                             "--set", "checkpoint_every=4", "--set", "data.val_count=4", "--set", "batch_size=2",
                             "--quiet")
    assert code == 0, err
    from safetensors.torch import load_file

    dec = load_file(str(tmp_path / "run" / "transparent_decoder.safetensors"))
    enc = load_file(str(tmp_path / "run" / "transparent_encoder.safetensors"))
    assert dec["latent_conv_in.weight"].shape[1] == 16 and enc["blocks.16.weight"].shape[0] == 16
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 4 for r in log)
    code, out, err = run_cli("eval-vae", "synthetic", "--model", "tiny-flux", "--resolution", "64", "--count", "2",
                             "--transparent-decoder", "run/transparent_decoder.safetensors",
                             "--transparent-encoder", "run/transparent_encoder.safetensors", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["metrics"]["images"] == 2 and res["decoder"].endswith("transparent_decoder.safetensors")
    code, out, err = run_cli("gen", "glass bottle", "--model", "tiny-flux", "--out", "g.png", "--seed", "1", "--steps", "2",
                             "--transparent-decoder", "run/transparent_decoder.safetensors")
    assert code == 0, err
    # the 16-channel files are refused by an SD model, naming the tensor and both shapes
    code, out, err = run_cli("gen", "glass cup", "--model", "tiny", "--out", "s.png",
                             "--transparent-decoder", "run/transparent_decoder.safetensors")
    assert code == 2 and "[16, 16, 1, 1]" in err and "[16, 4, 1, 1]" in err and not (tmp_path / "s.png").exists()


def test_eval_vae_refuses_an_sd_decoder_on_flux(tmp_path):
    from safetensors.torch import save_file

    from layerctl.models.weights import tiny_decoder

    path = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_decoder().state_dict().items()}, str(path))
    code, out, err = run_cli("eval-vae", "synthetic", "--model", "tiny-flux", "--resolution", "64", "--count", "2",
                             "--transparent-decoder", path)
    assert code == 2 and "latent_conv_in.weight" in err and "16" in err and "Traceback" not in err
