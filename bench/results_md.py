"""Turn the benchmarks' --json files into Markdown tables (for bench/RESULTS.md).

    python bench/results_md.py cli.json gen.json decode.json ... > figures.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt_time(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def machine_line(m: dict) -> str:
    keys = ("date", "commit", "cpu", "cores", "ram_gb", "torch", "diffusers", "threads", "loadavg", "gpu")
    return ", ".join(f"{k} {m[k]}" for k in keys if k in m and m[k] is not None)


def cell(text) -> str:
    return str(text).replace("|", "\\|")


def section(data: dict) -> str:
    out = [f"### bench/{data['bench']}", "", f"Run: {machine_line(data['machine'])}.", ""]
    extra = {k: v for k, v in data["machine"].items()
             if k in ("size", "steps", "cfg", "sizes", "batch", "device", "unet", "tiny", "batches")}
    if extra:
        out += ["Settings: " + ", ".join(f"{k} {v}" for k, v in extra.items()) + ".", ""]
    if data["ratios"]:
        out += ["| ratio | wall: median (range, pairs) | wall: fastest runs | CPU time | numerator | denominator | target |",
                "|---|---|---|---|---|---|---|"]
        for r in data["ratios"]:
            target = ""
            if r["target"] is not None:
                target = f"<= {r['target']:.2f}x: wall {'met' if r['met'] else '**missed**'}"
                if r.get("cpu_met") is not None:
                    target += f", CPU {'met' if r['cpu_met'] else '**missed**'}"
            cpu = f"{r['cpu_ratio']:.3f}x" if "cpu_ratio" in r else "-"
            out.append(
                f"| {cell(r['label'])} | {r['ratio']:.3f}x ({r['spread'][0]:.3f}-{r['spread'][1]:.3f}, {r['pairs']}) "
                f"| {r.get('ratio_of_minimums', float('nan')):.3f}x | {cpu} | {r['num']} {fmt_time(r['num_median_s'])} "
                f"| {r['den']} {fmt_time(r['den_median_s'])} | {target} |")
        out.append("")
    if data["values"]:
        out += ["| value | measured | target |", "|---|---|---|"]
        for v in data["values"]:
            val = v["value"]
            shown = f"{val:.4g}" if isinstance(val, float) else str(val)
            target = "" if v["target"] is None else f"{v['target']}: {'met' if v['met'] else '**missed**'}"
            out.append(f"| {cell(v['label'])} | {shown} {v['unit']} | {target} |")
        out.append("")
    for n in data["notes"]:
        out.append(f"- {n}")
    if data["notes"]:
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    for p in paths:
        print(section(json.loads(Path(p).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
