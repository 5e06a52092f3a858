"""Samplers and schedule types (layerctl.core.samplers) in the one sampling loop: every valid
sampler x schedule pair on tiny and tiny-xl, seeds, v-prediction, CFG rescale, metadata read back
by a third-party A1111 reader (sd-parsers), and the exit-2 errors."""

from __future__ import annotations

import pytest
import torch

from clihelp import run_cli
from layerctl.core import samplers as S
from layerctl.pipelines.sampling import (
    DenoiseSpec, _noised, denoise, fresh_scheduler, guide, job_sampling, make_noise, step_generators,
)

PAIRS = [(name, sch) for name, info in S.SAMPLERS.items() for sch in info.schedules]
SIZE = 64


@pytest.fixture(scope="module")
def models():
    from layerctl.backends.registry import load_model

    return {name: load_model(name, "cpu", "fp32", "sdpa") for name in ("tiny", "tiny-xl")}


def _embeds(model, n, cfg):
    return model.encode_prompt(["glass cup"] * n, ["bad"] * n, cfg > 1.0, SIZE, SIZE)


def _run(model, sampling, seeds, steps=2, cfg=1.0, **kw):
    spec = DenoiseSpec(embeds=_embeds(model, len(seeds), cfg), noise=make_noise(list(seeds), 1, SIZE, SIZE),
                       steps=steps, cfg=cfg, sampling=sampling, seeds=list(seeds), **kw)
    return denoise(model, spec)


# ---------------------------------------------------------------- the table (no model)


def test_names_pairs_and_defaults():
    assert {"dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "euler", "euler_a", "heun", "ddim", "unipc", "lcm"} <= set(S.SAMPLERS)
    assert {"karras", "exponential", "sgm_uniform", "normal", "simple"} <= set(S.SCHEDULES)
    with pytest.raises(ValueError, match="valid: dpmpp_2m, dpmpp_2m_sde"):
        S.check_sampler("dpm2")
    with pytest.raises(ValueError, match="valid for euler_a: normal, simple, sgm_uniform"):
        S.check_pair("euler_a", "karras")
    d = S.resolve({"prediction_type": "epsilon"})
    assert (d.sampler, d.schedule, d.prediction, d.zero_snr, d.cfg_rescale) == ("dpmpp_2m", "karras", "epsilon", False, 0.0)
    assert d.labels == ("DPM++ 2M", "Karras")
    assert S.resolve({}, "dpmpp_sde").schedule == "karras" and S.resolve({}, "euler").schedule == "normal"
    assert S.resolve({}, "euler_a", "sgm_uniform").labels == ("Euler a", "SGM Uniform")


def test_v_prediction_detected_from_a_scheduler_config_and_refused_where_impossible():
    v = S.resolve({"prediction_type": "v_prediction"})
    assert (v.prediction, v.zero_snr, v.cfg_rescale) == ("v_prediction", True, S.V_CFG_RESCALE)
    assert S.resolve({"prediction_type": "v_prediction"}, prediction="epsilon").prediction == "epsilon"
    assert S.resolve({"prediction_type": "v_prediction"}, cfg_rescale=0.0).cfg_rescale == 0.0
    assert S.resolve({}, prediction="v", zero_snr=False).zero_snr is False
    for name in ("heun", "dpmpp_sde"):  # their diffusers schedulers have no rescale_betas_zero_snr
        with pytest.raises(ValueError, match="zero terminal SNR"):
            S.resolve({}, name, prediction="v")
        with pytest.raises(ValueError, match="zero terminal SNR"):
            S.resolve({"prediction_type": "v_prediction"}, name)  # detected, not asked for
        assert S.resolve({}, name, prediction="v", zero_snr=False).prediction == "v_prediction"


@pytest.mark.parametrize("name,schedule", PAIRS)
def test_scheduler_settings_follow_the_schedule(name, schedule):
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": True}
    sched = S.build_scheduler(S.resolve(cfg, name, schedule, prediction="v"
                                        if S.SAMPLERS[name].zero_snr else None), cfg)
    c = sched.config
    assert type(sched).__name__ == S.SAMPLERS[name].cls
    for s, flag in S.SIGMA_FLAGS.items():
        if flag in c:
            assert c[flag] == (schedule == s)  # the model's own use_karras_sigmas does not leak through
    if schedule in ("sgm_uniform", "simple") and name != "lcm":
        assert c.timestep_spacing == "trailing"
    if schedule == "normal":
        assert c.timestep_spacing == ("leading" if name == "ddim" else "linspace")
    if S.SAMPLERS[name].zero_snr:
        assert c.prediction_type == "v_prediction" and c.rescale_betas_zero_snr is True


def test_the_default_scheduler_is_the_one_the_model_had(models):
    for model in models.values():
        mine = fresh_scheduler(model)
        assert type(mine) is type(model.scheduler)
        public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
        assert public(mine.config) == public(model.scheduler.config)
        old = type(model.scheduler).from_config(model.scheduler.config)  # what the loop made before samplers
        old.set_timesteps(25)
        mine.set_timesteps(25)
        assert torch.equal(old.sigmas, mine.sigmas) and torch.equal(old.timesteps, mine.timesteps)


# ---------------------------------------------------------------- every pair runs, per seed


_FIRST_ROWS: dict = {}


@pytest.mark.parametrize("backend", ["tiny", "tiny-xl"])
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_pair_runs_and_is_deterministic_per_seed(models, backend, name):
    model = models[backend]
    for schedule in S.SAMPLERS[name].schedules:
        s = S.resolve(model.scheduler.config, name, schedule)
        out = _run(model, s, seeds=(5, 5, 6))
        assert out.shape == (3, 4, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()
        assert torch.equal(out[0], out[1]), (name, schedule)  # same seed, same latents (step noise too)
        assert (out[0] - out[2]).abs().max() > 1e-3, (name, schedule)
        _FIRST_ROWS[(backend, name, schedule)] = out[0]
    # v-prediction runs too (zero terminal SNR where the scheduler has it)
    v = S.resolve(model.scheduler.config, name, prediction="v", zero_snr=None if S.SAMPLERS[name].zero_snr else False)
    out = _run(model, v, seeds=(5,), cfg=2.0)
    assert torch.isfinite(out).all() and (out[0] - _FIRST_ROWS[(backend, name, v.schedule)]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["tiny", "tiny-xl"])
def test_different_samplers_give_different_latents(models, backend):
    rows = {}
    for name, info in S.SAMPLERS.items():
        key = (backend, name, info.default_schedule)
        if key not in _FIRST_ROWS:  # run alone (-k): make it here
            _FIRST_ROWS[key] = _run(models[backend], S.resolve(models[backend].scheduler.config, name), seeds=(5,))[0]
        rows[name] = _FIRST_ROWS[key]
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (rows[a] - rows[b]).abs().max() > 1e-4, (a, b)


@pytest.mark.parametrize("name", [n for n, i in S.SAMPLERS.items() if i.noise != "none"])
def test_stochastic_samplers_batch_rows_equal_single_runs(models, name):
    model = models["tiny"]
    s = S.resolve(model.scheduler.config, name)
    both = _run(model, s, seeds=(2, 3), steps=3, cfg=3.0)
    one = _run(model, s, seeds=(3,), steps=3, cfg=3.0)
    assert (both[1] - one[0]).abs().max() < 1e-4
    # the step noise matters: another stream (another sampling run of the same image) differs
    other = _run(model, s, seeds=(3,), steps=3, cfg=3.0, stream=1)
    assert (other[0] - one[0]).abs().max() > 1e-4


def test_step_generators_are_per_image_seed_and_frame():
    def draws(gens):
        return [torch.randn(3, generator=g) for g in gens]

    batch = draws(step_generators([5, 6], frames=2, rows=4))
    alone = draws(step_generators([6], frames=2, rows=2))
    assert torch.equal(batch[2], alone[0]) and torch.equal(batch[3], alone[1])
    assert not torch.equal(batch[0], batch[1])  # frames differ
    assert not torch.equal(draws(step_generators([5], 1, 1, stream=1))[0], draws(step_generators([5], 1, 1))[0])


# ---------------------------------------------------------------- img2img / inpaint / pinned, per scheduler kind


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_sde", "euler_a", "heun", "ddim", "lcm"])
def test_noise_levels_match_each_scheduler_kind(models, name):
    model = models["tiny"]
    s = S.resolve(model.scheduler.config, name)
    sched = fresh_scheduler(model, s)
    sched.set_timesteps(4)
    x, n = torch.ones(1, 4, 8, 8), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_noised(sched, x, n, len(sched.timesteps)), x)  # past the last step: clean
    first = _noised(sched, x, n, 0)
    if hasattr(sched, "sigmas") and not hasattr(sched, "_sigma_to_alpha_sigma_t"):
        assert torch.allclose(first, x + sched.sigmas[0] * n)  # k-diffusion: x + sigma eps
    elif not hasattr(sched, "sigmas"):
        abar = sched.alphas_cumprod[int(sched.timesteps[0])]
        assert torch.allclose(first, abar.sqrt() * x + (1 - abar).sqrt() * n)


def test_dpmpp_sde_second_evaluation_is_at_its_midpoint(models):
    model = models["tiny"]
    sched = fresh_scheduler(model, S.resolve(model.scheduler.config, "dpmpp_sde"))
    sched.set_timesteps(3)
    sched.noise_sampler_seed = [1]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
    sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    assert sched.mid_point_sigma is not None
    z, n = torch.zeros_like(x), torch.ones_like(x)
    assert torch.allclose(_noised(sched, z, n, 1), n * float(sched.mid_point_sigma))
    assert float(sched.mid_point_sigma) != float(sched.sigmas[1])


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "lcm", "dpmpp_sde", "unipc"])
def test_img2img_and_inpainting_work_for_each_kind(models, name):
    model = models["tiny"]
    s = S.resolve(model.scheduler.config, name)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    near = _run(model, s, (1,), steps=8, init=init, strength=0.15)
    far = _run(model, s, (1,), steps=8, init=init, strength=1.0)
    assert (near - init).abs().mean() < (far - init).abs().mean()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    out = _run(model, s, (1,), steps=3, init=init, mask=mask)
    assert torch.allclose(out[..., 4:], init[..., 4:])  # the kept half is the init, exactly
    assert (out[..., :4] - init[..., :4]).abs().max() > 1e-3


def test_pinned_frames_stay_known_for_a_stochastic_sampler(models):
    model = models["tiny"]
    s = S.resolve(model.scheduler.config, "euler_a")
    known = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    spec = DenoiseSpec(embeds=_embeds(model, 2, 1.0), noise=make_noise([7], 2, SIZE, SIZE), steps=3, cfg=1.0,
                       frames=2, pinned={0: known}, sampling=s, seeds=[7])
    out = denoise(model, spec)
    assert torch.equal(out[0:1], known) and (out[1] - known[0]).abs().max() > 1e-3


# ---------------------------------------------------------------- v-prediction, CFG rescale, CFG 1


def test_v_prediction_gives_other_latents_than_epsilon(models):
    model = models["tiny"]
    eps = _run(model, S.resolve(model.scheduler.config, "euler"), (3,), cfg=4.0)
    v = _run(model, S.resolve(model.scheduler.config, "euler", prediction="v"), (3,), cfg=4.0)
    v_plain = _run(model, S.resolve(model.scheduler.config, "euler", prediction="v", zero_snr=False, cfg_rescale=0),
                   (3,), cfg=4.0)
    assert torch.isfinite(v).all()
    assert (eps - v).abs().max() > 1e-3 and (v - v_plain).abs().max() > 1e-3


def test_v_prediction_detected_on_a_model_with_a_notice(capsys):
    from layerctl.backends.registry import load_model
    from layerctl.requests import GenRequest

    model = load_model("tiny", "cpu", "fp32", "sdpa")
    model.pipe.scheduler = type(model.scheduler).from_config(model.scheduler.config, prediction_type="v_prediction")
    s = job_sampling(GenRequest(prompt="x"), model)
    assert (s.prediction, s.zero_snr, s.cfg_rescale) == ("v_prediction", True, 0.7)
    assert "v-prediction" in capsys.readouterr().err
    job_sampling(GenRequest(prompt="x"), model)
    assert capsys.readouterr().err == ""  # said once per model
    assert job_sampling(GenRequest(prompt="x", prediction_type="epsilon"), model).prediction == "epsilon"
    assert fresh_scheduler(model, s).config.rescale_betas_zero_snr is True


def test_a_single_files_v_pred_key_switches_sampling_to_v(capsys):
    """A checkpoint that says v_pred (and ztsnr) of itself: its epsilon scheduler config is overridden,
    with a notice naming the checkpoint; --prediction-type / --no-zero-snr still win."""
    from layerctl.backends.registry import load_model
    from layerctl.requests import GenRequest

    model = load_model("tiny", "cpu", "fp32", "sdpa")
    assert job_sampling(GenRequest(prompt="x"), model).prediction == "epsilon"
    model.prediction_type, model.zero_terminal_snr = "v_prediction", True
    s = job_sampling(GenRequest(prompt="x"), model)
    assert (s.prediction, s.zero_snr, s.cfg_rescale) == ("v_prediction", True, 0.7)
    assert "the checkpoint says v-prediction" in capsys.readouterr().err
    assert job_sampling(GenRequest(prompt="x", prediction_type="epsilon"), model).prediction == "epsilon"
    assert job_sampling(GenRequest(prompt="x", zero_snr=False), model).zero_snr is False
    model.zero_terminal_snr = None  # v_pred without ztsnr: zero SNR follows v-prediction as for a config
    assert job_sampling(GenRequest(prompt="x"), model).zero_snr is True


def test_cfg_rescale_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, 8, 8, generator=g)
    plain = guide(pred, 7.0, 0.0)
    uncond, cond = pred.chunk(2)
    assert torch.allclose(plain, uncond + 7.0 * (cond - uncond))
    full = guide(pred, 7.0, 1.0)
    dims = list(range(1, pred.ndim))
    assert torch.allclose(full.std(dim=dims), cond.std(dim=dims), atol=1e-5)
    half = guide(pred, 7.0, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-5)


def test_cfg_1_runs_the_unet_once_per_step_on_half_the_batch(models):
    model = models["tiny-xl"]
    calls = []
    real = model.unet.forward

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return real(x, *a, **k)

    model.unet.forward = counting
    try:
        _run(model, None, (1, 2), steps=3, cfg=7.0)
        guided = list(calls)
        calls.clear()
        _run(model, None, (1, 2), steps=3, cfg=1.0)
    finally:
        del model.unet.forward
    assert guided == [4, 4, 4] and calls == [2, 2, 2]


# ---------------------------------------------------------------- CLI: errors, metadata read back by sd-parsers


def _parse(path):
    from sd_parsers import ParserManager

    info = ParserManager().parse(str(path))
    assert info is not None, path
    return info


def test_metadata_round_trips_through_sd_parsers_text_to_rgba(tmp_path):
    out = tmp_path / "cup.png"
    code, _o, err = run_cli("gen", "glass cup", "-m", "tiny", "-W", "64", "-H", "64", "--steps", "2", "--cfg", "3",
                            "--seed", "11", "--sampler", "euler_a", "--schedule", "sgm_uniform", "--no-tta",
                            "--quiet", "--out", out)
    assert code == 0, err
    info = _parse(out)
    sampler = info.samplers[0]
    assert sampler.name == "Euler a"
    assert sampler.parameters["scheduler"] == "SGM Uniform"
    assert sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "2"
    assert float(sampler.parameters["cfg_scale"]) == 3.0
    assert [p.value for p in sampler.prompts] == ["glass cup"]
    from layerctl.io.imageio import read_metadata

    meta = read_metadata(out)
    assert (meta["sampler"], meta["schedule"], meta["prediction_type"]) == ("euler_a", "sgm_uniform", "epsilon")


def test_metadata_round_trips_through_sd_parsers_layer_mode(tmp_path):
    code, _o, err = run_cli("gen", "--joint", "--fg-prompt", "cat", "--bg-prompt", "room", "-m", "tiny", "-W", "64",
                            "-H", "64", "--steps", "2", "--seed", "4", "--no-tta", "--quiet", "--out-dir", tmp_path)
    assert code == 0, err
    sampler = _parse(tmp_path / "fg.png").samplers[0]
    assert (sampler.name, sampler.parameters["scheduler"]) == ("DPM++ 2M", "Karras")  # the default
    assert sampler.parameters["seed"] == "4" and sampler.parameters["steps"] == "2"
    assert [p.value for p in sampler.prompts] == ["cat"]


@pytest.mark.parametrize("args,needle", [
    (["--sampler", "dpm_fast"], "valid: dpmpp_2m, dpmpp_2m_sde, dpmpp_sde, euler, euler_a, heun, ddim, unipc, lcm"),
    (["--schedule", "polyexponential"], "valid: karras, exponential, sgm_uniform, normal, simple"),
    (["--sampler", "ddim", "--schedule", "karras"], "valid for ddim: normal, simple, sgm_uniform"),
    (["--prediction-type", "x0"], "valid: auto, epsilon, v"),
    (["--prediction-type", "v", "--sampler", "heun"], "zero terminal SNR"),
    (["--cfg-rescale", "1.5"], "cfg_rescale must be in [0, 1]"),
])
def test_bad_sampling_options_exit_2_before_the_model_loads(tmp_path, args, needle):
    code, out, err = run_cli("gen", "x", "-m", "no/such-model", "--out", tmp_path / "a.png", *args)
    assert code == 2 and out == ""
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.png").exists()


def test_lcm_on_a_plain_model_says_so(tmp_path):
    code, _o, err = run_cli("gen", "x", "-m", "tiny", "-W", "64", "-H", "64", "--steps", "2", "--cfg", "1",
                            "--sampler", "lcm", "--no-tta", "--out", tmp_path / "a.png")
    assert code == 0, err
    assert "LCM model or LCM LoRA" in err
    assert "Sampler: LCM" in __import__("PIL.Image").Image.open(tmp_path / "a.png").text["parameters"]


def test_recipe_defaults_and_jobs_carry_the_sampler(tmp_path, monkeypatch):
    from layerctl import recipes
    from layerctl.errors import LayerctlError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "defaults: {model: tiny, size: 64, sampler: euler, schedule: karras, cfg_rescale: 0.3}\n"
        "jobs:\n  - gen: {prompt: a}\n  - gen: {prompt: b, sampler: ddim, schedule: sgm_uniform}\n", encoding="utf-8")
    jobs = recipes.plan_recipe(tmp_path / "r.yaml").jobs
    assert [(j.request.sampler, j.request.schedule, j.request.cfg_rescale) for j in jobs] == [
        ("euler", "karras", 0.3), ("ddim", "sgm_uniform", 0.3)]
    (tmp_path / "bad.yaml").write_text("jobs:\n  - gen:\n      prompt: a\n      sampler: dpm3\n", encoding="utf-8")
    with pytest.raises(LayerctlError) as ei:
        recipes.plan_recipe(tmp_path / "bad.yaml")
    assert "bad.yaml:" in str(ei.value) and "valid: dpmpp_2m" in str(ei.value)


def test_every_sampling_command_honours_the_sampler(tmp_path):
    from layerctl.io.imageio import read_metadata

    common = ["-m", "tiny", "--steps", "2", "--no-tta", "--quiet", "--seed", "3"]
    src = tmp_path / "src.png"
    assert run_cli("gen", "cup", "-W", "64", "-H", "64", *common, "--out", src)[0] == 0
    runs = {
        "img2img": ("gen", "cup", "--init", src, "--strength", "0.5", "--sampler", "heun", "--out", tmp_path / "i.png"),
        "hires": ("gen", "cup", "-W", "64", "-H", "64", "--hires", "2", "--sampler", "ddim", "--schedule",
                  "sgm_uniform", "--out", tmp_path / "h.png"),
        "upscale": ("upscale", src, "--scale", "2", "--prompt", "cup", "--sampler", "euler_a", "--out",
                    tmp_path / "u.png"),
        "decompose": ("decompose", src, "--bg", src, "--sampler", "dpmpp_2m_sde", "--schedule", "exponential",
                      "--out-dir", tmp_path / "d"),
    }
    want = {"img2img": ("heun", "normal"), "hires": ("ddim", "sgm_uniform"), "upscale": ("euler_a", "normal"),
            "decompose": ("dpmpp_2m_sde", "exponential")}
    files = {"img2img": tmp_path / "i.png", "hires": tmp_path / "h.png", "upscale": tmp_path / "u.png",
             "decompose": tmp_path / "d" / "fg.png"}
    for kind, argv in runs.items():
        code, _o, err = run_cli(*argv, *common)
        assert code == 0, (kind, err)
        meta = read_metadata(files[kind])
        assert (meta["sampler"], meta["schedule"]) == want[kind], kind
