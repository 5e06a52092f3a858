"""What the CLI and recipes call: a Session that loads models once and runs jobs.

    from layerctl.api import Session
    from layerctl.requests import GenRequest
    with Session() as s:
        records = s.gen(GenRequest(prompt="glass cup", model="tiny", out="cup.png", seed=7))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from layerctl import __version__
from layerctl.errors import LayerctlError
from layerctl.progress import log, steps_bar

DEFAULT_MODEL_ENV = "LAYERCTL_MODEL"
SAMPLER = "DPM++ 2M Karras"


@dataclass
class OutputRecord:
    role: str  # "rgba", "fg", "bg", "blended", "psd"
    path: str
    seed: Optional[int] = None
    index: int = 0
    metadata: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"role": self.role, "path": self.path, "seed": self.seed, "index": self.index}


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text or "").strip("-").lower()
    return s[:limit].strip("-") or "image"


def expand_out(template: str, n: int, seeds: list[int], prompt: str = "") -> list[Path]:
    """Output paths for a batch: {i}, {seed}, {prompt_slug} fill in; a plain name gets _0001... when n > 1."""
    has_field = any(k in template for k in ("{i}", "{seed}"))
    paths = []
    for i in range(n):
        t = template
        if "{" in t:
            try:
                t = t.format(i=i, seed=seeds[i], prompt_slug=slug(prompt))
            except (KeyError, IndexError, ValueError) as exc:
                raise LayerctlError(f"bad output template '{template}': {exc} (fields: {{i}}, {{seed}}, {{prompt_slug}})") from None
        if n > 1 and not has_field:
            p = Path(t)
            t = str(p.with_name(f"{p.stem}_{i:04d}{p.suffix}"))
        paths.append(Path(t))
    if len(set(paths)) != len(paths):
        raise LayerctlError(f"output template '{template}' gives the same file for several images")
    return paths


def check_outputs(paths, overwrite: bool, suffixes=(".png",)) -> None:
    from layerctl.imageio import check_writable

    for p in paths:
        if suffixes and Path(p).suffix.lower() not in suffixes:
            raise LayerctlError(f"cannot write '{p}': output must end in {' or '.join(suffixes)}")
        check_writable(p, overwrite)


def rgba_to_uint8(t) -> "object":
    """[4,H,W] float tensor in [0,1] -> HxWx4 uint8 array (rounded once)."""
    import numpy as np

    arr = t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return np.round(arr * 255.0).astype(np.uint8)


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


class Session:
    """Loads each base model once; swaps layer weights between jobs (restoring the originals)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._models: dict = {}
        self._vae_nets: dict = {}
        self._active: dict = {}  # id(model) -> ActiveWeights

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for model_id, active in list(self._active.items()):
            active.remove()
        self._active.clear()
        self._models.clear()
        self._vae_nets.clear()

    # ------------------------------------------------------------ models and weights
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

    def precheck_files(self, opts) -> None:
        """Fail fast (before any model loads) on weight files that are named but missing."""
        from layerctl.weights import check_file

        for path, what in [
            (opts.transparent_decoder, "transparent decoder"),
            (opts.transparent_encoder, "transparent encoder"),
            (opts.layer_weights, "layer weights file"),
        ] + [(p, "LoRA file") for p in opts.lora]:
            if path:
                check_file(path, what)

    def model(self, opts):
        from layerctl.backend import load_model

        ref = self.model_ref(opts)
        key = (ref, opts.device, opts.dtype, opts.attention)
        if key not in self._models:
            self._models[key] = load_model(ref, opts.device, opts.dtype, opts.attention)
            if self._models[key].notes:
                log(f"layerctl: {self._models[key].notes}", self.quiet)
        return self._models[key]

    def _vae_net(self, model, kind: str, path: Optional[str], wdir: Optional[str]):
        import torch

        from layerctl import transparent_vae as tv
        from layerctl.weights import check_file, find_official, tiny_decoder, tiny_encoder

        if path:
            src = check_file(path, f"transparent {kind}")
        elif model.tiny:
            src = None
        else:
            src = find_official([model.official[kind]], wdir)[0]
        dtype = torch.float32 if model.device.type == "cpu" else torch.float16
        key = (kind, str(src) if src else f"tiny-{model.backend}", str(model.device), dtype)
        if key not in self._vae_nets:
            if src is None:
                net = (tiny_decoder() if kind == "decoder" else tiny_encoder()).to(model.device, dtype)
            elif kind == "decoder":
                net = tv.load_decoder(src, device=model.device, dtype=dtype)
            else:
                net = tv.load_encoder(src, device=model.device, dtype=dtype)
            if kind == "decoder" and model.device.type == "cpu":
                net = tv.use_channels_last(net)  # faster on CPU (bench/RESULTS.md: decode)
            self._vae_nets[key] = (net.eval(), src.name if src else f"tiny-{kind}")
        return self._vae_nets[key]

    def decoder(self, model, opts):
        return self._vae_net(model, "decoder", opts.transparent_decoder, opts.weights_dir)

    def encoder(self, model, opts):
        return self._vae_net(model, "encoder", opts.transparent_encoder, opts.weights_dir)

    def clear_weights(self, model) -> None:
        active = self._active.pop(id(model), None)
        if active is not None:
            active.remove()

    def use_weights(self, model, role: str, opts, strength: float = 1.0, explicit: Optional[str] = None) -> ActiveWeights:
        """Apply the layer weights for `role` (official file, --layer-weights, or tiny stand-ins), plus --lora.

        The previous job's weights are restored first unless they are the same.
        """
        from layerctl.weights import check_file, find_official

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
        active = self._active.get(id(model))
        if active is not None and active.key == key:
            return active
        self.clear_weights(model)
        active = self._apply(model, role, src, strength, loras, key)
        self._active[id(model)] = active
        return active

    def _apply(self, model, role, src, strength, loras, key) -> ActiveWeights:
        from layerctl.weights import tiny_attention_sharing, tiny_patch

        handles, patcher, names = [], None, []
        try:
            for path, scale in loras:
                from layerctl.lora import apply_lora_file

                handles.append(apply_lora_file(model.unet, path, scale))
                names.append(Path(path).name)
            if src is None:  # tiny stand-ins, same code paths as the official files
                names.append(f"tiny-{role}")
                if model.family == "sd15":
                    frames, control = {"rgba": (1, False), "joint": (3, False), "fg2bg": (2, True), "bg2fg": (2, True)}[role]
                    patcher = tiny_attention_sharing(model, frames, control, seed=sum(map(ord, role)))
                else:
                    from layerctl.patches import apply_patch

                    handles.append(apply_patch(model.unet, tiny_patch(model, role), strength))
            else:
                names.append(src.name)
                if _is_attention_sharing(src):
                    from layerctl.layers import load_attention_sharing

                    patcher = load_attention_sharing(model.unet, src, device=model.device, dtype=model.dtype)
                else:
                    from layerctl.patches import apply_patch

                    handles.append(apply_patch(model.unet, src, strength))
            if patcher is not None:
                patcher.install()
        except BaseException:
            for h in reversed(handles):
                h.restore()
            raise
        return ActiveWeights(key, names, patcher=patcher, handles=handles)

    # ------------------------------------------------------------ jobs
    def gen(self, req) -> list[OutputRecord]:
        try:
            mode = req.mode()
        except ValueError as exc:
            raise LayerctlError(str(exc)) from None
        if mode != "rgba":
            from layerctl import modes

            return modes.gen_layers(self, req, mode)
        if req.init or req.mask or req.hires or req.controlnet:
            from layerctl import edit

            return edit.gen_edit(self, req)
        return self._gen_rgba(req)

    def decompose(self, req) -> list[OutputRecord]:
        from layerctl import modes

        return modes.decompose(self, req)

    def base_metadata(self, model, req, mode: str, steps: int, cfg: float, width: int, height: int) -> dict:
        return {
            "prompt": getattr(req, "prompt", None),
            "negative": req.negative,
            "steps": steps,
            "cfg": cfg,
            "size": [width, height],
            "model": model.ref,
            "backend": model.backend,
            "family": model.family,
            "mode": mode,
            "sampler": SAMPLER,
            "tta": req.tta,
            "layerctl_version": __version__,
        }

    def _gen_rgba(self, req) -> list[OutputRecord]:
        from layerctl.pipeline import DenoiseSpec, decode_transparent, denoise, make_noise

        if not req.out:
            raise LayerctlError("--out is required (the PNG to write; {i} and {seed} fill in for batches)")
        n = req.batch
        base_seed = req.seed if req.seed is not None else new_seed()
        seeds = [base_seed + i for i in range(n)]
        paths = expand_out(req.out, n, seeds, req.prompt)
        check_outputs(paths, req.overwrite)
        if req.psd:
            check_outputs([req.psd], req.overwrite, suffixes=(".psd",))
        self.precheck_files(req)
        model = self.model(req)
        width, height = req.width or model.native_size, req.height or model.native_size
        steps = req.steps or model.default_steps
        cfg = req.cfg if req.cfg is not None else model.default_cfg
        decoder, decoder_name = self.decoder(model, req)
        active = self.use_weights(model, "rgba", req, req.weight)
        use_cfg = cfg > 1.0
        embeds = model.encode_prompt([req.prompt] * n, [req.negative] * n, use_cfg, width, height)
        if active.patcher is not None:
            from layerctl.layers import make_cond_mark

            active.patcher.set_control(None)
            active.patcher.set_prompt_overrides(None)
            # rows are [negatives..., positives...]; the mark is 1 for uncond rows
            active.patcher.set_cond_mark(make_cond_mark([True] * n + [False] * n if use_cfg else [False] * n, 1))
        with steps_bar("generating", self.quiet) as bar:
            spec = DenoiseSpec(embeds=embeds, noise=make_noise(seeds, 1, height, width), steps=steps, cfg=cfg, progress=bar)
            latents = denoise(model, spec)
        rgba = decode_transparent(model, decoder, latents, tta=req.tta)
        meta = self.base_metadata(model, req, "rgba", steps, cfg, width, height)
        meta.update(layer_weights=active.names, transparent_decoder=decoder_name, role="rgba")
        return self.write_images([("rgba", p, rgba[i], seeds[i], i) for i, p in enumerate(paths)], meta, req)

    def write_images(self, items, meta: dict, req) -> list[OutputRecord]:
        """items: (role, path, [4 or 3,H,W] tensor, seed, index). Writes PNGs (+ preview, + PSD)."""
        from layerctl.imageio import save_png

        records = []
        layers_for_psd = []
        for role, path, img, seed, index in items:
            arr = rgba_to_uint8(img)
            m = dict(meta, seed=seed, role=role)
            save_png(path, arr, m, overwrite=req.overwrite)
            records.append(OutputRecord(role, str(path), seed, index, m))
            layers_for_psd.append((role, arr))
            if getattr(req, "preview", False) and arr.shape[-1] == 4:
                from layerctl.imagemath import checkerboard, to_float, to_uint8

                prev = Path(path).with_name(Path(path).stem + ".preview.png")
                save_png(prev, to_uint8(checkerboard(to_float(arr))), dict(m, role="preview"), overwrite=req.overwrite)
                records.append(OutputRecord("preview", str(prev), seed, index, m))
        if getattr(req, "psd", None):
            records.append(self.write_psd(req.psd, layers_for_psd, req.overwrite, meta))
        return records

    def write_psd(self, path, layers, overwrite: bool, meta: dict) -> OutputRecord:
        """Layers (role, HxWx{3,4} uint8) bottom -> top, named by role, as one PSD."""
        import numpy as np

        from layerctl.psd import write_psd

        order = {"bg": 0, "blended": 1, "fg": 2, "rgba": 3}
        ordered = sorted(layers, key=lambda kv: order.get(kv[0], 9))
        named, seen = [], {}
        for role, arr in ordered:
            if arr.shape[-1] == 3:
                arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
            seen[role] = seen.get(role, 0) + 1
            name = role if seen[role] == 1 else f"{role} {seen[role]}"
            named.append((name, arr, (0, 0)))
        write_psd(path, named, overwrite=overwrite)
        return OutputRecord("psd", str(path), meta.get("seed"), 0, meta)


def _is_attention_sharing(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(k.startswith(("hookers.", "kwargs_encoder.")) for k in f.keys())
    except Exception as exc:  # noqa: BLE001
        raise LayerctlError(f"cannot read weights file {path}: {exc}") from None
