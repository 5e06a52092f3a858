"""SD1.5 multi-frame layer model: LayerDiffuse's attention-sharing units for diffusers UNets.

The official SD1.5 layer files (``layer_sd15_transparent_attn``, ``layer_sd15_joint``,
``layer_sd15_fg2bg``, ``layer_sd15_bg2fg``) hold the state dict of an ``AttentionSharingPatcher``:
one ``AttentionSharingUnit`` per ``attn1``/``attn2`` of every transformer block (keys
``hookers.layers.<u>.*``) and, for the control files, the control image encoder
(``kwargs_encoder.*``).  Layout and maths: ``docs/formats.md`` (SD1.5 layer files); the parity
tests in ``tests/test_attention_sharing.py`` pin the numbers.

How it is used::

    patcher = load_attention_sharing(unet, "layer_sd15_joint.safetensors", frames=3,
                                     use_control=False)
    patcher.install()                      # sets the units as attention processors
    patcher.set_cond_mark(mark)            # per batch row: 0 = cond, 1 = uncond
    ...  unet(latents, t, encoder_hidden_states=repeat_frames(embeds, 3))  ...
    patcher.remove()                       # the UNet is exactly as before

The batch is laid out frame-fastest, ``(b f)``: row ``g*F + f`` holds group ``g`` and frame ``f``.

This module imports torch and diffusers at module level; import it lazily.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from layerctl.core.frames import FILE_SPECS
from layerctl.errors import LayerctlError

__all__ = [
    "FILE_SPECS",
    "CONTROL_CHANNELS",
    "ControlEncoder",
    "LoRAPair",
    "AttentionSharingUnit",
    "AttentionSharingProcessor",
    "AttentionSharingPatcher",
    "attention_sharing_targets",
    "check_state_dict_layout",
    "detect_attention_sharing_file",
    "load_attention_sharing",
    "make_cond_mark",
    "repeat_frames",
]

CONTROL_CHANNELS = 256  # channels of every control-encoder output (official; narrower for small models)
TEMPORAL_LN_EPS = 1e-6  # official LayerNorm eps (pinned by the attn1_f1_small fixture)


# --------------------------------------------------------------------------- helpers


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention on ``[B, T, heads*d]`` tensors, split into ``heads`` heads (scale d^-0.5)."""
    b, tq, c = q.shape
    d = c // heads
    q = q.view(b, tq, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return o.transpose(1, 2).reshape(b, tq, heads * d)


def repeat_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Repeat every batch row ``frames`` times, frame-fastest: ``[b, ...] -> [(b f), ...]``.

    Use it for the text embeddings (and any per-group tensor) fed to a patched UNet.
    """
    return x.repeat_interleave(frames, dim=0)


def make_cond_mark(groups: Sequence[bool], frames: int) -> torch.Tensor:
    """``cond_mark`` for a batch of groups, each group repeated over ``frames`` frames.

    ``groups[g]`` is True for an unconditional (negative prompt) group.  For diffusers'
    ``cat([negative, positive])`` CFG batch with n groups each: ``make_cond_mark([True]*n + [False]*n, F)``.
    Returns a float32 tensor: 1.0 for uncond rows, 0.0 for cond rows.
    """
    return torch.tensor([1.0 if u else 0.0 for u in groups], dtype=torch.float32).repeat_interleave(frames)


# --------------------------------------------------------------------------- control encoder


def _conv_silu_stack(specs: Sequence[tuple[int, int, int]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout, stride in specs:
        layers.append(nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1))
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ControlEncoder(nn.Module):
    """The official control encoder (``kwargs_encoder``): RGB image -> 256-channel maps at 1/8 .. 1/64.

    ``blocks_0``: eight 3x3 convs 3->32->32->64->64->128->128->256->256 (the 3rd, 5th and 7th with
    stride 2), each followed by SiLU.  ``blocks_1..3``: 3x3 stride-2 conv, SiLU, 3x3 conv, SiLU (256 ch).
    The output of every block is returned keyed by its token count ``h*w``.

    ``width`` (default the official 256) scales every layer (w/8, w/4, w/2, w): layerctl's own small
    models (the bundled toy) use a narrower encoder with the same key names.
    """

    def __init__(self, width: int = CONTROL_CHANNELS) -> None:
        super().__init__()
        c = int(width)
        if c < 8 or c % 8:
            raise LayerctlError(f"control encoder width must be a multiple of 8 (got {c})")
        self.width = c
        c8, c4, c2 = c // 8, c // 4, c // 2
        self.blocks_0 = _conv_silu_stack(
            [(3, c8, 1), (c8, c8, 1), (c8, c4, 2), (c4, c4, 1), (c4, c2, 2), (c2, c2, 1), (c2, c, 2), (c, c, 1)]
        )
        self.blocks_1 = _conv_silu_stack([(c, c, 2), (c, c, 1)])
        self.blocks_2 = _conv_silu_stack([(c, c, 2), (c, c, 1)])
        self.blocks_3 = _conv_silu_stack([(c, c, 2), (c, c, 1)])

    def encode(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Encode an image already scaled to [-1, 1] (the official ``__call__``)."""
        signals: dict[int, torch.Tensor] = {}
        for block in (self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3):
            x = block(x)
            signals[int(x.shape[2] * x.shape[3])] = x
        return signals

    def forward(self, image01: torch.Tensor) -> dict[int, torch.Tensor]:
        """``image01``: ``[1, 3, H, W]`` in [0, 1]; returns ``{token_count: [1, 256, h, w]}``."""
        return self.encode(image01 * 2 - 1)


# --------------------------------------------------------------------------- the unit


class LoRAPair(nn.Module):
    """One frame's low-rank delta of a projection: ``W + up @ down`` (no scale, no bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)  # a fresh pair adds nothing

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + up @ down`` in ``weight``'s dtype and device."""
        return weight + torch.mm(self.up.weight.to(weight), self.down.weight.to(weight))


_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def _check_supported_attention(attn: nn.Module, name: str) -> None:
    problems = []
    for attr in ("group_norm", "spatial_norm", "norm_q", "norm_k", "norm_cross"):
        if getattr(attn, attr, None):
            problems.append(attr)
    if getattr(attn, "residual_connection", False):
        problems.append("residual_connection")
    if float(getattr(attn, "rescale_output_factor", 1.0)) != 1.0:
        problems.append("rescale_output_factor")
    for attr in ("to_q", "to_k", "to_v", "to_out", "heads"):
        if not hasattr(attn, attr):
            problems.append(f"no {attr}")
    if problems:
        raise LayerctlError(
            f"attention module {name or '?'} is not SD1.5-shaped ({', '.join(problems)}); "
            "attention sharing supports plain diffusers Attention modules only"
        )


class AttentionSharingUnit(nn.Module):
    """LayerDiffuse's multi-frame unit wrapping one diffusers ``Attention`` (attn1 or attn2).

    Parameters (official names): ``{to_q,to_k,to_v,to_out}_lora.<f>.{down,up}.weight`` per frame,
    ``temporal_n`` (LayerNorm, eps 1e-6), ``temporal_{i,q,k,v,o}`` (Linear), and with ``use_control``
    ``control_convs.<f>.{0,2}`` (3x3 conv 256->256, SiLU, 1x1 conv 256->C).

    ``forward(h, context)`` returns exactly what the wrapped attention's processor must return
    (the block adds it to its residual).  Runtime state, shared by all units of a patcher and set
    through it: ``control_signals`` (dict token count -> [1,256,h,w]), ``cond_mark`` (float tensor per
    batch row, 0 = cond, 1 = uncond) and ``cond_overwrite`` (list per frame of optional [1,T,D]
    context tensors, used by attn2 for cond rows only).
    """

    def __init__(self, attn: nn.Module, frames: int, use_control: bool, rank: int = 256, name: str = "",
                 control_width: int = CONTROL_CHANNELS) -> None:
        super().__init__()
        if frames < 1:
            raise LayerctlError(f"frames must be >= 1, got {frames}")
        _check_supported_attention(attn, name)
        self._attn = [attn]  # kept out of the module tree: the wrapped weights are the UNet's
        self.name = name
        self.frames = int(frames)
        self.heads = int(attn.heads)
        self.use_control = bool(use_control)
        self.rank = int(rank)
        channels = attn.to_q.in_features
        self.channels = channels
        linears = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}
        for proj, lin in linears.items():
            pairs = nn.ModuleList(LoRAPair(lin.in_features, lin.out_features, rank) for _ in range(frames))
            setattr(self, f"{proj}_lora", pairs)
        self.temporal_i = nn.Linear(channels, channels)
        self.temporal_n = nn.LayerNorm(channels, eps=TEMPORAL_LN_EPS, elementwise_affine=True)
        self.temporal_q = nn.Linear(channels, channels)
        self.temporal_k = nn.Linear(channels, channels)
        self.temporal_v = nn.Linear(channels, channels)
        self.temporal_o = nn.Linear(channels, channels)
        # a fresh unit (not loaded) adds only the base attention: zero temporal output, zero LoRA up
        # and zero control output (layerctl's training starting point; loading overwrites all of it)
        nn.init.zeros_(self.temporal_o.weight)
        nn.init.zeros_(self.temporal_o.bias)
        if use_control:
            self.control_convs = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(control_width, control_width, kernel_size=3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(control_width, channels, kernel_size=1),
                )
                for _ in range(frames)
            )
            for conv in self.control_convs:
                nn.init.zeros_(conv[2].weight)
                nn.init.zeros_(conv[2].bias)
        else:
            self.control_convs = None
        self.control_signals: Optional[dict[int, torch.Tensor]] = None
        self.cond_mark: Optional[torch.Tensor] = None
        self.cond_overwrite: Optional[list[Optional[torch.Tensor]]] = None
        self._merged: dict[tuple[str, int], tuple[tuple, torch.Tensor]] = {}

    @property
    def attn(self) -> nn.Module:
        return self._attn[0]

    # ---- per-frame merged projection weights (cached; recomputed when any input tensor changes)

    def _linear(self, proj: str) -> nn.Linear:
        return self.attn.to_out[0] if proj == "to_out" else getattr(self.attn, proj)

    def merged_weight(self, proj: str, frame: int) -> torch.Tensor:
        """``W + up_f @ down_f`` for projection ``proj`` (to_q/to_k/to_v/to_out), in W's dtype."""
        weight = self._linear(proj).weight
        pair: LoRAPair = getattr(self, f"{proj}_lora")[frame]
        up, down = pair.up.weight, pair.down.weight
        if torch.is_grad_enabled() and (weight.requires_grad or up.requires_grad or down.requires_grad):
            return pair.merged(weight)  # training: no cache, keep the graph
        return self._cached((proj, frame), (weight, up, down), lambda: pair.merged(weight))

    def _cached(self, key, inputs, compute):
        """``compute()`` (under no_grad), cached under ``key`` until any input tensor changes
        (storage, in-place version, dtype, device or shape)."""
        stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in inputs)
        hit = self._merged.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.no_grad():
            value = compute()
        self._merged[key] = (stamp, value)
        return value

    def merge_weights(self) -> None:
        """Form every frame's merged weights now (done by ``install``)."""
        with torch.no_grad():
            for proj in _PROJECTIONS:
                for f in range(self.frames):
                    self.merged_weight(proj, f)

    def clear_merged(self) -> None:
        self._merged.clear()

    def _folded_temporal(self):
        """One-frame units: (W, b) of temporal_o . temporal_v . temporal_i, folded in float64 and cached
        (recomputed when a weight changes); (None, None) while these weights train."""
        lins = (self.temporal_i, self.temporal_v, self.temporal_o)
        tensors = [t for lin in lins for t in (lin.weight, lin.bias)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None, None

        def fold():  # float64 on the CPU (not every accelerator has it), then back
            wi, bi, wv, bv, wo, bo = (t.detach().to("cpu", torch.float64) for t in tensors)
            place = dict(device=self.temporal_i.weight.device, dtype=self.temporal_i.weight.dtype)
            return (wo @ wv @ wi).to(**place), (wo @ (wv @ bi + bv) + bo).to(**place)

        return self._cached(("temporal", 0), tensors, fold)

    # ---- the maths

    def _control_add(self, s: torch.Tensor) -> torch.Tensor:
        tokens = int(s.shape[2])
        if self.control_signals is None:
            raise LayerctlError("this layer model needs a control image: call set_control(image) first")
        signal = self.control_signals.get(tokens)
        if signal is None:
            have = sorted(self.control_signals)
            raise LayerctlError(
                f"control image does not match the latent size: no control signal with {tokens} tokens "
                f"(have {have}); the control image must be 8x the latent size"
            )
        outs = []
        for f in range(self.frames):
            conv = self.control_convs[f]
            w0, b0, w2, b2 = conv[0].weight, conv[0].bias, conv[2].weight, conv[2].bias
            sig = signal.to(device=w0.device, dtype=w0.dtype)
            c = F.conv2d(F.silu(F.conv2d(sig, w0, b0, padding=1)), w2, b2)
            outs.append(c.flatten(2).transpose(1, 2))  # b c h w -> b (h w) c
        return s + torch.stack(outs, dim=0).to(s)

    def _override_context(self, ctx: torch.Tensor, frame: int, mark: Optional[torch.Tensor]) -> torch.Tensor:
        ow_list = self.cond_overwrite
        if not ow_list or len(ow_list) <= frame or ow_list[frame] is None:
            return ctx
        if mark is None:
            raise LayerctlError("prompt overrides need a cond_mark: call set_cond_mark() first")
        ow = ow_list[frame].to(ctx)
        if ow.dim() == 2:
            ow = ow.unsqueeze(0)
        if ow.shape[-2:] != ctx.shape[-2:]:
            raise LayerctlError(
                f"prompt override for frame {frame} has shape {tuple(ow.shape)}, the prompt context has "
                f"{tuple(ctx.shape[-2:])} per row; encode both prompts to the same token count"
            )
        m = mark[:, None, None]
        return ow * (1.0 - m) + ctx * m

    def _linear_f(self, x: torch.Tensor, proj: str, frame: int) -> torch.Tensor:
        lin = self._linear(proj)
        return F.linear(x, self.merged_weight(proj, frame), lin.bias)

    def _temporal_linear(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, lin.weight.to(x), lin.bias.to(x))

    def forward(self, h: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        frames = self.frames
        bf, n, c = h.shape
        if bf % frames:
            raise LayerctlError(f"batch size {bf} is not a multiple of the layer model's {frames} frames")
        b = bf // frames
        s = h.reshape(b, frames, n, c).transpose(0, 1)  # (b f) n c -> f b n c
        if self.control_convs is not None:
            s = self._control_add(s)
        if context is not None:
            framed_ctx = context.reshape(b, frames, *context.shape[1:]).transpose(0, 1)
        else:
            framed_ctx = s
        mark = None
        if context is not None and self.cond_overwrite:
            if self.cond_mark is None:
                raise LayerctlError("prompt overrides need a cond_mark: call set_cond_mark() first")
            cm = torch.as_tensor(self.cond_mark).flatten()
            if cm.numel() != bf:
                raise LayerctlError(f"cond_mark has {cm.numel()} entries, the batch has {bf} rows")
            mark = cm.reshape(b, frames).transpose(0, 1).to(s)  # (b f) -> f b
        outs = []
        for f in range(frames):
            src = framed_ctx[f]
            if context is not None:
                src = self._override_context(src, f, None if mark is None else mark[f])
            q = self._linear_f(s[f], "to_q", f)
            k = self._linear_f(src, "to_k", f)
            v = self._linear_f(src, "to_v", f)
            o = _heads_attention(q, k, v, self.heads)
            o = self._linear_f(o, "to_out", f)
            o = self.attn.to_out[1](o) if len(self.attn.to_out) > 1 else o
            outs.append(o)
        s = s + torch.stack(outs, dim=0).to(s)
        big_s = s.transpose(0, 1).reshape(bf, n, c)  # f b n c -> (b f) n c

        ln = self.temporal_n
        x = F.layer_norm(big_s, ln.normalized_shape, ln.weight.to(big_s), ln.bias.to(big_s), ln.eps)
        if frames == 1:
            # attention over a single frame: the softmax weight is exactly 1, the output is v, so the
            # branch is temporal_o . temporal_v . temporal_i after the LayerNorm: one folded linear
            w, b_ = self._folded_temporal()
            if w is None:  # training: keep the three linears in the graph
                x = self._temporal_linear(self.temporal_i, x)
                x = self._temporal_linear(self.temporal_o, self._temporal_linear(self.temporal_v, x))
            else:
                x = F.linear(x, w.to(x), b_.to(x))
            return (big_s + x) - h
        x = self._temporal_linear(self.temporal_i, x)
        x = x.reshape(b, frames, n, c).transpose(1, 2).reshape(b * n, frames, c)  # (b f) n c -> (b n) f c
        q = self._temporal_linear(self.temporal_q, x)
        k = self._temporal_linear(self.temporal_k, x)
        v = self._temporal_linear(self.temporal_v, x)
        x = _heads_attention(q, k, v, self.heads)
        x = self._temporal_linear(self.temporal_o, x)
        x = x.reshape(b, n, frames, c).transpose(1, 2).reshape(bf, n, c)  # (b n) f c -> (b f) n c
        return (big_s + x) - h


class AttentionSharingProcessor:
    """diffusers attention processor that returns the unit's output (plain object, not a module,
    so installing it adds nothing to the UNet's state dict)."""

    def __init__(self, unit: AttentionSharingUnit) -> None:
        self.unit = unit

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        # attention masks and `value` are ignored, as in the official unit
        if hidden_states.dim() != 3:
            raise LayerctlError("attention sharing expects [batch, tokens, channels] hidden states")
        return self.unit(hidden_states, encoder_hidden_states)


# --------------------------------------------------------------------------- the patcher


def attention_sharing_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(diffusers name, Attention)`` of every unit, in the official order.

    Official order: input blocks with attention (down_blocks), then output blocks (up_blocks),
    then the middle block; inside each transformer block attn1 then attn2.
    """
    targets: list[tuple[str, nn.Module]] = []

    def add(prefix: str, block: nn.Module) -> None:
        for j, transformer in enumerate(getattr(block, "attentions", None) or []):
            for k, tb in enumerate(getattr(transformer, "transformer_blocks", None) or []):
                for an in ("attn1", "attn2"):
                    attn = getattr(tb, an, None)
                    if attn is not None:
                        targets.append((f"{prefix}.attentions.{j}.transformer_blocks.{k}.{an}", attn))

    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        add(f"down_blocks.{i}", block)
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        add(f"up_blocks.{i}", block)
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        add("mid_block", mid)
    return targets


class _HookerLayers(nn.Module):
    def __init__(self, units: Sequence[AttentionSharingUnit]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(units)


class AttentionSharingPatcher(nn.Module):
    """All units of a UNet plus (with ``use_control``) the control encoder.

    ``state_dict()`` keys are exactly those of the official files: ``hookers.layers.<u>.*`` and
    ``kwargs_encoder.*``.  The UNet is not part of the module tree.
    """

    def __init__(self, unet: nn.Module, frames: int, use_control: bool, rank: int = 256,
                 control_width: int = CONTROL_CHANNELS) -> None:
        super().__init__()
        targets = attention_sharing_targets(unet)
        if not targets:
            raise LayerctlError("this UNet has no transformer blocks to attach attention sharing to")
        self._unet = [unet]
        self.frames = int(frames)
        self.use_control = bool(use_control)
        self.rank = int(rank)
        self.unit_names = [name for name, _ in targets]
        self.hookers = _HookerLayers(
            [AttentionSharingUnit(attn, frames, use_control, rank, name=name, control_width=control_width)
             for name, attn in targets]
        )
        self.kwargs_encoder = ControlEncoder(control_width) if use_control else None
        self._originals: Optional[list] = None
        self._hook = None
        self._control_size: Optional[tuple[int, int]] = None

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    @property
    def units(self) -> list[AttentionSharingUnit]:
        return list(self.hookers.layers)

    @property
    def installed(self) -> bool:
        return self._originals is not None

    def install(self) -> "AttentionSharingPatcher":
        """Set every unit as its attention's processor (originals kept); merges the LoRA weights."""
        if self._originals is not None:
            return self
        self._originals = [unit.attn.processor for unit in self.units]
        for unit in self.units:
            unit.attn.set_processor(AttentionSharingProcessor(unit))
        if self.use_control:
            self._hook = self.unet.register_forward_pre_hook(self._check_control_size, with_kwargs=True)
        for unit in self.units:
            unit.merge_weights()
        return self

    def _check_control_size(self, module, args, kwargs):
        # signals are looked up by token count, which cannot tell a 2x too large control image
        # from the right one; compare the sizes once per UNet call instead
        sample = args[0] if args else kwargs.get("sample")
        if self._control_size is None or not torch.is_tensor(sample) or sample.dim() != 4:
            return None
        want = (int(sample.shape[-2]) * 8, int(sample.shape[-1]) * 8)
        if want != self._control_size:
            raise LayerctlError(
                f"control image is {self._control_size[1]}x{self._control_size[0]} but the latent is "
                f"{sample.shape[-1]}x{sample.shape[-2]}: the control image must be 8x the latent size "
                f"({want[1]}x{want[0]})"
            )
        return None

    def remove(self) -> None:
        """Restore the original processors; the UNet is exactly as before ``install``."""
        if self._originals is None:
            return
        for unit, original in zip(self.units, self._originals):
            unit.attn.set_processor(original)
            unit.clear_merged()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._originals = None

    @contextlib.contextmanager
    def installed_in(self) -> Iterator["AttentionSharingPatcher"]:
        """``with patcher.installed_in(): ...`` installs, then removes even on error."""
        was = self.installed
        self.install()
        try:
            yield self
        finally:
            if not was:
                self.remove()

    def set_control(self, image01) -> None:
        """Encode the known layer image (``[1,3,H,W]`` or ``[3,H,W]`` in [0,1]) for every unit;
        ``None`` clears it.  The encoder runs in float32 where it lives (CPU after
        ``load_attention_sharing``, as in the official code); signals are cast when used."""
        if image01 is None:
            for unit in self.units:
                unit.control_signals = None
            self._control_size = None
            return
        if self.kwargs_encoder is None:
            raise LayerctlError("this layer model takes no control image (use_control is False)")
        img = torch.as_tensor(image01)
        if img.dim() == 3:
            img = img.unsqueeze(0)
        if img.dim() != 4 or img.shape[0] != 1 or img.shape[1] != 3:
            raise LayerctlError(f"control image must be [1,3,H,W] RGB in [0,1], got {tuple(img.shape)}")
        if img.shape[2] % 64 or img.shape[3] % 64:
            raise LayerctlError(f"control image size {img.shape[3]}x{img.shape[2]} must be a multiple of 64")
        p = next(self.kwargs_encoder.parameters())
        with torch.no_grad():
            signals = self.kwargs_encoder(img.to(device=p.device, dtype=torch.float32))
        for unit in self.units:
            unit.control_signals = signals
        self._control_size = (int(img.shape[2]), int(img.shape[3]))

    def set_cond_mark(self, cond_mark) -> None:
        """Per batch row: 0 = cond (positive prompt), 1 = uncond.  ``None`` clears it."""
        mark = None if cond_mark is None else torch.as_tensor(cond_mark, dtype=torch.float32).flatten()
        for unit in self.units:
            unit.cond_mark = mark

    def set_prompt_overrides(self, overrides: Optional[Sequence[Optional[torch.Tensor]]]) -> None:
        """Per frame, an optional ``[1, T, D]`` prompt embedding that replaces the context of the
        cond rows of that frame in every attn2 (Forge's per-layer "additional prompt")."""
        ow = None if overrides is None else list(overrides)
        for unit in self.units:
            unit.cond_overwrite = ow

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load: any missing, unexpected or mis-shaped key raises ``LayerctlError``.
        Tensors are assigned (not copied), so this works for meta tensors too."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state_dict.items()}
        check_state_dict_layout(expected, got, source)
        self.load_state_dict(dict(state_dict), strict=True, assign=True)
        for unit in self.units:
            unit.clear_merged()


def check_state_dict_layout(
    expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]], source: str
) -> None:
    """Raise ``LayerctlError`` naming the first missing, mis-shaped or unexpected key."""
    problems = []
    for key, shape in expected.items():
        if key not in got:
            problems.append(f"missing key {key!r}")
        elif tuple(got[key]) != tuple(shape):
            problems.append(f"key {key!r} has shape {list(got[key])}, expected {list(shape)}")
    for key in sorted(got):
        if key not in expected:
            problems.append(f"unexpected key {key!r}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise LayerctlError(f"{source} does not fit this attention-sharing model: {problems[0]}{more}")


_LORA_KEY = re.compile(r"^hookers\.layers\.\d+\.to_(?:q|k|v|out)_lora\.(\d+)\.")


def detect_attention_sharing_file(keys) -> tuple[int, bool]:
    """``(frames, use_control)`` of an attention-sharing state dict, from its key names."""
    keys = list(keys)
    frame_ids = [int(m.group(1)) for m in map(_LORA_KEY.match, keys) if m]
    if not frame_ids:
        raise LayerctlError("not an SD1.5 attention-sharing layer file (no hookers.layers.*_lora keys)")
    use_control = any(k.startswith("kwargs_encoder.") for k in keys)
    return max(frame_ids) + 1, use_control


def _unet_device_dtype(unet: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(unet.parameters())
    return p.device, p.dtype


def load_attention_sharing(
    unet: nn.Module,
    path,
    frames: Optional[int] = None,
    use_control: Optional[bool] = None,
    device=None,
    dtype: Optional[torch.dtype] = None,
    rank: Optional[int] = None,
) -> AttentionSharingPatcher:
    """Load an official SD1.5 layer file (strictly) into a new patcher for ``unet`` (not installed).

    ``frames``/``use_control``/``rank`` default to what the file holds.  Units go to ``device``/``dtype``
    (default: the UNet's); the control encoder stays float32 on the CPU like the official code.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LayerctlError(f"layer file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
            try:
                file_frames, file_control = detect_attention_sharing_file(keys)
            except LayerctlError as exc:
                raise LayerctlError(f"{path}: {exc}") from None
            frames = file_frames if frames is None else int(frames)
            use_control = file_control if use_control is None else bool(use_control)
            if rank is None:
                rank = int(shapes.get("hookers.layers.0.to_q_lora.0.down.weight", (256,))[0])
            # official files: 256; layerctl's small models may have a narrower control encoder
            width = int(shapes.get("kwargs_encoder.blocks_1.0.weight", (CONTROL_CHANNELS,))[0])
            with torch.device("meta"):
                patcher = AttentionSharingPatcher(unet, frames, use_control, rank, control_width=width)
            expected = {k: tuple(v.shape) for k, v in patcher.state_dict().items()}
            check_state_dict_layout(expected, shapes, path)
            state = {k: fh.get_tensor(k) for k in keys}
    except LayerctlError:
        raise
    except Exception as exc:  # SafetensorError, OSError, truncated/corrupt header, ...
        raise LayerctlError(f"cannot read layer file {path}: {exc}") from None
    unet_device, unet_dtype = _unet_device_dtype(unet)
    if unet_device.type == "meta":
        unet_device = torch.device("cpu")
    device = torch.device(device) if device is not None else unet_device
    dtype = dtype or unet_dtype
    for k, v in state.items():
        if k.startswith("kwargs_encoder."):
            state[k] = v.to(device="cpu", dtype=torch.float32)
        else:
            state[k] = v.to(device=device, dtype=dtype)
    patcher.load_official_state_dict(state, path)
    return patcher
