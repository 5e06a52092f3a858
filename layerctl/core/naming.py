"""Names of things a job writes: prompt slugs, seeds, output templates.

One ``slug`` serves `gen`, `run` and `dataset`: lower-case ASCII letters and digits joined by
``-``, at most 40 characters; text with no letter or digit gives ``image``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from layerctl.errors import LayerctlError


def new_seed() -> int:
    """A random seed in [0, 2**31)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def slug(text: str, limit: int = 40) -> str:
    """'A glass cup, HIGH quality!' -> 'a-glass-cup-high-quality'; no letter or digit -> 'image'."""
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text or "").strip("-").lower()
    return s[:limit].strip("-") or "image"


def batch_seeds(seed, n: int) -> list[int]:
    """Seeds of a batch of n: seed, seed+1, ... (a random start when seed is None)."""
    base = seed if seed is not None else new_seed()
    return [base + i for i in range(n)]


TEMPLATE_FIELDS = ("i", "seed", "prompt_slug")
MAX_TEMPLATE_RESULT = 4096  # characters of one filled-in output path
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SPEC = re.compile(r"0?[1-9][0-9]?d|d")  # {i:04d}, {seed:8d}, {i:d}: integer width at most 99


def fill_template(template: str, **values) -> str:
    """Fill {i}, {seed}, {prompt_slug} (and {i:04d}-style zero-padded numbers) by name only.

    No attribute or index access, no other format spec, literal braces as ``{{`` / ``}}``; the
    result is at most MAX_TEMPLATE_RESULT characters. Anything else is a one-line LayerctlError.
    """
    fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)

    def bad(why: str) -> LayerctlError:
        shown = template if len(template) <= 80 else template[:77] + "..."
        return LayerctlError(f"bad output template '{shown}': {why} (fields: {fields}; numbers may be padded as {{i:04d}})")

    def one(m: re.Match) -> str:
        tok = m.group(0)
        if tok in ("{{", "}}"):
            return tok[0]
        if m.group(1) is None:
            raise bad(f"unmatched '{tok}' (write {tok}{tok} for a literal brace)")
        name, _, spec = m.group(1).partition(":")
        if name not in TEMPLATE_FIELDS:
            raise bad(f"unknown field {{{m.group(1)}}}")
        value = values[name]
        if ":" in m.group(1):
            if name == "prompt_slug" or not _SPEC.fullmatch(spec):
                raise bad(f"format '{spec}' is not allowed for {{{name}}}")
            return format(int(value), spec)
        return str(value)

    out = _FIELD.sub(one, template)
    if len(out) > MAX_TEMPLATE_RESULT:
        raise bad(f"the name would be {len(out)} characters long (at most {MAX_TEMPLATE_RESULT})")
    return out


def has_template_field(template: str) -> bool:
    """True when the template names {i} or {seed} (a name that differs per image)."""
    return bool(re.search(r"(?<!\{)\{(i|seed)(:[^{}]*)?\}", template or ""))


def expand_out(template: str, n: int, seeds: list[int], prompt: str = "", start: int = 0, total: int | None = None) -> list[Path]:
    """Output paths for n images: {i}, {seed}, {prompt_slug} fill in (see :func:`fill_template`).

    One rule for every command: ``{i}`` counts the images the command writes from 0 (``start`` is
    the index of this job's first image); when the command writes several images (``total``,
    default n) and the name has no {i}/{seed}, NAME.png becomes NAME_0000.png, NAME_0001.png, ...
    """
    total = n if total is None else total
    has_field = has_template_field(template)
    slugged = slug(prompt)
    paths = []
    for k in range(n):
        i = start + k
        t = fill_template(template, i=i, seed=seeds[k], prompt_slug=slugged)
        if total > 1 and not has_field:
            p = Path(t)
            t = str(p.with_name(f"{p.stem}_{i:04d}{p.suffix}"))
        paths.append(Path(t))
    if len(set(paths)) != len(paths):
        raise LayerctlError(f"output template '{template}' gives the same file for several images")
    return paths
