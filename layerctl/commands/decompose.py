"""`layerctl decompose`: split a picture into layers (foreground RGBA and/or background)."""

from __future__ import annotations

from typing import List, Optional

import typer

from layerctl.commands.gen import MODEL_HELP, build_request, emit


def decompose(
    image: str = typer.Argument(..., help="The picture to split (the blended layer)."),
    bg: Optional[str] = typer.Option(None, "--bg", help="Known background: extract the foreground only."),
    fg: Optional[str] = typer.Option(None, "--fg", help="Known foreground (RGBA): extract the background only."),
    out_dir: str = typer.Option(".", "--out-dir", help="Folder for the layer files."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What the picture shows (optional)."),
    fg_prompt: Optional[str] = typer.Option(None, "--fg-prompt", help="What the foreground is (optional)."),
    bg_prompt: Optional[str] = typer.Option(None, "--bg-prompt", help="What the background is (optional)."),
    negative: str = typer.Option("bad, ugly", "--negative", help="Negative prompt."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    weights_dir: Optional[str] = typer.Option(None, "--weights-dir", help="Folder with the official LayerDiffuse files (env LAYERCTL_WEIGHTS_DIR)."),
    transparent_decoder: Optional[str] = typer.Option(None, "--transparent-decoder", help="Transparent decoder .safetensors (official layout)."),
    transparent_encoder: Optional[str] = typer.Option(None, "--transparent-encoder", help="Latent-transparency encoder .safetensors."),
    layer_weights: Optional[str] = typer.Option(None, "--layer-weights", help="Layer weights file instead of the official one."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="Extra LoRA (from train-lora), repeatable."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Strength of --lora."),
    width: Optional[int] = typer.Option(None, "--width", "-W", help="Width, a multiple of 64 (default: the picture's aspect at the model's native area)."),
    height: Optional[int] = typer.Option(None, "--height", "-H", help="Height, a multiple of 64."),
    resize: str = typer.Option("crop", "--resize", help="Fit the images to the size: crop, fit or stretch."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (SD1.5 20, SDXL 25)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (7)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed."),
    weight: float = typer.Option(1.0, "--weight", help="Strength of the SDXL layer weights."),
    stop_at: float = typer.Option(1.0, "--stop-at", help="Fraction of steps using the layer model (then the plain UNet)."),
    fg_name: str = typer.Option("fg.png", "--fg-name", help="File name of the foreground layer."),
    bg_name: str = typer.Option("bg.png", "--bg-name", help="File name of the background layer."),
    psd: Optional[str] = typer.Option(None, "--psd", help="Also write the whole stack (bg, picture, fg) as one PSD."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa or xformers."),
    no_tta: bool = typer.Option(False, "--no-tta", help="One decoder pass instead of the 8-way median."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per file written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or notices on stderr."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
) -> None:
    """Split a picture into a transparent foreground and a background.

    Example: layerctl decompose photo.png --bg empty_room.png --out-dir layers/ --model tiny
    """
    from layerctl.api import Session
    from layerctl.requests import DecomposeRequest

    req = build_request(
        DecomposeRequest,
        image=image, fg=fg, bg=bg, prompt=prompt, fg_prompt=fg_prompt, bg_prompt=bg_prompt, negative=negative,
        out_dir=out_dir, model=model, weights_dir=weights_dir, transparent_decoder=transparent_decoder,
        transparent_encoder=transparent_encoder, layer_weights=layer_weights, lora=lora or [],
        lora_scale=lora_scale, width=width, height=height, resize=resize, steps=steps, cfg=cfg, seed=seed,
        weight=weight, stop_at=stop_at, fg_name=fg_name, bg_name=bg_name, psd=psd, device=device, dtype=dtype,
        attention=attention, tta=not no_tta, overwrite=overwrite,
    )
    with Session(quiet=quiet) as session:
        emit(session.decompose(req), as_json)


def register(app: typer.Typer) -> None:
    app.command("decompose", no_args_is_help=True)(decompose)
