"""Shared helpers for the layerctl benchmarks (timing, ratios, machine facts, peak memory).

Every benchmark interleaves its cases (A B A B ...), so a slow spell of a shared
machine hits all cases alike, and reports medians and the median of the
per-pair ratios. Import as `from common import ...` (the scripts put bench/ on
sys.path); nothing here imports torch at module level.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


# ---------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gb() -> Optional[float]:
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        return round(int(m.group(1)) / 1024**2, 1) if m else None
    except OSError:
        return None


def loadavg() -> Optional[tuple[float, float, float]]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}{' (tracked files modified)' if dirty else ''}" if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(torch_facts: bool = True) -> dict:
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": mem_total_gb(),
        "loadavg": loadavg(),
    }
    if torch_facts:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        try:
            import diffusers

            info["diffusers"] = diffusers.__version__
        except ImportError:
            pass
    return info


def print_header(name: str, info: dict) -> None:
    parts = [f"{k}={v}" for k, v in info.items()]
    print(f"# bench/{name}: " + ", ".join(parts), flush=True)
    load = info.get("loadavg")
    cores = info.get("cores") or 1
    if load and load[0] > cores:
        print(f"# note: load average {load[0]} on {cores} cores: the machine is busy, timings are noisy "
              "(cases are interleaved, so ratios suffer less than absolute times)", flush=True)


def set_threads(n: Optional[int]) -> None:
    """Pin torch's intra-op threads (on a busy machine 1 thread avoids OpenMP spin-wait stalls)."""
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)
        import torch

        torch.set_num_threads(int(n))


def add_loop_args(ap) -> None:
    """The options the sampling-loop benchmarks (gen_overhead, sampler_overhead) share."""
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="64 px, 2 steps, 1 round (smoke test)")
    ap.add_argument("--json", help="write the results to this JSON file")


def apply_loop_args(args) -> None:
    """--quick shrinks the run (one thread unless --threads says otherwise); then the threads are set."""
    if args.quick:
        args.size, args.steps, args.reps = 64, 2, 1
        args.threads = args.threads or 1
    set_threads(args.threads)


# ---------------------------------------------------------------- timing


class Times(dict):
    """name -> wall seconds per run (time.perf_counter); `.cpu`: name -> CPU seconds per run
    (this process's CPU time, or its children's for subprocess cases), empty when not taken."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cpu: dict[str, list[float]] = {}


def _cpu_clock(kind: Optional[str]) -> Callable[[], float]:
    if kind == "children":
        import resource

        def children() -> float:
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            return ru.ru_utime + ru.ru_stime

        return children
    return time.process_time


def interleave(cases: Sequence[tuple], reps: int, warmup: int = 1,
               sync: Optional[Callable[[], None]] = None, log: bool = True,
               cpu_clock: Optional[str] = "process") -> Times:
    """Run every case `warmup` times untimed, then `reps` rounds of A B C ... A B C; seconds per run.

    A case is (name, fn) or (name, fn, setup): setup runs untimed before every call of fn.
    Besides wall time, CPU time is recorded (cpu_clock "process": this process, "children":
    waited-for subprocesses; None or a `sync` (GPU) turns it off): on a shared machine CPU
    time hardly depends on what else runs, wall time does.
    """
    use_cpu = cpu_clock is not None and sync is None
    clock = _cpu_clock(cpu_clock)
    sync = sync or (lambda: None)
    norm = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in cases]
    for _ in range(warmup):
        for _, fn, setup in norm:
            if setup:
                setup()
            fn()
            sync()
    times = Times({name: [] for name, _, _ in norm})
    if use_cpu:
        times.cpu = {name: [] for name, _, _ in norm}
    for r in range(reps):
        for name, fn, setup in norm:
            if setup:
                setup()
            sync()
            c0 = clock()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            if use_cpu:
                times.cpu[name].append(clock() - c0)
        if log:
            line = "  ".join(f"{name}={times[name][-1]:.3f}s" + (f"/{times.cpu[name][-1]:.3f}cpu" if use_cpu else "")
                             for name, _, _ in norm)
            print(f"#   round {r + 1}/{reps}: {line}", file=sys.stderr, flush=True)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def pair_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(times[num], times[den]) if b > 0]


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.3f} s"


class Report:
    """Collects the lines a benchmark prints (and writes them as JSON with --json)."""

    def __init__(self, name: str, info: dict):
        self.name = name
        self.info = info
        self.ratios: list[dict] = []
        self.values: list[dict] = []
        self.notes: list[str] = []

    def ratio(self, label: str, times: dict[str, list[float]], num: str, den: str,
              target: Optional[float] = None) -> dict:
        rs = pair_ratios(times, num, den)
        r = median(rs)
        r_min = min(times[num]) / min(times[den]) if min(times[den]) > 0 else float("nan")
        entry = {
            "label": label, "ratio": round(r, 4), "ratio_of_minimums": round(r_min, 4), "pairs": len(rs),
            "spread": [round(min(rs), 3), round(max(rs), 3)],
            "num": num, "num_median_s": round(median(times[num]), 5),
            "den": den, "den_median_s": round(median(times[den]), 5),
            "target": target,
            "met": None if target is None else bool(r <= target),
        }
        cpu = getattr(times, "cpu", None) or {}
        cpu_txt = ""
        if num in cpu and den in cpu and cpu[num]:
            rc = median(pair_ratios(cpu, num, den))
            entry.update(cpu_ratio=round(rc, 4), cpu_num_median_s=round(median(cpu[num]), 5),
                         cpu_den_median_s=round(median(cpu[den]), 5),
                         cpu_met=None if target is None else bool(rc <= target))
            cpu_txt = f"; CPU-time ratio {rc:.3f}x"
        self.ratios.append(entry)
        verdict = ""
        if target is not None:
            verdict = f"  target <= {target:.2f}x: {'MET' if r <= target else 'MISSED'}"
            if "cpu_met" in entry:
                verdict += f" (CPU time: {'MET' if entry['cpu_met'] else 'MISSED'})"
        print(f"ratio {label}: {r:.3f}x  (median of {len(rs)} pairs, range {min(rs):.3f}-{max(rs):.3f}, "
              f"ratio of fastest runs {r_min:.3f}{cpu_txt}; "
              f"{num} {fmt_s(median(times[num]))} vs {den} {fmt_s(median(times[den]))}){verdict}", flush=True)
        return entry

    def difference(self, label: str, times: dict[str, list[float]], a: str, b: str) -> dict:
        """Median of the per-round differences a - b, in milliseconds."""
        ds = [(x - y) * 1000 for x, y in zip(times[a], times[b])]
        cpu = getattr(times, "cpu", None) or {}
        if a in cpu and b in cpu and cpu[a]:
            dc = median([(x - y) * 1000 for x, y in zip(cpu[a], cpu[b])])
            self.value(label + " (CPU time)", round(dc, 2), "ms")
        return self.value(label, round(median(ds), 2), "ms")

    def value(self, label: str, value, unit: str = "", target: Optional[str] = None,
              met: Optional[bool] = None) -> dict:
        entry = {"label": label, "value": value, "unit": unit, "target": target, "met": met}
        self.values.append(entry)
        verdict = "" if target is None else f"  target {target}: {'MET' if met else 'MISSED'}"
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"value {label}: {shown}{(' ' + unit) if unit else ''}{verdict}", flush=True)
        return entry

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def skip(self, text: str) -> None:
        self.notes.append("SKIPPED: " + text)
        print(f"skip: {text}", flush=True)

    def dump(self, path: Optional[str]) -> None:
        if not path:
            return
        write_json(path, {"bench": self.name, "machine": self.info, "ratios": self.ratios, "values": self.values,
                          "notes": self.notes})


def write_json(path, data, indent: int = 2) -> None:
    """A benchmark's report as JSON at `path` (its folder made if need be), written whole or not at all."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    os.replace(tmp, p)


# ---------------------------------------------------------------- memory


def _status_kb(field: str) -> Optional[int]:
    try:
        m = re.search(field + r":\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_peak_extra_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak resident memory while fn runs, above the resident memory before it (MiB).

    Meant to run in a fresh child process (see run_child): memory the allocator kept
    from earlier work in the same process would hide part of the peak.
    """
    import gc

    gc.collect()
    if not reset_peak_rss():
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024.0


def run_child(script: Path, args: Sequence[str], timeout: float = 3600,
              env: Optional[dict] = None) -> Optional[dict]:
    """Run `python script --child ARGS...` and parse the last JSON line it prints (None if it failed)."""
    env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    print(f"# child {' '.join(args)} failed (rc {proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
    return None


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
