"""Quality figures of the bundled toy model (docs/toy-model.md).

    python bench/toy_quality.py --seeds 4 --json runs/toy/quality.json

1. prompt -> shape accuracy: `layerctl gen "<colour> <shape>"` (rgba mode) over seeds; the
   generated alpha is classified by template IoU against the ten toy shapes (templates drawn
   by the scene source at several sizes and offsets). The classifier's own accuracy on
   ground-truth scene alphas is reported next to it.
2. alpha means: mean alpha over the object (alpha > 0.05) for "glass <shape>" and for
   "<colour> <shape>" (solid) prompts, with the ground-truth figures of the training data.
3. generation time of one 64x64 image (steps as given, 8-way TTA decode), model loaded.
4. shipped size of layerctl/toy_weights/.
The transparency-VAE figures (alpha PSNR, composite PSNR vs the zero-init baseline) come
from the train-vae run's validation log (--vae-run).
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

from layerctl.training.scenes import SHAPES, SceneObject, draw_scene_object  # noqa: E402

CLASSIFY_SHAPES = [s for s in SHAPES if s not in ("puff", "tuft")]  # puff/tuft have no crisp outline


def templates(size: int = 64) -> dict[str, list[np.ndarray]]:
    """shape -> binary masks at several radii and offsets (solid material)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out: dict[str, list[np.ndarray]] = {}
    for shape in CLASSIFY_SHAPES:
        masks = []
        for r in (0.26, 0.31, 0.36):
            for dx in (-0.08, 0.0, 0.08):
                for dy in (-0.08, 0.0, 0.08):
                    for k in range(2 if shape == "leaf" else 1):
                        rng = np.random.default_rng(k)
                        obj = SceneObject(shape, "solid", "red", size / 2 + dx * size, size / 2 + dy * size, r * size)
                        _, a = draw_scene_object(x, y, obj, rng)
                        masks.append(a > 0.5)
                        if shape in ("cup", "leaf"):
                            masks.append((a > 0.5)[:, ::-1])
        out[shape] = masks
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def classify(alpha: np.ndarray, temps) -> tuple[str, float]:
    """Best-IoU shape of an alpha map (object = alpha above a quarter of its 95th percentile)."""
    hi = float(np.percentile(alpha, 95))
    mask = alpha > max(0.05, 0.25 * hi)
    best, score = "none", 0.0
    for shape, masks in temps.items():
        s = max(iou(mask, m) for m in masks)
        if s > score:
            best, score = shape, s
    return best, score


def object_alpha_mean(alpha: np.ndarray) -> float:
    m = alpha > 0.05
    return float(alpha[m].mean()) if m.any() else 0.0


def ground_truth(n: int = 300):
    from layerctl.training.scenes import SceneSource

    temps = templates()
    src = SceneSource(seed=12345)
    hits = total = 0
    means = {"solid": [], "glass": [], "smoke": []}
    for i in range(n):
        s = src(i)
        a = s.fg[..., 3]
        means[s.obj.material].append(object_alpha_mean(a))
        if s.obj.shape == "tuft":
            continue
        if s.obj.shape in CLASSIFY_SHAPES and s.obj.material == "solid":
            total += 1
            hits += classify(a, temps)[0] == s.obj.shape
    return {"classifier_accuracy_on_data": hits / max(total, 1), "n": total,
            "alpha_mean_data_without_hair": {k: float(np.mean(v)) for k, v in means.items() if v}}


def generate(prompts: list[str], seeds: list[int], steps: int, cfg: float | None, out_dir: Path, model: str = "toy"):
    from PIL import Image

    from layerctl.api import Session
    from layerctl.requests import GenRequest

    from layerctl.backends.toy import weight_path

    files = dict(transparent_decoder=str(weight_path("decoder")), layer_weights=str(weight_path("rgba")))
    alphas, times = {}, []
    with Session(quiet=True) as s:
        for p in prompts:
            for seed in seeds:
                path = out_dir / f"{p.replace(' ', '_')}_{seed}.png"
                t = time.perf_counter()
                s.gen(GenRequest(prompt=p, model=model, out=str(path), seed=seed, steps=steps, cfg=cfg, device="cpu", overwrite=True, **files))
                times.append(time.perf_counter() - t)
                alphas[(p, seed)] = np.asarray(Image.open(path), dtype=np.float32)[..., 3] / 255.0
    return alphas, times


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--vae-run", default=str(ROOT / "runs" / "toy" / "train-vae-2"))
    ap.add_argument("--keep", default=None, help="folder to keep the generated PNGs in")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    temps = templates()
    seeds = list(range(1, args.seeds + 1))
    colours = ["red", "blue", "yellow", "green", "purple"]
    solid = [f"{colours[i % len(colours)]} {SHAPES[s]}" for i, s in enumerate(CLASSIFY_SHAPES) if s != "glass"]
    glass = [f"glass {SHAPES[s]}" for s in ("cup", "ball", "bottle", "star")] + ["glass"]
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="toyq-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    alphas, times = generate(solid + glass, seeds, args.steps, args.cfg, out_dir, args.model)

    per_prompt, hits, total = {}, 0, 0
    for p in solid + glass:
        want = "glass" if p == "glass" else next(s for s in CLASSIFY_SHAPES if p.endswith(SHAPES[s]))
        got = [classify(alphas[(p, sd)], temps) for sd in seeds]
        ok = sum(g[0] == want for g in got)
        hits, total = hits + ok, total + len(seeds)
        per_prompt[p] = {"correct": ok, "of": len(seeds), "predicted": [g[0] for g in got],
                         "alpha_mean": float(np.mean([object_alpha_mean(alphas[(p, sd)]) for sd in seeds]))}
    solid_mean = float(np.mean([per_prompt[p]["alpha_mean"] for p in solid]))
    glass_mean = float(np.mean([per_prompt[p]["alpha_mean"] for p in glass if p != "glass"] + [per_prompt["glass"]["alpha_mean"]]))
    report = {
        "shape_accuracy": hits / total,
        "chance": 1 / len(CLASSIFY_SHAPES),
        "alpha_mean_solid_prompts": solid_mean,
        "alpha_mean_glass_prompts": glass_mean,
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
    vlog = Path(args.vae_run)
    if vlog.is_dir():
        for cand in sorted(vlog.glob("*.jsonl")):
            rows = [json.loads(l) for l in cand.read_text().splitlines() if l.strip()]
            vals = [r for r in rows if r.get("kind") == "val"]
            if vals:
                report["transparent_vae"] = {"first": vals[0], "last": vals[-1], "log": cand.name}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
