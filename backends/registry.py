"""The backend registry: from a model reference to the backend that loads it.

Built-in backends live in this package; a third-party package adds one by exposing a
:class:`layerctl.backends.base.Backend` subclass under the entry-point group
``layerctl.backends``.
"""

from __future__ import annotations

from typing import Any

from layerctl.backends.base import Backend, LoadedModel, LoadOptions, resolve_device, resolve_dtype, setup_attention
from layerctl.errors import LayerctlError


ENTRY_POINT_GROUP = "layerctl.backends"
# key prefixes that mark a single-file FLUX.1 transformer checkpoint
FLUX_TRANSFORMER_KEYS = ("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks.")


_SCAN: dict = {}  # the last entry-point scan: {"key": (entry_points function, sys.path), "found": {name: ep}}


def _entry_point_backends() -> dict[str, Any]:
    """Name -> entry point of the group, scanned once per process (reading every installed package's
    metadata takes ~6 ms, and each request asks twice); scanned again when sys.path or
    importlib.metadata.entry_points changes (a path added, a test's stand-in)."""
    import sys
    from importlib import metadata

    key = (metadata.entry_points, tuple(sys.path))
    if _SCAN.get("key") != key:
        _SCAN["found"] = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
        _SCAN["key"] = key
    return _SCAN["found"]


def available_backends() -> dict[str, type]:
    """Registry name -> Backend class, from the entry-point group (built-ins always present)."""
    found: dict[str, Any] = dict(_entry_point_backends())
    # Built-ins even when the package metadata is stale (e.g. running from a checkout).
    for name, target in {
        "tiny": "layerctl.backends.tiny:TinyBackend",
        "tiny-xl": "layerctl.backends.tiny:TinyXLBackend",
        "toy": "layerctl.backends.toy:ToyBackend",
        "sd15": "layerctl.backends.sd15:SD15Backend",
        "sdxl": "layerctl.backends.sdxl:SDXLBackend",
        "flux": "layerctl.backends.flux:FluxBackend",
        "tiny-flux": "layerctl.backends.tiny_flux:TinyFluxBackend",
    }.items():
        found.setdefault(name, target)
    return found


def _resolve(target) -> type:
    import importlib

    if isinstance(target, str):
        mod, _, attr = target.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return target.load()


def get_backend(name: str) -> Backend:
    backends = available_backends()
    if name not in backends:
        raise LayerctlError(f"unknown backend '{name}' (known: {', '.join(sorted(backends))})")
    return _resolve(backends[name])()


def resolve_model_ref(ref: str | None, family: str | None = None) -> tuple[str, str]:
    """Model reference -> (backend name, reference for that backend).

    `tiny`, `tiny-xl` and any registered backend name stand for themselves;
    `NAME:REF` picks a backend explicitly; a diffusers folder or a single-file
    checkpoint is recognised from its contents; anything else is a hub id.
    `family` ("sd15"/"sdxl", from --family) overrides what a folder, file or hub id looks like.
    """
    import json
    import os
    from pathlib import Path

    backends = available_backends()
    if ref in backends:
        return ref, ref
    if ref and ":" in ref and ref.split(":", 1)[0] in backends and not os.path.exists(ref):
        name, rest = ref.split(":", 1)
        return name, rest
    p = Path(ref).expanduser()
    if p.is_dir():
        index = p / "model_index.json"
        if not index.exists():
            raise LayerctlError(f"unknown model reference '{ref}': a folder without model_index.json (not a diffusers model)")
        cls = json.loads(index.read_text()).get("_class_name", "")
        if "Flux" in cls:
            return "flux", str(p)
        found = "sdxl" if "XL" in cls else "sd15"
        if family and family != found:
            raise LayerctlError(f"--family {family}, but the folder {ref} holds a {cls or 'pipeline'} ({found})")
        return found, str(p)
    if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise LayerctlError(
            f"refusing to unpickle {ref}: pickle checkpoints can run code. Convert it to .safetensors first"
        )
    if p.suffix == ".safetensors":
        if not p.exists():
            raise LayerctlError(f"model file not found: {ref}")
        from safetensors import safe_open

        from layerctl.backends.single_file import detect_family

        try:
            with safe_open(str(p), "pt") as f:
                keys = list(f.keys())
        except Exception as exc:  # noqa: BLE001
            raise LayerctlError(f"cannot read checkpoint {ref}: {exc}") from None
        if any(k.startswith(FLUX_TRANSFORMER_KEYS) for k in keys):  # a FLUX.1 transformer (BFL or diffusers names)
            return "flux", str(p)
        return detect_family(p, family)[0], str(p)
    if p.exists():
        raise LayerctlError(f"unknown model reference '{ref}': not a diffusers folder or a .safetensors checkpoint")
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        if family:
            return family, ref
        if "flux" in ref.lower():
            return "flux", ref
        return ("sdxl" if "xl" in ref.lower() else "sd15"), ref
    raise LayerctlError(
        f"unknown model reference '{ref}' (give a diffusers folder, a .safetensors file, a hub id like "
        f"'owner/name', or one of: {', '.join(sorted(backends))})"
    )


def load_model(ref: str, device="auto", dtype="auto", attention="auto", options: LoadOptions | None = None) -> LoadedModel:
    import inspect

    from layerctl.quiet import quiet_libraries

    quiet_libraries()
    options = options or LoadOptions()
    name, inner = resolve_model_ref(ref, options.family)
    backend = get_backend(name)
    if options.family and backend.family and backend.family != options.family:
        raise LayerctlError(f"--family {options.family} does not fit the model '{ref}' (a {backend.family} model)")
    if options.config and not inner.endswith(".safetensors"):
        raise LayerctlError(f"--config is for single-file .safetensors checkpoints, not for '{ref}'")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if "options" in inspect.signature(backend.load).parameters:
        model = backend.load(inner, dev, dt, attention=attention, options=options)
    else:  # a plugin written before LoadOptions
        model = backend.load(inner, dev, dt, attention=attention)
    custom = getattr(model, "configure_attention", None)  # a family without a UNet (FLUX.1) sets its own
    model.attention = custom(attention) if custom is not None else setup_attention(model.unet, attention, dev)
    return model
