"""Test helper: write a diffusers SD1.5/SDXL pipeline as one original-layout (ldm) .safetensors
checkpoint, the way A1111/Civitai files are laid out, plus a diffusers config folder for it.

diffusers ships only the ldm -> diffusers direction (diffusers.loaders.single_file_utils); this
is the reverse, written from the published layout (block numbering of the original UNet and VAE,
OpenCLIP's fused attention projections). tests/test_single_file.py proves it by a round trip
through diffusers' own conversion.
"""

from __future__ import annotations

import re

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table=RESNET) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(sd: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> original names (without the model prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as M

    fixed = {**M["unet"]["layers"], **M["unet"]["addition_embed_type"]}
    per = config.layers_per_block + 1  # ldm blocks per level: the resnets plus the down/upsampler
    has_attn = ["CrossAttn" in t for t in config.up_block_types]
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                if kind == "downsamplers":
                    out[f"input_blocks.{(i + 1) * per}.0.op.{rest.removeprefix('conv.')}"] = v
                else:
                    sub = "0." + _resnet(rest) if kind == "resnets" else "1." + rest
                    out[f"input_blocks.{1 + i * per + j}.{sub}"] = v
            elif kind == "upsamplers":
                out[f"output_blocks.{i * per + per - 1}.{2 if has_attn[i] else 1}.{rest}"] = v
            else:
                sub = "0." + _resnet(rest) if kind == "resnets" else "1." + rest
                out[f"output_blocks.{i * per + j}.{sub}"] = v
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            kind, j, rest = m.groups()
            idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(kind, j)]
            out[f"middle_block.{idx}.{_resnet(rest) if kind == 'resnets' else rest}"] = v
            continue
        raise KeyError(f"no ldm name for UNet key {k}")
    return out


def vae_to_ldm(sd: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as M

    n = len(config.block_out_channels)
    nin = {"conv_shortcut": "nin_shortcut"}
    out = {}
    for k, v in sd.items():
        if k in M["vae"]:
            out[M["vae"][k]] = v
            continue
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            part, side, i, kind, j, rest = m.groups()
            level = int(i) if side == "down" else n - 1 - int(i)  # ldm numbers the decoder's levels from the bottom
            if kind == "resnets":
                out[f"{part}.{side}.{level}.block.{j}.{_resnet(rest, nin)}"] = v
            else:
                out[f"{part}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"] = v
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            part, kind, j, rest = m.groups()
            if kind == "resnets":
                out[f"{part}.mid.block_{int(j) + 1}.{_resnet(rest, nin)}"] = v
            else:
                name = next(a for a in VAE_ATTN if rest.startswith(a + "."))
                tail = rest[len(name) + 1:]
                w = v[:, :, None, None] if (tail == "weight" and v.ndim == 2) else v  # linear -> 1x1 conv
                out[f"{part}.mid.attn_1.{VAE_ATTN[name]}.{tail}"] = w
            continue
        raise KeyError(f"no ldm name for VAE key {k}")
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """A transformers CLIPTextModel (HF names, as the original SD1.5/SDXL files keep them)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def openclip_to_ldm(sd: dict, prefix: str) -> dict:
    """A CLIPTextModelWithProjection -> OpenCLIP names (fused q/k/v, transposed projection)."""
    import torch

    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out = {prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for k, v in fixed.items():
        out[prefix + v] = sd.pop(k)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    ren = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, 0)
            for a, b in ren.items():
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    if sd:
        raise KeyError(f"no OpenCLIP name for {sorted(sd)[:3]}")
    return out


def pipeline_to_ldm(pipe) -> dict:
    """One original-layout state dict for an SD1.5 or SDXL pipeline."""
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_config_folder(pipe, folder) -> None:
    """The pipeline's configs (no weights) in the diffusers layout, tokenizers included."""
    from pathlib import Path

    folder = Path(folder)
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        target = comp.config if name.startswith("text_encoder") else comp
        target.save_pretrained(folder / name)
