"""JSON Lines files (metadata.jsonl, prompt lists, run logs): one reader and one writer.

Reading strips a UTF-8 byte-order mark and CR line ends (files saved by Windows editors),
skips blank lines and reports a bad line as ``FILE:LINE: ...`` in one LayerctlError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from layerctl.errors import LayerctlError


def read_text(path, what: str = "") -> str:
    """A text file's contents as str, without a byte-order mark, with \\n line ends."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LayerctlError(f"cannot read {what + ' ' if what else ''}{p}: {exc}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_rows(path, what: str = "", hint: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file.

    A line that is not a JSON object raises ``LayerctlError("FILE:LINE: ...")``; `hint` says
    what each line should hold.
    """
    p = Path(path)
    for i, line in enumerate(read_text(p, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LayerctlError(f"{p}:{i}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise LayerctlError(f"{p}:{i}: each line must be a JSON object{' with ' + hint if hint else ''}")
        yield i, row


def read_rows(path, what: str = "", hint: str = "") -> list[dict]:
    """Every object of a JSON Lines file (see :func:`iter_rows`)."""
    return [row for _i, row in iter_rows(path, what, hint)]


def dumps_row(row: dict) -> str:
    """One line of strict JSON (no NaN/Infinity), non-ASCII kept as is."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False)
