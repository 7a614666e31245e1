"""Scenes of the synthetic world: what is in a picture, how to sample one, how to draw it.

A scene is pure data (shapes, colours, sizes, positions, background), so captions are written
from the same object the image is rendered from: they cannot disagree.
Positions are centres in fractions of the image side (0 = left/top, 1 = right/bottom).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "diamond",
    "cross",
    "pentagon",
    "drop",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "orange": (245, 135, 20),
    "purple": (140, 50, 180),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
# Radius as a fraction of the image side: big objects have ~3.5x the area of small ones.
SIZES: dict[str, float] = {"small": 0.09, "big": 0.17}
RELATIONS = ("left", "right", "above", "below")  # where objects[0] is relative to objects[1]
REGIONS = ("left", "right", "top", "bottom", "middle")  # where a lone object sits

# Background tints: light, mid and dark; one is picked that no object colour is close to.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "cream": (238, 232, 213),
    "pale-blue": (214, 228, 240),
    "pale-pink": (242, 222, 226),
    "mint": (216, 238, 226),
    "light-grey": (220, 220, 220),
    "grey": (140, 140, 140),
    "slate": (112, 128, 144),
    "taupe": (150, 135, 120),
    "charcoal": (40, 40, 44),
    "navy": (24, 30, 60),
    "forest": (25, 45, 35),
    "brown": (55, 38, 30),
}
BACKGROUND_KINDS = ("flat", "gradient", "noise")
_MIN_CONTRAST = 100.0  # minimum RGB distance between the background and any object colour
_GAP = 0.04  # minimum free space between two objects (fraction of the side)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def kind(self) -> tuple[str, str, str]:
        """What a caption can tell apart: two objects of the same kind are counted together."""
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Background:
    kind: str  # flat | gradient | noise
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int]  # bottom colour of a gradient (== rgb otherwise)
    seed: int  # noise seed


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: Background
    relation: str | None = None  # two objects only: objects[0] is <relation> of objects[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        bg = d["background"]
        return cls(
            objects=tuple(Obj(**o) for o in d["objects"]),
            background=Background(bg["kind"], tuple(bg["rgb"]), tuple(bg["rgb2"]), bg["seed"]),
            relation=d.get("relation"),
        )


def region(obj: Obj) -> str:
    """Where a lone object is: the thresholds leave a margin around those used in sampling."""
    if obj.x < 0.36:
        return "left"
    if obj.x > 0.64:
        return "right"
    if obj.y < 0.36:
        return "top"
    if obj.y > 0.64:
        return "bottom"
    return "middle"


def relation_of(a: Obj, b: Obj) -> str | None:
    """The clear spatial relation of a to b, or None when the layout is ambiguous."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > 2 * abs(dy) and abs(dx) >= a.radius + b.radius:
        return "left" if dx < 0 else "right"
    if abs(dy) > 2 * abs(dx) and abs(dy) >= a.radius + b.radius:
        return "above" if dy < 0 else "below"
    return None


def _apart(a: Obj, b: Obj) -> bool:
    return math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + _GAP


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 3)


def _place_alone(rng: random.Random, shape: str, colour: str, size: str) -> Obj:
    m = SIZES[size] + 0.03
    where = rng.choice(REGIONS)
    if where in ("left", "right"):
        x = _uniform(rng, m, 0.32) if where == "left" else _uniform(rng, 0.68, 1 - m)
        y = _uniform(rng, 0.4, 0.6)
    elif where in ("top", "bottom"):
        x = _uniform(rng, 0.42, 0.58)
        y = _uniform(rng, m, 0.32) if where == "top" else _uniform(rng, 0.68, 1 - m)
    else:
        x, y = _uniform(rng, 0.45, 0.55), _uniform(rng, 0.45, 0.55)
    return Obj(shape, colour, size, x, y)


def _place(rng: random.Random, kinds: list[tuple[str, str, str]], relation: str | None):
    """Rejection-sample non-overlapping positions (and the wanted relation for two objects)."""
    for _ in range(10_000):
        objs = []
        for shape, colour, size in kinds:
            m = SIZES[size] + 0.02
            objs.append(Obj(shape, colour, size, _uniform(rng, m, 1 - m), _uniform(rng, m, 1 - m)))
        if not all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            continue
        if relation is not None and relation_of(objs[0], objs[1]) != relation:
            continue
        return tuple(objs)
    raise RuntimeError(f"could not place {kinds}")  # pragma: no cover - sizes make this unreachable


def _random_kind(rng: random.Random) -> tuple[str, str, str]:
    return (rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))


def _distinct_kinds(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < n:
        k = _random_kind(rng)
        if k not in kinds:
            kinds.append(k)
    return kinds


def _background(rng: random.Random, colours: set[str]) -> Background:
    def far(rgb: tuple[int, int, int]) -> bool:
        return all(math.dist(rgb, COLOURS[c]) >= _MIN_CONTRAST for c in colours)

    options = [rgb for rgb in BACKGROUNDS.values() if far(rgb)]
    rgb = rng.choice(options)
    kind = rng.choice(BACKGROUND_KINDS)
    rgb2 = rgb
    if kind == "gradient":
        shift = rng.choice((-30, -20, 20, 30))
        cand = tuple(min(255, max(0, v + shift)) for v in rgb)
        rgb2 = cand if far(cand) else rgb
    return Background(kind, rgb, rgb2, rng.randrange(2**31))


def sample_scene(rng: random.Random) -> Scene:
    """One random scene: 1 to 3 objects; two objects stand in a clear spatial relation; three
    objects may repeat a kind ("two small red circles and a big blue star")."""
    n = rng.choice((1, 2, 3))
    relation = None
    if n == 1:
        objects: tuple[Obj, ...] = (_place_alone(rng, *_random_kind(rng)),)
    elif n == 2:
        relation = rng.choice(RELATIONS)
        objects = _place(rng, _distinct_kinds(rng, 2), relation)
    else:
        mode = rng.random()
        if mode < 0.4:  # a pair and a single
            a, b = _distinct_kinds(rng, 2)
            kinds = [a, a, b]
        elif mode < 0.55:  # three of a kind
            kinds = [_random_kind(rng)] * 3
        else:
            kinds = _distinct_kinds(rng, 3)
        objects = _place(rng, kinds, None)
    background = _background(rng, {o.colour for o in objects})
    return Scene(objects, background, relation)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) with outer radius r (pixels)."""

    def ring(n: int, start_deg: float, radius: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(math.radians(start_deg + 360 * i / n)),
                cy + radius * math.sin(math.radians(start_deg + 360 * i / n)),
            )
            for i in range(n)
        ]

    if shape == "square":
        h = 0.72 * r  # corners stay (almost) inside the radius used for spacing
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, -90, r)
    if shape == "pentagon":
        return ring(5, -90, r)
    if shape == "hexagon":
        return ring(6, 0, r)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    if shape == "star":
        outer, inner = ring(5, -90, r), ring(5, -54, 0.45 * r)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        w = 0.32 * r
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _draw_mask(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "drop":
        # A teardrop: a round bottom and two tangents meeting in a point at the top.
        rho, d = 0.62 * r, 0.38 * r
        ccx, ccy = cx, cy + d
        beta = math.acos(rho / (r + d))
        left = (ccx - rho * math.sin(beta), ccy - rho * math.cos(beta))
        right = (ccx + rho * math.sin(beta), ccy - rho * math.cos(beta))
        draw.ellipse((ccx - rho, ccy - rho, ccx + rho, ccy + rho), fill=255)
        draw.polygon([(cx, cy - r), right, left], fill=255)
    else:
        draw.polygon(_outline(shape, cx, cy, r), fill=255)


def _background_array(bg: Background, size: int) -> np.ndarray:
    top, bottom = np.array(bg.rgb, dtype=np.float32), np.array(bg.rgb2, dtype=np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(top + (bottom - top) * t, (size, size, 3)).copy()
    if bg.kind == "noise":
        noise = np.random.default_rng(bg.seed).integers(-14, 15, (size, size, 1))
        arr += noise.astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image; shapes are anti-aliased by supersampling their masks."""
    image = Image.fromarray(_background_array(scene.background, size), "RGB")
    big = size * _SUPERSAMPLE
    for obj in scene.objects:
        mask = Image.new("L", (big, big), 0)
        _draw_mask(ImageDraw.Draw(mask), obj.shape, obj.x * big, obj.y * big, obj.radius * big)
        image.paste(COLOURS[obj.colour], (0, 0), mask.reduce(_SUPERSAMPLE))
    return image
