"""Build a whole toy model from scratch, at any size, on any device, in one resumable command.

The shipped toy model grew over fourteen rounds of issue 14 (see docs/toy-model.md); this script is its
condensed recipe, the way to retrain every file at once, e.g. the 128x128 toy world (16x16 latents):

    python recipes/toy/build_world.py --out runs/toy/w128 --size 128                  # CPU: days at 128
    python recipes/toy/build_world.py --out runs/toy/w128 --size 128 --device cuda    # a GPU: resumes the same folder
    python recipes/toy/build_world.py --out runs/toy/smoke --scale 0.001               # every stage, a few steps each

Stages, in order (each skipped once done, each resumed where it stopped when run again):

    1. vae     recipes/toy/pretrain_base.py vae: the base VAE at --size (image_size recorded in its file)
    2. unet    pretrain_base.py unet: text encoder + UNet on the VAE's posterior means, unmirrored, EMA
    3. data    the toy world's scenes as RGBA files ("solid" in every other plain solid caption) and
               layer triplets, at --size
    4. tvae    layerctl train-vae: the transparency encoder + decoder, from zero
    5. tdec    layerctl train-vae: its decoder alone on perturbed latents with the alpha edge weighted up
               (train-vae-10.yaml: what the shipped decoder's last stages did against specks and soft edges)
    6. rgba    layerctl train-lora (transparent) + export-lora: the transparent LoRA
    7. joint, fg2bg, bg2fg   layerctl train-lora (layers): the three layer models

On a lent GPU (calls of at most 10 minutes) run it with `--device cuda --save-minutes 2` as often as it
takes: each call goes on where the last one stopped (the UNet from its saved state, train-vae and
train-lora from their last checkpoint, a tenth of their steps apart). What a folder needs to go on
elsewhere is everything but data/ and latent_cache-*.pt (both made again when missing; at 128x128 the
cache of 100 000 rows is 0.8 GB).

On a CPU of two cores, run one process of one thread per core (the UNet beside the data and transparency
VAE, then the LoRAs two by two); world.json stays whole and a stage whose inputs are not done is refused:

    python recipes/toy/build_world.py --out runs/toy/w64 --threads 1 --stages unet &
    python recipes/toy/build_world.py --out runs/toy/w64 --threads 1 --stages data,tvae,tdec

The folder then loads as `--model toy:FOLDER` (`gen`, `bench/toy_quality.py --model toy:FOLDER`). Every
command is printed before it runs; world.json in --out records what each stage did. --scale multiplies
every step count and data count (smallest: 2 steps, 32 scenes), for a smoke run or a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from layerctl.backends import toy  # noqa: E402

STAGES = ("vae", "unet", "data", "tvae", "tdec", "rgba", "joint", "fg2bg", "bg2fg")
# steps at --scale 1: about what the shipped 64x64 files had in all (the VAE far more: its 450 steps lose
# small objects, bench/toy_base_shapes.py --vae-only), with the batch sizes they were trained at
STEPS = {"vae": 2400, "unet": 20000, "tvae": 3000, "tdec": 1800, "rgba": 16000, "joint": 8000, "fg2bg": 8000, "bg2fg": 8000}
COUNTS = {"rgba": 25000, "layers": 12000, "unet_cache": 100000}
LAYER_RECIPES = {"joint": "train-lora-layers-noflip.yaml", "fg2bg": "train-lora-fg2bg-noflip.yaml",
                 "bg2fg": "train-lora-bg2fg-noflip.yaml"}
LAYER_FILES = {"joint": "layers_joint.safetensors", "fg2bg": "layers_fg2bg.safetensors", "bg2fg": "layers_bg2fg.safetensors"}
# what each stage reads: a stage whose inputs are not done yet is refused (two processes may build one folder
# side by side, e.g. `--stages unet` beside `--stages data,tvae`: each on one core, world.json kept whole)
NEEDS = {"vae": (), "unet": ("vae",), "data": (), "tvae": ("vae", "data"), "tdec": ("vae", "data", "tvae"),
         **{k: ("unet", "tvae", "data") for k in ("rgba", "joint", "fg2bg", "bg2fg")}}


class World:
    """The --out folder: the model files, world.json, data/ and runs/ beside them."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.log_path = self.out / "world.json"
        self.log = self._read()
        if self.log.get("size", args.size) != args.size:
            sys.exit(f"build_world.py: {self.out} holds a {self.log['size']}x{self.log['size']} world, not --size {args.size}")

    def _read(self) -> dict:
        return json.loads(self.log_path.read_text()) if self.log_path.is_file() else {}

    def _refresh(self) -> None:
        """Take in the stages another process building this folder has recorded since this one read it."""
        self.log["stages"] = {**self.log.get("stages", {}), **self._read().get("stages", {})}

    def steps(self, stage: str) -> int:
        return max(2, round(STEPS[stage] * self.args.scale))

    def count(self, what: str) -> int:
        return max(32, round(COUNTS[what] * self.args.scale))

    def done(self, stage: str) -> bool:
        if stage == "data" and not all((self.out / "data" / d).is_dir() for d in ("rgba", "layers")):
            return False  # left behind when the folder moved (a GPU call and back): made again
        return bool(self.log.get("stages", {}).get(stage, {}).get("done"))

    def missing(self, stage: str) -> list[str]:
        """The stages `stage` reads from that are not done, as world.json says now (another process may have
        finished one since this one started)."""
        self._refresh()
        return [need for need in NEEDS[stage] if not self.done(need)]

    def record(self, stage: str, **info) -> None:
        """Mark `stage` done in world.json, merged with what other processes building this folder wrote there."""
        self._refresh()
        self.log["stages"][stage] = {"done": True, **info}
        self.log.update(size=self.args.size, scale=self.args.scale)
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        tmp.write_text(json.dumps(self.log, indent=1) + "\n")
        os.replace(tmp, self.log_path)

    def run(self, *cmd) -> None:
        cmd = [str(c) for c in cmd]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # the terminal's Ctrl-C reached the stage too: it saves its state and stops
                print("build_world: waiting for the stage to save and stop", file=sys.stderr, flush=True)
        if code != 0:
            sys.exit(f"build_world.py: the command above stopped (exit {code}); run again to resume")

    def layerctl(self, *args) -> None:
        self.run(sys.executable, "-m", "layerctl", *args)

    def pretrain(self, *args) -> None:
        self.run(sys.executable, ROOT / "recipes" / "toy" / "pretrain_base.py", *args)

    def trainer_args(self, stage: str) -> list[str]:
        """What every train-vae / train-lora stage is given: --set this world's model, size, device, steps and
        a checkpoint every tenth of them, and --resume once its run folder exists."""
        sets = {"model.model": f"toy:{self.out}", "model.device": self.args.device, "data.resolution": self.args.size,
                "out_dir": self.out / "runs" / stage, "steps": self.steps(stage), "cpu_threads": self.args.threads,
                "checkpoint_every": max(2, self.steps(stage) // 10)}
        resume = ["--resume"] if (self.out / "runs" / stage).is_dir() else []
        return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + resume


# ------------------------------------------------------------------------------------------------- stages


def stage_vae(w: World) -> dict:
    w.pretrain("vae", "--out", w.out, "--size", w.args.size, "--steps", w.steps("vae"), "--batch", 16,
          "--lr", "2e-3", "--seed", 1, "--threads", w.args.threads, "--device", w.args.device, "--save-minutes", 1e9)
    return {"steps": w.steps("vae")}


def stage_unet(w: World) -> dict:
    resume = ["--resume"] if (w.out / "unet_train_state.pt").is_file() else []
    width = [] if resume else ["--unet-channels", w.args.unet_channels]  # a resumed run reads it from its file
    w.pretrain("unet", "--out", w.out, *resume, *width, "--no-flip", "--latents", "mean", "--ema", "0.999",
          "--cache", w.count("unet_cache"), "--steps", w.steps("unet"), "--batch", 64, "--lr", "1e-3", "--seed", 7,
          "--threads", w.args.threads, "--device", w.args.device, "--save-minutes", w.args.save_minutes)
    return {"steps": w.steps("unet"), "cache": w.count("unet_cache"), "unet_channels": w.args.unet_channels}


def stage_data(w: World) -> dict:
    from layerctl.training.scenes import export_layers_folder, export_rgba_folder

    rgba, layers = w.out / "data" / "rgba", w.out / "data" / "layers"
    for folder in (rgba, layers):  # a stopped export is redone whole: its files are cheap
        shutil.rmtree(folder, ignore_errors=True)
    export_rgba_folder(rgba, w.count("rgba"), seed=3, size=w.args.size, solid_word_every=2)
    export_layers_folder(layers, w.count("layers"), seed=7, size=w.args.size)
    return {"rgba": w.count("rgba"), "layers": w.count("layers")}


def install(src: Path, dst: Path) -> None:
    """Copy a stage's file into the model folder whole (another process may be loading the folder)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, dst)


def vae_trainer_args(w: World, stage: str) -> list[str]:
    """train-vae on this world's RGBA scenes, validated once at the end on a held-out eighth (64 at most)."""
    return [*w.trainer_args(stage), "--set", f"data.source={w.out / 'data' / 'rgba'}", "--set", f"val_every={w.steps(stage)}",
            "--set", "val_at_start=false", "--set", f"data.val_count={min(64, w.count('rgba') // 8)}"]


def stage_tvae(w: World) -> dict:
    w.layerctl("train-vae", ROOT / "recipes" / "toy" / "train-vae-5.yaml", *vae_trainer_args(w, "tvae"),
               "--set", "model.init_encoder=null", "--set", "model.init_decoder=null")
    for name in ("transparent_encoder.safetensors", "transparent_decoder.safetensors"):
        install(w.out / "runs" / "tvae" / name, w.out / name)
    return {"steps": w.steps("tvae")}


def stage_tdec(w: World) -> dict:
    tvae = w.out / "runs" / "tvae"  # the tvae stage's own files: a redone tdec starts from the same decoder
    w.layerctl("train-vae", ROOT / "recipes" / "toy" / "train-vae-10.yaml", *vae_trainer_args(w, "tdec"),
               "--set", f"model.init_encoder={tvae / 'transparent_encoder.safetensors'}",
               "--set", f"model.init_decoder={tvae / 'transparent_decoder.safetensors'}")
    install(w.out / "runs" / "tdec" / "transparent_decoder.safetensors", w.out / "transparent_decoder.safetensors")
    return {"steps": w.steps("tdec")}


def transparency_sets(w: World) -> list[str]:
    return ["--set", f"model.transparent_encoder={w.out / 'transparent_encoder.safetensors'}",
            "--set", f"model.transparent_decoder={w.out / 'transparent_decoder.safetensors'}"]


def stage_rgba(w: World) -> dict:
    w.layerctl("train-lora", ROOT / "recipes" / "toy" / "train-lora-14.yaml", *w.trainer_args("rgba"),
               *transparency_sets(w), "--set", "lora.init_from=null", "--set", f"data.source={w.out / 'data' / 'rgba'}",
               "--set", f"validation.every={w.steps('rgba')}")
    w.layerctl("export-lora", w.out / "runs" / "rgba" / "pytorch_lora_weights.safetensors", "--format", "layerdiffuse",
               "--model", f"toy:{w.out}", "--dtype", "fp16", "--out", w.out / "rgba.safetensors", "--overwrite")
    return {"steps": w.steps("rgba")}


def stage_layers(w: World, kind: str) -> dict:
    w.layerctl("train-lora", ROOT / "recipes" / "toy" / LAYER_RECIPES[kind], *w.trainer_args(kind),
               *transparency_sets(w), "--set", "layers.init_from=null", "--set", f"data.source={w.out / 'data' / 'layers'}",
               "--set", f"validation.every={w.steps(kind)}")
    install(w.out / "runs" / kind / LAYER_FILES[kind], w.out / f"{kind}.safetensors")
    return {"steps": w.steps(kind)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the model folder to build (and resume)")
    ap.add_argument("--size", type=int, default=64, help="the toy world's picture size, a multiple of 64 (128: 16x16 latents)")
    ap.add_argument("--device", default="cpu", help="where every stage trains (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per stage")
    ap.add_argument("--save-minutes", type=float, default=10.0,
                    help="unet: save the whole training state this often (a GPU call of 10 minutes: 2)")
    ap.add_argument("--unet-channels", default="32,64,64", help="the base UNet's block_out_channels (the shipped width)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every step and data count (a smoke run: 0.001)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--redo", action="store_true", help="run the --stages given even if world.json says they are done")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; the stages are {', '.join(STAGES)}")
    if not toy.is_image_size(args.size):
        ap.error(f"--size {args.size} is not a multiple of 64")
    if args.scale <= 0:
        ap.error("--scale must be positive")
    w = World(args)
    w.out.mkdir(parents=True, exist_ok=True)
    run = {"vae": stage_vae, "unet": stage_unet, "data": stage_data, "tvae": stage_tvae, "tdec": stage_tdec, "rgba": stage_rgba,
           **{k: (lambda w, k=k: stage_layers(w, k)) for k in LAYER_RECIPES}}
    for stage in STAGES:
        if stage not in stages or (w.done(stage) and not args.redo):
            continue
        missing = w.missing(stage)
        if missing:
            sys.exit(f"build_world.py: stage {stage} needs {', '.join(missing)} first (not done in {w.log_path}: "
                     "add it to --stages, or wait for the process building it)")
        t0 = time.time()
        print(f"build_world: stage {stage} ({args.size}x{args.size}, {args.device})", file=sys.stderr, flush=True)
        info = run[stage](w)
        w.record(stage, seconds=round(time.time() - t0), device=args.device, **info)
    print(f"build_world: {w.out} is a toy model folder: layerctl gen 'glass cup' --model toy:{w.out} --out cup.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # in the data stage (this process's own): its folders are made again next time
        sys.exit("build_world.py: interrupted; run again to resume")
