"""bench/sampler_overhead: the samplers in layerctl's loop against diffusers' own, and what --cfg 1 saves.

    python bench/sampler_overhead.py             # tiny-xl, 128 px, 20 steps, 5 interleaved rounds
    python bench/sampler_overhead.py --quick     # 64 px, 2 steps, 1 round (smoke test)

In-process, time.perf_counter, CPU (or --device cuda), on the tiny-xl backend (SDXL-shaped: two
text encoders, pooled embeddings, time ids). One model object; every case interleaved (one round =
every case once), same prompt, negative, seed, size and steps:

  cfg7 / cfg1     layerctl's loop (prompt encoding + layerctl.pipelines.sampling.denoise), DPM++ 2M
                  Karras, CFG 7 vs CFG 1: CFG 1 runs no unconditional pass, so one UNet evaluation
                  of half the batch per step (expected ratio cfg1 / cfg7 about 0.5 where the UNet
                  dominates)
  <sampler>       per sampler at its default schedule, CFG 7: layerctl's loop (encode + denoise)
  plain-<sampler> the same components in a plain diffusers StableDiffusionXLPipeline with diffusers'
                  own scheduler object for that sampler (built from the same config by
                  layerctl.core.samplers.build_scheduler), output_type="latent"

Target (issue 17): layerctl / plain <= 1.05x per sampler (both run the same steps, so the ratio of
the totals is the ratio per step); the table also gives ms per UNet evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, add_loop_args, apply_loop_args, interleave, machine_info, median, print_header  # noqa: E402

TARGET = 1.05
PROMPT = "glass cup, high quality"
NEGATIVE = "bad, ugly"
SEED = 1234


def layerctl_run(model, sampling, size: int, steps: int, cfg: float):
    from layerctl.pipelines.sampling import DenoiseSpec, denoise, make_noise

    embeds = model.encode_prompt([PROMPT], [NEGATIVE], cfg > 1.0, size, size)
    spec = DenoiseSpec(embeds=embeds, noise=make_noise([SEED], 1, size, size), steps=steps, cfg=cfg,
                       sampling=sampling, seeds=[SEED])
    return denoise(model, spec)


def plain_run(pipe, size: int, steps: int, cfg: float):
    import torch

    g = torch.Generator("cpu").manual_seed(SEED)
    return pipe(prompt=[PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=steps, guidance_scale=cfg,
                height=size, width=size, generator=g, output_type="latent").images


def plain_pipe(model, sampling):
    """A plain diffusers SDXL pipeline over the model's own components with diffusers' scheduler."""
    from diffusers import StableDiffusionXLPipeline

    from layerctl.core.samplers import build_scheduler

    p = model.pipe
    pipe = StableDiffusionXLPipeline(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                                     tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2, unet=p.unet,
                                     scheduler=build_scheduler(sampling, model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_evals(model, sampling, steps: int) -> int:
    from layerctl.pipelines.sampling import fresh_scheduler

    sched = fresh_scheduler(model, sampling)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="width = height in px, multiple of 64 (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--samplers", default=None, help="comma-separated sampler names (default: all)")
    add_loop_args(ap)
    args = ap.parse_args(argv)
    apply_loop_args(args)

    import torch

    from layerctl.backends.registry import load_model
    from layerctl.core.samplers import SAMPLERS, resolve

    names = [s.strip() for s in args.samplers.split(",")] if args.samplers else list(SAMPLERS)
    info = machine_info()
    info.update(model="tiny-xl", size=args.size, steps=args.steps, device=args.device)
    print_header("sampler_overhead", info)
    rep = Report("sampler_overhead", info)
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else None
    model = load_model("tiny-xl", args.device, "auto", "sdpa")
    choices = {n: resolve(model.scheduler.config, n) for n in names}
    pipes = {n: plain_pipe(model, s) for n, s in choices.items()}
    default = resolve(model.scheduler.config)
    S, N = args.size, args.steps

    # sanity: with a deterministic sampler the plain pipeline reproduces layerctl's latents
    for n in [n for n in names if SAMPLERS[n].noise == "none"][:2]:
        diff = float((layerctl_run(model, choices[n], S, N, 7.0).cpu() - plain_run(pipes[n], S, N, 7.0).cpu()).abs().max())
        rep.value(f"{n}: max |latent(layerctl) - latent(plain)|", diff, "", target="< 1e-3 (same arithmetic)",
                  met=diff < 1e-3)

    cases = [("cfg7", lambda: layerctl_run(model, default, S, N, 7.0)),
             ("cfg1", lambda: layerctl_run(model, default, S, N, 1.0))]
    for n in names:
        cases.append((n, lambda n=n: layerctl_run(model, choices[n], S, N, 7.0)))
        cases.append((f"plain-{n}", lambda n=n: plain_run(pipes[n], S, N, 7.0)))
    print(f"# tiny-xl: {S}x{S}, {N} steps, samplers {', '.join(names)}", flush=True)
    times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
    rep.ratio("cfg 1 / cfg 7, same steps (DPM++ 2M Karras, layerctl)", times, "cfg1", "cfg7")
    for n in names:
        label = f"{n} ({choices[n].labels[0]} {choices[n].labels[1]}): layerctl / plain diffusers"
        rep.ratio(label, times, n, f"plain-{n}", TARGET)
        evals = unet_evals(model, choices[n], N)
        rep.value(f"{n}: layerctl ms per UNet evaluation ({evals} evaluations)",
                  round(1000 * median(times[n]) / evals, 2), "ms")
    rep.dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
