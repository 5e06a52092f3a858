"""FLUX.1 transparent VAE: parity with the official FLUX port's fixtures, and its weight files."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from layerctl.models import flux_vae as fv
from layerctl.errors import LayerctlError
from layerctl.models.transparent_vae import OFFSET_SCALE, TransparentDecoder, TransparentEncoder, decode_tta, fixture_state_dict


def _find_reference() -> Path:
    """shared/reference/layerdiffuse-flux next to the checkout: ../shared from the repo as the other
    parity tests look for it, or from a folder above (a git worktree under a sibling folder)."""
    for parent in Path(__file__).resolve().parents[1:]:
        candidate = parent / "shared" / "reference" / "layerdiffuse-flux"
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-flux"


REF = _find_reference()
TOL_PAD = 1e-6  # the fixture README's tolerances (those of layerdiffuse-v1)
TOL_DECODER = 2e-5
TOL_RAW = 1e-7
TOL_LATENT = 5e-5
SCALE, SHIFT = 0.3611, 0.1159


def _ref(name):
    path = REF / name
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def _npz(name):
    return np.load(_ref(name))


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _with_fixture_weights(net):
    net.load_state_dict(fixture_state_dict(net), assign=True)
    return net.eval()


@pytest.fixture(scope="module")
def manifest():
    return json.loads(_ref("flux_transparent_vae.json").read_text())


@pytest.fixture(scope="module")
def ref_encoder():
    with torch.device("meta"):
        net = fv.flux_encoder()
    return _with_fixture_weights(net)


@pytest.fixture(scope="module")
def ref_decoder():
    with torch.device("meta"):
        net = fv.flux_decoder()
    return _with_fixture_weights(net)


def _posterior(params):
    """diffusers' DiagonalGaussianDistribution: mean, std = exp(0.5 * clamp(logvar, -30, 20))."""
    params = torch.from_numpy(params)
    c = params.shape[1] // 2
    return params[:, :c], torch.exp(0.5 * params[:, c:].clamp(-30.0, 20.0))


# ---------------------------------------------------------------- layout


def test_layout_matches_the_official_manifest_and_the_weight_rule(manifest, ref_encoder, ref_decoder):
    layout = fv.expected_layout()
    assert layout == {k: tuple(v) for k, v in manifest["tensors"].items()}
    assert sum(k.startswith("encoder.") for k in layout) == 18 and sum(k.startswith("decoder.") for k in layout) == 538
    assert layout["decoder.latent_conv_in.weight"] == (64, 16, 1, 1)
    assert layout["encoder.blocks.16.weight"] == (16, 256, 3, 3)
    assert layout["encoder.blocks.0.weight"] == (32, 4, 3, 3)
    # the generated weights are the fixture's, byte for byte (crc32 rule on unprefixed keys)
    weights = {**{f"encoder.{k}": v for k, v in ref_encoder.state_dict().items()},
               **{f"decoder.{k}": v for k, v in ref_decoder.state_dict().items()}}
    for key, digest in manifest["sha256_f32_le"].items():
        data = weights[key].detach().numpy().astype("<f4").tobytes()
        assert hashlib.sha256(data).hexdigest() == digest, key


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("case", ["disc_64x64", "wide_64x192"])
def test_pad_rgb_on_float_input(case):
    from layerctl.core.imagemath import pad_rgb, pad_rgb_torch

    z = _npz("pad_rgb_flux.npz")
    rgba01 = z[f"{case}__rgba"].astype(np.float32) / 255.0  # the port passes ToTensor() floats
    want = z[f"{case}__padded"]
    assert _maxdiff(pad_rgb(rgba01), want) <= TOL_PAD
    t = torch.from_numpy(rgba01).permute(2, 0, 1)[None]
    assert _maxdiff(pad_rgb_torch(t)[0].permute(1, 2, 0), want) <= TOL_PAD
    assert _maxdiff(want, rgba01[..., :3]) > 0.1  # padding changes the invisible pixels here


def test_encoder_parity(ref_encoder):
    z = _npz("encoder_flux_128x128.npz")
    rgba = torch.from_numpy(z["rgba"]).permute(2, 0, 1)[None].float() / 255.0
    mean, std = _posterior(z["posterior_params"])
    seen = {}

    def vae_encode(x):
        seen["vae_feed"] = x.clone()
        return mean, std

    feed = fv.encoder_feed(rgba)
    assert _maxdiff(feed, z["offset_feed"]) <= TOL_PAD
    assert _maxdiff(feed[:, :3], z["padded_rgb"]) <= TOL_PAD
    assert np.array_equal(feed[:, 3].numpy(), z["rgba"][..., 3][None] / np.float32(255))  # alpha is LAST
    with torch.no_grad():
        raw = ref_encoder(torch.from_numpy(z["offset_feed"]).contiguous(memory_format=torch.channels_last))
        offset = fv.encode_offset(ref_encoder, rgba)
        latent = fv.encode_latent(ref_encoder, rgba, vae_encode, SCALE, SHIFT)
    assert np.array_equal(seen["vae_feed"].numpy(), z["vae_feed"])
    assert _maxdiff(raw, z["raw"]) <= TOL_RAW
    assert _maxdiff(offset / OFFSET_SCALE, z["raw"]) <= TOL_RAW
    assert _maxdiff(offset, z["offset"]) <= TOL_LATENT
    assert _maxdiff(latent, z["latent"]) <= TOL_LATENT
    # each FLUX difference matters in this fixture: alpha-first feed, no scale/shift
    sd_order = torch.cat([feed[:, 3:4], feed[:, :3]], dim=1)
    with torch.no_grad():
        assert _maxdiff(ref_encoder(sd_order), z["raw"]) > 1e-3
    assert _maxdiff(mean + std * offset, z["latent"]) > 1e-2
    assert float(np.abs(z["offset"]).max()) > 1.0


class Recorder(torch.nn.Module):
    """Wraps a decoder; keeps every raw output (per TTA batch) for inspection."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.outputs = []

    def forward(self, pixels, latent):
        out = self.inner(pixels, latent)
        self.outputs.extend(out.split(1))
        return out


@pytest.mark.parametrize("name,chunk", [("decoder_flux_128x128.npz", 1), ("decoder_flux_64x192.npz", 4)])
def test_decoder_parity_single_pass_tta_and_png(ref_decoder, name, chunk):
    z = _npz(name)
    pixels = fv.decoder_pixels(torch.from_numpy(z["vae_decoded"]))
    assert _maxdiff(pixels, z["origin_pixel"]) == 0.0
    assert float(pixels.min()) < 0.0 and float(pixels.max()) > 1.0  # unclipped, and it matters here
    latent = torch.from_numpy(z["latent"])
    rec = Recorder(ref_decoder)
    rgba = fv.decode_rgba(rec, pixels, latent, chunk=chunk)
    # chunk 1: passes in official order; chunk 4 on 64x192: the 64x192 passes, then the 192x64 ones
    order = list(range(8)) if chunk == 1 else [0, 2, 4, 6, 1, 3, 5, 7]
    raws = {k: rec.outputs[i] for i, k in enumerate(order)}
    errs = {f"tta_raw_{k}": _maxdiff(raws[k], z[f"tta_raw_{k}"]) for k in range(8)}
    errs["single_pass"] = _maxdiff(raws[0], z["single_pass"])  # pass 0 is the plain pass, unclipped
    errs["augmented"] = _maxdiff(rgba, z["augmented"])  # no channel reorder: [R, G, B, A]
    assert max(errs.values()) <= TOL_DECODER, errs
    assert float(raws[0].min()) < 0.0 or float(raws[0].max()) > 1.0  # the raw pass is not clipped
    # the official PNG: clamp, x255, truncating cast, channels as they come (R, G, B, A)
    assert np.array_equal(fv.rgba_to_png_array(torch.from_numpy(z["augmented"]), "truncate"), z["png"])
    ours_truncated = fv.rgba_to_png_array(rgba, "truncate")
    assert np.abs(ours_truncated.astype(int) - z["png"]).max() <= 1
    rounded = fv.rgba_to_png_array(rgba)  # layerctl's default: round to nearest
    assert np.abs(rounded.astype(int) - z["png"]).max() <= 1
    assert (rounded != z["png"]).mean() > 0.2  # rounding is a real (documented) difference
    if chunk == 4:
        with torch.no_grad():
            clipped_in = ref_decoder(pixels.clamp(0, 1), latent)
        assert _maxdiff(clipped_in, z["single_pass"]) > 1e-3  # clipping the input pixels would break parity


def test_chain_encode_then_decode(ref_encoder, ref_decoder):
    z = _npz("chain_flux_64x64.npz")
    rgba = torch.from_numpy(z["enc_rgba"]).permute(2, 0, 1)[None].float() / 255.0
    mean, std = _posterior(z["enc_posterior_params"])
    with torch.no_grad():
        latent = fv.encode_latent(ref_encoder, rgba, lambda x: (mean, std), SCALE, SHIFT)
    assert _maxdiff(latent, z["enc_latent"]) <= TOL_LATENT
    raw = fv.unscale_latent(latent, SCALE, SHIFT)
    assert _maxdiff(raw, z["dec_latent"]) <= TOL_LATENT
    assert _maxdiff(fv.scale_latent(raw, SCALE, SHIFT), latent) <= 1e-6
    pixels = fv.decoder_pixels(torch.from_numpy(z["dec_vae_decoded"]))
    assert _maxdiff(pixels, z["dec_origin_pixel"]) == 0.0
    rgba_out = fv.decode_rgba(ref_decoder, pixels, raw, chunk=8)
    assert _maxdiff(rgba_out, z["dec_augmented"]) <= TOL_DECODER
    assert np.abs(fv.rgba_to_png_array(rgba_out, "truncate").astype(int) - z["dec_png"]).max() <= 1


def test_rgba_to_png_array_rounding():
    t = torch.tensor([0.0, 0.999, 1.5, -0.2, 0.5 / 255, 0.49 / 255]).view(1, 1, 6).expand(4, 1, 6)
    assert fv.rgba_to_png_array(t, "truncate")[0, :, 0].tolist() == [0, 254, 255, 0, 0, 0]
    assert fv.rgba_to_png_array(t)[0, :, 0].tolist() == [0, 255, 255, 0, 0, 0]  # numpy rounds half to even
    assert fv.rgba_to_png_array(t[None]).shape == (1, 6, 4)
    with pytest.raises(ValueError, match="rounding"):
        fv.rgba_to_png_array(t, "floor")


def test_decode_rgba_refuses_sd_latents():
    dec = fv.new_flux_decoder(0, block_out_channels=(8, 8, 8, 8, 16, 16, 16))
    with pytest.raises(ValueError, match="16"):
        fv.decode_rgba(dec, torch.rand(1, 3, 64, 64), torch.rand(1, 4, 8, 8))


def test_new_flux_nets_start_neutral():
    enc = fv.new_flux_encoder(1)
    rgba = torch.rand(1, 4, 16, 16)
    assert fv.encode_offset(enc, rgba).shape == (1, 16, 2, 2)
    assert torch.count_nonzero(fv.encode_offset(enc, rgba)) == 0
    mean = torch.randn(1, 16, 2, 2)
    got = fv.encode_latent(enc, rgba, lambda x: (mean, torch.ones_like(mean)))
    assert torch.allclose(got, SCALE * (mean - SHIFT))
    assert torch.count_nonzero(fv.new_flux_decoder(1, block_out_channels=(8,) * 7).latent_conv_in.weight) == 0


# ---------------------------------------------------------------- files


def _shapes_only(shapes=None):
    """The official layout with stride-0 tensors: right shapes, a few bytes in a .pth."""
    shapes = shapes or fv.expected_layout()
    return {k: torch.zeros(1, dtype=torch.float16).expand(*shape) for k, shape in shapes.items()}


def _save(state, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return path


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Random fp16 tensors in the exact TransparentVAE layout (+ an ignored sd_vae.* entry),
    saved as a plain-state-dict .pth and as a .safetensors."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*shape, generator=g).to(torch.float16) for k, shape in fv.expected_layout().items()}
    state["sd_vae.decoder.conv_in.weight"] = torch.zeros(3, 16, 3, 3)  # the FLUX VAE: ignored
    folder = tmp_path_factory.mktemp("flux_weights")
    return state, {s: _save(state, folder / f"TransparentVAE{s}") for s in (".pth", ".safetensors")}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_random_official_layout(official_files, suffix):
    state, paths = official_files
    dec = fv.load_flux_decoder(paths[suffix])
    enc = fv.load_flux_encoder(paths[suffix])
    assert isinstance(dec, TransparentDecoder) and isinstance(enc, TransparentEncoder)
    assert not dec.training and not any(p.requires_grad for p in dec.parameters())
    for part, net in (("encoder", enc), ("decoder", dec)):
        got = net.state_dict()
        assert len(got) == (18 if part == "encoder" else 538)
        for key, value in got.items():
            assert value.dtype == torch.float32
            assert torch.equal(value, state[f"{part}.{key}"].float()), key
    enc2, dec2 = fv.load_transparent_vae(paths[suffix], dtype=torch.float16)
    assert dec2.latent_conv_in.weight.dtype == torch.float16
    assert torch.equal(dec2.latent_conv_in.weight, state["decoder.latent_conv_in.weight"])
    assert torch.equal(enc2.blocks[16].bias, state["encoder.blocks.16.bias"])
    assert fv.load_transparent_net(paths[suffix], "encoder", "flux").blocks[16].weight.shape[0] == 16


BROKEN = {
    "missing key decoder.up_blocks.2.resnets.1.conv2.bias": dict(drop="decoder.up_blocks.2.resnets.1.conv2.bias"),
    "missing key encoder.blocks.8.weight": dict(drop="encoder.blocks.8.weight"),
    "decoder.conv_out.weight has shape [5, 32, 3, 3], expected [4, 32, 3, 3]": dict(change="decoder.conv_out.weight"),
    "unexpected key decoder.extra.weight": dict(add="decoder.extra.weight"),
    "unexpected key lora.weight": dict(add="lora.weight"),
}


def _broken(drop=None, change=None, add=None):
    shapes = dict(fv.expected_layout())
    if drop:
        del shapes[drop]
    if change:
        shapes[change] = (shapes[change][0] + 1, *shapes[change][1:])
    if add:
        shapes[add] = (2,)
    return _shapes_only(shapes)


@pytest.mark.parametrize("message", sorted(BROKEN))
def test_broken_layouts_are_refused_naming_the_key(tmp_path, message):
    path = _save(_broken(**BROKEN[message]), tmp_path / "TransparentVAE.pth")
    for load in (fv.load_flux_decoder, fv.load_flux_encoder):
        with pytest.raises(LayerctlError) as err:
            load(path)
        text = str(err.value)
        assert message in text and str(path) in text and "\n" not in text, text
    assert fv.check_transparent_vae_state(_shapes_only())["decoder"]  # the unbroken layout passes


def test_broken_safetensors_is_refused_naming_the_key(tmp_path):
    path = _save(_broken(change="encoder.blocks.4.bias"), tmp_path / "TransparentVAE.safetensors")
    with pytest.raises(LayerctlError, match=r"encoder\.blocks\.4\.bias has shape \[65\], expected \[64\]"):
        fv.load_flux_decoder(path)


def test_sd_nets_given_to_flux_and_flux_nets_given_to_sd(tmp_path, official_files):
    from layerctl.models.transparent_vae import new_decoder, new_encoder, save_module

    small = dict(block_out_channels=(8, 8, 8, 8, 16, 16, 16))
    sd_dec = save_module(new_decoder(0, **small), tmp_path / "sd_dec.safetensors")
    sd_enc = save_module(new_encoder(0), tmp_path / "sd_enc.safetensors")
    with pytest.raises(LayerctlError) as err:
        fv.load_flux_decoder(sd_dec)
    text = str(err.value)
    assert "latent_conv_in.weight has shape [8, 4, 1, 1], expected [8, 16, 1, 1]" in text, text
    assert "SD1.5/SDXL transparent decoder: 4 latent channels" in text
    for load in (fv.load_flux_encoder, lambda p: fv.load_transparent_net(p, "encoder", "flux")):
        with pytest.raises(LayerctlError, match=r"blocks\.16\.weight has shape \[4, 256, 3, 3\], expected \[16, 256, 3, 3\]"):
            load(sd_enc)
    # an SD decoder's latent tensor inside the official layout
    shapes = dict(fv.expected_layout(), **{"decoder.latent_conv_in.weight": (64, 4, 1, 1)})
    mixed = _save(_shapes_only(shapes), tmp_path / "mixed.pth")
    with pytest.raises(LayerctlError, match=r"decoder\.latent_conv_in\.weight has shape \[64, 4, 1, 1\], expected \[64, 16, 1, 1\]"):
        fv.load_flux_decoder(mixed)

    # the reverse: FLUX files where an SD family is expected
    _, paths = official_files
    for path in paths.values():
        with pytest.raises(LayerctlError) as err:
            fv.load_transparent_net(path, "decoder", "sdxl")
        text = str(err.value)
        assert "decoder.latent_conv_in.weight has shape [64, 16, 1, 1], expected [64, 4, 1, 1]" in text, text
        assert "FLUX.1 transparent decoder" in text and "SDXL" in text
        with pytest.raises(LayerctlError, match=r"encoder\.blocks\.16\.weight has shape \[16, 256, 3, 3\], expected \[4, 256, 3, 3\]"):
            fv.load_transparent_net(path, "encoder", "sd15")
    flux_single = save_module(fv.new_flux_decoder(0, **small), tmp_path / "flux_dec.safetensors")
    with pytest.raises(LayerctlError, match=r"latent_conv_in\.weight has shape \[8, 16, 1, 1\], expected \[8, 4, 1, 1\]"):
        fv.load_transparent_net(flux_single, "decoder", "sd15")
    # and the right pairs load, including a narrow SD decoder whose latent_conv_in is 16 wide (4 in)
    assert fv.load_transparent_net(sd_dec, "decoder", "sd15").latent_conv_in.weight.shape[1] == 4
    narrow = save_module(new_decoder(0, block_out_channels=(8, 8, 16, 16, 32, 32, 32)), tmp_path / "narrow.safetensors")
    assert tuple(fv.load_transparent_net(narrow, "decoder", "sdxl").latent_conv_in.weight.shape) == (16, 4, 1, 1)
    assert fv.load_transparent_net(sd_enc, "encoder", "sd15").blocks[16].weight.shape[0] == 4
    assert fv.load_transparent_net(flux_single, "decoder", "flux").latent_conv_in.weight.shape[1] == 16


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (target, "this file should not exist"))

    evil = tmp_path / "TransparentVAE.pth"
    torch.save({"decoder.conv_in.weight": Payload(), "encoder.blocks.0.weight": torch.zeros(1)}, str(evil))
    with pytest.raises(LayerctlError) as err:
        fv.load_flux_decoder(evil)
    text = str(err.value)
    assert "weights_only=True" in text and "refused" in text and str(evil) in text, text
    assert "Unsupported global" in text and "\n" not in text
    assert "weights_only=False" not in text  # never suggests the unsafe way
    with pytest.raises(LayerctlError):
        fv.load_transparent_net(evil, "decoder", "sdxl")
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TransparentVAE.pth"]
    # the file really is malicious: a full unpickle (what layerctl never does) runs the payload
    torch.load(str(evil), weights_only=False)
    assert target.read_text() == "this file should not exist"


def test_unreadable_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(LayerctlError, match="not a readable torch weights file"):
        fv.load_flux_decoder(garbage)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(LayerctlError, match="not a readable .safetensors file"):
        fv.load_flux_decoder(short)
    with pytest.raises(LayerctlError, match="no such file"):
        fv.load_flux_encoder(tmp_path / "nope.pth")
    listy = _save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(LayerctlError, match="holds a list, not a state dict"):
        fv.load_flux_encoder(listy)
    mixed = _save({"encoder.blocks.0.weight": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pth")
    with pytest.raises(LayerctlError, match="not a plain state dict: entry 'note' holds a str"):
        fv.load_flux_encoder(mixed)


def test_official_file_names_and_repo(tmp_path, monkeypatch):
    from layerctl.core.flux_facts import FLUX_OFFICIAL_FILES, FLUX_REPO
    from layerctl.models.weights import find_official

    assert FLUX_OFFICIAL_FILES["decoder"] == FLUX_OFFICIAL_FILES["encoder"] == "TransparentVAE.pth"
    assert FLUX_OFFICIAL_FILES["rgba"] == "layerlora.safetensors"
    wdir = tmp_path / "weights"
    wdir.mkdir()
    (wdir / "TransparentVAE.pth").write_bytes(b"x")
    assert find_official(["TransparentVAE.pth"], str(wdir)) == [wdir / "TransparentVAE.pth"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LayerctlError) as err:
        find_official(["layerlora.safetensors"], str(wdir))
    assert FLUX_REPO in str(err.value) and "layerlora.safetensors" in str(err.value)
    assert "LayerDiffusion/layerdiffusion-v1" not in str(err.value)
    with pytest.raises(LayerctlError, match="LayerDiffusion/layerdiffusion-v1"):
        find_official(["vae_transparent_decoder.safetensors"], str(wdir))
