"""The dataset folder: the contract between ingest and every later stage.

```
<data>/
  images/split=train|val|test/part-*.parquet    Petastorm dataset, one row per picture
  products/kind=train|test/part-*.parquet       one row per product (source, offset, length)
  quarantine/kind=train|test/part-*.parquet     everything that could not be used, and why
  taxonomy.json                                 the category table it was ingested with
  manifest.json                                 inputs, counts, status per kind
  curation/split=*/part-*.parquet               hierarchy curate: flags per picture, and
  reviews/part-*.parquet                        review decisions (hierarchy.contracts.curation)
  curation_report/                              curate's report and review queue
  _staging/<kind>-<token>/                      an ingest in progress (Dataset.stage)
  _ingest.lock                                  the ingest holding the folder
```

An ingest *kind* (the dump it came from) holds one or more *splits*: a train dump becomes the
train and val splits, a test dump the test split. ``ingest --append`` and ``compact`` add
*snapshots* to a kind (:meth:`Dataset.commit_plan`: new parts under new names, the parts they
replace removed, the plan written into the manifest before the first rename, so a killed
commit is rolled forward, never left half done). The kind's entry lists the parts of its
current snapshot, and the integrity check (:meth:`Dataset.verify`) holds every one of them.
A kind is marked ``committing`` in the manifest before its partitions are swapped in and
``complete`` after, so an interrupted commit is never mistaken for a finished dataset
(:meth:`Dataset.require_complete`). Stages read the manifest as a record
(:class:`hierarchy.contracts.manifest.Manifest`), never as a dict.

Every path goes through :mod:`hierarchy.contracts.storage`, so a dataset on HDFS or S3 is the
same code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from hierarchy.contracts import storage
from hierarchy.contracts.errors import Refused, repair_of
from hierarchy.contracts.manifest import FORMAT, CommitPlan, KindEntry, Manifest
from hierarchy.contracts.schema import images_key, part_row_groups, read_row_groups, write_metadata
from hierarchy.contracts.taxonomy import Taxonomy

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)           # a split's code in an ingest plan is its index here
KINDS = ("train", "test")
KIND_SPLITS: Dict[str, Tuple[str, ...]] = {"train": (TRAIN, VAL), "test": (TEST,)}
MANIFEST_FILE = "manifest.json"
TAXONOMY_FILE = "taxonomy.json"
LOCK_FILE = "_ingest.lock"
STAGING = "_staging"


class DatasetNotReady(Refused, RuntimeError):
    """A dataset folder a stage cannot use yet: no manifest, or a kind not committed."""


class DatasetDamaged(Refused, RuntimeError):
    """A committed part is missing, truncated or rewritten, or a part sits beside them that
    the commit did not write."""


# (root, kind, commit time) already checked by this process: evaluate checks its dataset
# once per strategy, and a part is not re-read each time
_VERIFIED: set = set()


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
    def manifest(self) -> Manifest:
        """The manifest, or an empty one for a folder nothing was committed to."""
        if storage.exists(self.manifest_path):
            return Manifest.parse(storage.read_json(self.manifest_path), self.manifest_path)
        return Manifest(format=FORMAT, kinds={})

    def require_complete(self, kinds: Iterable[str]) -> Manifest:
        """The manifest when every kind asked for was committed; else a clear refusal."""
        if not storage.exists(self.manifest_path):
            raise DatasetNotReady(f"{self.root}: no {MANIFEST_FILE} — run `hierarchy ingest` "
                                  "first")
        manifest = self.manifest()
        for kind in kinds:
            entry = manifest.kind(kind)
            if entry is not None and entry.plan is not None:
                raise DatasetNotReady(
                    f"{self.root}: an append or compaction of the {kind} kind is committing "
                    f"(since {entry.started}) — wait for it; if that job is gone, any "
                    f"`hierarchy ingest --append` or `hierarchy compact` into this folder "
                    f"finishes its commit first")
            if entry is None or not entry.complete:
                status = entry.status.value if entry else "missing"
                raise DatasetNotReady(
                    f"{self.root}: the {kind} ingest is {status}, not complete — "
                    f"re-run `hierarchy ingest --kind {kind}` into this folder")
            if manifest.taxonomy is None:
                raise DatasetDamaged(f"{self.manifest_path}: no taxonomy recorded — re-run "
                                     f"`hierarchy ingest --kind {kind}` into this folder")
            self.verify(manifest, kind)
        return manifest

    def folders(self, kind: str) -> List[str]:
        """The partition folders an ingest of ``kind`` commits (relative to the root)."""
        return [f"images/split={s}" for s in KIND_SPLITS[kind]] + [f"products/kind={kind}"]

    def parts(self, kind: str, known: Optional[Dict[Tuple[str, str, int], str]] = None,
              digests: Optional[Digests] = None) -> Dict[str, List[list]]:
        """{folder: [[part name, rows, bytes, content digest], ...]} of a kind's committed
        folders: what the manifest records at commit, :meth:`verify` compares sizes and rows
        against and :meth:`damaged_parts` digests. ``known``: {(folder, name, bytes): digest}
        of parts a snapshot carries over unchanged (not read again); ``digests``: how the
        others are hashed (urls -> digests; a Spark job when the caller has a session, else
        one after another here)."""
        known = known or {}
        listed = {folder: [(name, loc, storage.file_info(loc).size)
                           for name, loc in _parquet_parts(self.path(folder)).items()]
                  for folder in self.folders(kind)}
        todo = [loc for folder, items in listed.items() for name, loc, size in items
                if (folder, name, size) not in known]
        hashed = dict(zip(todo, (digests or serial_digests)(todo)))
        return {folder: [[name, storage.parquet_rows(loc), size,
                          known.get((folder, name, size)) or hashed[loc]]
                         for name, loc, size in items]
                for folder, items in listed.items()}

    def recorded_digests(self, kind: str) -> Dict[str, str]:
        """{part url: the content digest its commit recorded} of the kind's current parts
        (those committed before digests were kept have none)."""
        entry = self.manifest().kind(kind)
        return {self.path(folder, part[0]): part[3]
                for folder, parts in ((entry.parts if entry else None) or {}).items()
                for part in parts if len(part) > 3}

    def damaged_parts(self, kind: str, digests: Optional[Digests] = None) -> List[str]:
        """One line per committed part of ``kind`` whose bytes are not the ones its commit
        recorded (a copy or a disk that damaged it at the same size, which sizes and footers
        do not show): every part is read whole, through ``digests``."""
        recorded = self.recorded_digests(kind)
        got = (digests or serial_digests)(list(recorded))
        return [f"{loc}: content digest {now[:19]}... is not the {want[:19]}... its commit "
                f"recorded — {repair_of(loc)}"
                for (loc, want), now in zip(recorded.items(), got) if now != want]

    def verify(self, manifest: Manifest, kind: str) -> None:
        """Every part of ``kind`` the manifest lists is there, whole (its size, and the rows
        its footer declares), and no other part sits beside them: a damaged dataset is one
        line naming the file and the repair, before any work. A dataset committed before
        parts were recorded is held to its counts instead (each folder's rows)."""
        entry = manifest.kinds[kind]
        stamp = (self.root, kind, entry.finished, entry.snapshot)
        if stamp in _VERIFIED:
            return
        repair = f"re-run `hierarchy ingest --kind {kind}` into {self.root}"
        if entry.parts is None:
            self._verify_counts(entry, kind, repair)
            _VERIFIED.add(stamp)
            return
        for folder, parts in entry.parts.items():
            found = _parquet_parts(self.path(folder))
            for name, rows, size, *_ in parts:
                loc = found.pop(name, None)
                if loc is None:
                    raise DatasetDamaged(f"{self.path(folder, name)}: missing ({rows} rows in "
                                         f"{MANIFEST_FILE}) — {repair}")
                problem = _part_problem(loc, rows, size)
                if problem:
                    raise DatasetDamaged(f"{loc}: {problem} — {repair}")
            if found:
                raise DatasetDamaged(f"{min(found.values())}: not in {MANIFEST_FILE} (written "
                                     f"after the commit?) — remove it or {repair}")
        _VERIFIED.add(stamp)

    def _verify_counts(self, entry: KindEntry, kind: str, repair: str) -> None:
        """Each folder's rows (read from the parts' footers) against the kind's counts (a
        count the manifest does not hold is not checked): a deleted or added part changes
        them, a damaged one has no readable footer."""
        counts = entry.counts
        want = {f"images/split={s}": c.recorded("images") for s, c in counts.per_split.items()}
        want[f"products/kind={kind}"] = counts.recorded("products")
        for folder in self.folders(kind):
            if want.get(folder) is None:
                continue
            got = 0
            for loc in sorted(_parquet_parts(self.path(folder)).values()):
                try:
                    got += storage.parquet_rows(loc)
                except (OSError, ValueError) as exc:
                    raise DatasetDamaged(f"{loc}: not a readable Parquet file ({exc}) — "
                                         f"{repair}") from None
            if got != want[folder]:
                raise DatasetDamaged(f"{self.path(folder)}: {got} rows, {MANIFEST_FILE} counts "
                                     f"{want[folder]} (a part missing, damaged or added) — "
                                     f"{repair}")

    # ---------------------------------------------------------------- commit
    def stage(self, kind: str) -> StagedKind:
        """A new staging folder for an ingest of ``kind``, what an earlier one of the kind
        left there removed: the ingest writes its parts into it, then commits it whole."""
        for name, location, _ in storage.list_dir(self.staging().root):
            if name.startswith(f"{kind}-"):
                storage.remove(location)
        return StagedKind(self, kind, self.staging(f"{kind}-{uuid.uuid4().hex[:12]}"))

    @contextlib.contextmanager
    def scratch(self, job: str) -> Iterator[Dataset]:
        """A private folder under ``_staging/`` for a job's intermediate files, removed when
        the block ends, whatever happens."""
        scratch = self.staging(f"{job}-{uuid.uuid4().hex[:12]}")
        try:
            yield scratch
        finally:
            storage.remove(scratch.root)

    @contextlib.contextmanager
    def replacing(self, folder: str) -> Iterator[str]:
        """Rewrite a whole table of the dataset (``curation/``): yields a staging folder to
        write it in; when the block ends without an error the new table replaces ``folder``
        in one step, else ``folder`` is left as it was and nothing staged remains."""
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        staging = self.staging(f"{name}-{uuid.uuid4().hex[:12]}").root
        try:
            with storage.staged_folder(folder, staging) as staged:
                yield staged
        finally:
            self.drop_empty_staging()

    def drop_empty_staging(self) -> None:
        """``_staging/`` goes once nothing is staged in it (the dataset keeps no empty folder)."""
        if not storage.list_dir(self.staging().root):
            storage.remove(self.staging().root)

    def images_index(self, kind: str, written: Dict[str, int],
                     keep_own: bool = False) -> Dict[str, int]:
        """The row-group count of every part file under images/ once ``kind`` is committed:
        the kind's own from its writers (``written``), the other kind's kept from the index
        in place (a footer is read only for a file the index does not know). ``keep_own``:
        the kind's own entries are kept too (a snapshot whose part names are all new)."""
        mine = () if keep_own else tuple(f"split={s}/" for s in KIND_SPLITS[kind])
        known = {k: n for k, n in read_row_groups(self.images()).items()
                 if not mine or not k.startswith(mine)}
        known.update(written)
        present = [images_key(split, name)
                   for split in SPLITS for name, _, is_file in storage.list_dir(
                       self.images(split)) if is_file and name.endswith(".parquet")]
        unknown = [k for k in present if k not in known]
        known.update(part_row_groups(self.images(), unknown))
        return {k: known[k] for k in present}

    # ---------------------------------------------------------------- snapshots
    def commit_plan(self, kind: str, plan: CommitPlan, taxonomy: Taxonomy) -> Manifest:
        """A new snapshot of ``kind`` (an append's or a compaction's parts, staged beside the
        dataset): the plan is written into the manifest first (the kind ``committing``), then
        carried out (:meth:`roll_forward`). Until the plan is written readers see the snapshot
        before, whole; once it is, they wait for the commit (a few renames), and a job killed
        in between leaves a plan the next one finishes, never half a snapshot."""
        manifest = self.manifest()
        current = manifest.kind(kind)
        moved = {dst for _, dst in plan.moves}
        kept = {f"{folder}/{part[0]}": part[3]
                for folder, parts in ((current.parts if current else None) or {}).items()
                for part in parts if len(part) > 3 and self.path(folder, part[0]) not in moved}
        plan = plan.model_copy(update={"digests": kept})
        self._write_manifest(manifest.begun(kind, _now(), taxonomy, plan))
        return self.roll_forward(kind)

    def roll_forward(self, kind: str) -> Manifest:
        """Finish the commit the manifest's plan for ``kind`` describes (nothing when there
        is none): every staged part moved into place unless it already is, every replaced
        part removed, Petastorm's row-group index written, the kind's entry ``complete``
        with the parts now in its folders. Safe to repeat: each step checks before it acts."""
        manifest = self.manifest()
        entry = manifest.kind(kind)
        if entry is None or entry.plan is None:
            return manifest
        plan = entry.plan
        for src, dst in plan.moves:
            if storage.exists(src):
                storage.replace(src, dst)  # over what a killed rename left there, if any
            elif not storage.exists(dst):
                raise DatasetDamaged(f"{dst}: neither it nor its staged copy {src} exists — "
                                     f"the interrupted commit cannot finish; re-ingest the "
                                     f"{kind} kind without --append")
        for loc in plan.removes:
            storage.remove(loc)
        if storage.exists(self.images()):
            write_metadata(self.images(), self.images_index(kind, {}, keep_own=True))
        taxonomy = self.taxonomy()
        known = {}
        for key, digest in plan.digests.items():
            folder, name = key.rsplit("/", 1)
            if storage.exists(self.path(folder, name)):
                known[(folder, name, storage.file_info(self.path(folder, name)).size)] = digest
        done = self._write_manifest(manifest.finished(kind, plan.entry,
                                                      self.parts(kind, known), _now(), taxonomy))
        staged = {src.rsplit(f"/{STAGING}/", 1)[-1].split("/", 1)[0]
                  for src, _ in plan.moves if f"/{STAGING}/" in src}
        for name in staged:
            storage.remove(self.staging(name).root)
        self.drop_empty_staging()
        return done

    def begin_kind(self, manifest: Manifest, kind: str, taxonomy: Taxonomy) -> Manifest:
        """``kind`` marked ``committing`` in the manifest file; returns what was written."""
        return self._write_manifest(manifest.begun(kind, _now(), taxonomy))

    def finish_kind(self, manifest: Manifest, kind: str, entry: dict, taxonomy: Taxonomy,
                    known: Optional[Dict[Tuple[str, str, int], str]] = None) -> Manifest:
        """``kind``'s entry (``complete``, with its committed parts and their digests:
        ``known``, as :meth:`parts` takes it, the rest hashed here) in the manifest file;
        returns what was written."""
        return self._write_manifest(manifest.finished(kind, entry, self.parts(kind, known),
                                                      _now(), taxonomy))

    def _write_manifest(self, manifest: Manifest) -> Manifest:
        storage.write_json_atomic(self.manifest_path, manifest.to_json())
        return manifest


@dataclass
class StagedKind:
    """One kind's ingest output, staged beside the dataset (``staging``: the same layout).
    :meth:`commit` swaps its partitions in and :meth:`record` marks the kind complete; until
    then readers see the dataset as it was, and an interrupted commit leaves the kind
    ``committing``, which no reader takes for finished. A refused ingest leaves the staging
    folder in place (its quarantine says what was wrong) for the next :meth:`Dataset.stage`
    of the kind to remove."""

    dataset: Dataset
    kind: str
    staging: Dataset
    _manifest: Optional[Manifest] = None
    _taxonomy: Optional[Taxonomy] = None
    _digests: Optional[Dict[Tuple[str, str, int], str]] = None

    def hash_parts(self, digests: Optional[Digests] = None) -> None:
        """Every staged part's content digest (through ``digests``), taken before
        :meth:`commit` so that readers do not wait on it: :meth:`record` writes them."""
        self._digests = {(folder, name, size): digest
                         for folder, parts in self.staging.parts(self.kind,
                                                                 digests=digests).items()
                         for name, _, size, digest in parts}

    def commit(self, taxonomy: Taxonomy, row_groups: Dict[str, int]) -> float:
        """The kind marked ``committing``, its staged partitions swapped in, Petastorm's
        ``images/_common_metadata`` (from ``row_groups``, the writers' counts per part) and
        the taxonomy written, the staging folder removed. Returns the metadata's seconds."""
        ds, kind = self.dataset, self.kind
        self._manifest = ds.begin_kind(ds.manifest(), kind, taxonomy)
        self._taxonomy = taxonomy
        for split in KIND_SPLITS[kind]:
            storage.replace(self.staging.images(split), ds.images(split))
        storage.replace(self.staging.products(kind), ds.products(kind))
        storage.replace(self.staging.quarantine(kind), ds.quarantine(kind))
        t0 = time.perf_counter()
        if storage.exists(ds.images()):
            write_metadata(ds.images(), ds.images_index(kind, row_groups))
        metadata_s = time.perf_counter() - t0
        ds.write_taxonomy(taxonomy)
        storage.remove(self.staging.root)
        ds.drop_empty_staging()
        return metadata_s

    def record(self, entry: dict) -> None:
        """The kind's manifest entry, ``complete``: readers take the kind from here on."""
        if self._manifest is None:
            raise RuntimeError(f"{self.staging.root}: record() before commit()")
        self.dataset.finish_kind(self._manifest, self.kind, entry, self._taxonomy,
                                 known=self._digests)


Digests = Callable[[List[str]], List[str]]  # part urls -> their content digests, in order


def require_digest(url: str, expected: Optional[str]) -> None:
    """Refuse to copy a part whose bytes are not the ones its commit recorded (a compaction
    or an append rewriting it would otherwise carry the damage into a part with a fresh
    digest). The words are the ones :func:`hierarchy.contracts.errors.damaged_file` maps
    to one line when a Spark task raises them."""
    if expected and storage.file_digest(url) != expected:
        raise OSError(f"cannot read Parquet file {url}: its content digest is not the "
                      f"{expected[:19]}... its commit recorded")


def serial_digests(urls: List[str]) -> List[str]:
    return [storage.file_digest(u) for u in urls]


def _parquet_parts(folder: str) -> Dict[str, str]:
    return {name: loc for name, loc, is_file in storage.list_dir(folder)
            if is_file and name.endswith(".parquet")}


def _part_problem(loc: str, rows: int, size: int) -> Optional[str]:
    """What is wrong with a committed part, or None."""
    got = storage.file_info(loc).size
    if got != size:
        return f"{got} bytes, {MANIFEST_FILE} says {size} (truncated or rewritten)"
    try:
        got = storage.parquet_rows(loc)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        return f"not a readable Parquet file ({exc})"
    return None if got == rows else f"{got} rows, {MANIFEST_FILE} says {rows}"
