"""`layerctl doctor`: device, dtype, attention, versions, backends and the official files found or missing."""

from __future__ import annotations

from typing import Optional

import typer


def doctor(
    as_json: bool = typer.Option(False, "--json", help="The report as one JSON object on stdout."),
    weights_dir: Optional[str] = typer.Option(None, "--weights-dir", help="Folder with the official LayerDiffuse files (env LAYERCTL_WEIGHTS_DIR)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps: the device to report on."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
) -> None:
    """What layerctl finds here: the first thing to run when something does not work.

    Example: layerctl doctor --json
    """
    import json

    from layerctl.doctor import report, text_lines
    from layerctl.errors import LayerctlError

    if device not in ("auto", "cpu", "cuda", "mps"):
        raise LayerctlError(f"--device must be auto, cpu, cuda or mps (got '{device}')")
    if dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise LayerctlError(f"--dtype must be auto, fp32, fp16 or bf16 (got '{dtype}')")
    r = report(weights_dir, device, dtype)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
    else:
        typer.echo("\n".join(text_lines(r)))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
