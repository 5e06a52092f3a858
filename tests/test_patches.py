"""layerctl.models.patches: ldm->diffusers map, patch files, fp32 merge, conv_in widening, bit-exact restore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from layerctl.errors import LayerctlError
from layerctl.models import patches as P

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-v1"

# Small UNets of both families' shapes (block_out_channels (32, 64), cross_attention_dim 32).
XL_SMALL = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=(2, 4),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    use_linear_projection=True, norm_num_groups=8,
)
SD15_SMALL = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)


def _ref(name: str) -> dict:
    path = REF / name
    if not path.exists():
        pytest.skip(f"reference file {path} not available")
    return json.loads(path.read_text())


def _unet(config: dict, seed: int = 0, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).to(dtype).eval()


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _snapshot(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _assert_bit_exact(unet, snap: dict) -> None:
    sd = unet.state_dict()
    assert set(sd) == set(snap)
    for k, v in sd.items():
        assert v.dtype == snap[k].dtype and v.shape == snap[k].shape, k
        assert torch.equal(v, snap[k]), k


def _xl_forward(unet, x):
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(x.shape[0], 3, 32, generator=g)
    added = {"text_embeds": torch.randn(x.shape[0], 32, generator=g), "time_ids": torch.randn(x.shape[0], 6, generator=g)}
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=cond, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- key map


@pytest.mark.parametrize("fname", ["sdxl_ldm_to_diffusers.json", "sd15_ldm_to_diffusers.json"])
def test_map_equals_reference_and_fits_meta_unet(fname):
    ref = _ref(fname)
    mapping = P.ldm_to_diffusers_map(ref["diffusers_config"])
    expected = {k: v[0] for k, v in ref["map"].items()}
    assert len(mapping) == ref["count"]
    assert mapping == expected
    meta = _meta_unet(ref["diffusers_config"]).state_dict()
    for ldm_key, (dkey, shape) in ref["map"].items():
        assert dkey in meta, dkey
        assert list(meta[dkey].shape) == shape, dkey
    # bijective
    assert len(set(mapping.values())) == len(mapping) == len(meta)
    assert P.diffusers_to_ldm_map(ref["diffusers_config"])[mapping["input_blocks.0.0.weight"]] == "input_blocks.0.0.weight"


def test_map_of_small_unets_covers_every_key():
    for cfg in (XL_SMALL, SD15_SMALL):
        unet = _meta_unet(cfg)
        mapping = P.ldm_to_diffusers_map(unet)
        assert sorted(mapping.values()) == sorted(unet.state_dict())
    xl = P.ldm_to_diffusers_map(XL_SMALL)
    # layers_per_block=2, two levels: input_blocks 1,2 (level 0), 3 = downsampler, 4,5 (level 1, attention)
    assert xl["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert xl["input_blocks.5.1.transformer_blocks.1.attn1.to_q.weight"] == (
        "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q.weight"
    )
    assert xl["output_blocks.2.2.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert xl["label_emb.0.2.weight"] == "add_embedding.linear_2.weight"
    sd = P.ldm_to_diffusers_map(SD15_SMALL)
    assert sd["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"  # no attention there
    assert sd["input_blocks.1.1.proj_in.weight"] == "down_blocks.0.attentions.0.proj_in.weight"
    assert not any(k.startswith("label_emb") for k in sd)


OTHER_SHAPES = [
    # SD2-like: linear projections, three levels, one layer per block
    dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
         cross_attention_dim=32, attention_head_dim=(2, 4, 4), use_linear_projection=True, norm_num_groups=8),
    # SDXL-like with a deeper transformer stack
    {**XL_SMALL, "transformer_layers_per_block": (1, 3), "layers_per_block": 1},
]


@pytest.mark.parametrize("config", OTHER_SHAPES + [XL_SMALL, SD15_SMALL])
def test_map_agrees_with_diffusers_converter(config):
    """diffusers' own single-file converter, fed an ldm state dict whose tensors are tagged by our map,
    must put every tag on the diffusers key our map names."""
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError:  # pragma: no cover - moved in another diffusers version
        pytest.skip("diffusers has no convert_ldm_unet_checkpoint")
    unet = _meta_unet(config)
    mapping = P.ldm_to_diffusers_map(unet)
    shapes = P.unet_key_shapes(config)
    assert sorted(mapping.values()) == sorted(shapes)
    ckpt, tag = {}, {}
    for i, (ldm_key, dkey) in enumerate(sorted(mapping.items())):
        ckpt["model.diffusion_model." + ldm_key] = torch.full(shapes[dkey], float(i))
        tag[dkey] = float(i)
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    assert set(converted) == set(shapes)
    wrong = [k for k, v in converted.items() if v.flatten()[0].item() != tag[k]]
    assert wrong == []


# --------------------------------------------------------------------------- official manifests


SDXL_MANIFESTS = [
    "layer_xl_transparent_attn.json",
    "layer_xl_transparent_conv.json",
    "layer_xl_fg2ble.json",
    "layer_xl_bg2ble.json",
    "layer_xl_fgble2bg.json",
    "layer_xl_bgble2fg.json",
    "ld_diffusers_sdxl_attn.json",
    "ld_diffusers_sdxl_conv.json",
]


@pytest.fixture(scope="module")
def sdxl_meta():
    ref = _ref("sdxl_ldm_to_diffusers.json")
    return _meta_unet(ref["diffusers_config"])


@pytest.mark.parametrize("fname", SDXL_MANIFESTS)
def test_official_manifest_fits_sdxl(fname, sdxl_meta):
    man = _ref(fname)
    layout = man["tensors"]
    plan = P.validate_patch_layout(sdxl_meta, layout)
    info = P.describe_patch(layout)
    assert info["tensors"] == man["tensor_count"]
    assert info["params"] == man["param_count"]
    assert len(plan) == info["entries"]
    assert len({c.target for c in plan}) == len(plan)
    widened = [c.widen_to for c in plan if c.widen_to is not None]
    expected = man.get("conv_in_in_channels")
    assert widened == ([expected] if expected and expected != 4 else [])
    if man.get("patch_type") == "lora":
        assert info["lora"] == len(plan) and info["lora_ranks"] == [man["rank"]]
        assert info["cross_attention_dim"] == 2048
    # the meta UNet itself was not changed by validation
    assert sdxl_meta.conv_in.in_channels == 4


def test_manifest_with_renamed_key_is_refused(sdxl_meta):
    layout = dict(_ref("layer_xl_transparent_conv.json")["tensors"])
    old = "diffusion_model.input_blocks.4.1.proj_in.weight::diff::0"
    assert old in layout
    layout["diffusion_model.input_blocks.4.1.proj_inn.weight::diff::0"] = layout.pop(old)
    with pytest.raises(LayerctlError, match=r"input_blocks\.4\.1\.proj_inn\.weight"):
        P.validate_patch_layout(sdxl_meta, layout)


def test_manifest_with_changed_shape_is_refused(sdxl_meta):
    layout = dict(_ref("layer_xl_transparent_attn.json")["tensors"])
    key = "diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_k.weight::lora::1"
    assert layout[key] == [256, 2048]
    layout[key] = [256, 768]
    with pytest.raises(LayerctlError, match=r"output_blocks\.3\.1\.transformer_blocks\.1\.attn2\.to_k\.weight") as ei:
        P.validate_patch_layout(sdxl_meta, layout)
    assert "1 of 560" in str(ei.value)
    layout = dict(_ref("layer_xl_fg2ble.json")["tensors"])
    layout["diffusion_model.out.2.weight::diff::0"] = [4, 321, 3, 3]
    with pytest.raises(LayerctlError, match=r"out\.2\.weight"):
        P.validate_patch_layout(sdxl_meta, layout)


def test_sd15_layout_on_sdxl_is_refused(sdxl_meta):
    ref = _ref("sd15_ldm_to_diffusers.json")
    layout = {f"diffusion_model.{k}::diff::0": shape for k, (_, shape) in ref["map"].items() if "attn" in k}
    with pytest.raises(LayerctlError, match=r"input_blocks\.1\.1\.transformer_blocks\.0\.attn1.*SD1\.5 vs SDXL"):
        P.validate_patch_layout(sdxl_meta, layout)


def test_sd15_attention_sharing_file_is_not_a_patch(sdxl_meta):
    layout = _ref("layer_sd15_transparent_attn.json")["tensors"]
    with pytest.raises(LayerctlError, match="attention-sharing"):
        P.validate_patch_layout(sdxl_meta, layout)


def test_conv_in_narrower_than_unet_is_refused(sdxl_meta):
    with pytest.raises(LayerctlError, match=r"input_blocks\.0\.0\.weight"):
        P.validate_patch_layout(sdxl_meta, {"diffusion_model.input_blocks.0.0.weight::diff::0": [320, 2, 3, 3]})
    with pytest.raises(LayerctlError, match=r"input_blocks\.0\.0\.weight"):  # widening only on the input axis
        P.validate_patch_layout(sdxl_meta, {"diffusion_model.input_blocks.0.0.weight::diff::0": [321, 8, 3, 3]})


# --------------------------------------------------------------------------- files


def _lora(out_f, in_f, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) * 0.1, torch.randn(rank, in_f, generator=g) * 0.1


def test_read_patch_errors(tmp_path):
    with pytest.raises(LayerctlError, match="not found"):
        P.read_patch(tmp_path / "nope.safetensors")
    good = tmp_path / "good.safetensors"
    up, down = _lora(64, 32, 4, 0)
    patch = P.Patch(P.lora_to_patch_entries({"input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (up, down)},
                                            naming="ldm"))
    P.write_patch(patch, good)
    umask = os.umask(0)
    os.umask(umask)
    assert good.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-16])
    with pytest.raises(LayerctlError, match="cannot read patch file"):
        P.read_patch(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(LayerctlError, match="cannot read patch file"):
        P.read_patch(junk)
    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(LayerctlError, match="never unpickled"):
        P.read_patch(pickle)
    # a LoRA pair missing one half names the key
    from safetensors.torch import save_file

    half = tmp_path / "half.safetensors"
    save_file({"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight::lora::0": up}, str(half))
    with pytest.raises(LayerctlError, match=r"attn2\.to_k\.weight' is missing its down"):
        P.read_patch(half)
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.out.2.weight::loha::0": up}, str(bad))
    with pytest.raises(LayerctlError, match="loha"):
        P.read_patch(bad)
    assert len(P.read_patch(good)) == 1


def test_write_patch_official_layout(tmp_path):
    unet = _meta_unet(XL_SMALL)
    up, down = _lora(64, 64, 4, 1)
    delta = torch.randn(32, 8, 3, 3)
    entries = P.lora_to_patch_entries(
        {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (up, down)}, unet_config=unet.config
    ) + P.diff_to_patch_entries({"conv_in.weight": delta, "conv_out.bias": torch.ones(4)}, unet_config=unet.config)
    out = P.write_patch(P.Patch(entries), tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert sorted(keys) == [
        "diffusion_model.input_blocks.0.0.weight::diff::0",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::0",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::1",
        "diffusion_model.out.2.bias::diff::0",
    ]
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert torch.equal(tensors["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::0"],
                       up.half())
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind
    with pytest.raises(LayerctlError, match="exists"):
        P.write_patch(P.Patch(entries), out)
    P.write_patch(P.Patch(entries), out, overwrite=True, dtype=torch.float32)
    back = P.read_patch(out)
    info = P.describe_patch(back)
    assert info == {**info, "entries": 3, "tensors": 4, "lora": 1, "diff": 2, "naming": ["ldm"],
                    "lora_ranks": [4], "conv_in_in_channels": 8, "dtypes": ["float32"]}
    # written without a config, diffusers names stay (the ld_diffusers_* layout) and read back as such
    plain = P.write_patch(P.Patch(P.diff_to_patch_entries({"conv_out.bias": torch.ones(4)})), tmp_path / "d.safetensors")
    with safe_open(str(plain), framework="pt") as f:
        assert list(f.keys()) == ["conv_out.bias"]
    assert P.read_patch(plain).entries[0].naming == "diffusers"


# --------------------------------------------------------------------------- merge / restore


def test_merge_formula_lora_and_diff(tmp_path):
    unet = _unet(XL_SMALL)
    snap = _snapshot(unet)
    q = "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_v.weight"  # [64, 32]
    o = "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0.weight"  # [64, 64]
    r = "down_blocks.0.resnets.1.conv1.weight"  # [32, 32, 3, 3]
    up_q, down_q = _lora(64, 32, 3, 2)
    up_o, down_o = _lora(64, 64, 5, 3)
    d_r = torch.randn(32, 32, 3, 3) * 0.01
    patch = P.Patch(
        P.lora_to_patch_entries({q: (up_q, down_q), o: (up_o, down_o)}, unet_config=unet.config)
        + P.diff_to_patch_entries({r: d_r}, unet_config=unet.config)
    )
    path = P.write_patch(patch, tmp_path / "m.safetensors", dtype=torch.float32)
    loaded = P.read_patch(path)
    assert {e.naming for e in loaded.entries} == {"ldm"}
    handle = P.apply_patch(unet, loaded, strength=0.7)
    sd = unet.state_dict()
    torch.testing.assert_close(sd[q], snap[q] + 0.7 * up_q @ down_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd[o], snap[o] + 0.7 * up_o @ down_o, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd[r], snap[r] + 0.7 * d_r, rtol=0, atol=1e-6)
    assert not torch.equal(sd[q], snap[q])
    untouched = [k for k in sd if k not in (q, o, r)]
    assert all(torch.equal(sd[k], snap[k]) for k in untouched)
    assert sorted(handle.changed) == sorted([q, o, r])
    handle.restore()
    _assert_bit_exact(unet, snap)


def test_diffusers_named_deltas_and_alpha(tmp_path):
    from safetensors.torch import save_file

    unet = _unet(SD15_SMALL)
    snap = _snapshot(unet)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # [32, 32]
    delta = torch.randn(32, 32) * 0.05
    up, down = _lora(32, 32, 4, 5)
    # ld_diffusers style: plain diffusers keys; plus a diffusers-named lora with alpha (scale alpha / rank)
    v = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.weight"
    save_file({k: delta, f"{v}::lora::0": up, f"{v}::lora::1": down, f"{v}::lora::2": torch.tensor(2.0)},
              str(tmp_path / "d.safetensors"))
    h = P.apply_patch(unet, tmp_path / "d.safetensors")
    sd = unet.state_dict()
    torch.testing.assert_close(sd[k], snap[k] + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd[v], snap[v] + (2.0 / 4) * up @ down, rtol=0, atol=1e-6)
    h.restore()
    _assert_bit_exact(unet, snap)


def test_fp16_merge_is_fp32_then_cast_and_restore_is_bit_exact():
    unet = _unet(XL_SMALL, dtype=torch.float16)
    snap = _snapshot(unet)
    key = "mid_block.attentions.0.transformer_blocks.1.ff.net.2.weight"  # [64, 256]
    up, down = _lora(64, 256, 8, 7)
    patch = P.Patch(P.lora_to_patch_entries({key: (up.half(), down.half())}))
    h = P.apply_patch(unet, patch, strength=1.5)
    expected = (snap[key].float() + 1.5 * (up.half().float() @ down.half().float())).half()
    assert torch.equal(unet.state_dict()[key], expected)
    h.restore()
    _assert_bit_exact(unet, snap)
    h.restore()  # a second restore is a no-op
    _assert_bit_exact(unet, snap)


@pytest.mark.parametrize("channels", [8, 12])
def test_conv_in_widening(channels):
    unet = _unet(XL_SMALL)
    snap = _snapshot(unet)
    old_module = unet.conv_in
    x4 = torch.randn(1, 4, 16, 16)
    base_out = _xl_forward(unet, x4)
    delta = torch.randn(32, channels, 3, 3) * 0.01
    d_bias = torch.randn(32) * 0.01
    patch = P.Patch(P.diff_to_patch_entries({"input_blocks.0.0.weight": delta, "input_blocks.0.0.bias": d_bias},
                                            naming="ldm"))
    assert P.describe_patch(patch)["conv_in_in_channels"] == channels
    h = P.apply_patch(unet, patch)
    assert h.widened_conv_in
    assert unet.conv_in is not old_module
    assert unet.conv_in.in_channels == channels and unet.config.in_channels == channels
    assert unet.conv_in.weight.dtype == old_module.weight.dtype
    w = unet.conv_in.weight.detach()
    torch.testing.assert_close(w[:, :4], snap["conv_in.weight"] + delta[:, :4], rtol=0, atol=1e-6)
    assert torch.equal(w[:, 4:], delta[:, 4:])
    torch.testing.assert_close(unet.conv_in.bias.detach(), snap["conv_in.bias"] + d_bias, rtol=0, atol=1e-6)
    out = _xl_forward(unet, torch.randn(1, channels, 16, 16))
    assert out.shape == (1, 4, 16, 16)
    h.restore()
    assert unet.conv_in is old_module and unet.config.in_channels == 4
    _assert_bit_exact(unet, snap)
    assert torch.equal(_xl_forward(unet, x4), base_out)


def test_stacked_patches_restore_in_reverse_order():
    unet = _unet(XL_SMALL, dtype=torch.bfloat16)
    snap = _snapshot(unet)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    a = P.Patch(P.lora_to_patch_entries({key: _lora(64, 64, 4, 8)}, unet_config=unet.config), source="a.safetensors")
    b = P.Patch(
        P.diff_to_patch_entries({key: torch.randn(64, 64) * 0.1, "conv_in.weight": torch.randn(32, 8, 3, 3)},
                                unet_config=unet.config),
        source="b.safetensors",
    )
    ha = P.apply_patch(unet, a)
    after_a = _snapshot(unet)
    hb = P.apply_patch(unet, b)
    assert unet.config.in_channels == 8
    with pytest.raises(LayerctlError, match="reverse order"):
        ha.restore()
    hb.restore()
    _assert_bit_exact(unet, after_a)
    assert unet.config.in_channels == 4
    ha.restore()
    _assert_bit_exact(unet, snap)


def test_failed_apply_changes_nothing():
    unet = _unet(XL_SMALL)
    snap = _snapshot(unet)
    entries = P.diff_to_patch_entries(
        {
            "down_blocks.0.resnets.0.conv1.weight": torch.ones(32, 32, 3, 3),
            "conv_in.weight": torch.ones(32, 8, 3, 3),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.ones(64, 65),
        }
    )
    with pytest.raises(LayerctlError, match=r"attn1\.to_q\.weight \(delta \[64, 65\] vs weight \[64, 64\]\)"):
        P.apply_patch(unet, P.Patch(entries))
    _assert_bit_exact(unet, snap)
    assert unet.conv_in.in_channels == 4 and unet.config.in_channels == 4


def test_sd15_patch_on_sdxl_unet_is_refused(tmp_path):
    sd15 = _meta_unet(SD15_SMALL)
    # a transparent-attn style LoRA for the SD1.5-shaped UNet: every attention projection
    pairs = {}
    for k, v in sd15.state_dict().items():
        if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            pairs[k] = _lora(v.shape[0], v.shape[1], 2, len(pairs))
    path = P.write_patch(P.Patch(P.lora_to_patch_entries(pairs, unet_config=sd15.config)), tmp_path / "sd15.safetensors")
    patch = P.read_patch(path)
    xl = _unet(XL_SMALL)
    snap = _snapshot(xl)
    with pytest.raises(LayerctlError, match=r"sd15 does not fit this UNet.*input_blocks\.1\.1\.transformer_blocks\.0\.attn"):
        P.apply_patch(xl, patch)
    _assert_bit_exact(xl, snap)
    # and it fits its own family
    h = P.apply_patch(_unet(SD15_SMALL), patch)
    assert len(h.changed) == len(pairs)


def test_lora_pair_rank_mismatch_and_duplicates():
    with pytest.raises(LayerctlError, match="ranks disagree"):
        P.lora_to_patch_entries({"conv_out.weight": (torch.zeros(4, 3), torch.zeros(2, 5))})
    unet = _meta_unet(XL_SMALL)
    layout = {
        "diffusion_model.out.2.bias::diff::0": [4],
        "conv_out.bias": [4],
    }
    with pytest.raises(LayerctlError, match="same weight"):
        P.validate_patch_layout(unet, layout)


def test_patch_from_lora_roundtrip_and_meta_unet_refused(tmp_path):
    unet = _unet(SD15_SMALL)
    snap = _snapshot(unet)
    key = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q"  # a module name, as peft gives it
    up, down = _lora(32, 32, 4, 11)
    patch = P.patch_from_lora({key: (up, down)}, unet_config=unet.config, metadata={"rank": "4"})
    path = P.write_patch(patch, tmp_path / "l.safetensors", dtype=torch.float32)
    back = P.read_patch(path)
    assert back.metadata == {"rank": "4"}
    (entry,) = back.entries
    assert (entry.naming, entry.name) == ("ldm", "output_blocks.5.1.transformer_blocks.0.attn2.to_q.weight")
    assert torch.equal(entry.up, up) and torch.equal(entry.down, down)
    with P.apply_patch(unet, back):
        w = unet.state_dict()[key + ".weight"]
        torch.testing.assert_close(w, snap[key + ".weight"] + up @ down, rtol=0, atol=1e-6)
    _assert_bit_exact(unet, snap)  # the context manager restored it
    with pytest.raises(LayerctlError, match="not loaded"):
        P.apply_patch(_meta_unet(SD15_SMALL), back)


def test_peft_wrapped_unet_merges_into_base_layer():
    peft = pytest.importorskip("peft")
    unet = _unet(SD15_SMALL)
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    key = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.base_layer.weight"
    before = unet.state_dict()[key].clone()
    delta = torch.randn(32, 32) * 0.1
    h = P.apply_patch(unet, P.Patch(P.diff_to_patch_entries({key.replace(".base_layer", ""): delta})))
    torch.testing.assert_close(unet.state_dict()[key], before + delta, rtol=0, atol=1e-6)
    h.restore()
    assert torch.equal(unet.state_dict()[key], before)
