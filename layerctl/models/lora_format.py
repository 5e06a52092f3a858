"""UNet LoRA files: the diffusers/peft format `train-lora` writes, the official LayerDiffuse layout,
and merging either into a UNet (what `gen --lora PATH --lora-scale X` does).

Formats read (all safetensors; pickles are never opened):

* **diffusers/peft** (what train-lora writes, what ``pipe.save_lora_weights`` writes):
  ``unet.<module>.lora_A.weight`` (down, ``[r, in]``) and ``unet.<module>.lora_B.weight``
  (up, ``[out, r]``); the scale ``lora_alpha / r`` comes from the safetensors metadata key
  ``lora_adapter_metadata`` (diffusers' convention: ``{"unet.r", "unet.lora_alpha",
  "unet.rank_pattern", "unet.alpha_pattern", ...}``) or ``<module>.alpha`` tensors; none: 1.
  Older diffusers names (``<module>.lora.down.weight`` / ``.lora.up.weight``,
  ``...attn1.processor.to_q_lora.down.weight``) are read too.
* **kohya / A1111** (``lora_unet_<module_with_underscores>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``): module names in diffusers or ldm spelling, resolved against the UNet's own names.
  Text-encoder parts (``lora_te*``, ``text_encoder.*``) are not applied (a notice says so).
* **LayerDiffuse** (``diffusion_model.<ldm key>::lora::0`` up, ``::lora::1`` down, optional
  ``::lora::2`` alpha; ``::diff::0`` deltas): the official ``layer_xl_transparent_attn`` layout,
  handled by :mod:`layerctl.models.patches`.

Merging: ``W += scale * (alpha / r) * up @ down`` in fp32, through
:func:`layerctl.models.patches.apply_patch`, so the returned handle's ``restore()`` puts the exact
original weights back, and LoRAs stack with the layer weights (attention-sharing units read
the merged projection weights).

Conversions (``layerctl export-lora``): :func:`to_layerdiffuse` writes the official layout (ldm
names, scale folded into ``up``, no alpha tensor: exactly how the released files look) and
:func:`to_diffusers` the peft layout. ldm names need the UNet's config: from ``--model``, from
the file's own metadata (train-lora stores it), or detected among the known shapes (SD1.5,
SDXL, tiny, tiny-xl).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from layerctl.errors import LayerctlError

PEFT_PREFIX = "unet."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the LoraConfig
LAYERCTL_KEY = "layerctl"  # our own metadata: JSON with unet_config, family, base model, training facts
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# UNet2DConditionModel configs of the two released base families (the shapes are what matters
# for mapping names; the ldm <-> diffusers key maps are described in docs/formats.md)
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
}

_PEFT_RE = re.compile(r"^(?P<m>.+?)\.(?P<k>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_RE = re.compile(r"^(?P<m>.+?)\.alpha$")
_PROC_RE = re.compile(r"^(?P<head>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<k>down|up)\.weight$")
_TEXT_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "lora_te1", "lora_te2")


def known_unet_configs() -> dict[str, dict]:
    """Family name -> UNet config, for detecting which UNet a file was made for."""
    from layerctl.backends.tiny import tiny_unet_config

    return {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG, "tiny": tiny_unet_config(False), "tiny-xl": tiny_unet_config(True)}


# --------------------------------------------------------------------------- the in-memory form


@dataclass
class LoraPair:
    """One module's low-rank delta: ``scale * up @ down`` (up ``[out, r, ...]``, down ``[r, in, ...]``)."""

    up: Any  # torch.Tensor
    down: Any
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape=None):
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        d = d * self.scale
        return d.reshape(shape) if shape is not None else d


@dataclass
class LoraWeights:
    """A LoRA keyed by diffusers module name (``down_blocks.0....attn1.to_q``, no ``.weight``)."""

    pairs: dict[str, LoraPair]
    metadata: dict[str, str] = field(default_factory=dict)  # the file's safetensors metadata
    source: Optional[str] = None
    skipped: list[str] = field(default_factory=list)  # keys not applied to the UNet (text encoders)

    def info(self) -> dict:
        raw = self.metadata.get(LAYERCTL_KEY)
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return {}

    def ranks(self) -> list[int]:
        return sorted({p.rank for p in self.pairs.values()})


# --------------------------------------------------------------------------- reading


def _read_safetensors(path) -> tuple[dict, dict]:
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerctlError(f"LoRA file not found: {p}")
    if not p.is_file():
        raise LayerctlError(f"LoRA path is not a file: {p}")
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise LayerctlError(f"{p.name}: only .safetensors LoRA files are read (pickled files are never unpickled)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError / OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerctlError(f"cannot read LoRA file {p} (truncated or not a safetensors file?): {reason}") from None
    if not sd:
        raise LayerctlError(f"LoRA file {p} holds no tensors")
    return sd, meta


def detect_format(keys) -> str:
    """'layerdiffuse', 'attention-sharing', 'kohya' or 'peft' from a file's key names."""
    keys = list(keys)
    if any(k.startswith(("hookers.", "kwargs_encoder.")) for k in keys):
        return "attention-sharing"
    if any("::" in k for k in keys):
        return "layerdiffuse"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    return "peft"


def _config_of(unet_or_config) -> Optional[dict]:
    if unet_or_config is None:
        return None
    from layerctl.models.patches import _plain_config

    return _plain_config(unet_or_config)


def _peft_alphas(meta: Mapping[str, str]) -> tuple[Optional[float], dict, dict, Optional[int]]:
    """(lora_alpha, alpha_pattern, rank_pattern, r) from diffusers' adapter metadata, prefix 'unet.'."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None, {}, {}, None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise LayerctlError(f"LoRA metadata '{METADATA_KEY}' is not valid JSON") from None
    if not isinstance(cfg, dict):
        return None, {}, {}, None

    def get(name):
        for key in (f"unet.{name}", name):
            if key in cfg:
                return cfg[key]
        return None

    alpha = get("lora_alpha")
    r = get("r")
    return (None if alpha is None else float(alpha)), dict(get("alpha_pattern") or {}), dict(get("rank_pattern") or {}), (
        None if r is None else int(r))


def _pattern_value(pattern: Mapping[str, Any], module: str):
    """peft's rank/alpha pattern lookup: a key matches a module name ending in it."""
    best = None
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            if best is None or len(key) > len(best[0]):
                best = (key, value)
    return None if best is None else best[1]


def _strip_prefix(name: str) -> str:
    for pre in ("unet.", "base_model.model.", "model."):
        if name.startswith(pre):
            name = name[len(pre):]
    return name


def _flat_names(unet_config) -> dict[str, str]:
    """kohya's flattened module names (dots -> underscores), in diffusers and ldm spelling -> diffusers module."""
    from layerctl.models.patches import ldm_to_diffusers_map, unet_key_shapes

    out = {}
    for key in unet_key_shapes(unet_config):
        if key.endswith(".weight"):
            mod = key[: -len(".weight")]
            out[mod.replace(".", "_")] = mod
    for lk, dk in ldm_to_diffusers_map(unet_config).items():
        if lk.endswith(".weight") and dk.endswith(".weight"):
            out.setdefault(lk[: -len(".weight")].replace(".", "_"), dk[: -len(".weight")])
    return out


def read_lora(path, unet_or_config=None) -> LoraWeights:
    """Read a LoRA file (peft/diffusers, kohya or LayerDiffuse layout) into diffusers module names.

    ``unet_or_config`` (a UNet or its config) is needed for ldm-named keys (LayerDiffuse files,
    kohya SDXL files); without it the file's own metadata or the known UNet shapes are used.
    """
    sd, meta = _read_safetensors(path)
    fmt = detect_format(sd)
    if fmt == "attention-sharing":
        raise LayerctlError(
            f"{Path(path).name} is an SD1.5 attention-sharing layer file (layer_sd15_* layout), not a LoRA; "
            "load it with --layer-weights"
        )
    if fmt == "layerdiffuse":
        return _read_layerdiffuse(sd, meta, str(path), unet_or_config)
    if fmt == "kohya":
        return _read_kohya(sd, meta, str(path), unet_or_config)
    return _read_peft(sd, meta, str(path))


def _read_peft(sd, meta, source) -> LoraWeights:
    alpha, alpha_pattern, rank_pattern, _r = _peft_alphas(meta)
    ups, downs, alphas, skipped = {}, {}, {}, []
    for key, t in sd.items():
        name = _strip_prefix(key)
        if key.startswith(_TEXT_PREFIXES):
            skipped.append(key)
            continue
        m = _PROC_RE.match(name)
        if m:  # diffusers attention-processor LoRA: <attn>.processor.to_q_lora.down.weight
            proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
            mod = f"{m.group('head')}.{proj}"
            (downs if m.group("k") == "down" else ups)[mod] = t
            continue
        m = _PEFT_RE.match(name)
        if m:
            (downs if m.group("k") in ("lora_A", "lora.down", "lora_down") else ups)[m.group("m")] = t
            continue
        m = _ALPHA_RE.match(name)
        if m and t.numel() == 1:
            alphas[m.group("m")] = float(t.float().reshape(()))
            continue
        raise LayerctlError(
            f"{Path(source).name}: key '{key}' is not a LoRA key (expected <module>.lora_A.weight / lora_B.weight, "
            "a kohya lora_unet_* file or the LayerDiffuse key::lora::N layout)"
        )
    return LoraWeights(_pairs(ups, downs, alphas, alpha, alpha_pattern, rank_pattern, source), meta, source, skipped)


def _pairs(ups, downs, alphas, alpha, alpha_pattern, rank_pattern, source) -> dict[str, LoraPair]:
    pairs = {}
    for mod in sorted(set(ups) | set(downs)):
        if mod not in ups or mod not in downs:
            half = "up (lora_B)" if mod not in ups else "down (lora_A)"
            raise LayerctlError(f"{Path(source).name}: the LoRA pair of '{mod}' has no {half} tensor")
        up, down = ups[mod], downs[mod]
        if up.ndim < 2 or down.ndim < 2 or math.prod(up.shape[1:]) != down.shape[0]:
            raise LayerctlError(
                f"{Path(source).name}: LoRA pair of '{mod}': up {list(up.shape)} and down {list(down.shape)} ranks disagree"
            )
        r = int(down.shape[0])
        a = alphas.get(mod)
        if a is None:
            a = _pattern_value(alpha_pattern, mod)
        if a is None:
            a = alpha
        if a is None:
            a = r  # no alpha anywhere: scale 1 (diffusers' and Forge's default)
        pr = _pattern_value(rank_pattern, mod)
        if pr is not None and int(pr) != r:
            raise LayerctlError(f"{Path(source).name}: '{mod}' has rank {r} but the metadata says {pr}")
        pairs[mod] = LoraPair(up, down, float(a) / r)
    if not pairs:
        raise LayerctlError(f"{Path(source).name}: no UNet LoRA weights in this file")
    return pairs


def _read_kohya(sd, meta, source, unet_or_config) -> LoraWeights:
    ups, downs, alphas, skipped, unknown = {}, {}, {}, [], []
    cfg = _config_of(unet_or_config) or _config_from_metadata(meta)
    candidates = [cfg] if cfg else list(known_unet_configs().values())
    flat_maps = [_flat_names(c) for c in candidates]
    for key, t in sd.items():
        if not key.startswith("lora_unet_"):
            skipped.append(key)
            continue
        stem, _, rest = key[len("lora_unet_"):].partition(".")
        for fm in flat_maps:
            if stem in fm:
                mod = fm[stem]
                break
        else:
            unknown.append(stem)
            continue
        if rest == "alpha":
            alphas[mod] = float(t.float().reshape(()))
        elif rest in ("lora_down.weight", "lora_A.weight"):
            downs[mod] = t
        elif rest in ("lora_up.weight", "lora_B.weight"):
            ups[mod] = t
        else:
            raise LayerctlError(f"{Path(source).name}: kohya key '{key}' is not supported (only lora_up/lora_down/alpha)")
    if unknown:
        raise LayerctlError(
            f"{Path(source).name}: {len(unknown)} kohya module name(s) match no weight of this UNet, e.g. "
            f"'{unknown[0]}' (is the LoRA for another base model family?)"
        )
    return LoraWeights(_pairs(ups, downs, alphas, None, {}, {}, source), meta, source, skipped)


def _read_layerdiffuse(sd, meta, source, unet_or_config) -> LoraWeights:
    from layerctl.models.patches import patch_from_state_dict

    patch = patch_from_state_dict(sd, meta, source)
    diffs = [e.name for e in patch.entries if e.kind == "diff"]
    if diffs:
        raise LayerctlError(
            f"{Path(source).name} holds {len(diffs)} full-delta (::diff::) entries, e.g. '{diffs[0]}': "
            "it is not a LoRA (apply it with --layer-weights)"
        )
    ldm = [e for e in patch.entries if e.naming == "ldm"]
    cfg = _config_of(unet_or_config) or _config_from_metadata(meta)
    l2d: dict[str, str] = {}
    if ldm:
        cfg = cfg or detect_unet_config({e.name: (tuple(e.up.shape), tuple(e.down.shape)) for e in ldm}, naming="ldm")[1]
        from layerctl.models.patches import ldm_to_diffusers_map

        l2d = ldm_to_diffusers_map(cfg)
    pairs = {}
    for e in patch.entries:
        name = l2d.get(e.name) if e.naming == "ldm" else e.name
        if name is None:
            raise LayerctlError(f"{Path(source).name}: '{e.name}' is not a weight of this UNet")
        mod = name[: -len(".weight")] if name.endswith(".weight") else name
        r = int(e.down.shape[0])
        scale = float(e.alpha.float().reshape(())) / r if e.alpha is not None else 1.0
        pairs[mod] = LoraPair(e.up, e.down, scale)
    return LoraWeights(pairs, meta, source, [])


def _config_from_metadata(meta: Mapping[str, str]) -> Optional[dict]:
    raw = meta.get(LAYERCTL_KEY)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return None
    cfg = info.get("unet_config") if isinstance(info, dict) else None
    return cfg if isinstance(cfg, dict) else None


def detect_unet_config(shapes: Mapping[str, tuple], naming: str = "diffusers") -> tuple[str, dict]:
    """Which known UNet (sd15, sdxl, tiny, tiny-xl) every LoRA pair fits: (name, config).

    ``shapes``: module or weight name -> (up shape, down shape).
    """
    from layerctl.models.patches import ldm_to_diffusers_map, unet_key_shapes

    for fam, cfg in known_unet_configs().items():
        wshapes = unet_key_shapes(cfg)
        l2d = ldm_to_diffusers_map(cfg) if naming == "ldm" else None
        ok = True
        for name, (up, down) in shapes.items():
            key = name if name.endswith(".weight") else name + ".weight"
            if l2d is not None:
                key = l2d.get(key)
            want = wshapes.get(key) if key else None
            if want is None or up[0] != want[0] or math.prod(down[1:]) != math.prod(want[1:]):
                ok = False
                break
        if ok:
            return fam, cfg
    raise LayerctlError(
        "cannot tell which UNet this LoRA is for (it fits none of sd15, sdxl, tiny, tiny-xl): pass --model"
    )


# --------------------------------------------------------------------------- applying


def lora_patch(weights: LoraWeights):
    """The LoRA as a :class:`layerctl.models.patches.Patch` (diffusers names, scale folded into ``up``)."""
    import torch

    from layerctl.models.patches import Patch, PatchEntry

    entries = []
    for mod, p in weights.pairs.items():
        up = p.up.to(torch.float32) * p.scale if p.scale != 1.0 else p.up
        entries.append(PatchEntry(mod + ".weight", "diffusers", "lora", up=up, down=p.down))
    return Patch(entries, dict(weights.metadata), weights.source)


class LoraHandle:
    """What :func:`apply_lora_file` returns: ``restore()`` puts the UNet's weights back, bit-exact."""

    def __init__(self, patch_handle, path: str, scale: float, pairs: int, fmt: str):
        self._handle = patch_handle
        self.path = path
        self.scale = scale
        self.pairs = pairs
        self.format = fmt

    @property
    def restored(self) -> bool:
        return self._handle.restored

    def restore(self) -> None:
        self._handle.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()

    def __repr__(self):
        return f"LoraHandle({Path(self.path).name!r}, {self.pairs} pairs, scale={self.scale}, {self.format})"


def apply_lora_file(unet, path, scale: float = 1.0) -> LoraHandle:
    """Merge a LoRA file into ``unet`` (``W += scale * alpha/r * up@down``, fp32); returns a handle with
    ``.restore()``. Reads the peft/diffusers format, kohya files and the LayerDiffuse layout.
    Everything is checked before any weight changes: a LoRA for another UNet is a one-line error."""
    from layerctl.models.patches import apply_patch, read_patch

    sd_keys = _keys(path)
    fmt = detect_format(sd_keys)
    if fmt == "layerdiffuse":
        patch = read_patch(path)  # ::lora:: and ::diff:: entries, ldm or diffusers names
        handle = apply_patch(unet, patch, float(scale))
        return LoraHandle(handle, str(path), float(scale), len(patch), fmt)
    weights = read_lora(path, unet)
    if weights.skipped:
        import sys

        sys.stderr.write(
            f"layerctl: {Path(path).name}: {len(weights.skipped)} text-encoder tensor(s) not applied (UNet LoRA only)\n"
        )
    patch = lora_patch(weights)
    patch.source = str(path)
    handle = apply_patch(unet, patch, float(scale))
    return LoraHandle(handle, str(path), float(scale), len(weights.pairs), fmt)


def _keys(path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerctlError(f"LoRA file not found: {p}")
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise LayerctlError(f"{p.name}: only .safetensors LoRA files are read (pickled files are never unpickled)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerctlError(f"cannot read LoRA file {p} (truncated or not a safetensors file?): {reason}") from None


def merged_deltas(weights: LoraWeights) -> dict:
    """Module -> ``scale * up @ down`` in fp32 (what merging adds to each weight)."""
    return {m: p.delta() for m, p in weights.pairs.items()}


def max_merged_difference(a: LoraWeights, b: LoraWeights) -> float:
    """Largest absolute difference between the weights two LoRAs merge into (the same modules required)."""
    if set(a.pairs) != set(b.pairs):
        only = sorted(set(a.pairs) ^ set(b.pairs))
        raise LayerctlError(f"the two LoRAs touch different modules, e.g. '{only[0]}'")
    worst = 0.0
    for m in a.pairs:
        worst = max(worst, float((a.pairs[m].delta() - b.pairs[m].delta()).abs().max()))
    return worst


# --------------------------------------------------------------------------- writing


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _atomic_save(tensors: dict, path: Path, metadata: dict, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    if path.exists() and not overwrite:
        raise LayerctlError(f"{path} exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={str(k): str(v) for k, v in metadata.items()})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def peft_state_dict(pairs: Mapping[str, tuple], prefix: str = PEFT_PREFIX) -> dict:
    """(up, down) per module -> ``unet.<module>.lora_A.weight`` (down) / ``lora_B.weight`` (up)."""
    out = {}
    for mod, (up, down) in pairs.items():
        out[f"{prefix}{mod}.lora_A.weight"] = down
        out[f"{prefix}{mod}.lora_B.weight"] = up
    return out


def save_peft_lora(path, pairs: Mapping[str, tuple], rank: int, alpha: float, target_modules=DEFAULT_TARGETS,
                   info: Optional[dict] = None, dtype: str = "fp32", overwrite: bool = False,
                   alpha_pattern: Optional[dict] = None, rank_pattern: Optional[dict] = None) -> Path:
    """Write a UNet LoRA in the diffusers/peft layout, atomically.

    ``pairs``: module -> (up ``[out, r]``, down ``[r, in]``). The LoraConfig goes to the
    ``lora_adapter_metadata`` key (diffusers' convention, so ``pipe.load_lora_weights`` reads the
    right alpha); ``info`` (unet_config, base model, training facts) goes to the ``layerctl`` key.
    """
    dt = _dtype(dtype)
    tensors = {k: v.detach().to("cpu", dt).contiguous().clone() for k, v in sorted(peft_state_dict(pairs).items())}
    cfg = {
        "r": int(rank),
        "lora_alpha": float(alpha) if not float(alpha).is_integer() else int(alpha),
        "target_modules": sorted(set(target_modules)),
        "init_lora_weights": True,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
    }
    meta = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in cfg.items()}, indent=2, sort_keys=True),
        LAYERCTL_KEY: json.dumps(info or {}, sort_keys=True, default=str),
    }
    return _atomic_save(tensors, Path(path), meta, overwrite)


def to_diffusers(weights: LoraWeights, path, dtype: Optional[str] = None, overwrite: bool = False,
                 info: Optional[dict] = None) -> Path:
    """Write any LoRA in the peft layout. Per-module scales are folded into ``up`` (alpha = r for every
    module), so the merged weights do not depend on how a reader treats alpha."""
    import torch

    pairs, ranks = {}, Counter()
    for mod, p in weights.pairs.items():
        up = p.up.to(torch.float32) * p.scale if p.scale != 1.0 else p.up
        pairs[mod] = (up, p.down)
        ranks[p.rank] += 1
    rank = ranks.most_common(1)[0][0]
    rank_pattern = {m: p.rank for m, p in weights.pairs.items() if p.rank != rank}
    alpha_pattern = {m: p.rank for m, p in weights.pairs.items() if p.rank != rank}
    targets = sorted({target_of(m) for m in weights.pairs})
    meta_info = dict(weights.info())
    meta_info.update(info or {})
    return save_peft_lora(path, pairs, rank, rank, targets, meta_info, dtype or _dtype_name(weights), overwrite,
                          alpha_pattern, rank_pattern)


def target_of(module: str) -> str:
    """The peft target-module name of a module path: its last part (``to_q``), or ``to_out.0``."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _dtype_name(weights: LoraWeights) -> str:
    import torch

    dt = next(iter(weights.pairs.values())).up.dtype
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dt, "fp32")


def to_layerdiffuse(weights: LoraWeights, path, unet_config=None, dtype: Optional[str] = None,
                    overwrite: bool = False, info: Optional[dict] = None) -> Path:
    """Write the official LayerDiffuse layout: ``diffusion_model.<ldm key>::lora::0`` (up, scale folded
    in) and ``::lora::1`` (down), no alpha tensor; keys sorted (like the released files). The UNet
    config and the original metadata go to the file's metadata, so the way back needs no model."""
    import torch

    from layerctl.models.patches import Patch, PatchEntry, write_patch

    cfg = _config_of(unet_config) or _config_from_metadata(weights.metadata)
    if cfg is None:
        cfg = detect_unet_config({m: (tuple(p.up.shape), tuple(p.down.shape)) for m, p in weights.pairs.items()})[1]
    entries = []
    for mod, p in weights.pairs.items():
        up = p.up.to(torch.float32) * p.scale if p.scale != 1.0 else p.up
        entries.append(PatchEntry(mod + ".weight", "diffusers", "lora", up=up, down=p.down))
    meta_info = dict(weights.info())
    meta_info["unet_config"] = cfg
    meta_info.update(info or {})
    meta = {LAYERCTL_KEY: json.dumps(meta_info, sort_keys=True, default=str)}
    return write_patch(Patch(entries), path, dtype=_dtype(dtype or _dtype_name(weights)), overwrite=overwrite,
                       unet_config=cfg, metadata=meta)


def export_lora(src, out, fmt: str, model_config=None, dtype: Optional[str] = None, overwrite: bool = False) -> dict:
    """``layerctl export-lora``: convert between the peft and the LayerDiffuse layouts.

    Returns facts: formats, pairs, ranks, and the largest absolute difference between the weights
    the input and the written output merge into (read back from the written file).
    """
    if fmt not in ("layerdiffuse", "diffusers"):
        raise LayerctlError(f"--format must be 'layerdiffuse' or 'diffusers' (got '{fmt}')")
    if dtype not in (None, "auto", "fp16", "bf16", "fp32"):
        raise LayerctlError(f"--dtype must be auto, fp16, bf16 or fp32 (got '{dtype}')")
    dtype = None if dtype in (None, "auto") else dtype
    src_p, out_p = Path(src).expanduser(), Path(out).expanduser()
    if out_p.exists() and not overwrite:
        raise LayerctlError(f"{out_p} exists (use --overwrite to replace it)")
    if out_p.resolve() == src_p.resolve():
        raise LayerctlError("the output must be another file than the input")
    if out_p.suffix.lower() != ".safetensors":
        raise LayerctlError(f"{out_p}: the output must end in .safetensors")
    weights = read_lora(src_p, model_config)
    in_fmt = detect_format(_keys(src_p))
    if fmt == "layerdiffuse":
        to_layerdiffuse(weights, out_p, model_config, dtype, overwrite)
    else:
        to_diffusers(weights, out_p, dtype, overwrite)
    back = read_lora(out_p, model_config)
    diff = max_merged_difference(weights, back)
    return {
        "input": str(src_p),
        "input_format": in_fmt,
        "output": str(out_p),
        "format": fmt,
        "pairs": len(weights.pairs),
        "ranks": weights.ranks(),
        "max_abs_diff": diff,
        "skipped": len(weights.skipped),
    }
