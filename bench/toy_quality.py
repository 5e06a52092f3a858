"""Quality figures of the bundled toy model (docs/toy-model.md).

    python bench/toy_quality.py --seeds 4 --json runs/toy/quality.json

1. prompt -> shape accuracy: `layerctl gen "<colour> <shape>"` (rgba mode) over seeds; the
   generated alpha is classified by template IoU against the ten toy shapes (templates drawn
   by the scene source at several sizes and offsets). The classifier's own accuracy on
   ground-truth scene alphas is reported next to it.
2. body alpha: mean alpha over the object's body (the object mask, alpha above a quarter of
   its 95th percentile, eroded by 2 px so the anti-aliased rim does not count) for
   "glass <shape>" and "<colour> <shape>" (solid) prompts, with the same figure on the
   ground-truth scenes; also the mean over every pixel with alpha > 0.05 ("object alpha").
3. transparency VAE, from the shipped encoder/decoder: alpha PSNR and composite RGB PSNR (9
   backgrounds) on held-out procedural RGBA scenes (a seed no stage trained on), against the
   zero-initialised pair (offset 0, decoder output 0) of the same architecture.
4. generation time of one 64x64 image (steps as given, 8-way TTA decode), model loaded.
5. shipped size of layerctl/toy_weights/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerctl.training.toy_metrics import (  # noqa: E402
    CLASSIFY_SHAPES, body_alpha_mean, classify, object_alpha_mean, templates,
)
from layerctl.training.scenes import SHAPES  # noqa: E402


def ground_truth(n: int = 300):
    from layerctl.training.scenes import SceneSource

    temps = templates()
    src = SceneSource(seed=12345)
    hits = total = 0
    means = {"solid": [], "glass": [], "smoke": []}
    body = {"solid": [], "glass": [], "smoke": []}
    for i in range(n):
        s = src(i)
        a = s.fg[..., 3]
        means[s.obj.material].append(object_alpha_mean(a))
        if s.obj.shape != "tuft":
            body[s.obj.material].append(body_alpha_mean(a))
        if s.obj.shape == "tuft":
            continue
        if s.obj.shape in CLASSIFY_SHAPES and s.obj.material == "solid":
            total += 1
            hits += classify(a, temps)[0] == s.obj.shape
    return {"classifier_accuracy_on_data": hits / max(total, 1), "n": total,
            "alpha_mean_data_without_hair": {k: float(np.mean(v)) for k, v in means.items() if v},
            "body_alpha_data_without_hair": {k: float(np.mean(v)) for k, v in body.items() if v}}


def transparent_vae_figures(n: int = 64, seed: int = 424242) -> dict:
    """Shipped transparency encoder/decoder vs the zero-initialised pair, on n held-out scenes."""
    import torch

    from layerctl.models import transparent_vae as tv
    from layerctl.backends.toy import weight_path
    from layerctl.core.imagemath import pad_rgb
    from layerctl.training.scenes import SceneSource
    from layerctl.training.vae import evaluate, load_decoder_any, load_frozen_vae

    src = SceneSource(seed=seed)
    rgba = np.stack([src(i).fg for i in range(n)])
    padded = np.stack([pad_rgb(x) for x in rgba])
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()  # noqa: E731
    batches = [{"rgba": to_t(rgba[i : i + 16]), "padded": to_t(padded[i : i + 16])} for i in range(0, n, 16)]
    model = load_frozen_vae("toy", torch.device("cpu"))
    enc = tv.load_encoder(weight_path("encoder")).float().eval()
    dec = load_decoder_any(weight_path("decoder")).float().eval()
    shipped = evaluate(model, enc, dec, batches, tta=False)
    zero_dec = tv.new_decoder(seed=0, block_out_channels=tuple(dec.block_out_channels)).float().eval()
    baseline = evaluate(model, tv.new_encoder(seed=0).float().eval(), zero_dec, batches, tta=False)
    return {"held_out_images": n, "seed": seed, "shipped": shipped, "zero_init": baseline}


def generate(prompts: list[str], seeds: list[int], steps: int, cfg: float | None, out_dir: Path, model: str = "toy"):
    from PIL import Image

    from layerctl.api import Session
    from layerctl.requests import GenRequest

    alphas, times = {}, []
    with Session(quiet=True) as s:
        for p in prompts:
            for seed in seeds:
                path = out_dir / f"{p.replace(' ', '_')}_{seed}.png"
                t = time.perf_counter()
                s.gen(GenRequest(prompt=p, model=model, out=str(path), seed=seed, steps=steps, cfg=cfg, device="cpu", overwrite=True))
                times.append(time.perf_counter() - t)
                alphas[(p, seed)] = np.asarray(Image.open(path), dtype=np.float32)[..., 3] / 255.0
    return alphas, times


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=100, help="seeds per prompt (issue 9: 100)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--keep", default=None, help="folder to keep the generated PNGs in")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    temps = templates()
    seeds = list(range(1, args.seeds + 1))
    colours = ["red", "blue", "yellow", "green", "purple"]
    # 10 prompts: 7 solid shapes + 3 glass ones (issue 9: 10 prompts x 100 seeds)
    solid = [f"{colours[i % len(colours)]} {SHAPES[s]}" for i, s in enumerate(CLASSIFY_SHAPES) if s != "glass"]
    glass = [f"glass {SHAPES[s]}" for s in ("cup", "ball", "bottle")]
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="toyq-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    alphas, times = generate(solid + glass, seeds, args.steps, args.cfg, out_dir, args.model)

    per_prompt, hits, total = {}, 0, 0
    for p in solid + glass:
        want = next(s for s in CLASSIFY_SHAPES if p.endswith(SHAPES[s]))
        got = [classify(alphas[(p, sd)], temps) for sd in seeds]
        ok = sum(g[0] == want for g in got)
        hits, total = hits + ok, total + len(seeds)
        counts = {}
        for g in got:
            counts[g[0]] = counts.get(g[0], 0) + 1
        per_prompt[p] = {"correct": ok, "of": len(seeds), "predicted": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
                         "alpha_mean": float(np.mean([object_alpha_mean(alphas[(p, sd)]) for sd in seeds])),
                         "body_alpha": float(np.mean([body_alpha_mean(alphas[(p, sd)]) for sd in seeds])),
                         "body_alpha_per_seed": [round(body_alpha_mean(alphas[(p, sd)]), 3) for sd in seeds]}
    solid_body = [b for p in solid for b in per_prompt[p]["body_alpha_per_seed"]]
    glass_body = [b for p in glass for b in per_prompt[p]["body_alpha_per_seed"]]
    report = {
        "shape_accuracy": hits / total,
        "chance": 1 / len(CLASSIFY_SHAPES),
        "body_alpha_solid_prompts": float(np.mean(solid_body)),
        "body_alpha_glass_prompts": float(np.mean(glass_body)),
        "share_solid_body_above_0.9": float(np.mean([b > 0.9 for b in solid_body])),
        "share_glass_body_in_0.2_0.8": float(np.mean([0.2 <= b <= 0.8 for b in glass_body])),
        "alpha_mean_solid_prompts": float(np.mean([per_prompt[p]["alpha_mean"] for p in solid])),
        "alpha_mean_glass_prompts": float(np.mean([per_prompt[p]["alpha_mean"] for p in glass])),
        "seconds_per_image_median": float(np.median(times[1:] if len(times) > 1 else times)),
        "steps": args.steps,
        "per_prompt": per_prompt,
        "ground_truth": ground_truth(),
        "images": str(out_dir),
    }
    wdir = ROOT / "layerctl" / "toy_weights"
    files = {p.name: p.stat().st_size for p in sorted(wdir.glob("*.safetensors"))}
    report["shipped_bytes"] = sum(files.values())
    report["shipped_files"] = files
    report["transparent_vae"] = transparent_vae_figures()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
