"""What the small built-in models (`tiny`, `tiny-xl`, `toy`) share: the VAE shape and the
assembly of an SD1.5-shaped diffusers pipeline from components (no files, no downloads)."""

from __future__ import annotations


def small_vae_config(scaling_factor: float) -> dict:
    """A 4-level AutoencoderKL (8x down, 4 latent channels) narrow enough for a CPU."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def small_sd15_unet_config(cross_attention_dim: int, layers_per_block: int,
                           block_out_channels: tuple[int, ...] = (32, 64, 64)) -> dict:
    """An SD1.5-shaped UNet (cross-attention in the two outer levels) on 8x8 latents."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )


def sd15_pipeline(vae, text_encoder, tokenizer, unet, scheduler, device, dtype):
    """A StableDiffusionPipeline from components, on `device` in `dtype`, without a progress bar."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
