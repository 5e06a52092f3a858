"""`layerctl dataset rgba|layers`: build training datasets (imagefolder of RGBA; fg/bg/blended records)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from layerctl.errors import LayerctlError

MODEL_HELP = "Model: tiny, tiny-xl, a diffusers folder, a hub id or a .safetensors file (an inpainting checkpoint is used as one)."

dataset_app = typer.Typer(
    name="dataset",
    help="Build training datasets: RGBA imagefolders and (fg, bg, blended) layer records.\n\n"
    "Example: layerctl dataset rgba cutouts/ --out data/rgba",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _request(cls, **values):
    from pydantic import ValidationError

    from layerctl.requests import validation_message

    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise LayerctlError(validation_message(exc)) from None


def _log(msg: str) -> None:
    sys.stderr.write(msg.rstrip("\n") + "\n")


class _Progress:
    """JSON lines on stdout (--json) and a rich bar on stderr (when it is a terminal, main process only)."""

    def __init__(self, as_json: bool, label: str, show_bar: bool):
        self.as_json = as_json
        self.label = label
        self.show_bar = show_bar and sys.stderr.isatty()
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.show_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True, highlight=False), transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, ev: dict) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(ev, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        if self.bar is not None and "done" in ev:
            self.bar.update(self.task, completed=ev["done"], total=ev.get("total"))


def _report(summary, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary.as_json(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(summary.metadata + "\n")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items())) or "none"
    _log(
        f"layerctl: {summary.written} of {summary.total} record(s) in {summary.metadata} "
        f"({summary.new} new, {summary.resumed} from an earlier run); skipped: {skipped}"
    )
    sys.stdout.flush()


def rgba(
    sources: List[str] = typer.Argument(..., metavar="SRC", help="Folders (searched recursively), image files or globs."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face imagefolder)."),
    resolution: int = typer.Option(1024, "--resolution", help="Bucket area about N*N px (multiples of 64); 0 keeps the size."),
    fit: str = typer.Option("crop", "--fit", help="Into the bucket: crop (cover, centre crop) or pad (fit, transparent border)."),
    upscale: bool = typer.Option(False, "--upscale", help="Enlarge images smaller than the bucket area (default: never)."),
    min_size: int = typer.Option(64, "--min-size", help="Skip images whose shorter side is below N px."),
    min_coverage: float = typer.Option(0.0, "--min-coverage", help="Skip images whose mean alpha is below this (0..1)."),
    max_coverage: float = typer.Option(1.0, "--max-coverage", help="Skip images whose mean alpha is above this (0..1)."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep near-duplicates."),
    dedup_distance: int = typer.Option(12, "--dedup-distance", help="Perceptual-hash bits (of 512) within which images are duplicates."),
    captions: Optional[str] = typer.Option(None, "--captions", help="CSV or JSONL of file name -> caption (else sidecar .txt files)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run in --out, skipping finished records."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a dataset folder made before."),
    as_json: bool = typer.Option(False, "--json", help="Progress and the summary as JSON lines on stdout."),
) -> None:
    """Ingest RGBA images: check alpha, drop duplicates, resize to buckets, write an imagefolder.

    Example: layerctl dataset rgba cutouts/ "more/*.png" --out data/rgba --resolution 512
    """
    from layerctl.dataset import RgbaDatasetRequest, Shard, build_rgba_dataset

    req = _request(
        RgbaDatasetRequest, sources=list(sources), out=out, resolution=resolution, fit=fit, upscale=upscale,
        min_size=min_size, min_coverage=min_coverage, max_coverage=max_coverage, dedup=not no_dedup,
        dedup_distance=dedup_distance, captions=captions, resume=resume, overwrite=overwrite,
    )
    shard = Shard.from_accelerate()
    with _Progress(as_json, "dataset rgba", shard.main) as progress:
        summary = build_rgba_dataset(req, on_event=progress, shard=shard)
    if shard.main:
        _report(summary, as_json)


def layers(
    rgba_dir: str = typer.Argument(..., metavar="RGBA_DIR", help="Folder of RGBA foregrounds (e.g. the output of 'dataset rgba')."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder for the layer records."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL, one line per record: fg, bg, whole (+ optional file_name, negative, seed)."),
    prompt_template: str = typer.Option("{fg} on {bg}", "--prompt-template", help="Whole-image prompt without --prompts; {fg} = caption, {bg} = background."),
    bg: Optional[List[str]] = typer.Option(None, "--bg", help="A background prompt for the template (repeatable)."),
    backgrounds: Optional[str] = typer.Option(None, "--backgrounds", help="Text file of background prompts, one per line."),
    per_foreground: int = typer.Option(1, "--per-foreground", help="Records per foreground (template mode: the next backgrounds)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa or xformers."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps per inpainting pass (model default)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale (model default)."),
    seed: int = typer.Option(0, "--seed", help="Base seed; each record's seed is derived from it and the record's hash."),
    negative: str = typer.Option("bad, ugly", "--negative", help="Negative prompt."),
    clip_skip: int = typer.Option(1, "--clip-skip", help="Text encoder layer from the end, as in gen (1 = the last; 2 for Pony/Illustrious/anime SD1.5)."),
    mask_radius: int = typer.Option(16, "--mask-radius", help="Dilate the foreground mask by N px before repainting it."),
    mask_feather: int = typer.Option(4, "--mask-feather", help="Blend the repainted area in over N px inside the mask's edge (at most --mask-radius)."),
    alpha_threshold: float = typer.Option(1.0 / 255.0, "--alpha-threshold", help="Alpha at or above which a pixel is foreground."),
    size: Optional[str] = typer.Option(None, "--size", help="Canvas N or WxH (multiples of 64); default: the foreground grown to multiples of 64."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run in --out, skipping finished records."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a dataset folder made before."),
    as_json: bool = typer.Option(False, "--json", help="Progress and the summary as JSON lines on stdout."),
) -> None:
    """Make (fg, bg, blended) records: inpaint around each foreground, then inpaint it away.

    Example: layerctl dataset layers data/rgba --bg "a beach" --bg "a kitchen" --model sdxl-inpaint/ --out data/layers
    """
    from layerctl.dataset import LayersDatasetRequest, Shard, build_layers_dataset

    req = _request(
        LayersDatasetRequest, rgba_dir=rgba_dir, out=out, prompts=prompts, prompt_template=prompt_template,
        backgrounds=list(bg or []), backgrounds_file=backgrounds, per_foreground=per_foreground, model=model,
        device=device, dtype=dtype, attention=attention, steps=steps, cfg=cfg, seed=seed, negative=negative, clip_skip=clip_skip,
        mask_radius=mask_radius, mask_feather=mask_feather, alpha_threshold=alpha_threshold, size=size, resume=resume, overwrite=overwrite,
    )
    shard = Shard.from_accelerate()
    with _Progress(as_json, "dataset layers", shard.main) as progress:
        summary = build_layers_dataset(req, on_event=progress, shard=shard, log=_log)
    if shard.main:
        _report(summary, as_json)


dataset_app.command("rgba")(rgba)
dataset_app.command("layers")(layers)


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
