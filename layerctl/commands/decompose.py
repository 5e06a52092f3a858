"""`layerctl decompose`: split a picture into layers (foreground RGBA and/or background)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from layerctl.commands._options import (
    CfgRescale, PredictionType, Sampler, Schedule, ZeroSnr,
    LAYERS, OUTPUT, Attention, BgPrompt, Cfg, ClipSkip, Config, Device, Dtype, Family, FgPrompt, Height, Json, LayerWeights,
    Lora, LoraScale, Model, Negative, NoTta, NoVariant, Offload, Overwrite, PanelCommand, Quiet, Seed, Steps, StopAt,
    TransparentDecoder, TransparentEncoder, Weight, WeightsDir, Width, request_args,
)
from layerctl.commands.gen import build_request, emit, resolve_seed, tell_seed


def decompose(
    image: Annotated[str, typer.Argument(help="The picture to split (the blended layer).")],
    bg: Annotated[Optional[str], typer.Option("--bg", help="Known background: extract the foreground only.", rich_help_panel=LAYERS)] = None,
    fg: Annotated[Optional[str], typer.Option("--fg", help="Known foreground (RGBA): extract the background only.", rich_help_panel=LAYERS)] = None,
    out_dir: Annotated[str, typer.Option("--out-dir", help="Folder for the layer files.", rich_help_panel=OUTPUT)] = ".",
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="What the picture shows (optional).")] = None,
    fg_prompt: FgPrompt = None,
    bg_prompt: BgPrompt = None,
    negative: Negative = None,
    clip_skip: ClipSkip = 1,
    model: Model = None,
    family: Family = None,
    config: Config = None,
    no_variant: NoVariant = False,
    weights_dir: WeightsDir = None,
    transparent_decoder: TransparentDecoder = None,
    transparent_encoder: TransparentEncoder = None,
    layer_weights: LayerWeights = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    width: Width = None,
    height: Height = None,
    resize: Annotated[str, typer.Option("--resize", help="Fit the images to the size: crop, fit or stretch.")] = "crop",
    steps: Steps = None,
    cfg: Cfg = None,
    seed: Seed = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    prediction_type: PredictionType = None,
    zero_snr: ZeroSnr = None,
    cfg_rescale: CfgRescale = None,
    weight: Weight = 1.0,
    stop_at: StopAt = 1.0,
    fg_name: Annotated[str, typer.Option("--fg-name", help="File name of the foreground layer (a name inside --out-dir, not a path).", rich_help_panel=LAYERS)] = "fg.png",
    bg_name: Annotated[str, typer.Option("--bg-name", help="File name of the background layer (a name inside --out-dir, not a path).", rich_help_panel=LAYERS)] = "bg.png",
    psd: Annotated[Optional[str], typer.Option("--psd", help="Also write the whole stack (bg, picture, fg) as one PSD.", rich_help_panel=OUTPUT)] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    attention: Attention = "auto",
    offload: Offload = "none",
    no_tta: NoTta = False,
    as_json: Json = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """Split a picture into a transparent foreground and a background.

    Example: layerctl decompose photo.png --bg empty_room.png --out-dir layers/ --model tiny
    """
    args = dict(locals())
    from layerctl.api import Session
    from layerctl.requests import DecomposeRequest

    seed, was_random = resolve_seed(seed)
    req = build_request(DecomposeRequest, **request_args(DecomposeRequest, args, seed=seed, tta=not no_tta))
    with Session(quiet=quiet) as session:
        emit(session.decompose(req), as_json)
    tell_seed(seed, was_random, quiet)


def register(app: typer.Typer) -> None:
    app.command("decompose", no_args_is_help=True, cls=PanelCommand)(decompose)
