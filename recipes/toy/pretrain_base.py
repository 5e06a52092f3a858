"""Pre-train the toy base model (VAE, then text encoder + UNet) from scratch on procedural scenes.

No layerctl command trains a base model, so this is one visible loop per stage
(nanoGPT style). Every shipped base weight file comes from here:

    # 1. the VAE, as a plain autoencoder (L1 + MSE + small KL) on RGB scenes and fg-over-grey images
    python recipes/toy/pretrain_base.py vae --steps 450 --batch 16 --lr 2e-3 --seed 1
    # 2. text encoder + UNet from scratch, epsilon prediction, 10% caption dropout (CFG);
    #    rows: blended scene + its caption, background alone + "table"/"sky"/..., foreground over
    #    grey + "glass cup"/"red ball". The shipped run stopped early (see docs/toy-model.md):
    python recipes/toy/pretrain_base.py unet --steps 2500 --batch 32 --lr 1e-3 --seed 2 --stop-after N
    # (--transparent-encoder FILE: fold the text -> RGBA task into the base instead of a LoRA; unused)
    # 3. (issue 14, fourth round; tried, not shipped: see recipes/toy/train-vae-7.yaml) the VAE's decoder
    #    alone, longer, with an EMA: the encoder and so every latent stays as it is, the decoded pictures
    #    get sharper (held-out PSNR 19.65 -> 21.39 dB). Starts from the weights in --out:
    python recipes/toy/pretrain_base.py decoder --out runs/toy/cand --steps 4000 --batch 16 --lr 1e-3 --ema 0.999 --seed 11 --threads 2
    # 4. (issue 14, ninth round; tried, not shipped) the UNet's third stage: 8000 x 64 more on other pre-encoded
    #    rows, from the shipped weights copied into --out first (67 min at 2 threads). The base alone drew the
    #    same shapes after it as before (bench/toy_base_shapes.py; bench/RESULTS.md, ninth round):
    python recipes/toy/pretrain_base.py unet --out runs/toy/base3 --resume --steps 8000 --batch 64 --lr 5e-4 --seed 6 --cache 60000 --ema 0.999 --threads 2
    # 5. (issue 14, tenth round) a UNet twice as wide (channels 64/128/128, 5.8 M parameters) from scratch, with
    #    the shipped VAE and text-encoder files copied into --out first. Every save also writes the whole training
    #    state (unet_train_state.pt; the encoded rows in latent_cache-SEED.pt), so the same command with --resume
    #    goes on where a run stopped, bit for bit, also on another machine (--device cuda: the weights come back
    #    the same way). 1.05-1.16 s a step at 2 threads: 2.0 h of training plus 10 min encoding the rows:
    python recipes/toy/pretrain_base.py unet --out runs/toy/wide --unet-channels 64,128,128 --cache 100000 --ema 0.999 --steps 6500 --batch 64 --lr 1e-3 --seed 7 --threads 2 --save-minutes 10
    # 6. (tenth round; not run) the same without the mirrored rows (every cup in the toy world has its handle on the right):
    python recipes/toy/pretrain_base.py unet --out runs/toy/wide-noflip --no-flip --unet-channels 64,128,128 --cache 100000 --ema 0.999 --steps 6500 --batch 64 --lr 1e-3 --seed 7 --threads 2 --save-minutes 10
    # 7. (eleventh round; what ships since the twelfth) the stage-2 UNet fine-tuned on the VAE posterior's mean
    #    instead of draws from it (the toy VAE's posterior std is a fifth of its latents' spread: training loss
    #    0.105 -> 0.028), the stage-2 weights copied into --out first; 21 min at 2 threads plus 7 min encoding.
    #    Then 8.: the same rows unmirrored, from 7. (copy 7.'s files into that --out first).
    python recipes/toy/pretrain_base.py unet --out runs/toy/mean1 --resume --latents mean --cache 100000 --ema 0.999 --steps 3000 --batch 64 --lr 5e-4 --seed 7 --threads 2 --save-minutes 10
    python recipes/toy/pretrain_base.py unet --out runs/toy/noflip1 --resume --no-flip --latents mean --cache 100000 --ema 0.999 --steps 4000 --batch 64 --lr 5e-4 --seed 7 --threads 2 --save-minutes 10
    # 9. (twelfth round; tried, not shipped) the wide base of 5. the same way, in one stage: on means, unmirrored,
    #    from runs/toy/wide's weights copied into --out (and 8.'s latent_cache-7.pt: the same rows); 46 min at 2
    #    threads. Held-out loss 0.0270 against 0.0258 for 8.; alone it draws fewer cups than before (9 and 5 of 30):
    python recipes/toy/pretrain_base.py unet --out runs/toy/wide-mean --resume --no-flip --latents mean --cache 100000 --ema 0.999 --steps 2500 --batch 64 --lr 5e-4 --seed 7 --threads 2 --save-minutes 10
    # 10. (fourteenth round) the base VAE trained 2400 steps instead of 450 (47 min at 1 thread): held-out PSNR
    #    23.0 dB against 19.7, the layer scenes through it at MAE 0.098 against 0.150, purple stars kept 74% against
    #    0% (bench/RESULTS.md, fourteenth round). --size 128 makes the 128x128 toy world (16x16 latents), recorded
    #    in vae.safetensors (image_size): every later stage and the toy backend (`--model toy:FOLDER`, gen's
    #    default size) read it from there. recipes/toy/build_world.py runs this and every later stage in one go.
    python recipes/toy/pretrain_base.py vae --out runs/toy/v64long --steps 2400 --batch 16 --lr 2e-3 --seed 1 --threads 1
    python recipes/toy/pretrain_base.py vae --out runs/toy/w128 --size 128 --steps 2400 --batch 16 --lr 2e-3 --seed 1 --threads 2
    # the denoising loss of a folder's text encoder + UNet on held-out rows at fixed timesteps and noise
    # (compares two base models on the same numbers; the training loss draws its timesteps at random):
    python recipes/toy/pretrain_base.py unet-loss --out runs/toy/wide --batch 512

Writes fp16 safetensors into --out (default layerctl/toy_weights/) every
--save-minutes and at the end (atomically). The loop is deterministic by --seed on one thread.
Ctrl-C saves and stops. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from layerctl.backends import toy  # noqa: E402
from layerctl.training.scenes import SceneSource  # noqa: E402

STOP = False
INTERRUPTED = False  # by SIGINT / SIGTERM: the run saves, stops and exits 130 (not 0: its stage is not done)


def _sigint(*_):
    global STOP, INTERRUPTED
    STOP = INTERRUPTED = True


def save_fp16(module, path: Path, metadata: dict | None = None, state: dict | None = None) -> None:
    """The module's weights (or `state`, e.g. an EMA's shadow copy of them) as fp16, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in (state or module.state_dict()).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def scene_batch(src: SceneSource, start: int, n: int, rng: np.random.Generator, flip: bool = True, size: int = 64):
    """Scenes start..start+n as (pixels [n,3,S,S] in [-1,1], captions, roles, fg RGBA [n,S,S,4]), S = `size`.

    Each row is the blended scene (45%), the background alone (15%) or the foreground over mid grey
    (40%: the premultiplied picture, what the frozen VAE sees of an RGBA image); half are mirrored
    unless `flip` is False (the same rows and roles then, only none mirrored: the toy world draws every
    cup with its handle on the right, and a mirrored half makes "cup" two pictures whose mean has no handle).
    """
    imgs, caps, roles, fgs = [], [], [], []
    for i in range(start, start + n):
        s = src(i, size)
        u = rng.random()
        fg = s.fg
        if u < 0.45:
            img, cap, role = s.blended, s.caption, "blended"
        elif u < 0.6:
            img, cap, role = s.bg, s.bg_caption, "bg"
        else:
            a = fg[..., 3:4]
            img, cap, role = fg[..., :3] * a + 0.5 * (1 - a), s.fg_caption, "fg"
        if rng.random() < 0.5 and flip:
            img, fg = img[:, ::-1], fg[:, ::-1]
        imgs.append(np.ascontiguousarray(img))
        fgs.append(np.ascontiguousarray(fg))
        caps.append(cap)
        roles.append(role)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() * 2 - 1
    return x, caps, roles, np.stack(fgs)


def psnr_db(rec, x) -> float:
    """PSNR in dB of a decoded batch against its pixels, both in [-1, 1]."""
    return -10 * math.log10(F.mse_loss((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).item() + 1e-12)


@torch.no_grad()
def offset_fg_rows(enc, roles, fgs, mean, std, lat) -> None:
    """In place: the fg rows of `lat` become what the transparent LoRA draws, the posterior mean
    plus the latent-transparency offset (instead of the sampling noise). No-op without `enc`."""
    from layerctl.models import transparent_vae as tv

    rows = [i for i, r in enumerate(roles) if r == "fg"] if enc is not None else []
    if rows:
        rgba = torch.from_numpy(fgs[rows]).permute(0, 3, 1, 2).float()
        lat[rows] = mean[rows] + std[rows] * tv.encode_offset(enc, rgba)


def train_vae(args):
    vae, text, unet = toy.build_components(args.seed, size=args.size)
    dev = torch.device(args.device)
    vae.to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr or 1e-3, weight_decay=0.0)
    src = SceneSource(args.seed)
    rng = np.random.default_rng(args.seed)
    t0, last_save = time.time(), time.time()
    for step in range(1, args.steps + 1):
        x = scene_batch(src, (step - 1) * args.batch, args.batch, rng, size=args.size)[0].to(dev)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = (args.lr or 1e-3) * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        opt.step()
        if step % 20 == 0:
            psnr = psnr_db(rec, x)
            print(f"vae step {step}/{args.steps} loss {loss.item():.4f} psnr {psnr:.2f} kl {kl.item():.3f} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if STOP or step == args.steps or time.time() - last_save > args.save_minutes * 60:
            export_vae(vae, text, unet, args, step, time.time() - t0)
            last_save = time.time()
            if STOP:
                break


@torch.no_grad()
def heldout_psnr(vae, size: int, n: int = 96, seed: int = 424242) -> float:
    """Round-trip PSNR (dB, latent means) of n scene rows (size x size) of a seed no stage trains on."""
    was = vae.training
    vae.eval()
    x = scene_batch(SceneSource(seed), 0, n, np.random.default_rng(seed), size=size)[0]
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    vae.train(was)
    return psnr_db(rec, x)


def train_decoder(args):
    """The VAE's decoder alone, from the weights in --out: the encoder (so every latent the UNet,
    the transparency VAE and the LoRAs were trained on) stays as it is, only the pictures decoded
    from those latents get sharper. Sampled latents, L1 + MSE, EMA of the decoder saved. With
    --transparent-encoder the foreground rows get the latent-transparency offset instead of the
    sampling noise (the latents the transparent LoRA draws), still decoded to the fg over grey.
    With --latent-noise the decoder also learns from latents perturbed as a sampler leaves them
    (off the encoder's manifold), decoded to the clean picture."""
    from layerctl.models import transparent_vae as tv
    from layerctl.training.vae import EMA

    out = Path(args.out)
    vae, _, _ = toy.build_components(args.seed)
    meta = toy._load_into(vae, out / toy.FILES["vae"])
    dec = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in dec.parameters():
        p.requires_grad_(True)
    vae.encoder.eval(), vae.quant_conv.eval()
    dec.train()
    avg = EMA(dec, args.ema) if args.ema else None
    opt = torch.optim.AdamW(dec.parameters(), lr=args.lr or 5e-4, weight_decay=0.0)
    src = SceneSource(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"decoder: held-out PSNR at start {heldout_psnr(vae, args.size):.2f} dB", file=sys.stderr, flush=True)
    t0, last_save = time.time(), time.time()

    def save(step):
        live = {k: v.clone() for k, v in dec.state_dict().items()}
        if avg is not None:
            dec.load_state_dict(avg.shadow)
        psnr = heldout_psnr(vae, args.size)
        keep = {k: v for k, v in meta.items() if k in ("scaling_factor", "seed", "image_size")}
        save_fp16(vae, out / toy.FILES["vae"], {**keep, "step": meta.get("step", ""), "decoder_steps": step,
                                                "heldout_psnr": f"{psnr:.2f}"})
        dec.load_state_dict(live)
        extra = {"heldout_psnr": round(psnr, 2), "ema": args.ema, "latent_noise": args.latent_noise, "latents": args.latents,
                 "transparent_latents": bool(args.transparent_encoder)}
        _log_stage(out, "vae_decoder", step, time.time() - t0, args, extra=extra)
        print(f"saved vae decoder (step {step}, held-out PSNR {psnr:.2f} dB)", file=sys.stderr, flush=True)

    scaling = float(meta["scaling_factor"])
    enc = tv.load_encoder(args.transparent_encoder, device="cpu", dtype=torch.float32).eval() if args.transparent_encoder else None
    for step in range(1, args.steps + 1):
        x, _, roles, fgs = scene_batch(src, 30_000_000 + (step - 1) * args.batch, args.batch, rng, size=args.size)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = posterior_latents(post.mean, post.std, gen, args.latents)
            offset_fg_rows(enc, roles, fgs, post.mean, post.std, z)
            if args.latent_noise > 0:  # per row a strength in U(0, latent_noise), in the UNet's (scaled) units
                strength = torch.rand(z.shape[0], 1, 1, 1, generator=gen) * args.latent_noise
                z = z + strength / scaling * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        lr = (args.lr or 5e-4) * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        if avg is not None:
            avg.update(dec)
        if step % 20 == 0:
            psnr = psnr_db(rec, x)
            print(f"decoder step {step}/{args.steps} loss {loss.item():.4f} psnr {psnr:.2f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if STOP or step == args.steps or time.time() - last_save > args.save_minutes * 60:
            save(step)
            last_save = time.time()
            if STOP:
                break


@torch.no_grad()
def latent_std(vae, src, seed, size: int) -> float:
    x = scene_batch(src, 10_000_000, 64, np.random.default_rng(seed), size=size)[0].to(next(vae.parameters()).device)
    return float(vae.encode(x).latent_dist.mean.std())


def export_vae(vae, text, unet, args, step, seconds):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae.eval()
    scale = 1.0 / latent_std(vae, SceneSource(args.seed), args.seed, args.size)
    vae.train()
    save_fp16(vae, out / toy.FILES["vae"], {"scaling_factor": f"{scale:.5f}", "step": step, "seed": args.seed,
                                            "image_size": args.size})
    # placeholders so the backend loads for train-vae before the UNet stage has run
    for key, mod in (("text_encoder", text), ("unet", unet)):
        if not (out / toy.FILES[key]).is_file():
            save_fp16(mod, out / toy.FILES[key], {"placeholder": "untrained"})
    _log_stage(out, "vae", step, seconds, args, extra={"scaling_factor": scale, "image_size": args.size})
    print(f"saved vae (step {step}, scaling_factor {scale:.4f})", file=sys.stderr, flush=True)


def _log_stage(out: Path, stage: str, step: int, seconds: float, args, extra=None):
    p = out / "training.json"
    info = json.loads(p.read_text()) if p.is_file() else {}
    info[stage] = dict(steps=step, seconds=round(seconds), seed=args.seed, batch=args.batch, lr=args.lr, **(extra or {}))
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, p)


@torch.no_grad()
def encode_cache(vae, src: SceneSource, n: int, rng: np.random.Generator, chunk: int = 64, file: Path | None = None,
                 flip: bool = True, size: int = 64) -> dict:
    """Encode n scene rows once (latent mean/std, caption, role): the frozen VAE then costs nothing per step.
    With `file`: read from there when it holds the same rows (seed, n, VAE file), else encoded and saved there;
    `rng` ends in the same state either way."""
    key = {"n": n, "flip": flip, "size": size, "rng": dict(rng.bit_generator.state), "vae": _file_digest(file.parent / toy.FILES["vae"]) if file else ""}
    if file is not None and file.is_file():
        got = torch.load(file, weights_only=False)
        if got["key"] == key:
            print(f"cache: {n} rows read from {file}", file=sys.stderr, flush=True)
            rng.bit_generator.state = got["rng_after"]
            return got["rows"]
    means, stds, caps, roles = [], [], [], []
    t0 = time.time()
    device = next(vae.parameters()).device
    for start in range(0, n, chunk):
        x, c, r, _ = scene_batch(src, 20_000_000 + start, min(chunk, n - start), rng, flip, size)
        post = vae.encode(x.to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        caps += c
        roles += r
        if (start // chunk) % 50 == 0:
            print(f"cache {start + len(c)}/{n} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    rows = {"mean": torch.cat(means), "std": torch.cat(stds), "caps": caps, "roles": roles}
    if file is not None:
        torch.save({"key": key, "rng_after": rng.bit_generator.state, "rows": rows}, file.with_name(file.name + ".tmp"))
        os.replace(file.with_name(file.name + ".tmp"), file)
    return rows


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def noise_schedule():
    """The SD1.5 training noise schedule the toy base is trained (and measured) with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def caption_ids(tok, caps):
    """Token ids of captions, padded to the toy text encoder's length."""
    return tok(caps, padding="max_length", max_length=toy.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


def posterior_latents(mean, std, gen, kind: str = "sample"):
    """The latents a base UNet learns: a draw from the toy VAE's posterior, or its mean (a new tensor either
    way). The toy VAE's posterior is wide (std about a fifth of the latents' spread; SD's is far narrower):
    on draws most of the UNet's loss is that noise (the shipped UNet fine-tuned on means: 0.105 -> 0.028)."""
    noise = torch.randn(mean.shape, generator=gen)  # drawn either way: the generator's state does not depend on kind
    return mean.clone() if kind == "mean" else mean + std * noise


STATE = "unet_train_state.pt"  # the full training state beside the weights: what `unet --resume` continues from


def _unet_start(args, out: Path):
    """Fresh text encoder + UNet (at --unet-channels), or with --resume those in --out. Returns them
    and the training state saved beside them (None without one, or for a run of another --steps)."""
    width = toy.parse_channels(args.unet_channels, "--unet-channels") if args.unet_channels else toy.UNET_CHANNELS
    if args.resume:
        width = toy.unet_channels(out / toy.FILES["unet"])
    _, text, unet = toy.build_components(args.seed, unet_width=width, size=args.size)
    state = None
    if args.resume:
        toy._load_into(text, out / toy.FILES["text_encoder"])
        toy._load_into(unet, out / toy.FILES["unet"])
        if (out / STATE).is_file():
            state = torch.load(out / STATE, weights_only=False, map_location="cpu")
            if state["span"] != args.steps:
                print(f"{STATE} is of a {state['span']}-step run, not {args.steps}: starting a new schedule from the weights",
                      file=sys.stderr, flush=True)
                state = None
            else:  # the live (not averaged) weights, in full precision
                text.load_state_dict(state["text"])
                unet.load_state_dict(state["unet"])
    return text, unet, width, state


def train_unet(args):
    """Text encoder + UNet, epsilon prediction. Every save writes the (EMA) weights as fp16 and, beside
    them, the whole state (live weights, optimizer, EMA, random generators, step), so that `--resume`
    with the same --steps goes on where the last run stopped, across sessions."""
    global STOP
    from layerctl.models import transparent_vae as tv
    from layerctl.training.vae import EMA

    out = Path(args.out)
    dev = torch.device(args.device)
    pipe = toy.load_toy(dev, torch.float32, out, with_unet=False)
    vae, tok = pipe.vae, pipe.tokenizer
    scale = float(vae.config.scaling_factor)
    text, unet, width, state = _unet_start(args, out)
    text, unet = text.to(dev), unet.to(dev)
    enc = tv.load_encoder(args.transparent_encoder, device="cpu", dtype=torch.float32).eval() if args.transparent_encoder else None
    sched = noise_schedule()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr or 5e-4, weight_decay=0.01)
    src = SceneSource(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cache = (encode_cache(vae, src, args.cache, rng, file=out / f"latent_cache-{args.seed}.pt", flip=not args.no_flip,
                          size=args.size)
             if args.cache and enc is None else None)
    avg = {"text": EMA(text, args.ema), "unet": EMA(unet, args.ema)} if args.ema else None
    first, ema, seconds = 1, None, 0.0
    if state is not None:
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        if avg is not None and state.get("avg"):
            for k in avg:
                avg[k].shadow = {n: v.to(dev) for n, v in state["avg"][k].items()}
        first, ema, seconds = state["step"] + 1, state["loss_ema"], state["seconds"]
        print(f"resuming at step {first} of {args.steps}", file=sys.stderr, flush=True)
    t0, last_save = time.time() - seconds, time.time()

    def save(step):
        out.mkdir(parents=True, exist_ok=True)
        # with --ema the averaged weights are what ships
        save_fp16(text, out / toy.FILES["text_encoder"], {"step": step, "seed": args.seed},
                  state=avg["text"].shadow if avg else None)
        save_fp16(unet, out / toy.FILES["unet"], {"step": step, "seed": args.seed, "loss_ema": f"{ema:.4f}",
                                                  "block_out_channels": ",".join(map(str, width))},
                  state=avg["unet"].shadow if avg else None)
        full = {"span": args.steps, "step": step, "seconds": time.time() - t0, "loss_ema": ema,
                "text": text.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(),
                "avg": {k: a.shadow for k, a in avg.items()} if avg else None,
                "rng": rng.bit_generator.state, "gen": gen.get_state()}
        torch.save(full, out / (STATE + ".tmp"))
        os.replace(out / (STATE + ".tmp"), out / STATE)
        _log_stage(out, "unet", step, time.time() - t0, args,
                   extra={"loss_ema": round(ema, 4), "transparent_encoder": bool(enc), "resumed": bool(args.resume),
                          "cache": args.cache, "ema": args.ema, "block_out_channels": list(width), "flip": not args.no_flip,
                          "latents": args.latents})
        print(f"saved text encoder + unet (step {step})", file=sys.stderr, flush=True)

    unet.train(), text.train()
    for step in range(first, args.steps + 1):
        if cache is not None:  # rows drawn from the pre-encoded scenes (the VAE is frozen)
            idx = torch.randint(0, cache["mean"].shape[0], (args.batch,), generator=gen)
            mean, std = cache["mean"][idx], cache["std"][idx]
            caps, roles = [cache["caps"][i] for i in idx], [cache["roles"][i] for i in idx]
            lat = posterior_latents(mean, std, gen, args.latents)
        else:
            x, caps, roles, fgs = scene_batch(src, (step - 1) * args.batch, args.batch, rng, not args.no_flip, args.size)
            with torch.no_grad():
                post = vae.encode(x.to(dev)).latent_dist
                mean, std = post.mean.cpu(), post.std.cpu()
                lat = posterior_latents(mean, std, gen, args.latents)
        with torch.no_grad():
            if enc is not None:  # (no cache then, so this batch's fg pictures exist)
                offset_fg_rows(enc, roles, fgs, mean, std, lat)
            lat = (lat * scale).to(dev)
        drop = rng.random(len(caps))
        caps = [("" if rng.random() < 0.5 else "bad, ugly") if d < 0.1 else c for c, d in zip(caps, drop)]
        ids = caption_ids(tok, caps)
        hidden = text(ids.to(dev))[0]
        noise = torch.randn(lat.shape, generator=gen).to(dev)  # drawn on the CPU: the same numbers on any device
        t = torch.randint(0, 1000, (lat.shape[0],), generator=gen).to(dev)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = (args.lr or 5e-4) * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        if avg is not None:
            avg["text"].update(text)
            avg["unet"].update(unet)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            print(f"unet step {step}/{args.steps} loss {loss.item():.4f} ema {ema:.4f} lr {lr:.2e} {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
        if args.stop_after and step >= args.stop_after:
            STOP = True
        if STOP or step == args.steps or time.time() - last_save > args.save_minutes * 60:
            save(step)
            last_save = time.time()
            if STOP:
                break


HELDOUT_T = (50, 200, 400, 600, 800, 950)


@torch.no_grad()
def unet_loss(args):
    """The denoising loss of the text encoder + UNet in --out on rows no stage trains on (seed 424242),
    at fixed timesteps and fixed noise: two base models compared on the same numbers, unlike the training
    loss, whose timesteps are drawn at random. Prints one line per timestep and the mean; --json writes them."""
    out = Path(args.out)
    pipe = toy.load_toy("cpu", torch.float32, out)
    scale = float(pipe.vae.config.scaling_factor)
    sched = noise_schedule()
    n = args.batch
    x, caps, roles, _ = scene_batch(SceneSource(424242), 0, n, np.random.default_rng(424242), not args.no_flip, args.size)
    gen = torch.Generator().manual_seed(424242)
    post = pipe.vae.encode(x).latent_dist
    lat = posterior_latents(post.mean, post.std, gen, args.latents) * scale
    ids = caption_ids(pipe.tokenizer, caps)
    hidden = pipe.text_encoder(ids)[0]
    losses = {}
    for t in HELDOUT_T:
        noise = torch.randn(lat.shape, generator=gen)
        tt = torch.full((n,), t, dtype=torch.long)
        pred = pipe.unet(sched.add_noise(lat, noise, tt), tt, encoder_hidden_states=hidden).sample
        per_row = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        losses[t] = {"all": per_row.mean().item(),
                     **{r: per_row[[i for i, q in enumerate(roles) if q == r]].mean().item() for r in sorted(set(roles))}}
        print(f"t {t:4d}: loss {losses[t]['all']:.4f}  " + "  ".join(f"{r} {losses[t][r]:.4f}" for r in sorted(set(roles))))
    mean = sum(v["all"] for v in losses.values()) / len(losses)
    print(f"mean over t {HELDOUT_T}: {mean:.4f}  ({n} held-out rows, UNet {','.join(map(str, toy.unet_channels(out / toy.FILES['unet'])))})")
    if args.json:
        Path(args.json).write_text(json.dumps({"out": str(out), "rows": n, "mean": mean, "per_t": losses}, indent=1) + "\n")


def world_size(args) -> int:
    """The picture size of this run: --size for the VAE stage (default 64), else the size the VAE in --out
    was trained at (a different --size is an error: a UNet must learn the latents its VAE makes)."""
    if args.stage == "vae":
        size = args.size or toy.IMAGE_SIZE
        if not toy.is_image_size(size):
            sys.exit(f"pretrain_base.py: --size {size} is not a multiple of 64")
        return size
    size = toy.image_size(Path(args.out) / toy.FILES["vae"])
    if args.size and args.size != size:
        sys.exit(f"pretrain_base.py: --size {args.size}, but the VAE in {args.out} is trained at {size}x{size}")
    return size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "decoder", "unet", "unet-loss"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "layerctl" / "toy_weights"))
    ap.add_argument("--save-minutes", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="vae, unet: where to train (e.g. cuda); the saved state resumes on any device")
    ap.add_argument("--transparent-encoder", default=None,
                    help="unet: train fg rows on transparent latents; decoder: decode them to the fg over grey")
    ap.add_argument("--latent-noise", type=float, default=0.0,
                    help="decoder: add Gaussian noise of strength U(0, this) per row to the latents, in the UNet's scaled units")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="unet: stop (and save) after this step; the schedule still spans --steps")
    ap.add_argument("--resume", action="store_true",
                    help="unet: start from the weights in --out, or go on from the state saved there by a run of the same --steps "
                         "(the decoder stage always starts from --out)")
    ap.add_argument("--unet-channels", default=None,
                    help="unet, from scratch: the UNet's block_out_channels, e.g. 64,128,128 (default 32,64,64; recorded in the file)")
    ap.add_argument("--cache", type=int, default=0,
                    help="unet: encode this many scene rows once and train on them (much faster per step)")
    ap.add_argument("--no-flip", action="store_true",
                    help="unet, unet-loss: no mirrored rows (the toy world's cups all have the handle on the right)")
    ap.add_argument("--latents", choices=["sample", "mean"], default="sample",
                    help="unet, unet-loss, decoder: learn draws from the VAE posterior (the shipped base) or its mean "
                         "(what a UNet trained on means draws)")
    ap.add_argument("--json", default=None, help="unet-loss: write the figures here")
    ap.add_argument("--size", type=int, default=None,
                    help="vae: the toy world's picture size (default 64; 128 gives 16x16 latents), recorded in the VAE file; "
                         "the other stages read it from the VAE in --out")
    ap.add_argument("--ema", type=float, default=0.0, help="unet, decoder: save an exponential moving average (e.g. 0.999)")
    args = ap.parse_args(argv)
    args.size = world_size(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGINT, _sigint)
    signal.signal(signal.SIGTERM, _sigint)
    {"vae": train_vae, "decoder": train_decoder, "unet": train_unet, "unet-loss": unet_loss}[args.stage](args)
    if INTERRUPTED:
        print("interrupted: what it learnt so far is saved (unet: the same command with --resume goes on from there)",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
