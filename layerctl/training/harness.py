"""What train-vae and train-lora share around their loops (docs/train-vae.md, docs/train-lora.md).

Each trainer keeps its own visible loop; this module holds the parts that must behave the same
in both:

* ``check_out_dir`` - the output folder / ``--resume`` / ``--resume-from`` / ``--overwrite`` rules;
* ``start_accelerator`` - the Accelerator (mixed precision, CPU fallback, threads, seed);
* ``make_loader`` - the training DataLoader, its generator seeded (so it never draws from the global
  RNG and a resumed run repeats an uninterrupted one exactly);
* ``write_checkpoint`` / ``load_checkpoint`` / ``list_checkpoints`` / ``export_files`` - checkpoint
  folders ``OUT/checkpoints/step-NNNNNNN/`` written under a temporary name and renamed, the last
  ``keep_last`` kept, with the RNG state (``rng_state`` / ``set_rng_state``);
* ``check_finite`` - a NaN/inf loss stops the run *before* its gradients reach an optimizer;
* ``RunLog`` / ``read_log`` - ``OUT/log.jsonl`` (and TensorBoard);
* ``Reporter`` - the progress bar, steps/s (validation and checkpoint time excluded), log rows;
* ``StopFlag`` - Ctrl-C: finish the step, checkpoint, stop; twice: abort;
* ``finish_summary`` - the fields every run's summary has.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from layerctl.errors import JobFailed, LayerctlError

CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step-(\d+)$")
LOG_FILE = "log.jsonl"
STATE_FILE = "state.pt"
INFO_FILE = "state.json"


# ---------------------------------------------------------------- the output folder, before any model loads


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each complete checkpoint in OUT/checkpoints/, oldest first."""
    d = Path(out_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / INFO_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def check_out_dir(out_dir: Path, resume: bool, resume_from: Optional[str], overwrite: bool, command: str,
                  also_clear: Iterable[str] = ()) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh run). A fresh run into a used folder needs
    `overwrite`, which clears its checkpoints (and the `also_clear` subfolders)."""
    ckpts = list_checkpoints(out_dir)
    if resume_from:
        p = Path(resume_from).expanduser()
        if not (p / INFO_FILE).is_file():
            raise LayerctlError(f"--resume-from {p}: not a {command} checkpoint folder (no {INFO_FILE})")
        return p
    if resume:
        if not ckpts:
            raise LayerctlError(f"--resume: no checkpoint in {out_dir / CKPT_DIR} to resume from")
        return ckpts[-1][1]
    if ckpts or (out_dir / LOG_FILE).exists():
        if not overwrite:
            raise LayerctlError(f"{out_dir} already holds a run (use --resume to continue it, or --overwrite to start over)")
        for sub in (CKPT_DIR, *also_clear):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    return None


def check_tensorboard(enabled: bool) -> None:
    import importlib.util

    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise LayerctlError("tensorboard: true needs the tensorboard package (pip install 'layerctl[tensorboard]')")


# ---------------------------------------------------------------- Accelerator, data loader


def mixed_precision(name: str) -> str:
    """'auto' -> bf16 on a GPU that has it, fp16 on another GPU, 'no' on the CPU."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def start_accelerator(cfg, device_choice: str, console):
    """(accelerator, mixed precision) for a config with mixed_precision, grad_accum, cpu_threads, seed.
    Consoles of processes other than the main one go quiet."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = mixed_precision(cfg.mixed_precision)
    cpu = device_choice == "cpu" or (device_choice == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)
    if not accelerator.is_main_process:
        console.quiet = True
    if cfg.cpu_threads and accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    set_seed(cfg.seed)
    return accelerator, mp


def make_loader(stream, batch_size: int, start: int, rank: int, world: int, workers: int, seed: int, collate=None):
    """The training DataLoader: micro-batches of positions start, start+1, ... (data.PositionBatches).

    Its generator is seeded with the run's seed: an unseeded DataLoader draws its base seed from
    the global torch RNG when it starts iterating, so a resumed run (which restores that RNG and
    then starts a new iterator) would continue from another RNG state than an uninterrupted one.
    """
    import torch
    from torch.utils.data import DataLoader

    from layerctl.training import data as D

    return DataLoader(
        stream,
        batch_sampler=D.PositionBatches(batch_size, start, rank, world),
        num_workers=workers,
        collate_fn=collate or D.collate,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def lr_factor(step: int, optim, total: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based); `optim` has
    warmup_steps, schedule ('constant' / 'cosine') and min_lr_ratio."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(1, total - optim.warmup_steps)
        t = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def set_lr(optimizers, factor: float) -> None:
    """Every param group's lr = its base_lr * factor."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor


def check_finite(value, step: int, last_ckpt: Optional[Path], what: str = "loss") -> None:
    """Stop the run on a NaN/inf `value` of step `step` (0-based). Called before backward, so
    nothing of that step reaches the weights."""
    v = float(value)
    if not math.isfinite(v):
        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else " (no checkpoint was written yet)"
        raise JobFailed(f"the {what} became {v} at step {step + 1}: training stopped, nothing of this step was applied{where}")


# ---------------------------------------------------------------- checkpoints


def save_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def usual_mode(path: Path) -> None:
    """Temporary files are created 0600; give a finished file the mode a plain open() would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    st = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()[1]), "numpy_seed": int(np.random.get_state()[1][0])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import random

    import torch

    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(json.loads(st["python"])), None))
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # noqa: BLE001 - another GPU count: not fatal
            pass


def write_checkpoint(out_dir: Path, step: int, write_files: Callable[[Path], None], state: dict, info: dict,
                     keep_last: int) -> Path:
    """checkpoints/step-N/: `write_files(folder)` (the weight files), state.pt, state.json - written
    under a temporary name, then renamed; only the last `keep_last` checkpoints are kept."""
    import torch

    root = Path(out_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_files(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / INFO_FILE).write_text(json.dumps({"step": step, **info}, indent=1, sort_keys=True, default=str))
        if final.exists():
            old = root / f".old-step-{step:07d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _s, p in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(state.pt's tensors, state.json) of a checkpoint; a damaged file is a LayerctlError naming it."""
    import torch

    folder = Path(folder)
    info_path, state_path = folder / INFO_FILE, folder / STATE_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            raise ValueError("no step number")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LayerctlError(f"the checkpoint is damaged: {info_path} cannot be read ({_first_line(exc)}); "
                            "resume from an earlier one with --resume-from") from None
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError("not a dict of tensors")
    except Exception as exc:  # noqa: BLE001 - torch raises several kinds; its advice (weights_only=False) is wrong here
        why = "missing" if not state_path.exists() else type(exc).__name__
        raise LayerctlError(f"the checkpoint is damaged: {state_path} cannot be read ({why}); "
                            "resume from an earlier one with --resume-from") from None
    return state, info


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def export_files(out_dir: Path, ckpt: Path, names: Iterable[str]) -> None:
    """Copy a checkpoint's weight files to OUT/ (each atomically): the files a user picks up."""
    for name in names:
        tmp = Path(out_dir) / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(ckpt / name, tmp)
        os.replace(tmp, Path(out_dir) / name)


def write_config(out_dir: Path, cfg) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))


# ---------------------------------------------------------------- the run log


class RunLog:
    """Appends JSON lines to OUT/log.jsonl (and TensorBoard when asked). On resume, drops lines after the step."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: Optional[int]):
        self.path = Path(out_dir) / LOG_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if row.get("step", 0) <= resume_step:
                    keep.append(line)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # noqa: BLE001
                raise LayerctlError("tensorboard: true needs the tensorboard package (pip install 'layerctl[tensorboard]')") from None
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.tb is not None:
            prefix = "val/" if row.get("kind") == "val" else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(prefix + k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_log(out_dir, kind: str = "train") -> list[dict]:
    """The rows of OUT/log.jsonl of one kind ('train' or 'val')."""
    from layerctl.io.jsonl import read_rows

    p = Path(out_dir) / LOG_FILE
    if not p.exists():
        return []
    return [r for r in read_rows(p, "run log") if r.get("kind") == kind]


# ---------------------------------------------------------------- progress


class Reporter:
    """The progress bar, steps/s and the train log rows of one run (a context manager).

    ``tick(step, row, line)`` after each optimizer step: every ``log_every`` steps (and at the
    last) it adds steps/s to `row`, logs it and, when stderr is not a terminal, prints `line`.
    Time spent inside ``aside()`` (validation, checkpoints) does not count towards steps/s.
    """

    def __init__(self, label: str, console, log: RunLog, total: int, start: int, log_every: int, show: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console, self.log, self.total, self.start, self.log_every, self.show = console, log, total, start, log_every, show
        self.progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not show, transient=False,
        )

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total, completed=self.start, rate="", loss="")
        self.t0, self.n = time.time(), 0
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def tick(self, step: int, row: Callable[[], dict], line: Callable[[float], str]) -> None:
        self.n += 1
        if step % self.log_every == 0 or step == self.total:
            now = time.time()
            r = {"kind": "train", "step": step, **row(), "steps_per_s": self.n / max(now - self.t0, 1e-9)}
            self.log.write(r)
            self.progress.update(self.task, rate=f"{r['steps_per_s']:.2f} step/s", loss=f"loss {r['loss']:.4f}")
            if self.show and not sys.stderr.isatty():
                self.console.print(line(r["steps_per_s"]))
            self.t0, self.n = now, 0
        self.progress.update(self.task, completed=step)

    @contextlib.contextmanager
    def aside(self):
        t = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - t


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps (and at the last step) is due after `step`."""
    return step % every == 0 or step == total


# ---------------------------------------------------------------- Ctrl-C


class StopFlag:
    """First Ctrl-C: finish the current step, write a checkpoint, stop. Second: abort at once."""

    def __init__(self, console=None):
        self.stop = False
        self.console = console
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        if self.console is not None:
            self.console.print("[yellow]Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again aborts)[/]")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def next_batch(batches, stop: StopFlag):
    """The next micro-batch, or None when a DataLoader worker died from the same Ctrl-C."""
    try:
        return next(batches)
    except Exception:
        if stop.stop:
            return None
        raise


# ---------------------------------------------------------------- the summary


def finish_summary(summary: dict, status: str, step: int, start_step: int, t_start: float, last_ckpt, accelerator) -> dict:
    elapsed = time.time() - t_start
    summary.update(
        status=status,
        steps=step,
        checkpoint=str(last_ckpt) if last_ckpt else None,
        seconds=elapsed,
        steps_per_s=(step - start_step) / elapsed if elapsed > 0 else None,
        world_size=accelerator.num_processes,
        main_process=accelerator.is_main_process,
    )
    return summary
