"""train-lora / export-lora / gen --lora: LoRA files, data checks, the loop (both modes), resume, NaN.

Everything runs on the tiny backend (random weights, pictures are noise) at 64x64 with rank 4-8
and a handful of steps. The few-minutes "the loss goes down" runs are recipes/train-lora-smoke.yaml
(numbers in docs/train-lora.md).
"""

from __future__ import annotations

import json
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

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layerdiffuse-v1"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the tiny UNet's small ops run faster so on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    from layerctl.backends.registry import load_model

    return load_model("tiny", device="cpu", dtype="fp32")


def _random_pairs(unet, rank=4, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, mod in unet.named_modules():
        if name.endswith(TARGETS):
            w = mod.weight
            pairs[name] = (torch.randn(w.shape[0], rank, generator=g) * std, torch.randn(rank, w.shape[1], generator=g) * std)
    return pairs


def _weights(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _merged(unet, path, scale=1.0):
    from layerctl.models.lora_format import apply_lora_file

    h = apply_lora_file(unet, path, scale)
    w = _weights(unet)
    h.restore()
    return w


def _maxdiff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------- LoRA files


def test_peft_file_merges_restores_and_round_trips_through_the_official_layout(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from layerctl.models import lora_format as L
    from layerctl.models.patches import _plain_config

    unet = tiny.unet
    base = _weights(unet)
    pairs = _random_pairs(unet, rank=4)
    src = L.save_peft_lora(tmp_path / "a.safetensors", pairs, rank=4, alpha=2, info={"unet_config": _plain_config(unet)})
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    up, down = pairs[key]
    merged = _merged(unet, src, 0.7)
    # W + scale * alpha/r * up @ down, in fp32
    torch.testing.assert_close(merged[key + ".weight"], base[key + ".weight"] + 0.7 * 0.5 * up @ down, rtol=0, atol=1e-6)
    assert _maxdiff(base, _weights(unet)) == 0.0  # restore is bit-exact

    ld = tmp_path / "ld.safetensors"
    res = L.export_lora(src, ld, "layerdiffuse")
    assert res["pairs"] == len(pairs) and res["ranks"] == [4] and res["max_abs_diff"] < 1e-6
    with safe_open(str(ld), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * len(pairs) and not any(k.endswith("::lora::2") for k in keys)  # no alpha, as the official files
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight::lora::0" in keys
    back = tmp_path / "back.safetensors"
    assert L.export_lora(ld, back, "diffusers")["max_abs_diff"] < 1e-6
    # the three files merge into the same weights (what the issue asks to print)
    m_ld, m_back = _merged(unet, ld, 0.7), _merged(unet, back, 0.7)
    assert _maxdiff(merged, m_ld) < 1e-6 and _maxdiff(merged, m_back) < 1e-6
    assert _maxdiff(merged, base) > 1e-3

    # a kohya file with the same pairs (underscored names, per-module alpha) merges the same
    kohya = {}
    for mod, (u, d) in pairs.items():
        stem = "lora_unet_" + mod.replace(".", "_")
        kohya.update({f"{stem}.lora_up.weight": u, f"{stem}.lora_down.weight": d, f"{stem}.alpha": torch.tensor(2.0)})
    kohya["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, 4)  # not applied
    save_file(kohya, str(tmp_path / "k.safetensors"))
    assert _maxdiff(merged, _merged(unet, tmp_path / "k.safetensors", 0.7)) < 1e-6

    # diffusers reads our file the same way (alpha from lora_adapter_metadata)
    tiny.pipe.load_lora_weights(str(src))
    tiny.pipe.fuse_lora(lora_scale=0.7)
    tiny.pipe.unload_lora_weights()
    try:
        assert _maxdiff(merged, _weights(unet)) < 1e-5
    finally:
        unet.load_state_dict(base)


def test_official_sdxl_layout_is_recognised_from_its_manifest():
    if not (REF / "layer_xl_transparent_attn.json").is_file():
        pytest.skip("shared/reference not present")
    from layerctl.models.lora_format import detect_unet_config

    tensors = json.loads((REF / "layer_xl_transparent_attn.json").read_text())["tensors"]
    items = tensors.items() if isinstance(tensors, dict) else [(t["key"], t["shape"]) for t in tensors]
    shapes = {}
    for k, shape in items:
        name, _, idx = k.partition("::lora::")
        name = name[len("diffusion_model."):]
        shapes.setdefault(name, [None, None])[int(idx)] = tuple(shape)
    assert len(shapes) == 560
    fam, cfg = detect_unet_config({k: tuple(v) for k, v in shapes.items()}, naming="ldm")
    assert fam == "sdxl" and cfg["cross_attention_dim"] == 2048


def test_bad_lora_files_are_one_line_errors_and_leave_the_unet_alone(tiny, tmp_path):
    from safetensors.torch import save_file

    from layerctl.models import lora_format as L
    from layerctl.models.attention_sharing import AttentionSharingPatcher

    unet = tiny.unet
    base = _weights(unet)
    # a LoRA for another UNet (tiny-xl shapes)
    from layerctl.backends.registry import load_model

    xl = load_model("tiny-xl", device="cpu", dtype="fp32").unet
    other = L.save_peft_lora(tmp_path / "xl.safetensors", _random_pairs(xl), 4, 4)
    with pytest.raises(LayerctlError, match="does not fit this UNet"):
        L.apply_lora_file(unet, other, 1.0)
    assert _maxdiff(base, _weights(unet)) == 0.0
    # half a pair
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(LayerctlError, match=r"has no up \(lora_B\) tensor"):
        L.apply_lora_file(unet, tmp_path / "half.safetensors", 1.0)
    # an attention-sharing file is not a LoRA
    p = AttentionSharingPatcher(unet, 3, False, rank=2)
    save_file({k: v.contiguous() for k, v in p.state_dict().items()}, str(tmp_path / "joint.safetensors"))
    with pytest.raises(LayerctlError, match="attention-sharing"):
        L.read_lora(tmp_path / "joint.safetensors")
    (tmp_path / "x.pt").write_bytes(b"not a pickle")
    with pytest.raises(LayerctlError, match="never unpickled"):
        L.apply_lora_file(unet, tmp_path / "x.pt", 1.0)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    code, _out, err = run_cli("gen", "x", "--model", "tiny", "--lora", tmp_path / "cut.safetensors", "--out", tmp_path / "o.png")
    assert code == 2 and "cannot read LoRA file" in err and "Traceback" not in err
    code, _out, err = run_cli("export-lora", other, "--format", "kohya", "--out", tmp_path / "o.safetensors")
    assert code == 2 and "--format must be" in err


# ---------------------------------------------------------------- recipes and data checks (no model loads)


def _cfg(tmp_path, **over):
    from layerctl.training.lora import LoraTrainConfig

    base = {
        "out_dir": str(tmp_path / "run"),
        "steps": 4,
        "batch_size": 2,
        "mixed_precision": "no",
        "save_dtype": "fp32",
        "checkpoint_every": 2,
        "keep_last": 5,
        "log_every": 1,
        "model": {"model": "tiny", "device": "cpu"},
        "lora": {"rank": 4},
        "layers": {"rank": 4},
        "data": {"source": "synthetic", "resolution": 64, "workers": 0, "cache_text": True},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "validation": {"every": 100, "at_start": False, "images": False, "loss_samples": 2, "loss_timesteps": 2},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return LoraTrainConfig.model_validate(base)


def test_recipes_validate_and_schema_errors_have_line_numbers(tmp_path):
    from layerctl.training.lora import load_config

    full = load_config(RECIPES / "train-lora.yaml")
    assert full.mode == "transparent" and full.lora.rank == 256 and list(full.lora.target_modules) == list(TARGETS)
    layers = load_config(RECIPES / "train-lora-layers.yaml")
    assert layers.mode == "layers" and layers.layers.rank == 256 and 0 < layers.layers.clean_probability < 1
    smoke = load_config(RECIPES / "train-lora-smoke.yaml", ["steps=7", "mode=layers"])
    assert smoke.steps == 7 and smoke.mode == "layers" and smoke.model.model == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: layers\nlora:\n  rnak: 8\ndata:\n  resolution: 100\nlayers:\n  clean_layers: [fg, sky]\n")
    with pytest.raises(LayerctlError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert "bad.yaml:3: lora.rnak: unknown key 'rnak' (did you mean 'rank'?)" in msg
    assert "bad.yaml:5: data.resolution" in msg and "multiple of 64" in msg
    assert "bad.yaml:7: layers.clean_layers" in msg


def _rgba_folder(folder: Path, n: int, opaque: int = 0, size=(64, 80)) -> list[Path]:
    from layerctl.training.synthetic import SyntheticSource

    folder.mkdir(parents=True, exist_ok=True)
    src = SyntheticSource(seed=3)
    paths = []
    for i in range(n):
        arr = src.sample(i, size).to_uint8()
        p = folder / f"img{i}.png"
        Image.fromarray(arr if i >= opaque else arr[..., :3], "RGBA" if i >= opaque else "RGB").save(p)
        paths.append(p)
    return paths


def test_dataset_problems_are_reported_before_any_model_loads(tmp_path, monkeypatch):
    from layerctl.backends import registry as backend
    from layerctl.training import lora as T

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(backend, "load_model", boom)
    # transparent: 2 opaque images and 3 RGBA ones, of which only one has a caption (a sidecar .txt)
    imgs = _rgba_folder(tmp_path / "imgs", 5, opaque=2)
    imgs[2].with_suffix(".txt").write_text("a red ball\n")
    with pytest.raises(LayerctlError, match=r"2 of 3 image\(s\) have no caption.*img3.png"):
        T.train(_cfg(tmp_path, data={"source": str(tmp_path / "imgs")}), quiet=True)
    plan = T.LoraDataPlan(_cfg(tmp_path, data={"source": str(tmp_path / "imgs"), "prompt": "an object"}))
    notes = " | ".join(plan.notes)
    assert "2 image(s) without alpha are left out" in notes and "1 from .txt, 2 from recipe prompt" in notes
    assert [r.caption for r in plan.source.records] == ["a red ball", "an object", "an object"]
    # CLI: exit 2, one line, no traceback
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out_dir: {tmp_path / 'cli'}\ndata:\n  source: {tmp_path / 'imgs'}\n  resolution: 64\n")
    code, _out, err = run_cli("train-lora", recipe)
    assert code == 2 and "have no caption" in err and "Traceback" not in err

    # layers: mismatched sizes, a foreground without alpha, a missing blended is fine
    root = tmp_path / "layers"
    for sub in ("fg", "bg", "blended"):
        (root / sub).mkdir(parents=True)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = 200
    Image.fromarray(rgba, "RGBA").save(root / "fg" / "a.png")
    Image.fromarray(rgba[..., :3], "RGB").save(root / "fg" / "b.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(root / "bg" / "a.png")
    Image.new("RGB", (64, 128)).save(root / "bg" / "b.png")
    Image.new("RGB", (64, 64)).save(root / "blended" / "a.png")
    for stem in ("a", "b"):
        (root / "fg" / f"{stem}.txt").write_text("a box")
    with pytest.raises(LayerctlError) as exc:
        T.train(_cfg(tmp_path, mode="layers", data={"source": str(root)}), quiet=True)
    msg = str(exc.value)
    assert "1 triplet(s) with layers of different sizes, e.g. b (fg 64x64, bg 64x128)" in msg
    assert "1 foreground(s) without alpha" in msg
    (root / "bg" / "b.png").unlink()
    (root / "fg" / "b.png").unlink()
    (root / "fg" / "b.txt").unlink()
    Image.fromarray(rgba, "RGBA").save(root / "fg" / "c.png")
    Image.new("RGB", (64, 64)).save(root / "bg" / "c.png")
    with pytest.raises(LayerctlError, match=r"1 triplet\(s\) without any caption.*e\.g\. c"):
        T.train(_cfg(tmp_path, mode="layers", data={"source": str(root)}), quiet=True)
    (root / "metadata.jsonl").write_text('{"fg": "fg/a.png", "bg": "bg/a.png", "prompt": "x"}\n{"fg": "fg/c.png"\n')
    with pytest.raises(LayerctlError, match=r"metadata.jsonl:2: invalid JSON"):
        T.train(_cfg(tmp_path, mode="layers", data={"source": str(root)}), quiet=True)
    # SDXL-family models have no attention-sharing layer model
    with pytest.raises(LayerctlError, match="mode: layers trains the SD1.5"):
        T.train(_cfg(tmp_path, mode="layers", model={"model": "tiny-xl"}), quiet=True)


def test_triplets_crop_together_and_blended_is_computed(tmp_path):
    from layerctl.training import lora as T

    root = tmp_path / "layers"
    for sub in ("fg", "bg"):
        (root / sub).mkdir(parents=True)
    fg = np.zeros((64, 128, 4), np.uint8)
    fg[:, :64] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    Image.fromarray(fg, "RGBA").save(root / "fg" / "a.png")
    Image.new("RGB", (128, 64), (0, 0, 255)).save(root / "bg" / "a.png")
    (root / "a.txt").write_text("red on blue")
    cfg = _cfg(tmp_path, mode="layers", data={"source": str(root), "resolution": 64, "hflip": False})
    plan = T.LoraDataPlan(cfg)
    item = plan.val[0]  # centre crop: columns 32..96
    fgt, bgt, bl = item["fg"], item["bg"], item["blended"]
    assert fgt.shape == (4, 64, 64) and bgt.shape == (3, 64, 64) and bl.shape == (3, 64, 64)
    torch.testing.assert_close(bl[:, :, :32], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 64, 32))
    torch.testing.assert_close(bl[:, :, 32:], torch.tensor([0, 0, 1.0])[:, None, None].expand(3, 64, 32))
    assert item["texts"] == ["red on blue", "red on blue", "red on blue"]  # layer_prompts with only a whole prompt


def test_clean_layer_has_its_noise_zeroed_and_no_loss():
    """diffusion_loss with a recording denoiser: frame 1 of group 0 is kept clean."""
    from diffusers import DDPMScheduler

    from layerctl.backends.base import PromptEmbeds
    from layerctl.training import lora as T

    cfg = T.LoraTrainConfig(mode="layers")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    seen = {}

    def denoiser(x, t, hidden, extra):
        seen["x"], seen["t"] = x, t
        out = torch.zeros_like(x)
        out[1] = 100.0  # a huge error on the clean frame: must not count
        return out

    mean = torch.randn(6, 4, 8, 8)
    rand = T.draw_noise(0, [10, 11], 3, (4, 8, 8), 1000)
    emb = PromptEmbeds(hidden=torch.zeros(6, 2, 4))
    loss, per = T.diffusion_loss(cfg, sched, denoiser, mean, None, emb, torch.tensor([1, -1]), rand, 3, "cpu", 0.5)
    t0 = int(rand["t"][0])
    assert seen["t"].tolist() == [t0] * 3 + [int(rand["t"][1])] * 3  # frames share their group's timestep
    a = sched.alphas_cumprod[t0].sqrt()
    torch.testing.assert_close(seen["x"][1], a * mean[1] * 0.5)  # clean: sqrt(abar) * x0, no noise
    assert not torch.allclose(seen["x"][0], a * mean[0] * 0.5)
    # per-row loss vs the noise; group 0 averages frames 0 and 2 only
    noise = rand["noise"]
    want0 = (noise[0].pow(2).mean() + noise[2].pow(2).mean()) / 2
    want1 = noise[3:].pow(2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, (want0 + want1) / 2)
    assert float(per[1]) > 1000  # computed, but left out
    # a sample's draws depend on its position only (not on the batch it is in)
    alone = T.draw_noise(0, [11], 3, (4, 8, 8), 1000)
    assert torch.equal(alone["noise"], rand["noise"][3:]) and int(alone["t"]) == int(rand["t"][1])


def test_rgb_frames_are_posterior_draws_unless_the_recipe_asks_for_the_mean():
    """loss.latents: 'sample' (default) noises mean + std * eps, 'mean' the posterior mean itself."""
    from diffusers import DDPMScheduler

    from layerctl.backends.base import PromptEmbeds
    from layerctl.training import lora as T

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    seen = []

    def denoiser(x, t, hidden, extra):
        seen.append(x)
        return torch.zeros_like(x)

    mean, std = torch.randn(3, 4, 8, 8), torch.full((3, 4, 8, 8), 0.5)
    rand = T.draw_noise(0, [4], 3, (4, 8, 8), 1000)
    emb = PromptEmbeds(hidden=torch.zeros(3, 2, 4))
    for kind in ("sample", "mean"):
        cfg = T.LoraTrainConfig(mode="layers", loss={"latents": kind})
        T.diffusion_loss(cfg, sched, denoiser, mean, std, emb, torch.tensor([-1]), rand, 3, "cpu", 0.5)
    a, b = sched.alphas_cumprod[int(rand["t"][0])].sqrt(), (1 - sched.alphas_cumprod[int(rand["t"][0])]).sqrt()
    torch.testing.assert_close(seen[0], a * (mean + std * rand["eps"]) * 0.5 + b * rand["noise"])
    torch.testing.assert_close(seen[1], a * mean * 0.5 + b * rand["noise"])
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="latents"):
        T.LoraTrainConfig(mode="layers", loss={"latents": "median"})


# ---------------------------------------------------------------- the loop


def _train_rows(out_dir):
    from layerctl.training.lora import read_log

    return [(r["step"], r["loss"]) for r in read_log(out_dir)]


def test_transparent_run_resumes_exactly_and_its_lora_loads_in_gen(tmp_path, monkeypatch):
    """A straight 4-step run vs SIGINT in step 3 + --resume: same losses, same LoRA; gen --lora differs from base."""
    from safetensors.torch import load_file

    from layerctl.training import lora as T

    over = dict(grad_accum=2, lora={"rank": 4, "dropout": 0.1}, data={"caption_dropout": 0.3})
    straight = T.train(_cfg(tmp_path, out_dir=str(tmp_path / "a"), **over), quiet=True)
    assert straight["status"] == "completed" and straight["steps"] == 4

    calls = {"n": 0}
    real = T.diffusion_loss

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # micro-batch 1 of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(T, "diffusion_loss", interrupting)
    first = T.train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), **over), quiet=True)
    monkeypatch.setattr(T, "diffusion_loss", real)
    assert first["status"] == "interrupted" and first["steps"] == 3
    assert [p.name for _s, p in T.list_checkpoints(tmp_path / "b")] == ["step-0000002", "step-0000003"]
    with pytest.raises(LayerctlError, match="already holds a run"):
        T.train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), **over), quiet=True)
    second = T.train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), **over), resume=True, quiet=True)
    assert second["start_step"] == 3 and second["steps"] == 4
    a, b = _train_rows(tmp_path / "a"), _train_rows(tmp_path / "b")
    assert [r[0] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-6, atol=1e-8)
    wa, wb = load_file(tmp_path / "a" / T.LORA_FILE), load_file(tmp_path / "b" / T.LORA_FILE)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(float(v.abs().max()) > 0 for k, v in wa.items() if "lora_B" in k)  # up moved from zero

    lora = tmp_path / "a" / T.LORA_FILE
    outs = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(lora), "--lora-scale", "30"])):
        code, out, err = run_cli("gen", "red ball", "--model", "tiny", "--seed", "3", "--steps", "2", "--no-tta",
                                 "--out", tmp_path / f"{name}.png", *extra)
        assert code == 0, err
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert outs["base"].shape == (64, 64, 4) and np.abs(outs["base"] - outs["lora"]).max() > 0
    from layerctl.io.imageio import read_metadata

    assert T.LORA_FILE in read_metadata(tmp_path / "lora.png")["layer_weights"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from layerctl.training import lora as T

    calls = {"n": 0}
    real = T.diffusion_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, per = real(*a, **k)
        return (loss * float("nan"), per) if calls["n"] == 3 else (loss, per)

    monkeypatch.setattr(T, "diffusion_loss", poisoned)
    with guard_steps() as seen:
        with pytest.raises(JobFailed, match=r"loss became nan at step 3: .*nothing of this step was applied.*step-0000002"):
            T.train(_cfg(tmp_path, steps=4), quiet=True)
    assert [s for s, _ in T.list_checkpoints(tmp_path / "run")] == [2]
    assert seen["closed"] == 1 and seen["steps"] == 2  # the log was closed; steps 1-2 applied, step 3 not


def test_layers_run_writes_the_joint_layout_that_gen_loads(tmp_path):
    """mode: layers on a triplet folder (one without blended) with cached latents and validation
    images; the output is the official layer_sd15_joint layout and gen --joint / decompose load it."""
    from layerctl.io.imageio import read_metadata
    from layerctl.models.attention_sharing import detect_attention_sharing_file
    from layerctl.training import lora as T
    from layerctl.training.synthetic import SyntheticSource

    root = tmp_path / "layers"
    for sub in ("fg", "bg", "blended"):
        (root / sub).mkdir(parents=True)
    src = SyntheticSource(seed=1)
    for i in range(3):
        Image.fromarray(src.sample(i, 64).to_uint8(), "RGBA").save(root / "fg" / f"t{i}.png")
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(root / "bg" / f"t{i}.png")
        (root / "fg" / f"t{i}.txt").write_text(src.sample(i, 64).caption)
        (root / "bg" / f"t{i}.txt").write_text("blue wall")
    Image.new("RGB", (64, 64)).save(root / "blended" / "t0.png")
    cfg = _cfg(tmp_path, mode="layers", steps=2, batch_size=1, checkpoint_every=2,
               layers={"rank": 4, "clean_probability": 1.0},
               data={"source": str(root), "cache_latents": True, "prompt": "a scene"},
               validation={"every": 2, "at_start": True, "images": True, "steps": 2, "cfg": 2.0, "loss_samples": 2,
                           "prompts": [{"prompt": "a scene", "fg": "a ball", "bg": "a wall"}]})
    s = T.train(cfg, quiet=True)
    assert s["status"] == "completed" and s["val_loss_start"] is not None and s["val_loss_end"] != s["val_loss_start"]
    out = Path(s["weights"])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        info = json.loads(f.metadata()["layerctl"])
    assert detect_attention_sharing_file(keys) == (3, False) and info["layout"] == "layer_sd15_joint"
    imgs = sorted(p.name for p in (tmp_path / "run" / "validation" / "step-0000002").iterdir())
    assert imgs == ["00-seed0-bg.png", "00-seed0-blended.png", "00-seed0-fg.png"]
    meta = read_metadata(tmp_path / "run" / "validation" / "step-0000002" / "00-seed0-fg.png")
    assert meta["prompt"] == "a ball, a scene" and meta["train_step"] == 2 and meta["seed"] == 0
    assert Image.open(tmp_path / "run" / "validation" / "step-0000002" / "00-seed0-fg.png").mode == "RGBA"

    code, _o, err = run_cli("gen", "--joint", "a scene", "--fg-prompt", "a ball", "--model", "tiny", "--layer-weights", out,
                            "--out-dir", tmp_path / "joint", "--seed", "1", "--steps", "2", "--no-tta")
    assert code == 0, err
    assert read_metadata(tmp_path / "joint" / "fg.png")["layer_weights"] == [T.LAYERS_FILE]


@pytest.mark.parametrize("kind,control,frame_roles,flag,width", [("fg2bg", "fg", ("bg", "blended"), "--fg", 256),
                                                                   ("bg2fg", "bg", ("fg", "blended"), "--bg", 16)])
def test_control_layer_models_train_their_encoder_and_gen_loads_them(tmp_path, kind, control, frame_roles, flag, width):
    """layers.kind fg2bg / bg2fg: two frames plus the control encoder (official layouts); the control
    encoder gets gradients (its weights move), the validation images are the two frames, and gen
    --fg / --bg runs the exported file (official control width 256, or a narrow one read back from the file)."""
    import torch
    from safetensors import safe_open

    from layerctl.models.attention_sharing import detect_attention_sharing_file
    from layerctl.training import lora as T

    cfg = _cfg(tmp_path, mode="layers", steps=2, batch_size=2, checkpoint_every=2,
               layers={"rank": 4, "kind": kind, "control_width": width},
               validation={"every": 2, "at_start": False, "images": True, "steps": 2, "cfg": 2.0, "loss_samples": 2,
                           "prompts": [{"prompt": "a scene", "fg": "a ball", "bg": "a wall"}]})
    assert T.frames_of(cfg) == frame_roles and T.control_of(cfg) == control
    torch.manual_seed(cfg.seed)
    s = T.train(cfg, quiet=True)
    assert s["status"] == "completed" and s["val_loss_end"] is not None
    out = Path(s["weights"])
    assert out.name == f"layers_{kind}.safetensors"
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        info = json.loads(f.metadata()["layerctl"])
        enc_w = f.get_tensor("kwargs_encoder.blocks_0.0.weight").float()
        assert f.get_slice("kwargs_encoder.blocks_1.0.weight").get_shape()[0] == width
    assert detect_attention_sharing_file(keys) == (2, True)
    assert info["layout"] == f"layer_sd15_{kind}" and info["frame_order"] == list(frame_roles) and info["control"] == control
    # the control encoder trained: differs from a fresh patcher's initial draw with the same seed
    from layerctl.backends.registry import load_model
    from layerctl.models.attention_sharing import AttentionSharingPatcher

    model = load_model("tiny", device="cpu", dtype="fp32")
    torch.manual_seed(cfg.seed)
    fresh = AttentionSharingPatcher(model.unet, 2, True, rank=4, control_width=width)
    assert not torch.allclose(fresh.kwargs_encoder.blocks_0[0].weight.float(), enc_w)
    imgs = sorted(p.name for p in (tmp_path / "run" / "validation" / "step-0000002").iterdir())
    assert imgs == sorted(f"00-seed0-{r}.png" for r in frame_roles)

    known = tmp_path / "known.png"
    Image.new("RGBA" if control == "fg" else "RGB", (64, 64), (200, 40, 40, 255)[: 4 if control == "fg" else 3]).save(known)
    code, _o, err = run_cli("gen", flag, known, "a scene", "--model", "tiny", "--layer-weights", out,
                            "--out-dir", tmp_path / "gen", "--seed", "1", "--steps", "2", "--no-tta")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == sorted(f"{r}.png" for r in frame_roles)


def test_two_process_cpu_run_matches_one_process_and_its_lora_loads(tmp_path, tiny):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): 2 x batch 2 == 1 x batch 4."""
    import subprocess
    import sys

    import yaml

    from layerctl.models.lora_format import apply_lora_file
    from layerctl.training import lora as T

    one = T.train(_cfg(tmp_path, out_dir=str(tmp_path / "one"), steps=2, batch_size=4), quiet=True)
    assert one["world_size"] == 1
    cfg = _cfg(tmp_path, out_dir=str(tmp_path / "two"), steps=2, batch_size=2, cpu_threads=1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    # without GPUs, --multi_gpu is what makes accelerate start N processes (--cpu starts one)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "layerctl", "train-lora", "r.yaml", "--json", "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["steps"] == 2  # the main process reports
    np.testing.assert_allclose(np.array(_train_rows(tmp_path / "two")), np.array(_train_rows(tmp_path / "one")), rtol=1e-5)
    base = _weights(tiny.unet)
    with apply_lora_file(tiny.unet, tmp_path / "two" / T.LORA_FILE, 1.0) as h:
        assert h.pairs == 88 and _maxdiff(base, _weights(tiny.unet)) > 0
    assert _maxdiff(base, _weights(tiny.unet)) == 0.0


def test_validation_images_use_the_recipes_sampler(tmp_path):
    """validation.sampler/schedule reach the preview images (metadata as gen writes it) and change them;
    an unknown sampler is a recipe error before training."""
    import numpy as np
    from pydantic import ValidationError

    from layerctl.io.imageio import read_metadata
    from layerctl.training import lora as T

    runs = {}
    for name, extra in (("default", {}), ("euler_a", {"sampler": "euler_a", "schedule": "normal"})):
        cfg = _cfg(tmp_path / name, steps=1, checkpoint_every=1,
                   validation={"every": 1, "at_start": False, "images": True, "steps": 3, "cfg": 2.0,
                               "prompts": ["a red ball"], **extra})
        s = T.train(cfg, quiet=True)
        assert s["status"] == "completed"
        png = tmp_path / name / "run" / "validation" / "step-0000001" / "00-seed0.png"
        runs[name] = (read_metadata(png), np.asarray(Image.open(png)))
    assert (runs["default"][0]["sampler_label"], runs["default"][0]["schedule_label"]) == ("DPM++ 2M", "Karras")
    assert (runs["euler_a"][0]["sampler"], runs["euler_a"][0]["sampler_label"]) == ("euler_a", "Euler a")
    assert not np.array_equal(runs["default"][1], runs["euler_a"][1])
    with pytest.raises(ValidationError, match="sampler 'dpm3' is unknown"):
        _cfg(tmp_path / "bad", validation={"sampler": "dpm3"})
