"""SD1.5 attention-sharing units (layerctl.models.attention_sharing): official-fixture parity, strict loading of the
official file layouts, and behaviour inside a small SD1.5-shaped diffusers UNet."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from layerctl.errors import LayerctlError

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-v1"
FIX = REF / "fixtures" / "attention_sharing"
TOL = 5e-5  # fixtures/attention_sharing/README.md

layers = pytest.importorskip("layerctl.models.attention_sharing")
diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

needs_ref = pytest.mark.skipif(not FIX.is_dir(), reason="shared/reference/layerdiffuse-v1 not present")

SD15_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)

SMALL_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

OFFICIAL_FILES = {
    "layer_sd15_transparent_attn": (1, False),
    "layer_sd15_joint": (3, False),
    "layer_sd15_fg2bg": (2, True),
    "layer_sd15_bg2fg": (2, True),
}


# --------------------------------------------------------------------------- fixture regeneration


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIX / "weights_manifest.json").read_text())


@pytest.fixture(scope="module")
def gen(manifest):
    """The documented rule: tensor from key name (crc32 seed) and shape, cached."""
    entries = {e["key"]: e for e in manifest["tensors"]}
    cache: dict[str, torch.Tensor] = {}

    def make(key: str) -> torch.Tensor:
        if key in cache:
            return cache[key]
        e = entries[key]
        shape = e["shape"]
        seed = zlib.crc32(key.encode("utf-8"))
        z = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        kind = e["kind"]
        if kind == "weight":
            gain = 1.7 if key.startswith("kwargs_encoder.") else 1.0
            t = z * (gain / math.sqrt(math.prod(shape[1:])))
        elif kind == "bias":
            t = z * 0.01
        elif kind == "norm_weight":
            t = 1.0 + 0.1 * z
        elif kind == "norm_bias":
            t = 0.1 * z
        else:
            t = z
        cache[key] = t
        return t

    make.entries = entries
    return make


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()


@needs_ref
@pytest.mark.parametrize(
    "key",
    [
        "input.h.F3",
        "input.context.F2",
        "input.cond_overwrite.2",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "hookers.layers.0.to_q_lora.2.down.weight",
        "hookers.layers.1.temporal_n.weight",
        "hookers.layers.1.temporal_n.bias",
        "hookers.layers.1.control_convs.1.0.weight",
        "kwargs_encoder.blocks_0.0.weight",
        "kwargs_encoder.blocks_3.2.bias",
    ],
)
def test_regenerated_tensor_matches_manifest_sha256(gen, key):
    assert _sha(gen(key)) == gen.entries[key]["sha256_f32_le"]


@needs_ref
def test_control_encoder_parity(gen):
    data = np.load(FIX / "control_encoder.npz")
    enc = layers.ControlEncoder()
    prefix = "kwargs_encoder."
    enc.load_state_dict({k[len(prefix):]: gen(k) for k in gen.entries if k.startswith(prefix)}, strict=True)
    # regenerated control image: tanh may differ by 1 ulp between CPUs
    img = torch.tanh(gen("input.control_image")) * 0.5 + 0.5
    assert np.abs(img.numpy() - data["image_01"]).max() <= 1e-6
    image01 = torch.from_numpy(data["image_01"])
    assert np.array_equal((image01 * 2 - 1).numpy(), data["encoder_input"])
    with torch.no_grad():
        signals = enc(image01)
    assert sorted(signals) == [4, 16, 64, 256]
    for n in (256, 64, 16, 4):
        want = data[f"signal_{n}"]
        assert signals[n].shape == want.shape
        diff = float(np.abs(signals[n].numpy() - want).max())
        print(f"signal_{n}: max abs diff {diff:.3g}")
        assert diff <= TOL


CASES = [
    "attn1_f1",
    "attn1_f1_small",
    "attn1_f3",
    "attn1_f2_control",
    "attn2_f1",
    "attn2_f3_overwrite",
    "attn2_f2_control_overwrite",
]


def _fixture_unit(gen, case):
    """A diffusers Attention with the fixture's weights and its unit installed as processor."""
    is_attn2 = case["module"] == "attn2"
    frames = case["frames"]
    attn = Attention(
        query_dim=320, cross_attention_dim=768 if is_attn2 else None, heads=8, dim_head=40, bias=False, out_bias=True
    ).eval()
    wp = case["wrapped_module_key_prefix"]
    wrapped = {}
    for key, e in gen.entries.items():
        if key.startswith(wp):
            assert e["diffusers_key"].endswith(key[len(wp):])
            wrapped[key[len(wp):]] = gen(key)
    attn.load_state_dict(wrapped, strict=True)
    unit = layers.AttentionSharingUnit(attn, frames, case["use_control"], rank=256).eval()
    up = case["unit_key_prefix"]
    expected = set(unit.state_dict())
    sd = {key[len(up):]: gen(key) for key in gen.entries if key.startswith(up) and key[len(up):] in expected}
    unit.load_state_dict(sd, strict=True)
    attn.set_processor(layers.AttentionSharingProcessor(unit))
    return attn, unit


@needs_ref
@pytest.mark.parametrize("name", CASES)
def test_unit_parity(gen, manifest, name):
    case = manifest["cases"][name]
    data = np.load(FIX / f"unit_{case['module']}.npz")
    frames = case["frames"]
    attn, unit = _fixture_unit(gen, case)
    h = gen(f"input.h.F{frames}")
    if name == "attn1_f1_small":
        h = h * 0.015625
    ctx = gen(f"input.context.F{frames}") if case["module"] == "attn2" else None
    mark = torch.from_numpy(data[f"{name}__cond_mark"])
    assert mark.tolist() == case["cond_mark"]
    unit.cond_mark = mark
    ow_index = data[f"{name}__overwrite_index"].tolist()
    unit.cond_overwrite = [None if k < 0 else gen(f"input.cond_overwrite.{k}") for k in ow_index] or None
    if case["use_control"]:
        unit.control_signals = {256: torch.from_numpy(np.load(FIX / "control_encoder.npz")["signal_256"])}
    with torch.no_grad():
        out = attn(h, encoder_hidden_states=ctx)
    want = data[f"{name}__out"]
    assert out.shape == want.shape
    diff = float(np.abs(out.numpy() - want).max())
    print(f"{name}: max abs diff {diff:.3g}")
    assert diff <= TOL
    if case["module"] == "attn1" and unit.cond_overwrite:
        unit.cond_overwrite = None  # attn1 ignores overrides
        with torch.no_grad():
            assert torch.equal(attn(h), out)


@needs_ref
def test_override_touches_only_cond_rows_through_attention(gen, manifest):
    """attn2_f3_overwrite: without the override, the uncond rows (3-5) are unchanged and the cond
    rows differ; inverting the mark moves the change to the other group."""
    case = manifest["cases"]["attn2_f3_overwrite"]
    attn, unit = _fixture_unit(gen, case)
    h, ctx = gen("input.h.F3"), gen("input.context.F3")
    unit.cond_mark = torch.tensor(case["cond_mark"], dtype=torch.float32)
    with torch.no_grad():
        plain = attn(h, encoder_hidden_states=ctx)
        unit.cond_overwrite = [gen("input.cond_overwrite.0"), None, gen("input.cond_overwrite.2")]
        over = attn(h, encoder_hidden_states=ctx)
        unit.cond_mark = 1 - unit.cond_mark
        inverted = attn(h, encoder_hidden_states=ctx)
    assert torch.allclose(over[3:], plain[3:], atol=1e-6)
    assert (over[:3] - plain[:3]).abs().amax(dim=(1, 2)).min() > 0.1  # row 1 changes via temporal
    assert torch.allclose(inverted[:3], plain[:3], atol=1e-6)
    assert (inverted[3:] - plain[3:]).abs().max() > 0.1


# --------------------------------------------------------------------------- official layouts (meta)


@pytest.fixture(scope="module")
def sd15_meta_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_CONFIG)


def _official_manifest(stem):
    return json.loads((REF / f"{stem}.json").read_text())


@needs_ref
@pytest.mark.parametrize("stem", sorted(OFFICIAL_FILES))
def test_official_layout_loads_strictly(sd15_meta_unet, stem):
    m = _official_manifest(stem)
    shapes = m["tensors"]
    assert len(shapes) == m["tensor_count"]
    frames, use_control = layers.detect_attention_sharing_file(shapes)
    assert (frames, use_control) == OFFICIAL_FILES[stem] == (m["frames"], m["use_control"])
    with torch.device("meta"):
        patcher = layers.AttentionSharingPatcher(sd15_meta_unet, frames, use_control, rank=m["rank"])
    assert patcher.unit_names == [u["diffusers"] for u in m["hooker_units"]]
    for unit, info in zip(patcher.units, m["hooker_units"]):
        assert unit.channels == info["hidden_size"]
        assert unit.attn.to_k.in_features == info["to_k_in_features"]
    ours = {k: list(v.shape) for k, v in patcher.state_dict().items()}
    assert ours == {k: list(v) for k, v in shapes.items()}
    assert sum(math.prod(s) for s in ours.values()) == m["param_count"]
    sd = {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in shapes.items()}
    patcher.load_official_state_dict(sd, f"{stem}.safetensors")
    assert patcher.hookers.layers[5].to_k_lora[0].down.weight.dtype == torch.float16


@needs_ref
@pytest.mark.parametrize("stem", ["layer_sd15_joint", "layer_sd15_fg2bg"])
def test_official_layout_refuses_missing_or_misshaped_key(sd15_meta_unet, stem):
    m = _official_manifest(stem)
    frames, use_control = OFFICIAL_FILES[stem]
    with torch.device("meta"):
        patcher = layers.AttentionSharingPatcher(sd15_meta_unet, frames, use_control)

    def sd_from(shapes):
        return {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in shapes.items()}

    missing = dict(m["tensors"])
    gone = "hookers.layers.17.to_v_lora.1.up.weight"
    del missing[gone]
    with pytest.raises(LayerctlError, match=f"missing key '{gone}'.*") as err:
        patcher.load_official_state_dict(sd_from(missing), f"{stem}.safetensors")
    assert f"{stem}.safetensors" in str(err.value)

    bad = dict(m["tensors"])
    key = "hookers.layers.30.temporal_q.weight"
    bad[key] = [1280, 1279]
    with pytest.raises(LayerctlError, match=f"key '{key}' has shape"):
        patcher.load_official_state_dict(sd_from(bad), f"{stem}.safetensors")

    extra = dict(m["tensors"])
    extra["hookers.layers.0.to_q_lora.7.up.weight"] = [320, 256]
    with pytest.raises(LayerctlError, match=r"unexpected key 'hookers\.layers\.0\.to_q_lora\.7\.up\.weight'"):
        patcher.load_official_state_dict(sd_from(extra), f"{stem}.safetensors")


def test_detect_attention_sharing_file():
    keys = ["hookers.layers.3.to_out_lora.2.up.weight", "hookers.layers.0.temporal_i.weight"]
    assert layers.detect_attention_sharing_file(keys) == (3, False)
    assert layers.detect_attention_sharing_file(keys[:1] + ["kwargs_encoder.blocks_0.0.bias"]) == (3, True)
    with pytest.raises(LayerctlError):
        layers.detect_attention_sharing_file(["conv_in.weight"])
    assert layers.FILE_SPECS == {"rgba": (1, False), "joint": (3, False), "fg2bg": (2, True), "bg2fg": (2, True)}
    from layerctl.core.frames import OFFICIAL_FILES as NAMES, SD15_LAYOUTS

    for mode, (frames, _) in layers.FILE_SPECS.items():
        assert len(SD15_LAYOUTS[mode][0]) == frames
        stem = NAMES["sd15"][mode].removesuffix(".safetensors")
        assert OFFICIAL_FILES[stem] == layers.FILE_SPECS[mode]


# --------------------------------------------------------------------------- small SD1.5-shaped UNet


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SMALL_CONFIG).eval()


def _randomize(patcher, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in patcher.named_parameters():
            if name.startswith("kwargs_encoder."):
                continue
            if name.endswith("temporal_n.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))


def _run(unet, x, ctx):
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx).sample


def test_small_unet_install_run_remove(small_unet):
    frames = 2
    patcher = layers.AttentionSharingPatcher(small_unet, frames, use_control=False, rank=4)
    assert len(patcher.units) == 8
    assert patcher.unit_names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert patcher.unit_names[-1] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert all(k.startswith("hookers.layers.") for k in patcher.state_dict())
    _randomize(patcher)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    ctx = layers.repeat_frames(torch.randn(2, 7, 32, generator=g), frames)
    keys_before = list(small_unet.state_dict())
    originals = [type(u.attn.processor) for u in patcher.units]
    base = _run(small_unet, x, ctx)

    patcher.install()
    assert list(small_unet.state_dict()) == keys_before  # units are not UNet submodules
    assert all(isinstance(u.attn.processor, layers.AttentionSharingProcessor) for u in patcher.units)
    out = _run(small_unet, x, ctx)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    with pytest.raises(LayerctlError, match="multiple of"):
        _run(small_unet, x[:3], ctx[:3])

    # cross-frame sharing: frame 1 of group 0 sees frame 0, group 1 does not
    x2 = x.clone()
    x2[0] += 1.0
    out2 = _run(small_unet, x2, ctx)
    assert (out2[1] - out[1]).abs().max() > 1e-4
    assert torch.allclose(out2[2:], out[2:], atol=1e-5)

    # merged weights are cached, but an in-place change of a LoRA weight is seen
    up = patcher.units[0].to_q_lora[1].up.weight
    with torch.no_grad():
        up.mul_(3.0)
        assert (_run(small_unet, x, ctx) - out).abs().max() > 1e-4
        up.div_(3.0)
    assert torch.allclose(_run(small_unet, x, ctx), out, atol=1e-6)

    # training: with grad enabled the LoRA weights get gradients
    small_unet.requires_grad_(False)
    patcher.requires_grad_(True)
    loss = small_unet(x, 10, encoder_hidden_states=ctx).sample.square().mean()
    loss.backward()
    assert patcher.units[3].to_v_lora[1].up.weight.grad.abs().sum() > 0
    assert patcher.units[0].temporal_o.weight.grad.abs().sum() > 0
    patcher.zero_grad(set_to_none=True)
    patcher.requires_grad_(False)

    patcher.remove()
    assert [type(u.attn.processor) for u in patcher.units] == originals
    assert torch.equal(_run(small_unet, x, ctx), base)


def test_small_unet_zeroed_unit_is_base_attention(small_unet):
    """Zero LoRA 'up' and zero temporal_o: the unit returns the plain attention (up to rounding of
    (h + a) - h) and frames are independent."""
    frames = 3
    patcher = layers.AttentionSharingPatcher(small_unet, frames, use_control=False, rank=4)
    _randomize(patcher)
    with torch.no_grad():
        for unit in patcher.units:
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                for pair in getattr(unit, f"{proj}_lora"):
                    pair.up.weight.zero_()
            unit.temporal_o.weight.zero_()
            unit.temporal_o.bias.zero_()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    ctx = layers.repeat_frames(torch.randn(2, 7, 32, generator=g), frames)
    base = _run(small_unet, x, ctx)
    with patcher.installed_in():
        out = _run(small_unet, x, ctx)
        x2 = x.clone()
        x2[1] += 1.0
        out2 = _run(small_unet, x2, ctx)
        # with temporal_o zeroed only the edited row changes
        assert torch.allclose(out2[[0, 2, 3, 4, 5]], out[[0, 2, 3, 4, 5]], atol=1e-5)
        # a non-zero temporal branch is not skipped
        with torch.no_grad():
            patcher.units[0].temporal_o.bias.fill_(0.5)
        assert (_run(small_unet, x, ctx) - out).abs().max() > 1e-3
    assert not patcher.installed
    assert torch.allclose(out, base, atol=1e-4)


def test_small_unet_prompt_override_and_cond_mark(small_unet):
    frames = 2
    patcher = layers.AttentionSharingPatcher(small_unet, frames, use_control=False, rank=4)
    _randomize(patcher, seed=5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    neg, pos = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    ctx = layers.repeat_frames(torch.cat([neg, pos]), frames)  # diffusers CFG order: [uncond, cond]
    mark = layers.make_cond_mark([True, False], frames)
    assert mark.tolist() == [1.0, 1.0, 0.0, 0.0]
    with patcher.installed_in():
        plain = _run(small_unet, x, ctx)
        patcher.set_prompt_overrides([None, torch.randn(1, 7, 32, generator=g)])
        with pytest.raises(LayerctlError, match="cond_mark"):
            _run(small_unet, x, ctx)
        patcher.set_cond_mark(mark)
        over = _run(small_unet, x, ctx)
        patcher.set_prompt_overrides(None)
        again = _run(small_unet, x, ctx)
    assert torch.allclose(over[:2], plain[:2], atol=1e-5)  # uncond group untouched
    assert (over[3] - plain[3]).abs().max() > 1e-3  # cond row of the overridden frame
    assert (over[2] - plain[2]).abs().max() > 1e-5  # its other frame, through sharing
    assert torch.equal(again, plain)


def test_small_unet_control(small_unet):
    frames = 2
    patcher = layers.AttentionSharingPatcher(small_unet, frames, use_control=True, rank=4)
    _randomize(patcher, seed=6)
    with torch.no_grad():  # gain 1.7 so that the image, not the biases, drives the signals
        for name, p in patcher.kwargs_encoder.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, 1.7 / math.sqrt(p[0].numel()), generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    ctx = layers.repeat_frames(torch.randn(2, 7, 32, generator=g), frames)
    with patcher.installed_in():
        with pytest.raises(LayerctlError, match="set_control"):
            _run(small_unet, x, ctx)
        patcher.set_control(torch.rand(1, 3, 128, 128, generator=g))  # 16x16 latent: wrong size
        with pytest.raises(LayerctlError, match="8x the latent size"):
            _run(small_unet, x, ctx)
        patcher.set_control(torch.rand(3, 64, 64, generator=g))
        sig = patcher.units[0].control_signals
        assert sorted(sig) == [1, 4, 16, 64] and sig[64].shape == (1, 256, 8, 8)
        a = _run(small_unet, x, ctx)
        patcher.set_control(torch.rand(1, 3, 64, 64, generator=g))
        b = _run(small_unet, x, ctx)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-4  # the control image matters
    with pytest.raises(LayerctlError):
        layers.AttentionSharingPatcher(small_unet, 1, use_control=False, rank=4).set_control(torch.rand(1, 3, 64, 64))


# --------------------------------------------------------------------------- file loading


def _save(tmp_path, state, name="layer.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_load_attention_sharing_roundtrip_and_errors(small_unet, tmp_path):
    frames = 2
    src = layers.AttentionSharingPatcher(small_unet, frames, use_control=True, rank=4)
    _randomize(src, seed=8)
    state = {k: v.to(torch.float16) for k, v in src.state_dict().items()}
    path = _save(tmp_path, state)

    patcher = layers.load_attention_sharing(small_unet, path, frames=2, use_control=True)
    assert patcher.frames == 2 and patcher.use_control and patcher.rank == 4
    got = patcher.state_dict()
    assert set(got) == set(state)
    unit_param = patcher.hookers.layers[0].temporal_q.weight
    assert unit_param.dtype == torch.float32  # the UNet's dtype
    assert next(patcher.kwargs_encoder.parameters()).dtype == torch.float32
    assert all(torch.equal(got[k].to(torch.float16), state[k]) for k in state)
    auto = layers.load_attention_sharing(small_unet, path, dtype=torch.float16)  # frames/control from file
    assert (auto.frames, auto.use_control) == (2, True)
    assert auto.hookers.layers[0].temporal_q.weight.dtype == torch.float16

    # the loaded patcher runs
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2 * frames, 4, 8, 8, generator=g)
    ctx = layers.repeat_frames(torch.randn(2, 7, 32, generator=g), frames)
    with patcher.installed_in():
        patcher.set_control(torch.rand(1, 3, 64, 64, generator=g))
        assert torch.isfinite(_run(small_unet, x, ctx)).all()

    # wrong frame count: the first unexpected key is named, with the file
    with pytest.raises(LayerctlError, match=r"unexpected key 'hookers\.layers\.0\.control_convs\.1\.0\.bias'") as err:
        layers.load_attention_sharing(small_unet, path, frames=1, use_control=True)
    assert str(path) in str(err.value)

    # one key removed / one shape changed
    gone = "hookers.layers.3.to_v_lora.1.down.weight"
    p2 = _save(tmp_path, {k: v for k, v in state.items() if k != gone}, "missing.safetensors")
    with pytest.raises(LayerctlError, match=f"missing key '{gone}'") as err:
        layers.load_attention_sharing(small_unet, p2, frames=2, use_control=True)
    assert "missing.safetensors" in str(err.value)
    bad = dict(state)
    bad["kwargs_encoder.blocks_1.0.weight"] = torch.zeros(256, 256, 3, 2, dtype=torch.float16)
    p3 = _save(tmp_path, bad, "shape.safetensors")
    with pytest.raises(LayerctlError, match=r"'kwargs_encoder\.blocks_1\.0\.weight' has shape \[256, 256, 3, 2\]"):
        layers.load_attention_sharing(small_unet, p3, frames=2, use_control=True)

    # truncated / not a safetensors file / absent
    raw = path.read_bytes()
    p4 = tmp_path / "truncated.safetensors"
    p4.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LayerctlError, match="truncated.safetensors"):
        layers.load_attention_sharing(small_unet, p4, frames=2, use_control=True)
    p5 = tmp_path / "junk.safetensors"
    p5.write_bytes(b"\x00" * 64)
    with pytest.raises(LayerctlError, match="junk.safetensors"):
        layers.load_attention_sharing(small_unet, p5)
    p6 = _save(tmp_path, {"conv_in.weight": torch.zeros(2, 2)}, "other.safetensors")
    with pytest.raises(LayerctlError, match="other.safetensors.*not an SD1.5 attention-sharing"):
        layers.load_attention_sharing(small_unet, p6)
    with pytest.raises(LayerctlError, match="not found"):
        layers.load_attention_sharing(small_unet, tmp_path / "nope.safetensors")
