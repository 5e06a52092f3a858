"""Text -> transparent RGBA: the LayerDiffuse main job (`layerctl gen PROMPT --out PNG`).

The base model denoises with the transparent-latent weights on (SD1.5: one-frame attention
sharing units; SDXL: merged patch), then the frozen VAE and the transparent decoder turn the
latent into straight RGBA. Editing requests (--init/--mask/--hires/--controlnet) go to
layerctl.pipelines.edit instead.
"""

from __future__ import annotations

from layerctl.core.budget import check_memory
from layerctl.core.naming import batch_seeds
from layerctl.errors import LayerctlError
from layerctl.outputs import OutputRecord, base_metadata, plan_outputs, write_images
from layerctl.progress import steps_bar


def gen_rgba(models, req) -> list[OutputRecord]:
    """Run one `gen PROMPT` request on the ModelCache `models`; returns the records written."""
    from layerctl.models.kit import precheck_files
    from layerctl.pipelines.sampling import DenoiseSpec, decode_transparent, denoise, job_sampling, make_noise

    # 1. check the request and every output path (before any model loads)
    if not req.out:
        raise LayerctlError("--out is required (the PNG to write; {i} and {seed} fill in for batches)")
    n = req.batch
    seeds = batch_seeds(req.seed, n)
    paths, psds = plan_outputs(req, n, seeds, req.prompt)
    check_memory(req, frames=1)
    precheck_files(req)

    # 2. the model, its transparent decoder and the transparent-latent weights
    kit = models.kit(req)
    model = kit.model
    width, height = req.width or model.native_size, req.height or model.native_size
    steps = req.steps or model.default_steps
    cfg = req.cfg if req.cfg is not None else model.default_cfg
    sampling = job_sampling(req, model, models.quiet)
    decoder, decoder_name = kit.decoder(req)
    active = kit.use_weights("rgba", req, req.weight)

    # 3. encode the prompt
    use_cfg = model.uses_cfg(cfg)  # FLUX.1: cfg is the distilled guidance, no negative half
    embeds = model.encode_prompt([req.prompt] * n, [req.negative] * n, use_cfg, width, height, clip_skip=req.clip_skip)
    if active.patcher is not None:
        from layerctl.models.attention_sharing import make_cond_mark

        active.patcher.set_control(None)
        active.patcher.set_prompt_overrides(None)
        # rows are [negatives..., positives...]; the mark is 1 for uncond rows
        active.patcher.set_cond_mark(make_cond_mark([True] * n + [False] * n if use_cfg else [False] * n, 1))

    # 4. denoise
    with steps_bar("generating", models.quiet) as bar:
        spec = DenoiseSpec(embeds=embeds, noise=make_noise(seeds, 1, height, width, model.latent_channels), steps=steps,
                           cfg=cfg, progress=bar, sampling=sampling, seeds=seeds)
        latents = denoise(model, spec)

    # 5. decode: frozen VAE, then the transparent decoder (8-way TTA)
    rgba = decode_transparent(model, decoder, latents, tta=req.tta)

    # 6. write the PNGs (+ previews, + PSD) with the recipe in their metadata
    meta = base_metadata(model, req, "rgba", steps, cfg, width, height, sampling)
    meta.update(layer_weights=active.names, transparent_decoder=decoder_name, role="rgba")
    items = [("rgba", p, rgba[i], seeds[i], i) for i, p in enumerate(paths)]
    return write_images(items, meta, req.overwrite, preview=req.preview, psd=psds)
