"""`layerctl run RECIPE.yaml`: many gen / decompose / compose jobs from one YAML recipe.

Under `accelerate launch --num_processes N -m layerctl run RECIPE.yaml` the
jobs are split between the processes (jobs joined by ${references} stay on one).
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer

from layerctl.errors import LayerctlError


def _dist():
    """(rank, world, state) — accelerate's PartialState only when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # Without a GPU, accelerate only forms a process group when asked for CPU (gloo).
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        raise LayerctlError(
            f"launched as one of {os.environ['WORLD_SIZE']} processes, but accelerate formed no process group "
            "(on a machine without GPUs: accelerate launch --multi_gpu --num_processes N -m layerctl run ...)"
        )
    return state.process_index, state.num_processes, state


def _cell(text, width: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(headers: list[str], rows: list[list], max_widths: Optional[dict] = None) -> str:
    """A plain aligned text table (pipe- and grep-friendly)."""
    max_widths = max_widths or {}
    cells = [[_cell(c, max_widths.get(h, 200)) for h, c in zip(headers, row)] for row in rows]
    widths = [max([len(h)] + [len(r[k]) for r in cells]) for k, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(widths[k]) for k, h in enumerate(headers)).rstrip()]
    for r in cells:
        lines.append("  ".join(c.ljust(widths[k]) for k, c in enumerate(r)).rstrip())
    return "\n".join(lines) + "\n"


def _dry_run(plan, world: int, as_json: bool) -> None:
    from layerctl.recipes.graph import owners

    own = owners(plan.jobs, world) if world > 1 else {}
    if as_json:
        for job in plan.jobs:
            d = job.describe()
            if world > 1:
                d["process"] = own[job.index]
            sys.stdout.write(json.dumps(d, default=str) + "\n")
        sys.stdout.flush()
        return
    headers = ["#", "job", "mode", "seed", "prompt", "outputs", "needs"] + (["proc"] if world > 1 else [])
    rows = []
    for job in plan.jobs:
        outs = [str(p) for p in job.outputs.values()]
        row = [
            job.index, job.label, job.mode, getattr(job.request, "seed", "") if job.kind != "compose" else "",
            _prompt(job), ", ".join(outs), ",".join(str(d) for d in sorted(job.deps)),
        ]
        if world > 1:
            row.append(own[job.index])
        rows.append(row)
    sys.stdout.write(format_table(headers, rows, {"prompt": 40, "outputs": 90}))
    sys.stdout.write(f"{len(plan.jobs)} job{'s' if len(plan.jobs) != 1 else ''}, output_dir {plan.output_dir} (dry run: nothing written)\n")
    sys.stdout.flush()


def _prompt(job) -> str:
    from layerctl.recipes.planner import prompt_of

    if job.kind == "compose":
        return f"{len(job.request.layers)} layers"
    return prompt_of(job.request) or ""


def _summary(results, quiet: bool) -> None:
    counts = {s: sum(1 for r in results if r.status == s) for s in ("done", "skipped", "failed", "not run")}
    failed = [r for r in results if r.status in ("failed", "not run")]
    if quiet and not failed:
        return
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=True, highlight=False)
    show = results if not quiet else failed
    if len(show) <= 200:
        table = Table(title="layerctl run", title_justify="left")
        for h in ("#", "job", "status", "time", "reason / outputs"):
            table.add_column(h, overflow="fold")
        style = {"done": "green", "skipped": "cyan", "failed": "red", "not run": "yellow"}
        for r in sorted(show, key=lambda r: r.index):
            outs = [str(p) for p in r.outputs.values()]
            detail = r.reason if r.status != "done" else (outs[0] + (f" (+{len(outs) - 1})" if len(outs) > 1 else "") if outs else "")
            table.add_row(str(r.index), r.job, f"[{style[r.status]}]{r.status}[/]", f"{r.seconds:.1f}s" if r.seconds else "", detail)
        con.print(table)
    else:
        for r in sorted(failed, key=lambda r: r.index):
            con.print(f"[red]failed[/] {r.index} {r.job}: {r.reason}", markup=True)
    con.print(
        f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
        + (f", {counts['not run']} not run" if counts["not run"] else "")
    )


def run(
    recipe: str = typer.Argument(..., metavar="RECIPE.yaml", help="The recipe (YAML; '-' reads stdin): defaults, jobs (gen / decompose / compose), output_dir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded job list; load no model, write nothing."),
    resume: bool = typer.Option(False, "--resume", help="Skip jobs whose outputs exist and whose metadata matches."),
    continue_on_error: bool = typer.Option(False, "--continue-on-error", help="Run the other jobs after a failure (exit 1 at the end)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout: one per job (or per planned job with --dry-run)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a recipe key: --set defaults.steps=4 (repeatable; values are YAML)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", metavar="DIR", help="Write under this folder instead of the recipe's output_dir."),
    allow_outside: bool = typer.Option(False, "--allow-outside", help="Allow output paths outside output_dir (absolute, '..')."),
    force: bool = typer.Option(False, "--force", help="Allow a recipe that expands to more than 100,000 jobs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or notices on stderr (failures are still shown)."),
) -> None:
    """Run a YAML recipe: prompt x seed batches, layered scenes, PSDs.

    Example: layerctl run recipes/batch.yaml --dry-run
    """
    from layerctl import recipes
    from layerctl.progress import log

    rank, world, state = _dist()
    try:
        text = None
        if recipe == "-":  # the recipe on stdin; inputs relative to the current folder
            if world > 1:
                raise LayerctlError("a recipe on stdin cannot be shared between processes; give a file")
            text, recipe = sys.stdin.read(), "<stdin>"
        plan = recipes.plan_recipe(recipe, set_ or (), allow_outside=allow_outside, force=force,
                                   output_dir=output_dir, overwrite=overwrite, text=text)
        if dry_run:
            if rank == 0:
                _dry_run(plan, world, as_json)
            return
        mine = recipes.shard(plan.jobs, rank, world)
        decision = recipes.preflight(plan.jobs, resume)
    except LayerctlError:
        if rank != 0:  # every process finds the same problem; one message is enough
            raise typer.Exit(2)
        raise
    if state is not None:
        state.wait_for_everyone()  # nobody writes before every process has checked the disk

    prefix = f"[{rank}] " if world > 1 else ""
    if rank == 0 and not quiet:
        n_skip = sum(1 for v in decision.values() if v == "skip")
        log(f"layerctl run: {len(plan.jobs)} jobs ({n_skip} already done) from {recipe}"
            + (f" on {world} processes" if world > 1 else ""))

    finished = []

    def on_result(r) -> None:
        finished.append(r)
        if as_json:
            sys.stdout.write(json.dumps(r.as_dict()) + "\n")
        elif r.status == "done":
            for p in r.outputs.values():
                sys.stdout.write(f"{p}\n")
        sys.stdout.flush()

    def session_factory():
        from layerctl.quiet import quiet_libraries

        quiet_libraries()
        from layerctl.api import Session

        return Session(quiet=quiet)

    results = []
    try:
        results = recipes.run_plan(
            plan, mine, session_factory, resume=resume, continue_on_error=continue_on_error,
            on_result=on_result, log=lambda s: log(prefix + s, quiet), rank=rank, decision=decision,
        )
    except KeyboardInterrupt:
        sys.stderr.write(f"layerctl: {prefix}{_interrupted(finished, len(mine), recipe)}\n")
        raise typer.Exit(130) from None
    finally:
        if state is not None:
            from accelerate.utils import gather_object

            gathered = gather_object([r.as_dict() for r in results])
            results = [recipes.Result(**{k: v for k, v in d.items() if k not in ("process",)}, rank=d["process"]) for d in gathered]
            state.wait_for_everyone()
            state.destroy_process_group()  # a process group left open can abort the exit (gloo)
    if rank == 0:
        _summary(results, quiet)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


def _interrupted(finished: list, total: int, recipe: str) -> str:
    """What a Ctrl-C during `run` leaves, and how to go on."""
    done = sum(1 for r in finished if r.status in ("done", "skipped"))
    again = "" if recipe == "<stdin>" else f"; `layerctl run {recipe} --resume` skips them and does the rest"
    return (f"interrupted after {done} of {total} jobs; their files are kept whole and the job that was running "
            f"left no half-written file{again}")


def register(app: typer.Typer) -> None:
    app.command("run", no_args_is_help=True)(run)
