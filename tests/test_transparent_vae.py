"""Transparent VAE: official layouts, parity with the official fixtures, TTA, strict files."""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from layerctl.errors import LayerctlError
from layerctl.models.transparent_vae import (
    OFFSET_SCALE,
    TransparentDecoder,
    TransparentEncoder,
    decode_rgba,
    decode_tta,
    default_tta_chunk,
    encode_offset,
    fixture_state_dict,
    load_decoder,
    load_encoder,
    new_decoder,
    new_encoder,
    save_module,
    transparent_latent,
    vae_input,
)

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-v1"
TOL_DECODER = 2e-5  # fixtures/README.md: single_pass / augmented / tta_raw_*, strict


def _ref(name):
    path = REF / name
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def _manifest(name):
    return json.loads(_ref(name).read_text())["tensors"]


def _meta(cls, **kw):
    with torch.device("meta"):
        return cls(**kw)


def _with_fixture_weights(cls):
    module = _meta(cls)
    module.load_state_dict(fixture_state_dict(module), assign=True)
    return module.eval()


@pytest.fixture(scope="module")
def ref_decoder():
    _ref("fixtures/decoder_128x128.npz")
    return _with_fixture_weights(TransparentDecoder)


@pytest.fixture(scope="module")
def ref_encoder():
    _ref("fixtures/encoder_128x128.npz")
    return _with_fixture_weights(TransparentEncoder)


class Recorder(nn.Module):
    """Wraps a decoder; keeps every raw output (per TTA batch) for inspection."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.outputs = []

    def forward(self, pixels, latent):
        out = self.inner(pixels, latent)
        self.outputs.extend(out.split(1))
        return out


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("stem", ["vae_transparent", "layer_sd15_vae_transparent"])
def test_state_dicts_match_official_manifests(stem):
    for cls, part in ((TransparentDecoder, "decoder"), (TransparentEncoder, "encoder")):
        man = _manifest(f"{stem}_{part}.json")
        sd = _meta(cls).state_dict()
        assert sorted(sd) == sorted(man)
        for key, shape in man.items():
            assert list(sd[key].shape) == shape, key


def test_fixture_weight_rule_reproduces_manifest_hashes(ref_decoder, ref_encoder):
    wm = json.loads(_ref("fixtures/weights_manifest.json").read_text())
    weights = {**ref_decoder.state_dict(), **ref_encoder.state_dict()}
    entries = [e for group in wm.values() for e in group]
    assert len(entries) == 556
    for e in entries:
        t = weights[e["key"]].detach().numpy().astype("<f4")
        assert hashlib.sha256(t.tobytes()).hexdigest() == e["sha256_f32_le"], e["key"]


def test_new_nets_are_deterministic_and_start_neutral():
    a, b, c = new_encoder(3), new_encoder(3), new_encoder(4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.weight"], sc["blocks.0.weight"])
    assert torch.count_nonzero(sa["blocks.16.weight"]) == 0 and torch.count_nonzero(sa["blocks.16.bias"]) == 0
    rgba = torch.rand(2, 4, 16, 16)
    assert torch.count_nonzero(encode_offset(a, rgba)) == 0
    mean, std = torch.randn(2, 4, 2, 2), torch.rand(2, 4, 2, 2)
    assert torch.equal(transparent_latent(a, rgba, lambda x: (mean, std)), mean)
    small = dict(block_out_channels=(8, 8, 8, 8, 16, 16, 16))
    d1, d2 = new_decoder(5, **small), new_decoder(5, **small)
    assert torch.equal(d1.conv_in.weight, d2.conv_in.weight)
    assert torch.count_nonzero(d1.latent_conv_in.weight) == 0


def test_decoder_rejects_sizes_not_multiple_of_64():
    d = new_decoder(0, block_out_channels=(4, 4, 4, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="multiples of 64"):
        d(torch.rand(1, 3, 64, 96), torch.rand(1, 4, 8, 12))


# ---------------------------------------------------------------- parity with the official fixtures


def test_decoder_parity_128x128_batched_tta(ref_decoder):
    z = np.load(_ref("fixtures/decoder_128x128.npz"))
    rec = Recorder(ref_decoder)
    px, lat = torch.from_numpy(z["pixel"]), torch.from_numpy(z["latent"])
    out = decode_tta(rec, px, lat, chunk=8).numpy()  # the 8 passes as one batch
    assert len(rec.outputs) == 8
    raws = [r.numpy() for r in rec.outputs]
    errs = {f"tta_raw_{k}": _maxdiff(raws[k], z[f"tta_raw_{k}"]) for k in range(8)}
    errs["single_pass"] = _maxdiff(raws[0], z["single_pass"])  # pass 0 is the plain pass
    errs["augmented"] = _maxdiff(out, z["augmented"])
    assert max(errs.values()) <= TOL_DECODER, errs
    # the median is the lower one: np.median (mean of 4th and 5th) is far off here
    stacked = np.stack([np.clip(np.asarray(r), 0, 1) for r in z_unaugmented(z)])
    assert _maxdiff(np.median(stacked, axis=0), z["augmented"]) > 1e-3


def z_unaugmented(z):
    """The fixture's raw TTA passes, mapped back to the image frame (official inverse)."""
    out = []
    for k in range(8):
        flip, rot = k >= 4, k % 4
        t = torch.rot90(torch.from_numpy(z[f"tta_raw_{k}"]), k=-rot, dims=(2, 3))
        if flip:
            t = torch.flip(t, dims=(3,))
        out.append(t.numpy())
    return out


def test_decoder_parity_64x192_non_square(ref_decoder):
    z = np.load(_ref("fixtures/decoder_64x192.npz"))
    rec = Recorder(ref_decoder)
    px, lat = torch.from_numpy(z["pixel"]), torch.from_numpy(z["latent"])
    out = decode_tta(rec, px, lat, chunk=4).numpy()  # 64x192 passes batched, then 192x64 ones
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    raws = {k: rec.outputs[i].numpy() for i, k in enumerate(order)}
    assert [raws[k].shape[-2:] for k in range(8)] == [(64, 192), (192, 64)] * 4
    errs = {f"tta_raw_{k}": _maxdiff(raws[k], z[f"tta_raw_{k}"]) for k in range(8)}
    errs["augmented"] = _maxdiff(out, z["augmented"])
    with torch.no_grad():
        single = ref_decoder(px, lat).numpy()  # one plain batch-1 pass, unclipped
    errs["single_pass"] = _maxdiff(single, z["single_pass"])
    assert max(errs.values()) <= TOL_DECODER, errs


def test_encoder_parity(ref_encoder):
    z = np.load(_ref("fixtures/encoder_128x128.npz"))
    rgba = torch.from_numpy(z["rgba"]).permute(0, 3, 1, 2).float() / 255.0
    seen = {}

    def vae_encode(x):
        seen["vae_feed"] = x
        params = torch.from_numpy(z["posterior_params"])
        return params[:, :4], torch.exp(0.5 * params[:, 4:].clamp(-30, 20))

    with torch.no_grad():
        raw = ref_encoder(torch.from_numpy(z["offset_feed"]).contiguous(memory_format=torch.channels_last))
        offset = encode_offset(ref_encoder, rgba)
        latent = transparent_latent(ref_encoder, rgba, vae_encode)
    assert np.array_equal(seen["vae_feed"].numpy(), z["vae_feed"])  # by value (-0.0 == 0.0)
    assert np.array_equal(vae_input(rgba).numpy(), z["vae_feed"])
    assert _maxdiff(raw, z["raw"]) <= 1e-7
    assert _maxdiff(offset, z["offset"]) <= 5e-5
    assert _maxdiff(offset / OFFSET_SCALE, z["raw"]) <= 1e-7
    assert _maxdiff(latent, z["latent"]) <= 5e-5
    assert float(np.abs(z["offset"]).max()) > 1.0  # the offset matters in this fixture


def test_chain_encode_then_decode(ref_encoder, ref_decoder):
    z = np.load(_ref("fixtures/chain_combo_128x128.npz"))
    rgba = torch.from_numpy(z["enc_rgba"]).permute(0, 3, 1, 2).float() / 255.0
    params = torch.from_numpy(z["enc_posterior_params"])

    def vae_encode(x):
        return params[:, :4], torch.exp(0.5 * params[:, 4:].clamp(-30, 20))

    with torch.no_grad():
        latent = transparent_latent(ref_encoder, rgba, vae_encode)
    assert _maxdiff(latent, z["enc_latent"]) <= 5e-5
    pixels = (torch.from_numpy(z["dec_fwd_vae_decoded"]) * 0.5 + 0.5).clip(0, 1)
    assert _maxdiff(pixels, z["dec_pixel"]) <= 1e-6
    rgba_out = decode_rgba(ref_decoder, pixels, latent, chunk=8)
    median = torch.cat([rgba_out[:, 3:4], rgba_out[:, :3]], dim=1).numpy()
    assert _maxdiff(median, z["dec_fwd_augmented"]) <= TOL_DECODER
    assert _maxdiff(median, z["dec_augmented"]) <= TOL_DECODER
    png = (rgba_out[0].permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)  # official truncation
    assert np.abs(png.astype(int) - z["dec_fwd_png"].astype(int)).max() <= 1


# ---------------------------------------------------------------- TTA semantics


class PointwiseDecoder(nn.Module):
    """Equivariant under flips and rot90: a pointwise function of the pixel and of the
    (nearest-upsampled) latent below it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, pixels, latent):
        up = latent.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        alpha = torch.sigmoid(up[:, :1] * 3 + pixels[:, :1] - 0.5) * self.w
        return torch.cat([alpha * 1.3 - 0.1, pixels * up[:, 1:4]], dim=1)


class CornerDecoder(nn.Module):
    """Not equivariant: every output pixel is the input's top-left pixel."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, pixels, latent):
        corner = pixels[:, :1, :1, :1] * self.w
        return corner.expand(pixels.shape[0], 4, *pixels.shape[2:])


@pytest.mark.parametrize("size", [(64, 64), (64, 128)])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_tta_of_equivariant_function_is_the_function(size, chunk):
    g = torch.Generator().manual_seed(0)
    h, w = size
    px = torch.rand(2, 3, h, w, generator=g)
    lat = torch.randn(2, 4, h // 8, w // 8, generator=g)
    dec = PointwiseDecoder()
    plain = dec(px, lat).clamp(0, 1)
    out = decode_tta(dec, px, lat, chunk=chunk)
    assert out.shape == (2, 4, h, w)
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.equal(decode_tta(dec, px, lat, tta=False), plain)
    rgba = decode_rgba(dec, px, lat, chunk=chunk)
    assert torch.equal(rgba[:, :3], out[:, 1:]) and torch.equal(rgba[:, 3], out[:, 0])


def test_tta_takes_the_lower_median():
    px = torch.zeros(1, 3, 64, 64)
    px[0, 0, 0, 0], px[0, 0, 0, -1], px[0, 0, -1, 0], px[0, 0, -1, -1] = 0.1, 0.2, 0.3, 0.4
    # each corner reaches the top-left in 2 of the 8 passes: values {.1,.1,.2,.2,.3,.3,.4,.4}
    out = decode_tta(CornerDecoder(), px, torch.zeros(1, 4, 8, 8), chunk=8)
    assert torch.allclose(out, torch.full_like(out, 0.2))


def test_channels_last_decoder_gives_the_same_decode():
    """use_channels_last (the CPU default in gen): same TTA and single-pass output within float noise."""
    from layerctl.models.transparent_vae import _is_channels_last, use_channels_last

    g = torch.Generator().manual_seed(3)
    dec = new_decoder(2, block_out_channels=(8, 8, 8, 8, 16, 16, 16)).eval()
    with torch.no_grad():
        dec.latent_conv_in.weight.normal_(0, 0.1, generator=g)  # not the zero start: the latent matters
    px, lat = torch.rand(1, 3, 64, 64, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    plain_tta, plain_one = decode_tta(dec, px, lat), decode_tta(dec, px, lat, tta=False)
    assert not _is_channels_last(dec)
    cl = use_channels_last(dec)
    assert _is_channels_last(cl)
    for tta, want in ((True, plain_tta), (False, plain_one)):
        got = decode_tta(cl, px, lat, tta=tta)
        assert got.is_contiguous() and torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_default_tta_chunk():
    assert default_tta_chunk("cpu") == 1
    assert default_tta_chunk(torch.device("cuda", 0)) == 8


# ---------------------------------------------------------------- files


def _write_manifest_file(path, manifest, change=None, drop=None, add=None, seed=0):
    """Random fp16 tensors in the exact manifest layout (optionally altered)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in manifest.items():
        if key == drop:
            continue
        if key == change:
            shape = [shape[0] + 1, *shape[1:]]
        state[key] = torch.randn(*shape, generator=g).to(torch.float16)
    if add:
        state[add] = torch.zeros(3, dtype=torch.float16)
    save_file(state, str(path))
    return state


def test_load_full_size_decoder_from_manifest_layout(tmp_path):
    from safetensors.torch import save_file

    man = _manifest("vae_transparent_decoder.json")
    path = tmp_path / "vae_transparent_decoder.safetensors"
    # every tensor a different constant (exact in fp16), so each key must land in its own place
    values = {key: (i + 1) / 1024 for i, key in enumerate(sorted(man))}
    save_file({k: torch.full(man[k], v, dtype=torch.float16) for k, v in values.items()}, str(path))
    assert path.stat().st_size == 208266320  # the published size of vae_transparent_decoder
    dec = load_decoder(path)
    assert isinstance(dec, TransparentDecoder) and not dec.training
    assert not any(p.requires_grad for p in dec.parameters())
    params = dict(dec.named_parameters())
    assert set(params) == set(values)
    for key, v in values.items():
        assert params[key].dtype == torch.float32
        assert params[key].min() == v and params[key].max() == v, key
    half = load_decoder(path, dtype=torch.float16)
    assert half.latent_conv_in.weight.dtype == torch.float16
    assert float(half.latent_conv_in.weight[0, 0]) == values["latent_conv_in.weight"]


def test_load_refuses_broken_layouts_naming_the_key(tmp_path):
    man = _manifest("vae_transparent_encoder.json")
    good = tmp_path / "enc.safetensors"
    state = _write_manifest_file(good, man)
    enc = load_encoder(good)
    assert torch.equal(enc.blocks[16].bias, state["blocks.16.bias"].float())
    cases = {
        "missing key blocks.8.weight": dict(drop="blocks.8.weight"),
        "key blocks.4.bias has shape [65], expected [64]": dict(change="blocks.4.bias"),
        "unexpected key extra.weight": dict(add="extra.weight"),
    }
    for i, (message, change) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.safetensors"
        _write_manifest_file(bad, man, **change)
        with pytest.raises(LayerctlError) as err:
            load_encoder(bad)
        text = str(err.value)
        assert message in text and str(bad) in text and "transparent encoder" in text, text
    # a decoder file is not an encoder (and vice versa): the first missing key is named
    with pytest.raises(LayerctlError, match=r"not a LayerDiffuse transparent decoder: missing key conv_in\.weight"):
        load_decoder(good)


def test_load_refuses_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(LayerctlError, match="no such file"):
        load_encoder(tmp_path / "nope.safetensors")
    with pytest.raises(LayerctlError, match="not a file"):
        load_decoder(tmp_path)
    good = tmp_path / "enc.safetensors"
    _write_manifest_file(good, _manifest("vae_transparent_encoder.json"))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 12) + b"not json!!!!")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for p in (truncated, garbage, empty):
        with pytest.raises(LayerctlError, match="not a readable .safetensors file") as err:
            load_encoder(p)
        assert str(p) in str(err.value)


def test_save_module_roundtrip_fp16_atomic_and_no_overwrite(tmp_path):
    from safetensors import safe_open

    enc = _with_fixture_weights(TransparentEncoder)
    path = tmp_path / "out" / "encoder.safetensors"
    save_module(enc, path)
    with safe_open(str(path), "pt") as f:
        keys = sorted(f.keys())
        assert f.get_tensor("blocks.0.weight").dtype == torch.float16
    assert keys == sorted(enc.state_dict())
    again = load_encoder(path)
    assert torch.equal(again.blocks[0].weight, enc.blocks[0].weight.half().float())
    with pytest.raises(LayerctlError, match="exists"):
        save_module(enc, path)
    save_module(new_encoder(1), path, dtype=torch.float32, overwrite=True)
    assert torch.count_nonzero(load_encoder(path).blocks[16].weight) == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["encoder.safetensors"]  # no temp files left
