"""Paths a recipe names: output templates, the files a job writes, and the one containment check.

Every output path of a recipe (a job's `out`, `out_dir`, `psd`, the layer file names
`fg_name` / `bg_name` / `blended_name`, from a job, from `defaults:` or from `--set`)
goes through :meth:`OutputArea.contain` before anything runs: it must stay inside
`output_dir` once symbolic links are resolved (unless `--allow-outside`).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Optional

PLACEHOLDERS = ("name", "prompt_slug", "seed", "i")
# request fields that are file names inside a job's folder (never paths)
NAME_KEYS = ("fg_name", "bg_name", "blended_name")


def check_template(tpl: str) -> None:
    """Only {name}, {prompt_slug}, {seed}, {i} (with optional format specs) are allowed. Raises ValueError."""
    try:
        parsed = list(string.Formatter().parse(tpl))
    except ValueError as exc:
        raise ValueError(f"bad output template {tpl!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _lit, fname, spec, conv in parsed:
        if fname is None:
            continue
        if fname not in PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{fname}}} in {tpl!r} (use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
            )
        if spec and "{" in spec:
            raise ValueError(f"nested placeholders are not allowed in {tpl!r}")
        if conv not in (None, "s"):
            raise ValueError(f"conversion !{conv} is not allowed in {tpl!r}")


def render_template(tpl: str, values: dict) -> str:
    check_template(tpl)
    try:
        return tpl.format(**values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot fill output template {tpl!r}: {exc}") from None


class OutputArea:
    """The folder a recipe writes into, and the one check that keeps every output inside it."""

    def __init__(self, root: Path, allow_outside: bool = False):
        self.root = root
        self.allow_outside = allow_outside
        self._real: dict[Path, str] = {}  # 100,000 jobs share few folders

    def _realpath(self, p: Path) -> str:
        if p not in self._real:
            self._real[p] = os.path.realpath(p)
        return self._real[p]

    def contain(self, what: str, rel: str, base: Optional[Path] = None) -> tuple[Optional[Path], str]:
        """(`base / rel`, "") when it stays inside the output folder, else (None, why not).

        `what` names the value in the message ("output path", "fg_name"); `base` is a
        folder inside the area (default: the area itself). The file itself may be a link:
        it is replaced, not followed, so only its folder has to resolve inside.
        """
        base = self.root if base is None else base
        if self.allow_outside:
            p = Path(os.path.expanduser(rel))
            return (p if p.is_absolute() else base / p), ""
        rp = Path(rel)
        if rp.is_absolute() or rel.startswith("~"):
            return None, f"{what} {rel!r} is absolute; outputs go inside output_dir (or use --allow-outside)"
        if ".." in rp.parts:
            return None, f"{what} {rel!r} leaves output_dir (no '..'; or use --allow-outside)"
        full = base / rp
        if full.name in ("", ".", ".."):
            return None, f"{what} {rel!r} names a folder, not a file"
        if not self.inside(full):
            return None, f"{what} {rel!r} leaves output_dir (through a link?); use --allow-outside"
        return full, ""

    def inside(self, full: Path) -> bool:
        """Whether the folder of the file `full` resolves (links followed) inside the output folder."""
        if self.allow_outside:
            return True
        try:
            root = self._realpath(self.root)
            folder = self._realpath(full.parent)
        except OSError:
            return False
        return folder == root or folder.startswith(root.rstrip(os.sep) + os.sep)


def gen_outputs(req, mode: str) -> dict:
    """role -> path that `api.Session.gen(req)` writes (batch 1)."""
    out: dict = {}
    if mode == "rgba":
        out["rgba"] = Path(req.out)
    else:
        d = Path(req.out_dir)
        from layerctl.core.frames import GEN_OUTPUTS

        for role in GEN_OUTPUTS[mode]:
            out[role] = d / getattr(req, f"{role}_name")
    if req.preview:  # NAME.preview.png next to each transparent layer
        from layerctl.outputs import preview_path

        for role in [r for r in out if r in ("rgba", "fg")]:
            out[f"{role}_preview"] = preview_path(out[role])
    if req.psd:
        out["psd"] = Path(req.psd)
    return out


def decompose_outputs(req) -> dict:
    """role -> path that `api.Session.decompose(req)` writes."""
    d = Path(req.out_dir)
    out = {}
    if not req.fg:
        out["fg"] = d / req.fg_name
    if not req.bg:
        out["bg"] = d / req.bg_name
    if req.psd:
        out["psd"] = Path(req.psd)
    return out
