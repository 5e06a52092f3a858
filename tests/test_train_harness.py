"""training/harness: the parts train-vae and train-lora share (loader seeding, checkpoints, the log)."""

from __future__ import annotations

import json

import pytest
import torch

from layerctl.errors import LayerctlError
from layerctl.training import harness as H


class _Positions:
    """A stream whose item p is p."""

    def __getitem__(self, p):
        return p


def test_loader_never_draws_from_the_global_rng():
    """Starting to iterate the training loader leaves torch's global RNG where it was (so a resumed
    run, which restores that RNG and starts a new iterator, continues like an uninterrupted one)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batches = iter(H.make_loader(_Positions(), 2, start=2, rank=0, world=1, workers=0, seed=7, collate=list))
    assert next(batches) == [4, 5] and next(batches) == [6, 7]
    assert torch.equal(torch.rand(3), expected)


def test_rng_state_round_trips():
    import random

    torch.manual_seed(5)
    random.seed(5)
    st = H.rng_state()
    a = (torch.rand(2), random.random())
    H.set_rng_state(st)
    b = (torch.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def _ckpt(tmp_path, step=3):
    folder = H.write_checkpoint(tmp_path, step, lambda d: (d / "w.bin").write_bytes(b"w"), {"x": torch.ones(2)}, {"note": "n"}, keep_last=2)
    return folder


def test_checkpoints_are_written_listed_pruned_and_loaded(tmp_path):
    for s in (1, 2, 3):
        _ckpt(tmp_path, s)
    assert [(s, p.name) for s, p in H.list_checkpoints(tmp_path)] == [(2, "step-0000002"), (3, "step-0000003")]
    state, info = H.load_checkpoint(tmp_path / "checkpoints" / "step-0000003")
    assert torch.equal(state["x"], torch.ones(2)) and info["step"] == 3 and info["note"] == "n"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "bad json"])
def test_a_damaged_checkpoint_is_named_without_torch_advice(tmp_path, damage):
    folder = _ckpt(tmp_path)
    state = folder / "state.pt"
    if damage == "garbage":
        state.write_bytes(b"\x80\x04this is not a checkpoint")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "missing":
        state.unlink()
    else:
        (folder / "state.json").write_text('{"step": 3,')
    bad = folder / ("state.json" if damage == "bad json" else "state.pt")
    with pytest.raises(LayerctlError) as exc:
        H.load_checkpoint(folder)
    msg = str(exc.value)
    assert "checkpoint is damaged" in msg and str(bad) in msg
    assert "weights_only" not in msg and "\n" not in msg


def test_check_out_dir_rules(tmp_path):
    out = tmp_path / "run"
    assert H.check_out_dir(out, False, None, False, "train-vae") is None  # fresh
    with pytest.raises(LayerctlError, match="no checkpoint"):
        H.check_out_dir(out, True, None, False, "train-vae")
    _ckpt(out)
    (out / "validation").mkdir()
    with pytest.raises(LayerctlError, match="already holds a run"):
        H.check_out_dir(out, False, None, False, "train-vae")
    assert H.check_out_dir(out, True, None, False, "train-vae").name == "step-0000003"
    with pytest.raises(LayerctlError, match="not a train-lora checkpoint folder"):
        H.check_out_dir(out, False, str(tmp_path), False, "train-lora")
    assert H.check_out_dir(out, False, None, True, "train-lora", also_clear=("validation",)) is None
    assert not (out / "checkpoints").exists() and not (out / "validation").exists()


def test_run_log_keeps_rows_up_to_the_resumed_step(tmp_path):
    log = H.RunLog(tmp_path, True, False, None)
    for s in (1, 2, 3):
        log.write({"kind": "train", "step": s, "loss": float(s)})
    log.write({"kind": "val", "step": 2, "m": 1.0})
    log.close()
    with open(tmp_path / H.LOG_FILE, "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by a crash
    H.RunLog(tmp_path, True, False, resume_step=2).close()
    assert [r["step"] for r in H.read_log(tmp_path)] == [1, 2]
    assert [r["step"] for r in H.read_log(tmp_path, "val")] == [2]
    json.loads((tmp_path / H.LOG_FILE).read_text().splitlines()[-1])


def test_check_finite_names_the_step_and_the_last_checkpoint(tmp_path):
    from layerctl.errors import JobFailed

    H.check_finite(torch.tensor(1.5), 0, None)
    with pytest.raises(JobFailed, match=r"loss became inf at step 3: .*nothing of this step was applied; the last good checkpoint is .*step-2"):
        H.check_finite(torch.tensor(float("inf")), 2, tmp_path / "step-2")
