"""The bundled toy model family: an SD1.5-shaped model at toy scale, trained by layerctl.

64x64 images of a small world (layerctl.training.scenes): ten objects, a dozen
colours, three materials (solid, glass, smoke), five backgrounds. Everything is
trained from scratch on a CPU by the recipes in recipes/toy/ and shipped in the
package (layerctl/toy_weights/, fp16 safetensors), so it loads offline:

- vae.safetensors: AutoencoderKL, 8x down, 4 latent channels;
- text_encoder.safetensors: a small CLIPTextModel over a word-level tokenizer
  built from the toy vocabulary (tokenizers WordLevel, no files);
- unet.safetensors: UNet2DConditionModel (cross-attention, 8x8 latents);
- transparent_encoder / transparent_decoder.safetensors: the latent
  transparency nets (train-vae), in the official layout.

Prompts outside the vocabulary still generate; a one-line warning lists a few
known words.
"""

from __future__ import annotations

import json
from pathlib import Path

from layerctl.backends.small import sd15_pipeline, small_sd15_unet_config, small_vae_config
from layerctl.backends.base import Backend, SD15Model, default_scheduler
from layerctl.errors import LayerctlError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "layerctl" / "toy_weights"
try:  # installed wheel: backends/ is layerctl.backends, the weights sit next to it
    import layerctl as _lc

    WEIGHTS_DIR = Path(_lc.__file__).resolve().parent / "toy_weights"
except Exception:  # noqa: BLE001  # pragma: no cover
    pass

NOTE = "toy model: a {size}x{size} toy world trained by layerctl (objects, colours, glass/smoke, 5 backgrounds)"
MAX_TOKENS = 16
SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
FILES = {
    "vae": "vae.safetensors",
    "text_encoder": "text_encoder.safetensors",
    "unet": "unet.safetensors",
    "encoder": "transparent_encoder.safetensors",
    "decoder": "transparent_decoder.safetensors",
}
# role -> file for layer weights (present only once trained)
LAYER_FILES = {"rgba": "rgba.safetensors", "joint": "joint.safetensors", "fg2bg": "fg2bg.safetensors", "bg2fg": "bg2fg.safetensors"}


def toy_vocab() -> dict[str, int]:
    from layerctl.training.scenes import vocabulary

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in vocabulary():
        vocab[w] = len(vocab)
    return vocab


def toy_tokenizer():
    """Word-level tokenizer over the toy vocabulary (lower-cased, punctuation dropped, unknown -> <unk>)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = toy_vocab()
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("removed")])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_TOKENS,
    )


def unknown_words(prompt: str) -> list[str]:
    from layerctl.training.scenes import words_of

    vocab = toy_vocab()
    out = []
    for w in words_of(prompt):
        if w not in vocab and w not in out:
            out.append(w)
    return out


def toy_vae_config() -> dict:
    return small_vae_config(scaling_factor=1.0)


def toy_text_config() -> dict:
    return dict(
        vocab_size=len(toy_vocab()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


UNET_CHANNELS = (32, 64, 64)  # the first shipped UNet's width; a file names its own in its metadata


def toy_unet_config(channels: tuple[int, ...] = UNET_CHANNELS) -> dict:
    return small_sd15_unet_config(cross_attention_dim=64, layers_per_block=1, block_out_channels=channels)


IMAGE_SIZE = 64  # the toy world's picture size the shipped files are trained at; a VAE file names its own


def _file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def unet_channels(path: Path) -> tuple[int, ...]:
    """The UNet width a toy weight file was trained at: its `block_out_channels` metadata ("64,128,128"),
    or the first shipped width for files written before the width was recorded."""
    text = _file_metadata(path).get("block_out_channels", "")
    return parse_channels(text, f"toy weights {path.name}: block_out_channels in its metadata") if text else UNET_CHANNELS


def is_image_size(size: int) -> bool:
    """A toy world size: a multiple of 64 (what the transparent decoder and `gen --width` take)."""
    return size >= 64 and size % 64 == 0


def image_size(path: Path) -> int:
    """The toy world's picture size a VAE file was trained at (its `image_size` metadata, e.g. 128 for
    16x16 latents), or 64 for files written before the size was recorded: every stage trained on top of
    that VAE (UNet, transparency VAE, LoRAs) and `gen`'s default size follow it."""
    text = _file_metadata(path).get("image_size", "")
    if not text:
        return IMAGE_SIZE
    if not text.isdigit() or not is_image_size(int(text)):
        raise LayerctlError(f"toy weights {path.name}: image_size {text!r} in its metadata is not a multiple of 64")
    return int(text)


def parse_channels(text: str, what: str) -> tuple[int, ...]:
    """"64,128,128" -> (64, 128, 128); anything else is a one-line error naming `what`."""
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise LayerctlError(f"{what}: {text!r} is not a comma-separated list of integers") from None


def build_components(seed: int = 0, unet_width: tuple[int, ...] = UNET_CHANNELS, size: int = IMAGE_SIZE):
    """Fresh (random) toy VAE, text encoder, UNet: what the pre-training script starts from."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**toy_vae_config())
    text = CLIPTextModel(CLIPTextConfig(**toy_text_config()))
    unet = UNet2DConditionModel(**{**toy_unet_config(unet_width), "sample_size": size // 8})
    return vae, text, unet


def weight_path(key: str, folder: Path | None = None) -> Path:
    return Path(folder or WEIGHTS_DIR) / FILES.get(key, LAYER_FILES.get(key, key))


def _load_into(module, path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise LayerctlError(
            f"toy model weights missing: {path}. Reinstall layerctl, or rebuild them with the recipes in recipes/toy/"
        )
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise LayerctlError(f"toy weights {path.name} do not fit the toy model ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


class ToyModel(SD15Model):
    """SD15Model that warns (one line, once per prompt) about words outside the toy vocabulary."""

    def encode_prompt(self, prompts, negatives, cfg, width, height, clip_skip=1, min_chunks=1):
        from layerctl.core.prompts import split_break
        from layerctl.progress import log
        from layerctl.training.scenes import vocabulary

        warned = getattr(self, "_warned", None)
        if warned is None:
            warned = self._warned = set()
        bad = []
        for p in prompts:  # one notice per unknown word per model (a --joint run encodes 3 texts)
            bad += [w for w in unknown_words(" ".join(split_break(p))) if w not in warned and w not in bad]
        if bad:
            warned.update(bad)
            known = ", ".join(w for w in ("red", "glass", "cup", "ball", "star", "smoke", "puff", "table", "sky") if w in vocabulary())
            log(f"layerctl: toy model does not know {', '.join(repr(w) for w in bad[:4])} (it ignores them); "
                f"it knows words like: {known} (see docs/toy-model.md)", False)
        return super().encode_prompt(prompts, negatives, cfg, width, height, clip_skip, min_chunks)


def load_toy(device, dtype, folder: Path | None = None, with_unet: bool = True):
    """The toy pipeline from the shipped weights (or `folder`), the UNet as wide as its file says."""
    vae, text, unet = build_components(unet_width=unet_channels(weight_path("unet", folder)),
                                       size=image_size(weight_path("vae", folder)))
    meta = _load_into(vae, weight_path("vae", folder))
    vae.register_to_config(scaling_factor=float(meta.get("scaling_factor", 1.0)))
    _load_into(text, weight_path("text_encoder", folder))
    if with_unet:
        _load_into(unet, weight_path("unet", folder))
    pipe = sd15_pipeline(vae.eval(), text.eval(), toy_tokenizer(), unet.eval(), default_scheduler(), device, dtype)
    return pipe


class ToyBackend(Backend):
    name = "toy"
    family = "sd15"
    description = "bundled toy model: 64x64 toy world trained by layerctl, shipped in the package (CPU, seconds)"

    def accepts(self, ref):
        return ref == self.name

    def load(self, ref, device, dtype, attention="auto"):
        folder = None if ref in ("toy", "", None) else Path(ref)
        pipe = load_toy(device, dtype, folder)
        size = int(pipe.unet.config.sample_size) * 8  # the VAE file's image_size
        base = Path(folder or WEIGHTS_DIR).resolve()  # absolute: the official-file lookup reads relative names as released names
        official = {role: str(base / name) for role, name in {**{k: FILES[k] for k in ("encoder", "decoder")}, **LAYER_FILES}.items()
                    if (base / name).is_file()}
        modes = tuple(m for m in ("rgba", "joint", "fg2bg", "bg2fg") if m in official) or ("rgba",)
        return ToyModel(
            backend=self.name,
            family="sd15",
            ref=self.name if folder is None else str(folder),
            pipe=pipe,
            device=device,
            dtype=dtype,
            vae_dtype=dtype,
            latent_scale=float(pipe.vae.config.scaling_factor),
            native_size=size,
            default_steps=20,
            default_cfg=3.0,
            refine_strength=0.2,  # trained at one size only: at twice that a stronger refine redraws the shape
            official=official,
            modes=modes,
            notes=NOTE.format(size=size),
            tiny=False,
        )


def info() -> dict:
    """Sizes of the shipped weight files (for docs and `layerctl info`)."""
    files = {p.name: p.stat().st_size for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}
    meta = WEIGHTS_DIR / "training.json"
    return {"dir": str(WEIGHTS_DIR), "files": files, "total_bytes": sum(files.values()),
            "training": json.loads(meta.read_text()) if meta.is_file() else None}
