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


def expand_out(template: str, n: int, seeds: list[int], prompt: str = "") -> list[Path]:
    """Output paths for a batch: {i}, {seed}, {prompt_slug} fill in; a plain name gets _0001... when n > 1."""
    has_field = any(k in template for k in ("{i}", "{seed}"))
    paths = []
    for i in range(n):
        t = template
        if "{" in t:
            try:
                t = t.format(i=i, seed=seeds[i], prompt_slug=slug(prompt))
            except (KeyError, IndexError, ValueError) as exc:
                raise LayerctlError(f"bad output template '{template}': {exc} (fields: {{i}}, {{seed}}, {{prompt_slug}})") from None
        if n > 1 and not has_field:
            p = Path(t)
            t = str(p.with_name(f"{p.stem}_{i:04d}{p.suffix}"))
        paths.append(Path(t))
    if len(set(paths)) != len(paths):
        raise LayerctlError(f"output template '{template}' gives the same file for several images")
    return paths
