"""`layerctl train-lora` and `layerctl export-lora`: train the UNet weights for transparency / layers,
and convert LoRA files between the diffusers/peft format and the official LayerDiffuse layout."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from layerctl.commands._training import JsonSummary, QuietRun, Resume, ResumeFrom, RunDir, SetKeys, StartOver, run_training


def train_lora(
    recipe: str = typer.Argument(..., metavar="RECIPE.yaml", help="Training recipe (see recipes/train-lora.yaml)."),
    set_: SetKeys = [],
    out_dir: RunDir = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    overwrite: StartOver = False,
    as_json: JsonSummary = False,
    quiet: QuietRun = False,
) -> None:
    """Train a UNet LoRA that draws transparent latents (mode: transparent) or the SD1.5 joint layer model (mode: layers).

    Example: layerctl train-lora recipes/train-lora-smoke.yaml --out-dir runs/lora

    Several GPUs: accelerate launch -m layerctl train-lora RECIPE.yaml (CPUs: torchrun --nproc_per_node N -m layerctl train-lora ...)
    """
    from layerctl.training.lora import load_config, train

    run_training(load_config, train, recipe, set_, out_dir, resume, resume_from, overwrite, quiet, as_json, ["weights"])


def export_lora(
    src: str = typer.Argument(..., metavar="IN.safetensors", help="A LoRA file: diffusers/peft (from train-lora), kohya, or LayerDiffuse key::lora::N."),
    fmt: str = typer.Option(..., "--format", "-f", help="layerdiffuse (official key::lora::N layout, for Forge/ComfyUI) or diffusers (peft)."),
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model whose UNet names the keys (default: from the file's metadata, else detected: sd15, sdxl, tiny, tiny-xl)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as the input), fp16 (as the official files), bf16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts (pairs, ranks, max_abs_diff) as JSON on stdout."),
) -> None:
    """Convert a UNet LoRA between the diffusers/peft format and the official LayerDiffuse layout.

    The written file is read back and the weights it merges into are compared with the input's;
    the largest absolute difference is printed.

    Example: layerctl export-lora runs/lora/pytorch_lora_weights.safetensors --format layerdiffuse --out lora_ld.safetensors
    """
    from layerctl.models.lora_format import export_lora as run_export

    config = None
    if model:
        config = _unet_config(model)
    res = run_export(src, out, fmt, config, dtype, overwrite)
    if as_json:
        sys.stdout.write(json.dumps(res, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{res['output']}\n")
        sys.stderr.write(
            f"layerctl: {res['pairs']} LoRA pairs (rank {', '.join(map(str, res['ranks']))}), {res['input_format']} -> {res['format']}; "
            f"max abs difference of the merged weights, input vs written file: {res['max_abs_diff']:.3g}\n"
        )
    sys.stdout.flush()


def _unet_config(ref: str) -> dict:
    """A UNet config for key names: the known families by name, else the model's own (loaded)."""
    from layerctl.models.lora_format import known_unet_configs

    known = known_unet_configs()
    if ref in known:
        return known[ref]
    from layerctl.backends.registry import load_model
    from layerctl.models.patches import _plain_config

    return _plain_config(load_model(ref, device="cpu", dtype="fp32").unet)


def register(app: typer.Typer) -> None:
    app.command("train-lora", no_args_is_help=True)(train_lora)
    app.command("export-lora", no_args_is_help=True)(export_lora)
