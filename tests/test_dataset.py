"""layerctl dataset rgba / layers, the perceptual hash, buckets, dilation and masked inpainting (CPU, tiny)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerctl import dataset as ds
from layerctl.errors import LayerctlError

# ---------------------------------------------------------------- helpers


def _shape(kind: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """An RGBA test object (disc, box or diamond) with a colour gradient, on transparency."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.integers(size // 3, 2 * size // 3, 2)
    rad = size * (0.2 + 0.1 * rng.random())
    if kind % 3 == 0:
        a = ((xx - cx) ** 2 + (yy - cy) ** 2) < rad**2
    elif kind % 3 == 1:
        a = (np.abs(xx - cx) < rad) & (np.abs(yy - cy) < rad * 0.6)
    else:
        a = (np.abs(xx - cx) + np.abs(yy - cy)) < rad
    col = rng.random(3)
    grad = np.stack([xx / size, yy / size, (xx + yy) / (2 * size)], -1)
    rgb = np.clip(col[None, None] * 0.7 + 0.3 * grad, 0, 1)
    return np.dstack([rgb * 255, a * 255]).round().astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    """4 good RGBA (+1 exact copy, +1 resized copy), 1 opaque RGB, 1 opaque RGBA, 1 transparent, 1 corrupt."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        _save(src / f"good{i}.png", _shape(i, seed=i))
    shutil.copy(src / "good1.png", src / "sub" / "good1_copy.png")
    Image.open(src / "good2.png").resize((72, 72), Image.Resampling.LANCZOS).save(src / "zz_good2_small.png")
    _save(src / "photo.jpg", (np.random.default_rng(5).random((80, 80, 3)) * 255).astype(np.uint8))
    full = _shape(0, seed=9)
    full[..., 3] = 255
    _save(src / "opaque_rgba.png", full)
    _save(src / "empty.png", np.zeros((80, 80, 4), np.uint8))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (src / "good0.txt").write_text("a red ball\n")
    return src


EXPECTED = {"corrupt": 1, "opaque": 2, "transparent": 1, "duplicate": 2}


# ---------------------------------------------------------------- pure functions


def test_erode_and_feather_inside():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    assert np.array_equal(ds.erode(m, 2), np.pad(np.ones((6, 6), bool), 7))
    w = ds.feather_inside(m, 4)
    assert w[~m].max() == 0 and w[10, 10] == 1
    assert np.allclose(w[10, 5:10], [0.25, 0.5, 0.75, 1.0, 1.0])  # a ramp from the edge inwards
    assert np.array_equal(ds.feather_inside(m, 1), m.astype(np.float32))


@pytest.mark.parametrize("radius", [0, 1, 2, 5])
def test_dilate_matches_brute_force_disk(radius):
    rng = np.random.default_rng(radius)
    m = rng.random((23, 31)) > 0.97
    m[0, 0] = m[22, 30] = True  # corners: clipping at the borders
    got = ds.dilate(m, radius)
    want = np.zeros_like(m)
    for y, x in zip(*np.nonzero(m)):
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy <= radius * radius and 0 <= y + dy < 23 and 0 <= x + dx < 31:
                    want[y + dy, x + dx] = True
    assert np.array_equal(got, want)


def test_perceptual_hash_tells_copies_from_other_images():
    a = _shape(0, 128, seed=1)
    h = ds.perceptual_hash(a)
    assert len(h) == ds.HASH_BITS // 4 and int(h, 16) > 0
    small = np.asarray(Image.fromarray(a).resize((90, 90), Image.Resampling.LANCZOS))
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    assert ds.hash_distance(h, ds.perceptual_hash(small)) <= 6
    assert ds.hash_distance(h, ds.perceptual_hash(noisy)) <= 6
    # other images: other shapes, the same shape in another colour, the mirror image
    recoloured = a.copy()
    recoloured[..., :3] = 255 - recoloured[..., :3]
    others = [_shape(1, 128, seed=2), _shape(2, 128, seed=3), recoloured, a[:, ::-1].copy()]
    for o in others:
        assert ds.hash_distance(h, ds.perceptual_hash(o)) > 40
    assert ds.hash_distance("0f", "f0") == 8


def test_choose_bucket_known_cases():
    assert ds.choose_bucket(1024, 1024, 1024) == (1024, 1024)
    assert ds.choose_bucket(4000, 3000, 1024) == (1152, 896)
    assert ds.choose_bucket(120, 120, 128) == (64, 64)  # no upscaling: 128x128 would be bigger
    assert ds.choose_bucket(120, 120, 128, upscale=True) == (128, 128)
    assert ds.choose_bucket(200, 130, 0) == (192, 128)  # keep size, multiples of 64
    for w, h in [(1920, 1080), (700, 1000), (3000, 500), (333, 777)]:
        bw, bh = ds.choose_bucket(w, h, 512)
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        assert max(bw / bh, bh / bw) <= 4.0
        assert abs(math.log((bw / bh) / (w / h))) < 0.35 or max(w / h, h / w) > 4
    with pytest.raises(ValueError):
        ds.choose_bucket(50, 200, 512)


def test_fit_to_bucket_crop_pad_and_premultiplied_resize():
    img = np.zeros((100, 200, 4), np.uint8)
    img[:, :100] = (0, 0, 255, 255)  # opaque blue left half
    img[:, 100:] = (255, 0, 0, 0)  # invisible red right half: must not bleed
    crop = ds.fit_to_bucket(img, (64, 64), "crop")
    pad = ds.fit_to_bucket(img, (128, 128), "pad")
    assert crop.shape == (64, 64, 4) and pad.shape == (128, 128, 4)
    assert pad[:16, :, 3].max() == 0 and pad[-16:, :, 3].max() == 0  # letterbox rows are transparent
    for out in (crop, pad):
        vis = out[..., 3] > 8
        assert vis.any() and out[vis][:, 0].max() <= 2  # no red halo where the picture is visible


def test_place_on_canvas():
    fg = _shape(0, 70)
    c = ds.place_on_canvas(fg)
    assert c.shape == (128, 128, 4)
    assert np.array_equal(c[29:99, 29:99], fg) and c[:29].max() == 0
    c2 = ds.place_on_canvas(fg, (64, 128))
    assert c2.shape == (128, 64, 4) and c2[..., 3].max() == 255


# ---------------------------------------------------------------- dataset rgba


def _meta(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rgba_counts_per_reason_and_imagefolder(mixed_folder, tmp_path):
    captions = tmp_path / "caps.csv"
    captions.write_text("file_name,caption\ngood3.png,a blue box\n")
    out = tmp_path / "out"
    events = []
    req = ds.RgbaDatasetRequest(sources=[str(mixed_folder)], out=str(out), resolution=64, captions=str(captions))
    s = ds.build_rgba_dataset(req, on_event=events.append)
    assert s.skipped == EXPECTED
    assert s.written == 4 and s.total == 10 and s.new == 4
    assert len([e for e in events if e["event"] == "record"]) == 10
    rows = _meta(out / "metadata.jsonl")
    assert len(rows) == 4
    for r in rows:
        assert set(r) >= {"file_name", "caption", "width", "height", "alpha_coverage", "source", "hash"}
        im = Image.open(out / r["file_name"])
        assert im.mode == "RGBA" and im.size == (r["width"], r["height"]) == (64, 64)
        a = np.asarray(im)[..., 3]
        assert abs(a.mean() / 255 - r["alpha_coverage"]) < 1e-5 and 0 < r["alpha_coverage"] < 1
    caps = {Path(r["source"]).name: r["caption"] for r in rows}
    assert caps["good0.png"] == "a red ball"  # sidecar .txt
    assert caps["good3.png"] == "a blue box"  # CSV
    # the two duplicates: the first in path order is kept
    assert "good1_copy.png" not in caps and "zz_good2_small.png" not in caps
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file_name"] for r in rows)

    data = pytest.importorskip("layerctl.training.data")
    scan = data.scan_folder(out)  # what train-vae reads
    assert scan.layout == "imagefolder" and len(scan.records) == 4 and not scan.missing


def test_rgba_bounds_and_resume(mixed_folder, tmp_path):
    out = tmp_path / "out"
    req = ds.RgbaDatasetRequest(sources=[str(mixed_folder / "*.png")], out=str(out), resolution=64,
                                min_size=90, min_coverage=0.05, max_coverage=0.2)
    s = ds.build_rgba_dataset(req)
    assert s.skipped.get("too_small") == 1  # the 72 px copy (globs skip sub/)
    assert s.total == 8 and sum(s.skipped.values()) + s.written == 8
    kinds = set(s.skipped) - {"corrupt", "opaque", "transparent", "too_small", "duplicate"}
    assert kinds <= {"low_coverage", "high_coverage"}
    with pytest.raises(LayerctlError, match="not empty"):
        ds.build_rgba_dataset(req)
    changed = req.model_copy(update={"resume": True, "min_size": 64})
    with pytest.raises(LayerctlError, match="min_size"):
        ds.build_rgba_dataset(changed)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = ds.build_rgba_dataset(req.model_copy(update={"resume": True}))
    assert again.new == 0 and again.resumed == s.written and again.skipped == s.skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    fresh = ds.build_rgba_dataset(req.model_copy(update={"overwrite": True, "max_coverage": 1.0, "min_coverage": 0.0}))
    assert fresh.written >= s.written and "high_coverage" not in fresh.skipped


def test_rgba_sharded_each_record_once(mixed_folder, tmp_path):
    single = ds.build_rgba_dataset(ds.RgbaDatasetRequest(sources=[str(mixed_folder)], out=str(tmp_path / "one"), resolution=64))
    out = tmp_path / "two"
    req = ds.RgbaDatasetRequest(sources=[str(mixed_folder)], out=str(out), resolution=64)
    seen, results, errors = [], {}, []
    barrier = threading.Barrier(2, timeout=60)
    rank0_done = threading.Event()

    def on_event(ev):
        seen.append(ev)
        if ev.get("rank") == 0 and ev.get("done") == ev.get("total"):
            rank0_done.set()

    def late_barrier(calls=[0]):  # noqa: B006 - rank 1 starts its records only after rank 0 wrote all of its own
        barrier.wait()
        calls[0] += 1
        if calls[0] == 2:
            rank0_done.wait(60)

    def process(rank):  # what each `accelerate launch` process does, with a real barrier between them
        try:
            wait = late_barrier if rank == 1 else barrier.wait
            results[rank] = ds.build_rgba_dataset(req, on_event=on_event, shard=ds.Shard(rank, 2, wait))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s = results[0]
    assert {e["rank"] for e in seen} == {0, 1}
    sources = [e["source"] for e in seen]
    assert len(sources) == len(set(sources)) == 10
    assert s.skipped == single.skipped == EXPECTED
    names = lambda p: sorted(r["file_name"] for r in _meta(p / "metadata.jsonl"))  # noqa: E731
    assert names(out) == names(tmp_path / "one")
    assert sorted(p.name for p in out.glob("*.png")) == names(out)


def test_rgba_cli_errors_and_json(mixed_folder, tmp_path, capsys):
    from layerctl.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        return exc.value.code, capsys.readouterr()

    code, cap = run("dataset", "rgba", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "source not found" in cap.err and "Traceback" not in cap.err
    (tmp_path / "blank").mkdir()
    code, cap = run("dataset", "rgba", str(tmp_path / "blank"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no images found" in cap.err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    code, cap = run("dataset", "rgba", str(mixed_folder), "--out", str(busy))
    assert code == 2 and "not empty" in cap.err and cap.err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"fg": "a", "bg": "b", "whole": "c"}\n{"fg": "a", "bg": "b", "whole": }\n')
    code, cap = run("dataset", "layers", str(mixed_folder), "--prompts", str(bad), "--out", str(tmp_path / "l"), "--model", "tiny")
    assert code == 2 and "bad.jsonl:2: invalid JSON" in cap.err and "Traceback" not in cap.err
    code, cap = run("dataset", "rgba", str(mixed_folder), "--out", str(tmp_path / "o"), "--resolution", "64", "--json")
    assert code == 0
    lines = [json.loads(x) for x in cap.out.splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["skipped"] == EXPECTED
    assert sum(1 for x in lines if x["event"] == "record") == 10


# ---------------------------------------------------------------- prompts


def _fg_dir(tmp_path, n=2, size=64, empty=False) -> Path:
    d = tmp_path / "fgs"
    d.mkdir()
    for i in range(n):
        _save(d / f"obj{i}.png", _shape(i, size, seed=10 + i))
    if empty:
        _save(d / "zz_empty.png", np.zeros((size, size, 4), np.uint8))
    return d


def _no_model(monkeypatch):
    import layerctl.backends.registry

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(layerctl.backends.registry, "load_model", boom)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"fg": "a", "bg": "b", "whole": "c"}\n{"fg": "a", "bg": "b"\n', r"prompts.jsonl:2: invalid JSON"),
        ('{"fg": "a", "bg": "b", "whole": "c"}\n\n{"fg": "a", "whole": "c"}\n', r"prompts.jsonl:3: missing key 'bg'"),
        ('{"fg": "a", "bg": "b", "whole": "c", "file_name": "obj0.png"}\n{"fg": "a", "bg": "b", "whole": "c"}\n',
         r"prompts.jsonl:2: no \"file_name\""),
        ('{"fg": "a", "bg": "b", "whole": "c"}\n', r"has 1 record\(s\) but .* 2 foreground"),
        ('{"fg": "a", "bg": "b", "whole": "c", "file_name": "nope.png"}\n', r"prompts.jsonl:1: nope.png is not a foreground"),
        ('["fg", "bg"]\n', r"prompts.jsonl:1: each line must be a JSON object"),
    ],
)
def test_prompt_file_errors_before_any_model(tmp_path, monkeypatch, text, message):
    _no_model(monkeypatch)
    fgs = _fg_dir(tmp_path)
    p = tmp_path / "prompts.jsonl"
    p.write_text(text)
    req = ds.LayersDatasetRequest(rgba_dir=str(fgs), out=str(tmp_path / "out"), prompts=str(p), model="tiny")
    with pytest.raises(LayerctlError, match=message):
        ds.build_layers_dataset(req)
    assert not (tmp_path / "out").exists()


def test_template_prompts_and_input_errors(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    fgs = _fg_dir(tmp_path, n=3)
    (fgs / "obj1.txt").write_text("green box")
    req = ds.LayersDatasetRequest(rgba_dir=str(fgs), out=str(tmp_path / "o"), backgrounds=["a beach", "a kitchen"],
                                  prompt_template="{fg}, standing on {bg}", per_foreground=2)
    jobs, left = ds.plan_layer_jobs(req, ds.find_foregrounds(str(fgs)))
    assert not left and len(jobs) == 6 and len({j.key for j in jobs}) == 6
    assert [j.bg_prompt for j in jobs] == ["a beach", "a kitchen"] * 3
    assert jobs[2].prompt == "green box, standing on a beach" and jobs[2].fg_prompt == "green box"
    with pytest.raises(LayerctlError, match=r"unknown field \{subject\}"):
        ds.plan_layer_jobs(req.model_copy(update={"prompt_template": "{subject} on {bg}"}), ds.find_foregrounds(str(fgs)))
    with pytest.raises(LayerctlError, match="no prompts"):
        ds.build_layers_dataset(req.model_copy(update={"backgrounds": []}))
    (tmp_path / "blank").mkdir()
    with pytest.raises(LayerctlError, match="no images found"):
        ds.build_layers_dataset(req.model_copy(update={"rgba_dir": str(tmp_path / "blank")}))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.png").write_bytes(b"x")
    with pytest.raises(LayerctlError, match="not empty"):
        ds.build_layers_dataset(req.model_copy(update={"out": str(busy)}))
    with pytest.raises(LayerctlError, match="not written by 'layerctl dataset'"):
        ds.build_layers_dataset(req.model_copy(update={"out": str(busy), "overwrite": True}))


# ---------------------------------------------------------------- models (tiny, CPU)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from layerctl.backends.registry import load_model

    # One thread: the tiny model's small convolutions gain nothing from more, and on a busy
    # 2-core machine two threads measured 40x slower (0.6 s vs 24 s for three inpaintings).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model("tiny", device="cpu")
    finally:
        torch.set_num_threads(threads)


def test_inpaint_latent_blend_semantics(tiny):
    import torch

    from layerctl.pipelines.inpaint import inpaint

    rng = np.random.default_rng(0)
    img = rng.random((64, 64, 3)).astype(np.float32)
    keep_all = np.zeros((64, 64), np.float32)
    r = inpaint(tiny, img, keep_all, "x", steps=1, cfg=1.0, seed=1, paste_back=False)
    mean, _ = tiny.vae_encode(torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1)
    round_trip = tiny.vae_decode(mean)[0].permute(1, 2, 0).numpy()
    assert r.method == "latent-blend"
    assert np.abs(r.image - round_trip).max() < 1e-5  # nothing to repaint: the known latents come back
    mask = np.zeros((64, 64), np.float32)
    mask[16:40, 8:48] = 1
    a = inpaint(tiny, img, mask, "x", steps=2, seed=1)  # with CFG
    b = inpaint(tiny, img, mask, "x", steps=2, seed=1)
    c = inpaint(tiny, img, mask, "x", steps=1, cfg=1.0, seed=2)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image[mask == 1], c.image[mask == 1])
    for res in (a, c):
        assert np.array_equal(res.image[mask == 0], img[mask == 0])  # pasted back exactly
        assert np.abs(res.image - img)[mask == 1].mean() > 0.02


def test_inpaint_nine_channel_unet_uses_the_pipeline(tiny):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from layerctl.backends.tiny import tiny_unet_config
    from layerctl.pipelines.inpaint import inpaint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny_unet_config(False), "in_channels": 9})
    pipe = StableDiffusionPipeline(**{**tiny.pipe.components, "unet": unet})
    m9 = dataclasses.replace(tiny, pipe=pipe)
    img = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64), np.float32)
    mask[:, 32:] = 1
    r = inpaint(m9, img, mask, "x", steps=1, cfg=1.0, seed=0)
    assert r.method == "pipeline" and r.image.shape == (64, 64, 3)
    assert np.array_equal(r.image[:, :32], img[:, :32])


def test_inpaint_sdxl_shaped_model(tiny):
    import torch

    from layerctl.backends.registry import load_model
    from layerctl.pipelines.inpaint import inpaint

    xl = load_model("tiny-xl", device="cpu")  # threads already 1 (the tiny fixture)
    assert torch.get_num_threads() == 1
    img = np.random.default_rng(2).random((64, 128, 3)).astype(np.float32)
    mask = np.zeros((64, 128), np.float32)
    mask[8:40, 40:100] = 1
    r = inpaint(xl, img, mask, "x", steps=1, seed=0)
    assert r.method == "latent-blend" and r.image.shape == (64, 128, 3)
    assert np.array_equal(r.image[mask == 0], img[mask == 0]) and np.abs(r.image - img)[mask == 1].mean() > 0.02


def _check_layer_record(out: Path, r: dict) -> None:
    load = lambda k, mode: np.asarray(Image.open(out / r[k]).convert(mode)).astype(np.float64) / 255.0  # noqa: E731
    fg, bg, bl, it = load("fg", "RGBA"), load("bg", "RGB"), load("blended", "RGB"), load("intermediate", "RGB")
    w = load("mask", "L")
    m = w > 0
    a = fg[..., 3:]
    assert np.abs(fg[..., :3] * a + bg * (1 - a) - bl).max() <= 1 / 255 + 1e-9  # blended = fg over bg
    region = ds.dilate(fg[..., 3] >= r["alpha_threshold"] - 1e-6, r["mask_radius"])
    assert np.array_equal(m, region)
    assert np.allclose(w, ds.feather_inside(region, r["mask_feather"]), atol=0.5 / 255)
    assert np.abs(bg - it)[~m].max() == 0  # outside the dilated mask: the intermediate
    assert np.abs(bg - it)[m].mean() > 0.01  # inside: repainted
    opaque = fg[..., 3] == 1
    assert np.abs(it - fg[..., :3])[opaque].max() <= 1 / 255 + 1e-9  # the foreground sits in the intermediate


def test_layers_tiny_records_resume_after_kill(tiny, tmp_path):
    fgs = _fg_dir(tmp_path, n=2, empty=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(
        json.dumps({"file_name": f"obj{i}.png", "fg": f"object {i}", "bg": "a sunny beach", "whole": f"object {i} on a sunny beach"}) + "\n"
        for i in range(2)
    ) + json.dumps({"file_name": "zz_empty.png", "fg": "nothing", "bg": "a wall", "whole": "a wall"}) + "\n")
    out = tmp_path / "layers"
    req = ds.LayersDatasetRequest(rgba_dir=str(fgs), out=str(out), prompts=str(prompts), steps=2, cfg=1.0,
                                  mask_radius=3, model="tiny", seed=5)

    class Killed(Exception):
        pass

    def kill_after_first(ev):
        if ev.get("event") == "record" and ev["status"] == "ok":
            raise Killed

    with pytest.raises(Killed):
        ds.build_layers_dataset(req, on_event=kill_after_first, model=tiny)
    first = _meta(out / "metadata.jsonl")
    assert len(first) == 1
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(stamp) == 5  # fg, bg, blended, intermediate, mask of the finished record

    with pytest.raises(LayerctlError, match="not empty"):
        ds.build_layers_dataset(req, model=tiny)
    events = []
    s = ds.build_layers_dataset(req.model_copy(update={"resume": True}), on_event=events.append, model=tiny)
    assert s.written == 2 and s.resumed == 1 and s.new == 1 and s.skipped == {"no_opaque_pixels": 1}
    assert not any(e.get("id") == first[0]["id"] for e in events)  # the finished one was not redone
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    rows = _meta(out / "metadata.jsonl")
    assert [r["fg_prompt"] for r in rows] == ["object 0", "object 1"]
    for r in rows:
        assert {"fg", "bg", "blended", "fg_prompt", "bg_prompt", "prompt", "id", "hash", "seed", "stages"} <= set(r)
        assert r["fg"] == f"fg/{r['id']}.png" and r["stages"][1]["mask_radius"] == 3
        assert r["stages"][1]["seed"] == r["seed"] + 1 and r["model"] == "tiny"
        _check_layer_record(out, r)
    assert len({r["seed"] for r in rows}) == 2

    again = ds.build_layers_dataset(req.model_copy(update={"resume": True}), model=tiny)
    assert again.new == 0 and again.resumed == 2

    recs = ds.read_layer_records(out)  # the reader train-lora (mode: layers) uses
    assert [r.id for r in recs] == [r["id"] for r in rows] and recs[0].bg == out / rows[0]["bg"]
    (out / rows[1]["bg"]).unlink()
    with pytest.raises(LayerctlError, match=r"metadata.jsonl:2: bg file .* is missing"):
        ds.read_layer_records(out)


def test_layers_template_prompts_small_foreground(tiny, tmp_path):
    fgs = _fg_dir(tmp_path, n=1, size=48)  # not a multiple of 64: placed on a 64x64 canvas
    out = tmp_path / "lay"
    req = ds.LayersDatasetRequest(rgba_dir=str(fgs), out=str(out), backgrounds=["a forest"], steps=1, cfg=1.0,
                                  mask_radius=2, model="tiny")
    s = ds.build_layers_dataset(req, model=tiny)
    assert s.written == 1
    (r,) = _meta(out / "metadata.jsonl")
    assert (r["width"], r["height"]) == (64, 64) and r["prompt"] == "obj0 on a forest"
    _check_layer_record(out, r)
    # the sampler reaches both inpainting passes and the files' metadata; another sampler, another bg
    from layerctl.io.imageio import read_metadata

    out2 = tmp_path / "lay2"
    s2 = ds.build_layers_dataset(req.model_copy(update={"out": str(out2), "sampler": "euler_a"}), model=tiny)
    assert s2.written == 1
    bg1, bg2 = sorted((out / "bg").glob("*.png")), sorted((out2 / "bg").glob("*.png"))
    assert read_metadata(bg1[0])["sampler"] == "dpmpp_2m"  # the default
    meta = read_metadata(bg2[0])
    assert (meta["sampler"], meta["sampler_label"]) == ("euler_a", "Euler a")
    from PIL import Image

    assert np.abs(np.asarray(Image.open(bg1[0]), np.int16) - np.asarray(Image.open(bg2[0]), np.int16)).max() > 0
