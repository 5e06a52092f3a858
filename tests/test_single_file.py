"""Single-file SD1.5/SDXL checkpoints offline: shipped configs, the offline CLIP tokenizer, family
detection from the header, loading with no network and an empty Hugging Face cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clihelp import run_cli
from ldmhelp import pipeline_to_ldm, save_config_folder, unet_to_ldm, vae_to_ldm
from layerctl.backends import single_file as sf
from layerctl.errors import LayerctlError

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- the offline CLIP tokenizer


def test_clip_tokenizer_gives_clips_own_ids():
    from layerctl.backends.clip import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    # CLIP ViT-L/14's published ids for these sentences
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("Hello, world!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    assert tok("A PHOTO of  a Cat!").input_ids == [49406, 320, 1125, 539, 320, 2368, 256, 49407]
    assert tok.model_max_length == 77
    padded = tok("a cat", padding="max_length", max_length=6).input_ids
    assert padded == [49406, 320, 2368, 49407, 49407, 49407]  # SD1.5 / SDXL encoder 1 pad with <|endoftext|>
    tok2 = clip_tokenizer("!")  # SDXL's second tokenizer pads with "!" (id 0)
    assert tok2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


# ---------------------------------------------------------------- the shipped configs


def _meta(cls, folder):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(cls.load_config(str(folder)))


@pytest.mark.parametrize("family,unet_params,tensors", [("sd15", 859_520_964, 686), ("sdxl", 2_567_463_684, 1680)])
def test_shipped_configs_are_the_real_architectures(family, unet_params, tensors):
    """Parameter counts and original-file tensor counts of SD1.5 / SDXL base (published figures)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = sf.shipped_config(family)
    unet = _meta(UNet2DConditionModel, folder / "unet")
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert len(unet_to_ldm(unet.state_dict(), unet.config)) == tensors
    assert sum(p.numel() for p in _meta(AutoencoderKL, folder / "vae").parameters()) == 83_653_863
    with init_empty_weights():
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
        assert sum(p.numel() for p in te.parameters()) == 123_060_480  # CLIP ViT-L/14 text
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2")))
            assert sum(p.numel() for p in te2.parameters()) == 694_659_840  # OpenCLIP bigG text + projection
    inpaint = _meta(UNet2DConditionModel, sf.shipped_config(family, inpainting=True) / "unet")
    assert inpaint.conv_in.in_channels == 9 and unet.conv_in.in_channels == 4


# ---------------------------------------------------------------- ldm export: proven by diffusers' own conversion


@pytest.fixture(scope="module")
def tiny_models():
    from layerctl.backends.registry import load_model

    return {name: load_model(name, "cpu", "fp32", "sdpa") for name in ("tiny", "tiny-xl")}


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_ldm_export_round_trips_through_diffusers_conversion(tiny_models, name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    pipe = tiny_models[name].pipe
    ldm = pipeline_to_ldm(pipe)
    unet = convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))
    ref = pipe.unet.state_dict()
    assert set(unet) == set(ref) and all(torch.equal(unet[k], ref[k]) for k in ref)
    vae = convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config))
    ref = pipe.vae.state_dict()
    assert set(vae) == set(ref) and all(torch.equal(vae[k].reshape(ref[k].shape), ref[k]) for k in ref)
    assert len(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)) == len(ref)


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """tiny / tiny-xl as original-layout single files, each with its diffusers config folder."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, model in tiny_models.items():
        save_file(pipeline_to_ldm(model.pipe), str(root / f"{name}.safetensors"))
        save_config_folder(model.pipe, root / f"{name}-config")
        out[name] = (root / f"{name}.safetensors", root / f"{name}-config")
    return out


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from layerctl.backends.base import LoadOptions
    from layerctl.backends.registry import load_model
    name, path, config = sys.argv[1:4]
    tiny = load_model(name, "cpu", "fp32", "sdpa")
    single = load_model(path, "cpu", "fp32", "sdpa", LoadOptions(config=config))
    print("backend", single.backend, single.family, type(single.pipe).__name__)
    images = []
    for m in (tiny, single):
        g = torch.Generator("cpu").manual_seed(3)
        images.append(m.pipe("a glass cup", num_inference_steps=3, height=64, width=64, generator=g, output_type="np").images)
        e = m.encode_prompt(["a glass cup"], ["bad"], True, 64, 64)
        images.append(e.hidden.numpy())
    print("same image", np.array_equal(images[0], images[2]), float(np.abs(images[0]).mean()) > 0)
    print("same conditioning", np.array_equal(images[1], images[3]))
    """
)


@pytest.mark.parametrize("name,family", [("tiny", "sd15"), ("tiny-xl", "sdxl")])
def test_single_file_loads_offline_with_an_empty_cache_and_draws_the_same(checkpoints, tmp_path, name, family):
    path, config = checkpoints[name]
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, name, str(path), str(config)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"backend {family} {family}" in r.stdout
    assert "same image True True" in r.stdout
    assert "same conditioning True" in r.stdout
    assert not any(p.is_file() for p in hf_home.rglob("*")), "something was written to the Hugging Face cache"


def test_sdxl_single_file_keeps_the_second_encoders_own_weights(tiny_models, checkpoints):
    """diffusers alone would load tiny-xl's equally wide CLIP-L weights into text_encoder_2."""
    from layerctl.backends.base import LoadOptions
    from layerctl.backends.registry import load_model

    path, config = checkpoints["tiny-xl"]
    single = load_model(str(path), "cpu", "fp32", "sdpa", LoadOptions(config=str(config)))
    a, b = tiny_models["tiny-xl"].pipe.text_encoder_2.state_dict(), single.pipe.text_encoder_2.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert single.prediction_type is None  # the file does not say


# ---------------------------------------------------------------- family detection from the header


def _fake(path: Path, shapes: dict) -> Path:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


SD15 = {sf.CONV_IN: (320, 4, 3, 3), sf.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        sf.CLIP_L_SD15 + "text_model.embeddings.position_embedding.weight": (77, 768)}
SDXL = {sf.CONV_IN: (320, 4, 3, 3), sf.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        sf.LABEL_EMB: (1280, 2816), sf.CLIP_L_SDXL + "text_model.embeddings.position_embedding.weight": (77, 768),
        sf.OPENCLIP_SDXL + "positional_embedding": (77, 1280)}
SD2 = {sf.CONV_IN: (320, 4, 3, 3), sf.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
       sf.OPENCLIP_SD2 + "positional_embedding": (77, 1024)}


def test_families_and_inpainting_are_read_from_the_header(tmp_path):
    facts = sf.read_facts(_fake(tmp_path / "a.safetensors", SD15))
    assert (facts.family, facts.inpainting, facts.context_dim, facts.prediction_type) == ("sd15", False, 768, None)
    facts = sf.read_facts(_fake(tmp_path / "b.safetensors", dict(SDXL, **{sf.CONV_IN: (320, 9, 3, 3)})))
    assert (facts.family, facts.inpainting, facts.context_dim) == ("sdxl", True, 2048)
    assert sf.config_folder("sdxl", facts, None) == sf.shipped_config("sdxl", inpainting=True)
    unet_only = {k: v for k, v in SDXL.items() if k.startswith(sf.UNET)}
    facts = sf.read_facts(_fake(tmp_path / "c.safetensors", unet_only))
    assert facts.family == "sdxl" and facts.text_encoders == ()
    with pytest.raises(LayerctlError, match="holds no text encoder"):
        sf.load_single_file(None, tmp_path / "c.safetensors", torch.float32, "sdxl", facts, None, {})


def test_odd_shapes_are_an_unknown_family_not_a_crash(tmp_path):
    path = _fake(tmp_path / "odd.safetensors", {sf.CONV_IN: (1,), **{k: v for k, v in SD15.items() if k != sf.CONV_IN}})
    with pytest.raises(LayerctlError, match=r"cannot tell the model family.*input_blocks\.0\.0\.weight \[1\]"):
        sf.detect_family(path)


def test_v_pred_and_ztsnr_keys_are_detected(tmp_path):
    path = _fake(tmp_path / "v.safetensors", dict(SDXL, v_pred=(0,), ztsnr=(0,)))
    family, facts = sf.detect_family(path)
    assert family == "sdxl" and facts.v_pred and facts.ztsnr and facts.prediction_type == "v_prediction"


def test_an_unknown_family_names_the_shapes_seen(tmp_path):
    path = _fake(tmp_path / "sd2.safetensors", SD2)
    with pytest.raises(LayerctlError, match=r"input_blocks\.0\.0\.weight \[320, 4, 3, 3\].*attn2\.to_k\.weight \[320, 1024\].*cond_stage_model\.model"):
        sf.detect_family(path)
    family, facts = sf.detect_family(path, "sd15")  # --family overrides ...
    assert family == "sd15"
    with pytest.raises(LayerctlError, match="do not fit the sd15 configs.*--config"):  # ... but the shapes must fit
        sf.config_folder(family, facts, None)


def test_a_config_folder_of_the_other_family_is_refused(checkpoints, tmp_path):
    facts = sf.read_facts(_fake(tmp_path / "a.safetensors", SD15))
    with pytest.raises(LayerctlError, match="StableDiffusionXLPipeline.*sd15"):
        sf.config_folder("sd15", facts, str(checkpoints["tiny-xl"][1]))
    assert sf.config_folder("sd15", facts, str(checkpoints["tiny"][1])) == checkpoints["tiny"][1]


def test_cli_unknown_family_and_bad_config_exit_2(tmp_path):
    path = _fake(tmp_path / "sd2.safetensors", SD2)
    code, _, err = run_cli(*["gen", "cup", "--model", str(path), "--out", str(tmp_path / "o.png")])
    assert code == 2 and "cannot tell the model family" in err and "[320, 1024]" in err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()
    sd15 = _fake(tmp_path / "sd15.safetensors", SD15)
    code, _, err = run_cli(*["gen", "cup", "--model", str(sd15), "--config", str(tmp_path / "nope"), "--out", str(tmp_path / "o.png")])
    assert code == 2 and "config folder not found" in err
    code, _, err = run_cli(*["gen", "cup", "--model", "tiny", "--family", "sdxl", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--family sdxl does not fit" in err
    code, _, err = run_cli(*["gen", "cup", "--model", "tiny", "--family", "sd3", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "family" in err


def test_every_model_option_schema_carries_family_config_and_no_variant(checkpoints):
    """gen/decompose/upscale requests, recipes, dataset layers and the training recipes all take them."""
    from layerctl.backends.base import LoadOptions
    from layerctl.dataset.requests import LayersDatasetRequest
    from layerctl.requests import DecomposeRequest, GenRequest, UpscaleRequest
    from layerctl.training.lora import LoraModelOptions
    from layerctl.training.vae import VaeModelOptions

    config = str(checkpoints["tiny"][1])
    for cls in (GenRequest, DecomposeRequest, UpscaleRequest, LayersDatasetRequest, LoraModelOptions, VaeModelOptions):
        assert {"family", "config", "no_variant"} <= set(cls.model_fields), cls.__name__
    opts = LoadOptions.of(LoraModelOptions(family="sdxl", no_variant=True, config=config))
    assert (opts.family, opts.variant, opts.config) == ("sdxl", False, config)
    assert LoadOptions.of(GenRequest(prompt="x")) == LoadOptions()


def test_checkpoint_hints_expose_v_pred_on_the_model_with_a_notice(tmp_path, capsys):
    from layerctl.backends.base import LoadedModel, checkpoint_hints

    _, facts = sf.detect_family(_fake(tmp_path / "v.safetensors", dict(SDXL, v_pred=(0,))))
    hints = checkpoint_hints(facts)
    assert hints == {"prediction_type": "v_prediction", "zero_terminal_snr": None}
    assert "v-prediction (a 'v_pred' key)" in capsys.readouterr().err
    assert set(hints) <= set(LoadedModel.__dataclass_fields__)
    _, plain = sf.detect_family(_fake(tmp_path / "e.safetensors", SDXL))
    assert checkpoint_hints(plain) == {"prediction_type": None, "zero_terminal_snr": None}
    assert capsys.readouterr().err == "" and checkpoint_hints(None) == {}


def test_recipe_config_is_recipe_relative_and_must_exist(checkpoints, tmp_path, monkeypatch):
    import shutil

    from layerctl import recipes

    sub = tmp_path / "proj"
    sub.mkdir()
    shutil.copytree(checkpoints["tiny"][1], sub / "tinycfg")
    monkeypatch.chdir(tmp_path)  # the recipe's folder is not the current one
    (sub / "r.yaml").write_text("jobs:\n  - gen:\n      prompt: x\n      family: sd15\n      config: tinycfg\n")
    plan = recipes.plan_recipe(sub / "r.yaml")
    assert plan.jobs[0].request.config == str(sub / "tinycfg") and plan.jobs[0].request.family == "sd15"
    (sub / "bad.yaml").write_text("jobs:\n  - gen:\n      prompt: x\n      config: nocfg\n")
    msg = str(pytest.raises(LayerctlError, recipes.plan_recipe, sub / "bad.yaml").value)
    assert ":4: jobs[0].gen.config: config: file not found: nocfg" in msg


def test_eval_vae_measures_against_a_single_file_with_its_config(checkpoints, tmp_path):
    """eval-vae takes --config (and --family) like gen: the tiny SD1.5 file measures the same numbers as
    the tiny backend itself; a bad --family or config folder exits 2 before anything loads."""
    from layerctl.models.transparent_vae import save_module
    from layerctl.models.weights import tiny_decoder, tiny_encoder

    path, config = checkpoints["tiny"]
    nets = []
    for flag, net in (("--transparent-decoder", tiny_decoder()), ("--transparent-encoder", tiny_encoder())):
        nets += [flag, str(save_module(net, tmp_path / f"{flag[2:]}.safetensors", dtype=torch.float32))]
    common = ["eval-vae", "synthetic", "--count", "2", "--resolution", "64", "--batch-size", "2", "--json", *nets]
    code, out, err = run_cli(*common, "--model", "tiny")
    assert code == 0, err
    code2, out2, err2 = run_cli(*common, "--model", str(path), "--config", str(config), "--family", "sd15")
    assert code2 == 0, err2
    assert json.loads(out2)["metrics"] == json.loads(out)["metrics"]
    code, _, err = run_cli(*common, "--model", str(path), "--family", "sd3")
    assert code == 2 and "--family must be sd15 or sdxl" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(*common, "--model", str(path), "--config", str(tmp_path / "empty"))
    assert code == 2 and "has no model_index.json" in err
