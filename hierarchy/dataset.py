"""The dataset folder: the contract between ingest and every later stage.

```
<data>/
  images/split=train|val|test/part-*.parquet    Petastorm dataset, one row per picture
  products/kind=train|test/part-*.parquet       one row per product (source, offset, length)
  quarantine/kind=train|test/part-*.parquet     everything that could not be used, and why
  taxonomy.json                                 the category table it was ingested with
  manifest.json                                 inputs, counts, status per kind
  curation/split=*/part-*.parquet               hierarchy curate: flags per picture, and
  reviews/part-*.parquet                        review decisions (hierarchy.curate.table)
  curation_report/                              curate's report and review queue
  _staging/<kind>-<token>/                      an ingest in progress (same layout)
  _ingest.lock                                  the ingest holding the folder
```

An ingest *kind* (the dump it came from) holds one or more *splits*: a train dump becomes the
train and val splits, a test dump the test split. A kind is marked ``committing`` in the
manifest before its partitions are swapped in and ``complete`` after, so an interrupted commit
is never mistaken for a finished dataset (:meth:`Dataset.require_complete`).

Every path goes through :mod:`hierarchy.storage`, so a dataset on HDFS or S3 is the same code.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from hierarchy import storage
from hierarchy.errors import Refused
from hierarchy.taxonomy import Taxonomy

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)           # a split's code in an ingest plan is its index here
KINDS = ("train", "test")
KIND_SPLITS: Dict[str, Tuple[str, ...]] = {"train": (TRAIN, VAL), "test": (TEST,)}
FORMAT = "hierarchy-dataset/1"
MANIFEST_FILE = "manifest.json"
TAXONOMY_FILE = "taxonomy.json"
LOCK_FILE = "_ingest.lock"
STAGING = "_staging"


class DatasetNotReady(Refused, RuntimeError):
    """A dataset folder a stage cannot use yet: no manifest, or a kind not committed."""


def kind_of_split(split: str) -> str:
    for kind, splits in KIND_SPLITS.items():
        if split in splits:
            return kind
    raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Dataset:
    """A dataset folder, by the path or URL a user gave (``data/ds``, ``hdfs:///ds``)."""

    root: str

    # ---------------------------------------------------------------- layout
    def path(self, *parts: str) -> str:
        """A path or URL under the dataset, in the root's own form."""
        return storage.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """The same with a scheme, as Spark and Petastorm want it."""
        return storage.to_url(self.path(*parts))

    def images(self, split: Optional[str] = None) -> str:
        return self.path("images", *([f"split={split}"] if split else []))

    def products(self, kind: Optional[str] = None) -> str:
        return self.path("products", *([f"kind={kind}"] if kind else []))

    def quarantine(self, kind: Optional[str] = None) -> str:
        return self.path("quarantine", *([f"kind={kind}"] if kind else []))

    def staging(self, name: Optional[str] = None) -> Dataset:
        """A staging folder: the same layout, committed by moving its partitions."""
        return Dataset(self.path(STAGING, *([name] if name else [])))

    @property
    def manifest_path(self) -> str:
        return self.path(MANIFEST_FILE)

    @property
    def taxonomy_path(self) -> str:
        return self.path(TAXONOMY_FILE)

    @property
    def lock_path(self) -> str:
        return self.path(LOCK_FILE)

    # ---------------------------------------------------------------- taxonomy
    def has_taxonomy(self) -> bool:
        return storage.exists(self.taxonomy_path)

    def taxonomy(self) -> Taxonomy:
        """The category table the dataset was ingested with."""
        return Taxonomy.from_json(storage.read_text(self.taxonomy_path),
                                  source=self.taxonomy_path)

    def write_taxonomy(self, taxonomy: Taxonomy) -> None:
        storage.write_text_atomic(self.taxonomy_path, taxonomy.to_json())

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        """The manifest, or an empty one for a folder nothing was committed to."""
        if storage.exists(self.manifest_path):
            return storage.read_json(self.manifest_path)
        return {"format": FORMAT, "kinds": {}}

    def require_complete(self, kinds: Iterable[str]) -> dict:
        """The manifest when every kind asked for was committed; else a clear refusal."""
        if not storage.exists(self.manifest_path):
            raise DatasetNotReady(f"{self.root}: no {MANIFEST_FILE} — run `hierarchy ingest` "
                                  "first")
        manifest = storage.read_json(self.manifest_path)
        for kind in kinds:
            status = manifest.get("kinds", {}).get(kind, {}).get("status")
            if status != "complete":
                raise DatasetNotReady(
                    f"{self.root}: the {kind} ingest is {status or 'missing'}, not complete — "
                    f"re-run `hierarchy ingest --kind {kind}` into this folder")
        return manifest

    def begin_kind(self, manifest: dict, kind: str, taxonomy: Taxonomy) -> None:
        manifest["kinds"][kind] = {"status": "committing", "started": _now()}
        self._write_manifest(manifest, taxonomy)

    def finish_kind(self, manifest: dict, kind: str, entry: dict, taxonomy: Taxonomy) -> None:
        manifest["kinds"][kind] = {**entry, "finished": _now()}
        self._write_manifest(manifest, taxonomy)

    def _write_manifest(self, manifest: dict, taxonomy: Taxonomy) -> None:
        manifest["format"] = FORMAT
        manifest["taxonomy"] = {"fingerprint": taxonomy.fingerprint,
                                "level1": taxonomy.n_l1, "level2": taxonomy.n_l2,
                                "level3": taxonomy.n_l3}
        splits: dict = {}
        for entry in manifest["kinds"].values():
            if entry.get("status") == "complete":
                splits.update(entry["counts"]["per_split"])
        manifest["splits"] = dict(sorted(splits.items()))
        manifest["updated"] = _now()
        storage.write_json_atomic(self.manifest_path, manifest)


def images_in(manifest: dict, split: str, branch: Optional[int] = None) -> int:
    """Pictures of a split (or of one level-1 branch in it) by the manifest's counts."""
    counts = manifest.get("splits", {}).get(split, {})
    if branch is None:
        return int(counts.get("images", 0))
    return int(counts.get("images_per_l1", {}).get(str(int(branch)), 0))
