"""Bad and hostile input to gen/decompose/upscale: refused up front (exit 2, one line, nothing written,
no model loaded), and the fixes of issue 18 that touch the CLI (templates, symlinks, races, numbers,
path checks, per-layer prompts, notices)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from clihelp import run_cli


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the checks under test must run before it."""
    calls = []

    def fake_load_model(*a, **k):
        calls.append(a)
        raise AssertionError(f"the model loader was called: {a}")

    import layerctl.backends.registry as registry

    monkeypatch.setattr(registry, "load_model", fake_load_model)
    return calls


def _refused(code, stdout, stderr, *words):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("layerctl: error: ") and "Traceback" not in stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert stdout == ""


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


GEN = ("gen", "glass cup", "--model", "tiny", "--steps", "2", "--seed", "3")

# ------------------------------------------------------------------ templates


@pytest.mark.parametrize("template,word", [
    ("a{i.__class__}.png", "unknown field {i.__class__}"),
    ("a{seed:>99999999}.png", "format '>99999999' is not allowed"),
    ("a{i[0]}.png", "unknown field"),
    ("a{0}.png", "unknown field {0}"),
    ("a{prompt_slug!r}.png", "unknown field"),
    ("a{i:,}.png", "not allowed"),
    ("a{.png", "unmatched"),
])
def test_template_injection_refused_before_loading(tmp_path, no_load, template, word):
    before = _files(tmp_path)
    _refused(*run_cli(*GEN, "--out", tmp_path / template), word)
    assert _files(tmp_path) == before and not no_load


def test_template_fields_by_name_and_zero_pad():
    from layerctl.core.naming import expand_out, fill_template

    assert fill_template("x_{i:04d}_{seed}_{prompt_slug}.png", i=3, seed=12, prompt_slug="cup") == "x_0003_12_cup.png"
    assert fill_template("{{i}}_{i}.png", i=1, seed=0, prompt_slug="") == "{i}_1.png"
    assert [p.name for p in expand_out("q.png", 2, [5, 6])] == ["q_0000.png", "q_0001.png"]
    assert [p.name for p in expand_out("q_{i:03d}.png", 2, [5, 6], start=4, total=6)] == ["q_004.png", "q_005.png"]
    from layerctl.errors import LayerctlError

    with pytest.raises(LayerctlError, match="characters long"):
        fill_template("{prompt_slug}" * 200, i=0, seed=0, prompt_slug="x" * 40)


def test_batch_expands_psd_like_out(tmp_path):
    code, stdout, stderr = run_cli(*GEN, "-n", "2", "--out", tmp_path / "b_{i}.png", "--psd", tmp_path / "b_{i}.psd")
    assert code == 0, stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["b_0.png", "b_0.psd", "b_1.png", "b_1.psd"]
    from psd_tools import PSDImage

    assert len(list(PSDImage.open(tmp_path / "b_1.psd"))) == 1


def test_plain_name_rule_is_the_same_for_batch_and_prompts_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, stderr = run_cli(*GEN, "-n", "2", "--out", a / "q.png")
    assert code == 0, stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("glass cup\nred ball\n", encoding="utf-8")
    code, _, stderr = run_cli("gen", "--prompts-file", prompts, "--model", "tiny", "--steps", "2", "--seed", "3",
                              "--out", b / "q.png")
    assert code == 0, stderr
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) == ["q_0000.png", "q_0001.png"]
    meta = json.loads(Image.open(b / "q_0001.png").info["layerctl"])
    assert meta["prompt"] == "red ball" and meta["seed"] == 4
    # {i} counts every image of the command: 2 prompts x 2 images
    c = tmp_path / "c"
    code, _, stderr = run_cli("gen", "--prompts-file", prompts, "--model", "tiny", "--steps", "2", "--seed", "3",
                              "-n", "2", "--out", c / "q{i}.png")
    assert code == 0, stderr
    assert sorted(p.name for p in c.iterdir()) == ["q0.png", "q1.png", "q2.png", "q3.png"]


# ------------------------------------------------------------------ symlinks and races


def test_existing_symlink_counts_as_existing(tmp_path, no_load):
    target = tmp_path / "target.png"
    target.write_bytes(b"keep me")
    link = tmp_path / "out.png"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    for out in (link, dangling):
        _refused(*run_cli(*GEN, "--out", out), "exists", "symlink")
    assert link.is_symlink() and target.read_bytes() == b"keep me"
    assert dangling.is_symlink() and not (tmp_path / "nowhere.png").exists()
    assert not no_load


def test_atomic_write_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    from layerctl.errors import LayerctlError
    from layerctl.io.imageio import atomic_write

    final = tmp_path / "x.png"

    def write(tmp):  # another process creates the file after our check, before our rename
        Path(tmp).write_bytes(b"ours")
        final.write_bytes(b"theirs")

    with pytest.raises(LayerctlError, match="exists"):
        atomic_write(final, write, overwrite=False)
    assert final.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left
    atomic_write(final, lambda tmp: Path(tmp).write_bytes(b"new"), overwrite=True)
    assert final.read_bytes() == b"new"


def test_two_processes_one_wins_the_other_exits_2(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from layerctl.errors import LayerctlError
        from layerctl.io.imageio import atomic_write

        def write(tmp):
            Path(sys.argv[2]).touch()            # "I have passed the existence check"
            while not Path(sys.argv[3]).exists():  # wait until the other one has too
                time.sleep(0.01)
            Path(tmp).write_bytes(sys.argv[4].encode() * 100000)
        try:
            atomic_write(sys.argv[1], write, overwrite=False)
        except LayerctlError as exc:
            print(exc, file=sys.stderr)
            sys.exit(2)
    """)
    out = tmp_path / "race.png"
    a, b = tmp_path / "a.flag", tmp_path / "b.flag"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), mine, other, tag], stderr=subprocess.PIPE, text=True)
             for mine, other, tag in ((str(a), str(b), "A"), (str(b), str(a), "B"))]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "exists" in loser
    data = out.read_bytes()
    assert data in (b"A" * 100000, b"B" * 100000)  # whole, from one writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.flag", "b.flag", "race.png"]


# ------------------------------------------------------------------ bad numbers

FLOAT_FLAGS = [
    ("--cfg", []), ("--weight", []), ("--lora-scale", []), ("--strength", ["--init", "{img}"]), ("--stop-at", []),
    ("--hires", []), ("--hires-strength", ["--hires", "2"]),
    ("--control-scale", ["--controlnet", "x", "--control-image", "{img}"]),
]


@pytest.mark.parametrize("flag,extra", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_refused(tmp_path, no_load, flag, extra, value):
    img = tmp_path / "in.png"
    Image.new("RGBA", (64, 64), (1, 2, 3, 255)).save(img)
    extra = [str(img) if x == "{img}" else x for x in extra]
    before = _files(tmp_path)
    _refused(*run_cli(*GEN, "--out", tmp_path / "o.png", flag, value, *extra), "finite")
    assert _files(tmp_path) == before and not no_load


@pytest.mark.parametrize("argv,word", [
    (["decompose", "{img}", "--weight", "nan", "--out-dir", "{d}"], "weight"),
    (["decompose", "{img}", "--cfg", "inf", "--out-dir", "{d}"], "cfg"),
    (["upscale", "{img}", "--scale", "inf", "--out", "{d}/u.png"], "scale"),
    (["upscale", "{img}", "--strength", "nan", "--out", "{d}/u.png"], "strength"),
    (["upscale", "{img}", "--control-scale", "nan", "--out", "{d}/u.png"], "control_scale"),
])
def test_non_finite_floats_refused_by_other_commands(tmp_path, no_load, argv, word):
    img = tmp_path / "in.png"
    Image.new("RGBA", (64, 64), (1, 2, 3, 255)).save(img)
    argv = [a.replace("{img}", str(img)).replace("{d}", str(tmp_path / "o")) for a in argv]
    _refused(*run_cli(*argv, "--model", "tiny"), word, "finite")
    assert not (tmp_path / "o").exists() and not no_load


def test_request_schemas_refuse_non_finite_values():
    from pydantic import ValidationError

    from layerctl.requests import DecomposeRequest, GenRequest, UpscaleRequest, validation_message

    for cls, field, extra in [
        (GenRequest, "cfg", {}), (GenRequest, "lora_scale", {}), (GenRequest, "weight", {}), (GenRequest, "hires", {}),
        (GenRequest, "control_scale", {}), (DecomposeRequest, "stop_at", {"image": "x.png"}),
        (UpscaleRequest, "scale", {"image": "x.png"}), (UpscaleRequest, "strength", {"image": "x.png"}),
    ]:
        for bad in (math.nan, math.inf):
            value = [bad] if field == "control_scale" else bad
            with pytest.raises(ValidationError) as info:
                cls(**extra, **{field: value})
            msg = validation_message(info.value)
            assert field in msg and "finite" in msg, msg


def test_steps_capped_and_field_named_once(tmp_path, no_load):
    _refused(*run_cli(*GEN, "--out", tmp_path / "o.png", "--steps", "1001"), "steps must be at most 1000")
    code, out, err = run_cli(*GEN, "--out", tmp_path / "o.png", "--width", "100")
    _refused(code, out, err, "width must be a positive multiple of 64")
    assert "width: width" not in err
    assert not no_load


@pytest.mark.parametrize("seed", [str(2**70), str(2**32), "-2"])
def test_seed_out_of_range_refused_up_front(tmp_path, no_load, seed):
    argv = [a for a in GEN if a not in ("--seed", "3")]
    _refused(*run_cli(*argv, "--seed", seed, "--out", tmp_path / "o.png"), "seed")
    assert not no_load and not (tmp_path / "o.png").exists()


def test_seed_minus_one_picks_a_random_seed_and_says_which(tmp_path):
    argv = [a for a in GEN if a not in ("--seed", "3")]
    code, _, stderr = run_cli(*argv, "--seed", "-1", "--out", tmp_path / "o.png")
    assert code == 0, stderr
    meta = json.loads(Image.open(tmp_path / "o.png").info["layerctl"])
    assert 0 <= meta["seed"] < 2**32
    assert f"random seed {meta['seed']}" in stderr
    assert f"Seed: {meta['seed']}" in Image.open(tmp_path / "o.png").info["parameters"]


def test_huge_size_refused_before_loading(tmp_path, no_load, monkeypatch):
    import layerctl.core.budget as budget

    monkeypatch.setattr(budget, "device_memory", lambda device: ("RAM", 16 * 2**30))
    _refused(*run_cli(*GEN, "--out", tmp_path / "o.png", "--width", "16384", "--height", "16384", "--device", "cpu"),
             "needs at least", "16.0 GiB")
    _refused(*run_cli("gen", "--joint", "--fg-prompt", "a", "--bg-prompt", "b", "--model", "tiny", "--width", "4096",
                      "--height", "4096", "-n", "2", "--out-dir", tmp_path / "d"), "x 3 frame(s)")
    assert not no_load and not list(tmp_path.iterdir())
    # the rule itself, and a normal job passes
    assert budget.estimate_bytes(512, 512, 1, 1) == 512 * 512 * budget.BYTES_PER_PIXEL
    from layerctl.requests import GenRequest

    budget.check_memory(GenRequest(prompt="x", width=1024, height=1024), frames=3)


def test_no_nan_in_json_metadata():
    from layerctl.errors import LayerctlError
    from layerctl.io.imageio import strict_json

    with pytest.raises(LayerctlError, match="non-finite"):
        strict_json({"cfg": float("nan")})
    assert json.loads(strict_json({"cfg": 4.0})) == {"cfg": 4.0}


# ------------------------------------------------------------------ checks before the render


def test_path_problems_found_before_any_model_loads(tmp_path, no_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    folder = tmp_path / "x.png"
    folder.mkdir()
    cases = [
        (GEN + ("--out", blocker / "o.png"), "is a file, not a folder"),
        (GEN + ("--out", blocker / "sub" / "o.png"), "is a file, not a folder"),
        (GEN + ("--out", folder, "--overwrite"), "a folder of that name exists"),
        (GEN + ("--out", tmp_path / ("n" * 300 + ".png")), "over the limit of 255"),
        (GEN + ("--out", tmp_path / "ok_{i}.png", "--psd", blocker / "o.psd"), "is a file, not a folder"),
        (GEN + ("--out", tmp_path / "ok.png", "--preview", "--psd", tmp_path / ("p" * 300 + ".psd")), "over the limit"),
        (("gen", "--joint", "--fg-prompt", "a", "--bg-prompt", "b", "--model", "tiny", "--out-dir", blocker),
         "--out-dir"),
        (("gen", "--joint", "--fg-prompt", "a", "--bg-prompt", "b", "--model", "tiny", "--out-dir", tmp_path / "d",
          "--fg-name", "../escape.png"), "--fg-name"),
        (("gen", "--joint", "--fg-prompt", "a", "--bg-prompt", "b", "--model", "tiny", "--out-dir", tmp_path / "d",
          "--bg-name", "sub/bg.png"), "not a path"),
        (("gen", "--joint", "--fg-prompt", "a", "--bg-prompt", "b", "--model", "tiny", "--out-dir", tmp_path / "d",
          "--blended-name", ".."), "--blended-name"),
    ]
    before = _files(tmp_path)
    for argv, word in cases:
        _refused(*run_cli(*argv), word)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "x.png"]
    assert not no_load


def test_decompose_paths_checked_before_loading(tmp_path, no_load):
    img = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(img)
    (tmp_path / "fg.png").write_bytes(b"old")
    _refused(*run_cli("decompose", img, "--model", "tiny", "--out-dir", tmp_path), "exists")
    _refused(*run_cli("decompose", img, "--model", "tiny", "--out-dir", tmp_path / "d", "--fg-name", "/tmp/x.png"), "not a path")
    assert (tmp_path / "fg.png").read_bytes() == b"old" and not no_load


# ------------------------------------------------------------------ layer prompts, notices, Ctrl-C


def test_each_layer_png_carries_its_own_prompt(tmp_path):
    code, _, stderr = run_cli("gen", "--joint", "--fg-prompt", "red apple", "--bg-prompt", "wooden table", "--model",
                              "tiny", "--steps", "2", "--seed", "1", "--out-dir", tmp_path)
    assert code == 0, stderr
    for role, text in (("fg", "red apple"), ("bg", "wooden table"), ("blended", "red apple, wooden table")):
        with Image.open(tmp_path / f"{role}.png") as im:
            params, meta = im.info["parameters"], json.loads(im.info["layerctl"])
        assert params.split("\n")[0] == text, params
        assert meta["prompts"] == {"fg": "red apple", "bg": "wooden table", "blended": "red apple, wooden table"}


def test_toy_unknown_word_notice_once_per_joint_run(tmp_path):
    code, _, stderr = run_cli("gen", "--joint", "--fg-prompt", "cat", "--bg-prompt", "table", "--model", "toy",
                              "--steps", "2", "--seed", "1", "--out-dir", tmp_path)
    assert code == 0, stderr
    assert stderr.count("does not know") == 1 and "'cat'" in stderr


def test_very_long_prompt_says_how_many_chunks_were_used(tmp_path):
    # toy: 14 text tokens a chunk; 5000 words need 358 chunks, over the cap of 40 (long prompts below it are whole)
    code, _, stderr = run_cli("gen", "red cup " * 2500, "--model", "toy", "--steps", "2", "--seed", "1",
                              "--out", tmp_path / "o.png")
    assert code == 0, stderr
    line = next(ln for ln in stderr.splitlines() if "chunks" in ln)
    assert "20000 characters" in line and "358 chunks" in line and "only the first 40 chunks" in line
    code, _, stderr = run_cli("gen", "red cup " * 2500, "--model", "toy", "--steps", "1", "--seed", "1",
                              "--out", tmp_path / "q.png", "--quiet")
    assert code == 0 and "chunks" not in stderr, stderr  # --quiet silences it


def test_ctrl_c_says_what_was_kept(tmp_path, monkeypatch):
    from layerctl.session import Session

    real = Session.gen
    calls = []

    def gen_then_interrupt(self, req):
        calls.append(req)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, req)

    monkeypatch.setattr(Session, "gen", gen_then_interrupt)
    prompts = tmp_path / "p.txt"
    prompts.write_text("cup\nball\n")
    code, _, stderr = run_cli("gen", "--prompts-file", prompts, "--model", "tiny", "--steps", "2", "--seed", "1",
                              "--out", tmp_path / "o{i}.png")
    assert code == 130
    assert "interrupted" in stderr and str(tmp_path / "o0.png") in stderr and "half-written" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o0.png", "p.txt"]


def test_broken_diffusers_folder_diagnosis(tmp_path):
    from layerctl.backends.base import diagnose_diffusers_folder

    f = tmp_path / "m"
    f.mkdir()
    assert "model_index.json is missing" in diagnose_diffusers_folder(f)
    (f / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
                                                     "safety_checker": [None, None]}))
    assert "'unet' folder is missing" in diagnose_diffusers_folder(f)
    (f / "unet").mkdir()
    assert "config.json is missing" in diagnose_diffusers_folder(f)
    (f / "unet" / "config.json").write_text("{}")
    assert "no weights" in diagnose_diffusers_folder(f)
    (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert "diffusion_pytorch_model.safetensors is damaged" in diagnose_diffusers_folder(f)
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(f / "unet" / "diffusion_pytorch_model.safetensors"))
    assert diagnose_diffusers_folder(f) is None


# ------------------------------------------------------------------ the CLI itself


def test_help_is_fast_and_imports_nothing_heavy():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "layerctl", "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and "gen" in r.stdout and "info" not in r.stdout.split()
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines() if "|" in ln}
    assert not imported & {"torch", "diffusers", "pydantic", "numpy", "PIL"}, imported & {"torch", "diffusers", "pydantic"}
    assert time.perf_counter() - t0 < 10  # generous: the 0.3 s budget is measured in bench/cli_startup.py


def test_gen_help_lists_toy_and_model_default():
    code, out, _ = run_cli("gen", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "toy (the default" in flat and "model default" in flat and "(7)" not in flat
