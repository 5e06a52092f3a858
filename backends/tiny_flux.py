"""`tiny-flux`: a small FLUX.1-shaped random model for tests, CI and a first run without weights.

Built from configs with fixed seeds: no files, no network, CPU, seconds. Its pictures
are noise. The real block types at toy widths: a FluxTransformer2DModel (double-stream
and single-stream blocks, rotary position ids, guidance embedding like FLUX.1-dev), a
CLIP text encoder (pooled) and a T5 encoder (sequence) with offline character-level
tokenizers, a 16-channel AutoencoderKL downsampling 8x with FLUX's scaling factor
0.3611 and shift 0.1159, and FLUX.1-dev's flow-matching scheduler config.
"""

from __future__ import annotations

from layerctl.backends.base import Backend
from layerctl.backends.flux import FluxModel, model_from_pipeline, place_pipeline
from layerctl.backends.tiny import tiny_text_encoder, tiny_tokenizer
from layerctl.core.flux_facts import FLUX_LATENT_CHANNELS, FLUX_SCHEDULER_CONFIGS, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR

SEED = 20240816
NOTE = "tiny-flux model: random weights, the pictures are noise (for tests and a first run)"
TEXT_DIM = 32  # CLIP hidden/pooled width and T5 d_model of the tiny encoders
MAX_SEQUENCE_LENGTH = 32  # T5 tokens per prompt (FLUX.1-dev: 512)


def _seeded(seed: int, build):
    """build() with the global torch RNG seeded, leaving the caller's RNG state untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_t5_tokenizer(max_length: int = MAX_SEQUENCE_LENGTH):
    """A character-level T5 tokenizer (Unigram over printable ASCII and Latin-1), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in list(range(33, 127)) + list(range(161, 256))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=max_length,
    )


def tiny_t5_encoder(vocab_size: int, seed: int = SEED + 4):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: T5EncoderModel(cfg).eval())


def tiny_flux_transformer_config(guidance_embeds: bool = True) -> dict:
    return dict(
        patch_size=1,
        in_channels=FLUX_LATENT_CHANNELS * 4,  # packed 2x2 patches
        num_layers=1,  # FluxTransformerBlock (double stream)
        num_single_layers=2,  # FluxSingleTransformerBlock
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,  # T5 width
        pooled_projection_dim=TEXT_DIM,  # CLIP pooled width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def tiny_flux_transformer(guidance_embeds: bool = True, seed: int = SEED + 2):
    from diffusers import FluxTransformer2DModel

    return _seeded(seed, lambda: FluxTransformer2DModel(**tiny_flux_transformer_config(guidance_embeds)).eval())


def tiny_flux_vae(seed: int = SEED + 1):
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=FLUX_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,  # the FLUX.1 VAE has neither
        use_post_quant_conv=False,
    ).eval())


def tiny_flux_scheduler(variant: str = "dev"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS[variant])


def tiny_flux_pipeline(guidance_embeds: bool = True):
    """A FluxPipeline of tiny seeded components (CPU, float32, progress bar off)."""
    from diffusers import FluxPipeline

    t5_tok = tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=tiny_flux_scheduler("dev" if guidance_embeds else "schnell"),
        vae=tiny_flux_vae(),
        text_encoder=_seeded(SEED + 3, lambda: tiny_text_encoder(SEED + 3, hidden=TEXT_DIM)),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(guidance_embeds),
    )


class TinyFluxBackend(Backend):
    name = "tiny-flux"
    family = "flux"
    description = "tiny FLUX.1-shaped random model (CPU, seconds; pictures are noise)"

    def accepts(self, ref):
        return ref == self.name

    def load(self, ref, device, dtype, attention="auto") -> FluxModel:
        pipe = place_pipeline(tiny_flux_pipeline(), device, dtype)
        return model_from_pipeline(
            pipe,
            backend=self.name,
            ref=self.name,
            device=device,
            dtype=dtype,
            native_size=64,
            default_steps=4,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            official={},  # the transparent nets are in-memory stand-ins (layerctl.models.flux_vae.tiny_flux_*)
            notes=NOTE,
            tiny=True,
        )
