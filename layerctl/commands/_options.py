"""Options shared by the generating commands (gen, decompose, upscale), declared once.

Each alias is an ``Annotated[type, typer.Option(...)]``; a command gives it a default:
``model: Model = None``. ``rich_help_panel`` groups `--help` into Model, Size & sampling,
Layers, Editing, Output and Device. Nothing heavy is imported here (``layerctl --help`` stays fast).
"""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from layerctl.core.samplers import SAMPLERS, SCHEDULES

MODEL = "Model"
SIZE = "Size & sampling"
SAMPLING = "Sampler"
LAYERS = "Layers"
EDITING = "Editing"
OUTPUT = "Output"
DEVICE = "Device"

MAX_STEPS = 1000  # keep in step with layerctl.requests.MAX_STEPS (not imported: pydantic is slow to import)

MODEL_HELP = (
    "Model: toy (the default: the small model shipped with layerctl), tiny, tiny-xl, a diffusers folder, "
    "a hub id or a .safetensors file (env LAYERCTL_MODEL)."
)
OUT_HELP = (
    "Output PNG. Fields: {i} (image number, counted over every image the command writes, from 0), {seed}, "
    "{prompt_slug}; numbers may be zero-padded as {i:04d}. Several images (--batch or --prompts-file) and no "
    "{i}/{seed} in the name: NAME_0000.png, NAME_0001.png, ..."
)

# ---------------------------------------------------------------- Model
Model = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP, rich_help_panel=MODEL)]
WeightsDir = Annotated[Optional[str], typer.Option(
    "--weights-dir", help="Folder with the official LayerDiffuse files (env LAYERCTL_WEIGHTS_DIR).", rich_help_panel=MODEL)]
TransparentDecoder = Annotated[Optional[str], typer.Option(
    "--transparent-decoder", help="Transparent decoder .safetensors (official layout).", rich_help_panel=MODEL)]
TransparentEncoder = Annotated[Optional[str], typer.Option(
    "--transparent-encoder", help="Latent-transparency encoder .safetensors.", rich_help_panel=MODEL)]
Family = Annotated[Optional[str], typer.Option(
    "--family", help="sd15 or sdxl: the model family, when a file, folder or hub id does not say it plainly.",
    rich_help_panel=MODEL)]
Config = Annotated[Optional[str], typer.Option(
    "--config", help="Diffusers config folder (model_index.json, unet/, vae/, ...) for a single-file checkpoint "
    "whose sizes differ from SD1.5/SDXL (default: the configs shipped with layerctl).", rich_help_panel=MODEL)]
NoVariant = Annotated[bool, typer.Option(
    "--no-variant", help="Hub downloads: the repo's default files even when running in fp16/bf16 on a GPU "
    "(default: its fp16 files where it has them).", rich_help_panel=MODEL)]
Lora = Annotated[Optional[List[str]], typer.Option("--lora", help="Extra LoRA (from train-lora), repeatable.", rich_help_panel=MODEL)]
LoraScale = Annotated[float, typer.Option("--lora-scale", help="Strength of --lora (a finite number).", rich_help_panel=MODEL)]

# ---------------------------------------------------------------- Size & sampling
Width = Annotated[Optional[int], typer.Option(
    "--width", "-W", help="Width in px, a multiple of 64, at most 16384 (default: the model's native size). "
    "Jobs that clearly cannot fit in memory are refused (docs/limits.md).", rich_help_panel=SIZE)]
Height = Annotated[Optional[int], typer.Option("--height", "-H", help="Height in px, a multiple of 64.", rich_help_panel=SIZE)]
Steps = Annotated[Optional[int], typer.Option(
    "--steps", help=f"Sampling steps, 1 to {MAX_STEPS} (model default: toy 20, SD1.5 20, SDXL 25).", rich_help_panel=SIZE)]
Cfg = Annotated[Optional[float], typer.Option(
    "--cfg", help="Classifier-free guidance scale, >= 0 (model default: toy 3, SD1.5/SDXL 7).", rich_help_panel=SIZE)]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed in [0, 2**32); -1 or none: a random one (written to the files and printed on stderr). "
    "Image i of a batch uses seed+i.", rich_help_panel=SIZE)]
Negative = Annotated[Optional[str], typer.Option(
    "--negative", help="Negative prompt (default 'bad, ugly'; FLUX.1 takes none).", rich_help_panel=SIZE)]
ClipSkip = Annotated[int, typer.Option(
    "--clip-skip", help="Text encoder layer to use, counted from the end as in A1111: 1 = the last (default), 2 = the "
    "one before (what Pony, Illustrious and anime SD1.5 models expect). SDXL already uses the one before: 1 and 2 "
    "are the same there.", rich_help_panel=SIZE)]
Resize = Annotated[Optional[str], typer.Option(
    "--resize", help="Fit conditioning images and masks: crop (default), fit or stretch.", rich_help_panel=SIZE)]

# ---------------------------------------------------------------- Sampler
Sampler = Annotated[Optional[str], typer.Option(
    "--sampler", help=f"Sampler, A1111 names: {', '.join(SAMPLERS)} (default dpmpp_2m = DPM++ 2M). lcm is for LCM models/LoRAs (a notice otherwise).",
    rich_help_panel=SAMPLING)]
Schedule = Annotated[Optional[str], typer.Option(
    "--schedule", help=f"Schedule type: {', '.join(SCHEDULES)} (default: karras for the DPM++ samplers, normal for "
    "euler/euler_a/heun/ddim/unipc, lcm's own for lcm).", rich_help_panel=SAMPLING)]
PredictionType = Annotated[Optional[str], typer.Option(
    "--prediction-type", help="auto (default: what the model's scheduler config says), epsilon or v (v-prediction, "
    "e.g. NoobAI-XL v-pred, SD2-768).", rich_help_panel=SAMPLING)]
ZeroSnr = Annotated[Optional[bool], typer.Option(
    "--zero-snr/--no-zero-snr", help="Rescale the noise schedule to zero terminal SNR (default: on with v-prediction).",
    rich_help_panel=SAMPLING, show_default=False)]
CfgRescale = Annotated[Optional[float], typer.Option(
    "--cfg-rescale", help="CFG rescale phi in [0, 1] (default 0.7 with v-prediction, else 0).", rich_help_panel=SAMPLING)]

# ---------------------------------------------------------------- Layers
LayerWeights = Annotated[Optional[str], typer.Option(
    "--layer-weights", help="Layer weights file instead of the official one for the mode.", rich_help_panel=LAYERS)]
Weight = Annotated[float, typer.Option("--weight", help="Strength of the layer weights.", rich_help_panel=LAYERS)]
StopAt = Annotated[float, typer.Option(
    "--stop-at", help="Fraction of steps using the SDXL conditional weights, in [0, 1].", rich_help_panel=LAYERS)]
FgPrompt = Annotated[Optional[str], typer.Option("--fg-prompt", help="Foreground prompt (with --bg or --joint).", rich_help_panel=LAYERS)]
BgPrompt = Annotated[Optional[str], typer.Option("--bg-prompt", help="Background prompt (with --fg or --joint).", rich_help_panel=LAYERS)]
NAME_RULE = " A name inside --out-dir, not a path."
FgName = Annotated[Optional[str], typer.Option("--fg-name", help="File name of the foreground (fg.png)." + NAME_RULE, rich_help_panel=LAYERS)]
BgName = Annotated[Optional[str], typer.Option("--bg-name", help="File name of the background (bg.png)." + NAME_RULE, rich_help_panel=LAYERS)]
BlendedName = Annotated[Optional[str], typer.Option(
    "--blended-name", help="File name of the blended picture (blended.png)." + NAME_RULE, rich_help_panel=LAYERS)]

# ---------------------------------------------------------------- Editing
Strength = Annotated[float, typer.Option("--strength", help="img2img strength in (0, 1].", rich_help_panel=EDITING)]
ControlNet = Annotated[Optional[List[str]], typer.Option(
    "--controlnet", help="ControlNet model (folder or hub id), repeatable.", rich_help_panel=EDITING)]
ControlImage = Annotated[Optional[List[str]], typer.Option(
    "--control-image", help="Control image, one per --controlnet.", rich_help_panel=EDITING)]
ControlScale = Annotated[Optional[List[float]], typer.Option(
    "--control-scale", help="ControlNet scale: one for all or one per --controlnet.", rich_help_panel=EDITING)]

# ---------------------------------------------------------------- Output
Out = Annotated[Optional[str], typer.Option("--out", "-o", help=OUT_HELP, rich_help_panel=OUTPUT)]
Preview = Annotated[bool, typer.Option("--preview", help="Also write NAME.preview.png on a checkerboard.", rich_help_panel=OUTPUT)]
Psd = Annotated[Optional[str], typer.Option(
    "--psd", help="Also write the layers as a PSD (one per image: fields as in --out).", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON line per file written.", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notices on stderr.", rich_help_panel=OUTPUT)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.", rich_help_panel=OUTPUT)]

# ---------------------------------------------------------------- Device
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.", rich_help_panel=DEVICE)]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, fp32, fp16 or bf16.", rich_help_panel=DEVICE)]
Attention = Annotated[str, typer.Option("--attention", help="auto, sdpa or xformers.", rich_help_panel=DEVICE)]
Offload = Annotated[str, typer.Option(
    "--offload", help="none, model or sequential: keep the model in CPU memory and move parts to the GPU when they "
    "run (diffusers' model / sequential CPU offload; for GPUs with too little memory, e.g. FLUX.1 under 24 GB). "
    "CUDA only.", rich_help_panel=DEVICE)]
NoTta = Annotated[bool, typer.Option("--no-tta", help="One decoder pass instead of the 8-way median.", rich_help_panel=DEVICE)]


def request_args(cls, args: dict, **overrides) -> dict:
    """The values of a command's arguments that are fields of the request model `cls` (so a command
    lists its options once, in its signature), plus `overrides`."""
    values = {k: v for k, v in args.items() if k in cls.model_fields}
    values.update(overrides)
    return values


try:  # the Command class Typer builds commands with (Typer vendors click in recent versions)
    from typer.core import TyperCommand as _TyperCommand
except ImportError:  # pragma: no cover
    _TyperCommand = None


if _TyperCommand is not None:

    class PanelCommand(_TyperCommand):
        """A command whose plain-text --help groups its options by `rich_help_panel` (Typer shows
        panels only with rich output, which layerctl leaves off to keep --help fast)."""

        def format_options(self, ctx, formatter) -> None:
            args, panels = [], {}
            for param in self.get_params(ctx):
                rv = param.get_help_record(ctx)
                if rv is None:
                    continue
                if param.param_type_name == "argument":
                    args.append(rv)
                else:
                    panels.setdefault(getattr(param, "rich_help_panel", None) or "Other options", []).append(rv)
            if args:
                with formatter.section("Arguments"):
                    formatter.write_dl(args)
            for title, rows in panels.items():
                with formatter.section(title):
                    formatter.write_dl(rows)
else:  # pragma: no cover
    PanelCommand = None
