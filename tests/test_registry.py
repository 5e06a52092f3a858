"""The backend registry: names, model references, entry points."""

from __future__ import annotations

import pytest

from layerctl.backends import registry
from layerctl.errors import LayerctlError


def test_builtin_backends_are_registered():
    names = set(registry.available_backends())
    assert {"tiny", "tiny-xl", "toy", "sd15", "sdxl"} <= names
    b = registry.get_backend("tiny-xl")
    assert b.name == "tiny-xl" and b.family == "sdxl"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(LayerctlError, match="unknown backend 'nope'.*tiny"):
        registry.get_backend("nope")


def test_model_references_resolve(tmp_path):
    assert registry.resolve_model_ref("tiny") == ("tiny", "tiny")
    assert registry.resolve_model_ref("sdxl:owner/model") == ("sdxl", "owner/model")
    assert registry.resolve_model_ref("someone/sd-xl-thing") == ("sdxl", "someone/sd-xl-thing")
    assert registry.resolve_model_ref("someone/model") == ("sd15", "someone/model")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert registry.resolve_model_ref(str(folder)) == ("sdxl", str(folder))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"not read")
    with pytest.raises(LayerctlError, match="refusing to unpickle"):
        registry.resolve_model_ref(str(p))


def test_a_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(LayerctlError, match="model_index.json"):
        registry.resolve_model_ref(str(tmp_path))


def test_third_party_backend_through_an_entry_point(monkeypatch):
    from layerctl.backends.tiny import TinyBackend

    class Mine(TinyBackend):
        name = "mine"

    class EP:
        name = "mine"

        def load(self):
            return Mine

    import importlib.metadata as md

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group=None, **k: [EP()] if group == registry.ENTRY_POINT_GROUP else real(group=group, **k))
    assert "mine" in registry.available_backends()
    assert isinstance(registry.get_backend("mine"), Mine)
    model = registry.load_model("mine", "cpu", "fp32", "sdpa")
    assert model.unet is not None and model.attention == "sdpa"


def test_family_overrides_what_a_reference_looks_like(tmp_path):
    assert registry.resolve_model_ref("someone/illustrious-mix", "sdxl") == ("sdxl", "someone/illustrious-mix")
    assert registry.resolve_model_ref("someone/model-xl", "sd15") == ("sd15", "someone/model-xl")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(LayerctlError, match="--family sd15, but the folder .* StableDiffusionXLPipeline"):
        registry.resolve_model_ref(str(folder), "sd15")


def test_config_is_only_for_single_files():
    from layerctl.backends.base import LoadOptions

    with pytest.raises(LayerctlError, match="--config is for single-file"):
        registry.load_model("someone/model", "cpu", "fp32", "sdpa", LoadOptions(config="/x"))


def test_entry_points_are_scanned_once_until_the_path_changes(monkeypatch):
    import importlib.metadata as md

    calls = []
    real = md.entry_points

    def counting(group=None, **k):
        calls.append(group)
        return real(group=group, **k)

    monkeypatch.setattr(md, "entry_points", counting)
    first = registry.available_backends()
    assert registry.available_backends() == first and registry.resolve_model_ref("tiny-flux") == ("tiny-flux", "tiny-flux")
    assert calls == [registry.ENTRY_POINT_GROUP]  # one scan for three lookups
    monkeypatch.syspath_prepend("/nonexistent-layerctl-plugins")
    assert registry.available_backends() == first
    assert calls == [registry.ENTRY_POINT_GROUP] * 2  # a new sys.path entry may bring new plugins: scanned again
