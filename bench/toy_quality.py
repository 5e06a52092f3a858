"""Quality figures of the bundled toy model (docs/toy-model.md, issues 9 and 14).

    nice -n 10 python bench/toy_quality.py --threads 1 --json runs/toy/quality.json   # 10 prompts x 100 seeds
    python bench/toy_quality.py --quick                                             # smoke test (seconds)

Everything is generated through `Session.gen` exactly as `layerctl gen` runs it (the shipped
weights unless --layer-weights / --decoder name other files), model loaded once.

1. text -> RGBA, 10 prompts (7 solid "<colour> <shape>", 3 "glass <shape>") x seeds:
   - shape accuracy: the generated alpha classified by template IoU against the eight toy shapes
     with a crisp outline; thin-shape accuracy is the same over the cup (handle), ring and star
     prompts;
   - solid objects, as a person sees them: the mean alpha over every pixel with alpha > 0.05
     (the rim included; target > 0.85), the share of images with a hole inside the object
     (a region of alpha <= 0.5 enclosed by alpha > 0.5, at least 2 px; shapes without a hole
     by design only) and the share with a stray speck (a second blob apart from the object);
   - glass: the body alpha (the object without its 2-px rim; target 0.2-0.8), the rim alpha,
     and the share of images whose rim is more opaque than their body;
   - the older measure of issue 9 (solid body alpha without the rim) for continuity;
   - solid objects' colour: mean |RGB - the prompt colour's value| over the opaque pixels
     (a "red ball" drawn orange scores high), and the share of images whose nearest toy-world
     colour is the prompt's.
   The same measures on the training scenes' own alphas ("ground truth") show what each
   measure gives on perfect pictures.
2. layer modes, 10 held-out scenes (SceneSource(777), 7 solid + 3 glass objects) x layer seeds:
   `gen --joint` (fg, bg, blended drawn together), `gen --bg` (the scene's background given)
   and `gen --fg` (the scene's foreground given). Per image: the blended picture vs `fg over
   bg` (MAE over the object; target < 0.1) and the foreground's object mask vs the region where
   the blended picture differs from the background (IoU; target > 0.7); for joint and --bg
   also whether the generated foreground has the prompt's shape. Beside them, the ceiling: the
   same two measures on the scenes themselves with their bg and blended picture round-tripped
   through the base VAE (every generated bg and blended picture is decoded by it).
3. transparency VAE, from the shipped encoder/decoder: alpha PSNR and composite RGB PSNR on
   held-out scenes against the zero-initialised pair.
4. time of one 64x64 image (20 steps, 8-way TTA decode), model loaded; shipped size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from layerctl.training.toy_metrics import (  # noqa: E402
    CLASSIFY_SHAPES, HOLED_SHAPES, THIN_SHAPES, body_alpha_mean, classify, colour_error, has_hole, has_speck,
    layer_agreement, nearest_colour, object_alpha_mean, rim_and_body,
)
from layerctl.training.scenes import SHAPES, SceneSource  # noqa: E402

SOLID_TARGET = 0.85  # issue 14: mean alpha over the object's pixels, rim included
MAE_TARGET, IOU_TARGET = 0.1, 0.7
LAYER_SCENES = [("ball", "solid"), ("cup", "solid"), ("bottle", "solid"), ("heart", "solid"), ("star", "solid"),
                ("ring", "solid"), ("leaf", "solid"), ("cup", "glass"), ("ball", "glass"), ("bottle", "glass")]
LAYER_SCENE_SEED = 777


def rgba_prompts() -> tuple[list[str], list[str]]:
    colours = ["red", "blue", "yellow", "green", "purple"]
    solid = [f"{colours[i % len(colours)]} {SHAPES[s]}" for i, s in enumerate(CLASSIFY_SHAPES) if s != "glass"]
    glass = [f"glass {SHAPES[s]}" for s in ("cup", "ball", "bottle")]
    return solid, glass


def shape_of(prompt: str) -> str:
    return next(s for s in CLASSIFY_SHAPES if prompt.split()[-1] == SHAPES[s])


def layer_scenes(count: int = len(LAYER_SCENES)) -> list:
    """The first scene of SceneSource(777) with each (shape, material) of LAYER_SCENES: held out (no
    training stage uses seed 777)."""
    src, out, i = SceneSource(seed=LAYER_SCENE_SEED), [], 0
    for want in LAYER_SCENES[:count]:
        while True:
            obj, _bg, _rng = src.plan(i)
            i += 1
            if (obj.shape, obj.material) == want:
                out.append(src(i - 1))
                break
    return out


# ---------------------------------------------------------------- per-image measures


def rgba_measures(rgba: np.ndarray, prompt: str) -> dict:
    """rgba: [H,W,4] straight RGBA in [0,1]; prompt: "<colour> <shape>" or "glass <shape>"."""
    alpha = rgba[..., 3]
    want = shape_of(prompt)
    got, score = classify(alpha)  # templates at the picture's own size (64, or 128 for a 128 toy world)
    rim, body_rimless = rim_and_body(alpha)
    glass = prompt.startswith("glass")
    colour = None if glass else nearest_colour(rgba)
    return {"shape": got, "correct": got == want, "iou": round(score, 3),
            "object_alpha": round(object_alpha_mean(alpha), 4), "body_alpha": round(body_alpha_mean(alpha), 4),
            "rim_alpha": round(rim, 4), "body_alpha_rimless": round(body_rimless, 4),
            "hole": bool(has_hole(alpha)), "speck": bool(has_speck(alpha)),
            "colour_error": None if glass else colour_error(rgba, prompt.split()[0]),
            "colour": colour, "colour_right": None if colour is None else colour == prompt.split()[0]}


def summarise_rgba(rows: dict, solid: list[str], glass: list[str]) -> dict:
    """rows: prompt -> list of per-image measure dicts."""
    allr = [r for p in solid + glass for r in rows[p]]
    thin = [r for p in solid + glass if shape_of(p) in THIN_SHAPES for r in rows[p]]
    sol = [r for p in solid for r in rows[p]]
    holeless = [r for p in solid if shape_of(p) not in HOLED_SHAPES for r in rows[p]]
    gla = [r for p in glass for r in rows[p]]

    def m(rs, k):  # mean of a measure, images without it (None) left out
        vals = [r[k] for r in rs if r[k] is not None]
        return float(np.mean(vals)) if vals else None

    share = lambda rs, f: float(np.mean([bool(f(r)) for r in rs])) if rs else None  # noqa: E731
    return {
        "images": len(allr),
        "shape_accuracy": m(allr, "correct"),
        "chance": 1 / len(CLASSIFY_SHAPES),
        "thin_shape_accuracy": m(thin, "correct"),
        "thin_shape_images": len(thin),
        "solid_object_alpha": m(sol, "object_alpha"),
        "solid_share_object_alpha_above_target": share(sol, lambda r: r["object_alpha"] > SOLID_TARGET),
        "solid_hole_share": share(holeless, lambda r: r["hole"]),
        "solid_hole_images": len(holeless),
        "speck_share": share(allr, lambda r: r["speck"]),
        "solid_body_alpha_rimless": m(sol, "body_alpha"),
        "solid_colour_error": m(sol, "colour_error"),
        "solid_colour_accuracy": share([r for r in sol if r["colour_right"] is not None], lambda r: r["colour_right"]),
        "glass_body_alpha": m(gla, "body_alpha"),
        "glass_share_body_in_0.2_0.8": share(gla, lambda r: 0.2 <= r["body_alpha"] <= 0.8),
        "glass_rim_alpha": m(gla, "rim_alpha"),
        "glass_share_rim_above_body": share(gla, lambda r: r["rim_alpha"] > r["body_alpha_rimless"]),
        "glass_object_alpha": m(gla, "object_alpha"),
    }


def ground_truth(n: int = 400, seed: int = 12345) -> dict:
    """The measures on the training scenes' own alphas (solid and glass objects with a crisp outline)."""
    src = SceneSource(seed=seed)
    rows = {}
    for i in range(n):
        s = src(i)
        if s.obj.shape not in CLASSIFY_SHAPES or s.obj.material not in ("solid", "glass"):
            continue
        if s.obj.material == "glass" and s.obj.shape == "glass":
            continue
        prompt = f"{'glass' if s.obj.material == 'glass' else s.obj.colour} {SHAPES[s.obj.shape]}"
        rows.setdefault(prompt, []).append(rgba_measures(s.fg, prompt))
    solid = sorted(p for p in rows if not p.startswith("glass"))
    glass = sorted(p for p in rows if p.startswith("glass"))
    return summarise_rgba(rows, solid, glass)


# ---------------------------------------------------------------- generation


def _request_args(weights_dir: str | None, decoder: str | None, role: str, **fields) -> dict:
    """The GenRequest fields the bench's options set beyond prompt, seed, steps and cfg.

    `fields` (cfg_rescale, negative, sampler, schedule): those given (not None) are passed on as they are.
    """
    out = {k: v for k, v in fields.items() if v is not None}
    if decoder:
        out["transparent_decoder"] = decoder
    if weights_dir and (Path(weights_dir) / f"{role}.safetensors").is_file():
        out["layer_weights"] = str(Path(weights_dir) / f"{role}.safetensors")
    return out


def _options(args) -> dict:
    """The sampling options given on the command line (None: gen's default)."""
    return {"cfg_rescale": args.cfg_rescale, "negative": args.negative, "sampler": args.sampler, "schedule": args.schedule}


def load_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


def generate_rgba(session, prompts, seeds, steps, cfg, out_dir: Path, model: str, wargs: dict):
    from layerctl.requests import GenRequest

    images, times = {}, []
    for p in prompts:
        for seed in seeds:
            path = out_dir / f"{p.replace(' ', '_')}_{seed}.png"
            t = time.perf_counter()
            session.gen(GenRequest(prompt=p, model=model, out=str(path), seed=seed, steps=steps, cfg=cfg, device="cpu",
                                   overwrite=True, **wargs))
            times.append(time.perf_counter() - t)
            images[(p, seed)] = load_png(path)
    return images, times


def generate_layers(session, mode: str, scenes, seeds, steps, cfg, out_dir: Path, model: str, wargs: dict):
    """mode: joint | bg2fg (gen --bg) | fg2bg (gen --fg). -> list of per-image dicts."""
    from PIL import Image

    from layerctl.requests import GenRequest

    rows, times = [], []
    for k, s in enumerate(scenes):
        known = {}
        if mode == "bg2fg":
            known["bg"] = str(out_dir / f"scene{k}_bg.png")
            Image.fromarray(np.clip(np.rint(s.bg * 255), 0, 255).astype(np.uint8), "RGB").save(known["bg"])
        if mode == "fg2bg":
            known["fg"] = str(out_dir / f"scene{k}_fg.png")
            Image.fromarray(np.clip(np.rint(s.fg * 255), 0, 255).astype(np.uint8), "RGBA").save(known["fg"])
        for seed in seeds:
            d = out_dir / mode / f"scene{k}_{seed}"
            t = time.perf_counter()
            texts = {"fg_prompt": s.fg_caption if mode != "fg2bg" else None,
                     "bg_prompt": s.bg_caption if mode != "bg2fg" else None}
            session.gen(GenRequest(prompt=s.caption, **texts,
                                   joint=(mode == "joint"), model=model, out_dir=str(d), seed=seed, steps=steps,
                                   cfg=cfg, device="cpu", overwrite=True, **known, **wargs))
            times.append(time.perf_counter() - t)
            fg = load_png(known["fg"]) if "fg" in known else load_png(d / "fg.png")
            bg = load_png(known["bg"]) if "bg" in known else load_png(d / "bg.png")
            blended = load_png(d / "blended.png")
            agree = layer_agreement(fg, bg[..., :3], blended[..., :3])
            row = {"scene": k, "seed": seed, "caption": s.caption, "mae": round(agree["mae"], 4),
                   "iou": round(agree["iou"], 4)}
            if mode != "fg2bg":
                row["fg_shape"] = classify(fg[..., 3])[0]
                row["fg_shape_correct"] = row["fg_shape"] == s.obj.shape
            rows.append(row)
    return rows, times


def summarise_layers(rows: list) -> dict:
    out = {"images": len(rows),
           "mae": float(np.mean([r["mae"] for r in rows])),
           "share_mae_below_target": float(np.mean([r["mae"] < MAE_TARGET for r in rows])),
           "iou": float(np.mean([r["iou"] for r in rows])),
           "share_iou_above_target": float(np.mean([r["iou"] > IOU_TARGET for r in rows]))}
    if rows and "fg_shape_correct" in rows[0]:
        out["fg_shape_accuracy"] = float(np.mean([r["fg_shape_correct"] for r in rows]))
    return out


def layers_ground_truth(scenes) -> dict:
    rows = []
    for s in scenes:
        a = layer_agreement(s.fg, s.bg, s.blended)
        rows.append({"mae": a["mae"], "iou": a["iou"]})
    return summarise_layers(rows)


def layers_vae_ceiling(scenes, model: str) -> dict:
    """The agreement a perfect diffusion model would reach through the base VAE: each scene's
    background and blended picture encoded (latent mean) and decoded, its foreground as it is.
    Every generated bg and blended picture goes through that decoder, so the layer modes cannot
    do better than this (for --bg, where the bg is the given file, only the blended one is decoded)."""
    import torch
    from toy_base_shapes import vae_round_trip

    from layerctl.training.vae import load_frozen_vae

    vae = load_frozen_vae(model, torch.device("cpu")).pipe.vae
    round_trip = lambda img: vae_round_trip(vae, [np.ascontiguousarray(img)])[0]  # noqa: E731

    both, given_bg = [], []
    for s in scenes:
        blended = round_trip(s.blended)
        a, b = layer_agreement(s.fg, round_trip(s.bg), blended), layer_agreement(s.fg, s.bg, blended)
        both.append({"mae": a["mae"], "iou": a["iou"]})
        given_bg.append({"mae": b["mae"], "iou": b["iou"]})
    return {"bg_decoded": summarise_layers(both), "bg_given": summarise_layers(given_bg)}


# ---------------------------------------------------------------- transparency VAE


def transparent_vae_figures(n: int = 64, seed: int = 424242, decoder: str | None = None, model: str = "toy") -> dict:
    """The model's transparency encoder/decoder (a toy:FOLDER's own) vs the zero-initialised pair, on n
    held-out scenes."""
    import torch

    from layerctl.core.imagemath import pad_rgb
    from layerctl.models import transparent_vae as tv
    from layerctl.training.vae import evaluate, load_decoder_any, load_frozen_vae

    src = SceneSource(seed=seed)
    rgba = np.stack([src(i).fg for i in range(n)])
    padded = np.stack([pad_rgb(x) for x in rgba])
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()  # noqa: E731
    batches = [{"rgba": to_t(rgba[i : i + 16]), "padded": to_t(padded[i : i + 16])} for i in range(0, n, 16)]
    model = load_frozen_vae(model, torch.device("cpu"))
    enc = tv.load_encoder(model.official["encoder"]).float().eval()  # the set's own pair (a toy:FOLDER's)
    dec = load_decoder_any(decoder or model.official["decoder"]).float().eval()
    shipped = evaluate(model, enc, dec, batches, tta=False)
    zero_dec = tv.new_decoder(seed=0, block_out_channels=tuple(dec.block_out_channels)).float().eval()
    baseline = evaluate(model, tv.new_encoder(seed=0).float().eval(), zero_dec, batches, tta=False)
    return {"held_out_images": n, "seed": seed, "shipped": shipped, "zero_init": baseline}


# ---------------------------------------------------------------- report


def fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def print_summary(report: dict) -> None:
    r, g = report["rgba"], report["ground_truth"]["rgba"]
    lines = [] if not r["images"] else [
        ("shape accuracy", fmt(r["shape_accuracy"], True), fmt(g["shape_accuracy"], True), "majority"),
        ("thin-shape accuracy (cup, ring, star)", fmt(r["thin_shape_accuracy"], True), fmt(g["thin_shape_accuracy"], True), ""),
        ("solid: object alpha, rim included", fmt(r["solid_object_alpha"]), fmt(g["solid_object_alpha"]), f"> {SOLID_TARGET}"),
        ("solid: share of images above 0.85", fmt(r["solid_share_object_alpha_above_target"], True),
         fmt(g["solid_share_object_alpha_above_target"], True), ""),
        ("solid: share with a hole", fmt(r["solid_hole_share"], True), fmt(g["solid_hole_share"], True), "0"),
        ("share with a stray speck", fmt(r["speck_share"], True), fmt(g["speck_share"], True), "0"),
        ("solid: body alpha without the rim (issue 9)", fmt(r["solid_body_alpha_rimless"]), fmt(g["solid_body_alpha_rimless"]), ""),
        ("solid: colour error (mean abs. RGB difference from the prompt colour)", fmt(r["solid_colour_error"]), fmt(g["solid_colour_error"]), "low"),
        ("solid: nearest toy colour is the prompt's", fmt(r["solid_colour_accuracy"], True), fmt(g["solid_colour_accuracy"], True), ""),
        ("glass: body alpha", fmt(r["glass_body_alpha"]), fmt(g["glass_body_alpha"]), "0.2-0.8"),
        ("glass: share of bodies in 0.2-0.8", fmt(r["glass_share_body_in_0.2_0.8"], True), fmt(g["glass_share_body_in_0.2_0.8"], True), ""),
        ("glass: rim alpha", fmt(r["glass_rim_alpha"]), fmt(g["glass_rim_alpha"]), "> body"),
        ("glass: share with rim above body", fmt(r["glass_share_rim_above_body"], True), fmt(g["glass_share_rim_above_body"], True), ""),
    ]
    for mode, s in report.get("layers", {}).items():
        gt = report["ground_truth"]["layers"]
        ceil = report["ground_truth"]["layers_through_vae"]["bg_given" if mode == "bg2fg" else "bg_decoded"]
        lines.append((f"{mode}: MAE blended vs fg over bg", fmt(s["mae"]), fmt(gt["mae"]), f"< {MAE_TARGET}"))
        lines.append((f"{mode}: MAE, scenes through the base VAE (ceiling)", fmt(ceil["mae"]), "", ""))
        lines.append((f"{mode}: share MAE < {MAE_TARGET}", fmt(s["share_mae_below_target"], True), "", ""))
        lines.append((f"{mode}: IoU fg alpha vs object in blended", fmt(s["iou"]), fmt(gt["iou"]), f"> {IOU_TARGET}"))
        lines.append((f"{mode}: IoU, scenes through the base VAE (ceiling)", fmt(ceil["iou"]), "", ""))
        lines.append((f"{mode}: share IoU > {IOU_TARGET}", fmt(s["share_iou_above_target"], True), "", ""))
        if "fg_shape_accuracy" in s:
            lines.append((f"{mode}: fg shape accuracy", fmt(s["fg_shape_accuracy"], True), "", ""))
    if report["seconds_per_image_median"] is not None:
        lines.append(("seconds per image (median)", f"{report['seconds_per_image_median']:.2f}", "", "about 1"))
    lines.append(("shipped size (MB)", f"{report['shipped_bytes'] / 1e6:.1f}", "", "<= 40"))
    print("| figure | toy model | ground truth | target |")
    print("|---|---|---|---|")
    for row in lines:
        print("| " + " | ".join(row) + " |")
    for p, d in report.get("per_prompt", {}).items():
        drawn = ", ".join(f"{k} {v}" for k, v in d["predicted"].items())
        print(f"{p}: {d['correct']}/{d['of']} right (drawn: {drawn}); alpha with rim {d['object_alpha']:.2f}, "
              f"holes {d['holes']}, specks {d['specks']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=100, help="seeds per text->RGBA prompt (issue 14: 100; 0: layer modes only)")
    ap.add_argument("--layer-seeds", type=int, default=None, help="seeds per layer scene and mode (default: --seeds)")
    ap.add_argument("--modes", default="joint,bg2fg,fg2bg", help="layer modes to measure ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--cfg-rescale", type=float, default=None, help="CFG rescale phi (default: the model's)")
    ap.add_argument("--negative", default=None, help="negative prompt (default: gen's)")
    ap.add_argument("--sampler", default=None, help="sampler, as gen --sampler (default: gen's)")
    ap.add_argument("--schedule", default=None, help="noise schedule, as gen --schedule (default: gen's)")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--layer-weights", default=None,
                    help="folder with candidate rgba/joint/fg2bg/bg2fg.safetensors (default: the shipped ones)")
    ap.add_argument("--decoder", default=None, help="candidate transparent decoder (default: the shipped one)")
    ap.add_argument("--no-vae", action="store_true", help="skip the transparency-VAE figures")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 steps, 3 layer scenes, no VAE figures")
    ap.add_argument("--prompts", default=None,
                    help="comma-separated subset of the text -> RGBA prompts (default: all ten), for a quick look at a few")
    ap.add_argument("--keep", default=None, help="folder to keep the generated PNGs in")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.layer_seeds, args.steps, args.no_vae = 1, 1, 4, True
    from common import machine_info, set_threads, write_json

    set_threads(args.threads)
    seeds = list(range(1, args.seeds + 1))
    layer_seeds = list(range(1, (args.seeds if args.layer_seeds is None else args.layer_seeds) + 1))
    solid, glass = rgba_prompts()
    if args.prompts:
        wanted = [p.strip() for p in args.prompts.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in solid + glass]
        if unknown:
            ap.error(f"unknown prompt(s) {unknown}; the bench's prompts: {', '.join(solid + glass)}")
        solid, glass = [p for p in solid if p in wanted], [p for p in glass if p in wanted]
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="toyq-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    scenes = layer_scenes(3 if args.quick else len(LAYER_SCENES))

    from layerctl.api import Session

    report = {"bench": "toy_quality", "machine": machine_info(), "steps": args.steps, "cfg": args.cfg, "cfg_rescale": args.cfg_rescale, "negative": args.negative,
              "sampler": args.sampler, "schedule": args.schedule, "seeds": len(seeds), "layer_seeds": len(layer_seeds),
              "weights": {"layer_weights": args.layer_weights, "decoder": args.decoder}}
    t0 = time.perf_counter()
    with Session(quiet=True) as s:
        images, times = generate_rgba(s, solid + glass, seeds, args.steps, args.cfg, out_dir, args.model,
                                      _request_args(args.layer_weights, args.decoder, "rgba", **_options(args)))
        rows = {p: [rgba_measures(images[(p, sd)], p) for sd in seeds] for p in solid + glass}
        report["rgba"] = summarise_rgba(rows, solid, glass)
        layer_rows, layer_times = {}, {}
        for mode in modes:
            layer_rows[mode], layer_times[mode] = generate_layers(
                s, mode, scenes, layer_seeds, args.steps, args.cfg, out_dir, args.model,
                _request_args(args.layer_weights, args.decoder, mode, **_options(args)))
    report["layers"] = {m: summarise_layers(r) for m, r in layer_rows.items()}
    report["seconds_per_image_median"] = float(np.median(times[1:] if len(times) > 1 else times)) if times else None
    report["seconds_per_layer_job_median"] = {m: float(np.median(t)) for m, t in layer_times.items()}
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report["ground_truth"] = {"rgba": ground_truth(), "layers": layers_ground_truth(scenes)}
    if modes:
        report["ground_truth"]["layers_through_vae"] = layers_vae_ceiling(scenes, args.model)
    report["per_prompt"] = {
        p: {"correct": sum(r["correct"] for r in rows[p]), "of": len(rows[p]),
            "predicted": dict(sorted({k: sum(r["shape"] == k for r in rows[p]) for k in {r["shape"] for r in rows[p]}}.items(),
                                     key=lambda kv: -kv[1])),
            "object_alpha": float(np.mean([r["object_alpha"] for r in rows[p]])),
            "body_alpha": float(np.mean([r["body_alpha"] for r in rows[p]])),
            "rim_alpha": float(np.mean([r["rim_alpha"] for r in rows[p]])),
            "holes": sum(r["hole"] for r in rows[p]), "specks": sum(r["speck"] for r in rows[p]),
            "colour_error": summarise_rgba({p: rows[p]}, [p], [])["solid_colour_error"] if not p.startswith("glass") else None}
        for p in solid + glass}
    report["per_scene_layers"] = {
        m: {s.caption: {"mae": float(np.mean([r["mae"] for r in rs if r["scene"] == k])),
                        "iou": float(np.mean([r["iou"] for r in rs if r["scene"] == k]))}
            for k, s in enumerate(scenes)}
        for m, rs in layer_rows.items()}
    wdir = ROOT / "layerctl" / "toy_weights"
    files = {p.name: p.stat().st_size for p in sorted(wdir.glob("*.safetensors"))}
    report["shipped_bytes"] = sum(files.values())
    report["shipped_files"] = files
    if not args.no_vae:
        report["transparent_vae"] = transparent_vae_figures(decoder=args.decoder, model=args.model)
    report["images"] = str(out_dir)
    report["per_image"] = {p: rows[p] for p in rows}
    report["per_image_layers"] = layer_rows
    print_summary(report)
    if args.json:
        write_json(args.json, report, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
