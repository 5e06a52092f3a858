"""The layerctl command line. Thin: parse, validate, call the API, print.

Nothing heavy (torch, diffusers, PIL) is imported at module level here or in
layerctl.commands.*, so `layerctl --help` and `--version` answer fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from layerctl import __version__
from layerctl.errors import LayerctlError

app = typer.Typer(
    name="layerctl",
    help="Transparent images and image layers from Stable Diffusion (LayerDiffuse).\n\n"
    'Example: layerctl gen "glass cup" --model tiny --out cup.png',
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module in layerctl/commands has register(app). Listed here so that the
# order of commands in --help is stable.
COMMAND_MODULES = [
    "gen",
    "decompose",
    "compose",
    "upscale",
    "run",
    "train_vae",
    "train_lora",
    "dataset",
    "doctor",
]

_state = {"debug": bool(os.environ.get("LAYERCTL_DEBUG"))}


def debug_enabled() -> bool:
    return _state["debug"]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"layerctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
) -> None:
    if debug:
        _state["debug"] = True


for _name in COMMAND_MODULES:
    importlib.import_module(f"layerctl.commands.{_name}").register(app)


def _error(msg: str) -> None:
    msg = " ".join(str(msg).split()) if "\n" not in str(msg).strip() else str(msg).strip()
    sys.stderr.write(f"layerctl: error: {msg}\n")


def _click_exceptions():
    """The click exception module Typer uses (newer Typer vendors its own copy of click)."""
    try:
        from typer._click import exceptions as cx  # Typer >= 0.26
    except ImportError:  # pragma: no cover - older Typer on real click
        from click import exceptions as cx
    return cx


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors to exit codes (2 usage/input, 1 job failed, 130 Ctrl-C)."""
    cx = _click_exceptions()
    if argv is None:
        argv = sys.argv[1:]
    if "--debug" in argv:  # accepted anywhere on the line
        _state["debug"] = True
        argv = [a for a in argv if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="layerctl", standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except tuple({getattr(cx, "Exit", typer.Exit), typer.Exit}) as exc:
        code = getattr(exc, "exit_code", 0)
    except tuple({getattr(cx, "Abort", typer.Abort), typer.Abort, KeyboardInterrupt}):
        sys.stderr.write("layerctl: interrupted\n")
        code = 130
    except cx.ClickException as exc:
        exc.show()
        if type(exc).__name__ == "NoArgsIsHelpError":
            code = 0
        else:
            code = 2 if isinstance(exc, cx.UsageError) else exc.exit_code
    except LayerctlError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        _error(str(exc))
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if _state["debug"]:
            raise
        _error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        code = 1
    sys.stdout.flush()
    sys.exit(code)
