"""`layerctl train-vae` and `layerctl eval-vae`: train / measure the transparency encoder and decoder."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from layerctl.commands._options import Config, Family, NoVariant
from layerctl.commands._training import JsonSummary, QuietRun, Resume, ResumeFrom, RunDir, SetKeys, StartOver, run_training
from layerctl.errors import LayerctlError

MODEL_HELP = "Base model whose frozen VAE the nets work with: tiny, tiny-xl, a diffusers folder, hub id or .safetensors."


def train_vae(
    recipe: str = typer.Argument(..., metavar="RECIPE.yaml", help="Training recipe (see recipes/train-vae.yaml)."),
    set_: SetKeys = [],
    out_dir: RunDir = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    overwrite: StartOver = False,
    as_json: JsonSummary = False,
    quiet: QuietRun = False,
) -> None:
    """Train the latent-transparency encoder and transparent decoder against a frozen VAE.

    Example: layerctl train-vae recipes/train-vae-smoke.yaml --out-dir runs/smoke

    Several GPUs / machines: accelerate launch -m layerctl train-vae RECIPE.yaml
    """
    from layerctl.training.vae import load_config, train

    run_training(load_config, train, recipe, set_, out_dir, resume, resume_from, overwrite, quiet, as_json, ["encoder", "decoder"])


def eval_vae(
    images: str = typer.Argument(..., metavar="IMAGES_DIR", help="Folder of RGBA images (recursive; or an HF imagefolder), or 'synthetic'."),
    transparent_decoder: Optional[str] = typer.Option(None, "--transparent-decoder", help="Decoder .safetensors (official layout); default: the model's official/tiny one."),
    transparent_encoder: Optional[str] = typer.Option(None, "--transparent-encoder", help="Encoder .safetensors (official layout); default: the model's official/tiny one."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: env LAYERCTL_MODEL, else tiny."),
    family: Family = None,
    config: Config = None,
    no_variant: NoVariant = False,
    weights_dir: Optional[str] = typer.Option(None, "--weights-dir", help="Folder with the official LayerDiffuse files."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Centre-crop and resize to this square size (multiple of 64); default: each image's own size, cropped to multiples of 64."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many images."),
    count: int = typer.Option(16, "--count", help="Images drawn when IMAGES_DIR is 'synthetic'."),
    seed: int = typer.Option(1_000_003, "--seed", help="Seed of the 'synthetic' images (the default is train-vae's held-out stream for seed 0)."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Decode with the 8-way test-time augmentation (what gen uses; slower)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per batch (with --resolution or 'synthetic')."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object on stdout."),
) -> None:
    """Measure a transparent encoder/decoder pair: alpha PSNR, composite RGB PSNR over 9 backgrounds, identity error.

    Example: layerctl eval-vae my_rgba/ --model tiny --transparent-decoder runs/smoke/transparent_decoder.safetensors
    --transparent-encoder runs/smoke/transparent_encoder.safetensors --json
    """
    from layerctl.training.vae import run_eval

    if resolution is not None and (resolution <= 0 or resolution % 64):
        raise LayerctlError(f"--resolution must be a positive multiple of 64 (got {resolution})")
    if limit is not None and limit <= 0:
        raise LayerctlError("--limit must be > 0")
    if batch_size <= 0 or count <= 0:
        raise LayerctlError("--batch-size and --count must be > 0")
    if family not in (None, "sd15", "sdxl"):
        raise LayerctlError(f"--family must be sd15 or sdxl (got {family})")
    from layerctl.backends.base import LoadOptions
    from layerctl.requests import check_config_folder

    try:
        check_config_folder(config)
    except ValueError as exc:
        raise LayerctlError(str(exc)) from None
    load_options = LoadOptions(family=family, config=config, variant=not no_variant, quiet=as_json)
    if not model:
        import os

        model = os.environ.get("LAYERCTL_MODEL") or "tiny"
        if model == "tiny":
            sys.stderr.write(
                "layerctl: no --model: measuring against the tiny model's random VAE; pass the base model "
                "the weights were trained for (--model) for meaningful numbers\n"
            )
    res = run_eval(
        images,
        decoder=transparent_decoder,
        encoder=transparent_encoder,
        model_ref=model,
        weights_dir=weights_dir,
        resolution=resolution,
        limit=limit,
        count=count,
        seed=seed,
        tta=tta,
        batch_size=batch_size,
        device=device,
        quiet=as_json,
        load_options=load_options,
    )
    if as_json:
        sys.stdout.write(json.dumps(res, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        from layerctl.training.vae import metrics_table

        Console(highlight=False).print(metrics_table(res["metrics"], f"eval-vae: {res['images_source']}"))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("train-vae")(train_vae)
    app.command("eval-vae")(eval_vae)
