"""`layerctl gen`: text -> transparent PNG, and the layer modes (--bg / --fg / --joint)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from layerctl.errors import LayerctlError

MODEL_HELP = "Model: tiny, tiny-xl, a diffusers folder, a hub id or a .safetensors file (env LAYERCTL_MODEL)."


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
            sys.stdout.write(json.dumps(r.as_json()) + "\n")
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
    prompt: Optional[str] = typer.Argument(None, help="What to draw (the subject on a transparent background)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output PNG; {i}, {seed}, {prompt_slug} fill in."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Folder for the layer files (layer modes)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    weights_dir: Optional[str] = typer.Option(None, "--weights-dir", help="Folder with the official LayerDiffuse files (env LAYERCTL_WEIGHTS_DIR)."),
    transparent_decoder: Optional[str] = typer.Option(None, "--transparent-decoder", help="Transparent decoder .safetensors (official layout)."),
    transparent_encoder: Optional[str] = typer.Option(None, "--transparent-encoder", help="Latent-transparency encoder .safetensors."),
    layer_weights: Optional[str] = typer.Option(None, "--layer-weights", help="Layer weights file instead of the official one for the mode."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="Extra LoRA (from train-lora), repeatable."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Strength of --lora."),
    width: Optional[int] = typer.Option(None, "--width", "-W", help="Width in px, a multiple of 64 (default: the model's native size)."),
    height: Optional[int] = typer.Option(None, "--height", "-H", help="Height in px, a multiple of 64."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (SD1.5 20, SDXL 25)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (7)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed; image i of a batch uses seed+i."),
    negative: str = typer.Option("bad, ugly", "--negative", help="Negative prompt."),
    batch: int = typer.Option(1, "--batch", "-n", help="Images to make."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="One prompt per line ('-' = stdin); one job each."),
    fg: Optional[str] = typer.Option(None, "--fg", help="Known foreground (RGBA): generate the background behind it."),
    bg: Optional[str] = typer.Option(None, "--bg", help="Known background: generate a foreground that fits it."),
    fg_prompt: Optional[str] = typer.Option(None, "--fg-prompt", help="Foreground prompt (with --bg or --joint)."),
    bg_prompt: Optional[str] = typer.Option(None, "--bg-prompt", help="Background prompt (with --fg or --joint)."),
    joint: bool = typer.Option(False, "--joint", help="Foreground, background and blended in one run."),
    prompt_opt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The main prompt (same as the PROMPT argument)."),
    fg_name: Optional[str] = typer.Option(None, "--fg-name", help="Layer modes: file name of the foreground (fg.png)."),
    bg_name: Optional[str] = typer.Option(None, "--bg-name", help="Layer modes: file name of the background (bg.png)."),
    blended_name: Optional[str] = typer.Option(None, "--blended-name", help="Layer modes: file name of the blended picture (blended.png)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="Fit conditioning images and masks: crop (default), fit or stretch."),
    stop_at: float = typer.Option(1.0, "--stop-at", help="Fraction of steps using the SDXL conditional weights."),
    weight: float = typer.Option(1.0, "--weight", help="Strength of the layer weights."),
    init: Optional[str] = typer.Option(None, "--init", help="img2img: start from this RGBA/RGB image."),
    strength: float = typer.Option(0.75, "--strength", help="img2img strength in (0, 1]."),
    mask: Optional[str] = typer.Option(None, "--mask", help="Inpainting mask (white = repaint), with --init."),
    hires: Optional[float] = typer.Option(None, "--hires", help="Upscale factor (> 1) refined by img2img."),
    hires_strength: float = typer.Option(0.5, "--hires-strength", help="Strength of the hires pass."),
    controlnet: Optional[List[str]] = typer.Option(None, "--controlnet", help="ControlNet model (folder or hub id), repeatable."),
    control_image: Optional[List[str]] = typer.Option(None, "--control-image", help="Control image, one per --controlnet."),
    control_scale: Optional[List[float]] = typer.Option(None, "--control-scale", help="ControlNet scale, one per --controlnet."),
    preview: bool = typer.Option(False, "--preview", help="Also write NAME.preview.png on a checkerboard."),
    psd: Optional[str] = typer.Option(None, "--psd", help="Also write the layers as one PSD."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa or xformers."),
    no_tta: bool = typer.Option(False, "--no-tta", help="One decoder pass instead of the 8-way median."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per file written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or notices on stderr."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
) -> None:
    """Generate a transparent image (or image layers).

    Example: layerctl gen "glass cup" --model tiny --out cup.png --seed 7
    """
    from layerctl.api import Session
    from layerctl.requests import GenRequest

    if prompt_opt is not None:
        if prompt is not None and prompt != prompt_opt:
            raise LayerctlError("give the prompt once: as the PROMPT argument or with --prompt")
        prompt = prompt_opt
    values = dict(
        prompt=prompt, out=out, out_dir=out_dir, model=model, weights_dir=weights_dir,
        transparent_decoder=transparent_decoder, transparent_encoder=transparent_encoder,
        layer_weights=layer_weights, lora=lora or [], lora_scale=lora_scale, width=width, height=height,
        steps=steps, cfg=cfg, seed=seed, negative=negative, batch=batch, fg=fg, bg=bg, fg_prompt=fg_prompt,
        bg_prompt=bg_prompt, joint=joint, resize=resize, stop_at=stop_at, weight=weight, init=init,
        strength=strength, mask=mask, hires=hires, hires_strength=hires_strength, controlnet=controlnet or [],
        control_image=control_image or [], control_scale=control_scale or [], preview=preview, psd=psd,
        device=device, dtype=dtype, attention=attention, tta=not no_tta, overwrite=overwrite,
        fg_name=fg_name, bg_name=bg_name, blended_name=blended_name,
    )
    if prompts_file:
        if prompt:
            raise LayerctlError("give either a prompt or --prompts-file, not both")
        prompts = read_prompts(prompts_file)
        if out and len(prompts) > 1 and not any(k in out for k in ("{i}", "{seed}", "{prompt_slug}")):
            raise LayerctlError("--out needs {i}, {seed} or {prompt_slug} when --prompts-file has several prompts")
        reqs = []
        for j, p in enumerate(prompts):
            v = dict(values, prompt=p, seed=None if seed is None else seed + j * batch)
            if v["out"]:
                v["out"] = v["out"].replace("{i}", str(j) if batch == 1 else f"{j}-{{i}}")
            reqs.append(build_request(GenRequest, **v))
    else:
        reqs = [build_request(GenRequest, **values)]
    with Session(quiet=quiet) as session:
        for req in reqs:
            emit(session.gen(req), as_json)


def register(app: typer.Typer) -> None:
    app.command("gen", no_args_is_help=True)(gen)
