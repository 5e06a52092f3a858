"""Prompts files and recipes saved by Windows Notepad (issue 18): a UTF-8 byte-order mark and
CRLF line ends must not reach a prompt, a recipe value or a PNG's metadata."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from clihelp import run_cli
from layerctl.errors import LayerctlError

BOM = b"\xef\xbb\xbf"


def _notepad(path, text: str, encoding: str = "utf-8"):
    """Write `text` as Notepad does: CRLF line ends, a byte-order mark first."""
    data = text.replace("\n", "\r\n").encode(encoding)
    path.write_bytes((BOM + data) if encoding == "utf-8" else data)
    return path


def _clean(values):
    return all("\ufeff" not in v and "\r" not in v for v in values)


def test_read_prompts_drops_the_bom_and_crlf(tmp_path, monkeypatch):
    from layerctl.commands.gen import read_prompts

    p = _notepad(tmp_path / "p.txt", "red apple\n# a comment\n\n  blue cup  \n")
    assert p.read_bytes().startswith(BOM) and b"\r\n" in p.read_bytes()
    assert read_prompts(str(p)) == ["red apple", "blue cup"]
    # Notepad's "Unicode" (UTF-16 little-endian with its byte-order mark)
    u = _notepad(tmp_path / "u.txt", "Ёжик\nглиняная чашка\n", encoding="utf-16")
    assert read_prompts(str(u)) == ["Ёжик", "глиняная чашка"]
    # stdin, where the BOM arrives as a character
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffred apple\r\nblue cup\r\n"))
    assert read_prompts("-") == ["red apple", "blue cup"]


def test_prompts_file_that_is_not_text_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"red apple\n\xc3\x28 oops\n")  # a broken UTF-8 sequence on line 2
    code, out, err = run_cli("gen", "--prompts-file", bad, "--model", "tiny", "--out", tmp_path / "x_{i}.png")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and ":2: not UTF-8 text" in err and "Traceback" not in err
    assert not list(tmp_path.glob("x_*"))


def test_gen_prompts_file_from_notepad_metadata_has_no_bom(tmp_path):
    p = _notepad(tmp_path / "prompts.txt", "red apple\nblue cup\n")
    code, out, err = run_cli(
        "gen", "--prompts-file", p, "--model", "tiny", "--out", tmp_path / "img_{i}.png", "--seed", "1",
        "--steps", "1", "--no-tta", "--width", "64", "--height", "64",
    )
    assert code == 0, err
    files = sorted(tmp_path.glob("img_*.png"))
    assert len(files) == 2
    with Image.open(files[0]) as im:
        meta = json.loads(im.info["layerctl"])
        params = im.info["parameters"]
    assert meta["prompt"] == "red apple"
    assert params.startswith("red apple\nNegative prompt:")
    assert "\ufeff" not in params and "\r" not in params and "\ufeff" not in im.info["layerctl"]


def test_recipe_from_notepad_plans_clean_values(tmp_path, monkeypatch):
    from layerctl import recipes

    monkeypatch.chdir(tmp_path)
    _notepad(tmp_path / "prompts.txt", "glass cup\npaper cup\n")
    r = _notepad(
        tmp_path / "r.yaml",
        "defaults: {model: tiny, size: 64}\n"
        "jobs:\n"
        "  - gen:\n      prompt: red apple\n      negative: |\n        blurry\n        ugly\n"
        "  - gen: {prompts_file: prompts.txt}\n",
    )
    plan = recipes.plan_recipe(r)
    prompts = [job.request.prompt for job in plan.jobs]
    assert prompts == ["red apple", "glass cup", "paper cup"]
    assert plan.jobs[0].request.negative == "blurry\nugly\n"
    assert _clean(prompts) and _clean([plan.jobs[0].request.negative])


def test_yaml_text_with_a_bom_and_crlf(tmp_path):
    from layerctl.io import yamlio

    data, _ = yamlio.loads_yaml("\ufeffa: x\r\nb: |\r\n  one\r\n  two\r\n", "<stdin>")
    assert data == {"a": "x", "b": "one\ntwo\n"}
    p = _notepad(tmp_path / "s.yaml", "k: value\nlist: [a, b]\n")
    data, loc = yamlio.load_yaml(p)
    assert data == {"k": "value", "list": ["a", "b"]}
    assert loc.where(("k",)).endswith(":1")  # line numbers still count from the first line


def test_compose_stack_from_notepad(tmp_path, capsys):
    import numpy as np

    Image.fromarray(np.full((4, 4, 4), 200, np.uint8), "RGBA").save(tmp_path / "a.png")
    s = _notepad(tmp_path / "stack.yaml", "layers:\n  - {path: a.png, name: Слой}\n")
    code, out, err = run_cli("compose", s, "--list", "--json")
    assert code == 0, err
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["Слой"]


@pytest.mark.parametrize("text", ["", "\ufeff", "\ufeff# only a comment\r\n"])
def test_empty_prompts_files_are_still_refused(tmp_path, text):
    from layerctl.commands.gen import read_prompts

    p = tmp_path / "e.txt"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(LayerctlError, match="no prompts"):
        read_prompts(str(p))
