"""Procedural toy scenes: an RGBA object over a procedural background, with captions.

The data the bundled `toy` model family is trained on (recipes/toy/). It
extends the synthetic RGBA source of train-vae (layerctl.training.synthetic)
with the toy vocabulary:

- objects (SHAPES): cup, glass, bottle, ball, star, heart, ring, leaf,
  smoke puff, hair tuft;
- COLOURS: the dozen colours of the synthetic source;
- MATERIALS: solid (opaque, anti-aliased edge), glass (semi-transparent body,
  brighter rim and a highlight), smoke (soft, falling-off alpha);
- BACKGROUNDS: table, sky, street (stripes), grass, wall.

`SceneSource(seed)(i)` is a pure function of (seed, i, size): the foreground
RGBA (straight alpha), the background RGB, their blend, and the captions
("glass cup", "table", "glass cup on a table").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from layerctl.training.synthetic import COLOURS, coverage_hard, coverage_soft, sd_box, sd_circle, sd_polygon

# shape key -> caption noun (two words for smoke puff / hair tuft)
SHAPES: dict[str, str] = {
    "cup": "cup",
    "glass": "glass",
    "bottle": "bottle",
    "ball": "ball",
    "star": "star",
    "heart": "heart",
    "ring": "ring",
    "leaf": "leaf",
    "puff": "smoke puff",
    "tuft": "hair tuft",
}
MATERIALS = ("solid", "glass", "smoke")
MATERIAL_WEIGHTS = {"solid": 0.5, "glass": 0.3, "smoke": 0.2}
# background key -> (caption noun, the phrase used in blended captions)
BACKGROUNDS: dict[str, tuple[str, str]] = {
    "table": ("table", "on a table"),
    "sky": ("sky", "in the sky"),
    "street": ("street", "on a street"),
    "grass": ("grass", "on the grass"),
    "wall": ("wall", "against a wall"),
}
# shapes whose material is fixed by what they are
FIXED_MATERIAL = {"glass": "glass", "puff": "smoke", "tuft": "solid"}
EXTRA_WORDS = ("a", "an", "the", "on", "in", "against", "of", "and", "with", "transparent", "background",
               "high", "quality", "bad", "ugly", "object", "scene", "solid", "smoke")


def vocabulary() -> list[str]:
    """Every word the toy captions use (sorted, lower case)."""
    words = set(EXTRA_WORDS) | set(COLOURS) | {"glass", "smoke", "solid"}
    for noun in SHAPES.values():
        words.update(noun.split())
    for noun, phrase in BACKGROUNDS.values():
        words.update(noun.split())
        words.update(phrase.split())
    return sorted(words)


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", (text or "").lower())


@dataclass(frozen=True)
class SceneObject:
    shape: str
    material: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def caption(self) -> str:
        noun = SHAPES[self.shape]
        if self.shape == "glass":
            return f"{self.colour} glass" if self.colour not in ("white", "grey") else "glass"
        if self.material == "glass":
            return f"glass {noun}"
        if self.material == "smoke" and self.shape != "puff":
            return f"{self.colour} smoke {noun}"
        return f"{self.colour} {noun}"


@dataclass
class Scene:
    fg: np.ndarray  # H x W x 4 float32 straight alpha; RGB 0 where alpha 0
    bg: np.ndarray  # H x W x 3 float32
    obj: SceneObject
    background: str

    @property
    def blended(self) -> np.ndarray:
        a = self.fg[..., 3:4]
        return (self.fg[..., :3] * a + self.bg * (1 - a)).astype(np.float32)

    @property
    def fg_caption(self) -> str:
        return self.obj.caption

    @property
    def bg_caption(self) -> str:
        return BACKGROUNDS[self.background][0]

    @property
    def caption(self) -> str:
        return f"{self.obj.caption} {BACKGROUNDS[self.background][1]}"

    def prompts(self) -> tuple[str, str, str]:
        """(fg, bg, blended) captions."""
        return self.fg_caption, self.bg_caption, self.caption


# ---------------------------------------------------------------- shapes (signed distance, pixels)


def _heart_sd(x, y, cx, cy, r):
    # two discs and a triangle
    d1 = sd_circle(x, y, cx - r * 0.45, cy - r * 0.25, r * 0.52)
    d2 = sd_circle(x, y, cx + r * 0.45, cy - r * 0.25, r * 0.52)
    tri = sd_polygon(x, y, np.array([[cx - r * 0.93, cy - r * 0.05], [cx + r * 0.93, cy - r * 0.05], [cx, cy + r * 0.95]]))
    return np.minimum(np.minimum(d1, d2), tri)


def shape_sd(shape: str, x, y, cx, cy, r, rng: np.random.Generator):
    if shape == "ball" or shape == "puff":
        return sd_circle(x, y, cx, cy, r)
    if shape == "ring":
        thick = r * rng.uniform(0.28, 0.4)
        return np.abs(sd_circle(x, y, cx, cy, r - thick / 2)) - thick / 2
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return sd_polygon(x, y, np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1))
    if shape == "heart":
        return _heart_sd(x, y, cx, cy, r)
    if shape == "cup":
        top, bot, h = r * 0.8, r * 0.6, r * 0.85
        body = sd_polygon(x, y, np.array([[cx - top, cy - h], [cx + top, cy - h], [cx + bot, cy + h], [cx - bot, cy + h]]))
        handle = np.abs(sd_circle(x, y, cx + top * 0.95, cy - h * 0.05, r * 0.38)) - r * 0.09
        return np.minimum(body, handle)
    if shape == "glass":  # a wine glass: bowl, stem, foot
        bowl = np.maximum(sd_circle(x, y, cx, cy - r * 0.35, r * 0.6), -(y - (cy - r * 0.55)))
        stem = sd_box(x, y, cx, cy + r * 0.4, r * 0.07, r * 0.45)
        foot = sd_box(x, y, cx, cy + r * 0.9, r * 0.45, r * 0.07, radius=r * 0.05)
        return np.minimum(np.minimum(bowl, stem), foot)
    if shape == "bottle":
        body = sd_box(x, y, cx, cy + r * 0.3, r * 0.42, r * 0.68, radius=r * 0.15)
        neck = sd_box(x, y, cx, cy - r * 0.6, r * 0.15, r * 0.35, radius=r * 0.05)
        return np.minimum(body, neck)
    if shape == "leaf":
        ang = rng.uniform(-0.8, 0.8)
        c, s = np.cos(ang), np.sin(ang)
        u, v = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
        # lens: intersection of two discs, long axis along u
        d = r * 0.55
        rr = np.hypot(r, d)
        return np.maximum(np.hypot(u, v - d) - rr, np.hypot(u, v + d) - rr)
    raise ValueError(f"unknown shape {shape!r}")


def _tuft_alpha(h, w, cx, cy, r, rng) -> np.ndarray:
    """Hair tuft: thin curved strands fanning up from a root, 4x supersampled."""
    from PIL import Image, ImageDraw

    ss = 4
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(14, 26))):
        a = -np.pi / 2 + rng.normal(0, 0.45)
        length = r * rng.uniform(1.2, 1.9)
        bend = rng.normal(0, 0.5)
        pts = []
        for j in range(9):
            t = j / 8
            ang = a + bend * t
            pts.append(((cx + np.cos(ang) * length * t) * ss, (cy + r * 0.8 + np.sin(ang) * length * t) * ss))
        draw.line(pts, fill=int(rng.integers(190, 256)), width=int(rng.integers(2, 4)), joint="curve")
    return np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def draw_scene_object(x, y, obj: SceneObject, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Straight RGB (H,W,3) and alpha (H,W) of one object."""
    h, w = x.shape
    base = np.clip(np.asarray(COLOURS[obj.colour], np.float32) + rng.normal(0, 0.04, 3).astype(np.float32), 0, 1)
    if obj.shape == "tuft":
        return np.broadcast_to(base, (h, w, 3)).copy(), _tuft_alpha(h, w, obj.cx, obj.cy, obj.size, rng)
    sd = shape_sd(obj.shape, x, y, obj.cx, obj.cy, obj.size, rng)
    # a little shading so objects are not flat
    shade = 1.0 + 0.18 * np.clip(-((x - obj.cx) + (y - obj.cy)) / (2 * obj.size), -1, 1)
    rgb = np.clip(base[None, None, :] * shade[..., None], 0, 1).astype(np.float32)
    if obj.material == "solid":
        return rgb, coverage_hard(sd)
    if obj.material == "smoke":
        # soft alpha falling off from the centre, with a wispy noise
        t = np.clip(1.0 - np.hypot(x - obj.cx, y - obj.cy) / (obj.size * 1.25), 0, 1)
        wisp = 0.75 + 0.25 * np.sin(x * rng.uniform(0.2, 0.4) + rng.uniform(0, 6)) * np.sin(y * rng.uniform(0.2, 0.4))
        a = (t**1.5) * wisp * rng.uniform(0.6, 0.85)
        if obj.shape != "puff":
            a = a * coverage_soft(sd, obj.size * 0.5) * 1.6
        smoke = 0.6 * rgb + 0.4 * np.float32(0.85)
        return smoke.astype(np.float32), np.clip(a, 0, 1).astype(np.float32)
    # glass: semi-transparent body, brighter and denser rim, a highlight
    cover = coverage_hard(sd)
    fill = rng.uniform(0.3, 0.45)
    rim_w = max(1.2, obj.size * 0.12)
    rim = coverage_soft(np.abs(sd + rim_w / 2) - rim_w / 2, 1.5)
    a = np.maximum(cover * fill, rim * 0.85)
    tint = 0.55 + 0.45 * base
    out = np.broadcast_to(tint, (h, w, 3)).copy()
    out = out * (1 - rim[..., None] * 0.5) + rim[..., None] * 0.5  # brighter rim
    band = np.abs((x - obj.cx) + 0.6 * (y - obj.cy) + obj.size * 0.3) - obj.size * 0.08
    hl = coverage_soft(band, 1.5) * cover
    out = out * (1 - hl[..., None]) + hl[..., None]
    a = np.maximum(a, hl * 0.8)
    return out.astype(np.float32), a.astype(np.float32)


# ---------------------------------------------------------------- backgrounds


def draw_background(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / np.float32(max(h, w))
    j = lambda c, s=0.05: np.clip(np.asarray(c, np.float32) + rng.normal(0, s, 3).astype(np.float32), 0, 1)  # noqa: E731
    if kind == "sky":
        top, bottom = j((0.35, 0.55, 0.9)), j((0.75, 0.85, 0.97))
        img = top * (1 - y[..., None]) + bottom * y[..., None]
        for _ in range(int(rng.integers(1, 4))):  # soft clouds
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 0.6), rng.uniform(0.08, 0.2)
            c = np.clip(1 - np.hypot((x - cx) / 1.8, y - cy) / r, 0, 1)[..., None] ** 2
            img = img * (1 - c) + c * 0.98
        return img.astype(np.float32)
    if kind == "table":
        horizon = rng.uniform(0.45, 0.65)
        wall, wood = j((0.82, 0.8, 0.74)), j((0.55, 0.36, 0.2))
        grain = 0.07 * np.sin(y * 90 + 4 * np.sin(x * 8 + rng.uniform(0, 6)))
        top = y >= horizon
        img = np.where(top[..., None], wood * (1 + grain[..., None]), wall)
        return np.clip(img, 0, 1).astype(np.float32)
    if kind == "street":
        a, b = j((0.35, 0.35, 0.37)), j((0.6, 0.6, 0.58))
        period, angle = rng.uniform(0.15, 0.3), rng.uniform(-0.5, 0.5)
        t = (x * np.cos(angle) + y * np.sin(angle)) / period
        stripe = (np.sin(t * 2 * np.pi) > 0.4).astype(np.float32)[..., None]
        return (a * (1 - stripe) + b * stripe).astype(np.float32)
    if kind == "grass":
        g = j((0.22, 0.55, 0.18))
        n = rng.normal(0, 0.07, (h, w)).astype(np.float32)
        blades = 0.08 * np.sin(x * 120 + rng.uniform(0, 6))
        return np.clip(g * (1 + n + blades)[..., None] * (0.85 + 0.3 * y[..., None]), 0, 1).astype(np.float32)
    if kind == "wall":
        c, mortar = j((0.7, 0.33, 0.25)), j((0.8, 0.78, 0.74), 0.02)
        bh = rng.uniform(0.1, 0.16)
        row = np.floor(y / bh)
        xs = x + (row % 2) * bh
        line = ((y / bh) % 1 < 0.12) | ((xs / (2 * bh)) % 1 < 0.06)
        return np.where(line[..., None], mortar, c).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


class SceneSource:
    """Scene i of seed s: a pure function of (s, i, size)."""

    def __init__(self, seed: int = 0, shapes=None, materials=None, colours=None, backgrounds=None):
        self.seed = int(seed)
        self.shapes = list(shapes or SHAPES)
        self.materials = list(materials or MATERIALS)
        self.colours = list(colours or COLOURS)
        self.backgrounds = list(backgrounds or BACKGROUNDS)
        for name, allowed, given in [("shape", SHAPES, self.shapes), ("material", MATERIALS, self.materials),
                                     ("colour", COLOURS, self.colours), ("background", BACKGROUNDS, self.backgrounds)]:
            bad = [g for g in given if g not in allowed]
            if bad:
                raise ValueError(f"unknown {name}(s) {bad} (known: {', '.join(allowed)})")

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index), 0x70E])

    def plan(self, index: int, size: int = 64) -> tuple[SceneObject, str, np.random.Generator]:
        rng = self.rng(index)
        shape = self.shapes[int(rng.integers(len(self.shapes)))]
        weights = np.array([MATERIAL_WEIGHTS[m] for m in self.materials])
        material = FIXED_MATERIAL.get(shape) or self.materials[int(rng.choice(len(self.materials), p=weights / weights.sum()))]
        colour = self.colours[int(rng.integers(len(self.colours)))]
        r = size * rng.uniform(0.26, 0.36)
        cx = size / 2 + rng.uniform(-0.08, 0.08) * size
        cy = size / 2 + rng.uniform(-0.08, 0.08) * size
        bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        return SceneObject(shape, material, colour, float(cx), float(cy), float(r)), bg, rng

    def __call__(self, index: int, size: int = 64) -> Scene:
        obj, bg, rng = self.plan(index, size)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        rgb, a = draw_scene_object(x + 0.5, y + 0.5, obj, rng)
        fg = np.concatenate([rgb * (a[..., None] > 0), a[..., None]], axis=-1).astype(np.float32)
        return Scene(fg=fg, bg=draw_background(bg, size, size, rng), obj=obj, background=bg)


def _plain_solid(obj: SceneObject) -> bool:
    """A solid object captioned "<colour> <shape>" with a one-word shape (the wine glass is never solid; the
    hair tuft's two-word noun is left alone)."""
    return obj.material == "solid" and " " not in SHAPES[obj.shape]


def export_rgba_folder(out_dir, count: int, seed: int = 0, size: int = 64, shapes=None, first: int = 0,
                       materials=None, solid_word_every: int = 0) -> int:
    """Write `count` foreground RGBA PNGs (+ .txt captions) for train-vae / train-lora folder sources.

    `shapes` / `materials` limit the scenes to those objects / materials (e.g. to weight a training set
    towards the thin shapes, or towards solid objects; a shape with a fixed material keeps it);
    `first` numbers the files from there, so a second call can add to a folder without overwriting it.
    `solid_word_every` = N > 0: the files whose number is a multiple of N caption a plain solid object
    "solid <colour> <shape>" (the others keep "<colour> <shape>"), so "solid" stands against "glass"."""
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = SceneSource(seed, shapes=shapes, materials=materials)
    for i in range(count):
        s = src(i, size)
        arr = np.clip(np.rint(s.fg * 255), 0, 255).astype(np.uint8)
        name = f"{first + i:06d}"
        Image.fromarray(arr, "RGBA").save(out / f"{name}.png")
        caption = s.fg_caption
        if solid_word_every > 0 and (first + i) % solid_word_every == 0 and _plain_solid(s.obj):
            caption = f"solid {caption}"
        (out / f"{name}.txt").write_text(caption + "\n")
    return count


def export_layers_folder(out_dir, count: int, seed: int = 0, size: int = 64) -> int:
    """Write `count` (fg RGBA, bg, blended) triplets + metadata.jsonl (the train-lora layers layout)."""
    import json
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    for sub in ("fg", "bg", "blended"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    src = SceneSource(seed)
    rows = []
    for i in range(count):
        s = src(i, size)
        name = f"{i:06d}.png"
        q = lambda a: np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)  # noqa: E731
        Image.fromarray(q(s.fg), "RGBA").save(out / "fg" / name)
        Image.fromarray(q(s.bg), "RGB").save(out / "bg" / name)
        Image.fromarray(q(s.blended), "RGB").save(out / "blended" / name)
        fg, bg, blended = s.prompts()
        rows.append({"id": f"{i:06d}", "fg": f"fg/{name}", "bg": f"bg/{name}", "blended": f"blended/{name}",
                     "fg_prompt": fg, "bg_prompt": bg, "prompt": blended})
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "metadata.jsonl")
    return count
