"""Single-file SD1.5 / SDXL checkpoints (A1111/Civitai style), offline.

The family (and inpainting, v-prediction) is read from the tensor names and shapes in the
file's header, without loading the tensors. diffusers converts the original (ldm) names; the
diffusers configs it needs come from layerctl/configs (shipped: SD1.5, SDXL and their
9-channel inpainting variants) or from a folder the user gives (``--config DIR``, a
diffusers-layout folder of config files: for fine-tunes with other dimensions). The CLIP
tokenizers are built from the shipped byte-pair merges (backends/clip.py), so nothing is
downloaded and no Hugging Face cache is needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from layerctl.errors import LayerctlError

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
LABEL_EMB = UNET + "label_emb.0.0.weight"
CROSS_ATTN_K = re.compile(re.escape(UNET) + r".*\.attn2\.to_k\.weight$")
# text-encoder key prefixes in the original checkpoints
CLIP_L_SD15 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_L_SDXL = "conditioner.embedders.0.transformer."
OPENCLIP_SDXL = "conditioner.embedders.1.model."
# what the shipped configs were written for
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
FAMILIES = ("sd15", "sdxl")
TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


@dataclass
class CheckpointFacts:
    """What a single-file checkpoint's header says about the model in it."""

    family: Optional[str]  # "sd15", "sdxl", or None when neither
    in_channels: Optional[int]  # UNet input channels: 4 base, 9 inpainting
    context_dim: Optional[int]  # cross-attention width (768 SD1.5, 1024 SD2, 2048 SDXL)
    text_encoders: tuple = ()  # the text-encoder key prefixes found
    v_pred: bool = False  # a `v_pred` key: trained for v-prediction (e.g. NoobAI-XL v-pred)
    ztsnr: bool = False  # a `ztsnr` key: trained with zero terminal SNR
    shapes: dict = field(default_factory=dict)  # a few telling key -> shape, for messages

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def prediction_type(self) -> Optional[str]:
        """diffusers' name for what the file says it predicts; None when it does not say."""
        return "v_prediction" if self.v_pred else None

    def describe(self) -> str:
        seen = ", ".join(f"{k} {list(v)}" for k, v in self.shapes.items()) or "no UNet tensors"
        te = ", ".join(p.rstrip(".") for p in self.text_encoders) or "none"
        return f"{seen}; text encoders: {te}"


def read_facts(path) -> CheckpointFacts:
    """The facts in a .safetensors checkpoint's header (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = sorted(f.keys())
            shape = lambda k: tuple(f.get_slice(k).get_shape())  # noqa: E731
            attn = next((k for k in keys if CROSS_ATTN_K.match(k)), None)
            shapes = {k: shape(k) for k in (CONV_IN, attn, LABEL_EMB) if k and k in keys}
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise LayerctlError(f"cannot read checkpoint {path}: {exc}") from None
    prefixes = tuple(p for p in (CLIP_L_SD15, OPENCLIP_SD2, CLIP_L_SDXL, OPENCLIP_SDXL) if any(k.startswith(p) for k in keys))
    conv_in, to_k = shapes.get(CONV_IN, ()), shapes.get(attn, ())
    facts = CheckpointFacts(
        family=None,
        in_channels=conv_in[1] if len(conv_in) == 4 else None,  # a conv weight [out, in, 3, 3]
        context_dim=to_k[1] if len(to_k) == 2 else None,  # a linear weight [inner, context]
        text_encoders=prefixes,
        v_pred="v_pred" in keys,
        ztsnr="ztsnr" in keys,
        shapes={k.removeprefix(UNET): v for k, v in shapes.items()},
    )
    facts.family = _family(facts, LABEL_EMB in shapes)
    return facts


def _family(facts: CheckpointFacts, has_label_emb: bool) -> Optional[str]:
    """SD1.5: one CLIP-L, no label embedding; SDXL: CLIP-L + OpenCLIP bigG and a label embedding.
    A UNet-only file is told by its cross-attention width."""
    if facts.in_channels not in (4, 9):
        return None
    te = set(facts.text_encoders)
    if te == {CLIP_L_SDXL, OPENCLIP_SDXL} and has_label_emb:
        return "sdxl"
    if te == {CLIP_L_SD15} and not has_label_emb:
        return "sd15"
    if not te:
        for fam, dim in CONTEXT_DIM.items():
            if facts.context_dim == dim and has_label_emb == (fam == "sdxl"):
                return fam
    return None


def detect_family(path, override: Optional[str] = None) -> tuple[str, CheckpointFacts]:
    """(family, facts) of a checkpoint; `override` (--family) wins; an unknown family is an error."""
    facts = read_facts(path)
    family = override or facts.family
    if family is None:
        raise LayerctlError(
            f"cannot tell the model family of {path}: {facts.describe()}. layerctl reads SD1.5 (one CLIP-L text "
            f"encoder, cross-attention 768) and SDXL (CLIP-L + OpenCLIP bigG, cross-attention 2048) checkpoints, "
            f"base (4 input channels) or inpainting (9); give --family sd15|sdxl if it is one of them"
        )
    return family, facts


def shipped_config(family: str, inpainting: bool = False) -> Path:
    """The diffusers config folder shipped in layerctl/configs for a family."""
    from importlib.resources import files

    name = family + ("-inpainting" if inpainting else "")
    return Path(str(files("layerctl") / "configs" / name))


def config_folder(family: str, facts: CheckpointFacts, config: Optional[str]) -> Path:
    """The config folder to build the pipeline from: --config, else the shipped one (which must
    fit the checkpoint's shapes)."""
    if config:
        folder = Path(config).expanduser()
        if not folder.is_dir():
            raise LayerctlError(f"config folder not found: {config}")
        index = folder / "model_index.json"
        if not index.is_file():
            raise LayerctlError(f"--config {config}: not a diffusers config folder (no model_index.json)")
        try:
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError, AttributeError) as exc:
            raise LayerctlError(f"--config {config}: {index} is not a valid JSON object ({exc})") from None
        if ("XL" in cls) != (family == "sdxl"):
            raise LayerctlError(f"--config {config} describes a {cls or 'pipeline without a _class_name'}, the checkpoint is {family}")
        return folder
    if facts.context_dim is not None and facts.context_dim != CONTEXT_DIM[family]:
        raise LayerctlError(
            f"the checkpoint's shapes do not fit the {family} configs shipped with layerctl ({facts.describe()}; "
            f"{family} has cross-attention {CONTEXT_DIM[family]}): give its diffusers config folder with --config DIR"
        )
    return shipped_config(family, facts.inpainting)


def tokenizers_to_pass(folder: Path) -> dict:
    """CLIP tokenizers built offline for each tokenizer the folder names but holds no files for."""
    from layerctl.backends.clip import clip_tokenizer

    spec = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    out = {}
    for name, pad in TOKENIZER_PADS.items():
        entry = spec.get(name)
        if not (isinstance(entry, list) and entry and entry[0]):
            continue
        sub = folder / name
        if not ((sub / "vocab.json").is_file() or (sub / "tokenizer.json").is_file()):
            out[name] = clip_tokenizer(pad)
    return out


def openclip_text_encoder(path, folder: Path, dtype):
    """SDXL's second text encoder (OpenCLIP bigG names in the file) built here: diffusers tells the two
    SDXL encoders apart by width and takes the first one's weights when both are equally wide."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"), local_files_only=True)
    with init_empty_weights():  # parameters on "meta" until the file's are assigned; buffers real
        model = CLIPTextModelWithProjection(cfg)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(OPENCLIP_SDXL)}
    state = convert_open_clip_checkpoint(model, tensors, prefix=OPENCLIP_SDXL)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise LayerctlError(f"{path}: the OpenCLIP text encoder lacks {', '.join(missing[:3])}")
    model.load_state_dict(state, strict=False, assign=True)
    return model.to(dtype=dtype).eval()


def load_single_file(pipeline_cls, path, dtype, family: str, facts: CheckpointFacts, config: Optional[str], extra: dict):
    """A diffusers pipeline from a single-file checkpoint, with nothing fetched from the network."""
    if not facts.text_encoders:
        raise LayerctlError(
            f"{path} holds no text encoder (a UNet-only file: {facts.describe()}); use a full checkpoint or a "
            f"diffusers folder of the base model with this UNet in it"
        )
    folder = config_folder(family, facts, config)
    kwargs = dict(extra, **tokenizers_to_pass(folder))
    if family == "sdxl" and OPENCLIP_SDXL in facts.text_encoders and "text_encoder_2" not in kwargs:
        kwargs["text_encoder_2"] = openclip_text_encoder(path, folder, dtype)
    return pipeline_cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **kwargs)
