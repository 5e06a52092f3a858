"""bench/gpu_flux: layerctl against plain diffusers' FluxPipeline on a GPU, with a FLUX.1-dev-shaped random model.

    python bench/gpu_flux.py                      # needs CUDA; prints a `skip:` line and exits 0 without it
    python bench/gpu_flux.py --quick              # with CUDA: 512 px, 4 steps, 1 round
    python bench/gpu_flux.py --tiny --device cpu  # the same code path on tiny-flux configs, on the CPU (a check)

Random weights (speed does not depend on the values), bf16: the FLUX.1-dev transformer
(19 double + 38 single blocks, 3072 wide, guidance input: 11.9 B parameters, ~24 GB), the FLUX
VAE (16 channels, scaling 0.3611, shift 0.1159) and CLIP-L; T5 is FLUX's width (4096) but only
2 layers (the prompt is encoded once per image; its 4.7 B weights would only add memory to both
sides). One FluxPipeline is built in memory; layerctl runs it through its flux backend
(`FluxModel`, the one sampling loop, the transparent decoder at the official widths and a
random rank-32 layer LoRA fused into the transformer), plain diffusers runs a second pipeline
holding the same components (the transformer is shared; the LoRA is folded in on both sides
by the time they run, so the arithmetic is identical).

Cases (1024 px, 28 steps, guidance 3.5 by default):
  layerctl        gen with the transparent decode stubbed out (prompt, loop, PNG)
  plain           FluxPipeline(output_type="latent")
  layerctl+decode the full gen (VAE decode + 8-way TTA transparent decoder)
  plain+decode    FluxPipeline to PIL, saved as PNG
then the 8-way TTA decode alone at chunk 1/4/8, and with --offload: layerctl --offload model
against FluxPipeline.enable_model_cpu_offload (time and peak memory).
Targets (issue 16): time <= 1.05x plain, peak GPU memory <= +1 GiB, 8-way TTA decode at 1024 px < 1 s.
Peak memory: torch.cuda.max_memory_allocated during a run (both sides hold the same weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, interleave, machine_info, median, print_header  # noqa: E402
from gen_overhead import DecodeSwitch  # noqa: E402

TIME_TARGET = 1.05
MEM_TARGET_MIB = 1024.0
TTA_TARGET_S = 1.0
PROMPT = "glass bottle, high quality"
SEED = 1234
DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def build_pipeline(tiny: bool, device, dtype):
    """A FluxPipeline of random components (full FLUX.1-dev shapes unless `tiny`), on `device` in `dtype`."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from layerctl.backends.tiny import tiny_tokenizer
    from layerctl.backends.tiny_flux import tiny_flux_pipeline, tiny_flux_scheduler, tiny_t5_tokenizer

    if tiny:
        return tiny_flux_pipeline().to(device=device, dtype=dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in bf16 on the GPU: no 48 GB fp32 detour
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**DEV_TRANSFORMER)
            vae = AutoencoderKL(**FLUX_VAE)
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                                                max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                                                pad_token_id=513))
            t5_tok = tiny_t5_tokenizer(512)
            t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                         num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    finally:
        torch.set_default_dtype(old)
    return FluxPipeline(scheduler=tiny_flux_scheduler("dev"), vae=vae, text_encoder=clip, tokenizer=tiny_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def weight_files(model, tmp: Path, tiny: bool) -> dict:
    """A transparent decoder/encoder (official widths, random values) and a random rank-32 layer LoRA."""
    import torch
    from safetensors.torch import save_file

    from layerctl.models.flux_lora import save_flux_lora, tiny_layer_lora
    from layerctl.models.flux_vae import new_flux_decoder, new_flux_encoder, tiny_flux_decoder, tiny_flux_encoder

    dec = tiny_flux_decoder() if tiny else new_flux_decoder(seed=1)
    enc = tiny_flux_encoder() if tiny else new_flux_encoder(seed=2)
    if not tiny:
        torch.nn.init.normal_(dec.latent_conv_in.weight, std=0.02)  # not all-zero (the fresh-net rule)
    paths = {"transparent_decoder": tmp / "dec.safetensors", "transparent_encoder": tmp / "enc.safetensors",
             "layer_weights": tmp / "layerlora.safetensors"}
    for net, key in ((dec, "transparent_decoder"), (enc, "transparent_encoder")):
        save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, str(paths[key]))
    save_flux_lora(tiny_layer_lora(model.transformer, rank=4 if tiny else 32), paths["layer_weights"])
    return {k: str(v) for k, v in paths.items()}


def plain_call(pipe, model, size, steps, guidance, output_type, png=None):
    import torch

    g = torch.Generator("cpu").manual_seed(SEED)
    out = pipe(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
               generator=g, output_type=output_type, max_sequence_length=model.max_sequence_length)
    if png is not None:
        out.images[0].save(png)
    return out.images


def peak_mib(fn, device) -> float:
    import torch

    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def part_gen(args, rep, session, model, plain_pipe, req, switch, sync):
    def layerctl_nodec():
        switch.stub = True
        try:
            session.gen(req())
        finally:
            switch.stub = False

    layerctl_nodec()  # loads the kit: fuses the layer LoRA into the (shared) transformer
    lat_l = switch.latents
    lat_p = model.unpack_latents(plain_call(plain_pipe, model, args.size, args.steps, args.cfg, "latent"),
                                 args.size, args.size).float().cpu()
    diff = float((lat_l - lat_p).abs().max())
    rep.value("max |latent(layerctl) - latent(plain)|", diff, "", target="< 0.05 (bf16, same components)",
              met=diff < 0.05)
    png = Path(tempfile.mkdtemp(prefix="layerctl-gpu-flux-")) / "plain.png"
    cases = [("layerctl", layerctl_nodec),
             ("plain", lambda: plain_call(plain_pipe, model, args.size, args.steps, args.cfg, "latent")),
             ("layerctl+decode", lambda: session.gen(req())),
             ("plain+decode", lambda: plain_call(plain_pipe, model, args.size, args.steps, args.cfg, "pil", png))]
    switch.decode_s.clear()
    times = interleave(cases, reps=args.reps, warmup=1, sync=sync)
    rep.ratio("layerctl / plain FluxPipeline, decode excluded", times, "layerctl", "plain", TIME_TARGET)
    rep.ratio("layerctl+decode / plain+decode", times, "layerctl+decode", "plain+decode")
    rep.value("transparent decode share of layerctl+decode",
              round(median(switch.decode_s[-args.reps:]) / median(times["layerctl+decode"]), 4), "")
    m_l, m_p = peak_mib(layerctl_nodec, model.device), peak_mib(cases[1][1], model.device)
    if m_l == m_l:  # not NaN: CUDA
        rep.value("peak GPU memory layerctl - plain (decode excluded)", round(m_l - m_p, 1), "MiB",
                  target=f"<= {MEM_TARGET_MIB:.0f} MiB", met=m_l - m_p <= MEM_TARGET_MIB)
    return lat_l


def part_tta(args, rep, session, model, req, latents, sync):
    from layerctl.pipelines.sampling import decode_transparent

    kit = session.models.kit(req())
    decoder, _name = kit.decoder(req())
    lat = latents.to(model.device)
    for chunk in (1, 4, 8):
        times = interleave([(f"chunk{chunk}", lambda c=chunk: decode_transparent(model, decoder, lat, tta=True, chunk=c))],
                           reps=args.reps, warmup=1, sync=sync, log=False)
        t = median(times[f"chunk{chunk}"])
        rep.value(f"8-way TTA decode (VAE + D_a) at {args.size} px, chunk {chunk}", round(t, 4), "s",
                  target=f"< {TTA_TARGET_S} s" if args.size >= 1024 else None, met=t < TTA_TARGET_S)


def part_offload(args, rep, model, plain_pipe, req):
    """--offload model on both sides (the same modules: layerctl's kit first, then diffusers' own hooks)."""
    from layerctl.api import Session

    with Session(quiet=True) as off:
        off.models.adopt(model, req(offload="model"))
        t0 = time.perf_counter()
        m_l = peak_mib(lambda: off.gen(req(offload="model", tta=False)), model.device)
        t_l = time.perf_counter() - t0
    plain_pipe.enable_model_cpu_offload(device=model.device)
    t0 = time.perf_counter()
    m_p = peak_mib(lambda: plain_call(plain_pipe, model, args.size, args.steps, args.cfg, "pil"), model.device)
    t_p = time.perf_counter() - t0
    rep.value("--offload model: layerctl / plain enable_model_cpu_offload time (one run each)", round(t_l / t_p, 3), "x")
    rep.value("--offload model: peak GPU memory layerctl / plain", f"{m_l:.0f} / {m_p:.0f}", "MiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=3.5, help="distilled guidance (default 3.5)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny-flux configs (a check of the code path, e.g. on the CPU)")
    ap.add_argument("--offload", action="store_true", help="also compare --offload model (CUDA only; slow)")
    ap.add_argument("--quick", action="store_true", help="512 px (tiny: 64), 4 steps, 1 round")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.reps = (64 if args.tiny else 512), 4 if not args.tiny else 2, 1
    if args.tiny and not args.quick:
        args.size = min(args.size, 128)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        info = {**machine_info(torch_facts=False), "torch": torch.__version__}
        rep = Report("gpu_flux", info)
        print_header("gpu_flux", info)
        rep.skip("no CUDA device here: the FLUX.1 GPU benchmark (FLUX.1-dev-shaped transformer, 1024 px, 28 steps, "
                 "vs plain FluxPipeline) needs one; run `python bench/gpu_flux.py` on a GPU machine "
                 "(`--tiny --device cpu` checks the code path here)")
        rep.dump(args.json)
        return 0
    if args.device != "cuda" and not args.tiny:
        raise SystemExit("the full-size model needs CUDA; use --tiny with --device cpu")
    return run(args)


def run(args) -> int:
    import torch
    from diffusers import FluxPipeline

    from layerctl.api import Session
    from layerctl.backends.flux import model_from_pipeline
    from layerctl.requests import GenRequest

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    info = machine_info()
    info.update(device=args.device, tiny=args.tiny, size=args.size, steps=args.steps, guidance=args.cfg)
    rep = Report("gpu_flux", info)
    print_header("gpu_flux", info)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    model = model_from_pipeline(pipe, backend="flux", ref="bench-flux", device=device, dtype=dtype,
                                native_size=args.size, max_sequence_length=32 if args.tiny else 512, official={})
    rep.value("random model build", round(time.perf_counter() - t0, 1), "s")
    tmp = Path(tempfile.mkdtemp(prefix="layerctl-gpu-flux-"))
    files = weight_files(model, tmp, args.tiny)
    plain_pipe = FluxPipeline(**pipe.components)  # the same modules: no second copy of the weights
    plain_pipe.set_progress_bar_config(disable=True)
    session = Session(quiet=True)
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]

    def req(**kw):
        return GenRequest(prompt=PROMPT, model="bench-flux", out=str(tmp / "layerctl.png"), seed=SEED,
                          width=args.size, height=args.size, steps=args.steps, cfg=args.cfg, overwrite=True,
                          device=args.device, dtype=dt, **files, **kw)

    session.models.adopt(model, req())  # the in-memory model serves "bench-flux"
    with DecodeSwitch() as switch:
        latents = part_gen(args, rep, session, model, plain_pipe, req, switch, sync)
    part_tta(args, rep, session, model, req, latents, sync)
    session.close()  # restores the transformer's own weights
    if args.offload and device.type == "cuda":
        part_offload(args, rep, model, plain_pipe, req)
    rep.dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
