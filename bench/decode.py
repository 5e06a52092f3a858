"""bench/decode: the transparent decoder D_a with 8-way TTA as one batch vs 8 sequential passes vs one pass.

    python bench/decode.py                       # CPU fp32 at 512 and 1024 (+ CUDA fp16 when present)
    python bench/decode.py --quick               # 64 px, narrow decoder, 1 round (smoke test)
    python bench/decode.py --sizes 512 --variants single,seq8,batch8,chunk2,chunk4,seq8-cl,seq8-bf16

Official layout (7 levels, 32..512 channels, attention on the 3 coarsest
levels), random weights. Calls layerctl.models.transparent_vae.decode_tta exactly as
`layerctl gen` does. Times are in-process (time.perf_counter, CUDA
synchronised), cases interleaved per size. Peak memory: on CPU the peak
resident set above the resident set before the decode, in a fresh child
process per case (VmHWM, reset through /proc/self/clear_refs); on CUDA
torch.cuda.max_memory_allocated above the memory allocated before.

Variants: single (no TTA), seq8 (chunk 1: 8 passes of batch 1), batch8 (chunk 8:
one pass of batch 8), chunkN, and -cl (channels_last module and inputs),
-bf16 / -fp16 (decoder in that dtype), -compile (torch.compile, opt-in).
The ratios decide layerctl's default TTA chunk (default_tta_chunk: 1 on CPU,
8 on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Report, cpu_peak_extra_mb, fmt_s, interleave, machine_info, median, print_header, run_child, set_threads,
)

CPU_VARIANTS = "single,seq8,batch8"
CUDA_VARIANTS = "single,seq8,batch8,chunk4,batch8-cl"


def parse_variant(name: str, device: str) -> dict:
    """'batch8-cl-bf16' -> {tta, chunk, channels_last, dtype, compile}."""
    import torch

    parts = name.split("-")
    base = parts[0]
    v = {"name": name, "tta": True, "chunk": 1, "channels_last": False, "compile": False,
         "dtype": torch.float16 if device == "cuda" else torch.float32}
    if base == "single":
        v["tta"] = False
    elif base == "seq8":
        v["chunk"] = 1
    elif base == "batch8":
        v["chunk"] = 8
    elif base.startswith("chunk") and base[5:].isdigit():
        v["chunk"] = int(base[5:])
    else:
        raise SystemExit(f"unknown variant {name!r} (single, seq8, batch8, chunkN with -cl/-bf16/-fp16/-fp32/-compile)")
    for p in parts[1:]:
        if p == "cl":
            v["channels_last"] = True
        elif p in ("bf16", "fp16", "fp32"):
            v["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[p]
        elif p == "compile":
            v["compile"] = True
        else:
            raise SystemExit(f"unknown variant suffix {p!r} in {name!r}")
    return v


NARROW = (8, 8, 16, 16, 32, 32, 32)  # --quick: same structure, narrow widths (seconds, not minutes)


def build_decoder(device: str, dtype, channels_last: bool = False, compile_: bool = False, narrow: bool = False):
    import torch

    from layerctl.models.transparent_vae import new_decoder

    kw = {"block_out_channels": NARROW} if narrow else {}
    dec = new_decoder(seed=0, **kw).eval().requires_grad_(False).to(device=device, dtype=dtype)
    # the latent 1x1 conv starts at zero; give it weights so the latent path costs what it does in use
    with torch.no_grad():
        g = torch.Generator("cpu").manual_seed(1)
        w = dec.latent_conv_in.weight
        w.copy_((torch.randn(w.shape, generator=g) * 0.05).to(w))
    if channels_last:
        dec = dec.to(memory_format=torch.channels_last)
    if compile_:
        dec = torch.compile(dec)
    return dec


def make_inputs(size: int, device: str, channels_last: bool = False, batch: int = 1):
    import torch

    g = torch.Generator("cpu").manual_seed(size)
    pixels = torch.rand(batch, 3, size, size, generator=g).to(device)
    latent = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        latent = latent.contiguous(memory_format=torch.channels_last)
    return pixels, latent


def runner(dec, v: dict, pixels, latent):
    from layerctl.models.transparent_vae import decode_tta

    def run():
        return decode_tta(dec, pixels, latent, tta=v["tta"], chunk=v["chunk"])

    return run


def child_main(args: list[str]) -> int:
    """--child SIZE VARIANTS DEVICE THREADS NARROW BATCH: one decode per variant in a fresh process, in the
    order given, after a small warm-up decode; prints {variant: peak MiB} as JSON. Freed memory goes
    back to the system between variants (mmap threshold 64 KiB set by the parent, malloc_trim), so
    each peak stands alone."""
    import ctypes
    import gc

    size, names, device, threads, narrow = int(args[0]), args[1].split(","), args[2], int(args[3]), args[4] == "1"
    batch = int(args[5]) if len(args) > 5 else 1
    set_threads(threads or None)
    import torch

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except OSError:
        trim = None
    peaks = {}
    # warm-up: one small decode per distinct module, so one-time costs (kernel set-up) stay out of the peaks
    for name in names:
        v = parse_variant(name, device)
        dec = build_decoder(device, v["dtype"], v["channels_last"], False, narrow)
        with torch.no_grad():
            runner(dec, {**v, "tta": False}, *make_inputs(64, device, v["channels_last"]))()
        del dec
    for name in names:
        v = parse_variant(name, device)
        dec = build_decoder(device, v["dtype"], v["channels_last"], False, narrow)
        pixels, latent = make_inputs(size, device, v["channels_last"], batch)
        run = runner(dec, v, pixels, latent)
        gc.collect()
        if trim is not None:
            trim(0)
        with torch.no_grad():
            peaks[name] = cpu_peak_extra_mb(run)
        del dec, pixels, latent, run
    print(json.dumps({"size": size, "peak_mb": peaks}))
    return 0


ACT_FACTOR = 11.0  # peak / (one level-0 activation): measured 715 MiB for batch8 at 256 px, fp32 CPU


def estimated_peak_mb(v: dict, size: int, batch: int) -> float:
    """Rough peak working memory of a variant: ~11 level-0 activations (32 channels, full size)."""
    import torch

    rows = batch * (v["chunk"] if v["tta"] else 1)
    nbytes = torch.finfo(v["dtype"]).bits // 8
    return ACT_FACTOR * rows * size * size * 32 * nbytes / 2**20


def mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cuda_peak_mb(run) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_device(device: str, sizes: list[int], variants: list[str], reps: int, reps_large: int, memory: bool,
                 threads: int, rep: Report, narrow: bool = False, batch: int = 1) -> None:
    import torch

    tag = f"{device} {'fp16' if device == 'cuda' else 'fp32'}" + (f" batch {batch}" if batch > 1 else "")
    vs_all = [parse_variant(n, device) for n in variants]
    decoders = {}
    for v in vs_all:
        key = (v["dtype"], v["channels_last"], v["compile"])
        if key not in decoders:
            decoders[key] = build_decoder(device, v["dtype"], v["channels_last"], v["compile"], narrow)
    nparams = sum(p.numel() for p in next(iter(decoders.values())).parameters())
    layout = f"narrow {NARROW} (--quick)" if narrow else "official layout"
    rep.value(f"decoder parameters ({layout})", nparams, "")
    sync = torch.cuda.synchronize if device == "cuda" else None
    for size in sizes:
        n = reps if size <= 512 else reps_large
        avail = mem_available_mb() if device == "cpu" else None
        keep = []
        for v in vs_all:
            est = estimated_peak_mb(v, size, batch)
            if avail is not None and est > 0.6 * avail:
                rep.skip(f"{tag} {size}px {v['name']}: needs about {est / 1024:.1f} GiB, "
                         f"{avail / 1024:.1f} GiB available (a shared machine; not risking the OOM killer)")
            else:
                keep.append(v)
        vs = keep
        variants = [v["name"] for v in vs]
        inputs = {cl: make_inputs(size, device, cl, batch) for cl in {v["channels_last"] for v in vs}}
        cases = []
        for v in vs:
            dec = decoders[(v["dtype"], v["channels_last"], v["compile"])]
            cases.append((v["name"], runner(dec, v, *inputs[v["channels_last"]])))
        if any(v["compile"] for v in vs):
            for (name, fn), v in zip(cases, vs):
                if v["compile"]:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        fn()
                    rep.value(f"{tag} {size}px {name}: first call incl. compilation", round(time.perf_counter() - t0, 2), "s")
        outs = {}
        with torch.no_grad():
            for (name, fn) in cases:  # the warm-up round, kept for the output comparison
                outs[name] = fn().float().cpu()
                if sync:
                    sync()
            print(f"# {tag} {size}x{size}: {n} interleaved round(s) of {', '.join(variants)}", flush=True)
            times = interleave(cases, reps=n, warmup=0, sync=sync)
        names = [v["name"] for v in vs]
        for name in names:
            rep.value(f"{tag} {size}px {name} time", round(median(times[name]), 4), "s")
        if "seq8" in names and "batch8" in names:
            r = rep.ratio(f"{tag} {size}px batch8 / seq8 (one batch of 8 vs 8 single passes)", times, "batch8", "seq8")
            faster = "batch8 (one batch)" if r["ratio"] < 1 else "seq8 (8 single passes)"
            rep.note(f"{tag} {size}px: faster TTA schedule is {faster}")
        base_tta = "seq8" if "seq8" in names else ("batch8" if "batch8" in names else None)
        if "single" in names:
            for name in ("seq8", "batch8"):
                if name in names:
                    rep.ratio(f"{tag} {size}px {name} / single (cost of 8-way TTA)", times, name, "single")
        for name in names:
            if "-" in name:
                plain = name.split("-")[0]
                if plain in names:
                    rep.ratio(f"{tag} {size}px {name} / {plain}", times, name, plain)
                    diff = float((outs[name] - outs[plain]).abs().max())
                    rep.value(f"{tag} {size}px max |{name} - {plain}| output", diff, "")
        for name in names:
            if name.startswith("chunk") and base_tta and name != base_tta:
                rep.ratio(f"{tag} {size}px {name} / {base_tta}", times, name, base_tta)
        if "seq8" in names and "batch8" in names:
            rep.value(f"{tag} {size}px max |batch8 - seq8| output", float((outs["batch8"] - outs["seq8"]).abs().max()), "")
        if memory:
            plain = [v for v in vs if not v["compile"]]
            if device == "cuda":
                peaks = {}
                for v in plain:
                    dec = decoders[(v["dtype"], v["channels_last"], False)]
                    with torch.no_grad():
                        peaks[v["name"]] = cuda_peak_mb(runner(dec, v, *inputs[v["channels_last"]]))
            else:
                res = run_child(Path(__file__), [str(size), ",".join(v["name"] for v in plain), device,
                                                 str(threads or 0), "1" if narrow else "0", str(batch)],
                                env={"MALLOC_MMAP_THRESHOLD_": "65536"})
                peaks = {} if res is None else res["peak_mb"]
            for v in plain:
                mb = peaks.get(v["name"])
                if mb is None:
                    rep.note(f"{tag} {size}px {v['name']}: peak memory not measured (child failed or no /proc)")
                else:
                    rep.value(f"{tag} {size}px {v['name']} peak memory above inputs", round(mb, 1), "MiB")
        del inputs, outs
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1024", help="comma-separated square sizes (multiples of 64)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated (CPU default {CPU_VARIANTS}; CUDA default {CUDA_VARIANTS})")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds up to 512 px (default 3)")
    ap.add_argument("--reps-large", type=int, default=1, help="interleaved rounds above 512 px (default 1)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CPU, then CUDA when present")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--batch", type=int, default=1, help="images decoded together (default 1; SDXL batch 4 -> 4)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--quick", action="store_true",
                    help="64 px, a narrow decoder of the same structure, 1 round (smoke test)")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.quick:
        sizes, args.reps, args.reps_large = [64], 1, 1
        args.threads = args.threads or 1
    if any(s % 64 for s in sizes):
        raise SystemExit("sizes must be multiples of 64 (the official decoder's 7 levels)")
    set_threads(args.threads)
    import torch

    info = machine_info()
    info.update(sizes=sizes, batch=args.batch)
    print_header("decode", info)
    rep = Report("decode", info)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append("cpu")
    if args.device in ("auto", "cuda"):
        if torch.cuda.is_available():
            devices.append("cuda")
        else:
            rep.skip("CUDA part: no CUDA device here (run on a GPU machine for the fp16 figures)")
    for device in devices:
        variants = (args.variants or (CUDA_VARIANTS if device == "cuda" else CPU_VARIANTS)).split(",")
        bench_device(device, sizes, [v.strip() for v in variants if v.strip()], args.reps, args.reps_large,
                     not args.no_memory, args.threads or 0, rep, narrow=args.quick, batch=args.batch)
    from layerctl.models.transparent_vae import default_tta_chunk

    rep.note(f"layerctl default_tta_chunk: cpu={default_tta_chunk('cpu')}, cuda={default_tta_chunk('cuda')}")
    for r in rep.ratios:
        if "batch8 / seq8" in r["label"]:
            device = r["label"].split()[0]
            want = 8 if r["ratio"] < 1 else 1
            have = default_tta_chunk(device)
            verdict = "agrees" if want == have else "DISAGREES"
            rep.note(f"{r['label'].split(' batch8')[0]}: measured best chunk {want}, default {have}: {verdict}")
    rep.dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
