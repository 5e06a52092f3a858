"""A procedural source of RGBA images with known alpha (numpy + PIL, deterministic by seed).

Every sample is a few objects drawn over a fully transparent canvas. The
objects cover what a transparency VAE has to learn:

- hard (anti-aliased) and feathered edges,
- semi-transparent fills with a denser rim and a highlight ("glass"),
- thin strands with sub-pixel width ("hair"),
- colour gradients,
- several shapes and colours.

Each sample comes with a caption ("red ball", "glass cup, brown hair") so
that a text-conditioned toy model can be trained on the same source later.
Shapes, materials and colours are enumerable (SHAPES, MATERIALS, COLOURS) and
can be restricted per source.

Sample `i` of a source with seed `s` depends on (s, i, size) only, so a
training run that resumes at position i sees exactly the images it would
have seen without the interruption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

# name -> straight RGB in [0,1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.96, 0.86, 0.18),
    "green": (0.16, 0.68, 0.25),
    "teal": (0.10, 0.60, 0.60),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.52, 0.22, 0.72),
    "pink": (0.96, 0.52, 0.72),
    "brown": (0.48, 0.29, 0.13),
    "black": (0.06, 0.06, 0.07),
    "white": (0.96, 0.96, 0.95),
    "grey": (0.55, 0.55, 0.57),
}

# shape name -> the noun used in captions
SHAPES: dict[str, str] = {
    "disc": "ball",
    "box": "box",
    "ring": "ring",
    "triangle": "pyramid",
    "star": "star",
    "cup": "cup",
    "blob": "cloud",
    "strands": "hair",
}

# material -> what it exercises
MATERIALS: dict[str, str] = {
    "solid": "opaque fill, hard anti-aliased edge",
    "soft": "opaque fill, feathered edge",
    "glass": "semi-transparent fill, denser rim, bright highlight",
    "gradient": "two-colour linear gradient, hard edge",
}

# strands are always drawn as hair (thin lines); the material does not apply to them
STRAND_SHAPES = ("strands",)


@dataclass(frozen=True)
class SyntheticObject:
    shape: str
    material: str
    colour: str
    colour2: Optional[str]
    cx: float
    cy: float
    size: float  # radius-like extent in pixels

    @property
    def caption(self) -> str:
        noun = SHAPES[self.shape]
        if self.shape in STRAND_SHAPES:
            return f"{self.colour} {noun}"
        if self.material == "glass":
            return f"glass {noun}"
        if self.material == "gradient":
            return f"{self.colour}-{self.colour2} gradient {noun}"
        if self.material == "soft":
            return f"blurry {self.colour} {noun}"
        return f"{self.colour} {noun}"


@dataclass
class SyntheticSample:
    rgba: np.ndarray  # H x W x 4 float32 in [0,1], straight alpha; RGB is 0 where alpha is 0
    caption: str
    objects: list[SyntheticObject] = field(default_factory=list)

    def to_uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.rgba * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# signed distances (negative inside), in pixels, on a pixel-centre grid


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x + 0.5, y + 0.5


def sd_circle(x, y, cx, cy, r):
    return np.hypot(x - cx, y - cy) - r


def sd_box(x, y, cx, cy, hw, hh, radius=0.0, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    qx = np.abs(u) - (hw - radius)
    qy = np.abs(v) - (hh - radius)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    inside = np.minimum(np.maximum(qx, qy), 0)
    return outside + inside - radius


def sd_polygon(x, y, pts: np.ndarray):
    """Signed distance to a simple polygon (vertices pts[N,2]); negative inside."""
    d = np.full(x.shape, np.inf, dtype=np.float32)
    inside = np.zeros(x.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        ax, ay = pts[i]
        bx, by = pts[(i + 1) % n]
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        t = np.clip((wx * ex + wy * ey) / max(ex * ex + ey * ey, 1e-12), 0.0, 1.0)
        d = np.minimum(d, np.hypot(wx - ex * t, wy - ey * t))
        # even-odd crossing test
        cond = ((ay > y) != (by > y)) & (x < (bx - ax) * (y - ay) / np.where(by - ay == 0, 1e-12, by - ay) + ax)
        inside ^= cond
    return np.where(inside, -d, d).astype(np.float32)


def coverage_hard(sd: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a hard edge (one pixel ramp)."""
    return np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32)


def coverage_soft(sd: np.ndarray, feather: float) -> np.ndarray:
    """Feathered coverage: smoothstep over `feather` pixels centred on the edge."""
    t = np.clip(0.5 - sd / max(feather, 1e-6), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


# ---------------------------------------------------------------------------


def _shape_sd(shape: str, x, y, cx, cy, r, rng: np.random.Generator):
    if shape == "disc":
        return sd_circle(x, y, cx, cy, r)
    if shape == "box":
        aspect = rng.uniform(0.6, 1.0)
        return sd_box(x, y, cx, cy, r, r * aspect, radius=r * rng.uniform(0.0, 0.35), angle=rng.uniform(-0.6, 0.6))
    if shape == "ring":
        thick = r * rng.uniform(0.25, 0.45)
        return np.abs(sd_circle(x, y, cx, cy, r - thick / 2)) - thick / 2
    if shape == "triangle":
        a0 = rng.uniform(0, 2 * np.pi)
        ang = a0 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)
        return sd_polygon(x, y, pts)
    if shape == "star":
        k = int(rng.integers(5, 8))
        a0 = rng.uniform(0, 2 * np.pi)
        ang = a0 + np.arange(2 * k) * np.pi / k
        rad = np.where(np.arange(2 * k) % 2 == 0, r, r * rng.uniform(0.4, 0.55))
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        return sd_polygon(x, y, pts)
    if shape == "cup":
        top, bot = r * rng.uniform(0.75, 0.95), r * rng.uniform(0.45, 0.65)
        h = r * rng.uniform(0.9, 1.1)
        pts = np.array([[cx - top, cy - h], [cx + top, cy - h], [cx + bot, cy + h], [cx - bot, cy + h]])
        body = sd_polygon(x, y, pts)
        handle = np.abs(sd_circle(x, y, cx + top * 0.95, cy - h * 0.1, r * 0.35)) - r * 0.07
        return np.minimum(body, handle)
    if shape == "blob":
        # a circle with a wavy radius; the distance is approximate but smooth
        k = rng.integers(2, 5, size=3)
        amp = rng.uniform(0.05, 0.18, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        theta = np.arctan2(y - cy, x - cx)
        wave = sum(a * np.sin(kk * theta + p) for a, kk, p in zip(amp, k, ph))
        return np.hypot(x - cx, y - cy) - r * (1.0 + wave)
    raise ValueError(f"unknown shape {shape!r}")


def _strands_alpha(h: int, w: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """Thin wavy strands (hair-like), drawn 4x supersampled with PIL and box-downsampled."""
    from PIL import Image, ImageDraw

    ss = 4
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    n = int(rng.integers(12, 40))
    base_angle = rng.uniform(0, 2 * np.pi)
    for _ in range(n):
        a = base_angle + rng.normal(0, 0.35)
        x0 = cx + rng.normal(0, r * 0.25)
        y0 = cy + rng.normal(0, r * 0.25)
        length = r * rng.uniform(1.0, 2.0)
        segs = 10
        curl = rng.normal(0, 0.25)
        phase = rng.uniform(0, 2 * np.pi)
        pts = []
        for j in range(segs + 1):
            t = j / segs
            ang = a + curl * np.sin(phase + 3 * t)
            px = x0 + (t - 0.5) * length * np.cos(ang) - 0.1 * length * np.sin(phase + 5 * t) * np.sin(ang)
            py = y0 + (t - 0.5) * length * np.sin(ang) + 0.1 * length * np.sin(phase + 5 * t) * np.cos(ang)
            pts.append((px * ss, py * ss))
        width = int(rng.integers(1, 4))  # 1..3 supersampled px = 0.25..0.75 image px
        draw.line(pts, fill=int(rng.integers(170, 256)), width=width, joint="curve")
    small = canvas.resize((w, h), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _over(dst_p: np.ndarray, dst_a: np.ndarray, rgb: np.ndarray, a: np.ndarray) -> None:
    """Composite straight-alpha (rgb, a) over a premultiplied canvas, in place."""
    dst_p *= (1.0 - a)[..., None]
    dst_p += rgb * a[..., None]
    dst_a *= 1.0 - a
    dst_a += a


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _jitter(rng, colour: str, amount: float = 0.06) -> np.ndarray:
    c = np.asarray(COLOURS[colour], dtype=np.float32)
    return np.clip(c + rng.normal(0, amount, size=3).astype(np.float32), 0.0, 1.0)


def draw_object(
    x: np.ndarray, y: np.ndarray, obj: SyntheticObject, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One object's straight RGB (H,W,3) and alpha (H,W)."""
    h, w = x.shape
    if obj.shape in STRAND_SHAPES:
        a = _strands_alpha(h, w, obj.cx, obj.cy, obj.size, rng)
        rgb = np.broadcast_to(_jitter(rng, obj.colour), (h, w, 3)).copy()
        return rgb, a

    sd = _shape_sd(obj.shape, x, y, obj.cx, obj.cy, obj.size, rng)
    base = _jitter(rng, obj.colour)
    if obj.material == "solid":
        return np.broadcast_to(base, (h, w, 3)).copy(), coverage_hard(sd)
    if obj.material == "soft":
        feather = obj.size * rng.uniform(0.08, 0.4)
        return np.broadcast_to(base, (h, w, 3)).copy(), coverage_soft(sd, feather)
    if obj.material == "gradient":
        c2 = _jitter(rng, obj.colour2 or obj.colour)
        ang = rng.uniform(0, 2 * np.pi)
        t = ((x - obj.cx) * np.cos(ang) + (y - obj.cy) * np.sin(ang)) / (2 * obj.size) + 0.5
        t = np.clip(t, 0.0, 1.0)[..., None]
        return (base * (1 - t) + c2 * t).astype(np.float32), coverage_hard(sd)
    if obj.material == "glass":
        cover = coverage_hard(sd)
        fill = rng.uniform(0.12, 0.45)
        rim_w = max(1.0, obj.size * rng.uniform(0.06, 0.14))
        rim = coverage_soft(np.abs(sd + rim_w / 2) - rim_w / 2, 1.5)
        a = np.maximum(cover * fill, rim * rng.uniform(0.6, 0.9))
        tint = 0.75 + 0.25 * base  # pale tint of the colour
        rgb = np.broadcast_to(tint, (h, w, 3)).copy()
        # a diagonal highlight stripe, almost opaque white
        ang = rng.uniform(0, np.pi)
        off = rng.uniform(-0.4, 0.4) * obj.size
        band = np.abs((x - obj.cx) * np.cos(ang) + (y - obj.cy) * np.sin(ang) - off) - obj.size * rng.uniform(0.05, 0.12)
        hl = coverage_soft(band, 2.0) * cover
        rgb = rgb * (1 - hl[..., None]) + hl[..., None] * 1.0
        a = np.maximum(a, hl * rng.uniform(0.7, 0.95))
        return rgb.astype(np.float32), a.astype(np.float32)
    raise ValueError(f"unknown material {obj.material!r}")


class SyntheticSource:
    """RGBA images with known alpha, sample i a pure function of (seed, i, size).

    >>> src = SyntheticSource(seed=0)
    >>> s = src.sample(3, 64)          # SyntheticSample: rgba (64,64,4) float32, caption, objects
    """

    def __init__(
        self,
        seed: int = 0,
        shapes: Optional[Sequence[str]] = None,
        materials: Optional[Sequence[str]] = None,
        colours: Optional[Sequence[str]] = None,
        max_objects: int = 3,
        min_objects: int = 1,
    ) -> None:
        self.seed = int(seed)
        self.shapes = tuple(shapes) if shapes else tuple(SHAPES)
        self.materials = tuple(materials) if materials else tuple(MATERIALS)
        self.colours = tuple(colours) if colours else tuple(COLOURS)
        for name, given, known in (
            ("shape", self.shapes, SHAPES),
            ("material", self.materials, MATERIALS),
            ("colour", self.colours, COLOURS),
        ):
            bad = [g for g in given if g not in known]
            if bad:
                raise ValueError(f"unknown {name}(s) {bad}; known: {', '.join(known)}")
        if not (1 <= min_objects <= max_objects):
            raise ValueError(f"need 1 <= min_objects <= max_objects (got {min_objects}, {max_objects})")
        self.max_objects = int(max_objects)
        self.min_objects = int(min_objects)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, 0x5EED, int(index) & 0xFFFFFFFFFFFF])

    def plan(self, index: int, size: int | tuple[int, int]) -> list[SyntheticObject]:
        """The objects of sample `index` (no pixels drawn)."""
        h, w = (size, size) if isinstance(size, int) else size
        rng = self.rng(index)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        m = min(h, w)
        objs = []
        for _ in range(n):
            shape = _pick(rng, self.shapes)
            material = _pick(rng, self.materials)
            colour = _pick(rng, self.colours)
            colour2 = _pick(rng, [c for c in self.colours if c != colour] or [colour])
            r = m * rng.uniform(0.14, 0.36)
            cx = rng.uniform(0.2, 0.8) * w
            cy = rng.uniform(0.2, 0.8) * h
            objs.append(SyntheticObject(shape, material, colour, colour2 if material == "gradient" else None, cx, cy, r))
        return objs

    def sample(self, index: int, size: int | tuple[int, int] = 256) -> SyntheticSample:
        h, w = (size, size) if isinstance(size, int) else size
        objs = self.plan(index, (h, w))
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xD4A3, int(index) & 0xFFFFFFFFFFFF])
        x, y = _grid(h, w)
        prem = np.zeros((h, w, 3), dtype=np.float32)
        alpha = np.zeros((h, w), dtype=np.float32)
        for obj in objs:
            rgb, a = draw_object(x, y, obj, rng)
            _over(prem, alpha, np.clip(rgb, 0, 1), np.clip(a, 0, 1))
        rgb = np.where(alpha[..., None] > 1e-6, prem / np.maximum(alpha[..., None], 1e-6), 0.0)
        rgba = np.concatenate([np.clip(rgb, 0, 1), alpha[..., None]], axis=-1).astype(np.float32)
        caption = ", ".join(o.caption for o in objs)
        return SyntheticSample(rgba=rgba, caption=caption, objects=objs)

    def __call__(self, index: int, size: int | tuple[int, int] = 256) -> SyntheticSample:
        return self.sample(index, size)
