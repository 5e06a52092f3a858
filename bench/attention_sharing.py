"""bench/attention_sharing: what the SD1.5 attention-sharing units cost per UNet call, and a faster 1-frame unit.

    python bench/attention_sharing.py                  # SD1.5-config UNet, 256 px, CPU (CUDA fp16 when present)
    python bench/attention_sharing.py --size 512       # the native size (slow on a CPU)
    python bench/attention_sharing.py --quick          # tiny UNet, 64 px, 1 round (smoke test)

Random weights (speed does not depend on the values), rank-256 units as in the
official files. One UNet forward per call (a CFG batch of 2 per image), cases
interleaved; processors are switched untimed before each call:

  bare        the UNet with SDPA, batch 2 (what plain diffusers runs)
  shared-1f   layerctl's AttentionSharingPatcher, 1 frame (layer_sd15_transparent_attn,
              `gen` on SD1.5), batch 2
  fast-1f     a prototype (this file) of the same 1-frame maths: with one frame the
              temporal attention attends to a single key, so its output is its value;
              temporal_o(temporal_v(temporal_i(LN(x)))) is one linear map, formed once
              (W_o W_v W_i); no temporal q/k and no length-1 SDPA
  bare-3      the bare UNet, batch 6 (three images' worth of rows)
  shared-3f   the 3-frame patcher (layer_sd15_joint), batch 6 = [fg, bg, blended] x CFG

Ratios: shared-1f / bare is what the transparent SD1.5 model costs over the
base model; fast-1f / shared-1f is what the prototype would save, with the
largest output difference to show it is the same function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, interleave, machine_info, median, print_header, set_threads  # noqa: E402


class FastOneFrameProcessor:
    """Prototype: the 1-frame AttentionSharingUnit forward with its temporal branch folded into one linear.

    unit(h, ctx) = o + T(LN(h + o)) where o is the attention with the merged LoRA weights and, for a
    single frame, T = temporal_o . temporal_v . temporal_i (softmax over one key is 1).
    """

    def __init__(self, unit):
        import torch

        if unit.frames != 1 or unit.use_control:
            raise ValueError("the folded temporal branch holds for 1 frame without control only")
        self.unit = unit
        ti, tv, to = unit.temporal_i, unit.temporal_v, unit.temporal_o
        with torch.no_grad():
            wi, wv, wo = ti.weight.double(), tv.weight.double(), to.weight.double()
            w = wo @ wv @ wi
            b = wo @ (wv @ ti.bias.double() + tv.bias.double()) + to.bias.double()
        self.weight = w.to(ti.weight.dtype)
        self.bias = b.to(ti.weight.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        import torch.nn.functional as F

        from layerctl.models.attention_sharing import _heads_attention

        u = self.unit
        h = hidden_states
        ctx = h if encoder_hidden_states is None else encoder_hidden_states
        q = F.linear(h, u.merged_weight("to_q", 0), attn.to_q.bias)
        k = F.linear(ctx, u.merged_weight("to_k", 0), attn.to_k.bias)
        v = F.linear(ctx, u.merged_weight("to_v", 0), attn.to_v.bias)
        o = _heads_attention(q, k, v, u.heads)
        o = F.linear(o, u.merged_weight("to_out", 0), attn.to_out[0].bias)
        if len(attn.to_out) > 1:
            o = attn.to_out[1](o)
        ln = u.temporal_n
        t = F.layer_norm(h + o, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return o + F.linear(t, self.weight, self.bias)


def fill_random(module, seed: int, std: float = 0.02) -> None:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1 and "temporal_n.weight" in name:
                p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)).to(p))
            else:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image size in px (latent = size/8; default 256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-3f", action="store_true", help="skip the 3-frame cases")
    ap.add_argument("--quick", action="store_true", help="tiny UNet, 64 px, 1 round (smoke test)")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.reps = 64, 1
        args.threads = args.threads or 1
    set_threads(args.threads)
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from layerctl.models.attention_sharing import AttentionSharingPatcher

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("no CUDA device here")
    dtype = torch.float16 if device == "cuda" else torch.float32
    info = machine_info()
    info.update(size=args.size, device=device, unet="tiny" if args.quick else "SD1.5 config")
    print_header("attention_sharing", info)
    rep = Report("attention_sharing", info)

    torch.manual_seed(0)
    if args.quick:
        from layerctl.backends.tiny import tiny_unet_config

        cfg, ctx_dim, rank = tiny_unet_config(False), 32, 4
    else:
        from gpu_sdxl import SD15_UNET

        cfg, ctx_dim, rank = SD15_UNET, 768, 256
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype).eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    bare_procs = dict(unet.attn_processors)

    p1 = AttentionSharingPatcher(unet, 1, False, rank=rank)
    fill_random(p1, 1)
    p1 = p1.to(device, dtype)
    p1.install()
    shared1 = dict(unet.attn_processors)
    p1.remove()
    name_of = {id(m): n for n, m in unet.named_modules()}
    fast1 = dict(bare_procs)
    for unit in p1.units:
        fast1[f"{name_of[id(unit.attn)]}.processor"] = FastOneFrameProcessor(unit)
    p1.install()  # keeps the merged weights cached, as in a gen

    lat = args.size // 8
    g = torch.Generator("cpu").manual_seed(0)
    x2 = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    c2 = torch.randn(2, 77, ctx_dim, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)

    def use(procs):  # diffusers pops from the dict it is given: pass a copy
        return lambda: unet.set_attn_processor(dict(procs))

    def call(x, c):
        def run():
            with torch.no_grad():
                return unet(x, t, encoder_hidden_states=c).sample

        return run

    cases = [
        ("bare", call(x2, c2), use(bare_procs)),
        ("shared-1f", call(x2, c2), use(shared1)),
        ("fast-1f", call(x2, c2), use(fast1)),
    ]
    if not args.no_3f:
        p3 = AttentionSharingPatcher(unet, 3, False, rank=rank)
        fill_random(p3, 3)
        p3 = p3.to(device, dtype)
        p1.remove()
        p3.install()
        shared3 = dict(unet.attn_processors)
        p3.remove()  # its processors stay usable (they hold their units); merged weights re-form on first use
        p3.set_cond_mark(torch.tensor([1.0] * 3 + [0.0] * 3))
        x6 = torch.randn(6, 4, lat, lat, generator=g).to(device, dtype)
        c6 = torch.randn(6, 77, ctx_dim, generator=g).to(device, dtype)
        cases += [("bare-3", call(x6, c6), use(bare_procs)), ("shared-3f", call(x6, c6), use(shared3))]

    # the prototype computes the same function
    with torch.no_grad():
        use(shared1)()
        ref = call(x2, c2)().float()
        use(fast1)()
        alt = call(x2, c2)().float()
    diff = float((ref - alt).abs().max())
    scale = float(ref.abs().max())
    rep.value("max |fast-1f - shared-1f| UNet output (relative to max |output|)", diff / max(scale, 1e-12), "",
              target="< 1e-3", met=diff / max(scale, 1e-12) < 1e-3)

    sync = torch.cuda.synchronize if device == "cuda" else None
    print(f"# UNet {info['unet']} {args.size}px (latent {lat}x{lat}), {device} {str(dtype).split('.')[-1]}", flush=True)
    times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
    for name in times:
        rep.value(f"{name} UNet call", round(median(times[name]), 4), "s")
    rep.ratio("shared-1f / bare (1-frame attention sharing over the base UNet)", times, "shared-1f", "bare")
    rep.ratio("fast-1f / bare (prototype over the base UNet)", times, "fast-1f", "bare")
    rep.ratio("fast-1f / shared-1f (prototype over layerctl's unit)", times, "fast-1f", "shared-1f")
    if not args.no_3f:
        rep.ratio("shared-3f / bare-3 (3-frame joint over the base UNet, same rows)", times, "shared-3f", "bare-3")
    rep.dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
