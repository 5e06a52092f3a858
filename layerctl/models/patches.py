"""LayerDiffuse UNet patch files: read, validate, merge into a diffusers UNet, restore, write.

File formats (see docs/formats.md):

* ``diffusion_model.<ldm key>::lora::0`` (up, ``[out, r]``) and ``::lora::1`` (down,
  ``[r, in]``): a low-rank delta, merged as ``W += strength * up @ down`` in fp32.
  An optional ``::lora::2`` scalar is an alpha (scale ``alpha / r``, Forge's rule);
  the official files have none, so their scale is 1.
* ``diffusion_model.<ldm key>::diff::0``: a full delta, ``W += strength * delta``.
  When the delta of ``conv_in`` has more input channels than the UNet's conv_in
  (the concat-conditioned SDXL files, 8 or 12 channels), the base weight is
  zero-padded on the input-channel axis first and the UNet gets a wider conv_in.
* plain diffusers names (``ld_diffusers_sdxl_*``): ``<diffusers key>`` is a full
  delta, ``W += strength * delta``.

The ldm -> diffusers key map is computed from the UNet's config (the UNet is
built on the meta device to enumerate its keys), so SD1.5, SDXL and small test
UNets of either shape all work.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from layerctl.errors import LayerctlError

LDM_PREFIX = "diffusion_model."
# First component of an ldm UNet key: used to recognise ldm names written without the prefix.
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_KINDS = ("lora", "diff")
_MAX_NAMED = 5  # how many offending keys an error message names

# ResBlock sub-layers: diffusers name -> ldm name.
_RESNET_D2L = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Top-level modules: diffusers prefix -> ldm prefix.
_TOP_D2L = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


# --------------------------------------------------------------------------- key map


def _plain_config(unet_or_config: Any) -> dict:
    """A JSON-able dict of a UNet's config (or of a config mapping), without private keys."""
    cfg = getattr(unet_or_config, "config", unet_or_config)
    if not isinstance(cfg, Mapping):
        raise LayerctlError(f"expected a UNet2DConditionModel or its config, got {type(unet_or_config).__name__}")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not str(k).startswith("_")}


@functools.lru_cache(maxsize=16)
def _meta_state_shapes(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from diffusers import UNet2DConditionModel

    cfg = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    return tuple((k, tuple(v.shape)) for k, v in unet.state_dict().items())


def unet_key_shapes(unet_or_config: Any) -> dict[str, tuple[int, ...]]:
    """Diffusers state-dict key -> shape: of the model itself, or of a meta-device build of a config."""
    if isinstance(unet_or_config, torch.nn.Module):
        return {k: tuple(v.shape) for k, v in unet_or_config.state_dict().items()}
    cfg = _plain_config(unet_or_config)
    return dict(_meta_state_shapes(json.dumps(cfg, sort_keys=True, default=str)))


def _block_structure(dkeys: Iterable[str]) -> dict:
    """Per level: how many resnets, whether attentions / resamplers exist (read off the key names)."""
    down: dict[int, dict] = {}
    up: dict[int, dict] = {}
    mid = {"resnets": 0, "attn": False}
    for k in dkeys:
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", k)
        if m:
            side = down if m.group(1) == "down" else up
            info = side.setdefault(int(m.group(2)), {"resnets": 0, "attn": False, "sampler": False})
            part, idx = m.group(3), int(m.group(4))
            if part == "resnets":
                info["resnets"] = max(info["resnets"], idx + 1)
            elif part == "attentions":
                info["attn"] = True
            else:
                info["sampler"] = True
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.", k)
        if m:
            if m.group(1) == "resnets":
                mid["resnets"] = max(mid["resnets"], int(m.group(2)) + 1)
            else:
                mid["attn"] = True
    return {"down": down, "up": up, "mid": mid}


def _block_prefixes(structure: dict) -> dict[str, str]:
    """Diffusers block prefix -> ldm block prefix, following the ldm UNetModel's block order."""
    out: dict[str, str] = {}
    n = 1  # input_blocks.0 is conv_in
    for level in sorted(structure["down"]):
        info = structure["down"][level]
        for j in range(info["resnets"]):
            out[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{n}.0"
            if info["attn"]:
                out[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if info["sampler"]:
            out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    mid = structure["mid"]
    step = 2 if mid["attn"] else 1
    for j in range(mid["resnets"]):
        out[f"mid_block.resnets.{j}"] = f"middle_block.{step * j}"
        if mid["attn"] and j + 1 < mid["resnets"]:
            out[f"mid_block.attentions.{j}"] = f"middle_block.{step * j + 1}"
    m = 0
    for level in sorted(structure["up"]):
        info = structure["up"][level]
        for j in range(info["resnets"]):
            out[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{m}.0"
            if info["attn"]:
                out[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{m}.1"
            m += 1
        if info["sampler"] and info["resnets"]:
            out[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{m - 1}.{2 if info['attn'] else 1}.conv"
    return out


def _diffusers_to_ldm_key(dkey: str, blocks: dict[str, str]) -> Optional[str]:
    if dkey == "class_embedding.weight":  # nn.Embedding class labels
        return "label_emb.weight"
    for dpre, lpre in _TOP_D2L.items():
        if dkey.startswith(dpre + "."):
            return lpre + dkey[len(dpre) :]
    m = re.match(r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions)\.\d+|mid_block\.(?:resnets|attentions)\.\d+"
                 r"|(?:down_blocks|up_blocks)\.\d+\.(?:downsamplers|upsamplers)\.0\.conv)\.(.+)$", dkey)
    if not m or m.group(1) not in blocks:
        return None
    block, rest = m.group(1), m.group(2)
    if ".resnets." in block:
        first, _, tail = rest.partition(".")
        if first not in _RESNET_D2L:
            return None
        rest = _RESNET_D2L[first] + "." + tail
    return blocks[block] + "." + rest


def _maps_from_keys(dkeys: Sequence[str]) -> dict[str, str]:
    blocks = _block_prefixes(_block_structure(dkeys))
    out: dict[str, str] = {}
    for dk in dkeys:
        lk = _diffusers_to_ldm_key(dk, blocks)
        if lk is not None:
            out[lk] = dk
    return out


@functools.lru_cache(maxsize=16)
def _map_for_keys(dkeys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(_maps_from_keys(dkeys).items())


def ldm_to_diffusers_map(unet_config: Any) -> dict[str, str]:
    """ldm UNet key (no ``diffusion_model.`` prefix) -> diffusers UNet2DConditionModel key.

    ``unet_config`` is a UNet2DConditionModel config (dict / FrozenDict) or a UNet
    (its config is used). The keys are enumerated on a meta-device build of the
    config, then renamed block by block following the ldm ``UNetModel`` order, so
    any layers_per_block / transformer depth / attention layout works. Diffusers
    keys without an ldm counterpart (e.g. encoder_hid_proj) are left out.
    """
    cfg = _plain_config(unet_config)
    dkeys = tuple(k for k, _ in _meta_state_shapes(json.dumps(cfg, sort_keys=True, default=str)))
    return dict(_map_for_keys(dkeys))


def diffusers_to_ldm_map(unet_config: Any) -> dict[str, str]:
    """The inverse of :func:`ldm_to_diffusers_map`."""
    return {d: l for l, d in ldm_to_diffusers_map(unet_config).items()}


# --------------------------------------------------------------------------- patch objects


@dataclass
class PatchEntry:
    """One patched weight: a LoRA pair (up, down[, alpha]) or a full delta.

    ``name`` is the weight's name without prefix/suffix, in ``naming``
    ("ldm": ldm UNet key, "diffusers": diffusers UNet key).
    """

    name: str
    naming: str  # "ldm" | "diffusers"
    kind: str  # "lora" | "diff"
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    alpha: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None

    def tensors(self) -> dict[int, torch.Tensor]:
        if self.kind == "diff":
            return {0: self.delta}
        out = {0: self.up, 1: self.down}
        if self.alpha is not None:
            out[2] = self.alpha
        return out


@dataclass
class Patch:
    """A set of patch entries, as read from (or to be written to) one safetensors file."""

    entries: list[PatchEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None  # file path it was read from

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "patch"

    def __len__(self) -> int:
        return len(self.entries)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Raw file keys -> tensors, in the layout :func:`write_patch` writes (ldm names keep their
        ``diffusion_model.`` prefix; diffusers-named deltas are plain keys)."""
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            for i, t in e.tensors().items():
                out[_raw_key(e, i)] = t
        return out

    def layout(self) -> dict[str, tuple[int, ...]]:
        """Raw file keys -> shapes (what :func:`validate_patch_layout` takes)."""
        return {k: tuple(t.shape) for k, t in self.state_dict().items()}


def _raw_key(e: PatchEntry, index: int) -> str:
    if e.naming == "ldm":
        return f"{LDM_PREFIX}{e.name}::{e.kind}::{index}"
    if e.kind == "diff" and index == 0:
        return e.name
    return f"{e.name}::{e.kind}::{index}"


def _parse_key(raw: str) -> tuple[str, str, str, int]:
    """Raw file key -> (naming, name, kind, index)."""
    parts = raw.split("::")
    if len(parts) == 1:
        name, kind, index = raw, "diff", 0
    elif len(parts) == 3 and parts[2].isdigit():
        name, kind, index = parts[0], parts[1], int(parts[2])
    else:
        raise LayerctlError(f"patch key '{raw}' is not '<key>', '<key>::lora::<i>' or '<key>::diff::0'")
    if kind not in _KINDS:
        raise LayerctlError(f"patch key '{raw}': patch type '{kind}' is not supported (only lora and diff)")
    if kind == "diff" and index != 0:
        raise LayerctlError(f"patch key '{raw}': a diff patch has only index 0")
    if kind == "lora" and index > 2:
        raise LayerctlError(f"patch key '{raw}': lora index {index} (mid/LoCon weights) is not supported")
    if name.startswith(LDM_PREFIX):
        return "ldm", name[len(LDM_PREFIX) :], kind, index
    if name.startswith(_LDM_ROOTS):
        return "ldm", name, kind, index
    return "diffusers", name, kind, index


@dataclass
class _EntryLayout:
    name: str
    naming: str
    kind: str
    shapes: dict[int, tuple[int, ...]]
    raw: dict[int, str]  # index -> raw file key

    def lora_dims(self) -> tuple[int, int]:
        """LoRA: (rows, columns) of up @ down (columns = all input elements of the weight)."""
        return self.shapes[0][0], math.prod(self.shapes[1][1:])


def _group_layout(layout: Mapping[str, Sequence[int]]) -> list[_EntryLayout]:
    """Group raw keys into entries and check each entry on its own (pairs complete, ranks agree)."""
    groups: dict[tuple[str, str, str], _EntryLayout] = {}
    if any(str(k).startswith(("hookers.", "kwargs_encoder.")) for k in layout):
        raise LayerctlError(
            "this is an SD1.5 attention-sharing file (layer_sd15_*: AttentionSharingPatcher units), "
            "not a ::lora::/::diff:: UNet patch; it is loaded by the attention-sharing layers"
        )
    for raw, shape in layout.items():
        naming, name, kind, index = _parse_key(raw)
        g = groups.setdefault((naming, name, kind), _EntryLayout(name, naming, kind, {}, {}))
        if index in g.shapes:
            raise LayerctlError(f"patch has two tensors for '{name}::{kind}::{index}' ({g.raw[index]}, {raw})")
        g.shapes[index] = tuple(int(s) for s in shape)
        g.raw[index] = raw
    if not groups:
        raise LayerctlError("patch holds no tensors")
    for g in groups.values():
        if g.kind != "lora":
            continue
        missing = [i for i in (0, 1) if i not in g.shapes]
        if missing:
            half = "up (::lora::0)" if missing[0] == 0 else "down (::lora::1)"
            raise LayerctlError(f"LoRA pair for '{g.name}' is missing its {half} tensor")
        up, down = g.shapes[0], g.shapes[1]
        if len(up) < 2 or len(down) < 2 or math.prod(up[1:]) != down[0]:
            raise LayerctlError(f"LoRA pair for '{g.name}': up {list(up)} and down {list(down)} ranks disagree")
        if 2 in g.shapes and math.prod(g.shapes[2]) != 1:
            raise LayerctlError(f"LoRA alpha for '{g.name}' must be a scalar, got shape {list(g.shapes[2])}")
    return list(groups.values())


def _entries_from_state_dict(sd: Mapping[str, torch.Tensor]) -> list[PatchEntry]:
    entries = []
    for g in _group_layout({k: tuple(v.shape) for k, v in sd.items()}):
        t = {i: sd[raw] for i, raw in g.raw.items()}
        for i, x in t.items():
            if not x.is_floating_point():
                raise LayerctlError(f"patch tensor {g.raw[i]} has dtype {x.dtype}, expected a float type")
        if g.kind == "diff":
            entries.append(PatchEntry(g.name, g.naming, "diff", delta=t[0]))
        else:
            entries.append(PatchEntry(g.name, g.naming, "lora", up=t[0], down=t[1], alpha=t.get(2)))
    return entries


def patch_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None,
                          source: Optional[str] = None) -> Patch:
    """Build a Patch from raw file keys -> tensors (any of the accepted layouts)."""
    return Patch(_entries_from_state_dict(sd), dict(metadata or {}), source)


def read_patch(path: Union[str, os.PathLike]) -> Patch:
    """Read a LayerDiffuse UNet patch file (safetensors only; pickles are never opened)."""
    p = Path(path)
    if not p.exists():
        raise LayerctlError(f"patch file not found: {p}")
    if not p.is_file():
        raise LayerctlError(f"patch path is not a file: {p}")
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise LayerctlError(f"{p.name}: only .safetensors patch files are read (pickled files are never unpickled)")
    from safetensors import safe_open

    try:
        sd: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except LayerctlError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError / RuntimeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerctlError(f"cannot read patch file {p} (truncated or not a safetensors file?): {reason}") from None
    return patch_from_state_dict(sd, metadata, str(p))


# --------------------------------------------------------------------------- validation


@dataclass
class PlannedChange:
    """What merging one entry does: which diffusers weight, and whether conv_in is widened."""

    target: str  # diffusers key
    entry_name: str
    naming: str
    kind: str
    widen_to: Optional[int] = None  # new conv_in input channels


def _resolve_target(target: Optional[str], shapes: Mapping[str, Any]) -> Optional[str]:
    """The UNet key a diffusers weight name lives under (peft-wrapped layers keep it in ``base_layer``)."""
    if target is None:
        return None
    if target in shapes:
        return target
    head, _, leaf = target.rpartition(".")
    wrapped = f"{head}.base_layer.{leaf}"
    return wrapped if wrapped in shapes else None


def validate_patch_layout(unet: Any, layout: Union[Patch, Mapping[str, Sequence[int]]],
                          *, name: str = "patch") -> list[PlannedChange]:
    """Check that every entry of a patch layout (raw key -> shape) has a weight of the right shape
    in ``unet`` (a UNet2DConditionModel, real or on the meta device, or its config).

    Returns the planned changes; raises LayerctlError naming the first offending keys.
    Nothing is allocated: only names and shapes are compared.
    """
    if isinstance(layout, Patch):
        name = layout.name if name == "patch" else name
        layout = layout.layout()
    groups = _group_layout(layout)
    shapes = unet_key_shapes(unet)
    l2d = ldm_to_diffusers_map(unet)
    plan: list[PlannedChange] = []
    problems: list[str] = []
    targets: dict[str, str] = {}
    for g in groups:
        target = _resolve_target(l2d.get(g.name) if g.naming == "ldm" else g.name, shapes)
        if target is None:
            problems.append(f"{g.name} (no such weight in this UNet)")
            continue
        want = shapes[target]
        widen = None
        if g.kind == "diff":
            got = g.shapes[0]
            if got != want:
                if (target == "conv_in.weight" and len(got) == len(want) == 4 and got[0] == want[0]
                        and got[2:] == want[2:] and got[1] > want[1]):
                    widen = got[1]
                else:
                    problems.append(f"{g.name} (delta {list(got)} vs weight {list(want)})")
                    continue
        else:
            rows, cols = g.lora_dims()
            if len(want) < 2 or rows != want[0] or cols != math.prod(want[1:]):
                up, down = g.shapes[0], g.shapes[1]
                problems.append(f"{g.name} (LoRA up {list(up)} @ down {list(down)} vs weight {list(want)})")
                continue
        if target in targets:
            problems.append(f"{g.name} (same weight as {targets[target]})")
            continue
        targets[target] = g.name
        plan.append(PlannedChange(target, g.name, g.naming, g.kind, widen))
    if problems:
        shown = "; ".join(problems[:_MAX_NAMED])
        more = f" and {len(problems) - _MAX_NAMED} more" if len(problems) > _MAX_NAMED else ""
        hint = ""
        if len(problems) * 4 >= len(groups):
            hint = " - is the file for another base model family (SD1.5 vs SDXL)?"
        raise LayerctlError(
            f"{name} does not fit this UNet: {len(problems)} of {len(groups)} entries do not match: {shown}{more}{hint}"
        )
    # Widen first so later entries see the final conv_in.
    plan.sort(key=lambda c: c.widen_to is None)
    return plan


# --------------------------------------------------------------------------- apply / restore


_STACK_ATTR = "_layerctl_patch_stack"


class PatchHandle:
    """Returned by :func:`apply_patch`; ``restore()`` puts back the exact original weights."""

    def __init__(self, unet, name: str, strength: float, restorable: bool):
        self.unet = unet
        self.name = name
        self.strength = strength
        self.restorable = restorable
        self.originals: dict[str, torch.Tensor] = {}  # diffusers key -> CPU copy (original dtype)
        self.changed: list[str] = []
        self.old_conv_in: Optional[torch.nn.Module] = None
        self.old_in_channels: Optional[int] = None
        self.restored = False

    @property
    def widened_conv_in(self) -> bool:
        return self.old_conv_in is not None

    def _undo(self) -> None:
        with torch.no_grad():
            for key in reversed(self.changed):
                if key in self.originals:
                    self.unet.get_parameter(key).copy_(self.originals[key])
            if self.old_conv_in is not None:
                cur = self.unet.conv_in.weight
                old = self.old_conv_in
                if old.weight.device != cur.device or old.weight.dtype != cur.dtype:  # the UNet was moved since
                    old.to(device=cur.device, dtype=cur.dtype)
                self.unet.conv_in = old
                self.unet.register_to_config(in_channels=self.old_in_channels)

    def restore(self) -> None:
        """Undo this patch (bit-exact). Stacked patches must be restored in reverse order."""
        if self.restored:
            return
        if not self.restorable:
            raise LayerctlError(f"patch '{self.name}' was applied with restorable=False and cannot be restored")
        stack = getattr(self.unet, _STACK_ATTR, [])
        if stack and stack[-1] is not self:
            raise LayerctlError(
                f"restore patches in reverse order: '{stack[-1].name}' was applied after '{self.name}'"
            )
        self._undo()
        if stack:
            stack.pop()
        self.originals.clear()
        self.restored = True

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "restored" if self.restored else "applied"
        return f"PatchHandle({self.name!r}, {len(self.changed)} weights, strength={self.strength}, {state})"


def _lora_delta(e: PatchEntry, shape: Sequence[int], device) -> torch.Tensor:
    up = e.up.to(device=device, dtype=torch.float32).flatten(1)
    down = e.down.to(device=device, dtype=torch.float32).flatten(1)
    d = (up @ down).reshape(shape)
    if e.alpha is not None:
        d *= float(e.alpha.float().reshape(())) / down.shape[0]
    return d


def apply_patch(unet, patch: Union[Patch, str, os.PathLike], strength: float = 1.0,
                *, restorable: bool = True) -> PatchHandle:
    """Merge a patch into ``unet``'s weights in fp32 (``W += strength * up@down`` / ``W += strength * delta``).

    Everything is validated first; if any entry does not fit, a LayerctlError names
    it and the UNet is untouched. conv_in is replaced by a wider Conv2d when a
    ``diff`` delta has more input channels (``unet.config.in_channels`` follows).
    With ``restorable`` (default) CPU copies of the touched weights are kept so
    that ``handle.restore()`` puts them back bit for bit; without it no copies are
    kept (saves host memory for the big diff files) and a merge that fails half way
    (e.g. out of device memory) cannot be rolled back. ``patch`` may be a path.
    """
    if not isinstance(patch, Patch):
        patch = read_patch(patch)
    plan = validate_patch_layout(unet, patch.layout(), name=patch.name)
    entries = {(e.naming, e.name, e.kind): e for e in patch.entries}
    on_meta = [c.target for c in plan if c.widen_to is None and unet.get_parameter(c.target).is_meta]
    if on_meta or (any(c.widen_to for c in plan) and unet.conv_in.weight.is_meta):
        raise LayerctlError(
            f"cannot merge {patch.name}: the UNet's weights are not loaded (meta device, e.g. sequential CPU "
            "offload); apply patches before enabling offloading"
        )
    handle = PatchHandle(unet, patch.name, strength, restorable)
    try:
        with torch.no_grad():
            for ch in plan:
                e = entries[(ch.naming, ch.entry_name, ch.kind)]
                if ch.widen_to is not None:
                    _widen_conv_in(unet, handle, e, strength)
                    continue
                param = unet.get_parameter(ch.target)
                if restorable:
                    handle.originals[ch.target] = param.detach().to("cpu", copy=True)
                handle.changed.append(ch.target)
                w = param.detach().to(torch.float32, copy=True)
                if e.kind == "lora":
                    w += strength * _lora_delta(e, w.shape, w.device)
                else:
                    w += strength * e.delta.to(device=w.device, dtype=torch.float32)
                param.copy_(w.to(param.dtype))
    except Exception:
        handle._undo()  # leave the UNet as it was
        raise
    stack = getattr(unet, _STACK_ATTR, None)
    if stack is None:
        stack = []
        setattr(unet, _STACK_ATTR, stack)
    stack.append(handle)
    return handle


def _widen_conv_in(unet, handle: PatchHandle, e: PatchEntry, strength: float) -> None:
    old = unet.conv_in
    w_old = old.weight
    new_in = e.delta.shape[1]
    new = torch.nn.Conv2d(
        new_in, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        dilation=old.dilation, groups=old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
        device=w_old.device, dtype=w_old.dtype,
    )
    w = torch.zeros(new.weight.shape, dtype=torch.float32, device=w_old.device)
    w[:, : w_old.shape[1]] = w_old.detach().float()
    w += strength * e.delta.to(device=w.device, dtype=torch.float32)
    new.weight.copy_(w.to(w_old.dtype))
    if old.bias is not None:
        new.bias.copy_(old.bias.detach())
    new.train(old.training)
    new.requires_grad_(w_old.requires_grad)
    handle.old_conv_in = old
    handle.old_in_channels = int(unet.config.in_channels)
    handle.changed.append("conv_in.weight")  # restored by putting the old module back
    unet.conv_in = new
    unet.register_to_config(in_channels=new_in)


# --------------------------------------------------------------------------- building / writing


def _as_weight_name(name: str) -> str:
    return name if name.endswith((".weight", ".bias")) else name + ".weight"


def _to_ldm_names(names: Iterable[str], unet_config: Any) -> dict[str, str]:
    d2l = diffusers_to_ldm_map(unet_config)
    missing = [n for n in names if n not in d2l]
    if missing:
        raise LayerctlError(f"no ldm name for diffusers key(s): {', '.join(missing[:_MAX_NAMED])}")
    return {n: d2l[n] for n in names}


def lora_to_patch_entries(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, naming: str = "diffusers",
                          unet_config: Any = None, alpha: Optional[float] = None) -> list[PatchEntry]:
    """(up [out, r], down [r, in]) pairs keyed by weight name -> LoRA patch entries.

    Names are diffusers keys by default (a module name such as ``...attn1.to_q`` gets
    ``.weight`` appended). With ``unet_config`` diffusers names are converted to ldm
    names, so :func:`write_patch` writes the official ``diffusion_model.<ldm>::lora::i``
    layout. ``alpha`` (optional) is stored as ``::lora::2`` (scale alpha/r on merge).
    """
    if naming not in ("diffusers", "ldm"):
        raise ValueError("naming must be 'diffusers' or 'ldm'")
    names = {k: _as_weight_name(k) for k in pairs}
    if naming == "diffusers" and unet_config is not None:
        conv = _to_ldm_names(names.values(), unet_config)
        names = {k: conv[v] for k, v in names.items()}
        naming = "ldm"
    out = []
    for k, (up, down) in pairs.items():
        if up.ndim < 2 or down.ndim < 2 or math.prod(up.shape[1:]) != down.shape[0]:
            raise LayerctlError(f"LoRA pair for '{k}': up {list(up.shape)} and down {list(down.shape)} ranks disagree")
        a = None if alpha is None else torch.tensor(float(alpha))
        out.append(PatchEntry(names[k], naming, "lora", up=up.detach(), down=down.detach(), alpha=a))
    return out


def patch_from_lora(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, naming: str = "diffusers",
                    unet_config: Any = None, alpha: Optional[float] = None,
                    metadata: Optional[Mapping[str, str]] = None) -> Patch:
    """A Patch from (up, down) pairs (see :func:`lora_to_patch_entries`), ready for :func:`write_patch`."""
    entries = lora_to_patch_entries(pairs, naming=naming, unet_config=unet_config, alpha=alpha)
    return Patch(entries, dict(metadata or {}))


def diff_to_patch_entries(deltas: Mapping[str, torch.Tensor], *, naming: str = "diffusers",
                          unet_config: Any = None) -> list[PatchEntry]:
    """Full deltas keyed by weight name -> diff patch entries (names as in :func:`lora_to_patch_entries`)."""
    if naming not in ("diffusers", "ldm"):
        raise ValueError("naming must be 'diffusers' or 'ldm'")
    names = {k: k for k in deltas}
    if naming == "diffusers" and unet_config is not None:
        names = _to_ldm_names(list(deltas), unet_config)
        naming = "ldm"
    return [PatchEntry(names[k], naming, "diff", delta=d.detach()) for k, d in deltas.items()]


def write_patch(patch: Patch, path: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float16,
                overwrite: bool = False, unet_config: Any = None,
                metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a patch as safetensors, atomically (temporary file + rename), keys sorted.

    ldm-named entries use the official ``diffusion_model.<ldm>::lora::0/1`` /
    ``::diff::0`` layout. Diffusers-named entries are converted to that layout when
    ``unet_config`` is given, otherwise written under their diffusers names.
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.exists() and not overwrite:
        raise LayerctlError(f"{p} exists (use overwrite to replace it)")
    entries = list(patch.entries)
    if unet_config is not None:
        d_names = [e.name for e in entries if e.naming == "diffusers"]
        conv = _to_ldm_names(d_names, unet_config) if d_names else {}
        entries = [PatchEntry(conv[e.name], "ldm", e.kind, e.up, e.down, e.alpha, e.delta)
                   if e.naming == "diffusers" else e for e in entries]
    sd = Patch(entries).state_dict()
    if len(sd) != sum(len(e.tensors()) for e in entries):
        raise LayerctlError("patch has two entries for the same weight")
    tensors = {k: sd[k].detach().to("cpu", dtype).contiguous().clone() for k in sorted(sd)}
    meta = {str(k): str(v) for k, v in {**patch.metadata, **(metadata or {})}.items()}
    from layerctl.io.files import atomic_write

    # the shared writer: temporary file, normal permissions, rename (overwrite was checked above)
    return atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta or None), overwrite=True, suffix=".tmp")


# --------------------------------------------------------------------------- info


def describe_patch(patch: Union[Patch, Mapping[str, Sequence[int]]]) -> dict:
    """Counts and facts about a patch (or a raw layout): for metadata and `layerctl info`."""
    if isinstance(patch, Patch):
        layout = patch.layout()
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in patch.state_dict().values()})
    else:
        layout, dtypes = dict(patch), []
    groups = _group_layout(layout)
    ranks = sorted({g.shapes[1][0] for g in groups if g.kind == "lora"})
    conv_in = None
    cross = set()
    for g in groups:
        if g.kind == "diff" and g.name in ("input_blocks.0.0.weight", "conv_in.weight"):
            conv_in = g.shapes[0][1] if len(g.shapes[0]) == 4 else None
        if re.search(r"attn2\.to_[kv]\.weight$", g.name):
            cross.add(g.shapes[1][-1] if g.kind == "lora" else g.shapes[0][-1])
    return {
        "entries": len(groups),
        "tensors": len(layout),
        "lora": sum(g.kind == "lora" for g in groups),
        "diff": sum(g.kind == "diff" for g in groups),
        "naming": sorted({g.naming for g in groups}),
        "lora_ranks": ranks,
        "conv_in_in_channels": conv_in,
        "cross_attention_dim": sorted(cross)[0] if len(cross) == 1 else (sorted(cross) or None),
        "params": sum(math.prod(s) for s in layout.values()),
        "dtypes": dtypes,
    }
