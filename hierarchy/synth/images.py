"""Synthetic 180x180 "product pictures" whose look follows the category tree.

Each level leaves its own visual trace so that a small CNN can learn every level and the
hierarchy matters: level-1 picks the object family (a base shape times a style: 7 x 7 = 49
families, cycled beyond that), level-2 the palette, level-3 the finer marks (a pattern, its
orientation and density, a count of small badges). Leaves of one branch share the family,
siblings under one level-2 share the palette.

Everything is drawn as polygons with Pillow's ImageDraw, rotation included (vertices are
rotated, never the bitmap), so one picture costs about a millisecond.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 180
SHAPES = ("ellipse", "rectangle", "triangle", "star", "cross", "hexagon", "arrow")
STYLES = ("plain", "tall", "wide", "pair", "outline", "shadow", "hole")
PATTERNS = ("stripes", "dots", "grid", "zigzag")
N_FAMILIES = len(SHAPES) * len(STYLES)

Color = Tuple[int, int, int]


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices in [-1, 1]^2 (y down) of a base shape."""
    if shape == "ellipse":
        t = np.linspace(0.0, 2 * math.pi, 28, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "rectangle":
        return np.array([(-1, -0.8), (1, -0.8), (1, 0.8), (-1, 0.8)], dtype=float)
    if shape == "triangle":
        return np.array([(0, -1), (0.95, 0.8), (-0.95, 0.8)], dtype=float)
    if shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if shape == "cross":
        a, b = 0.33, 1.0
        return np.array(
            [
                (-a, -b),
                (a, -b),
                (a, -a),
                (b, -a),
                (b, a),
                (a, a),
                (a, b),
                (-a, b),
                (-a, a),
                (-b, a),
                (-b, -a),
                (-a, -a),
            ],
            dtype=float,
        )
    if shape == "hexagon":
        t = np.arange(6) * math.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "arrow":
        return np.array(
            [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)],
            dtype=float,
        )
    raise ValueError(f"unknown shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}
# Noise is sliced from one fixed bank: drawing fresh Gaussian noise would cost more than the
# picture itself. Its slicing offset comes from the caller's rng, so output stays seeded.
_NOISE = np.random.default_rng(12345).normal(0.0, 3.0, (2 * SIZE, 2 * SIZE, 3)).astype(np.int16)


def family_of(l1: int) -> Tuple[str, str]:
    """(shape, style) of a level-1 id; ids 0..48 map to 49 distinct families."""
    f = l1 % N_FAMILIES
    return SHAPES[f % len(SHAPES)], STYLES[f // len(SHAPES)]


def _hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def palette_of(l1: int, l2_local: int) -> Tuple[float, float, float]:
    """(hue, saturation, value) of the main colour of a level-2 palette.

    Keyed by the rank of the level-2 inside its branch so that siblings, the ones a model must
    tell apart, get hues a golden-ratio step apart whatever the global numbering.
    """
    hue = (0.13 * l1 + 0.618034 * l2_local) % 1.0
    sat = (0.85, 0.55)[(l2_local // 7) % 2]
    val = (0.9, 0.7)[(l2_local // 14) % 2]
    return hue, sat, val


def marks_of(l3_local: int) -> Tuple[str, int, bool, int]:
    """(pattern, orientation step 0..3, fine?, badge count 1..4) of a leaf's rank in its level-2.

    128 distinct codes; beyond that they cycle (siblings then differ only by palette or id).
    """
    k = l3_local % 128
    return PATTERNS[k % 4], (k // 4) % 4, (k // 64) % 2 == 1, (k // 16) % 4 + 1


@dataclass(frozen=True)
class DrawStyle:
    """How hard the pictures are. The default is the fast preset's look (every level leaves
    a clear trace); the hard preset makes siblings confusable and adds the nuisances of real
    catalog photos (see :data:`HARD`)."""

    confusable: bool = False     # siblings share their pattern; they differ by finer marks
    filler_views: float = 0.0    # chance that an extra view is packaging or a box's back
    clutter: int = 0             # up to this many distractor shapes behind the product
    pose_deg: float = 8.0        # rotation jitter of a view
    scale: Tuple[float, float] = (0.88, 1.12)
    shift: float = 0.12          # position jitter, share of the picture


FAST = DrawStyle()
HARD = DrawStyle(confusable=True, filler_views=0.5, clutter=3, pose_deg=20.0,
                 scale=(0.65, 1.25), shift=0.17)


def marks_of_confusable(l2_local: int, l3_local: int) -> Tuple[str, int, bool, int]:
    """The hard preset's marks: the pattern belongs to the level 2 (all siblings share it);
    siblings differ only by orientation, density and badge count, which pose jitter and
    scale blur."""
    k = l3_local % 32
    return PATTERNS[l2_local % 4], k % 4, (k // 4) % 2 == 1, (k // 8) % 4 + 1


@dataclass(frozen=True)
class Item:
    """What all views of one product share: the category look plus its own colour cast."""

    shape: str
    style: str
    main: Color
    second: Color
    pattern: str
    angle: float
    spacing: float
    badges: int
    scale: float


def make_item(l1: int, l2_local: int, l3_local: int, rng: np.random.Generator,
              look: DrawStyle = FAST) -> Item:
    shape, style = family_of(l1)
    hue, sat, val = palette_of(l1, l2_local)
    hue += rng.uniform(-0.02, 0.02)
    val += rng.uniform(-0.06, 0.06)
    pattern, orient, fine, badges = marks_of_confusable(l2_local, l3_local) \
        if look.confusable else marks_of(l3_local)
    # Square lattices repeat every 90 degrees, line patterns every 180.
    step = 22.5 if pattern in ("dots", "grid") else 45.0
    return Item(
        shape=shape,
        style=style,
        main=_hsv(hue, sat, val),
        second=_hsv(hue + 0.5, 0.8, 0.45 if val > 0.6 else 0.25),
        pattern=pattern,
        angle=math.radians(orient * step),
        spacing=0.17 if fine else 0.27,
        badges=badges,
        scale=rng.uniform(0.9, 1.1),
    )


def _place(poly: np.ndarray, cx: float, cy: float, sx: float, sy: float, rot: float) -> list:
    c, s = math.cos(rot), math.sin(rot)
    x = poly[:, 0] * sx
    y = poly[:, 1] * sy
    return list(zip((cx + c * x - s * y).tolist(), (cy + s * x + c * y).tolist()))


def _draw_pattern(draw: ImageDraw.ImageDraw, item: Item, cx, cy, radius, size, rot) -> None:
    theta = item.angle + rot
    d = (math.cos(theta), math.sin(theta))
    n = (-d[1], d[0])
    sp = max(6.0, item.spacing * size)
    offsets = np.arange(-radius, radius + 1e-6, sp)
    if item.pattern in ("stripes", "grid"):
        width = max(2, int(sp * 0.35))
        dirs = [(d, n)] if item.pattern == "stripes" else [(d, n), (n, d)]
        for u, v in dirs:
            for t in offsets:
                px, py = cx + t * v[0], cy + t * v[1]
                draw.line(
                    [
                        (px - radius * u[0], py - radius * u[1]),
                        (px + radius * u[0], py + radius * u[1]),
                    ],
                    fill=item.second,
                    width=width,
                )
    elif item.pattern == "dots":
        r = sp * 0.22
        for a in offsets:
            for b in offsets:
                px, py = cx + a * d[0] + b * n[0], cy + a * d[1] + b * n[1]
                draw.ellipse([px - r, py - r, px + r, py + r], fill=item.second)
    else:  # zigzag: parallel saw-tooth lines
        amp = sp * 0.3
        steps = np.arange(-radius, radius + 1e-6, sp * 0.5)
        width = max(2, int(sp * 0.2))
        for t in offsets:
            pts = []
            for i, a in enumerate(steps):
                off = t + (amp if i % 2 else -amp)
                pts.append((cx + a * d[0] + off * n[0], cy + a * d[1] + off * n[1]))
            draw.line(pts, fill=item.second, width=width)


def render_view(item: Item, rng: np.random.Generator, look: DrawStyle = FAST) -> bytes:
    """One JPEG view of an item: its own position, scale, rotation, quality and noise."""
    size = SIZE * 0.33 * item.scale * rng.uniform(*look.scale)
    cx = SIZE / 2 + rng.uniform(-look.shift, look.shift) * SIZE
    cy = SIZE / 2 + rng.uniform(-look.shift, look.shift) * SIZE
    rot = math.radians(rng.uniform(-look.pose_deg, look.pose_deg))
    poly = _POLYGONS[item.shape]
    sx = sy = size
    if item.style == "tall":
        sx = size * 0.55
    elif item.style == "wide":
        sy = size * 0.55
    if item.style == "pair":
        dx, dy = 0.52 * size * math.cos(rot), 0.52 * size * math.sin(rot)
        outlines = [
            _place(poly, cx - dx, cy - dy, sx * 0.48, sy * 0.48, rot),
            _place(poly, cx + dx, cy + dy, sx * 0.48, sy * 0.48, rot),
        ]
    else:
        outlines = [_place(poly, cx, cy, sx, sy, rot)]

    canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if look.clutter:
        _draw_clutter(draw, int(rng.integers(0, look.clutter + 1)), rng)
    if item.style == "shadow":
        off = 0.14 * size
        draw.polygon([(x + off, y + off) for x, y in outlines[0]], fill=(150, 150, 150))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mdraw = ImageDraw.Draw(mask)
    for pts in outlines:
        mdraw.polygon(pts, fill=255)
    if item.style == "hole":
        mdraw.polygon(_place(poly, cx, cy, sx * 0.42, sy * 0.42, rot), fill=0)
    layer = Image.new("RGB", (SIZE, SIZE), item.main)
    _draw_pattern(ImageDraw.Draw(layer), item, cx, cy, size * 1.1, size, rot)
    canvas.paste(layer, (0, 0), mask)
    if item.style == "outline":
        draw.polygon(outlines[0], outline=(30, 30, 30), width=5)
    _draw_badges(draw, item.badges, cx, cy, size, rot)

    return _jpeg(canvas, rng)


def _jpeg(canvas: Image.Image, rng: np.random.Generator) -> bytes:
    ox, oy = rng.integers(0, SIZE, 2)
    pixels = np.asarray(canvas, dtype=np.int16) + _NOISE[oy : oy + SIZE, ox : ox + SIZE]
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def _draw_clutter(draw: ImageDraw.ImageDraw, count: int, rng: np.random.Generator) -> None:
    """Small shapes of any family and colour around the product: a model must not read the
    category off them."""
    for _ in range(count):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZE * rng.uniform(0.06, 0.14)
        cx, cy = rng.uniform(0, SIZE, 2)
        fill = _hsv(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.4, 0.95))
        draw.polygon(_place(_POLYGONS[shape], cx, cy, size, size,
                            math.radians(rng.uniform(0, 360))), fill=fill)


def render_filler(item: Item, rng: np.random.Generator) -> bytes:
    """A view that says little of the category: the product's packaging (a plain carton with
    print and a barcode: nothing) or the back of its box (its main colour: the level-2
    palette at most), as catalogs hold beside the product shot."""
    canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    back = rng.uniform() < 0.4
    fill = item.main if back else _hsv(0.09 + rng.uniform(-0.02, 0.02), 0.45,
                                       rng.uniform(0.55, 0.8))
    w, h = SIZE * rng.uniform(0.45, 0.75), SIZE * rng.uniform(0.45, 0.75)
    cx, cy = SIZE / 2 + rng.uniform(-15, 15), SIZE / 2 + rng.uniform(-15, 15)
    rot = math.radians(rng.uniform(-15, 15))
    box = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    draw.polygon(_place(box, cx, cy, w / 2, h / 2, rot), fill=fill, outline=(60, 50, 40))
    for i in range(int(rng.integers(2, 6))):  # lines of print
        y = cy - h / 3 + i * h / 9
        draw.line([(cx - w / 3, y), (cx + w * rng.uniform(-0.1, 0.3), y)], fill=(30, 30, 30),
                  width=2)
    for i in range(12):  # a barcode
        x = cx - 20 + i * 3.5
        draw.line([(x, cy + h / 4), (x, cy + h / 4 + 12)], fill=(0, 0, 0),
                  width=int(rng.integers(1, 3)))
    return _jpeg(canvas, rng)


def _draw_badges(draw: ImageDraw.ImageDraw, count: int, cx, cy, size, rot) -> None:
    # Drawn white with a dark rim so they read on any palette and on the hole's background.
    r = 0.09 * size
    gap = 0.26 * size
    c, s = math.cos(rot), math.sin(rot)
    for i in range(count):
        t = (i - (count - 1) / 2) * gap
        px, py = cx + t * c, cy + t * s
        draw.ellipse(
            [px - r, py - r, px + r, py + r], fill=(255, 255, 255), outline=(20, 20, 20), width=2
        )


def render_product(
    l1: int, l2_local: int, l3_local: int, n_views: int, rng: np.random.Generator,
    look: DrawStyle = FAST,
) -> List[bytes]:
    """JPEG bytes of ``n_views`` views of one product of the given leaf. The first view
    always shows the product; with ``look.filler_views`` an extra view may be a filler."""
    item = make_item(l1, l2_local, l3_local, rng, look)
    views = []
    for i in range(n_views):
        if i and look.filler_views and rng.uniform() < look.filler_views:
            views.append(render_filler(item, rng))
        else:
            views.append(render_view(item, rng, look))
    return views


def render_picture(l1: int, l2_local: int, l3_local: int, rng: np.random.Generator) -> bytes:
    """One picture of a fresh product of the given leaf (a one-view product)."""
    return render_view(make_item(l1, l2_local, l3_local, rng), rng)


def contact_sheet(pictures: Sequence[bytes], columns: int = 8) -> Image.Image:
    """Tile JPEGs into one image, to eyeball what the generator draws."""
    rows = max(1, math.ceil(len(pictures) / columns))
    sheet = Image.new("RGB", (columns * SIZE, rows * SIZE), (255, 255, 255))
    for i, jpeg in enumerate(pictures):
        sheet.paste(Image.open(io.BytesIO(jpeg)), ((i % columns) * SIZE, (i // columns) * SIZE))
    return sheet
