"""What `train-vae` and `train-lora` share on the command line: the run options and how a run is
started and reported (each command keeps its own help text and what it prints)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Callable, List, Optional

import typer

from layerctl.errors import LayerctlError

SetKeys = Annotated[List[str], typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. --set steps=200 (values are YAML).")]
RunDir = Annotated[Optional[str], typer.Option("--out-dir", help="Run folder (default: the recipe's out_dir).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")]
ResumeFrom = Annotated[Optional[str], typer.Option("--resume-from", metavar="CHECKPOINT", help="Continue from this checkpoint folder.")]
StartOver = Annotated[bool, typer.Option("--overwrite", help="Start over in a run folder that already holds a run.")]
JsonSummary = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
QuietRun = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables on stderr.")]


def run_training(load_config: Callable, train: Callable, recipe: str, set_: list, out_dir: Optional[str], resume: bool,
                 resume_from: Optional[str], overwrite: bool, quiet: bool, as_json: bool, files: list[str]) -> None:
    """Load the recipe (with --set / --out-dir), train, print the summary or the written files
    (`files`: summary keys); exit 130 when Ctrl-C stopped the run early."""
    overrides = list(set_)
    if out_dir:
        overrides.append(f"out_dir={json.dumps(out_dir)}")
    cfg = load_config(recipe, overrides)
    if resume and resume_from:
        raise LayerctlError("give --resume or --resume-from, not both")
    summary = train(cfg, resume=resume, resume_from=resume_from, overwrite=overwrite, quiet=quiet)
    if not summary.get("main_process", True):
        return  # the other processes of a multi-process run: the main one reports
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        sys.stdout.write("".join(f"{summary[k]}\n" for k in files))
    sys.stdout.flush()
    if summary["status"] == "interrupted" and summary["steps"] < cfg.steps:
        raise typer.Exit(130)
