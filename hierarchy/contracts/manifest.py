"""manifest.json as a typed record: what the dataset folder holds, kind by kind.

```
{"format": "hierarchy-dataset/1",
 "kinds": {"train": {"status": "complete", "inputs": [...], "counts": {..., "per_split":
           {"train": {"products", "images", "images_per_l1": {"<l1>": n}}, "val": ...}},
           "parts": {"<folder>": [[name, rows, bytes, digest], ...]}, "finished": ..., ...},
           "test": {"status": "committing", "started": ...}},
 "taxonomy": {"fingerprint", "level1", "level2", "level3"},
 "splits": {<split>: the per_split counts of every complete kind},
 "updated": "<UTC time>"}
```

:class:`hierarchy.contracts.dataset.Dataset` is the only reader and writer of the file; stages
get a :class:`Manifest` and read it through its accessors (``manifest.fingerprint``,
``manifest.images(VAL, branch)``, ``manifest.split(VAL).products``), never its dict.

Records are frozen pydantic models, like the configuration's: they keep the keys they do not
name (``extra="allow"``) and write back only the keys that were read or set, so a manifest
written before a field existed (or by a newer version that added one) reads and writes
unchanged. A change is a new record (:meth:`Manifest.begun`, :meth:`Manifest.finished`).

A kind's ``status`` this version does not know is refused when the file is read (one line
naming the file): it is the commit protocol's word for whether the kind's partitions are in
place, and a reader that kept a word it cannot interpret could neither use the kind nor
rewrite the manifest knowing what it carries over.
"""

from __future__ import annotations

from enum import Enum
from typing import Dict, List, Optional, Tuple, Union

from pydantic import ConfigDict, ValidationError

from hierarchy.contracts.errors import Refused
from hierarchy.contracts.record import Record
from hierarchy.contracts.taxonomy import Taxonomy

FORMAT = "hierarchy-dataset/1"


# how ingest may draw val (ingest.val_draw; hierarchy/ingest/split.py): the first is the
# default, the second what an ingest from before the choice did
VAL_DRAWS = ("product", "category")


class ManifestInvalid(Refused, RuntimeError):
    """manifest.json is not what this version writes (hand-edited, cut short, another
    version's)."""


class KindStatus(str, Enum):
    """Where an ingest of a kind stands (the values are what the file holds)."""

    COMMITTING = "committing"  # its partitions are being swapped in: not a dataset yet
    COMPLETE = "complete"      # committed: readers take the kind from here on


class _Part(Record):
    model_config = ConfigDict(extra="allow", frozen=True)


class SplitCounts(_Part):
    """One split's counts: products, pictures, pictures per level-1 branch (``"<l1>"``)."""

    products: int = 0
    images: int = 0
    images_per_l1: Dict[str, int] = {}

    def images_of(self, branch: Optional[int] = None) -> int:
        """Pictures of the split, or of one level-1 branch in it."""
        if branch is None:
            return self.images
        return self.images_per_l1.get(str(int(branch)), 0)


class KindCounts(_Part):
    """What an ingest of a kind counted (documents, bytes, quarantine reasons, ... kept as
    they are); ``per_split`` is what the manifest's ``splits`` gather."""

    products: int = 0
    images: int = 0
    per_split: Dict[str, SplitCounts] = {}
    quarantine: Dict[str, int] = {}


class CommitPlan(_Part):
    """An append's or a compaction's commit, written before its first rename: ``moves``
    [[staged part, its place in the dataset], ...], ``removes`` (parts of the snapshot
    before that it replaces), ``entry`` (the kind's entry once done, without its parts)."""

    moves: List[Tuple[str, str]] = []
    removes: List[str] = []
    entry: dict
    # {"<folder>/<name>": digest} of the parts the snapshot keeps as they are (recorded when
    # the plan is written, so the commit hashes only the parts it moves in)
    digests: Dict[str, str] = {}


class KindEntry(_Part):
    """One kind's ingest: ``committing`` (with ``started``) or ``complete`` (with its inputs,
    counts, committed parts and ``finished``; ``bad_fraction``, ``config``, ``timings``,
    ``tasks`` kept as ingest wrote them). ``parts`` None: committed before parts were
    recorded (the kind is then held to its counts)."""

    status: KindStatus
    started: Optional[str] = None
    finished: Optional[str] = None
    inputs: List[dict] = []
    counts: KindCounts = KindCounts()
    # [name, rows, bytes, content digest] (the digest since integrity checks: a part
    # committed before has three fields, and is held to its size and footer only)
    parts: Optional[Dict[str, List[Union[Tuple[str, int, int], Tuple[str, int, int, str]]]]] \
        = None
    # appends (``ingest --append``) and compactions since the kind's full ingest: the
    # current snapshot's number (0: the full ingest itself) and one record per snapshot
    snapshot: int = 0
    snapshots: List[dict] = []
    # while ``committing`` after an append or a compaction: what the commit does (the
    # parts it moves in and removes, the entry it writes last), so an interrupted commit
    # is rolled forward by the next job that takes the lock
    # (:meth:`hierarchy.contracts.dataset.Dataset.roll_forward`)
    plan: Optional[CommitPlan] = None

    @property
    def complete(self) -> bool:
        return self.status is KindStatus.COMPLETE


class TaxonomyCounts(_Part):
    """The taxonomy the dataset was ingested with: its fingerprint and ids per level."""

    fingerprint: str
    level1: int
    level2: int
    level3: int


class Manifest(_Part):
    """The whole of manifest.json."""

    format: str = FORMAT
    kinds: Dict[str, KindEntry] = {}
    taxonomy: Optional[TaxonomyCounts] = None
    splits: Dict[str, SplitCounts] = {}
    updated: Optional[str] = None

    # ------------------------------------------------------------ reading
    @classmethod
    def parse(cls, obj, source: str) -> Manifest:
        """The record of a manifest's JSON; :class:`ManifestInvalid` (one line naming
        ``source``) when it is not one this version can read."""
        return cls.validated(obj, source, ManifestInvalid,
                         "not a manifest this version can read; restore it, or ingest again "
                         "into a new folder")

    def kind(self, name: str) -> Optional[KindEntry]:
        """Kind ``name``'s entry, None when it was never ingested."""
        return self.kinds.get(name)

    def val_draw(self) -> Optional[str]:
        """How the train kind's val was drawn (``ingest.val_draw``): ``product`` or
        ``category`` — an ingest from before the choice drew by category. None without a
        complete train kind."""
        entry = self.kind("train")
        if entry is None or not entry.complete:
            return None
        config = (entry.model_extra or {}).get("config") or {}
        return str(config.get("val_draw", VAL_DRAWS[1]))

    def complete_kinds(self) -> List[str]:
        return [k for k, e in self.kinds.items() if e.complete]

    @property
    def fingerprint(self) -> str:
        return self._taxonomy().fingerprint

    @property
    def n_l1(self) -> int:
        return self._taxonomy().level1

    def _taxonomy(self) -> TaxonomyCounts:
        if self.taxonomy is None:
            raise ValueError("the manifest records no taxonomy (nothing was committed)")
        return self.taxonomy

    def split(self, name: str) -> SplitCounts:
        """A split's counts (all zero for a split no complete kind holds)."""
        return self.splits.get(name) or SplitCounts()

    def images(self, split: str, branch: Optional[int] = None) -> int:
        """Pictures of a split (or of one level-1 branch in it) by the manifest's counts."""
        return self.split(split).images_of(branch)

    def splits_json(self) -> Optional[dict]:
        """The splits' counts as the file holds them (None when it has none): what a run
        records of the data it trained on."""
        return self.to_json().get("splits")

    # ------------------------------------------------------------ writing
    def begun(self, kind: str, now: str, taxonomy: Taxonomy,
              plan: Optional[CommitPlan] = None) -> Manifest:
        """The manifest with ``kind`` marked ``committing`` (by ``plan`` when given)."""
        entry = KindEntry(status=KindStatus.COMMITTING, started=now,
                          **({"plan": plan} if plan is not None else {}))
        return self._with_kind(kind, entry, now, taxonomy)

    def finished(self, kind: str, entry: dict, parts: Dict[str, List[list]], now: str,
                 taxonomy: Taxonomy) -> Manifest:
        """The manifest with ``kind``'s entry (what ingest recorded, its committed
        ``parts`` and the time it finished) in place of the one before."""
        try:
            done = KindEntry.model_validate({**entry, "parts": parts, "finished": now})
        except ValidationError as exc:
            raise ValueError(f"the {kind} ingest's manifest entry: {exc}") from None
        return self._with_kind(kind, done, now, taxonomy)

    def _with_kind(self, kind: str, entry: KindEntry, now: str,
                   taxonomy: Taxonomy) -> Manifest:
        """The kinds with ``entry`` in; the taxonomy, the splits of the complete kinds and
        the time written again."""
        kinds = {**self.kinds, kind: entry}
        splits: Dict[str, SplitCounts] = {}
        for e in kinds.values():
            if e.complete:
                splits.update(e.counts.per_split)
        counts = TaxonomyCounts(fingerprint=taxonomy.fingerprint, level1=taxonomy.n_l1,
                                level2=taxonomy.n_l2, level3=taxonomy.n_l3)
        return self.model_copy(update={"format": FORMAT, "kinds": kinds, "taxonomy": counts,
                                       "splits": dict(sorted(splits.items())),
                                       "updated": now})
