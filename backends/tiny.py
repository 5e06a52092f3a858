"""Built-in tiny models for tests, CI and a first run without weights.

Small seeded random models built from configs: no files, CPU, seconds. Their
pictures are noise. `tiny` is SD1.5-shaped (one CLIP text encoder; the
attention-sharing layer modes), `tiny-xl` is SDXL-shaped (two text encoders,
pooled embeddings + time ids, transformer_layers_per_block > 1; the
concat-conditioned layer modes). Both VAEs downsample 8x to 4 latent channels,
so the official-layout transparent VAE nets plug in unchanged.
"""

from __future__ import annotations

from layerctl.backends.small import sd15_pipeline, small_sd15_unet_config, small_vae_config
from layerctl.backends.base import Backend, SD15Model, SDXLModel, default_scheduler

SEED = 20240301
NOTE = "tiny model: random weights, the pictures are noise (for tests and a first run)"


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer(max_length: int = 77):
    """A character-level CLIP tokenizer (no merges): every string tokenizes, nothing to download."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    return AutoencoderKL(**small_vae_config(0.18215))


def tiny_text_encoder(seed: int, hidden: int = 32, projection: int | None = None, layers: int = 2):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_unet_config(xl: bool = False) -> dict:
    if xl:
        return dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=64,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    return small_sd15_unet_config(cross_attention_dim=32, layers_per_block=2)


def tiny_unet(xl: bool = False):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED + 2)
    return UNet2DConditionModel(**tiny_unet_config(xl))


class TinyBackend(Backend):
    name = "tiny"
    family = "sd15"
    description = "tiny SD1.5-shaped random model (CPU, seconds; pictures are noise)"

    def accepts(self, ref):
        return ref == self.name

    def load(self, ref, device, dtype, attention="auto"):
        pipe = sd15_pipeline(
            tiny_vae(), tiny_text_encoder(SEED + 3), tiny_tokenizer(), tiny_unet(False), default_scheduler(), device, dtype
        )
        return SD15Model(
            backend=self.name,
            family="sd15",
            ref=self.name,
            pipe=pipe,
            device=device,
            dtype=dtype,
            vae_dtype=dtype,
            latent_scale=0.18215,
            native_size=64,
            default_steps=4,
            default_cfg=7.0,
            official={},
            modes=("rgba", "joint", "fg2bg", "bg2fg"),
            notes=NOTE,
            tiny=True,
        )


class TinyXLBackend(Backend):
    name = "tiny-xl"
    family = "sdxl"
    description = "tiny SDXL-shaped random model (CPU, seconds; pictures are noise)"

    def accepts(self, ref):
        return ref == self.name

    def load(self, ref, device, dtype, attention="auto"):
        from diffusers import StableDiffusionXLPipeline

        vae = tiny_vae()
        vae.register_to_config(scaling_factor=0.13025)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=tiny_text_encoder(SEED + 4),
            text_encoder_2=tiny_text_encoder(SEED + 5, projection=32),
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            unet=tiny_unet(True),
            scheduler=default_scheduler(),
            force_zeros_for_empty_prompt=True,
        )
        pipe.to(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return SDXLModel(
            backend=self.name,
            family="sdxl",
            ref=self.name,
            pipe=pipe,
            device=device,
            dtype=dtype,
            vae_dtype=dtype,
            latent_scale=0.13025,
            native_size=64,
            default_steps=4,
            default_cfg=7.0,
            official={},
            modes=("rgba", "fg2bg", "bg2fg"),
            notes=NOTE,
            tiny=True,
        )
