"""Which shapes does the toy model's base UNet draw, before any LoRA? (issue 14)

    python bench/toy_base_shapes.py                                   # the four prompts below, 30 seeds
    python bench/toy_base_shapes.py --prompts "red cup,purple star" --seeds 50 --json out.json

The base model (the shipped `toy` UNet, no transparent LoRA) learnt foreground rows as the object over
plain grey (0.5), captioned like "red cup". So its own picture of "red cup" can be measured without the
transparency VAE: the object's mask is where the picture leaves the grey (max over RGB of |x − 0.5| >
0.12), classified by the same template IoU as `bench/toy_quality.py`. The same mask on the toy world's own
foregrounds over grey gives the measure's ceiling, printed beside it. A shape the base model cannot draw
is one a LoRA on it has to learn by itself: this tells the transparent LoRA's limits from the base's.
The same scenes through the folder's base VAE (encoded, posterior mean, decoded) give the ceiling of any
UNet on that VAE (`--vae-only` prints just the ceilings, for a folder whose UNet is not trained yet):

    python bench/toy_base_shapes.py --vae-only --reference 100 --model-dir runs/toy/w128

Also printed: how much the pictures of one prompt differ between seeds (mean |difference| of each
picture from the prompt's mean picture), beside the same figure for 30 of the world's own scenes. A
spread far below the world's means the model draws one picture whatever the seed (for the toy base: a
faint dot for colour + shape captions such as "purple star", while "glass star" varies as the world does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = ("red cup", "glass cup", "purple star", "blue ring")
GREY, THRESHOLD = 0.5, 0.12


def grey_mask(rgb: np.ndarray) -> np.ndarray:
    """Where an (H, W, 3) picture in [0, 1] leaves the plain grey its foreground rows were drawn on."""
    return (np.abs(rgb - GREY).max(-1) > THRESHOLD).astype(np.float32)


def scene_reference(prompt: str, n: int, size: int = 64, seed: int = 99, vae=None) -> dict:
    """The toy world's own scenes for `prompt`, over grey: the share the mask + classifier get right (the
    measure's ceiling), how much they differ from their mean picture (the seed spread a model that draws
    the world's variety would have) and, with `vae`, the share still right after the VAE's round trip
    (posterior mean): the ceiling of any UNet on that VAE, which draws latents only."""
    from layerctl.training.scenes import COLOURS, MATERIALS, SceneSource
    from layerctl.training.toy_metrics import classify

    words = prompt.split()
    shape = words[-1]
    material = next((w for w in words[:-1] if w in MATERIALS), "solid")
    colour = [w for w in words[:-1] if w in COLOURS]
    src = SceneSource(seed, shapes=[shape], materials=[material], colours=colour or None)
    pictures = []
    for i in range(n):
        fg = src(i, size).fg
        a = fg[..., 3:]
        pictures.append(fg[..., :3] * a + GREY * (1 - a))
    share = lambda pics: sum(classify(grey_mask(p))[0] == shape for p in pics) / n  # noqa: E731
    out = {"ceiling": share(pictures), "world_spread": spread(pictures)}
    if vae is not None:
        out["vae_ceiling"] = share(vae_round_trip(vae, pictures))
    return out


def vae_round_trip(vae, pictures, chunk: int = 32) -> list:
    """Pictures [H,W,3] in [0,1] encoded (posterior mean) and decoded by `vae`."""
    import torch

    out = []
    for i in range(0, len(pictures), chunk):
        x = torch.from_numpy(np.stack(pictures[i : i + chunk])).permute(0, 3, 1, 2).float() * 2 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out += list(((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    return out


def spread(pictures) -> float:
    """Mean |difference| of each picture from the pictures' mean."""
    stack = np.stack(pictures)
    return float(np.abs(stack - stack.mean(0)).mean())


def measure(prompts, seeds: int, steps: int, cfg: float, model_dir=None, reference: int = 30) -> dict:
    """Per prompt: what the base UNet draws over `seeds` seeds (seeds 0: nothing drawn, for a folder whose
    UNet is not trained yet) beside the scenes' own figures and the VAE's ceiling on `reference` scenes."""
    import torch

    from layerctl.backends.toy import load_toy
    from layerctl.training.toy_metrics import classify

    pipe = load_toy("cpu", torch.float32, folder=Path(model_dir) if model_dir else None, with_unet=seeds > 0)
    pipe.set_progress_bar_config(disable=True)
    size = int(pipe.unet.config.sample_size) * 8  # the toy world's size these weights were trained at
    report = {}
    for prompt in prompts:
        shape = prompt.split()[-1]
        pictures, drawn = [], {}
        for seed in range(1, seeds + 1):
            g = torch.Generator().manual_seed(seed)
            rgb = pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, generator=g, height=size, width=size,
                       output_type="np").images[0]
            pictures.append(rgb)
            got = classify(grey_mask(rgb))[0]
            drawn[got] = drawn.get(got, 0) + 1
        report[prompt] = {
            "right": drawn.get(shape, 0), "of": seeds,
            "drawn": dict(sorted(drawn.items(), key=lambda kv: -kv[1])),
            "seed_spread": spread(pictures) if pictures else None,
            "size": size, **scene_reference(prompt, reference, size, vae=pipe.vae),
        }
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated toy prompts ('<colour|glass> <shape>')")
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--model-dir", default=None, help="a folder of candidate toy weights (default: the shipped ones)")
    ap.add_argument("--reference", type=int, default=30, help="the toy world's own scenes per prompt for the ceilings")
    ap.add_argument("--vae-only", action="store_true",
                    help="only the ceilings (scenes, and scenes through the folder's VAE): no UNet needed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 4 steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 2, 4
    from common import machine_info, set_threads, write_json

    from layerctl.training.toy_metrics import CLASSIFY_SHAPES

    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    bad = [p for p in prompts if p.split()[-1] not in CLASSIFY_SHAPES]
    if bad:
        ap.error(f"prompt(s) {bad} do not end with a shape the classifier knows ({', '.join(CLASSIFY_SHAPES)})")
    set_threads(args.threads)
    report = {"bench": "toy_base_shapes", "machine": machine_info(), "seeds": args.seeds, "steps": args.steps,
              "cfg": args.cfg, "prompts": measure(prompts, 0 if args.vae_only else args.seeds, args.steps, args.cfg,
                                                  args.model_dir, args.reference)}
    for p, r in report["prompts"].items():
        ceilings = (f"same measure on the scenes {r['ceiling']:.0%}, on the scenes through the VAE "
                    f"{r['vae_ceiling']:.0%} ({r['size']}x{r['size']})")
        if args.vae_only:
            print(f"{p}: {ceilings}")
            continue
        drawn = ", ".join(f"{k} {v}" for k, v in r["drawn"].items())
        print(f"{p}: base model right {r['right']}/{r['of']} (drawn: {drawn}); {ceilings}; "
              f"seed spread {r['seed_spread']:.3f} (the scenes' own {r['world_spread']:.3f})")
    if args.json:
        write_json(args.json, report, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
