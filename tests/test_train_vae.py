"""train-vae / eval-vae: data, metrics, losses, the recipe schema, the loop, resume, checkpoints.

The loop runs on the tiny backend (random VAE) at 64x64 with a narrow decoder and a
handful of steps; the longer "measurably learns" run is bench/train_vae_speed.py and
docs/train-vae.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clihelp import free_port, run_cli
from trainhelp import guard_steps
from layerctl.errors import JobFailed, LayerctlError
from layerctl.training import data as D
from layerctl.training import losses as L
from layerctl.training import metrics as M
from layerctl.training.synthetic import SyntheticSource

NARROW = [8, 8, 8, 8, 8, 8, 8]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core machine, oneDNN with 2 threads ran these tiny convs ~80x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_rgba_folder(folder: Path, n: int, size: int = 80, seed: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    src = SyntheticSource(seed=seed)
    paths = []
    for i in range(n):
        p = folder / ("sub" if i % 2 else ".") / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(src.sample(i, (size, size + 16)).to_uint8(), "RGBA").save(p)
        paths.append(p)
    return paths


def truncated_png(path: Path) -> Path:
    """A PNG whose header opens but whose pixel data is cut short (fails on load)."""
    src = SyntheticSource(seed=1).sample(0, 64).to_uint8()
    Image.fromarray(src, "RGBA").save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


# ---------------------------------------------------------------- metrics and losses on known numbers


def test_psnr_known_values():
    assert M.psnr_from_mse(0.01) == pytest.approx(20.0)
    assert M.psnr_from_mse(0.0) == M.PSNR_CAP
    t = M.psnr_from_mse(torch.tensor([1.0, 1e-4]))
    assert torch.allclose(t, torch.tensor([0.0, 40.0]))


def test_composite_psnr_over_nine_backgrounds():
    true_rgb = torch.ones(1, 3, 4, 4)  # opaque white
    true_a = torch.ones(1, 1, 4, 4)
    pred_a = torch.zeros(1, 1, 4, 4)  # fully transparent prediction
    res = M.composite_psnr(true_rgb, pred_a, true_rgb, true_a)
    assert list(res) == list(M.BACKGROUNDS) and len(res) == 9
    assert res["white"].item() == M.PSNR_CAP  # invisible on white: same picture
    assert res["black"].item() == pytest.approx(0.0)  # white vs black: mse 1
    assert res["red"].item() == pytest.approx(10 * math.log10(3 / 2))  # two of three channels off by 1
    assert res["grey"].item() == pytest.approx(10 * math.log10(1 / 0.25))


def test_batch_metrics_and_identity():
    rgba = torch.rand(2, 4, 8, 8)
    m = M.batch_metrics(rgba, rgba)
    assert torch.all(m["alpha_psnr"] == M.PSNR_CAP) and torch.all(m["rgb_psnr"] == M.PSNR_CAP)
    noisy = rgba.clone()
    noisy[:, 3] = (noisy[:, 3] + 0.1).clamp(0, 1)
    assert torch.all(M.batch_metrics(noisy, rgba)["alpha_psnr"] < 30)
    # identity: the frozen decode of the exact premultiplied picture scores the cap
    target01 = M.premultiplied_target(rgba) / 2 + 0.5
    assert torch.all(M.identity_psnr(target01, rgba) == M.PSNR_CAP)
    assert torch.all(M.identity_delta(target01, target01) == 0)
    sums = M.MetricSums()
    sums.add({"a": torch.tensor([1.0, 3.0])})
    sums.add({"a": torch.tensor([5.0])})
    assert sums.summary() == {"a": 3.0, "images": 3}


def test_gan_and_reconstruction_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert L.d_loss(real, fake, "hinge").item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert L.g_loss(fake, "hinge").item() == pytest.approx(1.0)
    assert L.d_loss(real, fake, "bce").item() == pytest.approx(
        float(torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    )
    pred, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    pred[:, 0] = 1.0  # only alpha is wrong, by 1
    assert L.recon_loss(pred, target, "l2").item() == pytest.approx(0.25)
    assert L.recon_loss(pred, target, "l2", alpha_weight=3.0).item() == pytest.approx(0.5)
    assert L.recon_loss(pred * 2, target, "l1").item() == pytest.approx(0.5)
    d = L.PatchDiscriminator(4, 8, 2)
    assert d(torch.zeros(2, 4, 64, 64)).shape[:2] == (2, 1)


def test_edge_weighted_alpha_loss_punishes_a_halo_more_than_an_error_far_from_the_object():
    target = torch.zeros(1, 4, 16, 16)
    target[:, 0, 4:12, 4:12] = 1.0  # an 8x8 opaque square
    band = L.edge_band(target[:, :1], 2)
    # the band: 2 px each side of the square's outline, nothing far inside or outside
    assert band[0, 0, 2, 8] == 1 and band[0, 0, 5, 8] == 1 and band[0, 0, 8, 8] == 0 and band[0, 0, 0, 0] == 0
    assert int(band.sum()) == 12 * 12 - 4 * 4
    halo, far = target.clone(), target.clone()
    halo[:, 0, 3, 4:12] = 0.2  # a faint halo row just outside the edge
    far[:, 0, 15, 4:12] = 0.2  # the same error in a far corner
    plain = [L.recon_loss(x, target, "l1", alpha_weight=5.0).item() for x in (halo, far)]
    assert plain[0] == pytest.approx(plain[1])
    weighted = [L.recon_loss(x, target, "l1", alpha_weight=5.0, edge_weight=4.0).item() for x in (halo, far)]
    assert weighted[0] > 3 * weighted[1]
    # no error, no loss, whatever the weights
    assert L.recon_loss(target, target, "l1", alpha_weight=5.0, edge_weight=4.0).item() == 0.0


def test_every_shipped_recipe_validates():
    """recipes/ and recipes/toy/ (the toy model's training stages): each train-vae / train-lora recipe
    loads with its trainer's schema, so a renamed key cannot leave a stage that no longer runs."""
    from layerctl.training import lora, vae

    root = Path(__file__).resolve().parents[1] / "recipes"
    loaded = {}
    for path in sorted(root.glob("**/train-*.yaml")):
        loader = vae.load_config if path.name.startswith("train-vae") else lora.load_config
        loaded[path.relative_to(root).as_posix()] = loader(path)
    assert len([k for k in loaded if k.startswith("toy/")]) >= 10
    stage5 = loaded["toy/train-vae-5.yaml"]
    assert stage5.loss.alpha_edge_weight > 0 and stage5.loss.recon == "l1" and stage5.optim.lr_encoder > 0


def test_decoder_views_are_the_tta_passes():
    from layerctl.models import transparent_vae as tv
    from layerctl.training.vae import apply_view, decoder_views, unview

    x = torch.randn(8, 3, 8, 8)
    views = list(tv.TTA_PASSES)
    y = apply_view(x, views)
    for i, (flip, rot) in enumerate(views):
        assert torch.equal(y[i : i + 1], tv._augment(x[i : i + 1], flip, rot))
    assert torch.equal(unview(y, views), x)
    v = decoder_views(0, range(64))
    assert v == decoder_views(0, range(64)) and len(set(v)) == 8  # deterministic, all 8 used
    assert decoder_views(0, [5]) == [v[5]]  # by position, whatever the batch


# ---------------------------------------------------------------- data


def test_scan_folder_errors_and_counts(tmp_path):
    with pytest.raises(LayerctlError, match="not found"):
        D.scan_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerctlError, match="holds no images"):
        D.scan_folder(tmp_path / "empty")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(rgb / f"{i}.png")
    with pytest.raises(LayerctlError, match=r"no image with an alpha channel \(read 3 image\(s\), 3 without an alpha channel\)"):
        D.scan_folder(rgb)
    mixed = tmp_path / "mixed"
    write_rgba_folder(mixed, 3)
    Image.new("RGB", (64, 64)).save(mixed / "opaque.webp")
    (mixed / "broken.tif").write_bytes(b"not an image")
    scan = D.scan_folder(mixed)
    assert len(scan.records) == 3 and len(scan.no_alpha) == 1 and len(scan.unreadable) == 1
    assert any(r.path.parent.name == "sub" for r in scan.records)  # recursive


def test_imagefolder_metadata_and_splits(tmp_path):
    root = tmp_path / "hf"
    write_rgba_folder(root / "train", 4)
    write_rgba_folder(root / "validation", 2, seed=9)
    rows = [{"file_name": "img0.png", "text": "a red ball"}, {"file_name": "sub/img1.png", "caption": "glass cup"}]
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_dir, val_dir = D.find_splits(root)
    assert train_dir == root / "train" and val_dir == root / "validation"
    scan = D.scan_folder(train_dir)
    assert scan.layout == "imagefolder" and [r.caption for r in scan.records] == ["a red ball", "glass cup"]
    (root / "train" / "metadata.jsonl").write_text('{"file_name": 3}\n')
    with pytest.raises(LayerctlError, match=r"metadata.jsonl:1: each line needs"):
        D.scan_folder(train_dir)


def test_folder_stream_is_deterministic_and_padded(tmp_path):
    from layerctl.core.imagemath import pad_rgb

    paths = write_rgba_folder(tmp_path / "imgs", 5)
    recs = [D.ImageRecord(p) for p in paths]
    s1 = D.FolderStream(recs, 64, seed=3)
    s2 = D.FolderStream(recs, 64, seed=3)
    a, b = s1[17], s2[17]
    assert a["rgba"].shape == (4, 64, 64) and a["padded"].shape == (3, 64, 64)
    assert torch.equal(a["rgba"], b["rgba"])
    assert not torch.equal(s1[17]["rgba"], s1[18]["rgba"])
    # the padding is the inference padding of the very same pixels
    rgba_np = a["rgba"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(a["padded"].permute(1, 2, 0).numpy(), pad_rgb(rgba_np), atol=1e-6)
    # each epoch is a permutation of all images
    first_epoch = {s1.index(p) for p in range(5)}
    assert first_epoch == set(range(5))


def test_position_batches_shard_without_overlap():
    b0 = iter(D.PositionBatches(2, start=0, rank=0, world=2))
    b1 = iter(D.PositionBatches(2, start=0, rank=1, world=2))
    got = [next(b0), next(b1), next(b0), next(b1)]
    assert got == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert next(iter(D.PositionBatches(2, start=3, rank=1, world=2))) == [14, 15]


def test_unreadable_image_is_skipped_and_reported(tmp_path):
    paths = write_rgba_folder(tmp_path / "imgs", 2)
    bad = truncated_png(tmp_path / "imgs" / "bad.png")
    recs = [D.ImageRecord(bad)] + [D.ImageRecord(p) for p in paths]
    stream = D.FolderStream(recs, 64, seed=0, augment=False)
    item = stream[0]
    assert item["bad"] == [str(bad)] and item["rgba"].shape == (4, 64, 64)


# ---------------------------------------------------------------- recipe and bad input (no model load)


def _cfg(tmp_path, **over):
    from layerctl.training.vae import VAETrainConfig

    base = {
        "out_dir": str(tmp_path / "run"),
        "seed": 0,
        "steps": 4,
        "batch_size": 2,
        "grad_accum": 1,
        "mixed_precision": "no",
        "save_dtype": "fp32",
        "checkpoint_every": 2,
        "keep_last": 5,
        "val_every": 100,
        "val_at_start": False,
        "val_batch_size": 2,
        "log_every": 1,
        "model": {"model": "tiny", "decoder_channels": NARROW, "device": "cpu"},
        "data": {"source": "synthetic", "resolution": 64, "val_count": 2, "workers": 0},
        "loss": {"identity_target": "vae", "disc_start": 2, "disc_channels": 8, "disc_layers": 2},
        "optim": {"lr_encoder": 1e-3, "lr_decoder": 2e-3, "lr_disc": 1e-3, "warmup_steps": 1},
    }
    for k, v in over.items():
        if isinstance(v, dict):
            base[k] = {**base.get(k, {}), **v}
        else:
            base[k] = v
    return VAETrainConfig.model_validate(base)


def test_recipes_validate_and_schema_errors_have_line_numbers(tmp_path):
    from layerctl.training.vae import load_config

    root = Path(__file__).resolve().parents[1] / "recipes"
    full = load_config(root / "train-vae.yaml")
    assert full.loss.identity_weight == 1.0 and full.loss.disc_weight == pytest.approx(0.01)
    assert full.model.decoder_channels is None  # the official layout
    smoke = load_config(root / "train-vae-smoke.yaml", ["steps=7"])
    assert smoke.steps == 7 and smoke.model.model == "tiny" and smoke.mixed_precision == "no"
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nloss:\n  disc_wieght: 0.1\ndata:\n  resolution: 100\n")
    with pytest.raises(LayerctlError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert "bad.yaml:3: loss.disc_wieght: unknown key 'disc_wieght' (did you mean 'disc_weight'?)" in msg
    assert "bad.yaml:5: data.resolution" in msg and "multiple of 64" in msg


def test_resume_config_changes_are_named():
    from layerctl.training.vae import VAETrainConfig, config_changes

    a = VAETrainConfig().model_dump(mode="json")
    b = VAETrainConfig.model_validate({"steps": 5, "log_every": 1, "batch_size": 8, "optim": {"lr_decoder": 1e-3}}).model_dump(mode="json")
    assert config_changes(a, b) == ["batch_size 4 -> 8", "optim.lr_decoder 0.0001 -> 0.001"]  # steps, log_every: free
    assert config_changes(a, a) == []


def test_bad_data_fails_before_any_model_loads(tmp_path, monkeypatch):
    from layerctl.training import vae as V

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(V, "load_frozen_vae", boom)
    with pytest.raises(LayerctlError, match="dataset folder not found"):
        V.train(_cfg(tmp_path, data={"source": str(tmp_path / "missing")}), quiet=True)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.new("RGB", (64, 64)).save(rgb / "a.png")
    Image.new("L", (64, 64)).save(rgb / "b.webp")
    with pytest.raises(LayerctlError, match=r"read 2 image\(s\), 2 without an alpha channel"):
        V.train(_cfg(tmp_path, data={"source": str(rgb)}), quiet=True)
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(LayerctlError, match="needs the tensorboard package"):
            V.train(_cfg(tmp_path, tensorboard=True), quiet=True)
    # the same through the CLI: exit 2, one line, no traceback
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out_dir: {tmp_path / 'cli'}\ndata:\n  source: {tmp_path / 'empty'}\n")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("train-vae", recipe)
    assert code == 2 and "holds no images" in err and "Traceback" not in err


# ---------------------------------------------------------------- the loop


def _train_rows(out_dir):
    from layerctl.training.vae import read_log

    return [(r["step"], r["loss"], r["identity"], r["recon"], r["adv"], r["disc"]) for r in read_log(out_dir)]


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """SIGINT during step 3 -> checkpoint at step 3; --resume -> the same losses as one straight run."""
    from layerctl.training import vae as V

    over = dict(steps=4, grad_accum=2, ema={"enabled": True, "decay": 0.9})
    straight = V.train(_cfg(tmp_path, out_dir=str(tmp_path / "a"), **over), quiet=True)
    assert straight["status"] == "completed" and straight["steps"] == 4

    calls = {"n": 0}
    real = L.recon_loss

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # micro-batch 1 of step 3 (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(L, "recon_loss", interrupting)
    first = V.train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), **over), quiet=True)
    monkeypatch.setattr(L, "recon_loss", real)
    assert first["status"] == "interrupted" and first["steps"] == 3
    assert [s for s, _ in V.list_checkpoints(tmp_path / "b")] == [2, 3]
    with pytest.raises(LayerctlError, match="already holds a run"):
        V.train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), **over), quiet=True)
    second = V.train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), **over), resume=True, quiet=True)
    assert second["start_step"] == 3 and second["steps"] == 4

    a, b = _train_rows(tmp_path / "a"), _train_rows(tmp_path / "b")
    assert [r[0] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(b)[:, 1:], np.array(a)[:, 1:], rtol=1e-5, atol=1e-7)
    assert a[-1][4] != 0.0  # the discriminator term was on after the warm-up
    # the exported weights equal too
    from safetensors.torch import load_file

    for name in (V.DECODER_FILE, V.ENCODER_FILE):  # exactly, like a resumed train-lora run
        wa, wb = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    raw_a = torch.load(tmp_path / "a" / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)["pair"]
    raw_b = torch.load(tmp_path / "b" / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)["pair"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)


def test_damaged_checkpoint_on_resume_is_a_one_line_error(tmp_path):
    """--resume on a checkpoint whose state.pt is cut short: exit 2, the file named, no torch advice."""
    from layerctl.training import vae as V

    V.train(_cfg(tmp_path, steps=2), quiet=True)
    state = tmp_path / "run" / "checkpoints" / "step-0000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:200])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_cfg(tmp_path, steps=3).model_dump(mode="json")))
    code, out, err = run_cli("train-vae", recipe, "--resume")
    assert code == 2, err
    assert "checkpoint is damaged" in err and "state.pt" in err
    assert "weights_only" not in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from layerctl.training import vae as V

    calls = {"n": 0}
    real = L.identity_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(L, "identity_loss", poisoned)
    with guard_steps() as seen:
        with pytest.raises(JobFailed, match=r"loss became nan at step 3: .*nothing of this step was applied.*step-0000002"):
            V.train(_cfg(tmp_path, steps=4), quiet=True)
    assert [s for s, _ in V.list_checkpoints(tmp_path / "run")] == [2]
    assert seen["closed"] == 1 and seen["steps"] >= 2  # the log was closed; steps 1-2 were applied, none poisoned


def test_folder_training_checkpoint_loads_in_eval_vae_and_gen(tmp_path):
    """A short run on a folder with an unreadable file; the weights load in eval-vae (which reports the file) and gen."""
    from layerctl.training import vae as V

    imgs = tmp_path / "imgs"
    write_rgba_folder(imgs, 6)
    bad = truncated_png(imgs / "zz_bad.png")
    summary = V.train(
        _cfg(tmp_path, steps=2, val_at_start=True, data={"source": str(imgs), "val_count": 2}), quiet=True
    )
    assert summary["status"] == "completed"
    assert summary["baseline"]["images"] == 2 and summary["last_val"]["images"] == 2
    run = tmp_path / "run"
    enc, dec = run / V.ENCODER_FILE, run / V.DECODER_FILE
    assert enc.is_file() and dec.is_file()
    vals = V.read_log(run, "val")
    assert [v["step"] for v in vals] == [0, 2]
    code, out, err = run_cli(
        "eval-vae", imgs, "--model", "tiny", "--transparent-decoder", dec, "--transparent-encoder", enc,
        "--resolution", "64", "--json", "--limit", "7",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["metrics"]["images"] == 6 and str(bad) in res["skipped"]
    for key in ["alpha_psnr", "rgb_psnr", "identity_psnr", "identity_delta"] + [f"rgb_psnr_{b}" for b in M.BACKGROUNDS]:
        assert math.isfinite(res["metrics"][key]), key
    # the training run met the unreadable file only if it drew it; eval always does
    assert bad.name in " ".join(res["skipped"])
    # and gen draws with them
    code, out, err = run_cli(
        "gen", "glass cup", "--model", "tiny", "--steps", "1", "--seed", "1", "--out", tmp_path / "cup.png",
        "--transparent-decoder", dec, "--transparent-encoder", enc,
    )
    assert code == 0, err
    with Image.open(tmp_path / "cup.png") as im:
        assert im.mode == "RGBA" and im.size == (64, 64)


def test_eval_vae_bad_input(tmp_path):
    code, _, err = run_cli("eval-vae", tmp_path / "nowhere", "--json")
    assert code == 2 and "not found" in err
    write_rgba_folder(tmp_path / "imgs", 1)
    code, _, err = run_cli("eval-vae", tmp_path / "imgs", "--transparent-decoder", tmp_path / "no.safetensors")
    assert code == 2 and "no.safetensors" in err


def test_accelerate_two_processes_match_one_with_the_double_batch(tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo): the same losses as one process with batch 2x; the checkpoint loads."""
    import subprocess
    import sys

    import yaml

    from layerctl.training import vae as V

    pytest.importorskip("accelerate")
    gan = {"disc_start": 1}  # step 2 trains the discriminator too (DDP-wrapped)
    one = V.train(_cfg(tmp_path, out_dir=str(tmp_path / "one"), steps=2, batch_size=4, loss=gan), quiet=True)
    assert one["world_size"] == 1
    cfg = _cfg(tmp_path, out_dir=str(tmp_path / "two"), steps=2, batch_size=2, cpu_threads=1, loss=gan)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    # without GPUs, --multi_gpu is what makes accelerate start N processes (torchrun); the Accelerator
    # then runs on the CPU with a gloo process group
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "layerctl", "train-vae", "r.yaml", "--json", "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["steps"] == 2  # the main process reports
    a, b = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    np.testing.assert_allclose(np.array(b)[:, 1:], np.array(a)[:, 1:], rtol=1e-4, atol=1e-6)
    assert a[-1][5] != 0.0  # the discriminator loss was computed
    info = json.loads((tmp_path / "two" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert info["world_size"] == 2 and info["data_position"] == 8
    enc = V.load_decoder_any(tmp_path / "two" / V.DECODER_FILE)
    assert V.decoder_channels_of(enc.state_dict()) == tuple(NARROW)


def test_lr_encoder_zero_trains_the_decoder_alone(tmp_path):
    """optim.lr_encoder: 0 keeps the encoder exactly as it started (init_encoder), the decoder moves."""
    import torch
    from safetensors.torch import load_file

    from layerctl.training import vae as V

    first = V.train(_cfg(tmp_path / "a", steps=2), quiet=True)
    assert first["status"] == "completed"
    enc0, dec0 = tmp_path / "a" / "run" / V.ENCODER_FILE, tmp_path / "a" / "run" / V.DECODER_FILE
    cfg = _cfg(tmp_path / "b", steps=3, save_dtype="fp32", model={"init_encoder": str(enc0), "init_decoder": str(dec0)},
               optim={"lr_encoder": 0.0})
    assert V.train(cfg, quiet=True)["status"] == "completed"
    a, b = load_file(str(enc0)), load_file(str(tmp_path / "b" / "run" / V.ENCODER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da, db = load_file(str(dec0)), load_file(str(tmp_path / "b" / "run" / V.DECODER_FILE))
    assert any(not torch.equal(da[k], db[k]) for k in da)


def test_latent_noise_perturbs_what_the_decoder_reads_not_the_identity_term(tmp_path):
    """loss.latent_noise: the decoder reads latent + noise and the decode of that; the identity term
    (which trains the encoder) keeps the clean latent's decode. A short run with it completes."""
    import torch

    from layerctl.training import vae as V

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = None

        def forward(self, pixels, latent):
            self.seen = (pixels, latent)
            return torch.zeros(pixels.shape[0], 4, *pixels.shape[2:]) + self.w

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)

    decode = lambda z: torch.tanh(z.mean(1, keepdim=True).repeat_interleave(8, 2).repeat_interleave(8, 3).expand(-1, 3, -1, -1))  # noqa: E731
    mean, std = torch.randn(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    enc_in = torch.rand(2, 4, 16, 16)
    spy = Spy()
    pair = V.make_pair(Zero(), spy)
    latent, decoded, _pred = pair(enc_in, mean, std, decode)
    assert torch.equal(spy.seen[1], mean) and torch.equal(decoded, decode(mean))
    noise = torch.full_like(mean, 0.5)
    latent, decoded, _pred = pair(enc_in, mean, std, decode, None, noise)
    assert torch.allclose(spy.seen[1], mean + 0.5)
    assert torch.equal(latent, mean) and torch.equal(decoded, decode(mean))  # identity: the clean latent, handed back as such
    assert torch.allclose(spy.seen[0], (decode(mean + 0.5) / 2 + 0.5).clamp(0, 1))  # the decoder: the perturbed one
    result = V.train(_cfg(tmp_path, steps=2, loss={"latent_noise": 0.5, "alpha_edge_weight": 2.0, "recon": "l1"}), quiet=True)
    assert result["status"] == "completed"
