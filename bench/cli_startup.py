"""bench/cli_startup: how fast `layerctl --help` and `--version` answer, against a bare `python -c pass`.

    python bench/cli_startup.py            # 20 interleaved rounds
    python bench/cli_startup.py --quick    # 3 rounds (smoke test)

Each command runs as a fresh subprocess (what a shell loop pays), timed from
spawn to exit with time.perf_counter. Target: `layerctl --help` under 0.3 s.
Also checks that importing the CLI does not import torch, and with
--importtime lists the slowest imports of `layerctl --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, fmt_s, interleave, machine_info, median, print_header  # noqa: E402

HELP_TARGET_S = 0.3


def layerctl_command() -> list[str]:
    """The installed console script next to this Python, else `python -m layerctl`."""
    exe = shutil.which("layerctl", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "layerctl"]


def _runner(argv: list[str]):
    env = dict(os.environ)

    def run() -> None:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-300:]}")

    return run


def heavy_modules_after_cli_import() -> list[str]:
    code = ("import sys, layerctl.cli; "
            "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'PIL', 'numpy', 'pydantic') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def slowest_imports(argv: list[str], top: int = 8) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the slowest imports of a command (python -X importtime)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "layerctl", *argv[1:]] if argv[0] != sys.executable else \
        [sys.executable, "-X", "importtime", *argv[1:]]
    err = subprocess.run(cmd, capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+\s+\|\s+(\d+)\s+\| (\s*)(\S+)\s*$", line)
        if m and not m.group(2):  # top-level imports only
            rows.append((int(m.group(1)), m.group(3)))
    return sorted(rows, reverse=True)[:top]


def in_process_split() -> dict:
    """Seconds to import layerctl.cli and to build + print the help, measured in a fresh process."""
    code = (
        "import time, io, contextlib, json\n"
        "t0 = time.perf_counter()\n"
        "import layerctl.cli as c\n"
        "t1 = time.perf_counter()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        c.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'import_cli': t1 - t0, 'build_and_print_help': t2 - t1}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="interleaved rounds (default 20)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, for the smoke test")
    ap.add_argument("--importtime", action="store_true", help="also list the slowest imports of --help")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    reps = 3 if args.quick else args.reps

    info = machine_info(torch_facts=False)
    print_header("cli_startup", info)
    rep = Report("cli_startup", info)
    lc = layerctl_command()
    cases = [
        ("python -c pass", _runner([sys.executable, "-c", "pass"])),
        ("layerctl --help", _runner(lc + ["--help"])),
        ("layerctl --version", _runner(lc + ["--version"])),
    ]
    times = interleave(cases, reps=reps, warmup=1, cpu_clock="children")
    rep.ratio("layerctl --help / python -c pass", times, "layerctl --help", "python -c pass")
    rep.ratio("layerctl --version / python -c pass", times, "layerctl --version", "python -c pass")
    help_s = median(times["layerctl --help"])
    rep.value("layerctl --help median", round(help_s, 4), "s", target=f"< {HELP_TARGET_S} s", met=help_s < HELP_TARGET_S)
    rep.value("layerctl --version median", round(median(times["layerctl --version"]), 4), "s")
    rep.value("python -c pass median", round(median(times["python -c pass"]), 4), "s")
    extra = help_s - median(times["python -c pass"])
    rep.value("layerctl --help cost above python start-up", round(extra, 4), "s")
    heavy = heavy_modules_after_cli_import()
    rep.value("heavy modules imported by layerctl.cli", ",".join(heavy) or "none",
              target="no torch", met="torch" not in heavy)
    if args.importtime:
        for k, v in in_process_split().items():
            rep.note(f"in process: {k} {fmt_s(v)}")
        for us, mod in slowest_imports(lc + ["--help"]):
            rep.note(f"import {mod}: {fmt_s(us / 1e6)} cumulative")
    rep.dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
