"""train-vae: the latent-transparency encoder and the transparent decoder against a frozen VAE.

One config object (`VAETrainConfig`, filled from a YAML recipe) and one
visible loop (`train`), nanoGPT style. Per optimizer step, for each micro-batch:

    rgba, padded                         <- data (pad_rgb, the inference padding)
    mean, std = frozen_vae.encode((2c-1)*a)           (no grad)
    offset    = E_a([a, padded])                       (trained)
    latent    = mean + std * offset                    (the transparent latent, unscaled)
    decoded   = frozen_vae.decode(latent)              (grad flows to the latent only)
    pred      = D_a(clamp(decoded/2+0.5), latent)      [alpha, R, G, B] (trained); with loss.latent_noise
                                                       the decoder reads latent + noise and its decode

    loss = w_id * mse(decoded, (2c-1)*a)               identity: still decodes to the picture
         + w_rec * l2(pred, [a, padded])               reconstruction (alpha: optionally edge-weighted)
         + w_adv * -PatchD(pred)                       after loss.disc_start steps
    PatchD is trained on [a, padded] (real) vs pred (fake), hinge or BCE.

Checkpoints (every `checkpoint_every` steps, at the end, and on Ctrl-C) are
folders `OUT/checkpoints/step-NNNNNNN/` written under a temporary name and
renamed: the two nets in the official file layout
(`transparent_encoder.safetensors`, `transparent_decoder.safetensors`; EMA
weights when EMA is on), `state.pt` (raw weights, discriminator, optimizers,
EMA, RNG) and `state.json` (step, data position, config). Data order is a pure
function of (seed, position), so the step counter is the data position.

The user guide is docs/train-vae.md; the parts shared with the other trainer are in training/harness.py.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from layerctl.errors import JobFailed, LayerctlError
from layerctl.training import harness as H
from layerctl.training.config import ImageDataOptions, RunOptions, Section, SyntheticOptions  # noqa: F401 - SyntheticOptions: part of the API
from layerctl.training.harness import list_checkpoints, lr_factor, read_log  # noqa: F401 - part of this module's API

OFFICIAL_DECODER_CHANNELS = (32, 32, 64, 128, 256, 512, 512)
ENCODER_FILE = "transparent_encoder.safetensors"
DECODER_FILE = "transparent_decoder.safetensors"


# ---------------------------------------------------------------- config


class DataOptions(ImageDataOptions):
    source: str = Field("synthetic", description="'synthetic', or a folder of RGBA images / a Hugging Face imagefolder")
    val_source: Optional[str] = Field(None, description="held-out folder (default: val split of an imagefolder, else val_count images held out)")
    val_count: int = Field(16, ge=0, description="held-out images for validation")
    vflip: bool = False


class VaeModelOptions(Section):
    model: str = Field("tiny", description="the base model whose VAE stays frozen (a backend reference)")
    init_encoder: Optional[str] = Field(None, description="start from these encoder weights (official layout)")
    init_decoder: Optional[str] = Field(None, description="start from these decoder weights (official layout)")
    decoder_channels: Optional[list[int]] = Field(None, description="decoder block widths (7 values); default: official")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    family: Optional[Literal["sd15", "sdxl"]] = Field(None, description="sd15 or sdxl, when the model reference does not say it plainly")
    config: Optional[str] = Field(None, description="diffusers config folder for a single-file checkpoint of other sizes")
    no_variant: bool = Field(False, description="hub downloads: the default files even in fp16/bf16 on a GPU")

    @field_validator("decoder_channels")
    @classmethod
    def _chans(cls, v):
        if v is not None and (len(v) != 7 or any(c <= 0 or c % 8 for c in v)):
            raise ValueError("decoder_channels needs 7 positive multiples of 8 (official: 32, 32, 64, 128, 256, 512, 512)")
        return v


class LossOptions(Section):
    identity_weight: float = Field(1.0, ge=0)
    identity_target: Literal["premultiplied", "vae"] = Field(
        "premultiplied",
        description="premultiplied: the picture on grey, (2c-1)*a (the paper); vae: the frozen VAE's own decode of its mean",
    )
    recon_weight: float = Field(1.0, ge=0)
    recon: Literal["l2", "l1"] = "l2"
    alpha_weight: float = Field(1.0, ge=0, description="weight of the alpha channel in the reconstruction loss")
    alpha_edge_weight: float = Field(
        0.0, ge=0, description="extra weight of the alpha error within alpha_edge_width px of the object's outline (against halos)"
    )
    alpha_edge_width: int = Field(2, ge=1, le=16, description="px each side of the outline that alpha_edge_weight covers")
    latent_noise: float = Field(
        0.0, ge=0, le=2,
        description="the decoder learns from latents perturbed by Gaussian noise of strength U(0, latent_noise) per image "
        "(in the denoiser's scaled units), as a sampled latent is never exactly an encoded one; the identity term sees the clean latent, "
        "and the encoder learns from the identity term alone (meant for decoder-only stages, optim.lr_encoder: 0)",
    )
    decoder_views: bool = Field(
        True, description="show the decoder a random one of the 8 flip/rot90 views of its inputs (undone on its output), as the TTA decode does"
    )
    disc_weight: float = Field(0.01, ge=0)
    disc_start: int = Field(2000, ge=0, description="steps before the adversarial term switches on")
    disc_loss: Literal["hinge", "bce"] = "hinge"
    disc_channels: int = Field(64, ge=4)
    disc_layers: int = Field(3, ge=1, le=5)


class OptimOptions(Section):
    lr_encoder: float = Field(1e-4, ge=0, description="0 keeps the encoder fixed (fine-tune the decoder alone; the latents a LoRA learned stay valid)")
    lr_decoder: float = Field(1e-4, gt=0)
    lr_disc: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final lr as a fraction of the peak")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class EMAOptions(Section):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)


class VAETrainConfig(RunOptions):
    """Every knob of a train-vae run; a YAML recipe fills it (unknown keys are errors). Run keys shared
    with train-lora (seed, grad_accum, mixed_precision, ...) are in training/config.RunOptions."""

    out_dir: str = "runs/train-vae"
    steps: int = Field(10000, gt=0)
    batch_size: int = Field(4, gt=0, description="per process, per micro-batch")
    checkpoint_every: int = Field(1000, gt=0)
    val_every: int = Field(500, gt=0)
    val_at_start: bool = Field(True, description="validate the starting weights (the baseline)")
    val_batch_size: int = Field(4, gt=0)
    val_tta: bool = Field(False, description="validate with the 8-way test-time augmentation (slower)")
    model: VaeModelOptions = Field(default_factory=VaeModelOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    loss: LossOptions = Field(default_factory=LossOptions)
    optim: OptimOptions = Field(default_factory=OptimOptions)
    ema: EMAOptions = Field(default_factory=EMAOptions)


def load_config(path, overrides=()) -> VAETrainConfig:
    from layerctl.io.yamlio import load_model_yaml

    return load_model_yaml(path, VAETrainConfig, overrides=list(overrides))


# ---------------------------------------------------------------- data (checked before any model loads)


class VaeDataPlan:
    """The training stream and the held-out set, decided (and checked) before a model loads."""

    def __init__(self, cfg: VAETrainConfig):
        from layerctl.training import data as D

        d = cfg.data
        self.scan_notes: list[str] = []
        if d.source == "synthetic":
            from layerctl.training.synthetic import SyntheticSource

            s = d.synthetic
            opts = dict(shapes=s.shapes, materials=s.materials, colours=s.colours, min_objects=s.min_objects, max_objects=s.max_objects)
            self.train = D.SyntheticStream(d.resolution, cfg.seed, True, SyntheticSource(seed=cfg.seed, **opts), hflip=d.hflip, vflip=d.vflip)
            self.val = D.SyntheticStream(d.resolution, cfg.seed + 1, False, SyntheticSource(seed=cfg.seed + 1_000_003, **opts), length=d.val_count)
            self.val_count = d.val_count
            self.describe = f"synthetic (seed {cfg.seed}), {d.resolution}px"
            if d.val_source:
                self._folder_val(cfg, d.val_source)
            return
        train_dir, split_val = D.find_splits(d.source)
        scan = D.scan_folder(train_dir, "dataset")
        self.scan_notes.append(scan.summary())
        records = scan.records
        val_records: list = []
        val_dir = d.val_source or (str(split_val) if split_val else None)
        if val_dir is None:
            records, val_records = D.split_holdout(records, d.val_count, cfg.seed)
            if val_records:
                self.scan_notes.append(f"held out {len(val_records)} of them for validation")
        self.train = D.FolderStream(records, d.resolution, cfg.seed, True, d.crop_scale, hflip=d.hflip, vflip=d.vflip)
        self.describe = f"{scan.root}: {len(records)} images, {d.resolution}px"
        if val_dir is not None:
            self._folder_val(cfg, val_dir)
        else:
            self.val = D.FolderStream(val_records, d.resolution, cfg.seed, False) if val_records else None
            self.val_count = len(val_records)

    def _folder_val(self, cfg, folder):
        from layerctl.training import data as D

        scan = D.scan_folder(folder, "validation")
        self.scan_notes.append(scan.summary())
        recs = scan.records[: cfg.data.val_count] if cfg.data.val_count else []
        self.val = D.FolderStream(recs, cfg.data.resolution, cfg.seed, False) if recs else None
        self.val_count = len(recs)


# ---------------------------------------------------------------- the nets


def encoder_input(rgba, padded):
    """[alpha, padded RGB] (4 channels, alpha first) in [0,1] — what the offset encoder sees."""
    import torch

    return torch.cat([rgba[:, 3:4], padded], dim=1)


def decoder_target(rgba, padded):
    """[alpha, padded RGB]: what the transparent decoder should output."""
    import torch

    return torch.cat([rgba[:, 3:4], padded], dim=1)


def frozen_decode(model, latent):
    """The frozen VAE decoder with autograd on (its weights are frozen): unscaled latent -> [-1,1]."""
    return model.vae.decode(latent.to(model.vae_dtype)).sample.float()


def make_pair(encoder, decoder, flux: bool = False):
    """One nn.Module holding both trained nets, so DDP / accelerate see a single model.

    The training loop works in the SD order ([alpha, padded RGB] in, [alpha, R, G, B] out); with
    `flux` the pair speaks the FLUX.1 nets' conventions at their boundary (encoder input alpha
    last, decoder pixels not clipped, decoder output [R, G, B, alpha]) and hands back the SD order."""
    import torch
    import torch.nn as nn

    from layerctl.models.transparent_vae import OFFSET_SCALE

    class Pair(nn.Module):
        def __init__(self, enc, dec):
            super().__init__()
            self.encoder = enc
            self.decoder = dec

        def forward(self, enc_in, mean, std, decode, views: Optional[list] = None, noise=None):
            # the same as transparent_vae.encode_offset, with the padding already done by the loader
            if flux:
                enc_in = torch.cat([enc_in[:, 1:], enc_in[:, :1]], dim=1)  # [padded RGB, alpha]
            offset = self.encoder(enc_in) * OFFSET_SCALE
            latent = mean + std * offset.float()
            decoded = decode(latent)  # [-1,1]
            if noise is not None:  # the decoder reads a perturbed latent (and its decode); the identity term the clean one
                latent_in = latent.detach() + noise
                with torch.no_grad():
                    decoded_in = decode(latent_in)
            else:
                latent_in, decoded_in = latent, decoded
            pixels = decoded_in / 2 + 0.5 if flux else (decoded_in / 2 + 0.5).clamp(0, 1)
            if views is None:
                pred = self.decoder(pixels, latent_in)  # [alpha, R, G, B] (FLUX: [R, G, B, alpha]), not clipped
            else:  # per image one of the 8 test-time views, undone afterwards (as decode_tta does per pass)
                pred = unview(self.decoder(apply_view(pixels, views), apply_view(latent_in, views)), views)
            if flux:
                pred = torch.cat([pred[:, 3:4], pred[:, :3]], dim=1)
            return latent, decoded, pred

    return Pair(encoder, decoder)


def _view1(x, flip: bool, rot: int, inverse: bool):
    import torch

    if inverse:
        x = torch.rot90(x, k=-rot, dims=(-2, -1))
        return torch.flip(x, dims=(-1,)) if flip else x
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=rot, dims=(-2, -1))


def apply_view(x, views: list):
    """Per image of [B,C,H,W] (square), views[i] = (flip width, rot90 k): the passes of the TTA decode."""
    import torch

    return torch.stack([_view1(x[i], f, r, False) for i, (f, r) in enumerate(views)])


def unview(x, views: list):
    import torch

    return torch.stack([_view1(x[i], f, r, True) for i, (f, r) in enumerate(views)])


def decoder_views(seed: int, positions) -> list:
    """The TTA view the decoder sees for each data position: a pure function of (seed, position)."""
    import numpy as np

    from layerctl.models.transparent_vae import TTA_PASSES

    return [TTA_PASSES[int(np.random.default_rng([seed & 0xFFFFFFFF, 0x7E57, int(p)]).integers(0, len(TTA_PASSES)))] for p in positions]


def decoder_channels_of(state: dict) -> tuple[int, ...]:
    """The block widths of a decoder state dict, or of {key: shape} (official: 32, 32, 64, 128, 256, 512, 512)."""
    chans = []
    i = 0
    while f"down_blocks.{i}.resnets.0.conv1.weight" in state:
        v = state[f"down_blocks.{i}.resnets.0.conv1.weight"]
        chans.append(int(v.shape[0] if hasattr(v, "shape") else v[0]))
        i += 1
    return tuple(chans)


def load_decoder_any(path, device="cpu", dtype=None):
    """A transparent decoder file of any width (official layout or narrower), loaded strictly.

    Does what `transparent_vae.load_decoder` does (widths read off the file) without calling it,
    so code that swaps `transparent_vae.load_decoder` for this function keeps working.
    """
    import torch

    from layerctl.models import transparent_vae as tv

    what = "LayerDiffuse transparent decoder"
    state = tv._read_safetensors(path, what)
    chans = decoder_channels_of(state) or tuple(tv.DECODER_BLOCK_OUT_CHANNELS)
    return tv._load(lambda: tv.TransparentDecoder(block_out_channels=chans), path, what, device, dtype or torch.float32, state)


def build_nets(cfg: VAETrainConfig, model=None):
    """Encoder and decoder: zero-initialised output layers (as the official nets) or loaded weights.
    Their latent width is the base model's (`model`: SD1.5/SDXL 4, FLUX.1 16; none given: 4)."""
    import torch

    from layerctl.models import codec
    from layerctl.models import transparent_vae as tv

    torch.manual_seed(cfg.seed)
    m = cfg.model
    flux = model is not None and codec.is_flux(model)
    width = int(model.latent_channels) if model is not None else 4
    cpu = torch.device("cpu")
    if m.init_encoder:
        path = _existing(m.init_encoder, "init_encoder")
        enc = codec.load_net(path, "encoder", model.family, cpu, torch.float32) if flux else tv.load_encoder(
            path, device=cpu, dtype=torch.float32)
    else:
        enc = tv.new_encoder(seed=cfg.seed, latent_channels=width)
    if m.init_decoder:
        path = _existing(m.init_decoder, "init_decoder")
        dec = codec.load_net(path, "decoder", model.family, cpu, torch.float32) if flux else load_decoder_any(
            path, device=cpu, dtype=torch.float32)
    else:
        chans = tuple(m.decoder_channels) if m.decoder_channels else OFFICIAL_DECODER_CHANNELS
        dec = tv.new_decoder(seed=cfg.seed + 1, block_out_channels=chans, latent_channels=width)
    return enc.float().train().requires_grad_(True), dec.float().train().requires_grad_(True)


def _existing(path, what) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerctlError(f"model.{what}: file not found: {p}")
    return str(p)


def load_frozen_vae(ref: str, device, options=None):
    """The base model with only its VAE kept (fp32, frozen, on `device`); `options`: LoadOptions."""
    import torch

    from layerctl.backends.registry import load_model

    m = load_model(ref, device="cpu", dtype="fp32", options=options)
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        if getattr(m.pipe, name, None) is not None:
            try:
                setattr(m.pipe, name, None)
            except Exception:  # noqa: BLE001 - keep it; only memory is at stake
                pass
    vae = m.pipe.vae
    vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    m.device = device
    m.vae_dtype = torch.float32
    return m


# ---------------------------------------------------------------- learning-rate schedule, EMA


class EMA:
    """Exponential moving average of parameters (fp32 shadow copies)."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def update(self, module) -> None:
        import torch

        with torch.no_grad():
            for k, v in module.state_dict().items():
                s = self.shadow[k]
                if v.dtype.is_floating_point:
                    s.mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)
                else:
                    s.copy_(v)

    def copy_to(self, module) -> None:
        current = module.state_dict()
        module.load_state_dict({k: v.to(current[k].dtype) for k, v in self.shadow.items()})


# ---------------------------------------------------------------- evaluation (validation and eval-vae)


def evaluate(model, encoder, decoder, batches, tta: bool = False, device=None) -> dict:
    """Alpha PSNR, composite RGB PSNR over 9 backgrounds and identity error of a pair of nets.

    model: LoadedModel (frozen VAE). batches: iterable of collated dicts (rgba, padded).
    """
    import torch

    from layerctl.models import codec
    from layerctl.training.metrics import MetricSums, batch_metrics

    dev = device or next(decoder.parameters()).device
    sums = MetricSums()
    with torch.no_grad():
        for batch in batches:
            rgba = batch["rgba"].to(dev, torch.float32)
            prem = (rgba[:, :3] * 2 - 1) * rgba[:, 3:4]
            mean, std = model.vae_encode(prem)
            # the inference path of the model's family (pads with pad_rgb_torch; FLUX.1: alpha last, unclipped pixels)
            offset = codec.offset(model, encoder, rgba).float()
            latent = mean + std * offset
            pixels = codec.decoder_pixels(model, latent)
            decoded01 = pixels.clamp(0, 1)
            plain01 = model.vae_decode(mean)
            pred = codec.decode_raw(model, decoder, pixels, latent, tta=tta)
            sums.add(batch_metrics(pred, rgba, decoded01, plain01))
    return sums.summary()


def metrics_table(results: dict, title: str):
    from rich.table import Table

    from layerctl.training.metrics import BACKGROUNDS

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("alpha PSNR (dB)", f"{results['alpha_psnr']:.2f}")
    t.add_row("RGB PSNR, 9 backgrounds (dB)", f"{results['rgb_psnr']:.2f}")
    t.add_row("  " + " / ".join(BACKGROUNDS), " / ".join(f"{results[f'rgb_psnr_{b}']:.1f}" for b in BACKGROUNDS))
    if "identity_psnr" in results:
        t.add_row("identity PSNR, frozen decode vs picture (dB)", f"{results['identity_psnr']:.2f}")
    if "identity_delta" in results:
        t.add_row("identity change vs zero offset (MSE)", f"{results['identity_delta']:.2e}")
    t.add_row("images", str(results["images"]))
    return t


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir: Path, step: int, state: dict, encoder, decoder, cfg: VAETrainConfig, extra: dict) -> Path:
    """checkpoints/step-N/: the two nets in the official layout, state.pt, state.json (harness.write_checkpoint)."""
    from layerctl.models.transparent_vae import save_module

    def write_files(folder: Path) -> None:
        dt = H.save_dtype(cfg.save_dtype)
        for net, name in ((encoder, ENCODER_FILE), (decoder, DECODER_FILE)):
            save_module(net, folder / name, dtype=dt, overwrite=True)
            H.usual_mode(folder / name)

    info = {"config": cfg.model_dump(mode="json"), **extra}
    return H.write_checkpoint(out_dir, step, write_files, state, info, cfg.keep_last)
# ---------------------------------------------------------------- the loop


# settings that may change on resume without changing what an uninterrupted run would compute
RESUME_FREE = {"steps", "out_dir", "checkpoint_every", "keep_last", "val_every", "val_at_start", "val_batch_size", "val_tta",
               "log_every", "tensorboard", "cpu_threads", "data.workers", "model.init_encoder", "model.init_decoder", "model.device"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """'key old -> new' for each setting that differs between a checkpoint's config and this one."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in RESUME_FREE or a.get(k) == b.get(k):
            continue
        out.append(f"{k} {a.get(k)!r} -> {b.get(k)!r}")
    return out


class _Run:
    """The parts of one train-vae run that validation and checkpoints need (built by `_setup`)."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def validate(self, step: int) -> Optional[dict]:
        """Metrics of the current (EMA) weights on the held-out set, on the main process."""
        from layerctl.training import data as D

        plan, acc = self.plan, self.accelerator
        if plan.val is None or not plan.val_count:
            return None
        res = None
        if acc.is_main_process:
            with self.ema_weights():
                self.raw_pair.eval()
                with acc.autocast():
                    batches = D.fixed_batches(plan.val, plan.val_count, self.cfg.val_batch_size)
                    res = evaluate(self.model, self.raw_pair.encoder, self.raw_pair.decoder, batches, tta=self.cfg.val_tta, device=acc.device)
                self.raw_pair.train()
            self.log.write({"kind": "val", "step": step, **res})
            self.console.print(metrics_table(res, f"validation at step {step} ({res['images']} held-out images)"))
        acc.wait_for_everyone()
        return res

    def micro_step(self, batch: dict, micro: int, step: int, use_adv: bool, last_ckpt):
        """One micro-batch: losses, backward, and (at the accumulation boundary) the optimizer steps.

        Returns the reduced generator losses [loss, identity, recon, adv] and the discriminator loss.
        """
        import torch

        from layerctl.training import losses as L

        cfg, acc, pair, disc = self.cfg, self.accelerator, self.pair, self.disc
        world, rank = acc.num_processes, acc.process_index
        rgba, padded = batch["rgba"].to(acc.device), batch["padded"].to(acc.device)
        first = (micro * world + rank) * cfg.batch_size  # its data position, as data.PositionBatches
        views = decoder_views(cfg.seed, range(first, first + rgba.shape[0])) if cfg.loss.decoder_views else None
        with acc.accumulate(pair, disc):
            with acc.autocast():
                loss, l_id, l_rec, l_adv, pred, target = _losses(cfg, self.model, pair, self.raw_disc, rgba, padded, views, use_adv)
            g_vals = acc.reduce(torch.stack([loss.detach(), l_id.detach(), l_rec.detach(), l_adv.detach()]).float(), "mean")
            H.check_finite(g_vals[0], step, last_ckpt)  # before backward: nothing of this step is applied
            acc.backward(loss)
            d_val = torch.zeros((), device=acc.device)
            if use_adv:
                with acc.autocast():
                    logits = disc(L.to_disc_input(torch.cat([target, pred.detach().float()], 0)))
                    l_d = L.d_loss(logits[: target.shape[0]], logits[target.shape[0] :], cfg.loss.disc_loss)
                d_val = acc.reduce(l_d.detach().float(), "mean")
                H.check_finite(d_val, step, last_ckpt, "discriminator loss")
                acc.backward(l_d)
            if acc.sync_gradients and cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(pair.parameters(), cfg.optim.grad_clip)
                if use_adv:
                    acc.clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            if use_adv:
                self.opt_d.step()
                self.opt_d.zero_grad(set_to_none=True)
        return g_vals, d_val

    @contextlib.contextmanager
    def ema_weights(self):
        """Inside: the pair holds the EMA weights (when EMA is on); the raw ones come back after."""
        backup = None
        if self.ema is not None:
            backup = {k: v.detach().clone() for k, v in self.raw_pair.state_dict().items()}
            self.ema.copy_to(self.raw_pair)
        try:
            yield
        finally:
            if backup is not None:
                self.raw_pair.load_state_dict(backup)

    def checkpoint(self, step: int, bad_files: set) -> Optional[Path]:
        """checkpoints/step-N/ (raw weights and optimizers in state.pt, EMA weights in the files) and OUT/'s files."""
        cfg, acc, path = self.cfg, self.accelerator, None
        if acc.is_main_process:
            world = acc.num_processes
            state = {
                "pair": {k: v.detach().clone() for k, v in self.raw_pair.state_dict().items()},  # raw (not EMA) weights
                "disc": self.raw_disc.state_dict(),
                "opt_g": _raw_optimizer(self.opt_g).state_dict(),
                "opt_d": _raw_optimizer(self.opt_d).state_dict(),
                "ema": self.ema.shadow if self.ema is not None else None,
                "rng": H.rng_state(),
            }
            extra = {
                "data_position": step * cfg.grad_accum * cfg.batch_size * world,
                "micro_batch": step * cfg.grad_accum,
                "world_size": world,
                "schedule": {"kind": cfg.optim.schedule, "factor": lr_factor(max(step - 1, 0), cfg.optim, cfg.steps)},
                "bad_files": sorted(bad_files),
                "ema": self.ema is not None,
            }
            with self.ema_weights():  # the exported files hold the EMA weights
                path = save_checkpoint(self.out_dir, step, state, self.raw_pair.encoder, self.raw_pair.decoder, cfg, extra)
            H.export_files(self.out_dir, path, (ENCODER_FILE, DECODER_FILE))
        acc.wait_for_everyone()
        return path


def _raw_optimizer(opt):
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def _setup(cfg: VAETrainConfig, accelerator, console, ckpt_path: Optional[Path]):
    """Frozen VAE, the trained pair, discriminator, optimizers, EMA; restored from `ckpt_path` when given.
    Returns (parts, start_step, bad_files) - parts not yet prepared by the accelerator."""
    import torch

    from layerctl.training import losses as L

    from layerctl.backends.base import LoadOptions
    from layerctl.models.codec import is_flux

    model = load_frozen_vae(cfg.model.model, accelerator.device, LoadOptions.of(cfg.model))
    pair = make_pair(*build_nets(cfg, model), flux=is_flux(model))
    torch.manual_seed(cfg.seed + 2)
    disc = L.PatchDiscriminator(4, cfg.loss.disc_channels, cfg.loss.disc_layers)
    o = cfg.optim
    opt_g = torch.optim.AdamW(
        [
            {"params": list(pair.encoder.parameters()), "lr": o.lr_encoder, "base_lr": o.lr_encoder},
            {"params": list(pair.decoder.parameters()), "lr": o.lr_decoder, "base_lr": o.lr_decoder},
        ],
        betas=o.betas,
        weight_decay=o.weight_decay,
    )
    opt_d = torch.optim.AdamW([{"params": list(disc.parameters()), "lr": o.lr_disc, "base_lr": o.lr_disc}], betas=o.betas, weight_decay=o.weight_decay)
    ema = EMA(pair, cfg.ema.decay) if cfg.ema.enabled else None
    start_step, bad_files = 0, set()
    if ckpt_path is not None:
        st, info = H.load_checkpoint(ckpt_path)
        pair.load_state_dict(st["pair"])
        disc.load_state_dict(st["disc"])
        opt_g.load_state_dict(st["opt_g"])
        opt_d.load_state_dict(st["opt_d"])
        if ema is not None and st.get("ema") is not None:
            ema.shadow = {k: v.float() for k, v in st["ema"].items()}
        H.set_rng_state(st["rng"])
        start_step = int(info["step"])
        bad_files = set(info.get("bad_files", []))
        console.print(f"resuming from {ckpt_path} (step {start_step})")
        changed = config_changes(info.get("config", {}), cfg.model_dump(mode="json"))
        if info.get("world_size", 1) != accelerator.num_processes:
            changed.append(f"processes {info.get('world_size', 1)} -> {accelerator.num_processes}")
        if changed:
            console.print("[yellow]resuming with changed settings[/] (the run will differ from an uninterrupted one): " + "; ".join(changed))
        if start_step >= cfg.steps:
            console.print(f"nothing to do: the checkpoint is at step {start_step} and steps = {cfg.steps}")
    return dict(model=model, pair=pair, disc=disc, opt_g=opt_g, opt_d=opt_d, ema=ema), start_step, bad_files


def _losses(cfg: VAETrainConfig, model, pair, raw_disc, rgba, padded, views, use_adv: bool):
    """Forward pass of one micro-batch: (loss, identity, recon, adv, pred, target)."""
    import torch

    from layerctl.training import losses as L

    prem = (rgba[:, :3] * 2 - 1) * rgba[:, 3:4]
    mean, std = model.vae_encode(prem)
    if cfg.loss.identity_target == "vae":
        with torch.no_grad():
            id_target = frozen_decode(model, mean)
    else:
        id_target = prem
    noise = None
    if cfg.loss.latent_noise > 0:  # per image a strength in U(0, latent_noise), in the denoiser's (scaled) units
        strength = torch.rand(mean.shape[0], 1, 1, 1, device=mean.device) * cfg.loss.latent_noise
        noise = torch.randn_like(mean) * strength / model.latent_scale
    _latent, decoded, pred = pair(encoder_input(rgba, padded), mean, std, lambda z: frozen_decode(model, z), views, noise)
    target = decoder_target(rgba, padded)
    l_id = L.identity_loss(decoded, id_target)
    l_rec = L.recon_loss(pred, target, cfg.loss.recon, cfg.loss.alpha_weight, cfg.loss.alpha_edge_weight, cfg.loss.alpha_edge_width)
    loss = cfg.loss.identity_weight * l_id + cfg.loss.recon_weight * l_rec
    if use_adv:
        raw_disc.requires_grad_(False)  # the generator's adversarial term does not train the discriminator
        l_adv = L.g_loss(raw_disc(L.to_disc_input(pred.float())), cfg.loss.disc_loss)
        raw_disc.requires_grad_(True)
        loss = loss + cfg.loss.disc_weight * l_adv
    else:
        l_adv = torch.zeros((), device=rgba.device)
    return loss, l_id, l_rec, l_adv, pred, target


def train(
    cfg: VAETrainConfig,
    resume: bool = False,
    resume_from: Optional[str] = None,
    overwrite: bool = False,
    quiet: bool = False,
    stop_after: Optional[int] = None,
) -> dict:
    """Run (or resume) a train-vae job. Returns a summary dict (steps, last metrics, paths, skipped files).

    `stop_after`: behave as if Ctrl-C came right after that step (tests, smoke runs).
    """
    from rich.console import Console

    out_dir = Path(cfg.out_dir).expanduser()
    console = Console(stderr=True, highlight=False, quiet=quiet)
    # -- everything a user can get wrong, before any model loads
    ckpt_path = H.check_out_dir(out_dir, resume, resume_from, overwrite, "train-vae")
    H.check_tensorboard(cfg.tensorboard)
    plan = VaeDataPlan(cfg)
    for note in plan.scan_notes:
        console.print(f"data: {note}")
    # -- models, optimizers, data
    accelerator, _mp = H.start_accelerator(cfg, cfg.model.device, console)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    parts, start_step, bad_files = _setup(cfg, accelerator, console, ckpt_path)
    pair, disc, opt_g, opt_d = accelerator.prepare(parts.pop("pair"), parts.pop("disc"), parts.pop("opt_g"), parts.pop("opt_d"))
    batches = iter(H.make_loader(plan.train, cfg.batch_size, start_step * cfg.grad_accum, rank, world, cfg.data.workers, cfg.seed))
    log = H.RunLog(out_dir, main, cfg.tensorboard, start_step if ckpt_path is not None else None)
    if main:
        H.write_config(out_dir, cfg)
    run = _Run(cfg=cfg, plan=plan, accelerator=accelerator, console=console, log=log, out_dir=out_dir, opt_g=opt_g, opt_d=opt_d,
               pair=pair, disc=disc, raw_pair=accelerator.unwrap_model(pair), raw_disc=accelerator.unwrap_model(disc), **parts)
    summary: dict[str, Any] = {"out_dir": str(out_dir), "start_step": start_step, "baseline": None, "last_val": None}
    step, status, t_start = start_step, "completed", time.time()
    last_ckpt, last_ckpt_step = ckpt_path, (start_step if ckpt_path is not None else None)
    try:
        if ckpt_path is None and cfg.val_at_start:
            summary["baseline"] = run.validate(0)
        with H.StopFlag(console if main else None) as stop, H.Reporter("train-vae", console, log, cfg.steps, step, cfg.log_every, main and not quiet) as rep:
            while step < cfg.steps:
                use_adv = cfg.loss.disc_weight > 0 and step >= cfg.loss.disc_start
                factor = lr_factor(step, cfg.optim, cfg.steps)
                H.set_lr((opt_g, opt_d), factor)
                sums = dict.fromkeys(("loss", "identity", "recon", "adv", "disc"), 0.0)
                for micro in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):  # global micro-batch index
                    batch = H.next_batch(batches, stop)
                    if batch is None:
                        break
                    bad_files.update(batch["bad"])
                    g_vals, d_val = run.micro_step(batch, micro, step, use_adv, last_ckpt)
                    for k, v in zip(sums, g_vals.tolist() + [float(d_val)]):
                        sums[k] += v / cfg.grad_accum
                else:  # all micro-batches done: one optimizer step was taken
                    if run.ema is not None:
                        run.ema.update(run.raw_pair)
                    step += 1
                    rep.tick(step, lambda: {"lr_factor": factor, **sums}, lambda rate: (
                        f"step {step}/{cfg.steps} loss {sums['loss']:.4f} (id {sums['identity']:.4f} rec {sums['recon']:.4f}"
                        + (f" adv {sums['adv']:.3f} d {sums['disc']:.3f}" if use_adv else "") + f") {rate:.2f} step/s"))
                    with rep.aside():  # steps/s counts training time only
                        if H.due(step, cfg.val_every, cfg.steps):
                            summary["last_val"] = run.validate(step)
                        if H.due(step, cfg.checkpoint_every, cfg.steps):
                            last_ckpt, last_ckpt_step = run.checkpoint(step, bad_files), step
                    if (stop_after is not None and step >= stop_after) or stop.stop:
                        status = "interrupted"
                        break
                    continue
                status = "interrupted"  # the micro-batch loop broke: stop requested mid-step
                break
        if status == "interrupted":
            if last_ckpt_step != step:
                last_ckpt, last_ckpt_step = run.checkpoint(step, bad_files), step
            console.print(f"stopped at step {step}; the checkpoint is {last_ckpt} (continue with --resume)")
    finally:
        log.close()
    H.finish_summary(summary, status, step, start_step, t_start, last_ckpt, accelerator)
    summary.update(encoder=str(out_dir / ENCODER_FILE), decoder=str(out_dir / DECODER_FILE), skipped_files=sorted(bad_files))
    if bad_files and main:
        console.print(f"[yellow]{len(bad_files)} unreadable image(s) were skipped[/]: " + ", ".join(sorted(bad_files)[:5]) + (" ..." if len(bad_files) > 5 else ""))
    accelerator.end_training()
    return summary

# ---------------------------------------------------------------- eval-vae


def _eval_batches(records, resolution: Optional[int], batch_size: int, skipped: list):
    """Collated batches of held-out images: centre crop (to `resolution`, or to multiples of 64)."""
    from layerctl.core.imagemath import pad_rgb
    from layerctl.training import data as D

    import torch

    pending: list[dict] = []
    for rec in records:
        try:
            rgba = D.load_rgba(rec.path)
        except Exception:  # noqa: BLE001
            skipped.append(str(rec.path))
            continue
        h, w = rgba.shape[:2]
        if resolution:
            rgba = D.crop_resize(rgba, D.centre_box(h, w), resolution)
        else:
            hh, ww = h // 64 * 64, w // 64 * 64
            if hh == 0 or ww == 0:
                skipped.append(f"{rec.path} (smaller than 64 px)")
                continue
            t, l = (h - hh) // 2, (w - ww) // 2
            rgba = rgba[t : t + hh, l : l + ww]
        rgba = rgba.astype("float32")
        item = {
            "rgba": torch.from_numpy(rgba.copy()).permute(2, 0, 1),
            "padded": torch.from_numpy(pad_rgb(rgba)).permute(2, 0, 1),
            "caption": rec.caption or "",
            "bad": [],
        }
        if pending and pending[0]["rgba"].shape != item["rgba"].shape:
            yield D.collate(pending)
            pending = []
        pending.append(item)
        if len(pending) >= batch_size:
            yield D.collate(pending)
            pending = []
    if pending:
        yield D.collate(pending)


def load_transparent_net(kind: str, path: Optional[str], model, weights_dir: Optional[str], device):
    """(net, where it came from): the transparent "encoder"/"decoder" at `path`, else the tiny stand-in
    or the model's official file (eval-vae, train-lora)."""
    import torch

    from layerctl.models import codec
    from layerctl.models import transparent_vae as tv
    from layerctl.models.weights import check_file, find_official

    flux = codec.is_flux(model)
    if path:
        src = check_file(path, f"transparent {kind}")
        if flux:  # 16 latent channels; an SD file is refused naming the tensor and both shapes
            return codec.load_net(src, kind, model.family, device, torch.float32).eval(), str(src)
        load = load_decoder_any if kind == "decoder" else tv.load_encoder
        return load(src, device=device, dtype=torch.float32).eval(), str(src)
    if getattr(model, "tiny", False):
        net = codec.tiny_net(kind, model.family)
        return net.to(device, torch.float32).eval(), f"tiny-{kind} (random stand-in)"
    if kind not in model.official:
        raise LayerctlError(f"the {model.backend} backend has no official transparent {kind}; pass --transparent-{kind}")
    src = find_official([model.official[kind]], weights_dir)[0]
    if flux:
        return codec.load_net(src, kind, model.family, device, torch.float32).eval(), str(src)
    load = tv.load_decoder if kind == "decoder" else tv.load_encoder
    return load(src, device=device, dtype=torch.float32).eval(), str(src)


def run_eval(
    images: str,
    decoder: Optional[str] = None,
    encoder: Optional[str] = None,
    model_ref: str = "tiny",
    weights_dir: Optional[str] = None,
    resolution: Optional[int] = None,
    limit: Optional[int] = None,
    count: int = 16,
    seed: int = 1_000_003,
    tta: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    quiet: bool = False,
    load_options=None,
) -> dict:
    """eval-vae: the validation metrics for any weights on any folder (or the synthetic source).
    `load_options`: a layerctl.backends.base.LoadOptions (--family, --config, --no-variant)."""
    from rich.console import Console

    from layerctl.training import data as D
    from layerctl.models.weights import check_file

    console = Console(stderr=True, highlight=False, quiet=quiet)
    skipped: list[str] = []
    # checks first: images, weight files
    if images == "synthetic":
        from layerctl.training.synthetic import SyntheticSource

        res = resolution or 256
        stream = D.SyntheticStream(res, seed, False, SyntheticSource(seed=seed), length=count)
        batches_fn = lambda: D.fixed_batches(stream, count, batch_size)  # noqa: E731
        source = f"synthetic (seed {seed}, {count} images, {res}px)"
    else:
        scan = D.scan_folder(images, "images")
        console.print(f"data: {scan.summary()}")
        records = scan.records[:limit] if limit else scan.records
        skipped.extend(str(p) for p in scan.unreadable)
        batches_fn = lambda: _eval_batches(records, resolution, batch_size if resolution else 1, skipped)  # noqa: E731
        source = f"{scan.root} ({len(records)} images" + (f", {resolution}px)" if resolution else ", own sizes)")
    for p, what in ((decoder, "transparent decoder"), (encoder, "transparent encoder")):
        if p:
            check_file(p, what)

    from layerctl.backends.base import resolve_device

    dev = resolve_device(device)
    model = load_frozen_vae(model_ref, dev, load_options)
    dec, dec_name = load_transparent_net("decoder", decoder, model, weights_dir, dev)
    enc, enc_name = load_transparent_net("encoder", encoder, model, weights_dir, dev)
    t0 = time.time()
    metrics = evaluate(model, enc, dec, batches_fn(), tta=tta, device=dev)
    if not metrics["images"]:
        raise JobFailed(f"no image could be evaluated ({len(skipped)} unreadable)")
    if skipped:
        console.print(f"[yellow]{len(skipped)} image(s) skipped[/]: " + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return {
        "metrics": metrics,
        "images_source": source,
        "model": model_ref,
        "decoder": dec_name,
        "encoder": enc_name,
        "tta": tta,
        "skipped": skipped,
        "seconds": time.time() - t0,
    }
