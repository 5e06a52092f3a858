"""Long prompts (A1111's 75-token chunks, BREAK) and --clip-skip on the tiny backends.

What is checked: the pure chunking rules (sizes, BREAK boundaries, comma backtracking, padding to a
common chunk count), that a prompt longer than 77 tokens conditions the UNet beyond token 77 (the
embedding is [B, 231, D] for 200 tokens and its tail changes the embeddings and the image), that
BREAK starts a chunk, that clip skip picks the hidden state A1111 picks (SD1.5 with the final layer
norm, SDXL from the penultimate layer down, without it), the exit-2 errors, the metadata, recipes
and the layer modes with per-frame prompts of different lengths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clihelp import run_cli
from layerctl.core import prompts as P

SPEC = P.ChunkSpec(bos=100, eos=101, pad=101, length=77, comma=7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from layerctl.backends.tiny import TinyBackend

    return TinyBackend().load("tiny", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tiny_xl():
    from layerctl.backends.tiny import TinyXLBackend

    return TinyXLBackend().load("tiny-xl", torch.device("cpu"), torch.float32)


def words(n: int, word: str = "x") -> str:
    """n tokens on the tiny (character-level) tokenizer: one-letter words are one token each."""
    return " ".join([word] * n)


def _meta(path):
    with Image.open(path) as im:
        return json.loads(im.info["layerctl"]), im.info["parameters"]


def _px(path):
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


# ----------------------------------------------------------------------------- pure chunking


def test_chunks_of_75_wrapped_and_padded():
    chunks = P.chunk_tokens([list(range(200, 400))], SPEC)
    assert [len(c) for c in chunks] == [75, 75, 50]
    assert sum(chunks, []) == list(range(200, 400))  # nothing lost, order kept
    row = P.wrap_chunk(chunks[2], SPEC)
    assert len(row) == 77 and row[0] == 100 and row[1:51] == list(range(350, 400)) and row[51:] == [101] * 26
    assert P.chunk_tokens([[]], SPEC) == [[]]  # an empty prompt is one (empty) chunk


def test_break_starts_a_chunk():
    tok = {"a": [1, 2], "b": [3], "c d": [4, 5]}.__getitem__
    assert P.text_chunks("a BREAK b", tok, SPEC) == [[1, 2], [3]]
    assert P.text_chunks("a BREAK b BREAK c d", tok, SPEC) == [[1, 2], [3], [4, 5]]
    assert P.text_chunks("a BREAK BREAK b", lambda t: tok(t) if t else [], SPEC) == [[1, 2], [], [3]]  # A1111: an empty chunk
    assert P.text_chunks("a BREAK", lambda t: tok(t) if t else [], SPEC) == [[1, 2]]  # a trailing BREAK adds none
    assert P.split_break("a BREAKING news, breaks BREAK b") == ["a BREAKING news, breaks", "b"]  # a word of its own
    assert P.only_break("BREAK") and P.only_break(" BREAK  BREAK ") and not P.only_break("a BREAK")
    assert not P.only_break("") and not P.only_break("break")


def test_break_after_70_tokens_splits_there_not_at_75():
    table = {"first": list(range(1000, 1070)), "second": list(range(2000, 2010))}
    tok = lambda t: sum((table[w] for w in t.split()), [])  # noqa: E731
    assert [len(c) for c in P.text_chunks("first BREAK second", tok, SPEC)] == [70, 10]
    assert [len(c) for c in P.text_chunks("first second", tok, SPEC)] == [75, 5]


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk():
    ids = list(range(200, 270)) + [7] + list(range(300, 320))  # a comma at position 70, then 20 tokens
    chunks = P.chunk_tokens([ids], SPEC)
    assert [len(c) for c in chunks] == [71, 20] and chunks[0][-1] == 7
    far = list(range(200, 240)) + [7] + list(range(300, 360))  # the comma 35 tokens back: a plain cut
    assert [len(c) for c in P.chunk_tokens([far], SPEC)] == [75, 26]
    assert [len(c) for c in P.chunk_tokens([ids], SPEC, backtrack=0)] == [75, 16]


def test_batch_pads_every_text_to_the_same_chunk_count():
    tok = lambda t: [int(w) for w in t.split()]  # noqa: E731
    rows = P.batch_chunks([" ".join(["5"] * 160), "6", ""], tok, SPEC, min_chunks=1)
    assert [len(r) for r in rows] == [3, 3, 3] and all(len(c) == 77 for r in rows for c in r)
    empty = [100, 101] + [101] * 75
    assert rows[1][1] == rows[1][2] == empty and rows[2] == [empty] * 3
    assert [len(r) for r in P.batch_chunks(["6"], tok, SPEC, min_chunks=4)] == [4]
    cut = []
    rows = P.batch_chunks([" ".join(["5"] * 75 * (P.MAX_CHUNKS + 2))], tok, SPEC, cut=lambda t, n: cut.append(n))
    assert len(rows[0]) == P.MAX_CHUNKS and cut == [P.MAX_CHUNKS + 2]


# ----------------------------------------------------------------------------- embeddings


def test_long_prompt_conditions_beyond_token_77(tiny):
    a, b = words(199) + " y", words(199) + " z"  # the same but for the very last token
    ea = tiny.encode_prompt([a], ["bad"], True, 64, 64).hidden
    eb = tiny.encode_prompt([b], ["bad"], True, 64, 64).hidden
    assert ea.shape == (2, 231, 32)  # [negative, positive] x 3 chunks of 77
    assert torch.equal(ea[1, :154], eb[1, :154]) and not torch.allclose(ea[1, 154:], eb[1, 154:])
    assert torch.equal(ea[0], eb[0])  # the negative, padded with empty chunks, is the same
    # each chunk is encoded on its own: the 2nd chunk is exactly the encoding of its 75 tokens
    alone = tiny.encode_prompt([words(75)], [], False, 64, 64).hidden
    assert torch.allclose(ea[1, 77:154], alone[0], atol=1e-6)
    # the negative's padding chunks are the encoding of an empty prompt
    empty = tiny.encode_prompt([""], [], False, 64, 64).hidden
    assert torch.allclose(ea[0, 77:154], empty[0], atol=1e-6) and torch.allclose(ea[0, 154:], empty[0], atol=1e-6)


def test_break_splits_the_embedding(tiny):
    e = tiny.encode_prompt(["x x BREAK y"], [], False, 64, 64).hidden
    assert e.shape == (1, 154, 32)
    first = tiny.encode_prompt(["x x"], [], False, 64, 64).hidden
    second = tiny.encode_prompt(["y"], [], False, 64, 64).hidden
    assert torch.allclose(e[0, :77], first[0], atol=1e-6) and torch.allclose(e[0, 77:], second[0], atol=1e-6)
    assert tiny.prompt_chunks(["x x BREAK y", "z"]) == 2 and tiny.prompt_chunks([words(151)]) == 3


def test_sdxl_long_prompt_both_encoders_pooled_from_first_chunk(tiny_xl):
    a, b = words(199) + " y", words(199) + " z"
    ea = tiny_xl.encode_prompt([a], [""], True, 64, 64)
    eb = tiny_xl.encode_prompt([b], [""], True, 64, 64)
    assert ea.hidden.shape == (2, 231, 64)  # CLIP-L 32 + OpenCLIP-G 32 features, 3 chunks
    assert torch.equal(ea.hidden[1, :154], eb.hidden[1, :154]) and not torch.allclose(ea.hidden[1, 154:], eb.hidden[1, 154:])
    pooled_a = ea.extra["added_cond_kwargs"]["text_embeds"]
    pooled_b = eb.extra["added_cond_kwargs"]["text_embeds"]
    assert pooled_a.shape == (2, 32) and torch.equal(pooled_a, pooled_b)  # the tail is not in the first chunk
    first = tiny_xl.encode_prompt([words(75)], [], False, 64, 64).extra["added_cond_kwargs"]["text_embeds"]
    assert torch.allclose(pooled_a[1], first[0], atol=1e-5)
    assert ea.extra["added_cond_kwargs"]["time_ids"].shape == (2, 6)


def test_short_prompts_match_diffusers(tiny, tiny_xl):
    """Up to 77 tokens, clip skip 1: exactly what diffusers' pipelines give (no change for old prompts)."""
    dev = torch.device("cpu")
    ours = tiny.encode_prompt(["a red glass cup"], ["bad"], True, 64, 64).hidden
    with torch.no_grad():
        pos, neg = tiny.pipe.encode_prompt(["a red glass cup"], dev, 1, True, negative_prompt=["bad"])
    assert torch.equal(ours, torch.cat([neg, pos]))
    ours = tiny_xl.encode_prompt(["a red glass cup"], ["bad"], True, 64, 64)
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = tiny_xl.pipe.encode_prompt(
            ["a red glass cup"], device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=["bad"])
    assert torch.allclose(ours.hidden, torch.cat([neg, pos]), atol=1e-5)
    assert torch.allclose(ours.extra["added_cond_kwargs"]["text_embeds"], torch.cat([neg_pooled, pooled]), atol=1e-5)


def _hidden_states(encoder, tokenizer, text):
    ids = tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True)


def test_clip_skip_sd15_is_the_layer_before_with_final_norm(tiny):
    one = tiny.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=1).hidden
    two = tiny.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=2).hidden
    out = _hidden_states(tiny.pipe.text_encoder, tiny.pipe.tokenizer, "a glass cup")
    norm = tiny.pipe.text_encoder.final_layer_norm
    assert not torch.allclose(one, two)
    assert torch.allclose(one, out.last_hidden_state, atol=1e-6)
    assert torch.allclose(two, norm(out.hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(two, out.hidden_states[-2], atol=1e-3)  # the final layer norm is applied
    long2 = tiny.encode_prompt([words(100)], [], False, 64, 64, clip_skip=2).hidden
    assert long2.shape == (1, 154, 32)


def test_clip_skip_sdxl_penultimate_and_below(tiny_xl):
    """SDXL: 1 and 2 are the penultimate layer (the default); 3 is the layer before that, in both
    encoders, without the final layer norm; the pooled embedding does not change."""
    from layerctl.backends.tiny import SEED, tiny_text_encoder
    from layerctl.errors import LayerctlError

    one = tiny_xl.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=1)
    two = tiny_xl.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=2)
    assert torch.equal(one.hidden, two.hidden)
    with pytest.raises(LayerctlError, match="has 2 layers"):
        tiny_xl.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=3)
    pipe = tiny_xl.pipe
    saved = pipe.text_encoder, pipe.text_encoder_2
    try:
        pipe.text_encoder = tiny_text_encoder(SEED + 4, layers=4)
        pipe.text_encoder_2 = tiny_text_encoder(SEED + 5, projection=32, layers=4)
        base = tiny_xl.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=2)
        three = tiny_xl.encode_prompt(["a glass cup"], [], False, 64, 64, clip_skip=3)
        outs = [_hidden_states(e, t, "a glass cup") for t, e in ((pipe.tokenizer, pipe.text_encoder),
                                                                  (pipe.tokenizer_2, pipe.text_encoder_2))]
        assert torch.allclose(base.hidden, torch.cat([o.hidden_states[-2] for o in outs], -1), atol=1e-6)
        assert torch.allclose(three.hidden, torch.cat([o.hidden_states[-3] for o in outs], -1), atol=1e-6)
        pooled = base.extra["added_cond_kwargs"]["text_embeds"]
        assert torch.equal(pooled, three.extra["added_cond_kwargs"]["text_embeds"])
        assert torch.allclose(pooled, outs[1].text_embeds, atol=1e-6)
    finally:
        pipe.text_encoder, pipe.text_encoder_2 = saved


# ----------------------------------------------------------------------------- CLI


def _one_line_exit_2(code, stderr, *needles):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["gen", "cup", "--clip-skip", "0"], "clip_skip must be >= 1"),
    (["gen", "cup", "--clip-skip", "-2"], "clip_skip must be >= 1"),
    (["gen", "cup", "--clip-skip", "999"], "clip_skip must be at most"),
    (["gen", "BREAK", "--clip-skip", "1"], "only BREAK"),
    (["gen", " BREAK  BREAK "], "only BREAK"),
    (["gen", "cup", "--negative", "BREAK"], "negative prompt"),
    (["gen", "--joint", "--fg-prompt", "BREAK", "--bg-prompt", "table"], "fg prompt"),
    (["upscale", "x.png", "--prompt", "BREAK"], "only BREAK"),
])
def test_bad_clip_skip_and_break_only_exit_2_before_loading(tmp_path, monkeypatch, argv, needle):
    import layerctl.backends.registry as registry

    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, stderr = run_cli(*argv, "--model", "tiny", "--out" if argv[0] == "gen" and "--joint" not in argv else "--seed",
                              tmp_path / "o.png" if argv[0] == "gen" and "--joint" not in argv else "1")
    _one_line_exit_2(code, stderr, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model, layers", [("tiny", 2), ("tiny-xl", 2)])
def test_clip_skip_above_the_layer_count_exit_2_nothing_written(tmp_path, model, layers):
    code, _, stderr = run_cli("gen", "cup", "--model", model, "--clip-skip", "3", "--steps", "1", "--seed", "1",
                              "--out", tmp_path / "o.png", "--quiet")
    _one_line_exit_2(code, stderr, "--clip-skip 3", f"has {layers} layers")
    assert list(tmp_path.iterdir()) == []


def test_long_prompt_tail_changes_the_image_and_metadata_keeps_it(tmp_path):
    a, b = words(199) + " y", words(199) + " z"
    for name, prompt in (("a.png", a), ("b.png", b), ("c.png", a)):
        code, _, stderr = run_cli("gen", prompt, "--model", "tiny", "--steps", "2", "--seed", "3", "--no-tta",
                                  "--out", tmp_path / name, "--quiet")
        assert code == 0, stderr
    assert not np.array_equal(_px(tmp_path / "a.png"), _px(tmp_path / "b.png"))
    assert np.array_equal(_px(tmp_path / "a.png"), _px(tmp_path / "c.png"))
    meta, params = _meta(tmp_path / "a.png")
    assert meta["prompt"] == a and params.splitlines()[0] == a  # the whole prompt, not the first 77 tokens
    assert meta["clip_skip"] == 1 and "Clip skip" not in params


def test_clip_skip_2_metadata_and_image(tmp_path):
    for name, skip in (("one.png", "1"), ("two.png", "2")):
        code, _, stderr = run_cli("gen", "glass cup", "--model", "tiny", "--steps", "2", "--seed", "3", "--no-tta",
                                  "--clip-skip", skip, "--out", tmp_path / name, "--quiet")
        assert code == 0, stderr
    meta, params = _meta(tmp_path / "two.png")
    assert meta["clip_skip"] == 2 and "Clip skip: 2" in params.splitlines()[-1]
    assert not np.array_equal(_px(tmp_path / "one.png"), _px(tmp_path / "two.png"))


def test_layer_modes_with_prompts_of_different_lengths(tmp_path):
    """SD1.5 joint: each frame's prompt overrides the context of that frame, so all must have the same
    token count: a 200-token foreground prompt next to a 2-token background prompt runs; SDXL too."""
    code, _, stderr = run_cli("gen", "--joint", "--fg-prompt", words(200), "--bg-prompt", "table", "--model", "tiny",
                              "--clip-skip", "2", "--steps", "2", "--seed", "1", "--no-tta", "--out-dir", tmp_path / "j",
                              "--quiet")
    assert code == 0, stderr
    meta, params = _meta(tmp_path / "j" / "fg.png")
    assert meta["prompts"]["fg"] == words(200) and meta["clip_skip"] == 2 and "Clip skip: 2" in params
    Image.fromarray(np.full((64, 64, 4), 200, np.uint8)).save(tmp_path / "fg.png")
    code, _, stderr = run_cli("gen", "--fg", tmp_path / "fg.png", "--bg-prompt", words(90) + " BREAK a room",
                              "--negative", words(160), "--model", "tiny-xl", "--steps", "2", "--seed", "1", "--no-tta",
                              "--out-dir", tmp_path / "x", "--quiet")
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["bg.png", "blended.png"]


def test_recipe_defaults_and_job_clip_skip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "defaults: {model: tiny, steps: 1, seed: 1, tta: false, clip_skip: 2}\n"
        "jobs:\n"
        "  - name: a\n    gen: {prompt: glass cup, out: a.png}\n"
        "  - name: b\n    gen: {prompt: glass cup BREAK on a table, out: b.png, clip_skip: 1}\n"
    )
    code, _, stderr = run_cli("run", tmp_path / "r.yaml", "--quiet")
    assert code == 0, stderr
    files = {p.name: p for p in tmp_path.rglob("*.png")}
    assert _meta(files["a.png"])[0]["clip_skip"] == 2 and "Clip skip: 2" in _meta(files["a.png"])[1]
    assert _meta(files["b.png"])[0]["clip_skip"] == 1
    (tmp_path / "bad.yaml").write_text("defaults: {model: tiny, clip_skip: 0}\njobs:\n  - gen: {prompt: cup, out: c.png}\n")
    code, _, stderr = run_cli("run", tmp_path / "bad.yaml")
    assert code == 2 and "clip_skip" in stderr and "Traceback" not in stderr


def test_inpaint_pipeline_path_takes_our_embeddings(tiny):
    """A 9-channel (inpainting) UNet runs diffusers' pipeline, fed our chunked, clip-skipped embeddings."""
    import dataclasses

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from layerctl.backends.tiny import tiny_unet_config
    from layerctl.pipelines.inpaint import inpaint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny_unet_config(False), "in_channels": 9})
    m9 = dataclasses.replace(tiny, pipe=StableDiffusionPipeline(**{**tiny.pipe.components, "unet": unet}))
    img = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64), np.float32)
    mask[:, 32:] = 1
    run = lambda p, skip=1: inpaint(m9, img, mask, p, "bad", steps=1, cfg=5.0, seed=0, clip_skip=skip).image  # noqa: E731
    base = run(words(199) + " y")
    assert not np.array_equal(base, run(words(199) + " z"))  # token 200 matters
    assert not np.array_equal(base, run(words(199) + " y", skip=2))
    assert np.array_equal(base, run(words(199) + " y"))


def test_training_text_cache_pads_captions_of_different_lengths(tiny):
    from layerctl.training.lora import TextCache

    cache = TextCache(tiny, 64, enabled=True)
    short = cache.encode(["cup"]).hidden
    both = cache.encode([words(100), "cup"]).hidden  # "cup" comes from the cache (77 tokens), padded to 154
    direct = tiny.encode_prompt([words(100), "cup"], [], False, 64, 64).hidden
    assert short.shape == (1, 77, 32) and both.shape == (2, 154, 32)
    assert torch.allclose(both, direct, atol=1e-5)


def test_clip_skip_reaches_edit_upscale_and_decompose(tmp_path):
    """--clip-skip and long prompts on the editing paths: img2img + mask + hires, upscale, decompose.
    Each runs twice (clip skip 1 and 2): the pictures differ and the metadata says which."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:16, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(rgba[..., :3].copy()).save(tmp_path / "pic.png")
    runs = {
        "edit": lambda o, s: ("gen", words(120), "--init", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                              "--hires", "2", "--model", "tiny", "--out", o),
        "upscale": lambda o, s: ("upscale", tmp_path / "in.png", "--prompt", words(120), "--model", "tiny-xl", "--out", o),
        "decompose": lambda o, s: ("decompose", tmp_path / "pic.png", "--fg-prompt", words(120), "--model", "tiny",
                                   "--out-dir", o),
    }
    for name, argv in runs.items():
        outs = []
        for skip in ("1", "2"):
            o = tmp_path / f"{name}{skip}" / ("o.png" if name != "decompose" else "")
            code, _, stderr = run_cli(*argv(o, skip), "--clip-skip", skip, "--steps", "2", "--seed", "5", "--no-tta",
                                      "--quiet")
            assert code == 0, (name, stderr)
            png = o if name != "decompose" else o / "fg.png"
            meta, params = _meta(png)
            assert meta["clip_skip"] == int(skip) and (("Clip skip: 2" in params) == (skip == "2")), name
            outs.append(_px(png))
        if name == "upscale":  # SDXL: 1 and 2 are the same layer (the penultimate)
            assert np.array_equal(*outs), name
        else:
            assert not np.array_equal(*outs), name


def test_flux_refuses_clip_skip():
    from layerctl.backends.registry import load_model
    from layerctl.errors import LayerctlError

    flux = load_model("tiny-flux", "cpu", "fp32")
    assert flux.encode_prompt(["a cup"], [""], False, 64, 64, clip_skip=1).hidden.shape[0] == 1
    with pytest.raises(LayerctlError, match="--clip-skip applies to SD1.5 and SDXL"):
        flux.encode_prompt(["a cup"], [""], False, 64, 64, clip_skip=2)
