"""The FLUX.1 variant of the LayerDiffuse transparent VAE, and its weight files.

The nets are layerctl's own (`layerctl.models.transparent_vae`) built with 16 latent
channels; what differs from the SD1.5/SDXL conventions (docs/flux.md has the table,
`../shared/reference/layerdiffuse-flux/` the official numbers):

- encoder input  cat[padded RGB, alpha] (alpha LAST), padded RGB from straight RGBA
  floats in [0,1]; offset = 300 * E(x) replaces the posterior noise as for SD, then the
  latent is scaled and shifted: scaling_factor * (mean + std * offset - shift_factor);
- decoder input  the frozen VAE's decode * 0.5 + 0.5, NOT clipped, and the raw
  (unscaled, un-shifted) latent = latent / scaling_factor + shift_factor;
- decoder output [R, G, B, A] (the official demo saves the 4 channels as they come);
  the 8-way TTA is the SD one (each pass clipped, lower median);
- weights        one torch pickle `TransparentVAE.pth` with `encoder.*` and `decoder.*`
  keys (and possibly `sd_vae.*`, ignored), read with torch.load(weights_only=True)
  only; a `.safetensors` with the same keys is accepted too, and so is a single net
  saved by layerctl (unprefixed keys, `.safetensors`).
"""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from layerctl.errors import LayerctlError
from layerctl.core.flux_facts import FLUX_LATENT_CHANNELS, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR
from layerctl.models.transparent_vae import (
    OFFSET_SCALE,
    TransparentDecoder,
    TransparentEncoder,
    decode_tta,
    decoder_channels_from_state,
    new_decoder,
    new_encoder,
)

PARTS = ("encoder", "decoder")
IGNORED_PREFIX = "sd_vae."  # the FLUX VAE the official module also holds
# the tensors whose shape tells 4 latent channels (SD1.5/SDXL) from 16 (FLUX.1)
LATENT_KEYS = {"encoder": ("blocks.16.weight", "blocks.16.bias"), "decoder": ("latent_conv_in.weight",)}
LATENT_AXIS = {"encoder": 0, "decoder": 1}  # the latent width is dim 0 of the encoder's output conv, dim 1 of latent_conv_in
WHAT = {"encoder": "transparent encoder", "decoder": "transparent decoder"}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX.1"}


# ---------------------------------------------------------------- nets


def flux_encoder(**kwargs) -> TransparentEncoder:
    """An (uninitialised-by-seed) FLUX-layout offset encoder: 4 -> 16 channels."""
    return TransparentEncoder(latent_channels=FLUX_LATENT_CHANNELS, **kwargs)


def flux_decoder(**kwargs) -> TransparentDecoder:
    """A FLUX-layout transparent decoder: latent_conv_in 16 -> 64 (official widths by default)."""
    return TransparentDecoder(latent_channels=FLUX_LATENT_CHANNELS, **kwargs)


def new_flux_encoder(seed: int = 0, **kwargs) -> TransparentEncoder:
    """A fresh FLUX-layout encoder (last conv zero: offset 0), the same for the same seed."""
    return new_encoder(seed, latent_channels=FLUX_LATENT_CHANNELS, **kwargs)


def new_flux_decoder(seed: int = 0, **kwargs) -> TransparentDecoder:
    """A fresh FLUX-layout decoder (latent_conv_in zero), the same for the same seed."""
    return new_decoder(seed, latent_channels=FLUX_LATENT_CHANNELS, **kwargs)


def tiny_flux_decoder() -> TransparentDecoder:
    """A narrow FLUX-layout decoder with seeded random weights (the tiny-flux stand-in)."""
    from layerctl.models.weights import _seeded_

    dec = new_flux_decoder(seed=17, block_out_channels=(8, 8, 16, 16, 32, 32, 32))
    _seeded_(dec, 17)
    return dec.eval()


def tiny_flux_encoder() -> TransparentEncoder:
    from layerctl.models.weights import _seeded_

    enc = new_flux_encoder(seed=18)
    _seeded_(enc, 18)
    return enc.eval()


# ---------------------------------------------------------------- latent scale and shift


def scale_latent(raw: torch.Tensor, scaling_factor: float = FLUX_VAE_SCALING_FACTOR,
                 shift_factor: float = FLUX_VAE_SHIFT_FACTOR) -> torch.Tensor:
    """VAE-space latent -> the latent the transformer works on: scaling * (raw - shift)."""
    return scaling_factor * (raw - shift_factor)


def unscale_latent(latent: torch.Tensor, scaling_factor: float = FLUX_VAE_SCALING_FACTOR,
                   shift_factor: float = FLUX_VAE_SHIFT_FACTOR) -> torch.Tensor:
    """The transformer's latent -> VAE space (what the VAE and the transparent decoder take):
    latent / scaling + shift (the official pipeline's order of operations)."""
    return latent / scaling_factor + shift_factor


# ---------------------------------------------------------------- encoding


def _check_rgba(rgba01: torch.Tensor) -> None:
    if rgba01.ndim != 4 or rgba01.shape[1] != 4:
        raise ValueError(f"expected a [B,4,H,W] RGBA tensor, got shape {tuple(rgba01.shape)}")


def encoder_feed(rgba01: torch.Tensor) -> torch.Tensor:
    """Straight RGBA [B,4,H,W] in [0,1] -> the FLUX encoder's input cat[padded RGB, alpha]."""
    from layerctl.core.imagemath import pad_rgb_torch

    _check_rgba(rgba01)
    x = rgba01.detach().float()
    return torch.cat([pad_rgb_torch(x), x[:, 3:4]], dim=1)


def encode_offset(encoder: nn.Module, rgba01: torch.Tensor, scale: float = OFFSET_SCALE) -> torch.Tensor:
    """RGBA [B,4,H,W] in [0,1] -> latent offset [B,16,H/8,W/8] = 300 * E(cat[padded RGB, alpha])."""
    p = next(encoder.parameters())
    feed = encoder_feed(rgba01).to(device=p.device, dtype=p.dtype)
    # channels_last as for the SD encoder: closest to the official CPU numbers (3e-8 vs 9e-8 on `raw`)
    return encoder(feed.contiguous(memory_format=torch.channels_last)) * scale


def vae_input(rgba01: torch.Tensor) -> torch.Tensor:
    """What the frozen FLUX VAE encodes: (2c - 1) * a from the straight (unpadded) colour."""
    return (rgba01[:, :3] * 2.0 - 1.0) * rgba01[:, 3:4]


def encode_latent(
    encoder: nn.Module,
    rgba01: torch.Tensor,
    vae_encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scaling_factor: float = FLUX_VAE_SCALING_FACTOR,
    shift_factor: float = FLUX_VAE_SHIFT_FACTOR,
) -> torch.Tensor:
    """Straight RGBA [B,4,H,W] in [0,1] -> the scaled and shifted transparent latent
    scaling * (mean + std * offset - shift), ready for the transformer (before packing).

    vae_encode(pixels in [-1,1]) -> (mean, std) of the frozen FLUX VAE's posterior
    (FluxModel.vae_encode does this).
    """
    _check_rgba(rgba01)
    mean, std = vae_encode(vae_input(rgba01.float()))
    offset = encode_offset(encoder, rgba01).to(device=mean.device, dtype=mean.dtype)
    return scale_latent(mean + std * offset, scaling_factor, shift_factor)


# ---------------------------------------------------------------- decoding


def decoder_pixels(vae_decoded: torch.Tensor) -> torch.Tensor:
    """The frozen VAE's output in [-1,1] -> the decoder's pixel input, * 0.5 + 0.5, NOT clipped."""
    return vae_decoded * 0.5 + 0.5


def decode_rgba(
    decoder: nn.Module,
    pixels: torch.Tensor,
    latent_raw: torch.Tensor,
    tta: bool = True,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Straight RGBA [B,4,H,W] in [0,1], channels R, G, B, A (float32).

    pixels: decoder_pixels(VAE decode), unclipped [B,3,H,W]; latent_raw: the VAE-space
    latent [B,16,H/8,W/8] (unscale_latent of the transformer's). With tta, the 8 official
    flip/rot90 passes and the lower median; without, one pass clipped to [0,1].
    """
    if latent_raw.ndim != 4 or latent_raw.shape[1] != FLUX_LATENT_CHANNELS:
        raise ValueError(f"expected a [B,{FLUX_LATENT_CHANNELS},h,w] FLUX latent, got shape {tuple(latent_raw.shape)}")
    return decode_tta(decoder, pixels, latent_raw, tta=tta, chunk=chunk)


def rgba_to_png_array(rgba: torch.Tensor, rounding: str = "round"):
    """[4,H,W] (or [1,4,H,W]) RGBA float tensor -> HxWx4 uint8 numpy array.

    rounding="round" (layerctl's choice, as for SD1.5/SDXL outputs): clamp to [0,1],
    x 255, round to nearest. rounding="truncate" reproduces the official FLUX demo bit
    for bit: clamp, x 255, truncating cast (which maps e.g. 0.999 to 254 and darkens
    every value by half a level on average).
    """
    import numpy as np

    if rgba.ndim == 4 and rgba.shape[0] == 1:
        rgba = rgba[0]
    if rgba.ndim != 3 or rgba.shape[0] != 4:
        raise ValueError(f"expected a [4,H,W] RGBA tensor, got shape {tuple(rgba.shape)}")
    arr = rgba.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0
    if rounding == "round":
        return np.round(arr).astype(np.uint8)
    if rounding == "truncate":
        return arr.astype(np.uint8)
    raise ValueError(f"rounding must be 'round' or 'truncate', not {rounding!r}")


# ---------------------------------------------------------------- weight files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_reason(exc: BaseException) -> str:
    """The useful part of torch's weights_only refusal (not its advice to unpickle anyway)."""
    import re

    m = re.search(r"Unsupported [^.\n]*", str(exc))
    return m.group(0).strip() if m else "the weights-only unpickler refused it"


def read_state(path: str | os.PathLike, what: str = "FLUX TransparentVAE file") -> dict[str, torch.Tensor]:
    """A flat {key: tensor} dict from a `.safetensors` file, or from a torch pickle read with
    torch.load(weights_only=True) only. Anything else is a LayerctlError naming the file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerctlError(f"{p}: no such file (expected a {what})")
    if not p.is_file():
        raise LayerctlError(f"{p} is not a file (expected a {what})")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise LayerctlError(f"{p} is not a readable .safetensors file ({_first_line(exc)})") from None
    with open(p, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # a torch zip archive / a legacy pickle
        raise LayerctlError(f"{p} is not a readable torch weights file (neither a .safetensors, a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for a user
            warnings.simplefilter("ignore")
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LayerctlError(
            f"{p}: torch.load(weights_only=True) refused it ({_weights_only_reason(exc)}): not a plain state dict "
            f"of tensors. layerctl never unpickles anything else; convert the file to .safetensors with a tool you trust"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise LayerctlError(f"{p} is not a readable torch weights file ({type(exc).__name__}: {_first_line(exc)})") from None
    if isinstance(state, dict) and set(state) == {"state_dict"} and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LayerctlError(f"{p} holds a {type(state).__name__}, not a state dict (expected a {what})")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LayerctlError(f"{p} is not a plain state dict: entry {key!r} holds a {type(value).__name__}")
    return state


def _meta_net(part: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return flux_encoder(**kwargs) if part == "encoder" else flux_decoder(**kwargs)


@functools.lru_cache(maxsize=1)
def _layout() -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((f"{part}.{key}", tuple(t.shape)) for part in PARTS for key, t in _meta_net(part).state_dict().items())


def expected_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official TransparentVAE.pth (without sd_vae.*): 18 encoder.* and 538 decoder.*."""
    return dict(_layout())


def _channels_hint(key: str, got: tuple, want: tuple) -> str:
    """Why a latent-facing tensor has the wrong width, when it is the 4-vs-16 channel mix-up."""
    bare = key.split(".", 1)[1] if key.split(".")[0] in PARTS else key
    for part, keys in LATENT_KEYS.items():
        if bare in keys:
            axis = LATENT_AXIS[part]
            if len(got) > axis and len(want) > axis and got[axis] == 4 and want[axis] == FLUX_LATENT_CHANNELS:
                return f" (an SD1.5/SDXL {WHAT[part]}: 4 latent channels; FLUX.1 needs {FLUX_LATENT_CHANNELS})"
            if len(got) > axis and len(want) > axis and got[axis] == FLUX_LATENT_CHANNELS and want[axis] == 4:
                return f" (a FLUX.1 {WHAT[part]}: {FLUX_LATENT_CHANNELS} latent channels; SD1.5/SDXL need 4)"
    return ""


def _check(expected: dict[str, tuple], got: dict[str, torch.Tensor], path, what: str, first: tuple = ()) -> None:
    """LayerctlError naming the first wrong-shaped, missing or unexpected key; the
    latent-facing keys in `first` are checked before the rest (the 4-vs-16 mix-up)."""
    order = [k for k in first if k in expected] + [k for k in expected if k not in first]
    for key in order:
        if key in got and tuple(got[key].shape) != tuple(expected[key]):
            shape, want = tuple(got[key].shape), tuple(expected[key])
            raise LayerctlError(
                f"{path} is not a {what}: {key} has shape {list(shape)}, expected {list(want)}"
                f"{_channels_hint(key, shape, want)}"
            )
    for key in order:
        if key not in got:
            raise LayerctlError(f"{path} is not a {what}: missing key {key}")
    for key in sorted(got):
        if key not in expected:
            raise LayerctlError(f"{path} is not a {what}: unexpected key {key}")


def _is_combined(state: dict) -> bool:
    return any(k.startswith(("encoder.", "decoder.", IGNORED_PREFIX)) for k in state)


def check_transparent_vae_state(state: dict[str, torch.Tensor], path="<state dict>") -> dict[str, dict[str, torch.Tensor]]:
    """Strictly check a TransparentVAE state dict (the official layout) and split it:
    {"encoder": {...}, "decoder": {...}} with the prefixes removed; sd_vae.* is ignored."""
    what = "FLUX.1 LayerDiffuse TransparentVAE file"
    kept = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIX)}
    first = tuple(f"{part}.{k}" for part in PARTS for k in LATENT_KEYS[part])
    _check(expected_layout(), kept, path, what, first)
    return {part: {k[len(part) + 1:]: v for k, v in kept.items() if k.startswith(part + ".")} for part in PARTS}


def _single_net_state(state: dict, part: str, path) -> tuple[dict, tuple[int, ...] | None]:
    """A file holding one unprefixed net (layerctl's own saves): its state and decoder widths."""
    what = f"FLUX.1 {WHAT[part]}"
    chans = decoder_channels_from_state(state) if part == "decoder" else None
    net = _meta_net(part, **({"block_out_channels": chans} if chans else {}))
    _check({k: tuple(t.shape) for k, t in net.state_dict().items()}, state, path, what, LATENT_KEYS[part])
    return state, chans


def _build(part: str, state: dict, chans, device, dtype) -> nn.Module:
    net = _meta_net(part, **({"block_out_channels": chans} if chans else {}))
    net.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_flux_net(path: str | os.PathLike, part: str, device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the FLUX.1 transparent `part` ("encoder" or "decoder") from TransparentVAE.pth,
    a .safetensors with the same keys, or a layerctl-saved single net; strict (see module doc)."""
    if part not in PARTS:
        raise ValueError(f"part must be 'encoder' or 'decoder', not {part!r}")
    state = read_state(path)
    if _is_combined(state):
        net_state, chans = check_transparent_vae_state(state, path)[part], None
    else:
        net_state, chans = _single_net_state(state, part, path)
    return _build(part, net_state, chans, device, dtype)


def load_flux_decoder(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> TransparentDecoder:
    """The FLUX.1 transparent decoder (16 latent channels) from `path`; eval mode, no grad."""
    return load_flux_net(path, "decoder", device, dtype)  # type: ignore[return-value]


def load_flux_encoder(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> TransparentEncoder:
    """The FLUX.1 offset encoder (16 latent channels) from `path`; eval mode, no grad."""
    return load_flux_net(path, "encoder", device, dtype)  # type: ignore[return-value]


def load_transparent_vae(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """(encoder, decoder) from one TransparentVAE file, read and checked once."""
    parts = check_transparent_vae_state(read_state(path), path)
    return tuple(_build(part, parts[part], None, device, dtype) for part in PARTS)


def load_transparent_net(path: str | os.PathLike, part: str, family: str, device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transparent encoder/decoder file for a model family: "flux" loads the 16-channel
    nets (above); "sd15"/"sdxl" the 4-channel ones through layerctl.models.transparent_vae, after
    refusing a FLUX file (TransparentVAE layout or 16 latent channels) with the tensor
    and both shapes named."""
    if family == "flux":
        return load_flux_net(path, part, device, dtype)
    from layerctl.models import transparent_vae as tv

    p = Path(path).expanduser()
    name = FAMILY_NAMES.get(family, family)
    if p.suffix != ".safetensors" or _looks_flux(p):
        state = read_state(p, f"{name} {WHAT[part]}")
        prefixed = _is_combined(state)
        for k in LATENT_KEYS[part]:
            key = f"{part}.{k}" if prefixed else k
            axis = LATENT_AXIS[part]
            got = tuple(state[key].shape) if key in state else ()
            if len(got) > axis and got[axis] != 4:
                want = got[:axis] + (4,) + got[axis + 1:]
                raise LayerctlError(
                    f"{p} is not an {name} {WHAT[part]}: {key} has shape {list(got)}, expected "
                    f"{list(want)}{_channels_hint(key, got, want)}"
                )
        if prefixed:
            raise LayerctlError(f"{p} is a combined TransparentVAE file (encoder.*/decoder.* keys), not an {name} {WHAT[part]}")
        if p.suffix != ".safetensors":
            raise LayerctlError(f"{p}: {name} transparent VAE files are .safetensors")
    loader = tv.load_encoder if part == "encoder" else tv.load_decoder
    return loader(p, device=device, dtype=dtype)


def _looks_flux(path: Path) -> bool:
    """Whether a .safetensors file has the TransparentVAE layout or latent tensors not 4 channels wide."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            if any(k.startswith(("encoder.", "decoder.", IGNORED_PREFIX)) for k in keys):
                return True
            for part, k in (("decoder", "latent_conv_in.weight"), ("encoder", "blocks.16.weight")):
                if k in keys:
                    shape = f.get_slice(k).get_shape()
                    if len(shape) > LATENT_AXIS[part] and shape[LATENT_AXIS[part]] != 4:
                        return True
    except Exception:  # noqa: BLE001 - unreadable: the SD loader names the problem
        return False
    return False
