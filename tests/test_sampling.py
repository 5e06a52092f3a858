"""The one sampling loop (layerctl.pipelines.sampling): seeds, CFG, img2img, masks, frames."""

from __future__ import annotations

import pytest
import torch

from layerctl.pipelines.sampling import DenoiseSpec, denoise, make_noise, plan_timesteps


@pytest.fixture(scope="module")
def tiny():
    from layerctl.backends.registry import load_model

    return load_model("tiny", "cpu", "fp32", "sdpa")


def _spec(model, seeds=(1,), steps=3, cfg=5.0, **kw):
    n = len(seeds)
    embeds = model.encode_prompt(["glass cup"] * n, ["bad"] * n, cfg > 1.0, 64, 64)
    return DenoiseSpec(embeds=embeds, noise=make_noise(list(seeds), 1, 64, 64), steps=steps, cfg=cfg, **kw)


def test_noise_is_per_seed_and_frame_fastest():
    a = make_noise([5, 6], 2, 64, 64)
    assert a.shape == (4, 4, 8, 8)
    assert torch.equal(a[2:], make_noise([6], 2, 64, 64))  # image 1 = a run with its own seed
    assert not torch.equal(a[0], a[1])


def test_same_seed_same_latents_and_batch_rows_match_single_runs(tiny):
    one = denoise(tiny, _spec(tiny, seeds=(3,)))
    again = denoise(tiny, _spec(tiny, seeds=(3,)))
    assert torch.equal(one, again)
    both = denoise(tiny, _spec(tiny, seeds=(2, 3)))
    assert (both[1:] - one).abs().max() < 1e-4
    assert (both[0] - one[0]).abs().max() > 1e-3


def test_cfg_changes_the_result_and_cfg_1_runs_one_unet_pass_per_step(tiny):
    calls = []
    real = tiny.unet.forward

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return real(x, *a, **k)

    tiny.unet.forward = counting
    try:
        guided = denoise(tiny, _spec(tiny, cfg=5.0))
        n_guided = list(calls)
        calls.clear()
        plain = denoise(tiny, _spec(tiny, cfg=1.0))
    finally:
        del tiny.unet.forward
    assert n_guided == [2, 2, 2] and calls == [1, 1, 1]
    assert (guided - plain).abs().max() > 1e-3


def test_img2img_strength_runs_the_last_steps_only(tiny):
    sched = type(tiny.scheduler).from_config(tiny.scheduler.config)
    ts, start = plan_timesteps(sched, 10, 0.3, "cpu")
    assert len(ts) == 3 and start == 7 * sched.order
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    near = denoise(tiny, _spec(tiny, steps=10, init=init, strength=0.05))
    far = denoise(tiny, _spec(tiny, steps=10, init=init, strength=0.9))
    assert (near - init).abs().mean() < (far - init).abs().mean()


def test_masked_inpainting_keeps_the_known_latents_exactly_outside(tiny):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    out = denoise(tiny, _spec(tiny, init=init, mask=mask))
    keep = mask.expand_as(out) == 0
    assert torch.equal(out[keep], init[keep])
    assert (out[~keep] - init[~keep]).abs().mean() > 1e-2


def test_pinned_frames_end_as_the_known_latent(tiny):
    known = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    embeds = tiny.encode_prompt(["x"], ["y"], False, 64, 64)
    from layerctl.models.attention_sharing import repeat_frames

    embeds.hidden = repeat_frames(embeds.hidden, 2)
    spec = DenoiseSpec(embeds=embeds, noise=make_noise([4], 2, 64, 64), steps=2, cfg=1.0, frames=2, pinned={1: known})
    out = denoise(tiny, spec)
    assert torch.equal(out[1:2], known) and not torch.equal(out[0:1], known)


def test_progress_reports_every_step(tiny):
    seen = []
    denoise(tiny, _spec(tiny, steps=4, progress=lambda d, t: seen.append((d, t))))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
