"""Loaded models and the LayerDiffuse parts that go on them, cached for a session.

A :class:`ModelKit` is one loaded base model plus what layerctl puts on it: the transparent
decoder/encoder nets and the layer weights merged into (or hooked onto) its UNet. Weights are
swapped between jobs and the originals restored bit for bit. A :class:`ModelCache` loads each
base model once and shares the transparent-VAE nets between kits. Pipelines receive the cache
and ask it for a kit when their inputs have been checked (so bad input never waits on a load).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from layerctl.errors import LayerctlError
from layerctl.progress import log

DEFAULT_MODEL_ENV = "LAYERCTL_MODEL"


class ActiveWeights:
    """Layer weights currently applied to a model's UNet (attention sharing or merged patches)."""

    def __init__(self, key, names, patcher=None, handles=()):
        self.key = key
        self.names = list(names)
        self.patcher = patcher
        self.handles = list(handles)

    def remove(self) -> None:
        if self.patcher is not None:
            self.patcher.remove()
        for h in reversed(self.handles):
            h.restore()
        self.handles = []

    def mark_stale(self) -> None:
        """Weights partly removed mid-run (a hand-over): the next use re-applies from scratch."""
        self.key = ("handed-over", id(self))


def precheck_files(opts) -> None:
    """Fail fast (before any model loads) on weight files that are named but missing."""
    from layerctl.models.weights import check_file

    for path, what in [
        (opts.transparent_decoder, "transparent decoder"),
        (opts.transparent_encoder, "transparent encoder"),
        (opts.layer_weights, "layer weights file"),
    ] + [(p, "LoRA file") for p in opts.lora]:
        if path:
            check_file(path, what)


LAYER_FAMILIES = "SD1.5 (sd15, toy, tiny) and SDXL (sdxl, tiny-xl)"


def family_of_ref(ref: str) -> str:
    """The model family of a model reference ("sd15", "sdxl", "flux"), without loading anything."""
    from layerctl.backends.registry import get_backend, resolve_model_ref

    name, _inner = resolve_model_ref(ref)
    return get_backend(name).family


def precheck_family(family: str, req, mode: str = "rgba") -> None:
    """What a model family cannot do, refused before it loads (one line, exit 2)."""
    if family != "flux":
        return
    if mode != "rgba":
        flag = {"bg2fg": "gen --bg", "fg2bg": "gen --fg", "joint": "gen --joint"}.get(mode, mode)
        raise LayerctlError(
            f"{flag} is a layer mode; FLUX.1 has no LayerDiffuse layer weights (only text/image -> RGBA). "
            f"Layer modes run on {LAYER_FAMILIES} models"
        )
    if "negative" in getattr(req, "model_fields_set", ()) and getattr(req, "negative", None):
        raise LayerctlError(
            "FLUX.1 takes no negative prompt (it has no classifier-free guidance: --cfg sets its distilled "
            "guidance); leave out --negative"
        )
    if getattr(req, "clip_skip", 1) != 1:
        raise LayerctlError("--clip-skip applies to SD1.5 and SDXL models; FLUX.1 reads T5 (and CLIP's pooled output only)")
    if getattr(req, "controlnet", None):
        raise LayerctlError("--controlnet runs on SD1.5/SDXL models only; FLUX.1 ControlNets are not supported")
    given = [f"--{k.replace('_', '-')}" for k in ("sampler", "schedule", "prediction_type", "zero_snr", "cfg_rescale")
             if getattr(req, k, None) is not None]
    if given:
        raise LayerctlError(f"{', '.join(given)}: FLUX.1 samples with its own flow-matching Euler schedule; "
                            f"leave these out (they choose SD1.5/SDXL samplers)")


def check_offload(opts) -> str:
    """The --offload mode; anything but "none" needs a CUDA device (refused before anything loads)."""
    mode = getattr(opts, "offload", "none") or "none"
    if mode != "none":
        from layerctl.backends.base import resolve_device

        dev = resolve_device(opts.device)
        if dev.type != "cuda":
            raise LayerctlError(
                f"--offload {mode} moves model parts between CPU memory and a CUDA GPU, and this run is on "
                f"{dev.type} (no CUDA device): leave out --offload"
            )
    return mode


class ModelKit:
    """One loaded base model with its transparent VAE nets and the layer weights in use."""

    def __init__(self, model, vae_nets: dict, quiet: bool = False, offload: str = "none"):
        self.model = model
        self.quiet = quiet
        self.offload = offload  # "none", "model" or "sequential" (enabled once the first weights are on)
        self.offloaded = False
        self._vae_nets = vae_nets  # shared by the kits of one cache
        self.active: Optional[ActiveWeights] = None
        self.controlnets: dict = {}  # ControlNets loaded for this model (layerctl.pipelines.controlnet)

    # ------------------------------------------------------------ transparent VAE nets
    def _vae_net(self, kind: str, path: Optional[str], wdir: Optional[str]):
        import torch

        from layerctl.models import codec
        from layerctl.models import transparent_vae as tv
        from layerctl.models.weights import check_file, find_official

        model = self.model
        if path:
            src = check_file(path, f"transparent {kind}")
        elif model.tiny:
            src = None
        else:
            src = find_official([model.official[kind]], wdir)[0]
        dtype = torch.float32 if model.device.type == "cpu" else torch.float16
        key = (kind, model.family, str(src) if src else f"tiny-{model.backend}", str(model.device), dtype)
        if key not in self._vae_nets:
            if src is None:
                net = codec.tiny_net(kind, model.family).to(model.device, dtype)
            else:  # the family's layout (4 or 16 latent channels); the other family's file is refused
                net = codec.load_net(src, kind, model.family, model.device, dtype)
            if kind == "decoder" and model.device.type == "cpu":
                net = tv.use_channels_last(net)  # faster on CPU (bench/RESULTS.md: decode)
            self._vae_nets[key] = (net.eval(), src.name if src else f"tiny-{kind}")
        return self._vae_nets[key]

    def decoder(self, opts):
        """(transparent decoder net, file name) for these options."""
        return self._vae_net("decoder", opts.transparent_decoder, opts.weights_dir)

    def encoder(self, opts):
        """(latent-transparency encoder net, file name) for these options."""
        return self._vae_net("encoder", opts.transparent_encoder, opts.weights_dir)

    # ------------------------------------------------------------ layer weights
    def clear_weights(self) -> None:
        if self.active is not None:
            self.active.remove()
            self.active = None

    def use_weights(self, role: str, opts, strength: float = 1.0, explicit: Optional[str] = None) -> ActiveWeights:
        """Apply the layer weights for `role` (official file, --layer-weights, or tiny stand-ins), plus --lora.

        The previous job's weights are restored first unless they are the same.
        """
        from layerctl.models.weights import check_file, find_official

        model = self.model
        explicit = explicit or opts.layer_weights
        if explicit:
            src = check_file(explicit, "layer weights file")
        elif model.tiny:
            src = None
        else:
            if role not in model.official:
                raise LayerctlError(f"the {model.backend} backend has no official weights for '{role}'")
            src = find_official([model.official[role]], opts.weights_dir)[0]
        loras = tuple((str(check_file(p, "LoRA file")), opts.lora_scale) for p in opts.lora)
        key = (role, str(src), strength, loras)
        if self.active is not None and self.active.key == key:
            return self.active
        if self.offloaded and self.offload == "sequential":
            raise LayerctlError(
                "with --offload sequential a model keeps the layer weights and LoRAs of its first job; this job asks "
                "for others: run it separately, or use --offload model"
            )
        self.clear_weights()
        self.active = self._apply(role, src, strength, loras, key)
        self._enable_offload()
        return self.active

    def _enable_offload(self) -> None:
        """diffusers' CPU offload on the model's pipeline, after the weights are merged (sequential offload
        leaves the modules' weights on the meta device, where nothing can be merged any more)."""
        if self.offload == "none" or self.offloaded:
            return
        pipe, device = self.model.pipe, self.model.device
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        self.offloaded = True

    def _apply(self, role, src, strength, loras, key) -> ActiveWeights:
        from layerctl.models.lora_format import apply_lora_file
        from layerctl.models.patches import apply_patch
        from layerctl.models.weights import is_attention_sharing_file, tiny_attention_sharing, tiny_patch

        model = self.model
        if model.family == "flux":
            return self._apply_flux(role, src, strength, loras, key)
        handles, patcher, names = [], None, []
        try:
            for path, scale in loras:
                handles.append(apply_lora_file(model.unet, path, scale))
                names.append(Path(path).name)
            if src is None:  # tiny stand-ins, same code paths as the official files
                names.append(f"tiny-{role}")
                if model.family == "sd15":
                    from layerctl.core.frames import FILE_SPECS

                    frames, control = FILE_SPECS[role]
                    patcher = tiny_attention_sharing(model, frames, control, seed=sum(map(ord, role)))
                else:
                    handles.append(apply_patch(model.unet, tiny_patch(model, role), strength))
            else:
                names.append(src.name)
                if is_attention_sharing_file(src):
                    from layerctl.models.attention_sharing import load_attention_sharing

                    patcher = load_attention_sharing(model.unet, src, device=model.device, dtype=model.dtype)
                else:
                    handles.append(apply_patch(model.unet, src, strength))
            if patcher is not None:
                patcher.install()
        except BaseException:
            for h in reversed(handles):
                h.restore()
            raise
        return ActiveWeights(key, names, patcher=patcher, handles=handles)

    def _apply_flux(self, role, src, strength, loras, key) -> ActiveWeights:
        """FLUX.1: --lora files, then the layer LoRA (layerlora.safetensors, or the tiny stand-in),
        each merged into the transformer and restorable bit for bit."""
        from layerctl.models.flux_lora import fuse_lora, fuse_lora_file, tiny_layer_lora

        transformer = self.model.transformer
        handles, names = [], []
        try:
            for path, scale in loras:
                handles.append(fuse_lora_file(transformer, path, scale))
                names.append(Path(path).name)
            if src is None:
                handles.append(fuse_lora(transformer, tiny_layer_lora(transformer), strength, f"tiny-{role}"))
                names.append(f"tiny-{role}")
            else:
                handles.append(fuse_lora_file(transformer, src, strength))
                names.append(src.name)
        except BaseException:
            for h in reversed(handles):
                h.restore()
            raise
        return ActiveWeights(key, names, handles=handles)


class ModelCache:
    """Loads each base model once (per device, dtype, attention) and hands out its kit."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._kits: dict = {}
        self._vae_nets: dict = {}

    def model_ref(self, opts) -> str:
        if opts.model:
            return opts.model
        env = os.environ.get(DEFAULT_MODEL_ENV)
        if env:
            return env
        log(
            "layerctl: no --model given (nor LAYERCTL_MODEL): using the bundled 'toy' model (64x64 toy world). "
            "For real images pass --model with an SD1.5/SDXL diffusers folder, hub id or .safetensors file.",
            self.quiet,
        )
        return "toy"

    def family(self, opts) -> str:
        """The family of the model these options name ("sd15", "sdxl", "flux"), without loading it."""
        return family_of_ref(opts.model or os.environ.get(DEFAULT_MODEL_ENV) or "toy")

    def precheck(self, opts, mode: str = "rgba") -> None:
        """Refuse what the model's family cannot do before it loads (see precheck_family)."""
        check_offload(opts)
        try:
            family = self.family(opts)
        except LayerctlError:
            return  # an unknown reference: loading it says why, after the output checks as before
        precheck_family(family, opts, mode)

    def _key(self, opts) -> tuple:
        from layerctl.backends.base import LoadOptions

        return (self.model_ref(opts), opts.device, opts.dtype, opts.attention, LoadOptions.of(opts, self.quiet),
                check_offload(opts))

    def adopt(self, model, opts) -> ModelKit:
        """Serve requests with these options from an already built model (benchmarks, notebooks: a model
        made in memory) instead of loading their reference."""
        key = self._key(opts)
        self._kits[key] = ModelKit(model, self._vae_nets, self.quiet, key[-1])
        return self._kits[key]

    def kit(self, opts) -> ModelKit:
        from layerctl.backends.registry import load_model

        key = self._key(opts)
        ref, load_options, offload = key[0], key[4], key[5]
        if key not in self._kits:
            model = load_model(ref, opts.device, opts.dtype, opts.attention, load_options)
            if model.notes:
                log(f"layerctl: {model.notes}", self.quiet)
            model.quiet = self.quiet  # the model's own notices (a prompt cut at the chunk cap) follow --quiet
            self._kits[key] = ModelKit(model, self._vae_nets, self.quiet, offload)
        return self._kits[key]

    def kits(self) -> list[ModelKit]:
        return list(self._kits.values())

    def kit_of(self, model) -> Optional[ModelKit]:
        return next((k for k in self._kits.values() if k.model is model), None)

    def close(self) -> None:
        for kit in self._kits.values():
            kit.clear_weights()
        self._kits.clear()
        self._vae_nets.clear()
