"""FLUX.1 backends: tiny-flux (built offline from configs) and flux (folders, hub ids, single files),
and FluxModel's conventions checked against diffusers' own FluxPipeline."""

import json

import pytest
import torch

from layerctl.errors import LayerctlError

PROMPTS = ["glass bottle, high quality", "a red cup"]


@pytest.fixture(scope="module")
def tiny():
    from layerctl.backends.registry import load_model

    return load_model("tiny-flux", "cpu", "fp32")


@pytest.fixture(scope="module")
def tiny_schnell():
    from layerctl.backends.flux import model_from_pipeline, place_pipeline
    from layerctl.backends.tiny_flux import tiny_flux_pipeline

    pipe = place_pipeline(tiny_flux_pipeline(guidance_embeds=False), torch.device("cpu"), torch.float32)
    return model_from_pipeline(pipe, backend="test", ref="tiny-schnell", device=torch.device("cpu"), dtype=torch.float32,
                               native_size=64, max_sequence_length=32, official={}, tiny=True)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("tiny_flux_folder")
    tiny.pipe.save_pretrained(str(folder))
    return folder


def _loop(model, prompts, noise, steps, guidance, height=64, width=64):
    """A plain flow-matching loop written with FluxModel's methods only."""
    embeds = model.encode_prompt(prompts, [""] * len(prompts), False, width, height)
    latents = model.pack_latents(noise)
    ids = model.image_ids(height, width)
    sched = model.new_scheduler()
    for t in model.set_timesteps(sched, steps, latents.shape[1]):
        velocity = model.transformer_step(latents, t, embeds, ids, guidance=guidance)
        latents = sched.step(velocity, t, latents, return_dict=False)[0]
    return latents


# ---------------------------------------------------------------- tiny-flux


def test_tiny_flux_builds_offline_fast_and_deterministic(tiny, monkeypatch):
    import time

    from layerctl.backends.tiny_flux import tiny_flux_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = torch.random.get_rng_state()
    start = time.perf_counter()
    again = tiny_flux_pipeline()
    assert time.perf_counter() - start < 15  # imports are done; the build itself is well under a second
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded builds leave the caller's RNG alone
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(tiny.pipe, name).state_dict(), getattr(again, name).state_dict()
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    cfg = tiny.transformer.config
    assert cfg.in_channels == 64 and cfg.guidance_embeds and cfg.num_layers >= 1 and cfg.num_single_layers >= 1
    kinds = {type(m).__name__ for m in tiny.transformer.modules()}
    assert {"FluxTransformerBlock", "FluxSingleTransformerBlock"} <= kinds
    vae = tiny.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert tiny.vae_scale_factor == 8
    assert type(tiny.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and tiny.scheduler.config.use_dynamic_shifting


def test_tiny_flux_model_facts(tiny, tiny_schnell):
    from layerctl.backends.flux import FluxModel

    assert isinstance(tiny, FluxModel)
    assert (tiny.backend, tiny.family, tiny.variant, tiny.tiny) == ("tiny-flux", "flux", "dev", True)
    assert (tiny.latent_scale, tiny.latent_shift, tiny.latent_channels) == (0.3611, 0.1159, 16)
    assert (tiny.native_size, tiny.default_steps, tiny.default_cfg) == (64, 4, 3.5)
    assert tiny.attention == "sdpa" and tiny.modes == ("rgba",) and "noise" in tiny.notes
    assert tiny.latent_shape(64, 128) == (16, 8, 16)
    # schnell: no guidance input, 4 steps, guidance 0, shorter T5 sequence by default
    assert (tiny_schnell.variant, tiny_schnell.default_steps, tiny_schnell.default_cfg) == ("schnell", 4, 0.0)
    assert tiny_schnell.guidance_input(3.5, 2) is None
    g = tiny.guidance_input(None, 3)
    assert g.dtype == torch.float32 and g.tolist() == [3.5, 3.5, 3.5]
    with pytest.raises(LayerctlError, match="multiples of 16"):
        tiny.latent_shape(64, 72)


def test_flux_model_has_no_unet_and_answers_the_loop_itself(tiny):
    from layerctl.backends.registry import load_model

    with pytest.raises(LayerctlError, match="transformer, not a UNet"):
        tiny.unet
    assert not tiny.uses_cfg(3.5) and not tiny.uses_cfg(7.0)
    assert tiny.denoiser_in_channels == 16
    with pytest.raises(LayerctlError, match="xformers is not available for FLUX"):
        load_model("tiny-flux", "cpu", "fp32", attention="xformers")


# ---------------------------------------------------------------- conventions vs diffusers


def test_packing_and_ids_match_diffusers(tiny):
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = tiny.pack_latents(x)
    assert packed.shape == (2, 24, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(packed[0, 0, :4], x[0, 0, :2, :2].reshape(-1))  # token 0: channel 0's 2x2 patch first
    assert torch.equal(tiny.unpack_latents(packed, 64, 96), x)
    assert torch.equal(tiny.unpack_latents(packed, 64, 96), FluxPipeline._unpack_latents(packed, 64, 96, 8))
    ids = tiny.image_ids(64, 96)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="tokens"):
        tiny.unpack_latents(packed, 64, 64)


def test_prompt_encoding(tiny):
    embeds = tiny.encode_prompt(PROMPTS, ["", ""], False, 64, 64)
    assert embeds.hidden.shape == (2, 32, 32)
    assert embeds.extra["pooled_projections"].shape == (2, 32)
    assert embeds.extra["txt_ids"].shape == (32, 3) and not embeds.extra["txt_ids"].any()
    with torch.no_grad():
        hidden, pooled, _ = tiny.pipe.encode_prompt(PROMPTS, None, max_sequence_length=32)
    assert torch.equal(embeds.hidden, hidden) and torch.equal(embeds.extra["pooled_projections"], pooled)
    assert not torch.equal(embeds.hidden[0], embeds.hidden[1])
    assert not torch.equal(embeds.extra["pooled_projections"][0], embeds.extra["pooled_projections"][1])
    with pytest.raises(LayerctlError, match="--negative is not supported"):
        tiny.encode_prompt(PROMPTS, ["bad", "ugly"], True, 64, 64)


def test_one_transformer_step(tiny, tiny_schnell):
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    for model in (tiny, tiny_schnell):
        embeds = model.encode_prompt(PROMPTS, ["", ""], False, 64, 64)
        packed, ids = model.pack_latents(noise), model.image_ids(64, 64)
        out = model.transformer_step(packed, torch.tensor(1000.0), embeds, ids, guidance=3.5)
        assert out.shape == packed.shape and torch.isfinite(out).all() and out.abs().max() > 0
        again = model.transformer_step(packed, 1000.0, embeds, ids, guidance=3.5)  # a float t works too
        assert torch.equal(out, again)
        other_t = model.transformer_step(packed, torch.tensor(500.0), embeds, ids, guidance=3.5)
        assert not torch.equal(out, other_t)
        other_g = model.transformer_step(packed, torch.tensor(1000.0), embeds, ids, guidance=1.0)
        assert torch.equal(out, other_g) == (model is tiny_schnell)  # only dev takes the guidance


def test_predict_makes_the_step_inputs_once_per_size(tiny, monkeypatch):
    embeds = tiny.encode_prompt(PROMPTS[:1], [""], False, 64, 64)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(700.0)
    expected = tiny.unpack_latents(tiny.transformer_step(tiny.pack_latents(x), t, embeds, tiny.image_ids(64, 64),
                                                         guidance=3.5), 64, 64)
    tiny._step_cache.clear()
    made = []
    real = type(tiny).image_ids
    monkeypatch.setattr(type(tiny), "image_ids", lambda self, h, w, dtype=None: made.append((h, w)) or real(self, h, w, dtype))
    first = tiny.predict(x, t, embeds, 3.5, {})
    assert torch.equal(first, expected) and torch.equal(tiny.predict(x, t, embeds, 3.5, {}), expected)
    assert made == [(64, 64)]  # the position ids of this size were made once for both steps
    assert not torch.equal(tiny.predict(x, t, embeds, 1.0, {}), expected)  # another guidance value is not reused
    wide = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    assert tiny.predict(wide, t, embeds, 3.5, {}).shape == wide.shape
    assert made[-1] == (64, 96)  # a new size: its own ids


def test_schedule_matches_diffusers(tiny, tiny_schnell):
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from layerctl.backends.flux import flux_mu

    cfg = tiny.scheduler.config
    for n in (16, 256, 1024, 4096, 5000):
        assert flux_mu(n, cfg) == calculate_shift(n, 256, 4096, 0.5, 1.15)
    dev = tiny.set_timesteps(tiny.new_scheduler(), 4, 4096)
    plain = np.linspace(1.0, 0.25, 4) * 1000
    assert dev[0] == 1000 and all(float(a) > b for a, b in zip(dev[1:], plain[1:]))  # shifted towards noise
    small = tiny.set_timesteps(tiny.new_scheduler(), 4, 16)
    assert all(float(a) > float(b) for a, b in zip(dev[1:], small[1:]))  # resolution-dependent
    sch = tiny_schnell.set_timesteps(tiny_schnell.new_scheduler(), 4, 4096)
    assert np.allclose(sch.numpy(), plain)  # schnell: shift 1, no dynamic shifting


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_own_loop_equals_flux_pipeline(tiny, tiny_schnell, which):
    model = tiny if which == "dev" else tiny_schnell
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    guidance = 3.5 if which == "dev" else 0.0
    ours = _loop(model, PROMPTS, noise, 2, guidance)
    theirs = model.pipe(
        prompt=PROMPTS, height=64, width=64, num_inference_steps=2, guidance_scale=guidance,
        latents=model.pack_latents(noise), output_type="latent", max_sequence_length=32,
    ).images
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, model.pack_latents(noise))
    if which == "dev":  # and the pixels: unpack, un-scale and un-shift, VAE decode
        pixels = model.pipe(
            prompt=PROMPTS, height=64, width=64, num_inference_steps=2, guidance_scale=guidance,
            latents=model.pack_latents(noise), output_type="pt", max_sequence_length=32,
        ).images
        mine = model.decode_latents(model.unpack_latents(ours, 64, 64))
        assert mine.shape == (2, 3, 64, 64)
        assert torch.allclose(mine, pixels, atol=1e-6), float((mine - pixels).abs().max())
        no_shift = model.vae_decode(model.unpack_latents(ours, 64, 64) / model.latent_scale)
        assert float((no_shift - pixels).abs().max()) > 1e-4  # the shift matters


def test_vae_scaling_shift_and_unclipped_decode(tiny):
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mean, std = tiny.vae_encode(pixels)
    assert mean.shape == (1, 16, 8, 8) and (std > 0).all()
    scaled = tiny.encode_latents(pixels)
    assert torch.allclose(scaled, 0.3611 * (mean - 0.1159))
    assert torch.allclose(tiny.unscale_latents(scaled), mean, atol=1e-6)
    assert torch.allclose(tiny.scale_latents(tiny.unscale_latents(scaled)), scaled, atol=1e-6)
    big = torch.randn(1, 16, 8, 8, generator=g) * 40  # far outside the VAE's range: pixels leave [0,1]
    raw = tiny.vae_decode(big, clip=False)
    assert raw.min() < 0 or raw.max() > 1
    assert torch.equal(tiny.vae_decode(big), raw.clamp(0, 1))


def test_transparent_chain_on_tiny_flux(tiny):
    from layerctl.models import flux_vae as fv

    enc, dec = fv.tiny_flux_encoder(), fv.tiny_flux_decoder()
    rgba = torch.rand(2, 4, 64, 64, generator=torch.Generator().manual_seed(4))
    latent = fv.encode_latent(enc, rgba, tiny.vae_encode, tiny.latent_scale, tiny.latent_shift)
    mean, std = tiny.vae_encode(fv.vae_input(rgba))
    assert torch.allclose(latent, tiny.scale_latents(mean + std * fv.encode_offset(enc, rgba)), atol=1e-5)
    assert not torch.allclose(latent, tiny.scale_latents(mean), atol=1e-3)  # the offset is there
    raw = tiny.unscale_latents(latent)
    out = fv.decode_rgba(dec, tiny.vae_decode(raw, clip=False), raw)
    assert out.shape == (2, 4, 64, 64) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, fv.decode_rgba(dec, tiny.vae_decode(raw, clip=False), raw))


# ---------------------------------------------------------------- references and the flux backend


def test_model_references_pick_flux(tmp_path, saved_tiny):
    from safetensors.torch import save_file

    from layerctl.backends.registry import resolve_model_ref

    assert resolve_model_ref("tiny-flux") == ("tiny-flux", "tiny-flux")
    assert resolve_model_ref("black-forest-labs/FLUX.1-dev") == ("flux", "black-forest-labs/FLUX.1-dev")
    assert resolve_model_ref("flux:someone/finetune") == ("flux", "someone/finetune")
    assert resolve_model_ref(str(saved_tiny)) == ("flux", str(saved_tiny))
    assert resolve_model_ref("stabilityai/stable-diffusion-xl-base-1.0")[0] == "sdxl"
    for keys, family in (
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "flux"),
        (["model.diffusion_model.double_blocks.0.img_mod.lin.weight"], "flux"),
        (["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"], "flux"),
        (["model.diffusion_model.input_blocks.0.0.weight",
          "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"], "sd15"),
    ):
        path = tmp_path / f"{family}_{len(keys)}_{keys[0][:5]}.safetensors"
        shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}  # SD1.5 is told by shapes
        save_file({k: torch.zeros(shapes.get(k, (1,))) for k in keys}, str(path))
        assert resolve_model_ref(str(path)) == (family, str(path)), keys


def test_flux_backend_loads_a_diffusers_folder(tiny, saved_tiny):
    from layerctl.backends.registry import load_model

    index = json.loads((saved_tiny / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    model = load_model(str(saved_tiny), "cpu", "fp32")
    assert (model.backend, model.family, model.variant) == ("flux", "flux", "dev")
    assert (model.native_size, model.default_steps, model.default_cfg, model.max_sequence_length) == (1024, 50, 3.5, 512)
    assert model.official == {"decoder": "TransparentVAE.pth", "encoder": "TransparentVAE.pth", "rgba": "layerlora.safetensors"}
    assert (model.latent_scale, model.latent_shift) == (0.3611, 0.1159)
    model.max_sequence_length = 32
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(_loop(model, PROMPTS[:1], noise, 2, 3.5), _loop(tiny, PROMPTS[:1], noise, 2, 3.5))


def test_flux_backend_single_file_transformer(tmp_path, tiny, saved_tiny, monkeypatch):
    from safetensors.torch import save_file

    from layerctl.backends.flux import FluxBackend

    sd = {k: v.clone() + 0.5 for k, v in tiny.transformer.state_dict().items()}  # a "fine-tune"
    path = tmp_path / "my-flux-finetune.safetensors"
    save_file(sd, str(path))
    monkeypatch.setenv("LAYERCTL_FLUX_BASE", str(saved_tiny))
    model = FluxBackend().load(str(path), torch.device("cpu"), torch.float32)
    got = model.transformer.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert torch.equal(model.vae.decoder.conv_in.weight, tiny.vae.decoder.conv_in.weight)  # the rest from the base


def test_flux_backend_offline_and_bad_references(tmp_path, monkeypatch):
    from layerctl.backends.flux import FluxBackend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cpu = torch.device("cpu")
    with pytest.raises(LayerctlError) as err:
        FluxBackend().load("nobody/FLUX-not-cached", cpu, torch.float32)
    text = str(err.value)
    assert "cannot load FLUX.1 model 'nobody/FLUX-not-cached'" in text and "Offline?" in text, text
    assert "text_encoder_2/ (T5-XXL)" in text and "transformer/" in text and "\n" not in text
    weights = tmp_path / "flux1-schnell-finetune.safetensors"
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(weights))
    monkeypatch.delenv("LAYERCTL_FLUX_BASE", raising=False)
    with pytest.raises(LayerctlError, match=r"rest of the pipeline from black-forest-labs/FLUX\.1-schnell.*Offline\?"):
        FluxBackend().load(str(weights), cpu, torch.float32)
    for bad, message in (
        (tmp_path / "flux.ckpt", "refusing to unpickle"),
        (tmp_path / "missing.safetensors", "model file not found"),
        (tmp_path, "without model_index.json"),
    ):
        if bad.suffix == ".ckpt":
            bad.write_bytes(b"x")
        with pytest.raises(LayerctlError, match=message):
            FluxBackend().load(str(bad), cpu, torch.float32)


def test_flux_dtype_on_gpus_is_bf16_not_fp16():
    from layerctl.backends.flux import flux_dtype

    assert flux_dtype(torch.float16, torch.device("cuda")) == torch.bfloat16
    assert flux_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert flux_dtype(torch.float32, torch.device("cpu")) == torch.float32
