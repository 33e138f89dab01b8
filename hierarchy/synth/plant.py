"""Curation problems planted into a synthetic catalog, with the truth written beside them.

Real catalogs reuse one picture under many products (variants, bundles), re-upload it slightly
changed (re-encoded, re-cropped), fill products that have no photo with a "no image"
placeholder, carry blank pictures, and sometimes file the same picture under two categories.
The generator plants each of these at a configured share of products, and writes every planted
picture to ``curation_truth.csv`` so that ``hierarchy curate`` can be scored against it.

At most one plant per product, drawn from its own random stream (the product's ordinary
pictures, and so a catalog without plants, stay byte for byte what they were):

duplicate       its last picture becomes an exact copy of a *stock* picture of its own leaf
                (each leaf has :data:`STOCK_PER_LEAF`; products of one leaf, in train and test,
                share them — what a duplicate lookup at predict time can answer)
near_duplicate  the same, re-cropped by a few pixels, brightened a little and re-encoded
relabelled      (train only) its last picture is an exact copy of another leaf's stock picture:
                the same picture under two categories
placeholder     every picture replaced by one of ``placeholders`` "no image" pictures, whatever
                the category
blank           its last picture becomes a near-uniform one (a flat colour, faint gradient and
                sensor noise), distinct bytes each time
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from hierarchy.contracts.settings import Plant
from hierarchy.synth.images import FAST, SIZE, DrawStyle, make_item, render_view

TRUTH = "curation_truth.csv"
TRUTH_HEADER = "file,product_id,img_idx,category_id,plant,group\n"
STOCK_PER_LEAF = 2
STOCK_P = (0.7, 0.3)
KINDS = ("placeholder", "blank", "relabelled", "near_duplicate", "duplicate")


@dataclass(frozen=True)
class Plants:
    duplicates: float = 0.0
    near_duplicates: float = 0.0
    relabelled: float = 0.0
    placeholders: int = 0          # distinct placeholder pictures
    placeholder_share: float = 0.0
    blank: float = 0.0

    @classmethod
    def from_config(cls, section: Plant) -> Plants:
        return cls(**{f.name: (int if f.name == "placeholders" else float)(
            getattr(section, f.name)) for f in fields(cls)})

    @property
    def any(self) -> bool:
        return any((self.duplicates, self.near_duplicates, self.relabelled, self.blank,
                    self.placeholders and self.placeholder_share))

    def shares(self, train: bool) -> Tuple[float, ...]:
        """Probability of each of :data:`KINDS` for one product."""
        return (self.placeholder_share if self.placeholders else 0.0, self.blank,
                self.relabelled if train else 0.0, self.near_duplicates, self.duplicates)

    def check(self) -> None:
        if min(self.shares(True)) < 0 or sum(self.shares(True)) > 1:
            raise ValueError(f"planted shares must be >= 0 and sum to <= 1: {self}")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Planter:
    """Draws plants for the products of one block; stock and placeholder pictures are
    rendered once per process, from the catalog seed only (identical in every block)."""

    def __init__(self, plants: Plants, seed: int, looks: np.ndarray, category_ids: np.ndarray,
                 weights: np.ndarray, look: DrawStyle = FAST):
        self.plants, self.seed, self.look = plants, seed, look
        self.looks, self.category_ids, self.weights = looks, category_ids, weights
        self._stock: Dict[Tuple[int, int], bytes] = {}
        self._placeholders: Dict[int, bytes] = {}

    # ------------------------------------------------------------------ pictures
    def stock(self, l3: int, k: int) -> bytes:
        if (l3, k) not in self._stock:
            rng = np.random.default_rng([self.seed, 7100, l3, k])
            l1, l2_local, l3_local = self.looks[l3].tolist()
            self._stock[(l3, k)] = render_view(
                make_item(l1, l2_local, l3_local, rng, self.look), rng, self.look)
        return self._stock[(l3, k)]

    def placeholder(self, k: int) -> bytes:
        if k not in self._placeholders:
            rng = np.random.default_rng([self.seed, 7300, k])
            grey = int(rng.integers(215, 245))
            canvas = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
            draw = ImageDraw.Draw(canvas)
            ink = tuple(int(v) for v in rng.integers(90, 160, 3))
            draw.rounded_rectangle([18, 18, SIZE - 18, SIZE - 18], radius=14, outline=ink,
                                   width=4)
            draw.rectangle([55, 60, 125, 105], outline=ink, width=4)    # a camera
            draw.ellipse([74, 66, 106, 98], outline=ink, width=4)
            draw.text((48, 122), ("NO IMAGE", "PAS D'IMAGE", "IMAGE INDISPONIBLE")[k % 3],
                      fill=ink)
            self._placeholders[k] = _jpeg(canvas, 90)
        return self._placeholders[k]

    def near(self, source: bytes, rng: np.random.Generator) -> bytes:
        """A re-upload of ``source``: cropped by up to 2 pixels a side, resized back,
        brightened by up to 3 %, re-encoded at another quality (a shop's re-upload; anything
        stronger is another photo of the product, which curation must not merge)."""
        image = Image.open(io.BytesIO(source)).convert("RGB")
        a, b, c, d = rng.integers(0, 3, 4).tolist()
        image = image.crop((a, b, SIZE - c, SIZE - d)).resize((SIZE, SIZE), Image.BICUBIC)
        image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.97, 1.03)))
        return _jpeg(image, int(rng.integers(60, 90)))

    @staticmethod
    def blank(rng: np.random.Generator) -> bytes:
        base = rng.integers(200, 256, 3) if rng.uniform() < 0.8 else rng.integers(0, 60, 3)
        ramp = np.linspace(-1.0, 1.0, SIZE)[None, :, None] * rng.uniform(0, 3)
        pixels = base[None, None, :] + ramp + rng.normal(0.0, 1.5, (SIZE, SIZE, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return _jpeg(image, int(rng.integers(75, 95)))

    # ------------------------------------------------------------------ products
    def apply(self, rng: np.random.Generator, train: bool, l3: int,
              pictures: List[bytes]) -> Tuple[List[bytes], List[Tuple[int, str, str]]]:
        """(pictures, [(img_idx, plant, group)]) of one product of leaf ``l3`` filed under
        ``label``, drawn from ``rng`` (the block's planting stream)."""
        shares = self.plants.shares(train)
        u, pick, other, k = rng.uniform(), rng.uniform(), rng.uniform(), rng.uniform()
        stock_k = int(np.searchsorted(np.cumsum(STOCK_P), k, side="right"))
        stock_k = min(stock_k, STOCK_PER_LEAF - 1)
        edges = np.cumsum(shares)
        if u >= edges[-1]:
            return pictures, []
        kind = KINDS[int(np.searchsorted(edges, u, side="right"))]
        pictures = list(pictures)
        last = len(pictures) - 1
        cid = lambda leaf: int(self.category_ids[leaf])  # noqa: E731
        if kind == "placeholder":
            n = int(pick * self.plants.placeholders)
            return [self.placeholder(n)], [(0, kind, f"placeholder-{n}")]
        if kind == "blank":
            pictures[last] = self.blank(rng)
            return pictures, [(last, kind, "")]
        if kind == "relabelled":
            # any other leaf, uniformly: a mistake, not a picture every category shares
            leaf = int(other * (len(self.weights) - 1))
            leaf = leaf + 1 if leaf >= l3 else leaf
            pictures[last] = self.stock(leaf, 0)
            return pictures, [(last, kind, f"stock-{cid(leaf)}-0")]
        source = self.stock(l3, stock_k)
        pictures[last] = self.near(source, rng) if kind == "near_duplicate" else source
        return pictures, [(last, kind, f"stock-{cid(l3)}-{stock_k}")]


# ---------------------------------------------------------------------------- scoring
def expected_flags(truth_rows: List[dict], split_of: Dict[int, str]) -> Dict[str, set]:
    """{flag: {(product_id, img_idx)}} that a perfect curation finds, from the truth rows
    (``csv.DictReader`` of :data:`TRUTH`) and each product's split (train/val/test, as ingest
    assigned it). Planted groups are keyed by their source picture; a group needs two members
    to be a group at all."""
    groups: Dict[str, List[dict]] = {}
    out: Dict[str, set] = {f: set() for f in ("blank", "placeholder", "duplicate",
                                              "near_duplicate", "conflicting_labels", "leakage")}
    for row in truth_rows:
        key = (int(row["product_id"]), int(row["img_idx"]))
        if row["plant"] in ("blank", "placeholder"):
            out[row["plant"]].add(key)
        if row["group"]:
            groups.setdefault(row["group"], []).append({**row, "key": key})
    for name, members in groups.items():
        if len(members) < 2:
            continue
        keys = {m["key"] for m in members}
        exact = [m["key"] for m in members if m["plant"] != "near_duplicate"]
        if len(exact) >= 2:
            out["duplicate"].update(exact)
        if any(m["plant"] == "near_duplicate" for m in members):
            out["near_duplicate"].update(keys)
        labels = {m["category_id"] for m in members if m["category_id"]}
        if not name.startswith("placeholder") and len(labels) > 1:
            out["conflicting_labels"].update(keys)
        splits = {split_of.get(k[0]) for k in keys}
        if {"train", "val"} <= splits:
            out["leakage"].update(keys)
    return out


def precision_recall(found: Dict[str, set], expected: Dict[str, set]) -> Dict[str, dict]:
    """Per flag: true positives, found, expected, precision and recall (None when undefined)."""
    scores = {}
    for flag, want in expected.items():
        got = found.get(flag, set())
        tp = len(got & want)
        scores[flag] = {"tp": tp, "found": len(got), "expected": len(want),
                        "precision": round(tp / len(got), 4) if got else None,
                        "recall": round(tp / len(want), 4) if want else None}
    return scores
