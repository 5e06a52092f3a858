"""train-lora: the UNet weights that make a frozen base model draw transparent latents and image layers.

One config object (`LoraTrainConfig`, filled from a YAML recipe) and one visible loop (`train`),
nanoGPT style. Two modes:

``mode: transparent`` (text -> RGBA; what ``layer_xl_transparent_attn`` does)::

    x0      = (mean + std * E_a(rgba) * 300) * latent_scale      transparent latent, E_a frozen
    x_t     = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps              t ~ U{0..T-1}, per image
    loss    = || UNet_{W + scale * B A}(x_t, t, text) - target ||^2 target: eps / v / x0, by the
                                                                  scheduler's prediction type
    trained: a peft LoRA (rank, alpha, target modules; default rank 256 on to_q/k/v/out of every
    attention, like the official weights). Text encoders and VAE frozen.

``mode: layers`` (the SD1.5 joint model, ``layer_sd15_joint`` layout): a triplet [fg, bg, blended]
is one group of 3 frames, batch laid out frame-fastest ``(b f)``; fg is a transparent latent,
bg and blended are samples of the frozen VAE's posterior. All frames share the group's t. With
probability ``layers.clean_probability`` one frame (chosen from ``layers.clean_layers``) keeps its
clean latent: its noise is zeroed (``x_t = sqrt(abar_t) x0``) and it is left out of the loss,
so the one model learns joint generation and fg->bg, bg->fg, blended->layers. Each frame gets its
own caption (``layerctl.pipelines.layers.layer_prompts``: fg = "fg prompt, prompt", bg = "bg prompt,
prompt", blended = prompt). Trained: an ``AttentionSharingPatcher`` (per-frame LoRAs and the
cross-frame attention), saved in the official layout. ``layers.kind: fg2bg`` / ``bg2fg`` train the
two-frame control models instead (``layer_sd15_fg2bg`` / ``bg2fg`` layouts): frames [bg, blended] or
[fg, blended], the known layer of the same triplet (fg flattened on grey, or bg) fed per group to
the control encoder, which trains with the units; no clean frame.

Randomness is a pure function of position: sample p's crop, flip, caption dropout and clean
frame come from (seed, p); micro-batch m's timesteps and noise from (seed, m, rank). A resumed
run therefore repeats an uninterrupted one exactly; only the step counter, the trainable
weights and the optimizer state are saved.

Checkpoints: ``OUT/checkpoints/step-NNNNNNN/`` (weights file, ``state.pt``, ``state.json``),
written under a temporary name and renamed; the last one's weights are copied to ``OUT/``.

The user guide is docs/train-lora.md; the parts shared with the other trainer are in training/harness.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import Field, field_validator, model_validator

from layerctl.core.frames import LAYER_MODES, SD15_LAYOUTS
from layerctl.errors import LayerctlError
from layerctl.training import harness as H
from layerctl.training.harness import list_checkpoints, lr_factor, read_log  # noqa: F401 - part of this module's API
from layerctl.requests import SamplingOptions
from layerctl.training.config import ImageDataOptions, RunOptions, Section, SyntheticOptions

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: pipe.load_lora_weights(OUT) finds it
LAYERS_FILE = "layers_joint.safetensors"  # attention-sharing units in the official layer_sd15_joint layout
FRAMES = SD15_LAYOUTS["joint"][0]  # the joint model's frame order (official)
# layers.kind -> (frames in the official order, the known layer fed to the control encoder)
LAYER_KINDS = {kind: SD15_LAYOUTS[kind] for kind in LAYER_MODES}
VAL_DIR = "validation"

__all__ = ["LoraTrainConfig", "load_config", "train", "read_log", "LORA_FILE", "LAYERS_FILE"]


# ---------------------------------------------------------------- config


class LoraModelOptions(Section):
    model: str = Field("tiny", description="base model (tiny, tiny-xl, diffusers folder, hub id, .safetensors)")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    family: Optional[Literal["sd15", "sdxl"]] = Field(None, description="sd15 or sdxl, when the model reference does not say it plainly")
    config: Optional[str] = Field(None, description="diffusers config folder for a single-file checkpoint of other sizes")
    no_variant: bool = Field(False, description="hub downloads: the default files even in fp16/bf16 on a GPU")
    weights_dir: Optional[str] = Field(None, description="folder with the official LayerDiffuse files")
    transparent_encoder: Optional[str] = Field(None, description="E_a weights (default: the model's official encoder)")
    transparent_decoder: Optional[str] = Field(None, description="D_a weights for validation images (default: official)")
    gradient_checkpointing: bool = False


class LoraOptions(Section):
    """The peft LoRA of `mode: transparent`."""

    rank: int = Field(256, gt=0)
    alpha: Optional[float] = Field(None, gt=0, description="scale = alpha / rank; default: rank (scale 1, as the official weights)")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["default", "gaussian"] = Field("default", description="peft init: up = 0, down kaiming (default) or gaussian")
    init_from: Optional[str] = Field(None, description="start from this LoRA file (peft or LayerDiffuse layout, same rank)")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if not v:
            raise ValueError("target_modules must name at least one module (e.g. to_q)")
        return v


class LayersOptions(Section):
    """The attention-sharing layer model of `mode: layers`."""

    kind: Literal["joint", "fg2bg", "bg2fg"] = Field(
        "joint",
        description="joint: fg, bg, blended together (layer_sd15_joint); fg2bg / bg2fg: two frames with the "
        "known layer through a control encoder (layer_sd15_fg2bg / layer_sd15_bg2fg)",
    )
    rank: int = Field(256, gt=0, description="per-frame LoRA rank (official: 256)")
    control_width: int = Field(256, ge=8, multiple_of=8,
                               description="fg2bg / bg2fg: control encoder width (official: 256; small models may use less)")
    clean_probability: float = Field(0.5, ge=0, le=1, description="joint: chance that one layer of a triplet is kept clean")
    clean_layers: list[Literal["fg", "bg", "blended"]] = Field(default_factory=lambda: ["fg", "bg", "blended"])
    init_from: Optional[str] = Field(None, description="start from an attention-sharing file (e.g. layer_sd15_joint.safetensors)")

    @field_validator("clean_layers")
    @classmethod
    def _layers(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("clean_layers lists a layer twice")
        return v


class DataOptions(ImageDataOptions):
    source: str = Field(
        "synthetic",
        description="transparent: 'synthetic' or a folder of RGBA images / HF imagefolder; "
        "layers: 'synthetic' or a layers dataset folder (metadata.jsonl, or fg/ bg/ [blended/])",
    )
    count: Optional[int] = Field(None, gt=0, description="synthetic: distinct samples (needed for cache_latents); null: endless")
    crop_scale: tuple[float, float] = (0.7, 1.0)
    prompt: Optional[str] = Field(None, description="recipe-level caption: for items without one (prompt_mode: fallback) or all")
    prompt_mode: Literal["fallback", "always"] = "fallback"
    missing_captions: Literal["error", "empty"] = Field("error", description="items with no caption at all: stop before training, or train them with an empty caption")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="chance of an empty caption per image/layer (helps CFG)")
    cache_latents: bool = Field(False, description="encode every item once (centre crops, no flips)")
    cache_text: bool = Field(False, description="encode each caption once (all of them up front for a finite dataset)")


class LossOptions(Section):
    snr_gamma: Optional[float] = Field(None, gt=0, description="min-SNR weighting (e.g. 5.0); null: plain MSE")
    noise_offset: float = Field(0.0, ge=0, description="add offset * N(0,1) per channel to the noise")
    latents: Literal["sample", "mean"] = Field(
        "sample", description="RGB frames: a draw from the VAE posterior (the usual), or its mean (for a base UNet trained on means)")


class OptimOptions(Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class LayerPrompt(Section):
    prompt: str = ""
    fg: str = ""
    bg: str = ""


class ValidationOptions(Section, SamplingOptions):
    """Validation samples; `sampler`, `schedule`, `prediction_type`, `zero_snr`, `cfg_rescale` as in gen."""

    every: int = Field(500, gt=0, description="steps between validations (loss on fixed samples + images)")
    at_start: bool = Field(True, description="validate the starting weights (the baseline)")
    prompts: list[Union[str, LayerPrompt]] = Field(default_factory=list, description="default: captions of the first items")
    count: int = Field(2, ge=0, description="prompts taken from the data when `prompts` is empty")
    seeds: list[int] = Field(default_factory=lambda: [0])
    steps: int = Field(20, gt=0)
    cfg: float = Field(7.0, ge=0)
    negative: str = "bad, ugly"
    tta: bool = False
    images: bool = True
    loss_samples: int = Field(8, ge=0, description="fixed samples for the validation loss (held out for synthetic data)")
    loss_timesteps: int = Field(4, gt=0, description="fixed timesteps per sample, evenly spread")


class LoraTrainConfig(RunOptions):
    """Every knob of a train-lora run; a YAML recipe fills it (unknown keys are errors). Run keys shared
    with train-vae (seed, grad_accum, mixed_precision, ...) are in training/config.RunOptions."""

    mode: Literal["transparent", "layers"] = "transparent"
    out_dir: str = "runs/train-lora"
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(1, gt=0, description="images (transparent) or triplets (layers) per process and micro-batch")
    checkpoint_every: int = Field(500, gt=0)
    model: LoraModelOptions = Field(default_factory=LoraModelOptions)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    layers: LayersOptions = Field(default_factory=LayersOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    loss: LossOptions = Field(default_factory=LossOptions)
    optim: OptimOptions = Field(default_factory=OptimOptions)
    validation: ValidationOptions = Field(default_factory=ValidationOptions)

    @model_validator(mode="after")
    def _check(self):
        if self.data.cache_latents and self.data.source == "synthetic" and self.data.count is None:
            raise ValueError("data.cache_latents with the synthetic source needs data.count (how many samples to cache)")
        return self


def load_config(path, overrides=()) -> LoraTrainConfig:
    from layerctl.io.yamlio import load_model_yaml

    return load_model_yaml(path, LoraTrainConfig, overrides=list(overrides))


# ---------------------------------------------------------------- captions and records (no model needed)


def sidecar_caption(path: Path) -> Optional[str]:
    """The text of NAME.txt next to NAME.png (stripped; None when absent or empty)."""
    p = Path(path).with_suffix(".txt")
    if not p.is_file():
        return None
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def pick_caption(own: Optional[str], prompt: Optional[str], mode: str) -> Optional[str]:
    """The caption an item trains with: the recipe prompt (mode 'always'), else its own, else the prompt."""
    if prompt and mode == "always":
        return prompt
    if own and own.strip():
        return own.strip()
    return prompt or None


@dataclass
class RGBARecord:
    path: Path
    caption: Optional[str]


@dataclass
class Triplet:
    id: str
    fg: Path
    bg: Path
    blended: Optional[Path]  # None: computed as fg over bg
    fg_prompt: str = ""
    bg_prompt: str = ""
    prompt: str = ""


def _image_size(path: Path) -> Optional[tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001
        return None


def read_triplets(root, prompt: Optional[str] = None, prompt_mode: str = "fallback") -> list[Triplet]:
    """Training triplets of a folder: a `metadata.jsonl` (the `layerctl dataset layers` layout, `blended`
    optional) or `fg/`, `bg/` and optional `blended/` subfolders matched by file stem, with per-layer
    captions in sidecar `.txt` files (`fg/ID.txt`, `bg/ID.txt`, and `blended/ID.txt` or `ID.txt`)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayerctlError(f"layers dataset folder not found: {root}")
    meta = root / "metadata.jsonl"
    out: list[Triplet] = []
    if meta.is_file():
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LayerctlError(f"cannot read {meta}: {exc}") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LayerctlError(f"{meta}:{i}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise LayerctlError(f"{meta}:{i}: each line must be a JSON object")
            missing = [k for k in ("fg", "bg") if not isinstance(row.get(k), str)]
            if missing:
                raise LayerctlError(f"{meta}:{i}: missing {' and '.join(missing)} (file paths relative to {root})")
            paths = {k: root / row[k] for k in ("fg", "bg") }
            blended = root / row["blended"] if isinstance(row.get("blended"), str) and row["blended"] else None
            for k, p in list(paths.items()) + [("blended", blended)]:
                if p is not None and not p.is_file():
                    raise LayerctlError(f"{meta}:{i}: {k} file {p.relative_to(root) if p.is_relative_to(root) else p} is missing")
            whole = next((row[k] for k in ("prompt", "text", "caption") if isinstance(row.get(k), str)), "")
            out.append(Triplet(str(row.get("id") or Path(row["fg"]).stem), paths["fg"], paths["bg"], blended,
                               str(row.get("fg_prompt") or ""), str(row.get("bg_prompt") or ""), whole))
    elif (root / "fg").is_dir() and (root / "bg").is_dir():
        from layerctl.training.data import IMAGE_EXTS

        def index(folder: Path, exts) -> dict[str, Path]:
            found = {}
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    if p.suffix.lower() in exts and not p.name.startswith("."):
                        found.setdefault(p.stem, p)
            return found

        rgb_exts = tuple(IMAGE_EXTS) + (".jpg", ".jpeg")
        fgs, bgs, bls = index(root / "fg", IMAGE_EXTS), index(root / "bg", rgb_exts), index(root / "blended", rgb_exts)
        lone = sorted(set(fgs) ^ set(bgs))
        if lone:
            side = "bg" if lone[0] in fgs else "fg"
            raise LayerctlError(f"{root}: {len(lone)} layer(s) without a partner, e.g. '{lone[0]}' has no {side}/ image")
        for stem in sorted(fgs):
            out.append(Triplet(stem, fgs[stem], bgs[stem], bls.get(stem),
                               sidecar_caption(fgs[stem]) or "", sidecar_caption(bgs[stem]) or "",
                               (sidecar_caption(bls[stem]) if stem in bls else None) or sidecar_caption(root / stem) or ""))
    else:
        raise LayerctlError(
            f"{root} is not a layers dataset: no metadata.jsonl and no fg/ + bg/ folders "
            "(make one with 'layerctl dataset layers')"
        )
    if not out:
        raise LayerctlError(f"{root}: no training triplets")
    if prompt and prompt_mode == "always":
        for t in out:
            t.prompt = prompt
    elif prompt:
        for t in out:
            if not (t.prompt or t.fg_prompt or t.bg_prompt):
                t.prompt = prompt
    return out


def check_triplets(triplets: list[Triplet]) -> dict:
    """Header-only checks: fg needs alpha; every layer readable; the layers of a triplet share a size."""
    from layerctl.training.data import probe_image

    problems = {"no_alpha": [], "unreadable": [], "mismatched": []}
    for t in triplets:
        kind = probe_image(t.fg)
        if kind == "unreadable":
            problems["unreadable"].append(str(t.fg))
            continue
        if kind == "opaque":
            problems["no_alpha"].append(str(t.fg))
        sizes = {"fg": _image_size(t.fg), "bg": _image_size(t.bg)}
        if t.blended is not None:
            sizes["blended"] = _image_size(t.blended)
        bad = [k for k, s in sizes.items() if s is None]
        if bad:
            problems["unreadable"].append(str(getattr(t, bad[0])))
            continue
        if len(set(sizes.values())) > 1:
            problems["mismatched"].append(f"{t.id} (" + ", ".join(f"{k} {s[0]}x{s[1]}" for k, s in sizes.items()) + ")")
    return problems


# ---------------------------------------------------------------- data sources (raw items by index)


def _hwc_to_tensor(arr):
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()


class RGBASource:
    """Transparent mode: item i -> straight RGBA HxWx4 float32 and its caption."""

    def __init__(self, records: Optional[list[RGBARecord]] = None, synthetic=None, count: Optional[int] = None):
        self.records = records
        self.synthetic = synthetic
        self.n = len(records) if records is not None else count

    def caption(self, i: int) -> str:
        if self.records is not None:
            return self.records[i].caption or ""
        return ", ".join(o.caption for o in self.synthetic.plan(i, 64))  # as sample(i).caption, nothing drawn

    def load(self, i: int, res: int, rng) -> dict:
        from layerctl.training import data as D

        if self.records is None:
            s = self.synthetic.sample(i, res)
            return {"rgba": s.rgba, "caption": s.caption}
        rec = self.records[i]
        rgba = D.load_rgba(rec.path)
        h, w = rgba.shape[:2]
        box = D.random_box(h, w, rng, self._scale) if rng is not None else D.centre_box(h, w)
        return {"rgba": D.crop_resize(rgba, box, res), "caption": rec.caption or ""}

    _scale = (1.0, 1.0)


def _gradient_background(h: int, w: int, c1, c2, horizontal: bool) -> np.ndarray:
    t = np.linspace(0.0, 1.0, w if horizontal else h, dtype=np.float32)
    t = t[None, :, None] if horizontal else t[:, None, None]
    return (np.asarray(c1, np.float32) * (1 - t) + np.asarray(c2, np.float32) * t) * np.ones((h, w, 1), np.float32)


class SyntheticLayers:
    """Procedural triplets: a synthetic RGBA foreground over an opaque background (a two-colour
    gradient with a few opaque objects), the blended picture computed. Deterministic by (seed, i)."""

    def __init__(self, seed: int, opts: SyntheticOptions):
        from layerctl.training.synthetic import SyntheticSource

        kw = dict(shapes=opts.shapes, materials=opts.materials, colours=opts.colours,
                  min_objects=opts.min_objects, max_objects=opts.max_objects)
        self.seed = int(seed)
        self.fg = SyntheticSource(seed=seed, **kw)
        self.bgobj = SyntheticSource(seed=seed + 7919, materials=["solid", "gradient"], max_objects=2)

    def _bg_plan(self, i: int):
        from layerctl.training.synthetic import COLOURS

        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xB6, int(i)])
        names = list(COLOURS)
        c1, c2 = rng.choice(len(names), 2, replace=False)
        return names[c1], names[c2], bool(rng.random() < 0.5)

    def prompts(self, i: int) -> tuple[str, str, str]:
        c1, c2, _ = self._bg_plan(i)
        fg = ", ".join(o.caption for o in self.fg.plan(i, 64))
        objs = ", ".join(o.caption for o in self.bgobj.plan(i, 64))
        bg = f"{c1} and {c2} wall with {objs}"
        return fg, bg, f"{fg} in front of a {bg}"

    def load(self, i: int, res: int, rng) -> dict:
        from layerctl.dataset import composite_rgb
        from layerctl.training.synthetic import COLOURS

        c1, c2, horizontal = self._bg_plan(i)
        bg = _gradient_background(res, res, COLOURS[c1], COLOURS[c2], horizontal)
        objs = self.bgobj.sample(i, res).rgba
        bg = composite_rgb(objs, bg)
        fg = self.fg.sample(i, res).rgba
        fp, bp, pr = self.prompts(i)
        return {"fg": fg, "bg": bg, "blended": composite_rgb(fg, bg), "captions": (fp, bp, pr)}


class TripletSource:
    """Layers mode from files: item i -> fg RGBA, bg RGB, blended RGB (computed when absent), one crop box."""

    def __init__(self, triplets: list[Triplet]):
        self.triplets = triplets
        self.n = len(triplets)
        self._scale = (1.0, 1.0)

    def prompts(self, i: int) -> tuple[str, str, str]:
        t = self.triplets[i]
        return t.fg_prompt, t.bg_prompt, t.prompt

    def load(self, i: int, res: int, rng) -> dict:
        from layerctl.dataset import composite_rgb
        from layerctl.training import data as D

        t = self.triplets[i]
        fg = D.load_rgba(t.fg)
        bg = D.load_rgba(t.bg)
        bl = D.load_rgba(t.blended) if t.blended is not None else None
        h, w = fg.shape[:2]
        box = D.random_box(h, w, rng, self._scale) if rng is not None else D.centre_box(h, w)
        fg = D.crop_resize(fg, box, res)
        bg = D.crop_resize(np.concatenate([bg[..., :3], np.ones_like(bg[..., :1])], -1), box, res)[..., :3]
        if bl is None:
            bl = composite_rgb(fg, bg)
        else:
            bl = D.crop_resize(np.concatenate([bl[..., :3], np.ones_like(bl[..., :1])], -1), box, res)[..., :3]
        return {"fg": fg, "bg": bg, "blended": bl, "captions": self.prompts(i)}


# ---------------------------------------------------------------- the training stream (by position)


def layer_texts(fg_prompt: str, bg_prompt: str, prompt: str) -> tuple[str, str, str]:
    """Per-frame captions [fg, bg, blended], the way the layer modes build them at inference."""
    from layerctl.pipelines.layers import layer_prompts

    t = layer_prompts(prompt or None, fg_prompt or None, bg_prompt or None)
    return t["fg"], t["bg"], t["blended"]


def frames_of(cfg) -> tuple[str, ...]:
    """The frames of one training sample, in the order the UNet batch holds them."""
    return ("rgba",) if cfg.mode == "transparent" else LAYER_KINDS[cfg.layers.kind][0]


def control_of(cfg) -> Optional[str]:
    """The layer fed to the control encoder (fg2bg: 'fg', bg2fg: 'bg'), None without one."""
    return None if cfg.mode == "transparent" else LAYER_KINDS[cfg.layers.kind][1]


def control_pixels(batch: dict, role: str):
    """The control image of every group: [b,3,H,W] in [0,1]; a foreground flattened on grey 0.5
    (as `gen --fg` feeds it), a background as it is."""
    x = batch[role].float()
    if role == "fg":
        a = x[:, 3:4]
        return 0.5 + (x[:, :3] - 0.5) * a
    return x[:, :3]


class TrainStream:
    """Map-style dataset: position p -> one training item, a pure function of (seed, p).

    Finite sources go round a seeded permutation per epoch; endless synthetic ones use p as the
    index. ``pixels=False`` (cached latents) skips loading images: the item holds its index only.
    """

    def __init__(self, cfg: LoraTrainConfig, source, n: Optional[int], augment: bool, pixels: bool = True,
                 train: bool = True):
        self.cfg = cfg
        self.mode = cfg.mode
        self.source = source
        self.n = n
        self.augment = augment
        self.pixels = pixels
        self.train = train
        self.seed = int(cfg.seed)
        self._perm_epoch = -1
        self._perm = None
        source._scale = tuple(cfg.data.crop_scale)

    def __len__(self):
        return 2**62 if self.train or self.n is None else self.n

    def index(self, pos: int) -> int:
        if self.n is None:
            return int(pos)
        if not self.train:
            return int(pos) % self.n
        epoch, k = divmod(int(pos), self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x10A4, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def rng(self, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, 0x10AA, int(pos)])

    def captions(self, idx: int) -> tuple[str, ...]:
        d = self.cfg.data
        if self.mode == "transparent":
            return (pick_caption(self.source.caption(idx), d.prompt, d.prompt_mode) or "",)
        fp, bp, pr = self.source.prompts(idx)
        if d.prompt and d.prompt_mode == "always":
            pr = d.prompt
        elif d.prompt and not (fp or bp or pr):
            pr = d.prompt
        texts = dict(zip(FRAMES, layer_texts(fp, bp, pr)))
        return tuple(texts[f] for f in frames_of(self.cfg))

    def __getitem__(self, pos: int) -> dict:
        import torch

        idx = self.index(pos)
        rng = self.rng(pos)
        crop_rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xC409, int(pos)]) if self.augment else None
        flip = bool(self.augment and self.cfg.data.hflip and rng.random() < 0.5)
        texts = list(self.captions(idx))
        if self.train and self.cfg.data.caption_dropout > 0:
            texts = ["" if rng.random() < self.cfg.data.caption_dropout else t for t in texts]
        clean = -1
        if self.train and self.mode == "layers" and self.cfg.layers.kind == "joint":
            lay = self.cfg.layers
            if lay.clean_layers and rng.random() < lay.clean_probability:
                clean = FRAMES.index(lay.clean_layers[int(rng.integers(len(lay.clean_layers)))])
        item: dict[str, Any] = {"index": idx, "pos": int(pos), "texts": texts, "clean": clean}
        if self.pixels:
            raw = self.source.load(idx, self.cfg.data.resolution, crop_rng)
            keys = ("rgba",) if self.mode == "transparent" else FRAMES
            for k in keys:
                arr = raw[k]
                if flip:
                    arr = arr[:, ::-1]
                item[k] = _hwc_to_tensor(arr)
        item["clean"] = torch.tensor(clean)
        return item


def collate(items: list[dict]) -> dict:
    import torch

    out: dict[str, Any] = {
        "index": [it["index"] for it in items],
        "pos": [it["pos"] for it in items],
        "texts": [it["texts"] for it in items],
        "clean": torch.stack([it["clean"] for it in items]),
    }
    for k in ("rgba",) + FRAMES:
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out


# ---------------------------------------------------------------- the data plan (checked before any model loads)


class LoraDataPlan:
    """The training stream, the validation samples and prompts, with every data problem reported
    (as one LayerctlError) before a model loads."""

    def __init__(self, cfg: LoraTrainConfig):
        from layerctl.training import data as D

        d = cfg.data
        self.notes: list[str] = []
        self.n: Optional[int] = None
        if cfg.mode == "transparent":
            if d.source == "synthetic":
                from layerctl.training.synthetic import SyntheticSource

                s = d.synthetic
                opts = dict(shapes=s.shapes, materials=s.materials, colours=s.colours, min_objects=s.min_objects, max_objects=s.max_objects)
                self.source = RGBASource(synthetic=SyntheticSource(seed=cfg.seed, **opts), count=d.count)
                self.val_source = RGBASource(synthetic=SyntheticSource(seed=cfg.seed + 1_000_003, **opts), count=None)
                self.n = d.count
                self.describe = f"synthetic RGBA (seed {cfg.seed}{f', {d.count} samples' if d.count else ''}), {d.resolution}px"
            else:
                train_dir, _val = D.find_splits(d.source)
                scan = D.scan_folder(train_dir, "dataset")
                records, sources = [], {"metadata.jsonl": 0, ".txt": 0, "recipe prompt": 0}
                missing = []
                for r in scan.records:
                    own = r.caption if r.caption and r.caption.strip() else None
                    where = "metadata.jsonl" if own else None
                    if own is None:
                        own = sidecar_caption(r.path)
                        where = ".txt" if own else None
                    cap = pick_caption(own, d.prompt, d.prompt_mode)
                    if cap and (where is None or (d.prompt and d.prompt_mode == "always")):
                        where = "recipe prompt"
                    if cap is None:
                        missing.append(r.path)
                    else:
                        sources[where] += 1
                    records.append(RGBARecord(r.path, cap))
                self.notes.append(scan.summary())
                if scan.no_alpha:
                    self.notes.append(
                        f"[yellow]{len(scan.no_alpha)} image(s) without alpha are left out[/] (transparent mode needs RGBA), "
                        f"e.g. {scan.no_alpha[0]}"
                    )
                self.notes.append("captions: " + ", ".join(f"{v} from {k}" for k, v in sources.items() if v)
                                  + (f", {len(missing)} missing" if missing else ""))
                if missing and d.missing_captions == "error":
                    raise LayerctlError(
                        f"{len(missing)} of {len(records)} image(s) have no caption (no metadata.jsonl text, no sidecar "
                        f".txt), e.g. {missing[0]}; add captions, set data.prompt, or data.missing_captions: empty"
                    )
                self.source = RGBASource(records=records)
                self.val_source = self.source
                self.n = len(records)
                self.describe = f"{scan.root}: {len(records)} RGBA images, {d.resolution}px"
        else:
            if d.source == "synthetic":
                self.source = SyntheticLayers(cfg.seed, d.synthetic)
                self.val_source = SyntheticLayers(cfg.seed + 1_000_003, d.synthetic)
                self.n = d.count
                self.describe = f"synthetic triplets (seed {cfg.seed}{f', {d.count} samples' if d.count else ''}), {d.resolution}px"
            else:
                triplets = read_triplets(d.source, d.prompt, d.prompt_mode)
                probs = check_triplets(triplets)
                nblend = sum(t.blended is None for t in triplets)
                missing = [t.id for t in triplets if not (t.prompt or t.fg_prompt or t.bg_prompt)]
                self.notes.append(
                    f"{d.source}: {len(triplets)} triplets" + (f", {nblend} without blended (computed as fg over bg)" if nblend else "")
                    + (f", {len(missing)} without any caption" if missing else "")
                )
                errors = []
                if probs["mismatched"]:
                    errors.append(f"{len(probs['mismatched'])} triplet(s) with layers of different sizes, e.g. {probs['mismatched'][0]}")
                if probs["no_alpha"]:
                    errors.append(f"{len(probs['no_alpha'])} foreground(s) without alpha, e.g. {probs['no_alpha'][0]}")
                if probs["unreadable"]:
                    errors.append(f"{len(probs['unreadable'])} unreadable image(s), e.g. {probs['unreadable'][0]}")
                if missing and d.missing_captions == "error":
                    errors.append(
                        f"{len(missing)} triplet(s) without any caption (fg_prompt, bg_prompt, prompt), e.g. {missing[0]}; "
                        "set data.prompt or data.missing_captions: empty"
                    )
                if errors:
                    raise LayerctlError(f"layers dataset {d.source}: " + "; ".join(errors))
                self.source = TripletSource(triplets)
                self.val_source = self.source
                self.n = len(triplets)
                self.describe = f"{d.source}: {len(triplets)} triplets, {d.resolution}px"
        augment = not d.cache_latents
        if d.cache_latents:
            self.notes.append("cache_latents: centre crops, no flips (each item is encoded once)")
        self.train = TrainStream(cfg, self.source, self.n, augment=augment, pixels=not d.cache_latents)
        held_out = self.val_source is not self.source
        self.val = TrainStream(cfg, self.val_source, self.n if not held_out else None, augment=False, train=False)
        v = cfg.validation
        self.val_loss_count = v.loss_samples if self.n is None or held_out else min(v.loss_samples, self.n)
        self.val_prompts = self._val_prompts(cfg)

    def _val_prompts(self, cfg: LoraTrainConfig) -> list[tuple[str, ...]]:
        """Per validation prompt: (text,) in transparent mode, (fg, bg, blended) texts in layers mode."""
        v = cfg.validation
        out = []
        if v.prompts:
            for p in v.prompts:
                if cfg.mode == "transparent":
                    out.append((p if isinstance(p, str) else (p.prompt or p.fg),))
                else:
                    lp = LayerPrompt(prompt=p) if isinstance(p, str) else p
                    texts = dict(zip(FRAMES, layer_texts(lp.fg, lp.bg, lp.prompt)))
                    out.append(tuple(texts[f] for f in frames_of(cfg)))
            return out
        n = v.count if self.n is None else min(v.count, self.n)
        for i in range(n):
            out.append(tuple(self.val.captions(self.val.index(i))))
        return out


# ---------------------------------------------------------------- model pieces


def make_denoiser(unet, patcher=None):
    """One nn.Module holding what trains (the peft-wrapped UNet, or the attention-sharing patcher),
    whose forward is the UNet call: DDP / accelerate see a single model and sync its gradients."""
    import torch.nn as nn

    class _Denoiser(nn.Module):
        def __init__(self, unet, patcher):
            super().__init__()
            if patcher is None:
                self.unet = unet  # the peft LoRA layers live inside it
                self._unet_ref = None
            else:
                self.patcher = patcher
                self._unet_ref = [unet]  # frozen; kept out of the module tree

        @property
        def base(self):
            return self.unet if self._unet_ref is None else self._unet_ref[0]

        def forward(self, x, t, hidden, extra, control=None):
            if control is None:
                return self.base(x, t, encoder_hidden_states=hidden, **extra).sample
            # one control image per group; encoded here so that its encoder trains with the units
            signals = self.patcher.kwargs_encoder.encode(control * 2 - 1)
            units = self.patcher.units
            for u in units:
                u.control_signals = signals
            try:
                return self.base(x, t, encoder_hidden_states=hidden, **extra).sample
            finally:
                for u in units:
                    u.control_signals = None

    return _Denoiser(unet, patcher)


def add_peft_lora(unet, opts: LoraOptions):
    """Inject a peft LoRA into the UNet (diffusers' add_adapter); returns the trainable parameters."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha if opts.alpha is not None else opts.rank,
        target_modules=list(opts.target_modules),
        lora_dropout=opts.dropout,
        init_lora_weights="gaussian" if opts.init == "gaussian" else True,
    )
    try:
        unet.add_adapter(cfg)
    except ValueError as exc:
        raise LayerctlError(f"lora.target_modules {list(opts.target_modules)}: {exc}") from None
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


def peft_pairs(unet) -> dict:
    """module -> (up, down) of the UNet's peft LoRA (detached)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet)
    pairs = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            mod = k[: -len(".lora_A.weight")]
            pairs[mod] = (sd[mod + ".lora_B.weight"].detach(), v.detach())
    return pairs


def load_peft_pairs(unet, pairs: dict, scale_to_alpha: float = 1.0) -> None:
    """Set the UNet's peft LoRA from module -> (up, down); `scale_to_alpha` divides up (a file whose
    scale differs from this run's alpha/r keeps its merged delta)."""
    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name in pairs and hasattr(module, "lora_A"):
                up, down = pairs[name]
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                if tuple(a.shape) != tuple(down.shape) or tuple(b.shape) != tuple(up.shape):
                    raise LayerctlError(
                        f"lora.init_from: '{name}' has rank {down.shape[0]}, this run's lora.rank is {a.shape[0]}"
                    )
                a.copy_(down.to(a))
                b.copy_((up.float() * scale_to_alpha).to(b))


def _cat_embeds(parts):
    """Concatenate PromptEmbeds row blocks (hidden and every tensor inside extra) along the batch."""
    import torch

    from layerctl.backends.base import PromptEmbeds

    def cat(xs):
        if torch.is_tensor(xs[0]):
            return torch.cat(xs)
        if isinstance(xs[0], dict):
            return {k: cat([x[k] for x in xs]) for k in xs[0]}
        return xs[0]

    return PromptEmbeds(hidden=cat([p.hidden for p in parts]), extra=cat([p.extra for p in parts]) if parts[0].extra else {})


class TextCache:
    """Caption -> frozen text-encoder output (one row), memoised when caching is on."""

    def __init__(self, model, size: int, enabled: bool):
        self.model = model
        self.size = size
        self.enabled = enabled
        self.memo: dict[str, Any] = {}

    def _encode(self, texts: list[str]):
        return self.model.encode_prompt(list(texts), [], False, self.size, self.size)

    def encode(self, texts: list[str]):
        if not self.enabled:
            return self._encode(texts)
        todo = sorted({t for t in texts if t not in self.memo})
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            emb = self._encode(chunk)
            for j, t in enumerate(chunk):
                self.memo[t] = _slice_embeds(emb, j)
        rows = [self.memo[t] for t in texts]
        longest = max(r.hidden.shape[1] for r in rows)
        if any(r.hidden.shape[1] != longest for r in rows):  # long captions: pad the others with empty chunks
            if "" not in self.memo:
                self.memo[""] = _slice_embeds(self._encode([""]), 0)
            rows = [_pad_chunks(r, self.memo[""].hidden, longest) for r in rows]
        return _cat_embeds(rows)


def _pad_chunks(emb, empty, length: int):
    """A one-row PromptEmbeds padded to `length` tokens with copies of the empty prompt's chunk
    (what encoding it together with a longer text gives: every chunk is encoded on its own)."""
    import torch

    from layerctl.backends.base import PromptEmbeds

    missing = (length - emb.hidden.shape[1]) // empty.shape[1]
    if missing <= 0:
        return emb
    return PromptEmbeds(hidden=torch.cat([emb.hidden] + [empty.to(emb.hidden)] * missing, dim=1), extra=emb.extra)


def _slice_embeds(emb, j: int):
    import torch

    from layerctl.backends.base import PromptEmbeds

    def sl(x):
        if torch.is_tensor(x):
            return x[j : j + 1].detach().clone()
        if isinstance(x, dict):
            return {k: sl(v) for k, v in x.items()}
        return x

    return PromptEmbeds(hidden=sl(emb.hidden), extra=sl(emb.extra))


def encode_pixels(model, encoder, frames: tuple, batch: dict, device):
    """Batch -> latent statistics, unscaled: (mean [N,4,h,w], std or None) per row, frame-fastest.
    Transparent frames ('rgba', 'fg') are deterministic (mean + std * offset; std None in
    transparent mode, zeros in a layer group); RGB frames give the posterior (mean, std) to sample from."""
    import torch

    from layerctl.models.transparent_vae import transparent_latent

    p = next(encoder.parameters())
    with torch.no_grad():
        if frames == ("rgba",):
            rgba = batch["rgba"].to(device, torch.float32)
            lat = transparent_latent(encoder, rgba.to(p.device, p.dtype), model.vae_encode).float()
            return lat, None
        means, stds = [], []
        rgb_roles = [f for f in frames if f != "fg"]
        if rgb_roles:
            rgb = torch.cat([batch[r] for r in rgb_roles]).to(device, torch.float32)
            mean, std = model.vae_encode(rgb * 2 - 1)
            b = rgb.shape[0] // len(rgb_roles)
        for f in frames:
            if f == "fg":
                fg = batch["fg"].to(device, torch.float32)
                lat = transparent_latent(encoder, fg.to(p.device, p.dtype), model.vae_encode).float()
                means.append(lat)
                stds.append(torch.zeros_like(lat))
            else:
                k = rgb_roles.index(f)
                means.append(mean[k * b : (k + 1) * b].float())
                stds.append(std[k * b : (k + 1) * b].float())
        return torch.stack(means, 1).flatten(0, 1), torch.stack(stds, 1).flatten(0, 1)


def sample_generator(seed: int, pos: int, salt: int = 0):
    """The CPU generator of one training sample: a pure function of (seed, position, salt)."""
    import torch

    s = np.random.SeedSequence([seed & 0xFFFFFFFF, 0x7157, int(pos), int(salt)]).generate_state(2)
    return torch.Generator("cpu").manual_seed(int(s[0]) << 32 | int(s[1]))


def draw_noise(seed: int, positions, frames: int, shape, num_timesteps: int, salt: int = 0, timestep=None) -> dict:
    """Per sample (group of `frames` rows): its timestep, posterior noise, diffusion noise and noise offset,
    each drawn from the sample's own generator, so that neither the batch size nor the number of
    processes changes what a sample sees."""
    import torch

    t, eps, noise, off = [], [], [], []
    for p in positions:
        g = sample_generator(seed, p, salt)
        tt = torch.randint(0, int(num_timesteps), (1,), generator=g)
        t.append(tt if timestep is None else torch.tensor([int(timestep)]))
        eps.append(torch.randn((frames, *shape), generator=g))
        noise.append(torch.randn((frames, *shape), generator=g))
        off.append(torch.randn((frames, shape[0], 1, 1), generator=g))
    return {"t": torch.cat(t), "eps": torch.cat(eps), "noise": torch.cat(noise), "offset": torch.cat(off)}


def diffusion_loss(cfg, sched, denoiser, mean, std, embeds, clean, rand: dict, frames: int, device, latent_scale: float,
                   control=None):
    """The standard diffusion loss of a batch; returns (loss, per-row loss).

    ``mean``/``std``: unscaled latent statistics [N,4,h,w] (std None: deterministic latents);
    ``clean``: per group the frame kept clean (-1: none): its noise is zeroed and it is left out
    of the loss; ``rand``: :func:`draw_noise`. Each group's loss is the mean over its noised
    frames; the batch loss is the mean over groups. ``control``: [groups,3,H,W] control images in
    [0,1] (fg2bg / bg2fg) or None.
    """
    import torch
    import torch.nn.functional as F

    n = mean.shape[0]
    groups = n // frames
    lat = mean if std is None or cfg.loss.latents == "mean" else mean + std * rand["eps"].to(device)
    x0 = lat * latent_scale
    noise = rand["noise"].to(device)
    if cfg.loss.noise_offset > 0:
        noise = noise + cfg.loss.noise_offset * rand["offset"].to(device)
    t = rand["t"].repeat_interleave(frames).to(device)
    keep = torch.ones(n, device=device)
    clean_rows = clean.to(device).repeat_interleave(frames)
    is_clean = (clean_rows >= 0) & (clean_rows == torch.arange(n, device=device) % frames)
    if bool(is_clean.any()):
        noise = noise * (~is_clean).float()[:, None, None, None]  # the known layer: its noise zeroed
        keep = (~is_clean).float()
    noisy = sched.add_noise(x0, noise, t)
    ptype = sched.config.prediction_type
    if ptype == "epsilon":
        target = noise
    elif ptype == "v_prediction":
        target = sched.get_velocity(x0, noise, t)
    elif ptype == "sample":
        target = x0
    else:
        raise LayerctlError(f"unsupported prediction type '{ptype}' in the model's scheduler")
    if control is None:
        pred = denoiser(noisy, t, embeds.hidden, embeds.extra).float()
    else:
        pred = denoiser(noisy, t, embeds.hidden, embeds.extra, control.to(device)).float()
    per = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.loss.snr_gamma:
        ac = sched.alphas_cumprod.to(device)[t]
        snr = ac / (1 - ac)
        clipped = torch.clamp(snr, max=cfg.loss.snr_gamma)
        per = per * (clipped / (snr + 1) if ptype == "v_prediction" else clipped / snr)
    keep = keep.view(groups, frames)
    loss = ((per.view(groups, frames) * keep).sum(1) / keep.sum(1).clamp_min(1.0)).mean()
    return loss, per.detach()


# ---------------------------------------------------------------- files


def weights_file(cfg: LoraTrainConfig) -> str:
    if cfg.mode == "transparent":
        return LORA_FILE
    return LAYERS_FILE if cfg.layers.kind == "joint" else f"layers_{cfg.layers.kind}.safetensors"


def file_info(cfg: LoraTrainConfig, model, step: int) -> dict:
    from layerctl import __version__
    from layerctl.models.patches import _plain_config

    info = {
        "trained_by": "layerctl train-lora",
        "layerctl_version": __version__,
        "mode": cfg.mode,
        "base_model": cfg.model.model,
        "backend": model.backend,
        "family": model.family,
        "step": step,
        "resolution": cfg.data.resolution,
        "seed": cfg.seed,
        "unet_config": _plain_config(model.unet),
    }
    if cfg.mode == "transparent":
        info.update(rank=cfg.lora.rank, alpha=cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank)
    else:
        fr = frames_of(cfg)
        info.update(rank=cfg.layers.rank, frames=len(fr), frame_order=list(fr), layout=f"layer_sd15_{cfg.layers.kind}",
                    control=control_of(cfg))
    return info


def write_weights(path: Path, cfg: LoraTrainConfig, model, trainable, step: int) -> Path:
    """The exported weights: a peft LoRA (transparent) or the attention-sharing state dict (layers)."""
    from layerctl.models import lora_format as LF

    info = file_info(cfg, model, step)
    if cfg.mode == "transparent":
        alpha = cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank
        return LF.save_peft_lora(path, trainable, cfg.lora.rank, alpha, cfg.lora.target_modules, info,
                                 dtype=cfg.save_dtype, overwrite=True)
    dt = H.save_dtype(cfg.save_dtype)
    tensors = {k: v.detach().to("cpu", dt).contiguous().clone() for k, v in sorted(trainable.items())}
    return LF._atomic_save(tensors, Path(path), {"format": "pt", LF.LAYERCTL_KEY: json.dumps(info, sort_keys=True, default=str)}, True)


def save_checkpoint(out_dir: Path, step: int, cfg: LoraTrainConfig, model, trainable, state: dict, extra: dict) -> Path:
    """checkpoints/step-N/: the weights file, state.pt, state.json (harness.write_checkpoint)."""
    def write_files(folder: Path) -> None:
        write_weights(folder / weights_file(cfg), cfg, model, trainable, step)

    info = {"mode": cfg.mode, "config": cfg.model_dump(mode="json"), **extra}
    return H.write_checkpoint(out_dir, step, write_files, state, info, cfg.keep_last)


def export_final(out_dir: Path, ckpt: Path, name: str) -> Path:
    H.export_files(out_dir, ckpt, (name,))
    return Path(out_dir) / name


# ---------------------------------------------------------------- validation


def _denoise_images(cfg, model, patcher, decoder, texts: tuple, seed: int, size: int, sampling, control=None) -> dict:
    """One validation sample: role -> [C,H,W] float in [0,1] (fg/rgba RGBA, others RGB).
    ``control``: the [1,3,H,W] control image of fg2bg / bg2fg."""
    from layerctl.pipelines.sampling import DenoiseSpec, decode_rgb, decode_transparent, denoise, make_noise

    v = cfg.validation
    use_cfg = v.cfg > 1.0
    if cfg.mode == "transparent":
        embeds = model.encode_prompt([texts[0]], [v.negative], use_cfg, size, size)
        lat = denoise(model, DenoiseSpec(embeds=embeds, noise=make_noise([seed], 1, size, size), steps=v.steps, cfg=v.cfg,
                                         sampling=sampling, seeds=[seed]))
        return {"rgba": decode_transparent(model, decoder, lat, tta=v.tta)[0].float().cpu()}
    from layerctl.models.attention_sharing import make_cond_mark, repeat_frames

    frames = frames_of(cfg)
    F_ = len(frames)
    chunks = model.prompt_chunks(list(texts) + [v.negative])  # every frame's text to the same token count
    embeds = model.encode_prompt([texts[frames.index("blended")]], [v.negative], use_cfg, size, size, min_chunks=chunks)
    embeds.hidden = repeat_frames(embeds.hidden, F_)
    overrides = [model.encode_prompt([t], [v.negative], False, size, size, min_chunks=chunks).hidden[:1] for t in texts]
    try:
        patcher.set_cond_mark(make_cond_mark([True, False] if use_cfg else [False], F_))
        patcher.set_prompt_overrides(overrides)
        if control is not None:
            patcher.set_control(control)
        lat = denoise(model, DenoiseSpec(embeds=embeds, noise=make_noise([seed], F_, size, size), steps=v.steps,
                                         cfg=v.cfg, frames=F_, sampling=sampling, seeds=[seed]))
    finally:
        patcher.set_prompt_overrides(None)
        patcher.set_cond_mark(None)
        if control is not None:
            patcher.set_control(None)
    out = {}
    for f, role in enumerate(frames):
        if role == "fg":
            out[role] = decode_transparent(model, decoder, lat[f : f + 1], tta=v.tta)[0].float().cpu()
        else:
            out[role] = decode_rgb(model, lat[f : f + 1])[0].float().cpu()
    return out


def validation_images(cfg, model, patcher, decoder, prompts, out_dir: Path, step: int, decoder_name: str,
                      controls=None) -> list[str]:
    """Fixed prompts and seeds -> RGBA/RGB PNGs with metadata under OUT/validation/step-N/.
    ``controls``: per prompt, the [1,3,H,W] control image (fg2bg / bg2fg; held-out samples)."""
    from layerctl import __version__
    from layerctl.core.imagemath import rgba_to_uint8
    from layerctl.io.imageio import save_png
    from layerctl.pipelines.sampling import job_sampling

    v = cfg.validation
    size = cfg.data.resolution
    sampling = job_sampling(v, model, quiet=True)  # the recipe's validation sampler, once per validation
    folder = Path(out_dir) / VAL_DIR / f"step-{step:07d}"
    written = []
    for i, texts in enumerate(prompts):
        for seed in v.seeds:
            imgs = _denoise_images(cfg, model, patcher, decoder, texts, seed, size, sampling,
                                   None if controls is None else controls[i])
            for role, img in imgs.items():
                name = f"{i:02d}-seed{seed}.png" if role == "rgba" else f"{i:02d}-seed{seed}-{role}.png"
                prompt = texts[0] if cfg.mode == "transparent" else texts[frames_of(cfg).index(role)]
                meta = {
                    "prompt": prompt, "negative": v.negative, "seed": seed, "steps": v.steps, "cfg": v.cfg,
                    "size": [size, size], "model": cfg.model.model, "mode": "rgba" if cfg.mode == "transparent" else cfg.layers.kind,
                    "role": role, "train_step": step, "trained_weights": weights_file(cfg), "transparent_decoder": decoder_name,
                    "tta": v.tta, "layerctl_version": __version__, "source": "layerctl train-lora validation",
                    **sampling.metadata(),
                }
                save_png(folder / name, rgba_to_uint8(img), meta, overwrite=True)
                written.append(str(folder / name))
    return written


# ---------------------------------------------------------------- the loop


def _check_inputs(cfg: LoraTrainConfig) -> None:
    """The model family a mode needs and every named weight file, before any model loads."""
    from layerctl.models.weights import check_file

    if cfg.mode == "layers":
        fam = _family_of(cfg.model.model)
        if fam != "sd15":
            raise LayerctlError(
                f"mode: layers trains the SD1.5 attention-sharing joint model (layer_sd15_joint layout); "
                f"'{cfg.model.model}' is an {fam} model (its layer models are concat-conditioned and not trained here)"
            )
    m = cfg.model
    for path, what in ((m.transparent_encoder, "model.transparent_encoder"), (m.transparent_decoder, "model.transparent_decoder"),
                       (cfg.lora.init_from if cfg.mode == "transparent" else None, "lora.init_from"),
                       (cfg.layers.init_from if cfg.mode == "layers" else None, "layers.init_from")):
        if path:
            check_file(path, what)


def _family_of(ref: str) -> str:
    from layerctl.backends.registry import get_backend, resolve_model_ref

    name, _inner = resolve_model_ref(ref)
    return get_backend(name).family


def _add_trainable(cfg: LoraTrainConfig, unet, device, console):
    """(parameters, patcher or None): a peft LoRA (transparent) or an installed AttentionSharingPatcher (layers)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.mode == "transparent":
        params = add_peft_lora(unet, cfg.lora)
        if cfg.lora.init_from:
            from layerctl.models import lora_format as LF

            w = LF.read_lora(cfg.lora.init_from, unet)
            alpha = cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank
            run_scale = alpha / cfg.lora.rank
            missing = sorted(set(peft_pairs(unet)) - set(w.pairs))
            if missing:
                raise LayerctlError(f"lora.init_from {cfg.lora.init_from} has no pair for '{missing[0]}' (target_modules differ?)")
            load_peft_pairs(unet, {m: (p.up.float() * p.scale, p.down) for m, p in w.pairs.items()}, 1.0 / run_scale)
        return params, None
    from layerctl.models.attention_sharing import AttentionSharingPatcher, load_attention_sharing

    n_frames, use_control = len(frames_of(cfg)), control_of(cfg) is not None
    if cfg.layers.init_from:
        patcher = load_attention_sharing(unet, cfg.layers.init_from, frames=n_frames, use_control=use_control, device=device, dtype=torch.float32)
        if patcher.rank != cfg.layers.rank:
            console.print(f"layers.init_from has rank {patcher.rank}: training at that rank (layers.rank {cfg.layers.rank} ignored)")
    else:
        patcher = AttentionSharingPatcher(unet, n_frames, use_control, rank=cfg.layers.rank, control_width=cfg.layers.control_width).to(device)
    patcher.float().requires_grad_(True)
    patcher.install()
    return list(patcher.parameters()), patcher


def _trainable_state(cfg: LoraTrainConfig, unet, patcher) -> dict:
    if cfg.mode == "transparent":
        return {k: (u.detach().float().clone(), d.detach().float().clone()) for k, (u, d) in peft_pairs(unet).items()}
    return {k: v.detach().float().clone() for k, v in patcher.state_dict().items()}


def _set_trainable(cfg: LoraTrainConfig, unet, patcher, state: dict, device) -> None:
    if cfg.mode == "transparent":
        load_peft_pairs(unet, state)
    else:
        patcher.load_state_dict({k: v.to(device) for k, v in state.items()})
        for u in patcher.units:
            u.clear_merged()


def _setup(cfg: LoraTrainConfig, accelerator, mp: str, console) -> dict:
    """The frozen model (text encoders, VAE, UNet), the transparent encoder/decoder, the scheduler,
    the trainable weights, the denoiser and its optimizer - not yet prepared by the accelerator."""
    import torch
    from diffusers import DDPMScheduler

    from layerctl.backends.registry import load_model
    from layerctl.training.vae import load_transparent_net

    device = accelerator.device
    weight_dtype = {"fp16": "fp16", "bf16": "bf16"}.get(mp, "fp32")
    from layerctl.backends.base import LoadOptions

    model = load_model(cfg.model.model, device=str(device), dtype=weight_dtype, attention=cfg.model.attention,
                       options=LoadOptions.of(cfg.model))
    if cfg.mode == "layers" and model.family != "sd15":
        raise LayerctlError(f"mode: layers needs an SD1.5-family model; {cfg.model.model} is {model.family}")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mod = getattr(model.pipe, part, None)
        if mod is not None:
            mod.requires_grad_(False)
            mod.eval()
    encoder, encoder_name = load_transparent_net("encoder", cfg.model.transparent_encoder, model, cfg.model.weights_dir, device)
    decoder, decoder_name = load_transparent_net("decoder", cfg.model.transparent_decoder, model, cfg.model.weights_dir, device)
    encoder.requires_grad_(False)
    decoder.requires_grad_(False)
    unet = model.unet
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params, patcher = _add_trainable(cfg, unet, device, console)
    denoiser = make_denoiser(unet, patcher)
    denoiser.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW([{"params": params, "lr": o.lr, "base_lr": o.lr}], betas=o.betas, weight_decay=o.weight_decay)
    return dict(model=model, encoder=encoder, encoder_name=encoder_name, decoder=decoder, decoder_name=decoder_name, unet=unet,
                sched=DDPMScheduler.from_config(model.scheduler.config), params=params, patcher=patcher, denoiser=denoiser,
                optimizer=optimizer)


def _resume(cfg: LoraTrainConfig, ckpt_path: Path, parts: dict, device, console) -> int:
    """Restore the trainable weights, the optimizer and the RNG from a checkpoint; returns its step."""
    st, info = H.load_checkpoint(ckpt_path)
    if info.get("mode", cfg.mode) != cfg.mode:
        raise LayerctlError(f"{ckpt_path} is a mode: {info.get('mode')} checkpoint; this recipe has mode: {cfg.mode}")
    old_kind = ((info.get("config") or {}).get("layers") or {}).get("kind", "joint")
    if cfg.mode == "layers" and old_kind != cfg.layers.kind:
        raise LayerctlError(f"{ckpt_path} is a layers.kind: {old_kind} checkpoint; this recipe has layers.kind: {cfg.layers.kind}")
    _set_trainable(cfg, parts["unet"], parts["patcher"], st["trainable"], device)
    parts["optimizer"].load_state_dict(st["optimizer"])
    H.set_rng_state(st["rng"])
    start_step = int(info["step"])
    console.print(f"resuming from {ckpt_path} (step {start_step})")
    if start_step >= cfg.steps:
        console.print(f"nothing to do: the checkpoint is at step {start_step} and steps = {cfg.steps}")
    return start_step


class _Run:
    """The parts of one train-lora run that the loop, validation and checkpoints need."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def micro_step(self, batch: dict, step: int, last_ckpt):
        """One micro-batch: the diffusion loss, backward, and (at the accumulation boundary) the optimizer step.

        Returns the loss reduced over processes (one value).
        """
        cfg, acc = self.cfg, self.accelerator
        frames, num_t = len(frames_of(cfg)), int(self.sched.config.num_train_timesteps)
        with acc.accumulate(self.denoiser):
            mean, std, ctrl = self.stats_of(batch)
            rand = draw_noise(cfg.seed, batch["pos"], frames, tuple(mean.shape[1:]), num_t)
            with acc.autocast():
                loss, _per = diffusion_loss(cfg, self.sched, self.denoiser, mean, std, self.embeds_of(batch), batch["clean"], rand,
                                            frames, acc.device, self.model.latent_scale, ctrl)
            v = acc.reduce(loss.detach().float().reshape(1), "mean")
            H.check_finite(v, step, last_ckpt)  # before backward: nothing of this step is applied
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(self.params, cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return v

    def stats_of(self, batch):
        """(mean, std, control images or None) of a batch: from the latent cache, or encoded now."""
        import torch

        cfg, ctrl_role, device = self.cfg, control_of(self.cfg), self.accelerator.device
        if self.latent_cache:
            ms = [self.latent_cache[i] for i in batch["index"]]
            mean = torch.cat([m[0] for m in ms]).to(device)
            std = None if ms[0][1] is None else torch.cat([m[1] for m in ms]).to(device)
            return mean, std, None if ctrl_role is None else torch.cat([m[2] for m in ms])
        mean, std = encode_pixels(self.model, self.encoder, frames_of(cfg), batch, device)
        return mean, std, None if ctrl_role is None else control_pixels(batch, ctrl_role)

    def embeds_of(self, batch):
        return self.texts.encode([t for row in batch["texts"] for t in row])  # frame-fastest

    def val_loss(self) -> Optional[float]:
        import torch

        if self.val_fixed is None:
            return None
        self.denoiser.eval()
        total, count = 0.0, 0
        with torch.no_grad(), self.accelerator.autocast():
            for c in self.val_fixed:
                _loss, per = diffusion_loss(self.cfg, self.sched, self.denoiser, c["mean"], c["std"], c["embeds"], c["clean"], c["rand"],
                                            len(frames_of(self.cfg)), self.accelerator.device, self.model.latent_scale, c.get("control"))
                total += float(per.sum())
                count += per.numel()
        self.denoiser.train()
        return total / max(count, 1)

    def validate(self, step: int) -> Optional[dict]:
        """The fixed-sample validation loss and the validation images, on the main process."""
        cfg, res, plan = self.cfg, None, self.plan
        if self.accelerator.is_main_process:
            res = {"kind": "val", "step": step}
            vl = self.val_loss()
            if vl is not None:
                res["val_loss"] = vl
            if cfg.validation.images and plan.val_prompts:
                self.denoiser.eval()
                with self.accelerator.autocast():
                    res["images"] = validation_images(cfg, self.model, self.patcher, self.decoder, plan.val_prompts, self.out_dir, step,
                                                      self.decoder_name, self.val_controls)
                self.denoiser.train()
            self.log.write({k: v for k, v in res.items() if k != "images"})
            self.console.print(
                f"validation at step {step}: "
                + (f"loss {res['val_loss']:.5f} on {plan.val_loss_count} fixed samples x {cfg.validation.loss_timesteps} timesteps" if vl is not None else "")
                + (f"; {len(res.get('images', []))} image(s) in {self.out_dir / VAL_DIR / f'step-{step:07d}'}" if res.get("images") else "")
            )
        self.accelerator.wait_for_everyone()
        return res

    def checkpoint(self, step: int) -> Optional[Path]:
        cfg, acc, path = self.cfg, self.accelerator, None
        if acc.is_main_process:
            raw_opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            state = {"trainable": _trainable_state(cfg, self.unet, self.patcher), "optimizer": raw_opt.state_dict(), "rng": H.rng_state()}
            world = acc.num_processes
            extra = {"micro_batch": step * cfg.grad_accum, "world_size": world, "data_position": step * cfg.grad_accum * cfg.batch_size * world}
            path = save_checkpoint(self.out_dir, step, cfg, self.model, state["trainable"], state, extra)
            export_final(self.out_dir, path, weights_file(cfg))
        acc.wait_for_everyone()
        return path


def _caches(cfg: LoraTrainConfig, plan, parts: dict, accelerator, console) -> dict:
    """Latent and caption caches (finite data), the fixed validation batches and control images."""
    main, device = accelerator.is_main_process, accelerator.device
    texts = TextCache(parts["model"], cfg.data.resolution, cfg.data.cache_text)
    latent_cache: dict[int, tuple] = {}
    if cfg.data.cache_latents:
        latent_cache = _cache_latents(cfg, plan, parts["model"], parts["encoder"], device, accelerator.process_index,
                                      accelerator.num_processes, accelerator, console if main else None)
    if cfg.data.cache_text and plan.n is not None:
        caps = {t for i in range(plan.n) for t in plan.train.captions(i)} | {""}
        for p in plan.val_prompts:
            caps.update(p)
        texts.encode(sorted(caps))
        console.print(f"cached {len(texts.memo)} caption embeddings")
    # fixed validation samples: their latent statistics, captions, noise and timesteps never change
    val_fixed = _val_fixed(cfg, plan, parts["model"], parts["encoder"], device, texts) if plan.val_loss_count else None
    val_controls = None  # fg2bg / bg2fg validation images: each prompt with the control layer of a held-out sample
    if control_of(cfg) is not None:
        val_controls = [control_pixels(collate([plan.val[i]]), control_of(cfg)) for i in range(len(plan.val_prompts))]
    return dict(texts=texts, latent_cache=latent_cache, val_fixed=val_fixed, val_controls=val_controls)


def train(
    cfg: LoraTrainConfig,
    resume: bool = False,
    resume_from: Optional[str] = None,
    overwrite: bool = False,
    quiet: bool = False,
    stop_after: Optional[int] = None,
) -> dict:
    """Run (or resume) a train-lora job. Returns a summary dict (losses, paths, status).

    `stop_after`: behave as if Ctrl-C came right after that step (tests, smoke runs).
    """
    from rich.console import Console

    out_dir = Path(cfg.out_dir).expanduser()
    console = Console(stderr=True, highlight=False, quiet=quiet)
    # -- everything a user can get wrong, before any model loads
    ckpt_path = H.check_out_dir(out_dir, resume, resume_from, overwrite, "train-lora", also_clear=(VAL_DIR,))
    _check_inputs(cfg)
    plan = LoraDataPlan(cfg)
    console.print(f"data: {plan.describe}")
    for note in plan.notes:
        console.print(f"data: {note}")
    # -- models, optimizer, data
    accelerator, mp = H.start_accelerator(cfg, cfg.model.device, console)
    main, device, world, rank = accelerator.is_main_process, accelerator.device, accelerator.num_processes, accelerator.process_index
    parts = _setup(cfg, accelerator, mp, console)
    start_step = _resume(cfg, ckpt_path, parts, device, console) if ckpt_path is not None else 0
    denoiser, optimizer = accelerator.prepare(parts.pop("denoiser"), parts.pop("optimizer"))
    run = _Run(cfg=cfg, plan=plan, accelerator=accelerator, console=console, out_dir=out_dir, denoiser=denoiser, optimizer=optimizer,
               **parts, **_caches(cfg, plan, parts, accelerator, console))
    batches = iter(H.make_loader(plan.train, cfg.batch_size, start_step * cfg.grad_accum, rank, world, cfg.data.workers, cfg.seed, collate))
    run.log = log = H.RunLog(out_dir, main, cfg.tensorboard, start_step if ckpt_path is not None else None)
    if main:
        H.write_config(out_dir, cfg)
    summary: dict[str, Any] = {"out_dir": str(out_dir), "mode": cfg.mode, "start_step": start_step, "baseline": None,
                               "last_val": None, "weights": str(out_dir / weights_file(cfg))}
    step, status, t_start = start_step, "completed", time.time()
    last_ckpt, last_ckpt_step = ckpt_path, (start_step if ckpt_path is not None else None)
    first_losses: list[float] = []
    recent: list[float] = []
    try:
        if ckpt_path is None and cfg.validation.at_start:
            summary["baseline"] = run.validate(0)
        with H.StopFlag(console if main else None) as stop, H.Reporter(f"train-lora ({cfg.mode})", console, log, cfg.steps, step, cfg.log_every, main and not quiet) as rep:
            while step < cfg.steps:
                factor = lr_factor(step, cfg.optim, cfg.steps)
                H.set_lr((optimizer,), factor)
                total = 0.0
                for _micro in range(cfg.grad_accum):
                    batch = H.next_batch(batches, stop)
                    if batch is None:
                        break
                    v = run.micro_step(batch, step, last_ckpt)
                    total += float(v) / cfg.grad_accum
                else:  # all micro-batches done: one optimizer step was taken
                    step += 1
                    if len(first_losses) < 20:
                        first_losses.append(total)
                    recent = (recent + [total])[-20:]
                    rep.tick(step, lambda: {"loss": total, "lr_factor": factor},
                             lambda rate: f"step {step}/{cfg.steps} loss {total:.5f} {rate:.2f} step/s")
                    with rep.aside():  # steps/s counts training time only
                        if H.due(step, cfg.validation.every, cfg.steps):
                            summary["last_val"] = run.validate(step)
                        if H.due(step, cfg.checkpoint_every, cfg.steps):
                            last_ckpt, last_ckpt_step = run.checkpoint(step), step
                    if (stop_after is not None and step >= stop_after) or stop.stop:
                        status = "interrupted"
                        break
                    continue
                status = "interrupted"  # the micro-batch loop broke: stop requested mid-step
                break
        if step >= cfg.steps:
            status = "completed"
        if status == "interrupted" and last_ckpt_step != step and step > 0:
            last_ckpt, last_ckpt_step = run.checkpoint(step), step
            console.print(f"stopped at step {step}; checkpoint written: {last_ckpt} (continue with --resume)")
    finally:
        log.close()
        if run.patcher is not None:
            run.patcher.remove()
    H.finish_summary(summary, status, step, start_step, t_start, last_ckpt, accelerator)
    summary.update(
        train_loss_first=float(np.mean(first_losses)) if first_losses else None,
        train_loss_last=float(np.mean(recent)) if recent else None,
        decoder=run.decoder_name,
        encoder=run.encoder_name,
        val_loss_start=(summary["baseline"] or {}).get("val_loss"),
        val_loss_end=(summary["last_val"] or {}).get("val_loss"),
    )
    accelerator.end_training()
    return summary


def _cache_latents(cfg, plan, model, encoder, device, rank, world, accelerator, console) -> dict:
    """Encode every item once (centre crop, no flip): index -> (mean, std) rows (CPU)."""
    stream = TrainStream(cfg, plan.source, plan.n, augment=False, pixels=True, train=False)
    mine: dict[int, tuple] = {}
    idxs = list(range(rank, plan.n, world))
    t0 = time.time()
    for start in range(0, len(idxs), max(cfg.batch_size, 4)):
        chunk = idxs[start : start + max(cfg.batch_size, 4)]
        batch = collate([stream[i] for i in chunk])
        mean, std = encode_pixels(model, encoder, frames_of(cfg), batch, device)
        ctrl = control_pixels(batch, control_of(cfg)) if control_of(cfg) else None
        f = len(frames_of(cfg))
        for j, i in enumerate(chunk):
            mine[i] = (mean[j * f : (j + 1) * f].cpu(), None if std is None else std[j * f : (j + 1) * f].cpu(),
                       None if ctrl is None else ctrl[j : j + 1].cpu())
    if world > 1:
        from accelerate.utils import gather_object

        merged: dict[int, tuple] = {}
        for part in gather_object([mine]):
            merged.update(part)
        mine = merged
    if console is not None:
        console.print(f"cached the latents of {len(mine)} item(s) in {time.time() - t0:.1f}s")
    return mine


def _val_fixed(cfg, plan, model, encoder, device, texts) -> list[dict]:
    """The validation loss's fixed batches: latent statistics, captions, timesteps (evenly spread)."""
    import torch

    v = cfg.validation
    n = plan.val_loss_count
    T = int(model.scheduler.config.num_train_timesteps)
    ts = [int((k + 0.5) * T / v.loss_timesteps) for k in range(v.loss_timesteps)]
    chunks = []
    bs = max(cfg.batch_size, 2)
    for start in range(0, n, bs):
        items = [plan.val[p] for p in range(start, min(n, start + bs))]
        batch = collate(items)
        mean, std = encode_pixels(model, encoder, frames_of(cfg), batch, device)
        ctrl = control_pixels(batch, control_of(cfg)) if control_of(cfg) else None
        flat = [t for row in batch["texts"] for t in row]
        emb = texts.encode(flat)
        f = len(frames_of(cfg))
        for j, t in enumerate(ts):
            rand = draw_noise(cfg.seed + 1, batch["pos"], f, tuple(mean.shape[1:]), T, salt=j + 1, timestep=t)
            chunks.append({"mean": mean, "std": std, "embeds": emb, "clean": torch.full((len(items),), -1), "rand": rand,
                           "control": ctrl})
    return chunks
