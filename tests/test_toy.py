"""The bundled toy model: scene source, tokenizer, shipped weights, one generation, the vocabulary warning."""

from __future__ import annotations

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
