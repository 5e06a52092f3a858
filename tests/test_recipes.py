"""`layerctl run`: YAML recipes — planning (no model), the runner, and real runs on the tiny backend.

The tiny model has random weights (its pictures are noise); these tests check
files, metadata, order and bookkeeping, not picture quality.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clihelp import free_port
from layerctl import recipes
from layerctl.errors import JobFailed, LayerctlError

REPO = Path(__file__).resolve().parents[1]
TINY = "defaults: {model: tiny, size: 64, steps: 2, tta: false}\n"


def write(tmp_path, text, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def cli(args, capsys):
    from layerctl.cli import main

    with pytest.raises(SystemExit) as ei:
        main(list(args))
    cap = capsys.readouterr()
    return ei.value.code, cap.out, cap.err


def plan(tmp_path, text, **kw):
    return recipes.plan_recipe(write(tmp_path, text), **kw)


def plan_error(tmp_path, text, **kw) -> str:
    with pytest.raises(LayerctlError) as ei:
        plan(tmp_path, text, **kw)
    assert ei.value.exit_code == 2
    return str(ei.value)


# ---------------------------------------------------------------- planning (no model)


def test_matrix_expansion_and_templates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan(
        tmp_path,
        TINY + "output_dir: o\njobs:\n  - name: cups\n    gen:\n      prompts: [Glass cup!, paper cup]\n"
        "      seeds: [5, 6, 7]\n      out: '{name}/{prompt_slug}/{seed}-{i:02d}.png'\n"
        "  - gen: {prompt: apple, seed_range: [10, 11], steps: 3}\n",
    )
    jobs = p.jobs
    assert len(jobs) == 8
    assert [(j.request.prompt, j.request.seed) for j in jobs[:6]] == [
        ("Glass cup!", 5), ("Glass cup!", 6), ("Glass cup!", 7), ("paper cup", 5), ("paper cup", 6), ("paper cup", 7)
    ]
    assert [str(j.outputs["rgba"]) for j in jobs[:2]] == ["o/cups/glass-cup/5-00.png", "o/cups/glass-cup/6-01.png"]
    assert str(jobs[5].outputs["rgba"]) == "o/cups/paper-cup/7-05.png"
    # defaults fill in, a job's own key wins
    assert all(j.request.width == 64 and j.request.model == "tiny" and j.request.tta is False for j in jobs)
    assert [j.request.steps for j in jobs] == [2] * 6 + [3, 3]
    assert [j.request.seed for j in jobs[6:]] == [10, 11]
    # unnamed job, 2 expansions -> default name and per-job template
    assert [j.label for j in jobs[6:]] == ["job2[0]", "job2[1]"]
    assert str(jobs[6].outputs["rgba"]) == "o/job2/0000-apple-10.png"
    assert [j.index for j in jobs] == list(range(8))


def test_prompts_file_and_size_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "r"
    sub.mkdir()
    (sub / "prompts.txt").write_text("# a comment\nred apple\n\n  blue cup  \n", encoding="utf-8")
    p = recipes.plan_recipe(
        write(sub, "defaults: {model: tiny, size: 128x64}\njobs:\n  - gen: {prompts_file: prompts.txt}\n"
              "  - gen: {prompt: x, size: [64, 192], height: 128}\n")
    )
    assert [j.request.prompt for j in p.jobs[:2]] == ["red apple", "blue cup"]
    assert (p.jobs[0].request.width, p.jobs[0].request.height) == (128, 64)
    assert (p.jobs[2].request.width, p.jobs[2].request.height) == (64, 128)  # own height wins over own size
    # a prompt file with only comments is an empty prompt list
    (sub / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    msg = str(pytest.raises(LayerctlError, recipes.plan_recipe, write(sub, "jobs:\n  - gen: {prompts_file: empty.txt}\n")).value)
    assert ":2: jobs[0].gen.prompts_file: the prompt list is empty" in msg


def test_scene_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "street.png").write_bytes(b"not really a png, but it exists")
    text = (
        TINY + "output_dir: s\njobs:\n"
        "  - name: psd\n    compose:\n      layers: ['${street.bg}', '${car.fg}', {path: '${cat.fg}', name: kitty}]\n"
        "  - name: cat\n    gen: {fg_prompt: a cat, bg: '${car.blended}'}\n"
        "  - name: car\n    gen: {fg_prompt: a car, bg: '${street.blended}'}\n"
        "  - name: street\n    gen: {fg: street.png, bg_prompt: a street}\n"
        "  - name: other\n    gen: {prompt: unrelated}\n"
    )
    p = plan(tmp_path, text)
    order = [j.name for j in p.jobs]
    # forward references run in dependency order; file order otherwise
    assert order == ["street", "car", "cat", "psd", "other"]
    by = {j.name: j for j in p.jobs}
    assert by["street"].mode == "fg2bg" and set(by["street"].outputs) == {"bg", "blended"}
    assert by["car"].request.bg == "s/street/blended.png"
    assert by["cat"].request.bg == "s/car/blended.png"
    assert by["car"].deps == {by["street"].index}
    layers = by["psd"].request.layers
    assert [l.path for l in layers] == ["s/street/bg.png", "s/car/fg.png", "s/cat/fg.png"]
    assert [l.name for l in layers] == [None, None, "kitty"]
    assert by["psd"].outputs == {"psd": Path("s/psd.psd")}
    # the given layer of a job can be referred to too
    p2 = plan(tmp_path, TINY + "jobs:\n  - {name: a, gen: {fg: street.png, bg_prompt: x}}\n  - {name: b, compose: {layers: ['${a.bg}', '${a.fg}']}}\n")
    assert p2.jobs[1].request.layers[1].path == str(tmp_path / "street.png")
    # one group for the scene, its own for the unrelated job; sharding keeps groups whole
    assert len({by[n].group for n in ("street", "car", "cat", "psd")}) == 1 and by["other"].group != by["psd"].group
    shards = [recipes.shard(p.jobs, r, 2) for r in range(2)]
    assert sorted(j.index for s in shards for j in s) == list(range(5))
    assert {j.name for j in shards[0]} == {"street", "car", "cat", "psd"} and [j.name for j in shards[1]] == ["other"]


def test_decompose_jobs_and_model_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "r"
    sub.mkdir()
    for n in ("a.png", "b.png", "w.safetensors"):
        (sub / n).write_bytes(b"x")
    p = recipes.plan_recipe(write(
        sub,
        "defaults: {model: tiny, out: 'flat/{name}-{seed}.png', layer_weights: w.safetensors}\njobs:\n"
        "  - {name: split, decompose: {images: [a.png, b.png], seeds: [1, 2], bg: b.png}}\n"
        "  - {name: again, decompose: {image: '${split[3].fg}'}}\n"
        "  - {name: plain, gen: {prompt: x}}\n"
        "  - {name: layered, gen: {joint: true, fg_prompt: x}}\n",
    ))
    split = [j for j in p.jobs if j.name == "split"]
    assert [(Path(j.request.image).name, j.request.seed) for j in split] == [("a.png", 1), ("a.png", 2), ("b.png", 1), ("b.png", 2)]
    assert [set(j.outputs) for j in split] == [{"fg"}] * 4  # bg is given
    assert str(split[0].outputs["fg"]) == "out/r/split/0000-a-1/fg.png"
    again = p.jobs[4]
    assert again.request.image == str(split[3].outputs["fg"]) and set(again.outputs) == {"fg", "bg"}
    assert again.deps == {split[3].index}
    # a default `out` template is for plain jobs; layer jobs keep their folder
    assert str(p.jobs[5].outputs["rgba"]) == "out/r/flat/plain-0.png"
    assert set(p.jobs[6].outputs) == {"fg", "bg", "blended"}
    # model files are recipe-relative and must exist before anything loads
    assert p.jobs[5].request.layer_weights == str(sub / "w.safetensors")
    msg = str(pytest.raises(LayerctlError, recipes.plan_recipe,
                            write(sub, "jobs:\n  - gen:\n      prompt: x\n      lora: [w.safetensors, nope.safetensors]\n")).value)
    assert ":4: jobs[0].gen.lora: lora: file not found: nope.safetensors" in msg


def test_indexed_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan(
        tmp_path,
        TINY + "jobs:\n  - {name: bgs, gen: {joint: true, fg_prompt: a, bg_prompt: b, seeds: [1, 2]}}\n"
        "  - {name: fgs, gen: {fg_prompt: c, bg: '${bgs[i].blended}', seeds: [3, 4]}}\n"
        "  - {name: one, gen: {fg_prompt: c, bg: '${bgs[1].blended}'}}\n",
    )
    bgs = [j for j in p.jobs if j.name == "bgs"]
    fgs = [j for j in p.jobs if j.name == "fgs"]
    assert [f.request.bg for f in fgs] == [str(b.outputs["blended"]) for b in bgs]
    assert [f.deps for f in fgs] == [{bgs[0].index}, {bgs[1].index}]
    assert p.jobs[-1].request.bg == str(bgs[1].outputs["blended"])
    # four groups would be wrong: fgs[i] joins bgs[i]; 'one' joins bgs[1]
    assert len({j.group for j in p.jobs}) == 2
    for world in (2, 3):
        got = [j.index for r in range(world) for j in recipes.shard(p.jobs, r, world)]
        assert sorted(got) == list(range(len(p.jobs)))


@pytest.mark.parametrize(
    "body, line, needle",
    [
        # wrong types, unknown keys (with a suggestion), misspelt top-level key
        ("jobs:\n  - gen:\n      prompt: x\n      steps: lots\n", 4, "jobs[0].gen.steps: Input should be a valid integer"),
        ("jobs:\n  - gen:\n      prompt: x\n      stpes: 3\n", 4, "unknown key 'stpes' (did you mean 'steps'?)"),
        ("defualts: {steps: 2}\njobs:\n  - gen: {prompt: x}\n", 1, "did you mean 'defaults'?"),
        ("jobs:\n  - gen: {prompt: x}\n    compose: {layers: [a.png]}\n", 2, "exactly one of gen, decompose, compose"),
        ("jobs:\n  - gen:\n      prompt: x\n      width: 100\n", 4, "multiple of 64"),
        # bad references
        ("jobs:\n  - {name: a, gen: {prompt: x}}\n  - gen:\n      fg_prompt: y\n      bg: ${b.blended}\n", 5, "unknown job 'b'"),
        ("jobs:\n  - {name: a, gen: {prompt: x}}\n  - gen:\n      fg_prompt: y\n      bg: ${a.blended}\n", 5, "a has no output 'blended' (it has: rgba)"),
        ("jobs:\n  - name: a\n    gen: {fg_prompt: y, bg: '${b.blended}'}\n  - name: b\n    gen: {fg_prompt: y, bg: '${a.blended}'}\n", 2, "cyclic references: a -> b -> a"),
        ("jobs:\n  - name: a\n    gen: {fg_prompt: y, bg: '${a.blended}'}\n", 3, "refers to its own output"),
        ("jobs:\n  - gen: {fg_prompt: y, bg: '${a blended}'}\n", 2, "bad reference"),
        # path escapes
        ("jobs:\n  - gen:\n      prompt: x\n      out: ../x.png\n", 4, "leaves output_dir"),
        ("jobs:\n  - gen:\n      prompt: x\n      out: /tmp/x.png\n", 4, "is absolute"),
        ("output_dir: /etc\njobs:\n  - gen: {prompt: x}\n", 1, "leaves the current folder"),
        ("jobs:\n  - gen:\n      prompt: x\n      out: '{name.__class__}.png'\n", 4, "unknown placeholder"),
        # Python tags, missing inputs, empty things, duplicates
        ("jobs:\n  - gen:\n      prompt: !!python/object/apply:os.system [echo hi]\n", 3, "Python tags are refused"),
        ("jobs:\n  - gen:\n      fg_prompt: y\n      bg: nothere.png\n", 4, "input file not found"),
        ("jobs:\n  - gen:\n      prompts: []\n", 3, "the prompt list is empty"),
        ("jobs: []\n", 1, "the job list is empty"),
        ("jobs:\n  - {name: a, gen: {prompt: x}}\n  - {name: a, gen: {prompt: y}}\n", 3, "used twice"),
        ("jobs:\n  - {name: a, gen: {prompt: x, out: same.png}}\n  - {name: b, gen: {prompt: y, out: same.png}}\n", 3, "both write"),
        ("jobs:\n  - gen:\n      prompt: x\n      seed_range: [0, 100000]\n", 2, "100,001 jobs"),
        ("jobs:\n  - gen: {fg_prompt: x}\n", 2, "needs --bg"),
    ],
)
def test_broken_recipes_exit_2_with_line(tmp_path, monkeypatch, capsys, body, line, needle):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, body)
    code, out, err = cli(["run", str(p), "--dry-run"], capsys)
    assert code == 2, err
    assert out == ""
    assert f"{p}:{line}: " in err, err
    assert needle in err, err
    assert "Traceback" not in err


def test_empty_recipe_and_escape_hatches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _out, err = cli(["run", str(write(tmp_path, "# nothing here\n")), "--dry-run"], capsys)
    assert code == 2 and "the recipe is empty" in err
    # --allow-outside lets a path leave output_dir; --force lets a matrix be huge
    p = plan(tmp_path, "jobs:\n  - gen: {prompt: x, out: ../x.png}\n", allow_outside=True)
    assert p.jobs[0].outputs["rgba"] == Path("out/r/../x.png")
    monkeypatch.setattr(recipes.planner, "MAX_JOBS", 40)  # the same check as at 100,000, cheaper to expand
    big = "jobs:\n  - gen: {prompt: x, seed_range: [0, 40], out: '{seed}.png'}\n"
    assert "41 jobs (more than 40" in plan_error(tmp_path, big)
    assert len(plan(tmp_path, big, force=True).jobs) == 41


def test_set_overrides_and_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, TINY + "jobs:\n  - gen: {prompts: [a, b]}\n")
    code, out, err = cli(["run", str(p), "--dry-run", "--json", "--set", "defaults.steps=9", "--set", "jobs.0.gen.seeds=[4, 5]",
                          "--output-dir", "elsewhere"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 4
    assert [r["seed"] for r in rows] == [4, 5, 4, 5] and all(r["request"]["steps"] == 9 for r in rows)
    assert rows[0]["outputs"]["rgba"] == "elsewhere/job1/0000-a-4.png"
    code, _out, err = cli(["run", str(p), "--dry-run", "--set", "defaults.stepz=9"], capsys)
    assert code == 2 and "--set defaults.stepz=9: defaults.stepz: unknown key 'stepz' (did you mean 'steps'?)" in err


def test_dry_run_writes_nothing_and_loads_no_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import layerctl.api

    def boom(*a, **k):
        raise AssertionError("dry run created a Session")

    monkeypatch.setattr(layerctl.api, "Session", boom)
    p = write(tmp_path, TINY + "output_dir: o\njobs:\n  - gen: {prompts: [a, b], seeds: [1, 2, 3]}\n")
    code, out, err = cli(["run", str(p), "--dry-run"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["#", "job", "mode", "seed", "prompt", "outputs", "needs"]
    assert len(lines) == 1 + 6 + 1 and "6 jobs" in lines[-1]
    assert not (tmp_path / "o").exists()
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]


def test_template_checks():
    recipes.check_template("{name}/{prompt_slug}-{seed:05d}-{i}.png")
    for bad in ["{name.__class__}", "{seed[0]}", "{i!r}", "{prompt}", "{", "{seed:{i}}"]:
        with pytest.raises(ValueError):
            recipes.check_template(bad)
    assert recipes.slug("A glass cup, HIGH quality!!") == "a-glass-cup-high-quality"
    assert recipes.slug("!!!") == "image"  # the one fallback, the same as gen's {prompt_slug}


# ---------------------------------------------------------------- the runner, with a stand-in session


class FakeSession:
    """Writes small PNGs with layerctl metadata like api.Session; fails on prompts containing FAIL."""

    def __init__(self, calls):
        self.calls = calls

    def gen(self, req):
        from layerctl.api import OutputRecord
        from layerctl.io.imageio import save_png

        self.calls.append(req.prompt or req.fg_prompt)
        if "FAIL" in (req.prompt or ""):
            raise JobFailed("the model said no")
        mode = req.mode()
        meta = {"prompt": req.prompt, "seed": req.seed, "steps": req.steps, "model": req.model, "mode": mode,
                "size": [req.width, req.height]}
        recs = []
        for role, path in recipes.gen_outputs(req, mode).items():
            save_png(path, np.full((4, 4, 4), req.seed % 256, np.uint8), dict(meta, role=role), overwrite=req.overwrite)
            recs.append(OutputRecord(role, str(path), req.seed))
        return recs

    def close(self):
        pass


def test_continue_on_error_and_dependents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan(
        tmp_path,
        TINY + "jobs:\n  - {name: a, gen: {prompt: one}}\n  - {name: bad, gen: {joint: true, prompt: FAIL, fg_prompt: x}}\n"
        "  - {name: child, gen: {fg_prompt: y, bg: '${bad.blended}'}}\n  - {name: c, gen: {prompt: three}}\n",
    )
    calls = []
    res = recipes.run_plan(p, p.jobs, lambda: FakeSession(calls), continue_on_error=True)
    assert [(r.job, r.status) for r in res] == [("a", "done"), ("bad", "failed"), ("child", "failed"), ("c", "done")]
    assert "the model said no" in res[1].reason and "needs job 1" in res[2].reason
    assert calls == ["one", "FAIL", "three"]  # the dependent job never ran
    # without --continue-on-error the run stops at the failure (files of earlier jobs stay)
    shutil.rmtree(tmp_path / "out")
    calls.clear()
    res = recipes.run_plan(p, p.jobs, lambda: FakeSession(calls))
    assert [r.status for r in res] == ["done", "failed", "not run", "not run"] and calls == ["one", "FAIL"]
    assert (tmp_path / "out/r/a.png").exists()


def test_resume_and_existing_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = TINY + "jobs:\n  - {name: b, gen: {prompts: [p1, p2], seeds: [1, 2]}}\n  - {name: s, gen: {joint: true, fg_prompt: f, bg_prompt: g}}\n"
    p = plan(tmp_path, text)
    calls = []
    recipes.run_plan(p, p.jobs[:2], lambda: FakeSession(calls))
    assert calls == ["p1", "p1"]
    # existing outputs: an error before anything runs, unless --resume (or overwrite)
    with pytest.raises(LayerctlError, match="2 outputs exist already"):
        recipes.preflight(p.jobs, resume=False)
    # a half-finished layer job (one of its three files) is redone, not skipped
    s = p.jobs[-1]
    FakeSession([]).gen(s.request.model_copy(update={"out_dir": str(tmp_path / "tmpdir")}))
    os.makedirs(s.outputs["fg"].parent, exist_ok=True)
    shutil.copy(tmp_path / "tmpdir/fg.png", s.outputs["fg"])
    mtimes = {j.index: j.outputs["rgba"].stat().st_mtime_ns for j in p.jobs[:2]}
    calls.clear()
    res = recipes.run_plan(p, p.jobs, lambda: FakeSession(calls), resume=True)
    assert [r.status for r in res] == ["skipped", "skipped", "done", "done", "done"]
    assert calls == ["p2", "p2", "f"]
    assert {j.index: j.outputs["rgba"].stat().st_mtime_ns for j in p.jobs[:2]} == mtimes
    # outputs made by a different job (other settings, same file names) are not silently kept
    p3 = plan(tmp_path, text.replace("seeds: [1, 2]", "seeds: [1, 2], steps: 5"))
    with pytest.raises(LayerctlError, match="its steps is 2, the job's is 5"):
        recipes.preflight(p3.jobs, resume=True)


# ---------------------------------------------------------------- real runs on the tiny backend

BATCH = TINY + "output_dir: o\njobs:\n  - name: cups\n    gen:\n      prompts: [glass cup, paper cup]\n      seeds: [11, 12, 13]\n"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


class SharedSession:
    """One api.Session for every in-process tiny run of this module (the model loads once).

    close() restores the layer weights (what run_plan relies on) but keeps the model loaded.
    """

    def __init__(self):
        from layerctl.api import Session

        self.session = Session(quiet=True)
        self.created = 0

    def __call__(self, quiet: bool = False):
        self.created += 1
        return self

    def __getattr__(self, name):
        return getattr(self.session, name)

    def close(self):
        for kit in self.session.models.kits():
            kit.clear_weights()


@pytest.fixture(scope="module")
def shared_session():
    # One thread, like the subprocesses here (and each process under accelerate/torchrun): the
    # pixels of a float model depend on the reduction order, so on the thread count.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SharedSession()
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_session(shared_session, monkeypatch):
    """`layerctl run` in this process uses the shared session."""
    import layerctl.api

    monkeypatch.setattr(layerctl.api, "Session", shared_session)
    return shared_session


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    """The 2 prompts x 3 seeds recipe: killed midway, then finished with --resume."""
    d = tmp_path_factory.mktemp("batch")
    (d / "r.yaml").write_text(BATCH, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerctl", "run", "r.yaml", "--quiet"], cwd=d, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out = d / "o" / "cups"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(list(out.glob("[!.]*.png"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("[!.]*.png")}
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    return d, first, leftovers


def test_batch_kill_and_resume(batch_run, tiny_session, monkeypatch, capsys):
    d, first, leftovers = batch_run
    assert 2 <= len(first) < 6, first
    monkeypatch.chdir(d)
    code, out, err = cli(["run", "r.yaml", "--resume", "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in rows].count("skipped") == len(first)
    assert [r["status"] for r in rows].count("done") == 6 - len(first)
    files = sorted((d / "o" / "cups").glob("[!.]*.png"))
    assert len(files) == 6
    # nothing redone: the files of the killed run are untouched
    assert {n: (d / "o" / "cups" / n).stat().st_mtime_ns for n in first} == first
    from layerctl.io.imageio import read_metadata

    seen = set()
    for f in files:
        meta = read_metadata(f)
        seen.add((meta["prompt"], meta["seed"]))
        assert meta["steps"] == 2 and meta["size"] == [64, 64] and meta["model"] == "tiny" and meta["mode"] == "rgba"
        assert _pixels(f).shape == (64, 64, 4)
    assert seen == {(p, s) for p in ("glass cup", "paper cup") for s in (11, 12, 13)}
    assert "done" in err and "skipped" in err  # the summary table
    # a killed run leaves no half-written PNG under an output name (atomic writes); --resume
    # removes the hidden temporary file a killed write may leave
    assert not [p.name for p in (d / "o" / "cups").iterdir() if p.name.startswith(".")]
    # a second --resume does nothing
    code, out, err = cli(["run", "r.yaml", "--resume", "--json"], capsys)
    assert code == 0 and [json.loads(line)["status"] for line in out.splitlines()] == ["skipped"] * 6


def test_continue_on_error_real(tmp_path, tiny_session, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.safetensors").write_text("not a weights file", encoding="utf-8")
    p = write(
        tmp_path,
        TINY + "jobs:\n  - {name: a, gen: {prompt: one}}\n  - {name: b, gen: {prompt: two, layer_weights: broken.safetensors}}\n"
        "  - {name: c, gen: {prompt: three}}\n",
    )
    code, out, err = cli(["run", str(p), "--continue-on-error"], capsys)
    assert code == 1
    assert out.splitlines() == ["out/r/a.png", "out/r/c.png"]
    assert (tmp_path / "out/r/a.png").exists() and (tmp_path / "out/r/c.png").exists()
    assert not (tmp_path / "out/r/b.png").exists()
    assert "2 done, 0 skipped, 1 failed" in err and "broken.safetensors" in err


def test_scene_psd_and_weights_restored(tmp_path, shared_session, monkeypatch):
    """bg + fg (joint) -> another fg on the new blend -> a 3-layer PSD; the base model is not
    reloaded and its weights are the originals again after two modes' layer weights were applied."""
    import torch

    import layerctl.backends.registry
    from layerctl.io.psd import open_psd

    monkeypatch.chdir(tmp_path)
    p = plan(
        tmp_path,
        TINY + "jobs:\n"
        "  - {name: park, gen: {joint: true, bg_prompt: a park, fg_prompt: a bench, seed: 3}}\n"
        "  - {name: cat, gen: {fg_prompt: a cat, bg: '${park.blended}', seed: 4}}\n"
        "  - {name: scene, compose: {out: scene.psd, layers: ['${park.bg}', {path: '${park.fg}', name: bench}, {path: '${cat.fg}', name: cat}]}}\n"
        "  - {name: split, decompose: {image: '${cat.blended}', bg: '${park.blended}', seed: 5}}\n",
    )
    model = shared_session.model(p.jobs[0].request)  # loaded once for the module
    loads = []
    real_load = layerctl.backends.registry.load_model
    monkeypatch.setattr(layerctl.backends.registry, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    procs_before = {k: type(v) for k, v in model.unet.attn_processors.items()}
    modes_seen = []
    real_gen = shared_session.session.gen

    def gen(req):  # between jobs: the previous job's layer weights are swapped, the model stays
        modes_seen.append((req.mode(), id(shared_session.model(req))))
        return real_gen(req)

    real_decompose = shared_session.session.decompose

    def decompose(req):
        modes_seen.append(("decompose", id(shared_session.model(req))))
        return real_decompose(req)

    monkeypatch.setattr(shared_session.session, "gen", gen)
    monkeypatch.setattr(shared_session.session, "decompose", decompose)
    res = recipes.run_plan(p, p.jobs, shared_session)
    assert [r.status for r in res] == ["done"] * 4, [r.reason for r in res]
    assert loads == [] and modes_seen == [("joint", id(model)), ("bg2fg", id(model)), ("decompose", id(model))]
    assert (tmp_path / "out/r/split/fg.png").exists()
    after = model.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == procs_before
    out = tmp_path / "out" / "r"
    for f in ("park/fg.png", "park/bg.png", "park/blended.png", "cat/fg.png", "cat/blended.png", "scene.psd"):
        assert (out / f).exists(), f
    doc = open_psd(out / "scene.psd")
    assert [layer.name for layer in doc.layers] == ["bg", "bench", "cat"]
    assert np.array_equal(doc.layers[2].pixels, _pixels(out / "cat/fg.png"))
    assert np.array_equal(doc.layers[0].pixels, _pixels(out / "park/bg.png"))


def test_accelerate_two_processes_match_one(batch_run, tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo): each job once, the same pixels as one process."""
    pytest.importorskip("accelerate")
    d, _first, _ = batch_run
    ref = d / "o" / "cups"
    if len(list(ref.glob("[!.]*.png"))) < 6:
        pytest.skip("needs the finished single-process batch (test_batch_kill_and_resume)")
    (tmp_path / "r.yaml").write_text(BATCH, encoding="utf-8")
    # without GPUs, --multi_gpu is what makes accelerate start N processes (torchrun); layerctl asks
    # accelerate for a CPU (gloo) process group when no GPU is there
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "layerctl", "run", "r.yaml", "--json", "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted(row["index"] for row in rows) == list(range(6))  # each job exactly once
    assert {row["process"] for row in rows} == {0, 1}
    got = sorted((tmp_path / "o" / "cups").glob("*.png"))
    assert [f.name for f in got] == sorted(f.name for f in ref.glob("[!.]*.png"))
    for f in got:
        assert np.array_equal(_pixels(f), _pixels(ref / f.name)), f.name


def test_merged_weights_swapped_and_restored_xl(tmp_path, shared_session, monkeypatch):
    """tiny-xl merges its layer weights into the UNet (W += delta): rgba -> fg2bg -> rgba in one run
    swaps them without reloading, the two rgba jobs see identical weights, and the end state is the original."""
    import torch

    import layerctl.backends.registry

    monkeypatch.chdir(tmp_path)
    p = plan(
        tmp_path,
        "defaults: {model: tiny-xl, size: 64, steps: 2, tta: false}\njobs:\n"
        "  - {name: a, gen: {prompt: a cup, seed: 1}}\n"
        "  - {name: b, gen: {fg: '${a.rgba}', bg_prompt: a table, seed: 2}}\n"
        "  - {name: c, gen: {prompt: a cup, seed: 3}}\n",
    )
    model = shared_session.model(p.jobs[0].request)
    loads = []
    real_load = layerctl.backends.registry.load_model
    monkeypatch.setattr(layerctl.backends.registry, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    original = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    during = []
    real_gen = shared_session.session.gen

    def gen(req):
        out = real_gen(req)
        during.append({k: v.detach().clone() for k, v in model.unet.state_dict().items()})
        return out

    monkeypatch.setattr(shared_session.session, "gen", gen)
    res = recipes.run_plan(p, p.jobs, shared_session)
    assert [r.status for r in res] == ["done"] * 3, [r.reason for r in res]
    assert loads == []
    changed = [k for k in original if not torch.equal(original[k], during[0][k])]
    assert changed  # the rgba weights really were merged in
    assert any(not torch.equal(during[0][k], during[1][k]) for k in original)  # fg2bg's are others
    assert all(torch.equal(during[0][k], during[2][k]) for k in original)  # rgba again: bit for bit
    after = model.unet.state_dict()
    assert all(torch.equal(original[k], after[k]) for k in original)
    assert (tmp_path / "out/r/b/bg.png").exists()


def test_recipe_on_stdin_and_safe_default_folder(tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("name: ../../up here\njobs:\n  - gen: {prompt: x}\n"))
    code, out, err = cli(["run", "-", "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["outputs"]["rgba"] == "out/up-here/job1.png"
    monkeypatch.setattr(sys, "stdin", io.StringIO("jobs:\n  - gen: {prompt: x, stpes: 2}\n"))
    code, out, err = cli(["run", "-", "--dry-run"], capsys)
    assert code == 2 and "<stdin>:2: jobs[0].gen.stpes: unknown key 'stpes' (did you mean 'steps'?)" in err


# ---------------------------------------------------------------- containment (issue 18)

_ESCAPE_JOBS = {
    "gen": {"joint": True, "fg_prompt": "a", "bg_prompt": "b"},
    "gen_rgba": {"prompt": "a"},
    "decompose": {"image": "in.png"},
    "compose": {"layers": ["in.png"]},
}
_ESCAPE_KEYS = (
    [("gen", k) for k in ("fg_name", "bg_name", "blended_name", "out_dir", "psd")]
    + [("gen_rgba", k) for k in ("out", "out_dir", "psd")]
    + [("decompose", k) for k in ("fg_name", "bg_name", "blended_name", "out_dir", "psd")]
    + [("compose", "out")]
)
_ESCAPES = [
    (kind, key, form, place)
    for kind, key in _ESCAPE_KEYS
    for form in ("dotdot", "absolute", "symlink")
    for place in ("job", "defaults", "set")
    if not (place == "defaults" and kind == "compose")  # compose jobs take no defaults
]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind, key, form, place", _ESCAPES)
def test_no_recipe_path_leaves_output_dir(tmp_path, monkeypatch, capsys, kind, key, form, place):
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "x.png").write_bytes(b"precious")
    (outside / "fg.png").write_bytes(b"precious too")
    (work / "in.png").write_bytes(b"x")
    (work / "out" / "job1").mkdir(parents=True)
    (work / "out" / "link").symlink_to(outside, target_is_directory=True)  # for out / psd / out_dir
    (work / "out" / "job1" / "link").symlink_to(outside, target_is_directory=True)  # for layer file names
    folder = key == "out_dir"
    value = {
        "dotdot": "../.." if folder else "../../x.png",
        "absolute": str(outside) if folder else str(outside / "x.png"),
        "symlink": "link" if folder else "link/x.png",
    }[form]
    step = dict(_ESCAPE_JOBS[kind])
    section = "compose" if kind == "compose" else ("gen" if kind.startswith("gen") else "decompose")
    defaults = {"model": "tiny", "size": 64, "steps": 1, "tta": False}
    args = []
    if place == "job":
        step[key] = value
    elif place == "defaults":
        defaults[key] = value
    else:
        args = ["--set", f"jobs.0.{section}.{key}={json.dumps(value)}"]
    text = f"defaults: {json.dumps(defaults)}\noutput_dir: out\njobs:\n  - name: job1\n    {section}: {json.dumps(step)}\n"
    if kind == "compose":
        text = text.replace(f"defaults: {json.dumps(defaults)}\n", "")
    write(work, text)
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    code, out, err = cli(["run", "r.yaml", "--overwrite", *args], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "leaves output_dir" in err or "is absolute" in err, err
    assert out == ""
    assert _tree(tmp_path) == before  # nothing written, nothing existing changed


def test_allow_outside_still_lets_layer_names_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan(tmp_path, "jobs:\n  - {name: s, gen: {joint: true, fg_prompt: a, fg_name: ../x.png}}\n", allow_outside=True)
    assert p.jobs[0].outputs["fg"] == Path("out/r/s/../x.png")
    # a name that stays inside is fine, sub-folders included
    p = plan(tmp_path, "jobs:\n  - {name: s, gen: {joint: true, fg_prompt: a, fg_name: sub/f.png}}\n")
    assert p.jobs[0].outputs["fg"] == Path("out/r/s/sub/f.png")


def test_one_bad_default_over_many_jobs_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = "defaults: {cfg: -1, steps: 0}\njobs:\n  - gen: {prompts: [a, b], seed_range: [0, 4999], out: '{i}.png'}\n"
    msg = plan_error(tmp_path, body)
    lines = msg.splitlines()
    assert lines[0] == f"{tmp_path / 'r.yaml'}: 2 problems:", msg
    assert len(lines) == 3, msg
    assert any(ln.endswith("defaults.cfg: cfg must be >= 0 (got -1.0) (in 10,000 jobs)") for ln in lines), msg
    assert any("defaults.steps: steps must be > 0 (got 0) (in 10,000 jobs)" in ln for ln in lines), msg
    # a problem of one job of a matrix keeps that job's label
    one = plan_error(tmp_path, "jobs:\n  - {name: a, gen: {prompts: [x, y]}}\n  - {name: b, gen: {fg_prompt: z, seeds: [1, 2, 3], bg: '${a[i].rgba}'}}\n")
    assert "b[2]: b has no job [2]" in one or "b[2]: a has no job [2]" in one, one


def test_ctrl_c_during_run_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a recipe: exit 130, the finished job's file kept, and the message says
    how many jobs finished and that --resume continues (no traceback)."""
    import layerctl.api

    class InterruptedSession(FakeSession):
        def __init__(self, quiet=False):
            super().__init__([])

        def gen(self, req):
            if len(self.calls) == 1:
                raise KeyboardInterrupt
            return super().gen(req)

    monkeypatch.setattr(layerctl.api, "Session", InterruptedSession)
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, TINY + "jobs:\n  - {name: a, gen: {prompt: one}}\n  - {name: b, gen: {prompt: two}}\n"
                              "  - {name: c, gen: {prompt: three}}\n")
    code, out, err = cli(["run", str(p)], capsys)
    assert code == 130
    assert out.splitlines() == ["out/r/a.png"]
    line = next(ln for ln in err.splitlines() if "interrupted" in ln)
    assert "after 1 of 3 jobs" in line and f"layerctl run {p} --resume" in line
    assert "Traceback" not in err
    assert sorted(x.name for x in (tmp_path / "out/r").iterdir()) == ["a.png"]
