"""bench/gen_overhead: `layerctl gen` on the tiny backends against the same components in plain diffusers.

    python bench/gen_overhead.py                 # 128 px, 20 steps, 7 interleaved rounds
    python bench/gen_overhead.py --quick         # 64 px, 2 steps, 1 round (smoke test)
    python bench/gen_overhead.py --profile       # also: where layerctl's own time goes

In-process, time.perf_counter, CPU (or --device cuda). For each family, the
cases below run interleaved (one round = every case once), same prompt,
negative, seed, steps, size and CFG:

  layerctl        Session.gen(GenRequest(model="tiny"/"tiny-xl", ...)) with the
                  transparent decode (VAE decode + D_a) stubbed out: prompt
                  encoding, layer weights, the denoising loop, PNG + metadata
  plain-bare      diffusers StableDiffusion(XL)Pipeline built from the same tiny
                  components (same configs and seeds, same DPM++ 2M Karras
                  config), output_type="latent": the base model alone
  plain-same      the diffusers pipeline object that layerctl holds, called
                  directly, i.e. with layerctl's layer weights applied (SD1.5:
                  attention-sharing processors; SDXL: LoRA merged into the
                  weights): the same arithmetic as layerctl, diffusers' loop
  layerctl+decode the full gen: + VAE decode + 8-way TTA transparent decode
  plain+decode    plain-bare with its VAE decode to PIL, saved as PNG

  (flux: tiny-flux against FluxPipeline: no negative prompt, cfg is the distilled guidance)

Target (issue 8): layerctl <= 1.05x plain diffusers without the decode.
`layerctl / plain-same` isolates layerctl's own orchestration;
`layerctl / plain-bare` adds what the layer weights cost to run (the method).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, add_loop_args, apply_loop_args, fmt_s, interleave, machine_info, median, print_header  # noqa: E402

TARGET = 1.05
PROMPT = "glass cup, high quality"
NEGATIVE = "bad, ugly"
SEED = 1234
FAMILIES = {"sd15": "tiny", "sdxl": "tiny-xl", "flux": "tiny-flux"}


class DecodeSwitch:
    """Wraps layerctl.pipelines.sampling.decode_transparent: records the latents and the decode time;
    with `stub` set it returns zeros instead of decoding (decode excluded)."""

    def __init__(self):
        import layerctl.pipelines.sampling as lp

        self.lp = lp
        self.real = lp.decode_transparent
        self.stub = False
        self.latents = None
        self.decode_s: list[float] = []

    def __enter__(self):
        self.lp.decode_transparent = self
        return self

    def __exit__(self, *exc):
        self.lp.decode_transparent = self.real

    def __call__(self, model, decoder, latents, tta=True, chunk=None):
        import torch

        self.latents = latents.detach().float().cpu().clone()
        if self.stub:
            b, _, h, w = latents.shape
            return torch.zeros(b, 4, h * 8, w * 8)
        t0 = time.perf_counter()
        out = self.real(model, decoder, latents, tta=tta, chunk=chunk)
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        self.decode_s.append(time.perf_counter() - t0)
        return out


def _active_names(session, model) -> list[str]:
    kit = session.models.kit_of(model)
    return kit.active.names if kit is not None and kit.active is not None else ["?"]


def plain_call(pipe, size: int, steps: int, cfg: float, output_type: str, png: Path | None = None, flux=None):
    """One diffusers call. `flux`: the FluxModel whose pipeline this is (no negative prompt, cfg is the
    distilled guidance, its T5 length; latents come back packed and are unpacked here)."""
    import torch

    g = torch.Generator("cpu").manual_seed(SEED)
    text = dict(max_sequence_length=flux.max_sequence_length) if flux is not None else dict(negative_prompt=[NEGATIVE])
    out = pipe(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=cfg,
               height=size, width=size, generator=g, output_type=output_type, **text)
    if png is not None:
        out.images[0].save(png)
    if flux is not None and output_type == "latent":
        return flux.unpack_latents(out.images, size, size)
    return out.images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="width = height in px, multiple of 64 (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--families", default="sd15,sdxl,flux", help="comma-separated: sd15 (tiny), sdxl (tiny-xl), flux (tiny-flux)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-included cases")
    ap.add_argument("--profile", action="store_true", help="cProfile layerctl vs plain-same and list the differences")
    add_loop_args(ap)
    args = ap.parse_args(argv)
    apply_loop_args(args)

    import torch

    from layerctl.api import Session
    from layerctl.backends.registry import load_model
    from layerctl.requests import GenRequest

    info = machine_info()
    info.update(size=args.size, steps=args.steps, cfg=args.cfg, device=args.device)
    print_header("gen_overhead", info)
    rep = Report("gen_overhead", info)
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else None
    tmp = Path(tempfile.mkdtemp(prefix="layerctl-bench-"))
    session = Session(quiet=True)
    families = [f.strip() for f in args.families.split(",") if f.strip()]

    with DecodeSwitch() as switch:
        for fam in families:
            ref = FAMILIES[fam]

            def req(tta=True, _ref=ref, _fam=fam):
                text = {} if _fam == "flux" else {"negative": NEGATIVE}  # FLUX.1 takes no negative prompt
                return GenRequest(prompt=PROMPT, model=_ref, out=str(tmp / f"layerctl-{_fam}.png"),
                                  seed=SEED, width=args.size, height=args.size, steps=args.steps, cfg=args.cfg,
                                  overwrite=True, device=args.device, tta=tta, **text)

            def layerctl_nodec(_req=req):
                switch.stub = True
                try:
                    session.gen(_req())
                finally:
                    switch.stub = False

            def layerctl_full(_req=req):
                session.gen(_req())

            layerctl_nodec()  # loads the model, applies the layer weights
            model = session.model(req())
            plain = load_model(ref, args.device, "auto", "sdpa")  # fresh, identical components
            same_pipe, bare_pipe = model.pipe, plain.pipe
            fx = model if fam == "flux" else None  # FLUX.1: cfg is the distilled guidance, latents packed
            for p in (same_pipe, bare_pipe):
                p.set_progress_bar_config(disable=True)

            # sanity: plain-same must reproduce layerctl's latents (same arithmetic)
            layerctl_nodec()
            lat_l = switch.latents
            lat_p = plain_call(same_pipe, args.size, args.steps, args.cfg, "latent", flux=fx).float().cpu()
            diff = float((lat_l - lat_p).abs().max())
            rep.value(f"{fam}: max |latent(layerctl) - latent(plain-same)|", diff, "",
                      target="< 1e-3 (same arithmetic)", met=diff < 1e-3)

            cases = [
                ("layerctl", layerctl_nodec),
                ("plain-bare", lambda: plain_call(bare_pipe, args.size, args.steps, args.cfg, "latent", flux=fx)),
                ("plain-same", lambda: plain_call(same_pipe, args.size, args.steps, args.cfg, "latent", flux=fx)),
            ]
            if not args.no_decode:
                cases += [
                    ("layerctl+decode", layerctl_full),
                    ("plain+decode", lambda: plain_call(bare_pipe, args.size, args.steps, args.cfg, "pil",
                                                        tmp / f"plain-{fam}.png", flux=fx)),
                ]
            print(f"# {fam} ({ref}): {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, "
                  f"layer weights {', '.join(_active_names(session, model))}",
                  flush=True)
            switch.decode_s.clear()
            times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
            rep.ratio(f"{fam}: layerctl / plain-bare, decode excluded", times, "layerctl", "plain-bare", TARGET)
            rep.ratio(f"{fam}: layerctl / plain-same (orchestration only), decode excluded", times, "layerctl",
                      "plain-same", TARGET)
            rep.ratio(f"{fam}: plain-same / plain-bare (cost of running the layer weights)", times, "plain-same",
                      "plain-bare")
            rep.difference(f"{fam}: layerctl - plain-same per gen (layerctl's fixed cost)", times, "layerctl",
                           "plain-same")
            if not args.no_decode:
                rep.ratio(f"{fam}: layerctl+decode / plain+decode", times, "layerctl+decode", "plain+decode")
                dec = median(switch.decode_s[-args.reps:])
                rep.value(f"{fam}: transparent decode (VAE + 8-way TTA D_a) share of layerctl+decode",
                          round(dec / median(times["layerctl+decode"]), 4), "")
            if args.profile:
                profile_pair(layerctl_nodec, cases[2][1], rep, fam)
            del plain, bare_pipe
    session.close()
    rep.dump(args.json)
    return 0


def profile_pair(fn_l, fn_p, rep: Report, fam: str, runs: int = 3) -> None:
    """Where layerctl's time differs from plain diffusers: per-function totals, largest differences."""
    import cProfile
    import pstats

    package = Path(__file__).resolve().parents[1]
    ours: set = set()

    def is_ours(file: str) -> bool:
        """layerctl's own code: the package and its backends (installed as layerctl.backends)."""
        path = Path(file).resolve()
        return any(part in ("layerctl", "backends") for part in path.parts) and (
            package in path.parents or "site-packages" in path.parts and "layerctl" in path.parts)

    def totals(fn):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(runs):
            fn()
        pr.disable()
        st = pstats.Stats(pr)
        out = {}
        for (file, line, func), (_cc, _nc, tt, ct, _callers) in st.stats.items():
            short = f"{Path(file).parent.name}/{Path(file).name}:{func}"
            if is_ours(file):
                ours.add(short)
            out[short] = (out.get(short, (0.0, 0.0))[0] + tt, max(out.get(short, (0.0, 0.0))[1], ct))
        total = max(ct for _tt, ct in out.values())
        return out, total

    tl, total_l = totals(fn_l)
    tp, total_p = totals(fn_p)
    rep.note(f"{fam} profile ({runs} runs each): layerctl {fmt_s(total_l / runs)}/run, plain-same {fmt_s(total_p / runs)}/run")
    own = sorted(((v[1], k) for k, v in tl.items() if k in ours), reverse=True)[:12]
    for ct, k in own:
        rep.note(f"  layerctl cumulative {fmt_s(ct / runs)}/run  {k}")
    keys = set(tl) | set(tp)
    delta = sorted(((tl.get(k, (0, 0))[0] - tp.get(k, (0, 0))[0], k) for k in keys), reverse=True)[:10]
    for d, k in delta:
        if d > 0:
            rep.note(f"  self time layerctl - plain {fmt_s(d / runs)}/run  {k}")


if __name__ == "__main__":
    sys.exit(main())
