"""LayerDiffuse latent transparency: the offset encoder E_a, the transparent decoder D_a,
8-way test-time-augmented decoding, and loading/saving in the official file layout.

State-dict names match the released `vae_transparent_{encoder,decoder}.safetensors`
(and the SD1.5 `layer_sd15_vae_transparent_*` files) key for key, so those files load
strictly. Conventions (see docs/architecture.md, 'The method', and docs/formats.md):

- encoder input  [B,4,H,W] = cat[alpha, padded RGB] in [0,1]; output [B,4,H/8,W/8];
  the latent offset is that output x 300 and replaces the posterior noise:
  latent = mean + std * offset (unscaled latent, i.e. before vae.config.scaling_factor);
- decoder input  the frozen VAE's decode in [0,1] (3 ch) and the same unscaled latent;
  output [B,4,H,W] in the order [alpha, R, G, B], straight colour (raw, unclipped);
- `decode_tta` runs 8 flip/rot90 augmentations and takes the per-pixel lower median.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from layerctl.errors import LayerctlError

OFFSET_SCALE = 300.0  # official `alpha`: offset = encoder(x) * 300
DECODER_BLOCK_OUT_CHANNELS = (32, 32, 64, 128, 256, 512, 512)
LATENT_LEVEL = 3  # the latent joins the hidden state before down_blocks[3] (1/8 resolution)
FIRST_ATTENTION_LEVEL = 4  # levels 4, 5, 6 of the official layout have self-attention

# (flip width axis, rot90 k) for the 8 official passes, in the official order
TTA_PASSES: tuple[tuple[bool, int], ...] = tuple((flip, rot) for flip in (False, True) for rot in range(4))


# ---------------------------------------------------------------- the nets


class TransparentEncoder(nn.Module):
    """E_a: cat[alpha, padded RGB] [B,4,H,W] -> raw offset [B,4,H/8,W/8].

    Nine 3x3 convs with SiLU between them (keys blocks.0, 2, ..., 16), three of stride 2.
    The last conv starts at zero, so a new encoder leaves the VAE latent unchanged.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 32, 64, 64, 128, 128, 256, 256),
        zero_init_output: bool = True,
        latent_channels: int = 4,
    ):
        super().__init__()
        if len(channels) != 8:
            raise ValueError("TransparentEncoder needs 8 hidden widths")
        layers: list[nn.Module] = []
        c_in = 4
        for i, c_out in enumerate(channels):
            stride = 2 if i in (2, 4, 6) else 1
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
            c_in = c_out
        last = nn.Conv2d(c_in, latent_channels, 3, padding=1)  # 4 (SD1.5/SDXL) or 16 (FLUX.1)
        if zero_init_output:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class TransparentDecoder(nn.Module):
    """D_a, the official "UNet1024": (pixels [B,3,H,W] in [0,1], latent [B,4,H/8,W/8]) ->
    raw [B,4,H,W] = [alpha, R, G, B].

    A diffusers-block UNet without time embedding: 7 levels (32, 32, 64, 128, 256, 512, 512
    channels), 2 resnets per down block and 3 per up block, self-attention (head dim 8) on
    the three coarsest levels and in the mid block, GroupNorm with 4 groups. The latent goes
    through a zero-initialised 1x1 conv and is added before down block 3. H and W must be
    multiples of 2**(levels-1) (64 for the official layout).

    `block_out_channels` may be narrowed for small test models (any widths divisible by
    `norm_num_groups` and `attention_head_dim`, at least 4 levels); the default is the
    official layout, whose state dict matches the released files.
    """

    def __init__(
        self,
        block_out_channels: Sequence[int] = DECODER_BLOCK_OUT_CHANNELS,
        layers_per_block: int = 2,
        norm_num_groups: int = 4,
        attention_head_dim: int = 8,
        in_channels: int = 3,
        out_channels: int = 4,
        latent_channels: int = 4,
        zero_init_latent: bool = True,
    ):
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import (
            AttnDownBlock2D,
            AttnUpBlock2D,
            DownBlock2D,
            UNetMidBlock2D,
            UpBlock2D,
        )

        chans = tuple(int(c) for c in block_out_channels)
        n = len(chans)
        if n <= LATENT_LEVEL:
            raise ValueError(f"TransparentDecoder needs at least {LATENT_LEVEL + 1} levels")
        self.block_out_channels = chans
        self.size_multiple = 2 ** (n - 1)
        common = dict(temb_channels=None, dropout=0.0, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=norm_num_groups)

        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(latent_channels, chans[LATENT_LEVEL - 1], 1)
        if zero_init_latent:
            nn.init.zeros_(self.latent_conv_in.weight)
            nn.init.zeros_(self.latent_conv_in.bias)

        self.down_blocks = nn.ModuleList()
        c_prev = chans[0]
        for i, c in enumerate(chans):
            last = i == n - 1
            if i >= FIRST_ATTENTION_LEVEL:
                block = AttnDownBlock2D(
                    in_channels=c_prev, out_channels=c, num_layers=layers_per_block,
                    attention_head_dim=attention_head_dim, downsample_padding=1,
                    downsample_type=None if last else "conv", **common,
                )
            else:
                block = DownBlock2D(
                    in_channels=c_prev, out_channels=c, num_layers=layers_per_block,
                    add_downsample=not last, downsample_padding=1, **common,
                )
            self.down_blocks.append(block)
            c_prev = c

        self.mid_block = UNetMidBlock2D(
            in_channels=chans[-1], attention_head_dim=attention_head_dim, output_scale_factor=1.0,
            resnet_time_scale_shift="default", add_attention=True, attn_groups=None, **common,
        )

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        c_prev = rev[0]
        for i, c in enumerate(rev):
            c_skip = rev[min(i + 1, n - 1)]
            last = i == n - 1
            level = n - 1 - i
            if level >= FIRST_ATTENTION_LEVEL:
                block = AttnUpBlock2D(
                    in_channels=c_skip, prev_output_channel=c_prev, out_channels=c,
                    num_layers=layers_per_block + 1, attention_head_dim=attention_head_dim,
                    upsample_type=None if last else "conv", resolution_idx=i, **common,
                )
            else:
                block = UpBlock2D(
                    in_channels=c_skip, prev_output_channel=c_prev, out_channels=c,
                    num_layers=layers_per_block + 1, add_upsample=not last, resolution_idx=i, **common,
                )
            self.up_blocks.append(block)
            c_prev = c

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, chans[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"the transparent decoder needs H and W to be multiples of {m}, got {h}x{w}")
        added = self.latent_conv_in(latent)
        hidden = self.conv_in(pixels)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for i, block in enumerate(self.down_blocks):
            if i == LATENT_LEVEL:
                hidden = hidden + added
            hidden, res = block(hidden_states=hidden, temb=None)
            skips += res
        hidden = self.mid_block(hidden, None)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            hidden = block(hidden, res, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden)))


# ---------------------------------------------------------------- decoding


def default_tta_chunk(device: torch.device | str) -> int:
    """How many of the 8 TTA passes run as one batch: 1 on CPU (one batch of 8 measured 1.24x
    (512 px) and 1.26x (1024 px) slower than 8 single passes, with 7x the memory; bench/RESULTS.md),
    8 on a GPU."""
    return 1 if torch.device(device).type == "cpu" else 8


def use_channels_last(module: nn.Module) -> nn.Module:
    """Put the decoder's convolutions in channels-last memory format (in place; returns it).
    On CPU this measured 0.80-0.87x the decode time, outputs equal within 5e-5 (bench/decode.py);
    decode_tta then feeds it channels-last inputs."""
    return module.to(memory_format=torch.channels_last)


def _is_channels_last(module: nn.Module) -> bool:
    for p in module.parameters():
        if p.dim() == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _augment(x: torch.Tensor, flip: bool, rot: int) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, k=rot, dims=(2, 3))


def _unaugment(x: torch.Tensor, flip: bool, rot: int) -> torch.Tensor:
    x = torch.rot90(x, k=-rot, dims=(2, 3))
    if flip:
        x = torch.flip(x, dims=(3,))
    return x


def _module_place(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def decode_tta(
    decoder: nn.Module,
    pixels01: torch.Tensor,
    latent: torch.Tensor,
    tta: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """Decode [alpha, R, G, B] in [0,1], float32 [B,4,H,W].

    pixels01: the frozen VAE's decode in [0,1] [B,3,H,W]; latent: the unscaled latent
    [B,4,H/8,W/8]. With tta, runs the 8 official flip/rot90 passes (clipped, undone) and
    takes the per-pixel lower median (torch.median); `chunk` passes run per batch
    (default: default_tta_chunk(device)). Non-square inputs batch H x W and W x H passes
    separately.
    """
    device, dtype = _module_place(decoder)
    fmt = torch.channels_last if _is_channels_last(decoder) else torch.contiguous_format
    pixels01 = pixels01.to(device=device, dtype=dtype)
    latent = latent.to(device=device, dtype=dtype)
    if not tta:
        out = decoder(pixels01.contiguous(memory_format=fmt), latent.contiguous(memory_format=fmt))
        return out.clamp(0, 1).float().contiguous()
    chunk = max(1, int(chunk or default_tta_chunk(device)))
    square = pixels01.shape[-1] == pixels01.shape[-2]
    groups = [list(range(8))] if square else [[k for k in range(8) if TTA_PASSES[k][1] % 2 == r] for r in (0, 1)]
    batch = pixels01.shape[0]
    outputs: list[torch.Tensor | None] = [None] * 8
    for group in groups:
        for start in range(0, len(group), chunk):
            ks = group[start : start + chunk]
            feed_p = torch.cat([_augment(pixels01, *TTA_PASSES[k]) for k in ks]).contiguous(memory_format=fmt)
            feed_l = torch.cat([_augment(latent, *TTA_PASSES[k]) for k in ks]).contiguous(memory_format=fmt)
            out = decoder(feed_p, feed_l).clamp(0, 1)
            for j, k in enumerate(ks):
                outputs[k] = _unaugment(out[j * batch : (j + 1) * batch], *TTA_PASSES[k])
    stacked = torch.stack(outputs, dim=0)  # type: ignore[arg-type]
    return torch.median(stacked, dim=0).values.float().contiguous()


def decode_rgba(
    decoder: nn.Module,
    pixels01: torch.Tensor,
    latent: torch.Tensor,
    tta: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """Like decode_tta, reordered to [R, G, B, A] (straight alpha; what goes into a PNG)."""
    out = decode_tta(decoder, pixels01, latent, tta=tta, chunk=chunk)
    return torch.cat([out[:, 1:4], out[:, 0:1]], dim=1)


# ---------------------------------------------------------------- encoding


def encode_offset(encoder: nn.Module, rgba01: torch.Tensor, scale: float = OFFSET_SCALE) -> torch.Tensor:
    """RGBA [B,4,H,W] in [0,1] (straight) -> latent offset [B,4,H/8,W/8] = E_a(cat[a, pad_rgb]) * 300.

    Differentiable with respect to the encoder's weights (training uses it as is).
    """
    from layerctl.core.imagemath import pad_rgb_torch

    if rgba01.ndim != 4 or rgba01.shape[1] != 4:
        raise ValueError(f"expected a [B,4,H,W] RGBA tensor, got shape {tuple(rgba01.shape)}")
    device, dtype = _module_place(encoder)
    padded = pad_rgb_torch(rgba01.detach().float())
    feed = torch.cat([rgba01[:, 3:4].float(), padded], dim=1).to(device=device, dtype=dtype)
    # channels_last like the official code (it builds the feed from NHWC arrays); on CPU
    # this reproduces the reference encoder output bit for bit
    feed = feed.contiguous(memory_format=torch.channels_last)
    return encoder(feed) * scale


def vae_input(rgba01: torch.Tensor) -> torch.Tensor:
    """What the frozen VAE encodes: the premultiplied picture (2c - 1) * a in [-1, 1]."""
    return (rgba01[:, :3] * 2.0 - 1.0) * rgba01[:, 3:4]


def transparent_latent(
    encoder: nn.Module,
    rgba01: torch.Tensor,
    vae_encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """RGBA [B,4,H,W] in [0,1] -> unscaled transparent latent = mean + std * offset.

    vae_encode(pixels in [-1,1]) -> (mean, std) of the frozen VAE's posterior (e.g.
    `lambda x: (d.mean, d.std)` with `d = vae.encode(x).latent_dist`). Multiply the result
    by the VAE's scaling_factor before diffusion.
    """
    mean, std = vae_encode(vae_input(rgba01))
    offset = encode_offset(encoder, rgba01).to(device=mean.device, dtype=mean.dtype)
    return mean + std * offset


# ---------------------------------------------------------------- files


def _read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.exists():
        raise LayerctlError(f"{p}: no such file (expected a {what} .safetensors file)")
    if not p.is_file():
        raise LayerctlError(f"{p} is not a file (expected a {what} .safetensors file)")
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LayerctlError(f"{p} is not a readable .safetensors file ({detail})") from None


def _check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path, what: str) -> None:
    """Raise LayerctlError naming the first missing, mis-shaped or unexpected key."""
    for key, ref in expected.items():
        if key not in got:
            raise LayerctlError(f"{path} is not a {what}: missing key {key}")
        if tuple(got[key].shape) != tuple(ref.shape):
            raise LayerctlError(
                f"{path} is not a {what}: key {key} has shape {list(got[key].shape)}, expected {list(ref.shape)}"
            )
    for key in sorted(got):
        if key not in expected:
            raise LayerctlError(f"{path} is not a {what}: unexpected key {key}")


def _load(factory: Callable[[], nn.Module], path, what: str, device, dtype, state=None) -> nn.Module:
    if state is None:
        state = _read_safetensors(path, what)
    with torch.device("meta"):
        module = factory()
    _check_state(module.state_dict(), state, path, what)
    state = {k: v.to(dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_decoder(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TransparentDecoder:
    """Load an official-layout transparent decoder (vae_transparent_decoder.safetensors or
    layer_sd15_vae_transparent_decoder.safetensors), strictly; eval mode, no grad."""
    what = "LayerDiffuse transparent decoder"
    state = _read_safetensors(path, what)
    chans = decoder_channels_from_state(state)
    return _load(lambda: TransparentDecoder(block_out_channels=chans), path, what, device, dtype, state)  # type: ignore[return-value]


def decoder_channels_from_state(state) -> tuple[int, ...]:
    """The block widths a decoder state dict was saved with (narrow decoders, e.g. the toy model's);
    the official widths when they cannot be read off (strict loading then names what is wrong)."""
    chans = []
    while f"down_blocks.{len(chans)}.resnets.0.conv1.weight" in state:
        chans.append(int(state[f"down_blocks.{len(chans)}.resnets.0.conv1.weight"].shape[0]))
    if len(chans) <= LATENT_LEVEL or any(c % 8 for c in chans):
        return tuple(DECODER_BLOCK_OUT_CHANNELS)
    return tuple(chans)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TransparentEncoder:
    """Load an official-layout transparent encoder (vae_transparent_encoder.safetensors or
    layer_sd15_vae_transparent_encoder.safetensors), strictly; eval mode, no grad."""
    return _load(TransparentEncoder, path, "LayerDiffuse transparent encoder", device, dtype)  # type: ignore[return-value]


def save_module(module: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write the module's state dict as .safetensors (official layout, fp16 by default),
    atomically: a temporary file in the same folder, then os.replace."""
    from safetensors.torch import save_file

    from layerctl.io.files import atomic_write

    state = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in module.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp), overwrite=overwrite, suffix=".tmp")


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return factory()


def new_decoder(seed: int = 0, **kwargs) -> TransparentDecoder:
    """A freshly initialised decoder (latent_conv_in zero), the same for the same seed."""
    return _seeded(lambda: TransparentDecoder(**kwargs), seed)  # type: ignore[return-value]


def new_encoder(seed: int = 0, **kwargs) -> TransparentEncoder:
    """A freshly initialised encoder (last conv zero: offset 0), the same for the same seed."""
    return _seeded(lambda: TransparentEncoder(**kwargs), seed)  # type: ignore[return-value]


# ---------------------------------------------------------------- reference weights (tests)


def fixture_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The deterministic float32 weights of the reference fixtures, for `module`'s keys.

    Rule (fixtures/README.md): z = randn(shape) from a CPU generator seeded with
    crc32(key); norm weights 1 + 0.1 z, norm biases 0.1 z, other weights z / sqrt(fan_in),
    other biases 0.01 z. Useful for parity tests and for plausible non-zero test nets.
    """
    out = {}
    for key, ref in module.state_dict().items():
        shape = tuple(ref.shape)
        gen = torch.Generator("cpu").manual_seed(zlib.crc32(key.encode("utf-8")))
        z = torch.randn(shape, generator=gen, dtype=torch.float32)
        parent = key.split(".")[-2] if key.count(".") >= 1 else ""
        is_weight = key.endswith(".weight")
        if "norm" in parent:
            out[key] = 1.0 + 0.1 * z if is_weight else 0.1 * z
        elif is_weight:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[key] = z * (1.0 / math.sqrt(fan_in))
        else:
            out[key] = z * 0.01
    return out
