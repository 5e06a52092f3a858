"""Shared test setup.

One compute thread for torch (and for the CLI subprocesses the tests start):
the tiny models are too small to gain from two, and on a busy 2-core machine
two threads per process oversubscribe the cores badly (measured 10-40x
slower). Pixel determinism is per thread count, so this also pins it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
