"""The bundled toy model: scene source, tokenizer, shipped weights, one generation, the vocabulary warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerctl.training.scenes import BACKGROUNDS, SHAPES, SceneSource, vocabulary


def test_scenes_deterministic_and_captioned():
    a, b = SceneSource(seed=5)(3), SceneSource(seed=5)(3)
    assert np.array_equal(a.fg, b.fg) and np.array_equal(a.bg, b.bg)
    c = SceneSource(seed=6)(3)
    assert not np.array_equal(a.fg, c.fg)
    assert a.fg.shape == (64, 64, 4) and a.bg.shape == (64, 64, 3)
    fg, bg, blended = a.prompts()
    assert blended.startswith(fg) and bg in BACKGROUNDS[a.background][0]
    # every caption word is in the vocabulary
    vocab = set(vocabulary())
    for i in range(40):
        s = SceneSource(seed=1)(i)
        assert set(" ".join(s.prompts()).split()) <= vocab


def test_scene_materials_alpha():
    """glass objects are semi-transparent, solid ones opaque inside, smoke soft."""
    src = SceneSource(seed=2, shapes=["ball"], materials=["solid"])
    s = src(0)
    a = s.fg[..., 3]
    assert a[32, 32] == pytest.approx(1.0) and a[0, 0] == 0.0
    g = SceneSource(seed=2, shapes=["ball"], materials=["glass"])(0).fg[..., 3]
    inside = g[g > 0.05]
    assert 0.2 < inside.mean() < 0.8
    sm = SceneSource(seed=2, shapes=["puff"])(0).fg[..., 3]
    assert sm.max() < 0.95 and (sm > 0.01).sum() > 200
    # blended = fg over bg
    np.testing.assert_allclose(s.blended[32, 32], s.fg[32, 32, :3], atol=1e-6)
    np.testing.assert_allclose(s.blended[0, 0], s.bg[0, 0], atol=1e-6)


def test_unknown_shape_rejected():
    with pytest.raises(ValueError):
        SceneSource(shapes=["dragon"])


def test_export_rgba_folder_adds_chosen_shapes(tmp_path):
    """A second export with `shapes` and `first` adds to a folder (a training set weighted towards some
    shapes) and leaves the files already there as they were."""
    from PIL import Image

    from layerctl.training.scenes import export_rgba_folder

    export_rgba_folder(tmp_path, 3, seed=4)
    before = (tmp_path / "000002.png").read_bytes()
    export_rgba_folder(tmp_path, 4, seed=5, shapes=["cup", "ring"], first=3)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i:06d}.png" for i in range(7)]
    assert (tmp_path / "000002.png").read_bytes() == before
    added = [(tmp_path / f"{i:06d}.txt").read_text().split() for i in range(3, 7)]
    assert all(words[-1] in ("cup", "ring") for words in added), added
    assert Image.open(tmp_path / "000005.png").mode == "RGBA"
    with pytest.raises(ValueError):
        export_rgba_folder(tmp_path, 1, shapes=["dragon"], first=7)


def test_export_rgba_folder_solid_only(tmp_path):
    """materials=['solid'] (issue 14, thirteenth round): no glass or smoke caption, except the shapes whose material
    is fixed (the wine glass is always glass, the smoke puff always smoke)."""
    from layerctl.training.scenes import export_rgba_folder

    export_rgba_folder(tmp_path, 40, seed=41, shapes=["ball", "heart", "glass", "puff"], materials=["solid"])
    caps = [(tmp_path / f"{i:06d}.txt").read_text().split() for i in range(40)]
    balls = [c for c in caps if c[-1] in ("ball", "heart")]
    assert balls and all(len(c) == 2 and c[0] not in ("glass", "smoke") for c in balls), balls
    assert any(c[-1] == "glass" for c in caps) and any(c[-1] == "puff" for c in caps)
    with pytest.raises(ValueError):
        export_rgba_folder(tmp_path, 1, materials=["wood"], first=40)


def test_export_rgba_folder_solid_word(tmp_path):
    """solid_word_every=2: files with an even number caption a plain solid object "solid <colour> <shape>";
    odd ones, glass and smoke objects, the wine glass and the hair tuft keep their captions."""
    from layerctl.training.scenes import COLOURS, export_rgba_folder

    export_rgba_folder(tmp_path / "plain", 60, seed=8)
    export_rgba_folder(tmp_path / "marked", 60, seed=8, solid_word_every=2)
    marked = 0
    for i in range(60):
        plain = (tmp_path / "plain" / f"{i:06d}.txt").read_text().split()
        got = (tmp_path / "marked" / f"{i:06d}.txt").read_text().split()
        solid_plain = len(plain) == 2 and plain[0] in COLOURS and plain[1] != "glass"
        if i % 2 == 0 and solid_plain:
            assert got == ["solid"] + plain, (i, got)
            marked += 1
        else:
            assert got == plain, (i, got)
    assert marked >= 5


def test_tokenizer_word_level():
    from layerctl.backends.toy import MAX_TOKENS, toy_tokenizer, toy_vocab, unknown_words

    tok = toy_tokenizer()
    vocab = toy_vocab()
    ids = tok(["Glass cup, on a table!"], padding="max_length", max_length=MAX_TOKENS).input_ids[0]
    assert ids[:7] == [0, vocab["glass"], vocab["cup"], vocab["on"], vocab["a"], vocab["table"], 1]
    assert len(ids) == MAX_TOKENS
    assert tok(["zebra"]).input_ids[0] == [0, vocab["<unk>"], 1]
    assert unknown_words("a purple zebra and a Dragon") == ["zebra", "dragon"]
    assert set(SHAPES) - {"puff", "tuft"} <= set(vocab)


def _weights():
    from layerctl.backends.toy import FILES, WEIGHTS_DIR

    if not all((WEIGHTS_DIR / f).is_file() for f in FILES.values()):
        pytest.skip("toy weights not built (recipes/toy/)")
    return WEIGHTS_DIR


def _recipe_module(name: str = "pretrain_base"):
    """recipes/toy/NAME.py (a script, not a package module), imported."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "recipes" / "toy" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"toy_{name}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



def _pretrain(*args) -> None:
    """Run recipes/toy/pretrain_base.py in this process, then put back the thread count and Ctrl-C
    handlers its main() sets for a training process."""
    import signal

    import torch

    mod = _recipe_module()
    threads, handlers = torch.get_num_threads(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        mod.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        for sig, h in handlers.items():
            signal.signal(sig, h)


def test_shipped_weights_small_and_fp16():
    from safetensors import safe_open

    d = _weights()
    files = list(d.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    for p in files:
        with safe_open(str(p), "pt") as f:
            k = next(iter(f.keys()))
            assert str(f.get_tensor(k).dtype) == "torch.float16", p.name


def test_generate_one_image_and_vocabulary_warning(tmp_path, capsys, monkeypatch):
    _weights()
    from PIL import Image

    from layerctl.api import Session
    from layerctl.requests import GenRequest

    from layerctl.backends.toy import weight_path

    d = _weights()
    if not weight_path("rgba", d).is_file():
        pytest.skip("toy rgba weights not built")
    out = tmp_path / "cup.png"
    # explicit files: the session looks official files up by name in --weights-dir / the hub cache
    with Session() as s:
        s.gen(GenRequest(prompt="glass cup with a zebra", model="toy", out=str(out), seed=1, steps=4, device="cpu",
                         tta=False, transparent_decoder=str(weight_path("decoder", d)),
                         layer_weights=str(weight_path("rgba", d))))
    err = capsys.readouterr().err
    assert "zebra" in err and "knows words like" in err
    assert "glass" not in err.split("does not know")[1].split("(")[0]
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 4)
    assert img[..., 3].std() > 0  # not a constant alpha


def test_joint_layers_on_toy(tmp_path, monkeypatch):
    """The shipped joint layer model (train-lora mode: layers) drives gen --joint on toy."""
    from layerctl.backends.toy import weight_path

    d = _weights()
    if not weight_path("joint", d).is_file():
        pytest.skip("toy joint weights not built")
    from PIL import Image

    from layerctl.api import Session
    from layerctl.requests import GenRequest

    with Session(quiet=True) as s:
        recs = s.gen(GenRequest(prompt="red ball on a table", fg_prompt="red ball", bg_prompt="table", joint=True,
                                model="toy", out_dir=str(tmp_path), seed=2, steps=3, device="cpu", tta=False,
                                transparent_decoder=str(weight_path("decoder", d)), layer_weights=str(weight_path("joint", d))))
    roles = {r.role: r.path for r in recs}
    assert {"fg", "bg", "blended"} <= set(roles)
    fg = np.asarray(Image.open(roles["fg"]))
    assert fg.shape == (64, 64, 4)
    assert np.asarray(Image.open(roles["bg"])).shape[:2] == (64, 64)


def _run_default(tmp_path, prompt, seed, monkeypatch):
    """`layerctl gen PROMPT --out X.png` exactly as a new user types it: no --model, no LAYERCTL_MODEL."""
    from PIL import Image

    from clihelp import run_cli

    monkeypatch.delenv("LAYERCTL_MODEL", raising=False)
    out = tmp_path / f"{prompt.replace(' ', '_')}-{seed}.png"
    code, _out, err = run_cli("gen", prompt, "--out", out, "--seed", seed)
    assert code == 0, err
    img = Image.open(out)
    assert img.mode == "RGBA" and img.size == (64, 64)
    return np.asarray(img, dtype=np.float32)[..., 3] / 255.0, err


def test_main_job_falls_back_to_toy_and_shows_real_transparency(tmp_path, monkeypatch):
    """Issue 9's and 14's check, with the shipped weights: the fallback notice; "glass cup" gives a
    partly transparent body inside a more opaque rim (glass as the toy world draws it), "red ball" an
    opaque round object without a haze or a stray speck around it. (Whether the glass body is cup-shaped
    is measured over 100 seeds by bench/toy_quality.py, see docs/toy-model.md: not good enough on every
    seed to assert here.)"""
    from layerctl.training.toy_metrics import (
        body_alpha_mean, classify, has_speck, nearest_colour, object_alpha_mean, rim_and_body,
    )

    _weights()
    cups, balls, colours = [], [], []
    for seed in (1, 2, 3):
        alpha, err = _run_default(tmp_path, "glass cup", seed, monkeypatch)
        assert "using the bundled 'toy' model" in err
        cups.append((classify(alpha)[0], body_alpha_mean(alpha), rim_and_body(alpha)[0]))
        alpha, _ = _run_default(tmp_path, "red ball", seed, monkeypatch)
        colours.append(nearest_colour(_rgba(tmp_path / f"red_ball-{seed}.png")))
        balls.append((classify(alpha)[0], body_alpha_mean(alpha), object_alpha_mean(alpha), has_speck(alpha)))
    assert all(0.2 < body < 0.8 for _shape, body, _rim in cups), cups
    # the rim of the glass is denser than its body on every seed (1.7% of images before issue 14's retraining)
    assert all(rim > body + 0.1 for _shape, body, rim in cups), cups
    assert all(shape == "ball" and a > 0.9 for shape, a, _whole, _speck in balls), balls
    # rim included, the ball stays opaque (issue 14's target, > 0.85): no faint haze around it, no speck
    # beside it (the seventh round gives 0.91 / 0.91 / 0.87, the sixth 0.90 / 0.90 / 0.86; the second
    # round's weights at CFG 4 gave 0.78 / 0.70 / 0.48, with specks)
    assert all(whole > 0.85 and not speck for _shape, _a, whole, speck in balls), balls
    # and it is red: of the toy world's twelve colours, red is the nearest (the fourth round's candidate
    # base decoder drew it orange)
    assert colours == ["red"] * 3, colours
    # and the two materials are told apart on every seed
    assert all(b[1] - c[1] > 0.25 for c, b in zip(cups, balls)), (cups, balls)


def _rgba(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0


def _alpha_png(path, size=None):
    import json

    from PIL import Image

    img = Image.open(path)
    meta = json.loads(img.text["layerctl"])
    img = img.convert("RGBA")
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)[..., 3] / 255.0, meta


def test_upscale_and_hires_on_toy_keep_the_shape(tmp_path):
    """Issue 14: `upscale` (x2) and `gen --hires 2` on the toy model keep the object's shape. The toy model
    knows one size; at 128x128 a refine of strength 0.5 (the SD default) redrew glass cups into torn,
    hooked shapes (bench/toy_upscale.py: mask IoU with the source 0.69, against 0.95 at 0.2), so its
    default refine strength is 0.2.
    An explicit --strength is honoured."""
    from clihelp import run_cli

    from layerctl.training.toy_metrics import iou

    _weights()
    src = tmp_path / "cup.png"
    code, _o, err = run_cli("gen", "glass cup", "--model", "toy", "--seed", "1", "--out", src)
    assert code == 0, err
    a0, _ = _alpha_png(src)
    ious = {}
    for label, extra in (("default", ()), ("0.5", ("--strength", "0.5"))):
        out = tmp_path / f"cup_x2_{label}.png"
        code, _o, err = run_cli("upscale", src, "--model", "toy", "--prompt", "glass cup", "--seed", "1", "--out", out, *extra)
        assert code == 0, err
        a1, meta = _alpha_png(out, 64)
        assert meta["strength"] == (0.2 if label == "default" else 0.5) and meta["size"] == [128, 128]
        ious[label] = iou(a0 > 0.2, a1 > 0.2)
    assert ious["default"] > 0.85, ious
    hires = tmp_path / "hires.png"
    code, _o, err = run_cli("gen", "glass cup", "--model", "toy", "--seed", "1", "--hires", "2", "--out", hires)
    assert code == 0, err
    a2, meta = _alpha_png(hires, 64)
    assert meta["hires_strength"] == 0.2 and meta["size"] == [128, 128]
    assert iou(a0 > 0.2, a2 > 0.2) > 0.85


def test_every_layer_mode_runs_on_toy(tmp_path):
    """gen --bg, gen --fg, gen --joint and decompose run on the shipped toy weights (no explicit files),
    with --psd; the outputs have the model's size and the foreground has alpha."""
    from PIL import Image

    from clihelp import run_cli
    from layerctl.backends.toy import weight_path
    from layerctl.training.scenes import SceneSource

    d = _weights()
    for role in ("joint", "fg2bg", "bg2fg"):
        if not weight_path(role, d).is_file():
            pytest.skip(f"toy {role} weights not built")
    s = SceneSource(seed=99)(5)
    Image.fromarray((s.fg * 255).round().astype(np.uint8), "RGBA").save(tmp_path / "fg.png")
    Image.fromarray((s.bg * 255).round().astype(np.uint8), "RGB").save(tmp_path / "bg.png")
    Image.fromarray((s.blended * 255).round().astype(np.uint8), "RGB").save(tmp_path / "pic.png")
    common = ["--model", "toy", "--seed", "1", "--steps", "6", "--no-tta"]
    runs = {
        "bg2fg": (["gen", "--bg", str(tmp_path / "bg.png"), s.caption, "--fg-prompt", s.fg_caption], {"fg", "blended"}),
        "fg2bg": (["gen", "--fg", str(tmp_path / "fg.png"), s.caption, "--bg-prompt", s.bg_caption], {"bg", "blended"}),
        "joint": (["gen", "--joint", s.caption, "--fg-prompt", s.fg_caption, "--bg-prompt", s.bg_caption], {"fg", "bg", "blended"}),
        "decompose": (["decompose", str(tmp_path / "pic.png"), "--prompt", s.caption], {"fg", "bg"}),
    }
    for name, (args, roles) in runs.items():
        out = tmp_path / name
        code, _out, err = run_cli(*args, *common, "--out-dir", out, "--psd", tmp_path / f"{name}.psd")
        assert code == 0, (name, err)
        pngs = {p.stem for p in out.glob("*.png")}
        assert roles <= pngs, (name, pngs)
        assert (tmp_path / f"{name}.psd").stat().st_size > 0, name
        for r in roles:
            im = Image.open(out / f"{r}.png")
            assert im.size == (64, 64)
            if r == "fg":
                assert im.mode == "RGBA" and np.asarray(im)[..., 3].std() > 0


def test_issue14_measures_on_the_toy_world():
    """The measures of bench/toy_quality.py give the right answer on pictures whose answer is known."""
    from layerctl.training.toy_metrics import (
        colour_error, has_hole, has_speck, layer_agreement, nearest_colour, object_alpha_mean, rim_and_body,
    )

    ball = SceneSource(seed=3, shapes=["ball"], materials=["solid"])(0)
    ring = SceneSource(seed=3, shapes=["ring"], materials=["solid"])(0)
    glass = SceneSource(seed=3, shapes=["bottle"], materials=["glass"])(0)
    a = ball.fg[..., 3]
    assert not has_hole(a) and has_hole(ring.fg[..., 3])
    assert object_alpha_mean(a) > 0.85  # a solid object, rim included
    holed = a.copy()
    holed[30:33, 30:33] = 0.1  # a transparent hole inside the ball
    assert has_hole(holed)
    assert object_alpha_mean(holed) < object_alpha_mean(a)
    assert not has_speck(a)
    specked = a.copy()
    specked[1:3, 1:3] = 0.6  # a stray speck in a corner
    assert has_speck(specked)
    haze = np.maximum(a, 0.1 * (a == 0))  # a faint haze around the object lowers the rim-included mean
    assert object_alpha_mean(haze) < 0.5 < object_alpha_mean(a)
    rim, body = rim_and_body(glass.fg[..., 3])
    assert rim > body and 0.2 < body < 0.8
    rim, body = rim_and_body(a)
    assert rim < body  # a solid object's anti-aliased edge is below its body
    # colour: the scene's own red ball is close to red, far from blue; the same ball drawn orange is further
    red = SceneSource(seed=3, shapes=["ball"], materials=["solid"], colours=["red"])(0).fg
    assert colour_error(red, "red") < 0.1 < colour_error(red, "blue")
    orange = red.copy()
    orange[..., 1] = np.where(red[..., 3] > 0, red[..., 1] + 0.4, red[..., 1])
    assert colour_error(orange, "red") > colour_error(red, "red") + 0.05
    assert colour_error(np.zeros((8, 8, 4), np.float32), "red") is None  # nothing opaque: no figure
    assert nearest_colour(red) == "red" and nearest_colour(orange) == "orange"
    # layers that agree: blended is fg over bg
    ok = layer_agreement(ball.fg, ball.bg, ball.blended)
    assert ok["mae"] < 1e-5 and ok["iou"] > 0.9
    # layers that disagree: the object is drawn elsewhere in the blended picture
    moved = np.roll(ball.fg, 20, axis=1)
    bad = layer_agreement(moved, ball.bg, ball.blended)
    assert bad["mae"] > 0.1 and bad["iou"] < 0.5


def _toy_quality_bench():
    """bench/toy_quality.py as a module."""
    from benchhelp import load_bench

    return load_bench("toy_quality")


def test_toy_quality_bench_quick(tmp_path, capsys):
    """bench/toy_quality.py --quick runs every measure through Session.gen and writes its report."""
    import json

    _weights()
    mod = _toy_quality_bench()
    out = tmp_path / "q.json"
    assert mod.main(["--quick", "--modes", "joint", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "solid: object alpha, rim included" in text and "joint: IoU fg alpha vs object in blended" in text
    r = json.loads(out.read_text())
    assert r["rgba"]["images"] == 10 and r["layers"]["joint"]["images"] == 3
    for k in ("shape_accuracy", "solid_object_alpha", "solid_hole_share", "glass_body_alpha", "glass_share_rim_above_body"):
        assert 0.0 <= r["rgba"][k] <= 1.0, k
    # the measures on the training scenes themselves: what a perfect model would score
    gt = r["ground_truth"]
    assert gt["rgba"]["solid_object_alpha"] > 0.85 and gt["rgba"]["solid_hole_share"] == 0.0
    assert gt["rgba"]["glass_share_rim_above_body"] == 1.0
    assert gt["rgba"]["solid_colour_error"] < 0.1 and 0.0 < r["rgba"]["solid_colour_error"] < 1.0
    assert gt["rgba"]["solid_colour_accuracy"] > 0.9 and 0.0 <= r["rgba"]["solid_colour_accuracy"] <= 1.0
    assert "solid: colour error" in text
    assert gt["layers"]["mae"] < 0.01 and gt["layers"]["iou"] > 0.9
    # the same scenes through the base VAE: its round trip costs agreement, and the table says so
    ceil = gt["layers_through_vae"]
    for k in ("bg_decoded", "bg_given"):
        assert ceil[k]["images"] == 3 and gt["layers"]["mae"] < ceil[k]["mae"] < 0.5 and 0.0 < ceil[k]["iou"] < gt["layers"]["iou"]
    assert "joint: IoU, scenes through the base VAE (ceiling)" in text


def test_toy_quality_bench_prompt_subset(tmp_path, capsys):
    """--prompts measures only the prompts named, prints a line per prompt, and refuses one it does not know."""
    import json

    _weights()
    mod = _toy_quality_bench()
    out = tmp_path / "q.json"
    assert mod.main(["--quick", "--modes", "", "--prompts", "red cup,glass cup", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert sorted(r["per_prompt"]) == ["glass cup", "red cup"] and r["rgba"]["images"] == 2
    text = capsys.readouterr().out
    assert "red cup: " in text and "right (drawn: " in text and "red ball: " not in text
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--modes", "", "--prompts", "red zebra"])
    assert e.value.code == 2


def test_toy_quality_bench_sampler_reaches_the_images(tmp_path):
    """--sampler / --schedule are passed to every gen: the kept PNGs record them, and the report says them."""
    import json

    from layerctl.io.imageio import read_metadata

    _weights()
    mod = _toy_quality_bench()
    out, keep = tmp_path / "q.json", tmp_path / "png"
    assert mod.main(["--quick", "--modes", "", "--prompts", "green ball", "--sampler", "euler_a", "--schedule", "normal",
                     "--keep", str(keep), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["sampler"], r["schedule"]) == ("euler_a", "normal")
    pngs = sorted(keep.rglob("*.png"))
    assert pngs and all((read_metadata(p)["sampler"], read_metadata(p)["schedule"]) == ("euler_a", "normal") for p in pngs)


def test_toy_upscale_bench_measure():
    """bench/toy_upscale.py's per-result measure: the same shape scores IoU 1 and nothing new; a
    shape with a hole torn into it scores lower and counts the new hole."""
    from benchhelp import load_bench

    mod = load_bench("toy_upscale")
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 18**2).astype(np.float32)
    same = mod.measure(disc, disc)
    assert same["iou"] == 1.0 and not same["new_hole"] and not same["speck"] and same["alpha_mae"] == 0.0
    torn = disc.copy()
    torn[26:38, 26:38] = 0.0
    got = mod.measure(disc, torn)
    assert got["iou"] < 0.9 and got["new_hole"] and got["alpha_mae"] > 0.01


def test_pretrain_decoder_stage_keeps_the_encoder(tmp_path):
    """recipes/toy/pretrain_base.py decoder: trains the VAE's decoder only. The encoder (and with
    it every latent the UNet and LoRAs learned) is saved bit for bit, the scaling factor kept,
    the decoder changed, the stage logged in training.json. --transparent-encoder,
    --latent-noise and --latents mean each change what the decoder learns from."""
    import json
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = _weights()
    for f in d.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    args = ["decoder", "--steps", "2", "--batch", "4", "--lr", "1e-2", "--ema", "0.5", "--seed", "3", "--threads", "1"]
    for sub in ("transparent", "noisy", "means"):
        (tmp_path / sub).mkdir()
        for f in ("vae.safetensors", "training.json"):
            shutil.copy(d / f, tmp_path / sub / f)
    _pretrain(*args, "--out", tmp_path)
    # the same run with the fg rows on transparent latents (the offset in place of the sampling noise)
    _pretrain(*args, "--out", tmp_path / "transparent", "--transparent-encoder", d / "transparent_encoder.safetensors")
    # the same run from latents perturbed as a sampler leaves them
    _pretrain(*args, "--out", tmp_path / "noisy", "--latent-noise", "0.5")
    # the same run on the posterior's means (what a UNet trained on means draws)
    _pretrain(*args, "--out", tmp_path / "means", "--latents", "mean")
    before, after = load_file(str(d / "vae.safetensors")), load_file(str(tmp_path / "vae.safetensors"))
    for sub in ("transparent", "noisy", "means"):
        other = load_file(str(tmp_path / sub / "vae.safetensors"))
        assert any(not torch.equal(after[k], other[k]) for k in after if k.startswith("decoder.")), sub
        assert all(torch.equal(before[k], other[k]) for k in before if k.startswith(("encoder.", "quant_conv."))), sub
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    with safe_open(str(d / "vae.safetensors"), "pt") as f0, safe_open(str(tmp_path / "vae.safetensors"), "pt") as f1:
        m0, m1 = f0.metadata(), f1.metadata()
    assert m1["scaling_factor"] == m0["scaling_factor"] and m1["decoder_steps"] == "2" and float(m1["heldout_psnr"]) > 10
    assert json.loads((tmp_path / "training.json").read_text())["vae_decoder"]["steps"] == 2


def test_pretrain_unet_stage_resumes(tmp_path):
    """recipes/toy/pretrain_base.py unet --resume: two steps from the shipped weights change the UNet,
    keep the VAE, and log the stage (a smoke test of the script's third stage)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    d = _weights()
    for f in d.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    _pretrain("unet", "--resume", "--steps", 2, "--batch", 4, "--lr", "1e-2", "--seed", 3, "--threads", 1, "--out", tmp_path)
    before, after = load_file(str(d / "unet.safetensors")), load_file(str(tmp_path / "unet.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "vae.safetensors").read_bytes() == (d / "vae.safetensors").read_bytes()
    assert json.loads((tmp_path / "training.json").read_text())["unet"]["steps"] == 2


def test_pretrain_unet_from_scratch_at_another_width_goes_on_where_it_stopped(tmp_path):
    """A UNet trained from scratch at --unet-channels records its width (the toy backend then builds
    it that wide), and a run stopped after 2 of 4 steps and resumed ends bit for bit where an
    unbroken 4-step run ends: optimizer, EMA and random generators are saved beside the weights,
    and the resumed run reads the encoded rows back instead of encoding them again."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from layerctl.backends import toy

    d = _weights()
    for run in ("straight", "stopped"):
        (tmp_path / run).mkdir()
        for f in ("vae.safetensors", "text_encoder.safetensors", "training.json"):
            shutil.copy(d / f, tmp_path / run / f)
    args = ["unet", "--unet-channels", "16,32,32", "--steps", 4, "--batch", 2, "--lr", "1e-2", "--ema", "0.5",
            "--seed", 3, "--threads", 1, "--save-minutes", 0, "--cache", 32]
    _pretrain(*args, "--out", tmp_path / "straight")
    _pretrain(*args, "--out", tmp_path / "stopped", "--stop-after", 2)
    half = load_file(str(tmp_path / "stopped" / "unet.safetensors"))
    cached = tmp_path / "stopped" / "latent_cache-3.pt"
    stamp = cached.stat().st_mtime_ns
    _pretrain(*args, "--out", tmp_path / "stopped", "--resume")
    assert cached.stat().st_mtime_ns == stamp  # read, not written again
    for name in ("unet", "text_encoder"):
        a, b = (load_file(str(tmp_path / run / f"{name}.safetensors")) for run in ("straight", "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    end = load_file(str(tmp_path / "stopped" / "unet.safetensors"))
    assert any(not torch.equal(half[k], end[k]) for k in half)  # the resumed run did train
    assert toy.unet_channels(tmp_path / "stopped" / "unet.safetensors") == (16, 32, 32)
    assert end["conv_in.weight"].shape[0] == 16
    pipe = toy.load_toy("cpu", torch.float32, tmp_path / "stopped")
    assert pipe.unet.config.block_out_channels == (16, 32, 32)
    assert toy.unet_channels(d / "unet.safetensors") == toy.UNET_CHANNELS  # files from before the width was recorded


def test_pretrain_at_another_size_gives_a_toy_model_of_that_size(tmp_path):
    """pretrain_base.py vae --size records the toy world's picture size in the VAE file; the UNet stage reads
    it from there (its rows and latents at that size) and refuses another --size; the toy backend's native
    size follows the VAE file, so `gen` on such a folder draws pictures of that size by default."""
    import shutil

    import torch
    from PIL import Image

    from clihelp import run_cli
    from layerctl.backends import toy

    d = tmp_path / "w128"
    _pretrain("vae", "--size", 128, "--steps", 2, "--batch", 2, "--seed", 3, "--threads", 1, "--out", d)
    assert toy.image_size(d / "vae.safetensors") == 128
    _pretrain("unet", "--steps", 2, "--batch", 2, "--seed", 3, "--threads", 1, "--save-minutes", 0, "--cache", 8, "--out", d)
    rows = torch.load(d / "latent_cache-3.pt", weights_only=False)["rows"]
    assert tuple(rows["mean"].shape[1:]) == (4, 16, 16)  # 128x128 rows, 8x down
    assert toy.load_toy("cpu", torch.float32, d).unet.config.sample_size == 16
    with pytest.raises(SystemExit, match="trained at 128x128"):
        _pretrain("unet", "--size", 64, "--steps", 2, "--batch", 2, "--threads", 1, "--out", d)
    with pytest.raises(SystemExit, match="not a multiple of 64"):
        _pretrain("vae", "--size", 96, "--steps", 1, "--out", tmp_path / "bad")
    for key in ("encoder", "decoder", "rgba"):  # the transparency nets are convolutional, the LoRA per layer: any size
        shutil.copy(toy.weight_path(key), toy.weight_path(key, d))
    code, _out, err = run_cli("gen", "red ball", "--model", f"toy:{d}", "--steps", 2, "--seed", 1, "--out", tmp_path / "b.png")
    assert code == 0, err
    assert "a 128x128 toy world" in err
    assert Image.open(tmp_path / "b.png").size == (128, 128)
    assert toy.image_size(toy.weight_path("vae")) == toy.IMAGE_SIZE == 64  # the shipped files predate the record


def test_build_world_makes_a_128_toy_model_that_draws_and_resumes(tmp_path, capsys):
    """recipes/toy/build_world.py, every step count scaled to its minimum: the base VAE and UNet, the data,
    the transparency VAE and the transparent LoRA of a 128x128 world, from scratch, into one folder that
    `gen` loads as toy:FOLDER and draws 128x128 from; run again it skips what is done; a folder of another
    size, an unknown stage, a size that is not a multiple of 64 are refused."""
    import json
    import shutil

    from PIL import Image

    from clihelp import run_cli
    from layerctl.backends import toy

    mod = _recipe_module("build_world")
    out = tmp_path / "w128"
    stages = "vae,unet,data,tvae,tdec,rgba"
    assert mod.main(["--out", str(out), "--size", "128", "--scale", "0.0001", "--threads", "1", "--stages", stages]) == 0
    log = json.loads((out / "world.json").read_text())
    assert log["size"] == 128 and all(log["stages"][s]["done"] for s in stages.split(","))
    assert toy.image_size(out / "vae.safetensors") == 128
    assert len(list((out / "data" / "rgba").glob("*.png"))) == 32
    for name in ("unet", "transparent_encoder", "transparent_decoder", "rgba"):
        assert (out / f"{name}.safetensors").stat().st_size > 1000, name
    decoder = (out / "transparent_decoder.safetensors").read_bytes()  # tdec's, trained on from tvae's
    assert decoder == (out / "runs" / "tdec" / "transparent_decoder.safetensors").read_bytes()
    assert decoder != (out / "runs" / "tvae" / "transparent_decoder.safetensors").read_bytes()
    stamp = (out / "rgba.safetensors").stat().st_mtime_ns
    assert "build_world: stage rgba (128x128, cpu)" in capsys.readouterr().err
    assert mod.main(["--out", str(out), "--size", "128", "--scale", "0.0001", "--stages", stages]) == 0  # all done: no-op
    assert (out / "rgba.safetensors").stat().st_mtime_ns == stamp
    assert "build_world: stage" not in capsys.readouterr().err
    shutil.rmtree(out / "data")  # a folder brought back from elsewhere without its data: only that is made again
    assert mod.main(["--out", str(out), "--size", "128", "--scale", "0.0001", "--stages", stages]) == 0
    err = capsys.readouterr().err
    assert "build_world: stage data" in err and "build_world: stage rgba" not in err
    assert len(list((out / "data" / "rgba").glob("*.png"))) == 32
    code, _o, err = run_cli("gen", "glass cup", "--model", f"toy:{out}", "--steps", 2, "--seed", 1, "--out", tmp_path / "c.png")
    assert code == 0, err
    assert Image.open(tmp_path / "c.png").size == (128, 128) and Image.open(tmp_path / "c.png").mode == "RGBA"
    with pytest.raises(SystemExit, match="holds a 128x128 world"):
        mod.main(["--out", str(out), "--size", "64"])
    for bad in (["--stages", "vae,paint"], ["--size", "96"]):
        with pytest.raises(SystemExit) as e:
            mod.main(["--out", str(tmp_path / "x"), *bad])
        assert e.value.code == 2


def test_build_world_stages_side_by_side_keep_world_json_whole(tmp_path):
    """Two build_world processes on one folder (`--stages unet` beside `--stages data,tvae`): a stage whose
    inputs are not done is refused before it runs, and each process's record keeps what the other wrote."""
    import argparse
    import json

    mod = _recipe_module("build_world")
    out = tmp_path / "w"
    with pytest.raises(SystemExit, match="stage tvae needs vae, data first"):
        mod.main(["--out", str(out), "--stages", "tvae", "--threads", "1"])
    args = argparse.Namespace(out=str(out), size=64, scale=1.0)
    first, second = mod.World(args), mod.World(args)  # both read world.json before either wrote to it
    first.record("vae", steps=3)
    assert second.missing("unet") == []  # the other process's vae counts
    second.record("unet", steps=5)
    (out / "data" / "rgba").mkdir(parents=True)
    assert first.missing("rgba") == ["tvae", "data"]  # data: world.json does not say so yet
    log = json.loads((out / "world.json").read_text())
    assert log["stages"]["vae"]["steps"] == 3 and log["stages"]["unet"]["steps"] == 5


def test_build_world_ctrl_c_saves_the_stage_and_does_not_call_it_done(tmp_path):
    """Ctrl-C in the terminal (SIGINT to build_world and the stage it runs): the stage writes what it learnt
    and exits 130, build_world waits for that instead of killing it, says how to go on, and world.json does
    not record the stage as done."""
    import json
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, str(root / "recipes" / "toy" / "build_world.py"), "--out", str(out),
                             "--stages", "vae", "--threads", "1", "--scale", "0.5"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as from a terminal: a test run started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:  # until the VAE is training
        lines.append(line)
        if line.startswith("vae step"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=120) != 0, err
    assert "Traceback" not in err and "waiting for the stage to save" in err, err
    assert "stopped (exit 130); run again to resume" in err, err
    assert (out / "vae.safetensors").is_file()  # saved at the step it stopped on
    log = json.loads((out / "world.json").read_text()) if (out / "world.json").is_file() else {}
    assert "vae" not in log.get("stages", {})


def test_ship_world_copies_a_finished_world_whole(tmp_path):
    """recipes/toy/ship_world.py: a world whose every stage is done ships its nine files (the LoRAs'
    base_model metadata becomes 'toy', the rest kept) and a training.json with the world's stages; --replace
    ships another file for one part. A stage not done, a file that is not fp16 or not safetensors, a bad
    --replace: exit 2 with nothing written."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    mod = _recipe_module("ship_world")
    world, dst = tmp_path / "w", tmp_path / "dst"
    world.mkdir()
    info = json.dumps({"base_model": f"toy:{world}", "mode": "layers", "step": 8})
    for i, name in enumerate(mod.PARTS.values()):
        meta = {"layerctl": info} if name in ("joint.safetensors", "rgba.safetensors") else {"seed": str(i)}
        save_file({"w": torch.full((2,), float(i), dtype=torch.float16)}, world / name, metadata=meta)
    save_file({"w": torch.full((2,), 42.0, dtype=torch.float16)}, tmp_path / "later.safetensors")
    stages = {s: {"done": True} for s in mod.STAGES}
    (world / "world.json").write_text(json.dumps({"stages": {**stages, "bg2fg": {"done": False}}, "size": 64}))
    (world / "training.json").write_text(json.dumps({"vae": {"steps": 2400}}))
    bad = ([str(world), "--dst", str(dst)],  # bg2fg not done
           [str(world), "--dst", str(dst), "--replace", "paint=x"])
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2 and not dst.exists()
    (world / "world.json").write_text(json.dumps({"stages": stages, "size": 64}))
    save_file({"w": torch.zeros(2)}, tmp_path / "fp32.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    for bad_file in ("fp32.safetensors", "torn.safetensors"):
        with pytest.raises(SystemExit) as e:
            mod.main([str(world), "--dst", str(dst), "--replace", f"bg2fg={tmp_path / bad_file}"])
        assert e.value.code == 2 and not dst.exists()

    assert mod.main([str(world), "--dst", str(dst), "--replace", f"fg2bg={tmp_path / 'later.safetensors'}"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == sorted([*mod.PARTS.values(), "training.json"])
    for i, (part, name) in enumerate(mod.PARTS.items()):
        with safe_open(dst / name, "pt") as f:
            value, meta = float(f.get_tensor("w")[0]), f.metadata() or {}
        assert value == (42.0 if part == "fg2bg" else i), part
        if name in ("joint.safetensors", "rgba.safetensors"):
            assert json.loads(meta["layerctl"]) == {"base_model": "toy", "mode": "layers", "step": 8}
        elif part != "fg2bg":
            assert meta == {"seed": str(i)}
    record = json.loads((dst / "training.json").read_text())
    assert record["vae"] == {"steps": 2400} and record["stages"] == stages and record["size"] == 64
    assert record["replaced"] == {"fg2bg": str(tmp_path / "later.safetensors")}


def test_toy_image_size_metadata_that_is_not_a_size_is_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    from layerctl.backends import toy
    from layerctl.errors import LayerctlError

    save_file({"w": torch.zeros(1)}, str(tmp_path / "vae.safetensors"), metadata={"image_size": "big"})
    with pytest.raises(LayerctlError, match="image_size 'big'"):
        toy.image_size(tmp_path / "vae.safetensors")


def test_pretrain_rows_without_mirroring_are_the_same_rows_unmirrored():
    """pretrain_base.py's rows with flip=False: the same captions and roles as with mirroring, each
    picture the world's own (a cup keeps its handle on the right); with mirroring some rows are the
    exact mirror image of it."""
    mod = _recipe_module()
    from layerctl.training.scenes import SceneSource

    src = SceneSource(5)
    x1, c1, r1, fg1 = mod.scene_batch(src, 0, 24, np.random.default_rng(5))
    x0, c0, r0, fg0 = mod.scene_batch(src, 0, 24, np.random.default_rng(5), flip=False)
    assert (c0, r0) == (c1, r1)
    mirrored = [i for i in range(24) if not np.array_equal(fg0[i], fg1[i])]
    assert 0 < len(mirrored) < 24
    for i in range(24):
        assert np.array_equal(fg0[i], src(i).fg)
        assert np.array_equal(fg1[i], fg0[i][:, ::-1] if i in mirrored else fg0[i])


def test_pretrain_latents_are_posterior_draws_or_its_mean():
    """pretrain_base.py --latents: 'sample' draws from the VAE posterior (mean + std * noise), 'mean' is the
    posterior's mean itself; both consume the same random numbers, so the rest of a run sees the same ones."""
    import torch

    mod = _recipe_module()
    mean, std = torch.randn(3, 4, 8, 8), torch.rand(3, 4, 8, 8) + 0.1
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    drawn = mod.posterior_latents(mean, std, g1, "sample")
    assert torch.equal(mod.posterior_latents(mean, std, g2, "mean"), mean)
    assert not torch.allclose(drawn, mean) and torch.allclose(((drawn - mean) / std).std(), torch.tensor(1.0), atol=0.15)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_pretrain_unet_loss_tells_a_trained_unet_from_a_random_one(tmp_path):
    """pretrain_base.py unet-loss: the held-out denoising loss at fixed timesteps and noise is the
    same number twice for one model, and the shipped UNet scores below an untrained one of its shape."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    from layerctl.backends import toy

    d = _weights()
    for run in ("shipped", "random"):
        (tmp_path / run).mkdir()
        for f in ("vae.safetensors", "text_encoder.safetensors", "unet.safetensors"):
            shutil.copy(d / f, tmp_path / run / f)
    unet = toy.build_components(5)[2]
    save_file({k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "random" / "unet.safetensors"))
    got = {}
    for run in ("shipped", "random", "shipped"):
        _pretrain("unet-loss", "--out", tmp_path / run, "--batch", 16, "--threads", 1, "--json", tmp_path / "loss.json")
        got.setdefault(run, []).append(json.loads((tmp_path / "loss.json").read_text()))
    a, b = got["shipped"]
    assert a == b
    assert a["rows"] == 16 and set(a["per_t"]) == {"50", "200", "400", "600", "800", "950"}
    assert a["mean"] < 0.5 * got["random"][0]["mean"]
    _pretrain("unet-loss", "--out", tmp_path / "shipped", "--batch", 16, "--threads", 1, "--latents", "mean",
              "--json", tmp_path / "loss.json")
    assert json.loads((tmp_path / "loss.json").read_text())["mean"] != a["mean"]  # other latents, other figures


def test_toy_model_from_a_relative_folder(tmp_path, monkeypatch):
    """`--model toy:DIR` with a relative DIR (a candidate set of toy weights) finds its own
    transparent decoder and layer files, not a released file of that name on the hub."""
    import shutil

    from clihelp import run_cli

    d = _weights()
    shutil.copytree(d, tmp_path / "cand")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = run_cli("gen", "red ball", "--model", "toy:cand", "--steps", "2", "--seed", "1", "--out", "ball.png")
    assert code == 0, err
    assert (tmp_path / "ball.png").is_file()


def test_layer_modes_agree_on_toy(tmp_path):
    """Issue 14: with the shipped layer models and the defaults (20 steps, CFG 3), the object of `gen --fg`
    and of `gen --joint` is where the blended picture shows it: mean IoU of the foreground's alpha region
    with the object in the blended picture, over the bench's ten held-out scenes, seed 0. Measured: the
    files shipped before issue 14's seventh round 0.46 (--fg) and 0.60 (--joint), the seventh round's
    0.61 and 0.65, the seventeenth round's 0.64 and 0.66 (the bench's figures over 5 seeds are in
    bench/RESULTS.md). And the blended picture is fg over bg inside the object (mean |difference|): the
    seventeenth round's base VAE brought it to 0.116 (--fg) and 0.098 (--joint), from about 0.14-0.15."""
    from layerctl.api import Session

    _weights()
    tq = _toy_quality_bench()
    scenes = tq.layer_scenes()
    ious, maes = {}, {}
    with Session(quiet=True) as s:
        for mode in ("fg2bg", "joint"):
            rows, _times = tq.generate_layers(s, mode, scenes, [0], 20, None, tmp_path, "toy", {})
            ious[mode] = float(np.mean([r["iou"] for r in rows]))
            maes[mode] = float(np.mean([r["mae"] for r in rows]))
    assert ious["fg2bg"] > 0.55 and ious["joint"] > 0.62, ious
    assert maes["fg2bg"] < 0.13 and maes["joint"] < 0.11, maes


def test_thin_shapes_on_toy(tmp_path):
    """Issue 14: the shipped toy model draws the thin shapes it is asked for. Seeds 1-20, the defaults
    (20 steps, CFG 3), classified as the bench does. "purple star" and "blue ring": the LoRA shipped before
    issue 14's eighth round drew 27 of the 40 right, the eighth round's 34, the twelfth round's 35, the thirteenth
    round's 38, the seventeenth round's 38. "red cup" (a body with the handle's hole): the eighth round's set 1
    of 20, the twelfth round's unmirrored base 6, the thirteenth round's LoRA 9, the seventeenth round's set
    (rebuilt on a base VAE trained 2400 steps instead of 450) 17."""
    import json

    _weights()
    out = tmp_path / "q.json"
    assert _toy_quality_bench().main(["--seeds", "20", "--modes", "", "--no-vae", "--prompts",
                                      "purple star,blue ring,red cup", "--keep", str(tmp_path / "png"),
                                      "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    right = {p: d["correct"] for p, d in r["per_prompt"].items()}
    assert right["purple star"] + right["blue ring"] >= 36, right
    assert right["red cup"] >= 14, right


def test_solid_ball_without_holes_on_toy(tmp_path):
    """Issue 14: a solid object is solid inside. "green ball", seeds 1-40, the defaults, holes counted as the
    bench does (alpha <= 0.5 enclosed by alpha > 0.5, at least 2 px): the twelfth round's transparent LoRA drew
    a pale fleck read as a hole in 5 of the 40 (seeds 2, 6, 19, 30, 34), the thirteenth round's in none."""
    import json

    _weights()
    out = tmp_path / "q.json"
    assert _toy_quality_bench().main(["--seeds", "40", "--modes", "", "--no-vae", "--prompts", "green ball",
                                      "--json", str(out)]) == 0
    r = json.loads(out.read_text())["per_prompt"]["green ball"]
    assert r["correct"] >= 38 and r["holes"] <= 2, r


def test_every_toy_recipe_parses():
    """recipes/toy/ records how each toy weight file was (or is to be) trained: each recipe still reads
    as a valid config of its trainer, so a schema change cannot silently orphan one."""
    from layerctl.training import lora, vae

    folder = Path(__file__).resolve().parents[1] / "recipes" / "toy"
    recipes = sorted(folder.glob("train-*.yaml"))
    assert len(recipes) > 20
    for path in recipes:
        cfg = (vae if path.name.startswith("train-vae") else lora).load_config(path)
        assert cfg.steps > 0, path.name
    means = lora.load_config(folder / "train-lora-layers-noflip.yaml")
    assert means.loss.latents == "mean" and means.model.model == "toy:runs/toy/noflip1"
