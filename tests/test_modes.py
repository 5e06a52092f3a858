"""Layer modes and decompose on the tiny backends (CPU, 64x64, 2 steps; the pictures are noise).

What is checked: the files every mode writes (names, modes, sizes, metadata, PSD), same seed =>
same pixels, the pinned-frame path (the pinned layer is the given image after the VAE round
trip; the others differ), SDXL's two stages chain exactly like decompose of the written blended
picture, --stop-at hands over to the plain UNet, conditioning-image loading/fitting, and one
exit-2 error (no files) per bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clihelp import run_cli
from layerctl.core import geometry
from layerctl.pipelines import layers as modes
from layerctl.errors import LayerctlError

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-v1"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason="shared/reference/layerdiffuse-v1 not present")
STEPS = "2"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small for threads: on a busy 2-core machine one thread ran a
    tiny decompose in 0.5 s where two took 12 s (OpenMP oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(d / "bg.png")  # 96x80: gets cropped
    fg = np.zeros((64, 64, 4), np.uint8)
    fg[16:48, 12:52] = [230, 40, 20, 255]
    fg[20:30, 20:30, 3] = 128
    Image.fromarray(fg).save(d / "fg.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "pic.png")
    (d / "notes.png").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def session():
    from layerctl.api import Session

    with Session(quiet=True) as s:
        yield s


def _gen_req(**kw):
    from layerctl.requests import GenRequest

    base = dict(steps=2, seed=11, tta=False)
    base.update(kw)
    return GenRequest(**base)


def _dec_req(**kw):
    from layerctl.requests import DecomposeRequest

    base = dict(steps=2, seed=11, tta=False)
    base.update(kw)
    return DecomposeRequest(**base)


def _meta(path):
    with Image.open(path) as im:
        return json.loads(im.info["layerctl"]), im.mode, im.size


def _px(path):
    with Image.open(path) as im:
        return np.asarray(im).copy()


# ----------------------------------------------------------------------------- pure helpers


def test_auto_size_known_numbers():
    assert geometry.auto_size(1920, 1080, 512, None, None) == (704, 384)
    assert geometry.auto_size(1080, 1920, 1024, None, None) == (768, 1344)
    assert geometry.auto_size(64, 64, 64, None, None) == (64, 64)
    assert geometry.auto_size(200, 100, 512, 512, None) == (512, 256)
    assert geometry.auto_size(100, 200, 512, None, 128) == (64, 128)
    assert geometry.auto_size(10, 1000, 512, 640, 320) == (640, 320)


def test_fit_image_crop_fit_stretch():
    src = np.zeros((2, 4, 4), np.float32)  # h=2, w=4: columns 0.1 .. 0.4, opaque
    for x in range(4):
        src[:, x, :3] = 0.1 * (x + 1)
    src[..., 3] = 1.0
    crop = geometry.fit_image(src, 2, 2, "crop")  # cover = no scaling, centre columns 1 and 2
    np.testing.assert_allclose(crop[0, :, 0], [0.2, 0.3], atol=1e-6)
    fit = geometry.fit_image(src, 4, 4, "fit")  # contain = no scaling, rows 1-2, padded with the border median
    np.testing.assert_allclose(fit[1, :, 0], [0.1, 0.2, 0.3, 0.4], atol=1e-6)
    assert fit[0, 0, 3] == 1.0 and 0.1 <= fit[0, 0, 0] <= 0.4
    stretch = geometry.fit_image(src, 2, 2, "stretch")  # area average of column pairs
    np.testing.assert_allclose(stretch[0, :, 0], [0.15, 0.35], atol=1e-5)
    # resampling is premultiplied: a transparent green pixel does not tint the red one
    rg = np.array([[[1, 0, 0, 1], [0, 1, 0, 0]]], np.float32)
    one = geometry.fit_image(rg, 1, 1, "stretch")[0, 0]
    np.testing.assert_allclose(one, [1, 0, 0, 0.5], atol=1e-6)
    with pytest.raises(LayerctlError, match="resize mode"):
        geometry.fit_image(src, 2, 2, "zoom")


def test_layer_prompts():
    t = modes.layer_prompts("in a park", "a dog", "grass")
    assert t == {"fg": "a dog, in a park", "bg": "grass, in a park", "blended": "in a park"}
    t = modes.layer_prompts(None, "a dog", "grass")
    assert t == {"fg": "a dog", "bg": "grass", "blended": "a dog, grass"}
    assert modes.layer_prompts(None, None, None) == {"fg": "", "bg": "", "blended": ""}


def test_known_layer_modes_exif_and_grey_flatten(tmp_path):
    # palette with transparency, greyscale, 16-bit and an EXIF-rotated image all load as RGBA
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    k = modes.read_known("fg", tmp_path / "p.png")
    assert k.source.shape == (2, 4, 4) and k.source[0, 0, 3] == 1.0 and k.source[1, 1, 3] == 0.0
    Image.new("L", (4, 2), 128).save(tmp_path / "l.png")
    assert modes.read_known("bg", tmp_path / "l.png").source[0, 0, 0] == pytest.approx(128 / 255)
    Image.fromarray(np.full((2, 4), 65535, np.uint16)).save(tmp_path / "i16.png")
    assert modes.read_known("bg", tmp_path / "i16.png").source[0, 0, 0] == 1.0
    im = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert modes.read_known("bg", tmp_path / "rot.jpg").size == (2, 4)
    # RGBA flattened on grey 0.5
    half = np.array([[[1.0, 0.0, 0.0, 0.5]]], np.float32)
    kl = modes.KnownLayer("fg", "x", half, rgba=half)
    np.testing.assert_allclose(kl.rgb_tensor()[0, :, 0, 0].numpy(), [0.75, 0.25, 0.25], atol=1e-6)
    (tmp_path / "t.png").write_text("text")
    with pytest.raises(LayerctlError, match="not an image"):
        modes.read_known("bg", tmp_path / "t.png")


@needs_ref
def test_layouts_match_official_manifests():
    names = {"foreground": "fg", "background": "bg", "blended": "blended"}
    for layout, stem in (("joint", "layer_sd15_joint"), ("fg2bg", "layer_sd15_fg2bg"), ("bg2fg", "layer_sd15_bg2fg")):
        m = json.loads((REF / f"{stem}.json").read_text())
        assert tuple(names[x] for x in m["frame_order"]) == modes.FRAMES[layout]
        assert m["use_control"] == (modes.SD15_CONTROL[layout] is not None)
    for role, concat in modes.SDXL_CONCAT.items():
        m = json.loads((REF / f"layer_xl_{role}.json").read_text())
        assert m["conv_in_in_channels"] == 4 + 4 * len(concat)


# ----------------------------------------------------------------------------- SD1.5 modes


def test_bg2fg_cli_files_metadata_psd_and_same_seed(imgs, tmp_path, session):
    code, out, err = run_cli(
        "gen", "--bg", imgs / "bg.png", "--fg-prompt", "a red box", "--prompt", "on a table", "--model", "tiny",
        "--out-dir", tmp_path / "a", "--psd", tmp_path / "a" / "stack.psd", "--steps", STEPS, "--seed", "11",
        "--no-tta",
    )
    assert code == 0, err
    assert sorted(Path(x).name for x in out.split()) == ["blended.png", "fg.png", "stack.psd"]
    meta, mode, size = _meta(tmp_path / "a" / "fg.png")
    assert mode == "RGBA" and size == (64, 64)
    assert meta["mode"] == "bg2fg" and meta["seed"] == 11 and meta["layer"] == "fg" and meta["steps"] == 2
    assert meta["prompts"]["fg"] == "a red box, on a table" and meta["prompts"]["blended"] == "on a table"
    assert meta["layers"] == [
        {"role": "bg", "given": str(imgs / "bg.png")}, {"role": "blended", "file": "blended.png"},
        {"role": "fg", "file": "fg.png"},
    ]
    assert meta["layer_weights"] == ["tiny-bg2fg"]
    bmeta, bmode, bsize = _meta(tmp_path / "a" / "blended.png")
    assert bmode == "RGB" and bsize == (64, 64) and bmeta["layer"] == "blended"
    from psd_tools import PSDImage

    psd = PSDImage.open(tmp_path / "a" / "stack.psd")
    assert [layer.name for layer in psd] == ["bg", "blended", "fg"]
    # same seed through the API (one shared session): same pixels
    session.gen(_gen_req(model="tiny", bg=str(imgs / "bg.png"), fg_prompt="a red box", prompt="on a table",
                         out_dir=str(tmp_path / "b")))
    for name in ("fg.png", "blended.png"):
        assert np.array_equal(_px(tmp_path / "a" / name), _px(tmp_path / "b" / name)), name
    # the transparent fg and the plain blended picture are different images
    assert not np.array_equal(_px(tmp_path / "b" / "fg.png")[..., :3], _px(tmp_path / "b" / "blended.png"))


def test_fg2bg_writes_bg_and_blended(imgs, tmp_path, session):
    recs = session.gen(_gen_req(model="tiny", fg=str(imgs / "fg.png"), bg_prompt="a kitchen", out_dir=str(tmp_path)))
    assert sorted(r.role for r in recs) == ["bg", "blended"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.png", "blended.png"]
    for name in ("bg.png", "blended.png"):
        meta, mode, size = _meta(tmp_path / name)
        assert mode == "RGB" and size == (64, 64) and meta["mode"] == "fg2bg"
        assert meta["layers"][2] == {"role": "fg", "given": str(imgs / "fg.png")}


def test_joint_batch_names_and_seeds(tmp_path, session):
    recs = session.gen(_gen_req(model="tiny", joint=True, fg_prompt="a cat", bg_prompt="a sofa", batch=2,
                                out_dir=str(tmp_path), fg_name="cat_{seed}.png"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bg_0000.png", "bg_0001.png", "blended_0000.png", "blended_0001.png", "cat_11.png", "cat_12.png"]
    assert {r.seed for r in recs} == {11, 12}
    meta, mode, _ = _meta(tmp_path / "cat_12.png")
    assert mode == "RGBA" and meta["seed"] == 12 and meta["mode"] == "joint"
    assert meta["prompts"] == {"fg": "a cat", "bg": "a sofa", "blended": "a cat, a sofa"}
    assert _meta(tmp_path / "bg_0001.png")[1] == "RGB"
    assert not np.array_equal(_px(tmp_path / "bg_0000.png"), _px(tmp_path / "bg_0001.png"))


# ----------------------------------------------------------------------------- pinned frames (SD1.5 decompose)


def test_pinned_blended_frame_is_the_given_picture(imgs, session):
    from layerctl.pipelines.sampling import decode_rgb, encode_rgb

    layers = modes.decompose_layers(session.models, _dec_req(model="tiny", image=str(imgs / "pic.png")))
    assert set(layers) == {"fg", "bg", "blended"}
    assert layers["fg"].shape == (1, 4, 64, 64) and layers["bg"].shape == (1, 3, 64, 64)
    model = session.model(_gen_req(model="tiny"))
    k = modes.read_known("blended", imgs / "pic.png")
    k.resize(64, 64, "crop")
    round_trip = decode_rgb(model, encode_rgb(model, k.rgb_tensor())).cpu()
    assert (layers["blended"] - round_trip).abs().max() < 1e-5
    assert (layers["bg"] - round_trip).abs().mean() > 0.02
    assert (layers["fg"][:, :3] - round_trip).abs().mean() > 0.02


def test_pinned_bg_and_fg_frames(imgs, tmp_path, session):
    from layerctl.pipelines.sampling import decode_rgb, encode_rgb

    layers = modes.decompose_layers(session.models, _dec_req(model="tiny", image=str(imgs / "pic.png"), bg=str(imgs / "bg.png")))
    model = session.model(_gen_req(model="tiny"))
    k = modes.read_known("bg", imgs / "bg.png")
    k.resize(64, 64, "crop")
    rt = decode_rgb(model, encode_rgb(model, k.rgb_tensor())).cpu()
    assert (layers["bg"] - rt).abs().max() < 1e-5
    assert (layers["fg"][:, :3] - rt).abs().mean() > 0.02
    # known fg: only bg.png is written; the PSD holds the whole stack with the given fg on top
    recs = session.decompose(_dec_req(model="tiny", image=str(imgs / "pic.png"), fg=str(imgs / "fg.png"),
                                      out_dir=str(tmp_path), psd=str(tmp_path / "s.psd")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.png", "s.psd"]
    assert [r.role for r in recs] == ["bg", "psd"]
    meta, mode, _ = _meta(tmp_path / "bg.png")
    assert mode == "RGB" and meta["mode"] == "decompose-fg" and meta["transparent_encoder"] == "tiny-encoder"
    from psd_tools import PSDImage

    top = PSDImage.open(tmp_path / "s.psd")[2]
    assert top.name == "fg"
    alpha = np.asarray(top.topil())[..., 3]
    assert np.array_equal(alpha, _px(imgs / "fg.png")[..., 3])


# ----------------------------------------------------------------------------- SDXL (tiny-xl)


def test_sdxl_bg2fg_two_stages_chain_like_decompose(imgs, tmp_path, session):
    session.gen(_gen_req(model="tiny-xl", bg=str(imgs / "bg.png"), fg_prompt="a red box", out_dir=str(tmp_path / "g")))
    meta, mode, size = _meta(tmp_path / "g" / "fg.png")
    assert mode == "RGBA" and size == (64, 64) and meta["family"] == "sdxl"
    assert meta["layer_weights"] == ["tiny-bg2ble", "tiny-bgble2fg"]
    assert _meta(tmp_path / "g" / "blended.png")[1] == "RGB"
    # stage 2 = decompose of the written blended picture with the known bg, same seed
    session.decompose(_dec_req(model="tiny-xl", image=str(tmp_path / "g" / "blended.png"), bg=str(imgs / "bg.png"),
                               fg_prompt="a red box", out_dir=str(tmp_path / "d")))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["fg.png"]
    a, b = _px(tmp_path / "g" / "fg.png").astype(int), _px(tmp_path / "d" / "fg.png").astype(int)
    assert np.abs(a - b).max() <= 1


def test_sdxl_fg2bg_and_stop_at_hands_over(imgs, tmp_path, session):
    session.gen(_gen_req(model="tiny-xl", fg=str(imgs / "fg.png"), bg_prompt="a kitchen", out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.png", "blended.png"]
    model = session.model(_gen_req(model="tiny-xl"))
    req = dict(model="tiny-xl", image=str(imgs / "pic.png"), fg=str(imgs / "fg.png"))
    full = modes.decompose_layers(session.models, _dec_req(**req))["bg"]
    assert model.unet.conv_in.in_channels == 12
    plain = modes.decompose_layers(session.models, _dec_req(stop_at=0.0, **req))["bg"]
    assert model.unet.conv_in.in_channels == 4  # handed over at step 0: the plain UNet ran, without concat
    assert (full - plain).abs().max() > 1e-3
    again = modes.decompose_layers(session.models, _dec_req(**req))["bg"]  # weights re-applied after the hand-over
    assert torch_equal(again, full)


def torch_equal(a, b) -> bool:
    return bool((a - b).abs().max() == 0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["gen", "--joint", "--fg-prompt", "a", "--bg-prompt", "b", "--model", "tiny-xl"], "it can: gen PROMPT"),
        (["decompose", "{pic}", "--model", "tiny-xl"], "cannot decompose a picture alone"),
        (["gen", "--bg", "{bg}", "--fg", "{fg}", "--fg-prompt", "a", "--model", "tiny"], "cannot both"),
        (["decompose", "{pic}", "--bg", "{bg}", "--fg", "{fg}", "--model", "tiny"], "not both"),
        (["gen", "--bg", "{notes}", "--fg-prompt", "a", "--model", "tiny"], "not an image"),
        (["decompose", "{missing}", "--model", "tiny"], "image not found"),
        (["gen", "--bg", "{bg}", "--bg-prompt", "a", "--model", "tiny"], "--bg-prompt makes no sense"),
        (["gen", "--joint", "--bg", "{bg}", "--fg-prompt", "a", "--model", "tiny"], "takes no --fg/--bg"),
        (["gen", "--bg-prompt", "a", "--model", "tiny"], "--bg-prompt needs"),
        (["decompose", "{pic}", "--fg", "{fg}", "--fg-prompt", "a", "--model", "tiny"], "--fg-prompt makes no sense"),
        (["gen", "--bg", "{bg}", "--fg-prompt", "a", "--model", "tiny", "--out", "{out}/x.png"], "--out-dir"),
        (["gen", "--bg", "{bg}", "--fg-prompt", "a", "--model", "tiny", "--resize", "zoom"], "resize"),
        (["gen", "--bg", "{bg}", "--fg-prompt", "a", "--model", "tiny-xl", "--layer-weights", "{fg}"],
         "--layer-weights names one file"),
    ],
)
def test_bad_input_exit_2_no_files(imgs, tmp_path, argv, needle):
    out = tmp_path / "out"
    fill = dict(pic=imgs / "pic.png", bg=imgs / "bg.png", fg=imgs / "fg.png", notes=imgs / "notes.png",
                missing=imgs / "missing.png", out=out)
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out-dir", str(out)]
    code, stdout, stderr = run_cli(*argv, "--steps", "1", "--seed", "1", "--quiet")
    assert code == 2, (stdout, stderr)
    assert needle in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() or not any(out.iterdir())


def test_layer_weights_with_wrong_frame_layout(imgs, tmp_path):
    """A 3-frame file where bg2fg needs 2 frames + control: refused, nothing written; a file in the
    right (tiny) layout with random values loads strictly and runs."""
    from safetensors.torch import save_file

    from layerctl.backends.tiny import tiny_unet
    from layerctl.models.attention_sharing import AttentionSharingPatcher

    unet = tiny_unet(False)
    for frames, control, name in ((3, False, "joint.safetensors"), (2, True, "bg2fg.safetensors")):
        p = AttentionSharingPatcher(unet, frames, control, rank=4)
        save_file({k: v.detach().clone().contiguous() for k, v in p.state_dict().items()}, str(tmp_path / name))
    out = tmp_path / "out"
    base = ["gen", "--bg", imgs / "bg.png", "--fg-prompt", "a", "--model", "tiny", "--out-dir", out, "--steps", "1",
            "--no-tta"]
    code, _, stderr = run_cli(*base, "--layer-weights", tmp_path / "joint.safetensors")
    assert code == 2 and "3 frame(s)" in stderr and "needs 2 frames [fg, blended]" in stderr, stderr
    assert not out.exists() or not any(out.iterdir())
    code, _, stderr = run_cli(*base, "--layer-weights", tmp_path / "bg2fg.safetensors")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["blended.png", "fg.png"]


def test_existing_output_is_not_overwritten(imgs, tmp_path):
    (tmp_path / "fg.png").write_bytes(b"keep")
    code, _, stderr = run_cli("gen", "--bg", imgs / "bg.png", "--fg-prompt", "a", "--model", "tiny",
                              "--out-dir", tmp_path, "--steps", "1")
    assert code == 2 and "--overwrite" in stderr
    assert (tmp_path / "fg.png").read_bytes() == b"keep" and not (tmp_path / "blended.png").exists()


def test_sdxl_layer_weights_with_wrong_input_channels(imgs, tmp_path, session):
    """decompose --bg needs a 12-channel conv_in (bgble2fg); an 8-channel file (bg2ble layout) is refused."""
    from layerctl.models.patches import write_patch
    from layerctl.models.weights import tiny_patch

    model = session.model(_gen_req(model="tiny-xl"))
    session.clear_weights(model)
    write_patch(tiny_patch(model, "bg2ble"), tmp_path / "bg2ble.safetensors")
    out = tmp_path / "out"
    req = _dec_req(model="tiny-xl", image=str(imgs / "pic.png"), bg=str(imgs / "bg.png"), out_dir=str(out),
                   layer_weights=str(tmp_path / "bg2ble.safetensors"))
    with pytest.raises(LayerctlError, match=r"8 input channels; 'bgble2fg' needs 12"):
        session.decompose(req)
    assert not out.exists() or not any(out.iterdir())


def test_mode_check_trusts_explicit_sd15_layer_weights_only():
    """A backend without a mode's file refuses it, unless --layer-weights names the file (SD1.5:
    the file's layout is checked when it loads); SDXL still needs the mode's official files."""
    import types

    sd15 = types.SimpleNamespace(family="sd15", backend="toy", modes=("rgba", "joint"))
    with pytest.raises(LayerctlError, match="cannot run 'gen --fg'"):
        modes.check_gen_mode(sd15, "fg2bg")
    modes.check_gen_mode(sd15, "fg2bg", own_weights=True)
    sdxl = types.SimpleNamespace(family="sdxl", backend="sdxl", modes=("rgba",))
    with pytest.raises(LayerctlError, match="cannot run 'gen --bg'"):
        modes.check_gen_mode(sdxl, "bg2fg", own_weights=True)
