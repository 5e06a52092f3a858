"""train-vae speed on the CPU (tiny backend), and optionally a "does it learn" run.

    python bench/train_vae_speed.py                      # steps/s, narrow decoder, 1 and 2 threads
    python bench/train_vae_speed.py --official           # also the official-layout decoder (104M params)
    python bench/train_vae_speed.py --learn 300          # the smoke recipe for 300 steps: alpha PSNR before/after

Speed: a few optimizer steps of the real loop (`layerctl.training.vae.train`, tiny
backend, synthetic 64x64 data, no validation, no checkpoints in the timed part),
timed from the loop's own log (steps/s over the steps after the first). Prints one
JSON line per configuration on stdout and a table on stderr.

--learn N: runs recipes/train-vae-smoke.yaml for N steps and prints the held-out
metrics at step 0 (the zero-initialised baseline) and at the end.

Numbers depend on the machine and on its load; docs/train-vae.md lists measured ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out_dir: str, steps: int, threads: int, batch: int, official: bool, resolution: int):
    from layerctl.training.vae import VAETrainConfig

    return VAETrainConfig.model_validate(
        {
            "out_dir": out_dir,
            "steps": steps,
            "batch_size": batch,
            "mixed_precision": "no",
            "cpu_threads": threads,
            "save_dtype": "fp32",
            "checkpoint_every": 10**6,
            "val_every": 10**6,
            "val_at_start": False,
            "log_every": 1,
            "model": {"model": "tiny", "device": "cpu", "decoder_channels": None if official else [8, 8, 16, 16, 32, 32, 32]},
            "data": {"source": "synthetic", "resolution": resolution, "val_count": 0, "workers": 0},
            "loss": {"identity_target": "vae", "disc_start": 0, "disc_channels": 16, "disc_layers": 2},
        }
    )


def speed(steps: int, threads: int, batch: int, official: bool, resolution: int) -> dict:
    import torch

    from layerctl.training.vae import read_log, train

    with tempfile.TemporaryDirectory() as tmp:
        n0 = torch.get_num_threads()
        t0 = time.time()
        train(_cfg(tmp, steps, threads, batch, official, resolution), quiet=True)
        wall = time.time() - t0
        torch.set_num_threads(n0)
        rows = read_log(tmp)
    # steps/s after the first step (warm-up), from the loop's own timings
    rates = [r["steps_per_s"] for r in rows[1:]]
    per_step = sum(1 / r for r in rates) / len(rates) if rates else float("nan")
    return {
        "decoder": "official (32..512)" if official else "narrow (8..32)",
        "threads": threads,
        "batch": batch,
        "resolution": resolution,
        "steps": steps,
        "steps_per_s": 1 / per_step,
        "images_per_s": batch / per_step,
        "wall_s_incl_load": wall,
    }


def learn(steps: int, threads: int) -> dict:
    from layerctl.training.vae import load_config, read_log, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "recipes" / "train-vae-smoke.yaml", [f"out_dir={tmp}", f"steps={steps}", f"cpu_threads={threads}"])
        t0 = time.time()
        summary = train(cfg, quiet=True)
        vals = read_log(tmp, "val")
    first, last = vals[0], vals[-1]
    keys = ("alpha_psnr", "rgb_psnr", "identity_psnr", "identity_delta")
    return {
        "steps": summary["steps"],
        "seconds": time.time() - t0,
        "baseline": {k: first[k] for k in keys},
        "trained": {k: last[k] for k in keys},
        "curve": [(v["step"], round(v["alpha_psnr"], 2)) for v in vals],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--official", action="store_true", help="also time the official-layout decoder")
    ap.add_argument("--learn", type=int, default=0, metavar="N", help="run the smoke recipe for N steps and report metrics")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    results = []
    for official in [False] + ([True] if args.official else []):
        for th in args.threads:
            r = speed(args.steps, th, args.batch, official, args.resolution)
            results.append(r)
            print(json.dumps(r), flush=True)
    t = Table(title=f"train-vae on the CPU (tiny backend, torch {torch.__version__})")
    for col in ("decoder", "threads", "batch", "resolution", "steps/s", "images/s"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r["decoder"], str(r["threads"]), str(r["batch"]), f"{r['resolution']}px", f"{r['steps_per_s']:.2f}", f"{r['images_per_s']:.1f}")
    console.print(t)
    if args.learn:
        res = learn(args.learn, args.threads[0])
        print(json.dumps(res), flush=True)
        b, a = res["baseline"], res["trained"]
        console.print(
            f"learn: {res['steps']} steps in {res['seconds']:.0f} s; held-out alpha PSNR {b['alpha_psnr']:.2f} -> {a['alpha_psnr']:.2f} dB, "
            f"RGB PSNR {b['rgb_psnr']:.2f} -> {a['rgb_psnr']:.2f} dB, identity change {a['identity_delta']:.2e}"
        )


if __name__ == "__main__":
    sys.exit(main())
