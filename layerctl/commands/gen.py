"""`layerctl gen`: text -> transparent PNG, and the layer modes (--bg / --fg / --joint)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from layerctl.commands._options import (
    CfgRescale, PredictionType, Sampler, Schedule, ZeroSnr,
    EDITING, LAYERS, MODEL_HELP, OUTPUT, SIZE, Attention, BgName, BgPrompt, BlendedName, Cfg, ClipSkip, Config, ControlImage,
    ControlNet, ControlScale, Device, Dtype, Family, FgName, FgPrompt, Height, Json, LayerWeights, Lora, LoraScale,
    Model, Negative, NoTta, NoVariant, Offload, Out, Overwrite, PanelCommand, Preview, Psd, Quiet, Resize, Seed, Steps, StopAt,
    Strength, TransparentDecoder, TransparentEncoder, Weight, WeightsDir, Width, request_args,
)
from layerctl.errors import LayerctlError

__all__ = ["MODEL_HELP", "build_request", "emit", "gen", "read_prompts", "register", "resolve_seed", "tell_seed"]


def build_request(cls, **values):
    """A validated request model from CLI values; schema errors become one-line exit-2 errors."""
    from pydantic import ValidationError

    from layerctl.requests import validation_message

    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise LayerctlError(validation_message(exc)) from None


def emit(records, as_json: bool) -> None:
    for r in records:
        if as_json:
            sys.stdout.write(json.dumps(r.as_json(), allow_nan=False) + "\n")
        elif r.role != "preview":
            sys.stdout.write(f"{r.path}\n")
    sys.stdout.flush()


def read_prompts(path: str) -> list[str]:
    """One prompt a line ('-': stdin); blank lines and '#' comments skipped. Files saved by
    Windows Notepad read the same: a UTF-8 byte-order mark is dropped, CRLF/CR line ends split
    lines (UTF-16 with its byte-order mark, Notepad's "Unicode", is read too)."""
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise LayerctlError(f"cannot read prompts file {path}: {exc.strerror}") from None
        text = decode_text(raw, f"prompts file {path}")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.splitlines()  # \r\n, \r and \n alike
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise LayerctlError(f"no prompts in {path}")
    return prompts


def resolve_seed(seed: Optional[int]) -> tuple[Optional[int], bool]:
    """(seed, random?): --seed -1 (or no --seed) picks a random seed now; a seed outside [0, 2**32)
    is refused here, before anything loads."""
    from layerctl.core.naming import new_seed

    if seed is not None and seed != -1:
        if not (0 <= seed < 2**32):
            raise LayerctlError(f"--seed must be in [0, 2**32) or -1 for a random one (got {seed})")
        return seed, False
    return new_seed(), True


def tell_seed(seed: int, was_random: bool, quiet: bool) -> None:
    """Say which random seed a finished (or interrupted) run used."""
    if was_random and not quiet:
        sys.stderr.write(f"layerctl: random seed {seed} (give --seed {seed} to make the same again)\n")


def decode_text(raw: bytes, what: str) -> str:
    """Bytes of a text file -> str: UTF-8 (a byte-order mark dropped), or UTF-16 when it starts
    with its byte-order mark; anything else is a clear error."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise LayerctlError(f"{what} is not UTF-16 text, though it starts like it") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LayerctlError(f"{what}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8") from None


def gen(
    prompt: Annotated[Optional[str], typer.Argument(help="What to draw (the subject on a transparent background).")] = None,
    model: Model = None,
    family: Family = None,
    config: Config = None,
    no_variant: NoVariant = False,
    weights_dir: WeightsDir = None,
    transparent_decoder: TransparentDecoder = None,
    transparent_encoder: TransparentEncoder = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    prompt_opt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The main prompt (same as the PROMPT argument).", rich_help_panel=SIZE)] = None,
    prompts_file: Annotated[Optional[str], typer.Option("--prompts-file", help="One prompt per line ('-' = stdin); one job each. --out fills in as for a batch ({i} counts every image).", rich_help_panel=SIZE)] = None,
    negative: Negative = None,
    clip_skip: ClipSkip = 1,
    width: Width = None,
    height: Height = None,
    steps: Steps = None,
    cfg: Cfg = None,
    seed: Seed = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    prediction_type: PredictionType = None,
    zero_snr: ZeroSnr = None,
    cfg_rescale: CfgRescale = None,
    batch: Annotated[int, typer.Option("--batch", "-n", help="Images to make.", rich_help_panel=SIZE)] = 1,
    resize: Resize = None,
    fg: Annotated[Optional[str], typer.Option("--fg", help="Known foreground (RGBA): generate the background behind it.", rich_help_panel=LAYERS)] = None,
    bg: Annotated[Optional[str], typer.Option("--bg", help="Known background: generate a foreground that fits it.", rich_help_panel=LAYERS)] = None,
    fg_prompt: FgPrompt = None,
    bg_prompt: BgPrompt = None,
    joint: Annotated[bool, typer.Option("--joint", help="Foreground, background and blended in one run.", rich_help_panel=LAYERS)] = False,
    layer_weights: LayerWeights = None,
    weight: Weight = 1.0,
    stop_at: StopAt = 1.0,
    fg_name: FgName = None,
    bg_name: BgName = None,
    blended_name: BlendedName = None,
    init: Annotated[Optional[str], typer.Option("--init", help="img2img: start from this RGBA/RGB image.", rich_help_panel=EDITING)] = None,
    strength: Strength = 0.75,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Inpainting mask (white = repaint), with --init.", rich_help_panel=EDITING)] = None,
    hires: Annotated[Optional[float], typer.Option("--hires", help="Upscale factor (> 1) refined by img2img.", rich_help_panel=EDITING)] = None,
    hires_strength: Annotated[Optional[float], typer.Option("--hires-strength", help="Strength of the hires pass, in (0, 1] (model default: toy 0.2, others 0.5).", rich_help_panel=EDITING)] = None,
    controlnet: ControlNet = None,
    control_image: ControlImage = None,
    control_scale: ControlScale = None,
    out: Out = None,
    out_dir: Annotated[Optional[str], typer.Option("--out-dir", help="Folder for the layer files (layer modes).", rich_help_panel=OUTPUT)] = None,
    preview: Preview = False,
    psd: Psd = None,
    as_json: Json = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    attention: Attention = "auto",
    offload: Offload = "none",
    no_tta: NoTta = False,
) -> None:
    """Generate a transparent image (or image layers).

    Example: layerctl gen "glass cup" --model tiny --out cup.png --seed 7
    """
    args = dict(locals())
    from layerctl.api import Session
    from layerctl.requests import GenRequest

    if prompt_opt is not None:
        if prompt is not None and prompt != prompt_opt:
            raise LayerctlError("give the prompt once: as the PROMPT argument or with --prompt")
        prompt = prompt_opt
    prompts = [prompt]
    if prompts_file:
        if prompt:
            raise LayerctlError("give either a prompt or --prompts-file, not both")
        prompts = read_prompts(prompts_file)
    seed, was_random = resolve_seed(seed)
    values = request_args(GenRequest, args, prompt=prompt, seed=seed, tta=not no_tta)
    total = len(prompts) * batch
    reqs = []
    for j, p in enumerate(prompts):
        req = build_request(GenRequest, **dict(values, prompt=p, seed=None if seed is None else seed + j * batch))
        req._first_index, req._total_images = j * batch, total  # {i} counts every image of the command
        reqs.append(req)
    if len(reqs) > 1 and seed is not None and seed + total - 1 >= 2**32:
        raise LayerctlError(f"--seed {seed} + {total} images goes past 2**32")
    with Session(quiet=quiet) as session:
        done = []
        try:
            for req in reqs:
                records = session.gen(req)
                done.extend(records)
                emit(records, as_json)
        except KeyboardInterrupt:
            sys.stderr.write(f"layerctl: interrupted: {_kept(done)}\n")
            tell_seed(seed, was_random and bool(done), quiet)
            raise typer.Exit(130) from None
    tell_seed(seed, was_random, quiet)


def _kept(done: list) -> str:
    """What an interrupted gen leaves: every finished file is kept, no half-written one exists."""
    kept = [r.path for r in done if r.role != "preview"]
    if not kept:
        return "no job had finished; files are written whole or not at all, so none is half-written"
    shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
    return f"kept the {len(kept)} file(s) of the finished jobs ({shown}); none is half-written"


def register(app: typer.Typer) -> None:
    app.command("gen", no_args_is_help=True, cls=PanelCommand)(gen)
