"""The Python API: what the CLI and recipes call.

    from layerctl.api import Session
    from layerctl.requests import GenRequest
    with Session() as s:
        records = s.gen(GenRequest(prompt="glass cup", model="tiny", out="cup.png", seed=7))
"""

from __future__ import annotations

from layerctl.outputs import OutputRecord
from layerctl.session import Session

__all__ = ["OutputRecord", "Session"]
