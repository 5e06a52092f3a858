"""`layerctl upscale`: make an RGBA image larger and refine it with the transparent model (img2img)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from layerctl.commands._options import (
    CfgRescale, PredictionType, Sampler, Schedule, ZeroSnr,
    EDITING, OUTPUT, Attention, Cfg, ClipSkip, Config, ControlImage, ControlScale, Device, Dtype, Family, Json,
    Lora, LoraScale, Model, Negative, NoTta, NoVariant, Offload, PanelCommand, Preview, Quiet, Seed,
    TransparentDecoder, TransparentEncoder, Weight, WeightsDir, request_args,
)
from layerctl.commands.gen import build_request, emit, resolve_seed, tell_seed


def upscale(
    image: Annotated[str, typer.Argument(help="The RGBA (or RGB) image to upscale.")],
    scale: Annotated[float, typer.Option("--scale", "-s", help="Upscale factor (> 1): the output is round(width x F) x round(height x F).", rich_help_panel=EDITING)] = 2.0,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="What the image shows (guides the refinement).")] = None,
    negative: Negative = None,
    clip_skip: ClipSkip = 1,
    strength: Annotated[Optional[float], typer.Option("--strength", help="How much the refinement may change, in (0, 1] (model default: toy 0.2, others 0.5).", rich_help_panel=EDITING)] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output PNG (default: IMAGE_x<scale>.png next to IMAGE).", rich_help_panel=OUTPUT)] = None,
    model: Model = None,
    family: Family = None,
    config: Config = None,
    no_variant: NoVariant = False,
    weights_dir: WeightsDir = None,
    transparent_decoder: TransparentDecoder = None,
    transparent_encoder: TransparentEncoder = None,
    layer_weights: Annotated[Optional[str], typer.Option("--layer-weights", help="Layer weights file instead of the official text->RGBA one.")] = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    weight: Weight = 1.0,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps of the full schedule (strength runs a part), at most 1000.")] = None,
    cfg: Cfg = None,
    seed: Seed = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    prediction_type: PredictionType = None,
    zero_snr: ZeroSnr = None,
    cfg_rescale: CfgRescale = None,
    controlnet: Annotated[Optional[list[str]], typer.Option("--controlnet", help="ControlNet model (folder or hub id), repeatable (e.g. a tile model).", rich_help_panel=EDITING)] = None,
    control_image: ControlImage = None,
    control_scale: ControlScale = None,
    resize: Annotated[str, typer.Option("--resize", help="Fit control images: crop, fit or stretch.", rich_help_panel=EDITING)] = "crop",
    preview: Preview = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    attention: Attention = "auto",
    offload: Offload = "none",
    no_tta: NoTta = False,
    as_json: Json = False,
    quiet: Quiet = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Upscale a transparent image and refine it, with a real alpha at the new size.

    Example: layerctl upscale cup.png --scale 2 --prompt "glass cup" --model tiny
    """
    args = dict(locals())
    from layerctl.api import Session
    from layerctl.requests import UpscaleRequest

    seed, was_random = resolve_seed(seed)
    req = build_request(UpscaleRequest, **request_args(UpscaleRequest, args, seed=seed, tta=not no_tta))
    with Session(quiet=quiet) as session:
        emit(session.upscale(req), as_json)
    tell_seed(seed, was_random, quiet)


def register(app: typer.Typer) -> None:
    app.command("upscale", no_args_is_help=True, cls=PanelCommand)(upscale)
