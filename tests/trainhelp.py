"""Helpers shared by the train-vae and train-lora tests."""

from __future__ import annotations

import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


@contextlib.contextmanager
def guard_steps():
    """Every optimizer.step() must see finite gradients (a NaN check before backward/step keeps them
    so); counts the steps taken and the run log's close() calls."""
    from layerctl.training import harness as H

    seen = {"steps": 0, "closed": 0}

    def check(opt, args, kwargs):
        for g in opt.param_groups:
            for p in g["params"]:
                assert p.grad is None or bool(torch.isfinite(p.grad).all()), "a non-finite gradient reached optimizer.step()"
        seen["steps"] += 1

    real_close = H.RunLog.close

    def close(self):
        seen["closed"] += 1
        real_close(self)

    handle = register_optimizer_step_pre_hook(check)
    H.RunLog.close = close
    try:
        yield seen
    finally:
        handle.remove()
        H.RunLog.close = real_close
