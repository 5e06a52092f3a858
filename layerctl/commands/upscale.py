"""`layerctl upscale`: make an RGBA image larger and refine it with the transparent model (img2img)."""

from __future__ import annotations

from typing import List, Optional

import typer

from layerctl.commands.gen import MODEL_HELP, build_request, emit


def upscale(
    image: str = typer.Argument(..., help="The RGBA (or RGB) image to upscale."),
    scale: float = typer.Option(2.0, "--scale", "-s", help="Upscale factor (> 1): the output is round(width x F) x round(height x F)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What the image shows (guides the refinement)."),
    negative: str = typer.Option("bad, ugly", "--negative", help="Negative prompt."),
    strength: float = typer.Option(0.5, "--strength", help="How much the refinement may change, in (0, 1]."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output PNG (default: IMAGE_x<scale>.png next to IMAGE)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    weights_dir: Optional[str] = typer.Option(None, "--weights-dir", help="Folder with the official LayerDiffuse files (env LAYERCTL_WEIGHTS_DIR)."),
    transparent_decoder: Optional[str] = typer.Option(None, "--transparent-decoder", help="Transparent decoder .safetensors (official layout)."),
    transparent_encoder: Optional[str] = typer.Option(None, "--transparent-encoder", help="Latent-transparency encoder .safetensors."),
    layer_weights: Optional[str] = typer.Option(None, "--layer-weights", help="Layer weights file instead of the official text->RGBA one."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="Extra LoRA (from train-lora), repeatable."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Strength of --lora."),
    weight: float = typer.Option(1.0, "--weight", help="Strength of the layer weights."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps of the full schedule (strength runs a part)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (7)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed."),
    controlnet: Optional[List[str]] = typer.Option(None, "--controlnet", help="ControlNet model (folder or hub id), repeatable (e.g. a tile model)."),
    control_image: Optional[List[str]] = typer.Option(None, "--control-image", help="Control image, one per --controlnet."),
    control_scale: Optional[List[float]] = typer.Option(None, "--control-scale", help="ControlNet scale: one for all or one per --controlnet."),
    resize: str = typer.Option("crop", "--resize", help="Fit control images: crop, fit or stretch."),
    preview: bool = typer.Option(False, "--preview", help="Also write NAME.preview.png on a checkerboard."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa or xformers."),
    no_tta: bool = typer.Option(False, "--no-tta", help="One decoder pass instead of the 8-way median."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per file written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or notices on stderr."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Upscale a transparent image and refine it, with a real alpha at the new size.

    Example: layerctl upscale cup.png --scale 2 --prompt "glass cup" --model tiny
    """
    from layerctl.api import Session
    from layerctl.requests import UpscaleRequest

    req = build_request(
        UpscaleRequest,
        image=image, scale=scale, prompt=prompt, negative=negative, strength=strength, out=out, model=model,
        weights_dir=weights_dir, transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder,
        layer_weights=layer_weights, lora=lora or [], lora_scale=lora_scale, weight=weight, steps=steps, cfg=cfg,
        seed=seed, controlnet=controlnet or [], control_image=control_image or [], control_scale=control_scale or [],
        resize=resize, preview=preview, device=device, dtype=dtype, attention=attention, tta=not no_tta,
        overwrite=overwrite,
    )
    with Session(quiet=quiet) as session:
        emit(session.upscale(req), as_json)


def register(app: typer.Typer) -> None:
    app.command("upscale", no_args_is_help=True)(upscale)
