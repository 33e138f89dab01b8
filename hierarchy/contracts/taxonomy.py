"""The Cdiscount category tree: contiguous ids per level, parent maps, branches, fingerprint.

Knows nothing of Spark or TensorFlow. Ids are stable for a given table:
level-3 ids follow ``category_id`` order, level-1 and level-2 ids follow their names
(level-2 is keyed by name alone: in the real table three level-2 names sit under two
level-1 parents, and the competition counts 483 level-2 classes). Leaves are always keyed
by ``category_id``: some level-3 names repeat under different parents.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from hierarchy.contracts.errors import UsageError

COLUMNS = ("category_id", "category_level1", "category_level2", "category_level3")


class TaxonomyError(UsageError, ValueError):
    """A category table that cannot be used: names the file, the line and the reason."""


@dataclass(frozen=True)
class Taxonomy:
    """Leaves sorted by ``category_id``; index ``i`` of every per-leaf array is level-3 id ``i``."""

    category_ids: Tuple[int, ...]
    l1_names: Tuple[str, ...]
    l2_names: Tuple[str, ...]
    l3_names: Tuple[str, ...]
    l1_of_l3: np.ndarray
    l2_of_l3: np.ndarray
    _l3_of_category: Dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_rows(cls, rows: Sequence[Tuple[int, str, str, str]]) -> Taxonomy:
        rows = sorted(rows, key=lambda r: r[0])
        l1_names = tuple(sorted({r[1] for r in rows}))
        l2_names = tuple(sorted({r[2] for r in rows}))
        l1_index = {n: i for i, n in enumerate(l1_names)}
        l2_index = {n: i for i, n in enumerate(l2_names)}
        return cls(
            category_ids=tuple(int(r[0]) for r in rows),
            l1_names=l1_names,
            l2_names=l2_names,
            l3_names=tuple(r[3] for r in rows),
            l1_of_l3=np.array([l1_index[r[1]] for r in rows], dtype=np.int32),
            l2_of_l3=np.array([l2_index[r[2]] for r in rows], dtype=np.int32),
            _l3_of_category={int(r[0]): i for i, r in enumerate(rows)},
        )

    @classmethod
    def from_csv(cls, path: str) -> Taxonomy:
        """Parse ``category_names.csv`` and refuse a malformed table with line and reason."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise TaxonomyError(f"{path}: cannot read it ({exc.strerror})") from None
        return cls.from_csv_bytes(raw, source=str(path))

    @classmethod
    def from_csv_bytes(cls, raw: bytes, source: str = "<bytes>") -> Taxonomy:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TaxonomyError(f"{source}: not UTF-8 text at byte {exc.start}") from None
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise TaxonomyError(f"{source}: empty file, expected header {','.join(COLUMNS)}")
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise TaxonomyError(
                f"{source}:1: missing column(s) {', '.join(missing)}; "
                f"expected header {','.join(COLUMNS)}, got {','.join(header)}"
            )
        pos = [header.index(c) for c in COLUMNS]
        seen: Dict[int, Tuple[int, Tuple[str, str, str]]] = {}
        rows: List[Tuple[int, str, str, str]] = []
        for lineno, rec in enumerate(reader, start=2):
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) < len(header):
                raise TaxonomyError(
                    f"{source}:{lineno}: {len(rec)} field(s), expected {len(header)}"
                )
            cid_text, l1, l2, l3 = (rec[p].strip() for p in pos)
            try:
                cid = int(cid_text)
            except ValueError:
                raise TaxonomyError(
                    f"{source}:{lineno}: category_id {cid_text!r} is not an integer"
                ) from None
            for col, value in zip(COLUMNS[1:], (l1, l2, l3)):
                if not value:
                    raise TaxonomyError(f"{source}:{lineno}: empty {col} for category_id {cid}")
            parents = (l1, l2, l3)
            if cid in seen:
                first_line, first = seen[cid]
                if first[:2] != parents[:2]:
                    raise TaxonomyError(
                        f"{source}:{lineno}: leaf category_id {cid} under two parents: "
                        f"{first[0]} > {first[1]} (line {first_line}) and {l1} > {l2}"
                    )
                raise TaxonomyError(
                    f"{source}:{lineno}: duplicate category_id {cid} (first on line {first_line})"
                )
            seen[cid] = (lineno, parents)
            rows.append((cid, l1, l2, l3))
        if not rows:
            raise TaxonomyError(f"{source}: no categories after the header")
        return cls.from_rows(rows)

    # ---------------------------------------------------------------- sizes and lookups
    @property
    def n_l1(self) -> int:
        return len(self.l1_names)

    @property
    def n_l2(self) -> int:
        return len(self.l2_names)

    @property
    def n_l3(self) -> int:
        return len(self.category_ids)

    def l3_of_category(self, category_id: int) -> int:
        """Level-3 id of a ``category_id``; ``KeyError`` when it is not in the table."""
        if not self._l3_of_category:
            object.__setattr__(
                self, "_l3_of_category", {c: i for i, c in enumerate(self.category_ids)}
            )
        return self._l3_of_category[int(category_id)]

    def levels_of_category(self, category_id: int) -> Tuple[int, int, int]:
        l3 = self.l3_of_category(category_id)
        return int(self.l1_of_l3[l3]), int(self.l2_of_l3[l3]), l3

    def category_of_l3(self, l3: int) -> int:
        return self.category_ids[l3]

    def names_of_l3(self, l3: int) -> Tuple[str, str, str]:
        return (
            self.l1_names[self.l1_of_l3[l3]],
            self.l2_names[self.l2_of_l3[l3]],
            self.l3_names[l3],
        )

    def branch(self, l1: int) -> np.ndarray:
        """Level-3 ids under a level-1 branch, ascending; position = branch-local id."""
        return np.flatnonzero(self.l1_of_l3 == l1).astype(np.int32)

    def branches(self) -> Dict[int, np.ndarray]:
        return {b: self.branch(b) for b in range(self.n_l1)}

    def local_of_l3(self) -> np.ndarray:
        """Branch-local id of every leaf (its rank among the leaves of its level-1 branch)."""
        local = np.empty(self.n_l3, dtype=np.int32)
        for leaves in self.branches().values():
            local[leaves] = np.arange(len(leaves), dtype=np.int32)
        return local

    # ---------------------------------------------------------------- identity and storage
    def to_rows(self) -> List[Tuple[int, str, str, str]]:
        return [
            (cid, *self.names_of_l3(i)) for i, cid in enumerate(self.category_ids)
        ]

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical table: same tree, same fingerprint, whatever the CSV order."""
        canon = json.dumps(self.to_rows(), ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "counts": {"level1": self.n_l1, "level2": self.n_l2, "level3": self.n_l3},
                "columns": list(COLUMNS),
                "rows": self.to_rows(),
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> Taxonomy:
        doc = json.loads(text)
        tax = cls.from_rows([tuple(r) for r in doc["rows"]])
        if doc.get("fingerprint") not in (None, tax.fingerprint):
            raise TaxonomyError(f"{source}: stored fingerprint does not match its rows")
        return tax

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows(self.to_rows())

    def summary(self) -> str:
        return (
            f"{self.n_l1} level-1 / {self.n_l2} level-2 / {self.n_l3} level-3 categories "
            f"({self.fingerprint[:19]})"
        )
