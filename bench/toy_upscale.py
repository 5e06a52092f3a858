"""Does `upscale` keep the toy model's shapes? (issue 14)

    python bench/toy_upscale.py                          # strengths 0.5 and 0.2, 5 prompts x 4 seeds
    python bench/toy_upscale.py --strengths 0.5,0.35,0.2 --seeds 8 --json out.json

Each source is a `gen` picture of the shipped toy model (64x64, seeds 1..N); each is upscaled x2 at every
strength, through `Session.upscale` exactly as `layerctl upscale --strength S`. Per strength:

- IoU of the object's mask (alpha > 0.2) of the result, resized back to 64x64, with the source's;
- share of results with a hole inside the object where the source had none (`toy_metrics.has_hole`);
- share of results with a stray speck (`toy_metrics.has_speck`);
- mean |alpha difference|.
All on the result resized back to 64x64 (the measures' own scale; glass bodies count as holes there, so
only a hole the source did not have counts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = ("glass cup", "red ball", "yellow bottle", "blue ring", "purple star")


def _alpha(path, size=None) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGBA")
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)[..., 3] / 255.0


def measure(a0: np.ndarray, small: np.ndarray) -> dict:
    """One result: `a0` the source alpha, `small` the upscaled alpha resized back to the source size."""
    from layerctl.training.toy_metrics import has_hole, has_speck, iou

    return {"iou": iou(a0 > 0.2, small > 0.2), "new_hole": bool(has_hole(small) and not has_hole(a0)),
            "speck": bool(has_speck(small)), "alpha_mae": float(np.abs(small - a0).mean())}


def main(argv=None) -> int:
    import torch

    from common import machine_info, write_json
    from layerctl.api import Session
    from layerctl.requests import GenRequest, UpscaleRequest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strengths", default="0.5,0.2")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, help="folder to keep the sources and results in (to look at them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    strengths = [float(s) for s in args.strengths.split(",")]
    rows: dict[float, list] = {s: [] for s in strengths}
    with tempfile.TemporaryDirectory() as scratch, Session(quiet=True) as session:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for prompt in PROMPTS:
            for seed in range(1, args.seeds + 1):
                src = Path(tmp) / f"{prompt.replace(' ', '_')}_{seed}.png"
                session.gen(GenRequest(prompt=prompt, model="toy", out=str(src), seed=seed, device="cpu"))
                a0 = _alpha(src)
                for s in strengths:
                    out = src.with_name(f"{src.stem}_x2_{s}.png")
                    session.upscale(UpscaleRequest(image=str(src), prompt=prompt, model="toy", out=str(out), seed=seed,
                                                   strength=s, device="cpu"))
                    rows[s].append({"prompt": prompt, "seed": seed, **measure(a0, _alpha(out, a0.shape[0]))})
    report = {"bench": "toy_upscale", "machine": machine_info(), "images": len(PROMPTS) * args.seeds, "strengths": {}}
    for s, r in rows.items():
        summary = {"iou": float(np.mean([x["iou"] for x in r])), "iou_min": float(np.min([x["iou"] for x in r])),
                   "new_holes": float(np.mean([x["new_hole"] for x in r])), "specks": float(np.mean([x["speck"] for x in r])),
                   "alpha_mae": float(np.mean([x["alpha_mae"] for x in r]))}
        summary["per_prompt"] = {p: float(np.mean([x["iou"] for x in r if x["prompt"] == p])) for p in PROMPTS}
        summary["worst"] = sorted(r, key=lambda x: x["iou"])[:3]
        report["strengths"][str(s)] = summary
        print(f"strength {s}: mask IoU with the source {summary['iou']:.3f} (min {summary['iou_min']:.2f}), new holes "
              f"{summary['new_holes']:.0%}, specks {summary['specks']:.0%}, mean |alpha difference| {summary['alpha_mae']:.3f}")
        print("  IoU per prompt: " + ", ".join(f"{p} {v:.3f}" for p, v in summary["per_prompt"].items()))
        print("  new holes: " + (", ".join(f"{x['prompt']} seed {x['seed']}" for x in r if x["new_hole"]) or "none"))
    if args.json:
        write_json(args.json, report, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
