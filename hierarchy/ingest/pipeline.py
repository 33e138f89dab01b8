"""The ingest job as extract / transform / load.

check     everything that can be refused without Spark: inputs, category table, output
          folder, the dataset's taxonomy, another ingest's lock;
extract   scan each BSON file's length prefixes on the driver into an offset index (a few
          bytes per document), assign splits by product id, cut byte ranges of ~split_mb;
transform each Spark task reads only its byte range, decodes its documents and writes its
          own Parquet part files (images per split, products, quarantine) into a staging
          dataset — JPEG bytes never travel through the JVM or the driver; then duplicate
          product ids across ranges are resolved (:mod:`hierarchy.ingest.duplicates`);
load      swap the staged partitions of this kind (train: split=train/val, test: split=test)
          into the output, regenerate the Petastorm metadata, write manifest.json last.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import KIND_SPLITS, Dataset, serial_digests
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.schema import IMAGES_FILE, QUARANTINE_FILE
from hierarchy.contracts.settings import Ingest, Settings
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.ingest import decode as dec
from hierarchy.ingest import duplicates
from hierarchy.ingest.append import commit_append, split_config
from hierarchy.ingest.compact import compact, needs_compaction
from hierarchy.ingest.lock import check_unlocked, output_lock
from hierarchy.ingest.scan import ScanResult, cut_ranges, scan_stream
from hierarchy.ingest.split import assign_splits
from hierarchy.ingest.transform import (
    IngestContext,
    IngestError,
    IngestTask,
    cached_taxonomy,
    process_range,
)
from hierarchy.ingest.writer import write_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    mtime: Optional[float]

    def record(self) -> dict:
        mtime = dt.datetime.fromtimestamp(self.mtime, dt.UTC).isoformat() if self.mtime \
            else None
        return {"path": self.url, "size": self.size, "mtime": mtime}


@dataclass(frozen=True)
class CheckedIngest:
    files: List[InputFile]
    categories: str
    taxonomy: Taxonomy


# ------------------------------------------------------------------------------ check
def describe_inputs(urls: Sequence[str]) -> List[InputFile]:
    """Each input checked to be a readable, non-empty file (before Spark starts)."""
    out = []
    for url in urls:
        info = storage.require_file(url, "input")
        if info.size == 0:
            raise IngestError(f"input {url}: empty file (0 bytes), no document to ingest")
        mtime = info.mtime.timestamp() if info.mtime else None
        out.append(InputFile(url=url, size=info.size, mtime=mtime))
    seen = set()
    for f in out:
        if f.url in seen:
            raise UsageError(f"input {f.url}: given twice")
        seen.add(f.url)
    return out


def check_ingest(cfg: Settings, inputs: Sequence[str], categories: str, output: str,
                 kind: str) -> CheckedIngest:
    """Everything that can be refused without Spark, cheapest first: the kind, the inputs,
    the category table, the output folder, the dataset's taxonomy, another ingest's lock."""
    if kind not in KIND_SPLITS:
        raise UsageError(f"--kind {kind!r}: expected train or test")
    files = describe_inputs(inputs)
    storage.require_file(categories, "--categories")
    taxonomy = Taxonomy.from_csv(categories)
    storage.require_writable_dir(output, "--output")
    _check_taxonomy(Dataset(output), taxonomy, categories)
    check_unlocked(Dataset(output), cfg.ingest.lock_stale_hours)
    return CheckedIngest(files, categories, taxonomy)


def _check_taxonomy(dataset: Dataset, taxonomy: Taxonomy, categories: str) -> None:
    if not dataset.has_taxonomy():
        return
    stored = dataset.taxonomy()
    if stored.fingerprint != taxonomy.fingerprint:
        raise IngestError(
            f"{categories} ({taxonomy.fingerprint[:19]}) is not the taxonomy this dataset "
            f"was ingested with ({stored.fingerprint[:19]}, {dataset.taxonomy_path}): ingest "
            "into a new output folder, or re-ingest every kind with the new table")


# ------------------------------------------------------------------------------ extract
def scan_inputs(inputs: Sequence[InputFile], max_document: int,
                progress: bool = True) -> List[ScanResult]:
    from tqdm import tqdm

    results = []
    total = sum(f.size for f in inputs)
    with tqdm(total=total, desc="scan", unit="B", unit_scale=True, disable=not progress) as bar:
        for f in inputs:
            # mapped: the scan reads a few bytes per document in place (page cache)
            local = storage.map_local(f.url)
            if local is not None:
                with local[0] as mapped:
                    results.append(scan_stream(None, f.size, f.url, max_document,
                                               progress=bar.update, data=mapped))
                continue
            fs, path = storage.resolve(f.url)
            with fs.open_input_file(path) as fh:
                results.append(scan_stream(fh, f.size, f.url, max_document, progress=bar.update))
    return results


def even_split_bytes(total: int, split_bytes: int, slots: int) -> int:
    """The range size nearest ``split_bytes`` (never above it) that cuts ``total`` bytes into
    a multiple of ``slots`` ranges: the last wave of tasks then keeps every core busy instead
    of one (worth up to a task's time per job; nothing at 58 GB's ~900 tasks)."""
    if total <= 0 or slots <= 1:
        return split_bytes
    waves = -(-total // (split_bytes * slots))
    return max(1, min(split_bytes, -(-total // (waves * slots))))


def plan_tasks(scans: Sequence[ScanResult], kind: str, split_bytes: int, val_fraction: float,
               seed: int, slots: int = 1, draw: str = "product") -> List[IngestTask]:
    """One task per byte range; each carries the split code of each of its documents.
    ``slots``: the task slots of the cluster, for :func:`even_split_bytes`."""
    split_bytes = even_split_bytes(sum(int(s.lengths.sum()) for s in scans), split_bytes, slots)
    pids = np.concatenate([s.product_ids for s in scans]) if scans else np.empty(0, np.int64)
    cids = np.concatenate([s.category_ids for s in scans]) if scans else np.empty(0, np.int64)
    codes = assign_splits(pids, cids, kind, val_fraction, seed, draw)
    tasks, base = [], 0
    for scan in scans:
        for first, end in cut_ranges(scan, split_bytes):
            tasks.append(IngestTask(
                range_id=len(tasks), source=scan.path, start=int(scan.offsets[first]),
                end=int(scan.offsets[end - 1] + scan.lengths[end - 1]), n_docs=end - first,
                kind=kind, splits=codes[base + first:base + end].tobytes()))
        base += scan.n_documents
    return tasks


def corrupt_rows(scans: Sequence[ScanResult]) -> List[dict]:
    return [
        {"source": s.path, "offset": r.offset, "length": r.length, "product_id": None,
         "img_idx": None, "level": dec.REGION, "reason": r.reason, "detail": r.detail}
        for s in scans for r in s.corrupt
    ]


# ------------------------------------------------------------------------------ load
def run_compact(spark, cfg: Settings, data: str, kinds: Sequence[str]) -> Dict[str, Optional[dict]]:
    """``hierarchy compact``: each complete kind of ``kinds`` compacted under the dataset's
    lock (an interrupted commit rolled forward first); {kind: its snapshot's record, None
    when nothing was small enough to merge}."""
    dataset = Dataset(data)
    out: Dict[str, Optional[dict]] = {}
    for kind in kinds:
        with output_lock(dataset, kind, cfg.ingest.lock_stale_hours):
            dataset.roll_forward(kind)
            dataset.require_complete([kind])
            out[kind] = compact(spark, dataset, kind, cfg.ingest)
    return out


def run_ingest(spark, cfg: Settings, inputs: Sequence[str], categories: str, output: str,
               kind: str = "train", checked: Optional[CheckedIngest] = None,
               spark_start_s: Optional[float] = None, append: bool = False) -> dict:
    """Wire extract, transform and load; returns the manifest entry for this kind. The whole
    job holds the output folder's lock (:mod:`hierarchy.ingest.lock`). ``checked``: what
    :func:`check_ingest` already returned for these arguments (else it runs here);
    ``spark_start_s``: how long the caller took to start the session, for the timings;
    ``append``: add the dump to the kind as a new snapshot (:mod:`hierarchy.ingest.append`)
    instead of replacing it (a kind not yet complete is ingested whole)."""
    checked = checked or check_ingest(cfg, inputs, categories, output, kind)
    dataset = Dataset(output)
    with output_lock(dataset, kind, cfg.ingest.lock_stale_hours):
        if append:
            # an append or compaction killed mid-commit is finished before anything else
            dataset.roll_forward(kind)
            entry = dataset.manifest().kind(kind)
            if entry is None or not entry.complete:
                log.info("no complete %s kind in %s yet: ingesting the dump whole", kind,
                         output)
                append = False
        return _ingest_locked(spark, cfg, checked, dataset, kind, spark_start_s, append)


def _load_task_modules(_) -> int:
    from hierarchy.ingest import transform, writer  # noqa: F401 - what a decode task imports

    writer.warm_up(IMAGES_FILE)
    return 0


class _WarmWorkers:
    """A job of one small task per core, run beside the driver's scan: each Python worker
    forks, imports the decode modules and writes a row in memory (~1-2 s) while the scan
    reads the offset index, instead of after it, when the decode tasks are waiting for them.
    A failure here only costs the overlap: the decode job starts its workers itself."""

    def __init__(self, spark):
        self.seconds = 0.0
        sc = spark.sparkContext

        def run():
            t0 = time.perf_counter()
            try:
                n = sc.defaultParallelism
                sc.parallelize(range(n), n).map(_load_task_modules).count()
            except Exception as exc:  # noqa: BLE001 - an optimisation, never the job's failure
                log.debug("worker warm-up failed: %s", exc)
            self.seconds = time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name="ingest-warmup", daemon=True)
        self._thread.start()

    def join(self) -> float:
        self._thread.join()
        return self.seconds


def _context(icfg: Ingest, staging: Dataset) -> IngestContext:
    return IngestContext(staging=staging.root, verify_jpeg=icfg.verify_jpeg,
                         compression=icfg.compression,
                         row_group_bytes=int(icfg.row_group_mb * (1 << 20)),
                         raw_decoder=icfg.raw_decoder,
                         max_picture_pixels=icfg.max_picture_pixels)


def _decode(spark, tasks: List[IngestTask], ctx: IngestContext, taxonomy: Taxonomy,
            warm: _WarmWorkers, progress: bool, marks: Dict[str, float]) -> List[dict]:
    """The decode job: one Spark task per byte range; returns their counts. ``marks`` gets
    the times the job waited for its workers, was submitted and ended."""
    tax_b = spark.sparkContext.broadcast(taxonomy.to_json())

    def run_task(task: IngestTask) -> dict:
        return process_range(task, ctx, cached_taxonomy(tax_b.value))

    # the commit's Petastorm (and pandas) imports, ~0.25 s, while the workers still start
    from hierarchy.contracts.schema import images_unischema

    images_unischema()
    from hierarchy.spark import collect_with_progress

    marks["warmup_s"] = warm.join()
    marks["workers"] = time.time()  # the scan is done; what is left of the warm-up is waited for
    results = []
    marks["submit"] = time.time()
    if tasks:
        rdd = spark.sparkContext.parallelize(tasks, len(tasks)).map(run_task)
        results = collect_with_progress(rdd, "decode", len(tasks), progress)
    marks["decode"] = time.time()
    return results


def _resolve_duplicates(spark, scans, tasks, staging: Dataset, kind: str, files, progress: bool
                        ) -> List[dict]:
    """A product id seen in two byte ranges keeps its first copy (a Spark job over the staged
    parts, only when the scan saw an id that could repeat across ranges)."""
    from hierarchy.spark import run_with_progress

    pids = [s.product_ids for s in scans]
    if not duplicates.may_repeat_across_ranges(
            np.concatenate(pids) if pids else [], [t.n_docs for t in tasks]):
        return []
    return run_with_progress(
        spark, "duplicate ids", lambda: duplicates.resolve(
            spark, staging, kind, [f.url for f in files]), enabled=progress)


def _refuse_too_bad(counts: dict, icfg: Ingest, staging: Dataset) -> float:
    """The share of unusable documents and regions; IngestError above the threshold."""
    bad = counts["bad_documents"] + counts["corrupt_regions"]
    units = counts["documents"] + counts["corrupt_regions"]
    fraction = bad / units if units else 0.0
    if fraction > icfg.max_bad_fraction:
        top = ", ".join(f"{k}: {v}" for k, v in Counter(counts["quarantine"]).most_common(5))
        raise IngestError(
            f"{bad} of {units} documents or regions unusable ({fraction:.2%}) is above "
            f"ingest.max_bad_fraction={icfg.max_bad_fraction} ({top}); nothing was "
            f"committed, the quarantine is in {staging.quarantine()}")
    return fraction


def spark_digests(spark):
    """urls -> content digests, hashed by Spark tasks (one per part, in parallel over the
    cluster: a full ingest reads every part once more, in page cache where it was just
    written)."""
    def digests(urls: List[str]) -> List[str]:
        if len(urls) < 2:
            return serial_digests(urls)
        return (spark.sparkContext.parallelize(urls, len(urls))
                .map(storage.file_digest).collect())
    return digests


def _timings(marks: Dict[str, float], results: List[dict], metadata_s: float,
             spark_start_s: Optional[float]) -> dict:
    task_s = {k: round(sum(r["task_s"][k] for r in results), 3)
              for k in ("read", "decode", "write")}
    # how long the first task waited for a Python worker (fork, imports) after submission
    worker_start = min((r["started"] for r in results), default=marks["submit"]) - \
        marks["submit"]
    m = marks
    return {**({"spark_start_s": round(spark_start_s, 3)} if spark_start_s is not None else {}),
            "scan_s": round(m["scan"] - m["start"], 3),
            # the workers' start beside the scan, and what the job still waited for
            "worker_warmup_s": round(m["warmup_s"], 3),
            "worker_wait_s": round(m["workers"] - m["scan"], 3),
            "worker_start_s": round(max(0.0, worker_start), 3),
            "decode_s": round(m["decode"] - m["workers"], 3),
            "tasks_s": task_s,
            "duplicates_s": round(m["dedup"] - m["decode"], 3),
            "metadata_s": round(metadata_s, 3),
            # each part's content digest, hashed in parallel before the commit (an append's
            # are hashed at its commit, only the parts it adds)
            **({"digest_s": round(m["digest"] - m["dedup"], 3)} if "digest" in m else {}),
            "commit_s": round(m["commit"] - m.get("digest", m["dedup"]) - metadata_s, 3),
            "total_s": round(m["commit"] - m["start"], 3)}


def _ingest_locked(spark, cfg: Settings, checked: CheckedIngest, dataset: Dataset, kind: str,
                   spark_start_s: Optional[float], append: bool = False) -> dict:
    icfg = cfg.ingest
    progress = icfg.progress
    marks = {"start": time.time()}
    taxonomy, files = checked.taxonomy, checked.files
    # again under the lock: another ingest may have committed since the check
    _check_taxonomy(dataset, taxonomy, checked.categories)

    current = dataset.manifest().kind(kind) if append else None
    val_fraction, seed, draw = split_config(current, icfg) if append else \
        (icfg.val_fraction, icfg.split_seed, icfg.val_draw)
    warm = _WarmWorkers(spark)  # Python workers start while the driver scans
    scans = scan_inputs(files, int(icfg.max_document_mb * (1 << 20)), progress)
    tasks = plan_tasks(scans, kind, int(icfg.split_mb * (1 << 20)), val_fraction, seed,
                       slots=spark.sparkContext.defaultParallelism, draw=draw)
    marks["scan"] = time.time()

    staged = dataset.stage(kind)
    region_rows = corrupt_rows(scans)
    write_table(storage.join(staged.staging.quarantine(kind), "part-scan.parquet"),
                region_rows, QUARANTINE_FILE)
    results = _decode(spark, tasks, _context(icfg, staged.staging), taxonomy, warm, progress,
                      marks)
    decoded = len(results)
    results += _resolve_duplicates(spark, scans, tasks, staged.staging, kind, files, progress)
    marks["dedup"] = time.time()
    written: Dict[str, int] = {}
    for r in results:  # the duplicate step's rewrites come last and override
        written.update(r.get("row_groups", {}))

    counts = summarize(results, scans, region_rows)
    _refuse_empty_inputs(files, counts, staged.staging.quarantine())
    fraction = _refuse_too_bad(counts, icfg, staged.staging)
    if current is not None:
        counts.pop("by_source")
        marks["commit"] = marks["dedup"]
        record = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "inputs": [f.record() for f in files], "bad_fraction": round(fraction, 6),
                  "documents": counts["documents"], "quarantined": sum(
                      counts["quarantine"].values())}
        done = commit_append(spark, dataset, staged.staging, kind, current, counts, record,
                             taxonomy)
        if done["append"]["committed"] and \
                needs_compaction(dataset.manifest().kinds[kind], icfg):
            done["compaction"] = compact(spark, dataset, kind, icfg)
            done["snapshot"] = done["compaction"]["snapshot"]
        marks["commit"] = time.time()
        return {**done, "bad_fraction": round(fraction, 6), "tasks": len(tasks),
                "timings": _timings(marks, results[:decoded], 0.0, spark_start_s)}
    metadata_s = _commit_whole(spark, staged, taxonomy, written, marks)
    counts.pop("by_source")
    entry = {"status": "complete", "inputs": [f.record() for f in files], "counts": counts,
             "bad_fraction": round(fraction, 6), "config": icfg.model_dump(mode="json"),
             "timings": _timings(marks, results[:decoded], metadata_s, spark_start_s),
             "tasks": len(tasks)}
    staged.record(entry)
    log.debug("ingest %s committed into %s", kind, dataset.root)
    return entry


def _commit_whole(spark, staged, taxonomy, written: Dict[str, int], marks: dict) -> float:
    """A full ingest's commit: every staged part hashed first (readers do not wait on it),
    then swapped in; returns the metadata's seconds
    (:meth:`hierarchy.contracts.dataset.StagedKind.commit`)."""
    staged.hash_parts(spark_digests(spark))
    marks["digest"] = time.time()
    metadata_s = staged.commit(taxonomy, written)
    marks["commit"] = time.time()
    return metadata_s


def _refuse_empty_inputs(files: Sequence[InputFile], counts: dict,
                         staging_quarantine: str) -> None:
    """An input that gave no product is refused whatever ``max_bad_fraction`` says: it is
    the wrong file, or a broken copy, and committing "complete" without it would hide that."""
    for f in files:
        mine = counts["by_source"].get(f.url, {})
        if mine.get("products", 0) > 0:
            continue
        reasons = ", ".join(f"{k}: {v}" for k, v in
                            Counter(mine.get("quarantine", {})).most_common(5))
        raise IngestError(
            f"input {f.url}: no usable document in {f.size:,} bytes"
            + (f" ({reasons})" if reasons else "") + "; nothing was committed, the "
            f"quarantine is in {staging_quarantine}")


def summarize(results: Sequence[dict], scans: Sequence[ScanResult],
              region_rows: Sequence[dict]) -> dict:
    """Manifest counts from the decode tasks' stats (and the duplicate step's deltas)."""
    products: Counter = Counter()
    images: Counter = Counter()
    images_l1: Counter = Counter()
    quarantine: Counter = Counter(dec.count_reasons(list(region_rows)))
    by_source: Dict[str, dict] = {}

    def source(name: str) -> dict:
        return by_source.setdefault(name, {"products": 0, "quarantine": Counter()})

    for row in region_rows:
        source(row["source"])["quarantine"][row["reason"]] += 1
    docs = bad_docs = nbytes = 0
    for r in results:
        products.update(r["products"])
        images.update(r["images"])
        images_l1.update(r["images_l1"])
        quarantine.update(r["quarantine"])
        for name, n in r["products_by_source"].items():
            source(name)["products"] += n
        for name, reasons in r["quarantine_by_source"].items():
            source(name)["quarantine"].update(reasons)
        docs += r["documents"]
        bad_docs += r["bad_documents"]
        nbytes += r["image_bytes"]
    splits = sorted(s for s in set(products) | set(images) if products[s] or images[s])
    return {
        "documents": docs,
        "bad_documents": bad_docs,
        "corrupt_regions": len(region_rows),
        "corrupt_bytes": sum(s.corrupt_bytes for s in scans),
        "input_bytes": sum(s.size for s in scans),
        "products": sum(products.values()),
        "images": sum(images.values()),
        "image_bytes": nbytes,
        # images per level-1 branch: training sizes a branch model's epoch from it
        "per_split": {s: {"products": products.get(s, 0), "images": images.get(s, 0),
                          "images_per_l1": {str(l1): n for (sp, l1), n in
                                            sorted(images_l1.items()) if sp == s and n}}
                      for s in splits},
        "quarantine": dict(sorted((k, v) for k, v in quarantine.items() if v)),
        "by_source": by_source,
    }
