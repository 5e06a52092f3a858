"""bench/gpu_sdxl: layerctl against plain diffusers on a GPU, with SDXL- and SD1.5-sized random models.

    python bench/gpu_sdxl.py                      # needs CUDA; prints a skip line and exits 0 without it
    python bench/gpu_sdxl.py --parts sdxl         # only the SDXL comparison (sdxl, attention, joint)
    python bench/gpu_sdxl.py --tiny --device cpu  # the same code path on tiny configs, on the CPU (a check)
    python bench/gpu_sdxl.py --quick              # smoke test: skips without CUDA; with CUDA 512 px, 4 steps

Random weights built from the real configs (speed does not depend on the
values): the SDXL UNet (2.6 B parameters), VAE and both CLIP text encoders,
saved as a diffusers folder, which both sides load: layerctl through its sdxl
backend (`--model FOLDER`, official-layout transparent decoder and
layer_xl_transparent_attn LoRA made with random values in --weights-dir), plain
diffusers through StableDiffusionXLPipeline.from_pretrained with the same
DPM++ 2M Karras scheduler. fp16 UNet; layerctl decodes the SDXL VAE in bf16,
diffusers upcasts it to fp32 (its force_upcast default).

Parts:
  sdxl       1024 px, 25 steps, CFG 7, batch 1 and 4: layerctl transparent gen vs
             plain SDXL (time <= 1.05x and peak memory <= +1 GiB), decode
             excluded and included, the transparent decoder's share of the total
  attention  layerctl with --attention sdpa vs xformers (needs xformers)
  joint      SD1.5 512 px, 20 steps: `gen --joint` (3 frames, attention sharing)
             vs three single transparent images vs plain SD1.5 batch of 3
Peak memory: torch.cuda.max_memory_allocated during a run, plus the weights each
side holds (measured when it loads), so both sides are compared as if alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, interleave, machine_info, median, print_header, set_threads  # noqa: E402
from gen_overhead import DecodeSwitch  # noqa: E402

TIME_TARGET = 1.05
MEM_TARGET_MIB = 1024.0
PROMPT = "glass cup, high quality"
NEGATIVE = "bad, ugly"
SEED = 1234

# ---------------------------------------------------------------- configs (the released models' configs)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, norm_num_groups=32, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)


def _text_encoder(cfg: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # token ids come from layerctl's character-level tiny tokenizer (bos 512, eos 513)
    conf = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                          pad_token_id=513, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(conf).eval()


def build_pipeline_folder(family: str, folder: Path, device: str, dtype, tiny: bool):
    """A random diffusers folder (model_index.json + components); returns the UNet (kept for the patch files)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from layerctl.backends.base import default_scheduler
    from layerctl.backends import tiny as tb

    torch.manual_seed(0)
    with torch.device(device):
        if tiny:
            unet = tb.tiny_unet(xl=family == "sdxl")
            vae = tb.tiny_vae()
        else:
            unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
            vae = AutoencoderKL(**SD_VAE, sample_size=1024 if family == "sdxl" else 512,
                                scaling_factor=0.13025 if family == "sdxl" else 0.18215)
        if family == "sdxl":
            vae.register_to_config(scaling_factor=0.13025)
            te1 = tb.tiny_text_encoder(5) if tiny else _text_encoder(CLIP_L, False)
            te2 = tb.tiny_text_encoder(6, projection=32) if tiny else _text_encoder(CLIP_BIGG, True)
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tb.tiny_tokenizer(),
                                             tokenizer_2=tb.tiny_tokenizer(), unet=unet, scheduler=default_scheduler(),
                                             force_zeros_for_empty_prompt=True)
        else:
            te = tb.tiny_text_encoder(5) if tiny else _text_encoder(CLIP_L, False)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tb.tiny_tokenizer(), unet=unet,
                                           scheduler=default_scheduler(), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def write_sdxl_weights(unet, wdir: Path, rank: int) -> None:
    """Random official-layout files: vae_transparent_decoder and layer_xl_transparent_attn (LoRA)."""
    import torch

    from layerctl.core.frames import OFFICIAL_FILES
    from layerctl.models.patches import Patch, lora_to_patch_entries, write_patch
    from layerctl.models.transparent_vae import new_decoder, save_module

    save_module(new_decoder(seed=0), wdir / OFFICIAL_FILES["sdxl"]["decoder"], overwrite=True)
    g = torch.Generator("cpu").manual_seed(0)
    pairs = {}
    suffixes = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
    for name, mod in sorted(unet.named_modules()):
        if name.endswith(suffixes):
            out_f, in_f = mod.weight.shape
            pairs[name] = (torch.randn(out_f, rank, generator=g) * 1e-3, torch.randn(rank, in_f, generator=g) * 1e-3)
    entries = lora_to_patch_entries(pairs, unet_config=unet.config)
    write_patch(Patch(entries), wdir / OFFICIAL_FILES["sdxl"]["rgba"], overwrite=True)


def write_sd15_weights(unet, wdir: Path, rank: int) -> None:
    """Random official-layout files: the SD1.5 decoder, transparent_attn (1 frame) and joint (3 frames)."""
    import torch
    from safetensors.torch import save_file

    from layerctl.core.frames import OFFICIAL_FILES
    from layerctl.models.attention_sharing import AttentionSharingPatcher
    from layerctl.models.transparent_vae import new_decoder, save_module

    save_module(new_decoder(seed=0), wdir / OFFICIAL_FILES["sd15"]["decoder"], overwrite=True)
    for role, frames in (("rgba", 1), ("joint", 3)):
        with torch.device("meta"):  # only the shapes are needed; values are drawn below
            patcher = AttentionSharingPatcher(unet, frames, False, rank=rank)
        g = torch.Generator("cpu").manual_seed(frames)
        sd = {}
        for k, v in patcher.state_dict().items():
            sd[k] = (torch.randn(v.shape, generator=g) * 1e-2).to(torch.float16).contiguous()
        save_file(sd, str(wdir / OFFICIAL_FILES["sd15"][role]))
        del patcher


# ---------------------------------------------------------------- measuring


class Side:
    """One side of a comparison: a callable plus the memory its weights hold on the device."""

    def __init__(self, name: str, fn, resident_mib: float = 0.0):
        self.name, self.fn, self.resident_mib = name, fn, resident_mib


def allocated_mib() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def transient_peak_mib(fn) -> float | None:
    """Peak memory allocated during fn above what was allocated before (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def plain_call(pipe, size: int, steps: int, batch: int, output_type: str, out_dir: Path | None = None):
    import torch

    gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
    out = pipe(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
               guidance_scale=7.0, height=size, width=size, generator=gens, output_type=output_type)
    if out_dir is not None:
        for i, im in enumerate(out.images):
            im.save(out_dir / f"plain_{i:04d}.png")
    return out.images


def part_sdxl(args, rep: Report, tmp: Path, sync) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from layerctl.api import Session
    from layerctl.backends.base import default_scheduler
    from layerctl.requests import GenRequest

    dev, dt = args.device, (torch.float16 if args.device == "cuda" else torch.float32)
    folder, wdir = tmp / "sdxl-model", tmp / "sdxl-weights"
    wdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = build_pipeline_folder("sdxl", folder, dev, dt, args.tiny)
    write_sdxl_weights(src.unet, wdir, rank=4 if args.tiny else 256)
    del src
    if dev == "cuda":
        torch.cuda.empty_cache()
    rep.note(f"sdxl: random model folder and weight files made in {time.perf_counter() - t0:.1f} s")

    session = Session(quiet=True)
    dtype_name = "fp16" if dev == "cuda" else "fp32"

    def req(batch, tta=True, attention="sdpa"):
        return GenRequest(prompt=PROMPT, negative=NEGATIVE, model=str(folder), weights_dir=str(wdir),
                          out=str(tmp / "out" / f"l_{attention}_{{i}}.png"), seed=SEED, batch=batch,
                          width=args.size, height=args.size, steps=args.steps, cfg=7.0, overwrite=True,
                          device=dev, dtype=dtype_name, attention=attention, tta=tta)

    (tmp / "out").mkdir(exist_ok=True)
    with DecodeSwitch() as switch:
        before = allocated_mib()
        switch.stub = True
        session.gen(req(1))  # loads the model, the decoder, merges the LoRA
        switch.stub = False
        session.gen(req(1))
        resident_l = allocated_mib() - before
        before = allocated_mib()
        plain = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=dt)
        plain.scheduler = default_scheduler(plain.scheduler.config)
        plain.to(dev)
        plain.set_progress_bar_config(disable=True)
        resident_p = allocated_mib() - before
        if dev == "cuda":
            rep.value("sdxl: weights held on the GPU, layerctl (UNet, text encoders, VAE, decoder)", round(resident_l), "MiB")
            rep.value("sdxl: weights held on the GPU, plain diffusers", round(resident_p), "MiB")

        def layerctl_nodec(b):
            switch.stub = True
            try:
                session.gen(req(b))
            finally:
                switch.stub = False

        for batch in args.batches:
            cases = [
                ("layerctl", lambda b=batch: session.gen(req(b))),
                ("plain", lambda b=batch: plain_call(plain, args.size, args.steps, b, "pil", tmp / "out")),
                ("layerctl-nodecode", lambda b=batch: layerctl_nodec(b)),
                ("plain-latent", lambda b=batch: plain_call(plain, args.size, args.steps, b, "latent")),
            ]
            print(f"# sdxl {args.size}px {args.steps} steps batch {batch}", flush=True)
            switch.decode_s.clear()
            times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
            tag = f"sdxl {args.size}px b{batch}"
            rep.ratio(f"{tag}: layerctl transparent gen / plain SDXL (decode included)", times, "layerctl", "plain",
                      TIME_TARGET)
            rep.ratio(f"{tag}: layerctl / plain SDXL, decode excluded", times, "layerctl-nodecode", "plain-latent",
                      TIME_TARGET)
            dec = median(switch.decode_s[-args.reps:])
            rep.value(f"{tag}: transparent decode (VAE + 8-way TTA D_a) seconds", round(dec, 4), "s")
            rep.value(f"{tag}: transparent decode share of layerctl's total", round(dec / median(times["layerctl"]), 4), "")
            if dev == "cuda":
                for name, fn in cases[:2]:
                    peak = transient_peak_mib(fn)
                    total = peak + (resident_l if name == "layerctl" else resident_p)
                    rep.value(f"{tag}: peak memory {name} (weights + run)", round(total), "MiB")
                    if name == "layerctl":
                        peak_l = total
                    else:
                        extra = peak_l - total
                        rep.value(f"{tag}: layerctl peak memory minus plain", round(extra), "MiB",
                                  target=f"<= +{MEM_TARGET_MIB:.0f} MiB", met=extra <= MEM_TARGET_MIB)
            else:
                rep.note(f"{tag}: peak memory is measured on CUDA only")
    del plain
    session.close()
    _free()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_attention(args, rep: Report, tmp: Path, sync) -> None:
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        rep.skip("attention: xformers is not installed (pip install 'layerctl[xformers]'); SDPA only")
        return
    if args.device != "cuda":
        rep.skip("attention: xformers needs CUDA")
        return
    from layerctl.api import Session
    from layerctl.requests import GenRequest

    folder, wdir = tmp / "sdxl-model", tmp / "sdxl-weights"
    if not folder.exists():
        rep.skip("attention: needs the sdxl part's model folder (run with --parts sdxl,attention)")
        return
    session = Session(quiet=True)

    def run(att):
        return session.gen(GenRequest(prompt=PROMPT, negative=NEGATIVE, model=str(folder), weights_dir=str(wdir),
                                      out=str(tmp / "out" / f"att_{att}.png"), seed=SEED, width=args.size,
                                      height=args.size, steps=args.steps, cfg=7.0, overwrite=True, device="cuda",
                                      dtype="fp16", attention=att, tta=True))

    cases = [("sdpa", lambda: run("sdpa")), ("xformers", lambda: run("xformers"))]
    times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
    rep.ratio(f"sdxl {args.size}px b1: --attention xformers / sdpa", times, "xformers", "sdpa")
    session.close()
    _free()


def part_joint(args, rep: Report, tmp: Path, sync) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from layerctl.api import Session
    from layerctl.backends.base import default_scheduler
    from layerctl.requests import GenRequest

    dev, dt = args.device, (torch.float16 if args.device == "cuda" else torch.float32)
    size, steps = args.sd15_size, args.sd15_steps
    folder, wdir = tmp / "sd15-model", tmp / "sd15-weights"
    wdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = build_pipeline_folder("sd15", folder, dev, dt, args.tiny)
    write_sd15_weights(src.unet, wdir, rank=4 if args.tiny else 256)
    del src
    rep.note(f"joint: random SD1.5 folder and weight files made in {time.perf_counter() - t0:.1f} s")
    # one session per mode, so neither pays for swapping the other's layer weights in and out
    s_joint, s_single = Session(quiet=True), Session(quiet=True)
    dtype_name = "fp16" if dev == "cuda" else "fp32"
    common = dict(negative=NEGATIVE, model=str(folder), weights_dir=str(wdir), seed=SEED, width=size, height=size,
                  steps=steps, cfg=7.0, overwrite=True, device=dev, dtype=dtype_name)
    out = tmp / "out-sd15"
    out.mkdir(exist_ok=True)

    def joint():
        s_joint.gen(GenRequest(prompt="a room", fg_prompt="a cat", bg_prompt="an empty room", joint=True,
                               out_dir=str(out), **common))

    def three_single():
        for i, p in enumerate(("a cat, a room", "an empty room, a room", "a room")):
            s_single.gen(GenRequest(prompt=p, out=str(out / f"single_{i}.png"), **common))

    plain = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dt, safety_checker=None,
                                                    requires_safety_checker=False)
    plain.scheduler = default_scheduler(plain.scheduler.config)
    plain.to(dev)
    plain.set_progress_bar_config(disable=True)
    cases = [("joint", joint), ("three-single", three_single),
             ("plain-batch3", lambda: plain_call(plain, size, steps, 3, "pil", out))]
    print(f"# sd15 {size}px {steps} steps: joint vs three single images", flush=True)
    times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
    rep.ratio(f"sd15 {size}px: gen --joint (3 frames) / three single transparent gens", times, "joint", "three-single")
    rep.ratio(f"sd15 {size}px: gen --joint / plain SD1.5 batch of 3", times, "joint", "plain-batch3")
    del plain
    s_joint.close()
    s_single.close()
    _free()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sdxl,attention,joint", help="sdxl, attention, joint (comma-separated)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sd15-size", type=int, default=512)
    ap.add_argument("--sd15-steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (checks the code path on a CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary model folders")
    ap.add_argument("--quick", action="store_true", help="smoke test: 512 px, 4 steps, batch 1, 1 round")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.batches, args.reps = 512, 4, "1", 1
        args.sd15_size, args.sd15_steps = 256, 4
    if args.tiny:
        args.size, args.sd15_size = 64, 64
        args.steps, args.sd15_steps = min(args.steps, 2), min(args.sd15_steps, 2)
        args.batches = "1,2" if not args.quick else "1"
        args.reps = min(args.reps, 2)
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    set_threads(args.threads)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        info = {**machine_info(torch_facts=False), "torch": torch.__version__}
        rep = Report("gpu_sdxl", info)
        print_header("gpu_sdxl", info)
        rep.skip("no CUDA device here: the GPU benchmarks (SDXL 1024 px vs plain diffusers, SDPA vs xformers, "
                 "SD1.5 joint) need one; run `python bench/gpu_sdxl.py` on a GPU machine "
                 "(`--tiny --device cpu` checks the code path here)")
        rep.dump(args.json)
        return 0
    if args.device != "cuda" and not args.tiny:
        raise SystemExit("the full-size models need CUDA; use --tiny with --device cpu")
    info = machine_info()
    rep = Report("gpu_sdxl", info)
    info.update(device=args.device, tiny=args.tiny, size=args.size, steps=args.steps, batches=args.batches)
    print_header("gpu_sdxl", info)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    tmp = Path(tempfile.mkdtemp(prefix="layerctl-gpu-bench-"))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        if "sdxl" in parts:
            part_sdxl(args, rep, tmp, sync)
        if "attention" in parts:
            part_attention(args, rep, tmp, sync)
        if "joint" in parts:
            part_joint(args, rep, tmp, sync)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            rep.note(f"kept {tmp}")
    rep.dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
