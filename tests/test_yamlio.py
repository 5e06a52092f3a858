"""layerctl.io.yamlio: safe YAML loading with line numbers, schema errors that say where."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import pytest
from pydantic import BaseModel, ConfigDict, Field

from layerctl.io import yamlio
from layerctl.errors import LayerctlError


class Train(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = 10
    lr: float = 1e-4
    size: Optional[int] = None


class GenJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["gen"] = "gen"
    prompt: str
    steps: int = 1


class ComposeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["compose"]
    layers: list[str]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    train: Train = Train()
    jobs: list[Annotated[Union[GenJob, ComposeJob], Field(discriminator="kind")]] = []


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _err(fn, *a, **kw) -> str:
    with pytest.raises(LayerctlError) as ei:
        fn(*a, **kw)
    assert ei.value.exit_code == 2
    return str(ei.value)


def test_locator_lines(tmp_path):
    p = _write(tmp_path, "name: x\ntrain:\n  steps: 3\n\n  lr: 0.1\njobs:\n  - kind: gen\n  - prompt: b\n    steps: 2\n")
    data, loc = yamlio.load_yaml(p)
    assert data["train"] == {"steps": 3, "lr": 0.1}
    assert loc.line(("train", "steps")) == 3
    assert loc.line(("train", "lr")) == 5
    assert loc.line(("jobs", 1)) == 8
    assert loc.line(("jobs", 1, "steps")) == 9
    # unknown paths fall back to the nearest ancestor
    assert loc.line(("jobs", 1, "nope", "deeper")) == 8
    assert loc.where(("train", "steps")) == f"{p}:3"


def test_every_error_with_line_and_path(tmp_path):
    p = _write(
        tmp_path,
        "name: x\n"  # 1
        "train:\n"  # 2
        "  stpes: 3\n"  # 3
        "  lr: fast\n"  # 4
        "jobs:\n"  # 5
        "  - {kind: gen, prompt: a,\n"  # 6
        "     setps: 4}\n"  # 7
        "  - kind: compose\n"  # 8
        "    layers: 5\n"  # 9
        "  - kind: gen\n",  # 10
    )
    msg = _err(yamlio.load_model_yaml, p, Config)
    lines = msg.splitlines()
    assert lines[0] == f"{p}: 5 problems:"
    assert lines[1] == f"{p}:3: train.stpes: unknown key 'stpes' (did you mean 'steps'?)"
    assert lines[2].startswith(f"{p}:4: train.lr: ") and "'fast'" in lines[2]
    assert lines[3] == f"{p}:7: jobs[0].setps: unknown key 'setps' (did you mean 'steps'?)"
    assert lines[4].startswith(f"{p}:9: jobs[1].layers: ")
    assert lines[5] == f"{p}:10: jobs[2].prompt: required key missing"


def test_suggestion_uses_the_right_model(tmp_path):
    # 'layer' is close to ComposeJob.layers, not to anything at the top level -> hint from the job model
    p = _write(tmp_path, "jobs:\n  - kind: compose\n    layers: [a]\n    layer: b\n")
    msg = _err(yamlio.load_model_yaml, p, Config)
    assert f"{p}:4: jobs[0].layer: unknown key 'layer' (did you mean 'layers'?)" in msg
    # no close key: no hint, but the allowed keys are listed (small models)
    p = _write(tmp_path, "zzz: 1\n")
    msg = _err(yamlio.load_model_yaml, p, Config)
    assert "did you mean" not in msg and "allowed: jobs, name, train" in msg


@pytest.mark.parametrize(
    "text, line, needle",
    [
        ("a: 1\nb: !!python/object/apply:os.system [echo hi]\n", 2, "python/object/apply:os.system"),
        ("a: !!python/name:os.system\n", 1, "Python tags"),
        ("a:\n  - 1\n  - !custom x\n", 3, "custom tags"),
        ("a: 1\nb:\n  c: 2\n  c: 3\n", 4, "duplicate key 'c' (first given on line 3)"),
        ("a: [1, 2\nb: 3\n", None, "YAML syntax error"),
        ("a: b\n  c: d\n", 2, "YAML syntax error"),
    ],
)
def test_bad_yaml(tmp_path, text, line, needle):
    p = _write(tmp_path, text)
    msg = _err(yamlio.load_yaml, p)
    assert needle in msg
    if line is not None:
        assert msg.startswith(f"{p}:{line}: ")
    assert "\n" not in msg


def test_python_tag_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = _write(tmp_path, f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    _err(yamlio.load_yaml, p)
    assert not marker.exists()


def test_alias_bomb_refused(tmp_path):
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 8):
        prev, cur = chr(96 + i), chr(97 + i)
        text += f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    p = _write(tmp_path, text)
    assert "expands to more than" in _err(yamlio.load_yaml, p)
    # small aliases and merge keys are fine
    p = _write(tmp_path, "base: &b {steps: 2}\ntrain:\n  <<: *b\n  lr: 0.5\n")
    data, loc = yamlio.load_yaml(p)
    assert data["train"] == {"steps": 2, "lr": 0.5}


def test_empty_missing_not_utf8(tmp_path):
    assert "empty" in _err(yamlio.load_model_yaml, _write(tmp_path, "# only a comment\n"), Config)
    assert "file not found" in _err(yamlio.load_yaml, tmp_path / "nope.yaml")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"a: 1\nb: \xff\xfe\n")
    assert _err(yamlio.load_yaml, p).startswith(f"{p}:2: not UTF-8")
    assert "expected a mapping" in _err(yamlio.load_model_yaml, _write(tmp_path, "- 1\n- 2\n"), Config)


def test_overrides(tmp_path):
    p = _write(tmp_path, "train:\n  steps: 3\njobs:\n  - kind: gen\n    prompt: a\n")
    cfg = yamlio.load_model_yaml(p, Config, ["train.steps=7", "train.size=64", "name=hello world", "jobs.0.steps=5"])
    assert cfg.train.steps == 7 and cfg.train.size == 64 and cfg.name == "hello world"
    assert cfg.jobs[0].steps == 5
    # values are YAML: a list, null
    cfg = yamlio.load_model_yaml(p, Config, ["jobs=[{kind: gen, prompt: x}, {kind: compose, layers: [a, b]}]", "train.size=null"])
    assert cfg.jobs[1].layers == ["a", "b"] and cfg.train.size is None
    # a bad override is named as such (not as a line of the file)
    msg = _err(yamlio.load_model_yaml, p, Config, ["train.steps=many"])
    assert msg.startswith("--set train.steps=many: train.steps: ")
    msg = _err(yamlio.load_model_yaml, p, Config, ["train.stepz=1"])
    assert "did you mean 'steps'" in msg and msg.startswith("--set train.stepz=1:")
    assert "KEY=VALUE" in _err(yamlio.load_model_yaml, p, Config, ["train.steps"])
    assert "no index 3" in _err(yamlio.load_model_yaml, p, Config, ["jobs.3.steps=1"])
    assert "single value" in _err(yamlio.load_model_yaml, p, Config, ["train.steps.x=1"])
    msg = _err(yamlio.load_model_yaml, p, Config, ["name.x=1"])  # creates name: {x: 1}
    assert msg.startswith("--set name.x=1: name: ")
    # python tags in an override are refused too
    assert "not allowed" in _err(yamlio.load_model_yaml, p, Config, ["name=!!python/name:os.system"])


def test_format_path():
    assert yamlio.format_path(("jobs", 2, "steps")) == "jobs[2].steps"
    assert yamlio.format_path(()) == ""
