"""FLUX.1 through layerctl's own pipelines, on tiny-flux: gen, metadata, the layer LoRA, --lora,
refusals, and the editing paths (img2img, inpainting, hires, upscale, PSD, preview, batches,
--prompts-file, a recipe)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clihelp import run_cli

FLUX = ("--model", "tiny-flux")


def _meta(path):
    with Image.open(path) as im:
        return im.mode, im.size, json.loads(im.info["layerctl"]), im.info["parameters"], np.asarray(im).copy()


@pytest.fixture(scope="module")
def bottle(tmp_path_factory):
    """`layerctl gen "glass bottle" --model tiny-flux --out b.png --seed 3` (the issue's example)."""
    out = tmp_path_factory.mktemp("flux_gen") / "b.png"
    code, stdout, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", out, "--seed", "3")
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def model():
    from layerctl.backends.registry import load_model

    return load_model("tiny-flux", "cpu", "fp32")


# ---------------------------------------------------------------- gen


def test_gen_twice_identical_rgba_with_flux_metadata(bottle, tmp_path):
    again = tmp_path / "b.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", again, "--seed", "3")
    assert code == 0, stderr
    assert again.read_bytes() == bottle.read_bytes()
    mode, size, meta, params, arr = _meta(bottle)
    assert mode == "RGBA" and size == (64, 64)
    assert len(np.unique(arr[..., 3])) > 1  # a real alpha channel, not a constant
    assert (meta["family"], meta["backend"], meta["flux_variant"]) == ("flux", "tiny-flux", "dev")
    assert meta["guidance"] == 3.5 and meta["cfg"] == 1.0 and meta["negative"] is None
    assert meta["steps"] == 4 and (meta["sampler"], meta["sampler_label"]) == ("euler", "Euler") and meta["seed"] == 3
    assert meta["schedule_label"] == "Simple" and meta["prediction_type"] == "flow"
    assert meta["transparent_decoder"] == "tiny-decoder" and meta["layer_weights"] == ["tiny-rgba"]
    assert params.startswith("glass bottle\nSteps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1.0, "
                             "Distilled CFG Scale: 3.5, ")
    assert "DPM++" not in params and "Karras" not in params
    assert "Negative prompt" not in params and "Seed: 3" in params and "Model: tiny-flux" in params


def test_cfg_sets_the_distilled_guidance(bottle, tmp_path):
    out = tmp_path / "g.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", out, "--seed", "3", "--cfg", "6")
    assert code == 0, stderr
    _, _, meta, params, arr = _meta(out)
    assert meta["guidance"] == 6.0 and "Distilled CFG Scale: 6.0" in params
    assert not np.array_equal(arr, _meta(bottle)[4])  # the guidance reaches the transformer


def test_the_loop_matches_plain_flux_pipeline(model):
    """layerctl's one sampling loop on a FLUX model gives the latents of diffusers' FluxPipeline."""
    from layerctl.pipelines.sampling import DenoiseSpec, denoise, make_noise

    prompts = ["glass bottle", "a red cup"]
    noise = make_noise([3, 4], 1, 64, 64, model.latent_channels)
    assert noise.shape == (2, 16, 8, 8)
    embeds = model.encode_prompt(prompts, ["", ""], False, 64, 64)
    ours = denoise(model, DenoiseSpec(embeds=embeds, noise=noise, steps=3, cfg=2.5))
    with torch.no_grad():
        packed = model.pipe(prompt=prompts, latents=model.pack_latents(noise), num_inference_steps=3, guidance_scale=2.5,
                            height=64, width=64, output_type="latent", max_sequence_length=32).images
    theirs = model.unpack_latents(packed, 64, 64)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), float((ours - theirs).abs().max())
    assert not torch.allclose(ours, noise, atol=1e-3)


def test_layer_lora_is_fused_and_restored(model):
    from layerctl.requests import GenRequest
    from layerctl.session import Session

    with Session(quiet=True) as s:
        kit = s.models.kit(GenRequest(prompt="x", model="tiny-flux", device="cpu", dtype="fp32"))
        tr = kit.model.transformer
        before = {k: v.clone() for k, v in tr.state_dict().items()}
        active = kit.use_weights("rgba", GenRequest(prompt="x", model="tiny-flux"))
        key = "transformer_blocks.0.attn.to_q.weight"
        assert active.names == ["tiny-rgba"] and not torch.equal(tr.state_dict()[key], before[key])
        assert torch.equal(tr.state_dict()["proj_out.weight"], before["proj_out.weight"])  # only LoRA targets move
        kit.clear_weights()
        assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())


def test_extra_flux_lora_file(bottle, tmp_path, model):
    from layerctl.models.flux_lora import read_flux_lora, save_flux_lora, tiny_layer_lora

    pairs = tiny_layer_lora(model.transformer, seed=5)
    path = save_flux_lora(pairs, tmp_path / "style.safetensors")
    back = read_flux_lora(path)
    assert set(back) == set(pairs)
    m = next(iter(pairs))
    assert torch.allclose(back[m].delta(), pairs[m].delta(), atol=1e-7)
    out = tmp_path / "l.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", out, "--seed", "3", "--lora", path, "--lora-scale", "3")
    assert code == 0, stderr
    _, _, meta, _, arr = _meta(out)
    assert meta["layer_weights"] == ["style.safetensors", "tiny-rgba"]
    assert not np.array_equal(arr, _meta(bottle)[4])


def test_sd_lora_on_flux_is_refused(tmp_path):
    from safetensors.torch import save_file

    sd_lora = tmp_path / "sd.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(sd_lora))
    out = tmp_path / "x.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", out, "--lora", sd_lora)
    assert code == 2 and not out.exists()
    assert "FLUX.1" in stderr and "another model family" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--negative", "ugly"), "no negative prompt"),
        (("--bg", "BOTTLE", "--fg-prompt", "cup"), "Layer modes run on SD1.5"),
        (("--joint",), "gen --joint is a layer mode"),
        (("--width", "96"), "multiple of 64"),
        (("--height", "100"), "multiple of 64"),
        (("--clip-skip", "2"), "--clip-skip applies to SD1.5 and SDXL"),
        (("--sampler", "euler_a"), "--sampler: FLUX.1 samples with its own flow-matching Euler"),
        (("--schedule", "karras", "--cfg-rescale", "0.7"), "--schedule, --cfg-rescale: FLUX.1"),
    ],
)
def test_flux_refusals_exit_2_one_line_nothing_written(bottle, tmp_path, args, needle):
    args = tuple(str(bottle) if a == "BOTTLE" else a for a in args)
    out = tmp_path / "x.png"
    code, stdout, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", out, *args)
    assert code == 2, stderr
    assert needle in stderr and "Traceback" not in stderr
    assert len([ln for ln in stderr.splitlines() if ln.startswith("layerctl: error")]) == 1
    assert not out.exists() and stdout == ""


def test_decompose_on_flux_is_refused(bottle, tmp_path):
    code, _, stderr = run_cli("decompose", bottle, *FLUX, "--out-dir", tmp_path / "d")
    assert code == 2 and "decompose is a layer mode" in stderr and "SDXL" in stderr
    assert not (tmp_path / "d").exists()


def test_default_negative_still_reaches_sd_models(tmp_path):
    out = tmp_path / "sd.png"
    code, _, stderr = run_cli("gen", "glass cup", "--model", "tiny", "--out", out, "--seed", "1", "--steps", "1")
    assert code == 0, stderr
    assert _meta(out)[2]["negative"] == "bad, ugly"


def _save_net(net, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_sd_decoder_given_to_flux_names_tensor_and_shapes(tmp_path):
    from layerctl.models.weights import tiny_decoder

    path = _save_net(tiny_decoder(), tmp_path / "sd_dec.safetensors")
    out = tmp_path / "x.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", out, "--transparent-decoder", path)
    assert code == 2 and not out.exists()
    assert "latent_conv_in.weight" in stderr and ", 4, 1, 1]" in stderr and ", 16, 1, 1]" in stderr


def test_flux_decoder_and_encoder_given_to_sd_are_refused(tmp_path):
    from layerctl.models.flux_vae import tiny_flux_decoder, tiny_flux_encoder

    dec = _save_net(tiny_flux_decoder(), tmp_path / "flux_dec.safetensors")
    enc = _save_net(tiny_flux_encoder(), tmp_path / "flux_enc.safetensors")
    out = tmp_path / "x.png"
    code, _, stderr = run_cli("gen", "glass cup", "--model", "tiny", "--out", out, "--transparent-decoder", dec)
    assert code == 2 and not out.exists()
    assert "latent_conv_in.weight" in stderr and ", 16, 1, 1]" in stderr and ", 4, 1, 1]" in stderr
    code, _, stderr = run_cli("gen", "glass cup", "--model", "tiny", "--out", out, "--init", dec.with_suffix(".png"),
                              "--transparent-encoder", enc)
    assert code == 2 and not out.exists()


def test_flux_transparent_vae_file_loads_through_the_options(tmp_path, bottle):
    """A TransparentVAE-layout file (official widths, random values) as --transparent-decoder/-encoder."""
    from layerctl.models.flux_vae import new_flux_decoder, new_flux_encoder

    state = {f"encoder.{k}": v for k, v in new_flux_encoder(seed=1).state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in new_flux_decoder(seed=2).state_dict().items()})
    pth = tmp_path / "TransparentVAE.pth"
    torch.save(state, str(pth))
    from layerctl.models import codec

    dec = codec.load_net(pth, "decoder", "flux", torch.device("cpu"), torch.float32)
    enc = codec.load_net(pth, "encoder", "flux", torch.device("cpu"), torch.float32)
    assert dec.latent_conv_in.weight.shape[1] == 16
    assert sum(p.numel() for p in enc.parameters()) > 0


# ---------------------------------------------------------------- editing and outputs


def test_img2img_from_rgba(bottle, tmp_path):
    out = tmp_path / "i.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--init", bottle, "--strength", "0.8", "--out", out,
                              "--seed", "3")
    assert code == 0, stderr
    mode, size, meta, _, arr = _meta(out)
    assert mode == "RGBA" and size == (64, 64)
    assert meta["edit"] == ["img2img"] and meta["strength"] == 0.8 and meta["transparent_encoder"] == "tiny-encoder"
    assert not np.array_equal(arr, _meta(bottle)[4])
    # strength 1 starts from pure noise: the plain gen's pixels; another init image changes the result
    full = tmp_path / "full.png"
    assert run_cli("gen", "glass bottle", *FLUX, "--init", bottle, "--strength", "1", "--out", full, "--seed", "3")[0] == 0
    assert np.array_equal(_meta(full)[4], _meta(bottle)[4])
    flipped = tmp_path / "flipped.png"
    Image.fromarray(np.ascontiguousarray(_meta(bottle)[4][::-1])).save(flipped)
    other = tmp_path / "other.png"
    assert run_cli("gen", "glass bottle", *FLUX, "--init", flipped, "--strength", "0.8", "--out", other, "--seed", "3")[0] == 0
    assert not np.array_equal(_meta(other)[4], arr)


def test_flux_encode_uses_the_flux_conventions(model, bottle):
    """img2img encodes like the official demo: alpha-last offset, scaled and shifted latent."""
    from layerctl.models import codec
    from layerctl.models.flux_vae import encode_latent, tiny_flux_encoder

    rgba = torch.from_numpy(np.asarray(Image.open(bottle), np.float32) / 255).permute(2, 0, 1)[None]
    enc = tiny_flux_encoder()
    ours = codec.encode_scaled(model, enc, rgba)
    ref = encode_latent(enc, rgba, model.vae_encode, 0.3611, 0.1159)
    assert ours.shape == (1, 16, 8, 8) and torch.equal(ours, ref)
    mean, _ = model.vae_encode(rgba[:, :3] * 2 - 1)
    assert not torch.allclose(ours, mean)


def test_inpainting_keeps_the_outside(bottle, tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    out = tmp_path / "m.png"
    code, _, stderr = run_cli("gen", "glass bottle", *FLUX, "--init", bottle, "--mask", tmp_path / "mask.png",
                              "--out", out, "--seed", "3")
    assert code == 0, stderr
    arr, src = _meta(out)[4], _meta(bottle)[4]
    assert _meta(out)[2]["mask_method"] == "latent-blend"
    assert np.array_equal(arr[:8], src[:8])  # outside the mask: the input's pixels
    assert not np.array_equal(arr[20:44, 20:44], src[20:44, 20:44])


def test_hires_psd_preview(tmp_path):
    out, psd = tmp_path / "h.png", tmp_path / "h.psd"
    code, stdout, stderr = run_cli("gen", "glass bottle", *FLUX, "--hires", "2", "--out", out, "--psd", psd, "--preview",
                                   "--seed", "3", "--steps", "2")
    assert code == 0, stderr
    mode, size, meta, _, arr = _meta(out)
    assert mode == "RGBA" and size == (128, 128) and meta["edit"] == ["hires"] and meta["base_size"] == [64, 64]
    assert len(np.unique(arr[..., 3])) > 1
    assert (tmp_path / "h.preview.png").exists()
    from psd_tools import PSDImage

    layers = list(PSDImage.open(psd))
    assert [layer.name for layer in layers] == ["rgba"] and layers[0].size == (128, 128)


def test_upscale_on_flux(bottle, tmp_path):
    out = tmp_path / "u.png"
    code, _, stderr = run_cli("upscale", bottle, *FLUX, "--scale", "2", "--out", out, "--seed", "1", "--steps", "2")
    assert code == 0, stderr
    mode, size, meta, _, _ = _meta(out)
    assert mode == "RGBA" and size == (128, 128) and meta["family"] == "flux" and meta["edit"] == ["upscale"]


def test_batch_and_prompts_file(tmp_path):
    code, stdout, stderr = run_cli("gen", "glass bottle", *FLUX, "--out", tmp_path / "n_{i}.png", "-n", "2",
                                   "--seed", "10", "--steps", "2")
    assert code == 0, stderr
    a, b = (_meta(tmp_path / f"n_{i}.png") for i in (0, 1))
    assert (a[2]["seed"], b[2]["seed"]) == (10, 11) and not np.array_equal(a[4], b[4])
    # image 1 of the batch is the single run with its seed (within 1/255: batched arithmetic)
    assert run_cli("gen", "glass bottle", *FLUX, "--out", tmp_path / "one.png", "--seed", "11", "--steps", "2")[0] == 0
    assert np.abs(_meta(tmp_path / "one.png")[4].astype(int) - b[4].astype(int)).max() <= 1
    (tmp_path / "p.txt").write_text("glass bottle\n# skipped\nred cup\n", encoding="utf-8")
    code, stdout, stderr = run_cli("gen", *FLUX, "--prompts-file", tmp_path / "p.txt", "--out", tmp_path / "p.png",
                                   "--seed", "1", "--steps", "2")
    assert code == 0, stderr
    names = sorted(p.name for p in tmp_path.glob("p_*.png"))
    assert names == ["p_0000.png", "p_0001.png"]
    assert _meta(tmp_path / "p_0001.png")[2]["prompt"] == "red cup"


def test_recipe_with_a_flux_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "output_dir: res\ndefaults: {size: 64, steps: 2}\njobs:\n"
        "  - gen: {model: tiny-flux, prompt: glass bottle, seed: 3, cfg: 4, out: flux.png}\n"
        "  - gen: {model: tiny, prompt: glass cup, seed: 3, out: sd.png}\n",
        encoding="utf-8",
    )
    code, stdout, stderr = run_cli("run", "r.yaml", "--quiet")
    assert code == 0, stderr
    flux, sd = (_meta(tmp_path / "res" / n)[2] for n in ("flux.png", "sd.png"))
    assert flux["family"] == "flux" and flux["guidance"] == 4.0 and flux["cfg"] == 1.0 and sd["family"] == "sd15"
    # a resume sees the FLUX output as done: the job's cfg is compared with the metadata's distilled guidance
    code, stdout, stderr = run_cli("run", "r.yaml", "--resume", "--json", "--quiet")
    assert code == 0, stderr
    states = [json.loads(ln)["status"] for ln in stdout.splitlines() if ln.startswith("{")]
    assert states == ["skipped", "skipped"], stdout
