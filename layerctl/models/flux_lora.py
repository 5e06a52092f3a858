"""LoRAs for the FLUX.1 transformer: the official `layerlora.safetensors` and `--lora` files.

Files are read as safetensors only (a pickle is never opened); diffusers' FLUX LoRA reader
(`FluxPipeline.lora_state_dict`) turns the common layouts (diffusers/peft, kohya, BFL,
XLabs) into diffusers module names. Each pair is merged into the transformer's weights,
``W += strength * (alpha / r) * up @ down`` in fp32 (no runtime overhead), and the handle's
``restore()`` copies the exact original weights back. Everything is checked before any
weight changes: a LoRA for another family names the first module this transformer lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from layerctl.errors import LayerctlError
from layerctl.models.lora_format import LoraPair

METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer."
_SIDES = {"lora_A": "down", "lora_B": "up", "lora.down": "down", "lora.up": "up"}


def _read(path) -> tuple[dict, dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerctlError(f"LoRA file not found: {p}")
    if p.suffix.lower() != ".safetensors":
        raise LayerctlError(f"{p.name}: only .safetensors LoRA files are read (pickled files are never unpickled)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerctlError(f"cannot read LoRA file {p} (truncated or not a safetensors file?): {reason}") from None


def _adapter_alpha(meta: dict) -> tuple[Optional[float], Optional[int]]:
    raw = meta.get(METADATA_KEY)
    try:
        cfg = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise LayerctlError(f"LoRA metadata '{METADATA_KEY}' is not valid JSON") from None
    cfg = cfg if isinstance(cfg, dict) else {}
    alpha = next((cfg[k] for k in ("transformer.lora_alpha", "lora_alpha") if k in cfg), None)
    r = next((cfg[k] for k in ("transformer.r", "r") if k in cfg), None)
    return (None if alpha is None else float(alpha)), (None if r is None else int(r))


def pairs_from_state(sd: dict, meta: dict, name: str) -> dict[str, LoraPair]:
    """{transformer module name: LoraPair} from a LoRA state dict in any layout diffusers reads."""
    from diffusers import FluxPipeline

    try:
        converted, alphas = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    except Exception as exc:  # noqa: BLE001 - diffusers' converters raise plain errors
        raise LayerctlError(f"{name} is not a FLUX.1 LoRA diffusers can read ({str(exc).splitlines()[0]})") from None
    alpha_all, _r = _adapter_alpha(meta)
    halves: dict[str, dict] = {}
    for key, t in converted.items():
        if not key.startswith(PREFIX):
            continue  # text-encoder parts: not applied
        body = key[len(PREFIX):]
        for tag, side in _SIDES.items():
            if body.endswith(f".{tag}.weight"):
                halves.setdefault(body[: -len(f".{tag}.weight")], {})[side] = t
                break
        else:
            if not body.endswith(".alpha"):
                raise LayerctlError(f"{name}: key '{key}' is not a LoRA key (expected <module>.lora_A.weight / lora_B.weight)")
    if not halves:
        raise LayerctlError(f"{name}: no FLUX.1 transformer LoRA weights in this file (a LoRA for another model family?)")
    pairs = {}
    for mod, h in sorted(halves.items()):
        if set(h) != {"up", "down"}:
            raise LayerctlError(f"{name}: the LoRA pair of '{mod}' has no {'up (lora_B)' if 'up' not in h else 'down (lora_A)'} tensor")
        r = int(h["down"].shape[0])
        a = (alphas or {}).get(f"{PREFIX}{mod}.alpha", alpha_all)
        pairs[mod] = LoraPair(h["up"], h["down"], (float(a) if a is not None else r) / r)
    return pairs


def read_flux_lora(path) -> dict[str, LoraPair]:
    sd, meta = _read(path)
    return pairs_from_state(sd, meta, Path(path).name)


class FusedLora:
    """A LoRA merged into a transformer; ``restore()`` puts the original weights back bit for bit."""

    def __init__(self, module, name: str):
        self.module = module
        self.name = name
        self.originals: dict[str, torch.Tensor] = {}
        self.restored = False

    def restore(self) -> None:
        if self.restored:
            return
        with torch.no_grad():
            for key, old in self.originals.items():
                self.module.get_parameter(key).copy_(old)
        self.originals.clear()
        self.restored = True


def _plan(module, pairs: dict[str, LoraPair], name: str) -> list[tuple[str, LoraPair]]:
    params = dict(module.named_parameters())
    plan, missing = [], []
    for mod, pair in pairs.items():
        key = f"{mod}.weight"
        w = params.get(key)
        if w is None:
            missing.append(mod)
            continue
        if w.ndim != 2 or tuple(pair.up.shape[:1]) != (w.shape[0],) or pair.down.flatten(1).shape[1] != w.shape[1]:
            raise LayerctlError(f"{name} does not fit this FLUX.1 transformer: '{mod}' has up {list(pair.up.shape)} @ "
                                f"down {list(pair.down.shape)} but its weight is {list(w.shape)}")
        plan.append((key, pair))
    if missing:
        raise LayerctlError(f"{name} does not fit this FLUX.1 transformer: {len(missing)} of {len(pairs)} modules are "
                            f"not in it (first: '{missing[0]}') - is the LoRA for another model family or size?")
    return plan


def fuse_lora(module, pairs: dict[str, LoraPair], strength: float = 1.0, name: str = "LoRA") -> FusedLora:
    """Merge `pairs` into `module` (checked first; on any failure nothing stays changed)."""
    plan = _plan(module, pairs, name)
    handle = FusedLora(module, name)
    try:
        with torch.no_grad():
            for key, pair in plan:
                param = module.get_parameter(key)
                handle.originals[key] = param.detach().to("cpu", copy=True)
                w = param.detach().to(torch.float32, copy=True)
                w += float(strength) * pair.delta(w.shape).to(w.device)
                param.copy_(w.to(param.dtype))
    except BaseException:
        handle.restore()
        raise
    return handle


def fuse_lora_file(module, path, strength: float = 1.0) -> FusedLora:
    return fuse_lora(module, read_flux_lora(path), strength, Path(path).name)


def tiny_layer_lora(transformer, seed: int = 20240817, rank: int = 4) -> dict[str, LoraPair]:
    """A seeded random LoRA on every attention projection of a (tiny) transformer: the tiny-flux
    stand-in for layerlora.safetensors (same code path as the real file)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_v_proj"):
            out_f, in_f = mod.weight.shape
            down = torch.randn(rank, in_f, generator=g) * 0.05
            up = torch.randn(out_f, rank, generator=g) * 0.05
            pairs[name] = LoraPair(up, down, 1.0)
    return pairs


def save_flux_lora(pairs: dict[str, LoraPair], path) -> Path:
    """Write pairs in the diffusers layout (transformer.<module>.lora_A/B.weight, scale folded into up)."""
    from safetensors.torch import save_file

    sd = {}
    for mod, p in pairs.items():
        sd[f"{PREFIX}{mod}.lora_A.weight"] = p.down.contiguous()
        sd[f"{PREFIX}{mod}.lora_B.weight"] = (p.up.float() * p.scale).contiguous()
    save_file(sd, str(path))
    return Path(path)
