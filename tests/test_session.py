"""Session, ModelCache and ModelKit: one model load per reference, weights swapped and restored,
requests dispatched to the right pipeline."""

from __future__ import annotations

import torch

import pytest

from layerctl.errors import LayerctlError
from layerctl.requests import GenRequest


def _req(**kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("steps", 1)
    kw.setdefault("tta", False)
    return GenRequest(**kw)


def test_cache_loads_a_model_once_per_reference(monkeypatch):
    import layerctl.backends.registry as registry
    from layerctl.session import Session

    loads = []
    real = registry.load_model
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    with Session(quiet=True) as s:
        a = s.model(_req())
        b = s.model(_req(prompt="another"))
        c = s.model(_req(model="tiny-xl"))
    assert a is b and c is not a
    assert loads == ["tiny", "tiny-xl"]


def test_weights_are_swapped_and_restored_bit_for_bit():
    from layerctl.session import Session

    with Session(quiet=True) as s:
        kit = s.models.kit(_req(model="tiny-xl"))
        before = {k: v.clone() for k, v in kit.model.unet.state_dict().items()}
        first = kit.use_weights("rgba", _req(model="tiny-xl"))
        assert kit.use_weights("rgba", _req(model="tiny-xl")) is first  # same role: kept, not re-applied
        changed = kit.model.unet.state_dict()
        assert any(not torch.equal(before[k], changed[k]) for k in before if k in changed)
        kit.use_weights("bg2ble", _req(model="tiny-xl"))  # another role: the first is restored first
        assert int(kit.model.unet.conv_in.in_channels) == 8
        s.clear_weights(kit.model)
        after = kit.model.unet.state_dict()
        assert set(after) == set(before)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert kit.active is None


def test_close_restores_every_model():
    from layerctl.session import Session

    s = Session(quiet=True)
    kit = s.models.kit(_req())
    kit.use_weights("rgba", _req())
    assert kit.active is not None and kit.active.patcher is not None and kit.active.patcher.installed
    patcher = kit.active.patcher
    s.close()
    assert not patcher.installed and s.models.kits() == []


def test_gen_dispatches_by_mode(monkeypatch, tmp_path):
    import layerctl.pipelines.edit as edit
    import layerctl.pipelines.layers as layers
    import layerctl.pipelines.rgba as rgba
    from layerctl.session import Session

    seen = []
    monkeypatch.setattr(rgba, "gen_rgba", lambda models, req: seen.append("rgba") or [])
    monkeypatch.setattr(edit, "gen_edit", lambda models, req: seen.append("edit") or [])
    monkeypatch.setattr(layers, "gen_layers", lambda models, req, mode: seen.append(mode) or [])
    with Session(quiet=True) as s:
        s.gen(_req(prompt="cup", out="a.png"))
        s.gen(_req(prompt="cup", out="a.png", init="x.png"))
        s.gen(_req(joint=True, fg_prompt="cat", bg_prompt="sofa", out_dir="d"))
        s.gen(_req(bg="bg.png", fg_prompt="cat", out_dir="d"))
        s.gen(_req(fg="fg.png", bg_prompt="sofa", out_dir="d"))
        with pytest.raises(LayerctlError, match="--fg-prompt needs --bg"):
            s.gen(_req(fg_prompt="cat", out="a.png"))
    assert seen == ["rgba", "edit", "joint", "bg2fg", "fg2bg"]


def test_bad_output_path_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    import layerctl.backends.registry as registry
    from layerctl.session import Session

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(registry, "load_model", boom)
    with Session(quiet=True) as s:
        with pytest.raises(LayerctlError, match="must end in"):
            s.gen(_req(prompt="cup", out=str(tmp_path / "a.jpg")))
        (tmp_path / "there.png").write_bytes(b"x")
        with pytest.raises(LayerctlError):
            s.gen(_req(prompt="cup", out=str(tmp_path / "there.png")))
    assert (tmp_path / "there.png").read_bytes() == b"x"
