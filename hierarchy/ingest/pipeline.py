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

import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import KIND_SPLITS, SPLITS, Dataset
from hierarchy.contracts.errors import Refused, UsageError
from hierarchy.contracts.schema import IMAGES_FILE, PRODUCTS_FILE, QUARANTINE_FILE, images_key
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.ingest import decode as dec
from hierarchy.ingest import duplicates, rawdoc
from hierarchy.ingest.lock import check_unlocked, output_lock
from hierarchy.ingest.scan import ScanResult, cut_ranges, scan_stream
from hierarchy.ingest.split import assign_splits
from hierarchy.ingest.writer import PartWriter, write_table

log = logging.getLogger(__name__)


class IngestError(Refused, RuntimeError):
    """The job refused to commit (bad input above the threshold, an input without a usable
    document, taxonomy mismatch...)."""


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    mtime: Optional[float]

    def record(self) -> dict:
        import datetime as dt

        mtime = dt.datetime.fromtimestamp(self.mtime, dt.UTC).isoformat() if self.mtime \
            else None
        return {"path": self.url, "size": self.size, "mtime": mtime}


@dataclass(frozen=True)
class IngestTask:
    """One Spark task: a contiguous byte range of one input, and each document's split."""

    range_id: int
    source: str
    start: int
    end: int
    n_docs: int
    kind: str
    splits: bytes      # one code per document: an index into hierarchy.contracts.dataset.SPLITS


@dataclass(frozen=True)
class IngestContext:
    """What every task of one ingest shares (shipped once in the task closure)."""

    staging: str
    verify_jpeg: str
    compression: str
    row_group_bytes: int
    raw_decoder: bool = True
    max_picture_pixels: int = 0


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


def check_ingest(cfg, inputs: Sequence[str], categories: str, output: str,
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
    check_unlocked(Dataset(output), cfg["ingest"]["lock_stale_hours"])
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
               seed: int, slots: int = 1) -> List[IngestTask]:
    """One task per byte range; each carries the split code of each of its documents.
    ``slots``: the task slots of the cluster, for :func:`even_split_bytes`."""
    split_bytes = even_split_bytes(sum(int(s.lengths.sum()) for s in scans), split_bytes, slots)
    pids = np.concatenate([s.product_ids for s in scans]) if scans else np.empty(0, np.int64)
    cids = np.concatenate([s.category_ids for s in scans]) if scans else np.empty(0, np.int64)
    codes = assign_splits(pids, cids, kind, val_fraction, seed)
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


# ------------------------------------------------------------------------------ transform
_TAXONOMY_CACHE: Dict[str, Taxonomy] = {}


def _taxonomy(text: str) -> Taxonomy:
    # parsed once per Python worker, not once per task
    key = str(hash(text))
    if key not in _TAXONOMY_CACHE:
        _TAXONOMY_CACHE[key] = Taxonomy.from_json(text)
    return _TAXONOMY_CACHE[key]


class _Range:
    """A task's bytes: a read-only map of the page cache for a local file (no copy, nothing
    to zero), else one read into a buffer. ``data[first:]`` is the range; the fast path and
    the writers slice it in place, so it is closed only after the writers are."""

    def __init__(self, url: str, start: int, size: int):
        self._map = None
        try:
            local = storage.map_local(url, start, size) if size else None
        except ValueError as exc:
            raise IngestError(f"{exc}; the file shrank since the scan") from None
        if local is not None:
            self._map, self.first = local
            self.data = self._map
            return
        self.data, self.first = bytearray(size), 0
        view = memoryview(self.data)
        fs, path = storage.resolve(url)
        with fs.open_input_file(path) as fh:
            fh.seek(start)
            got = 0
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise IngestError(f"{url}: {size - got} byte(s) missing at offset "
                                      f"{start + got}; the file shrank since the scan")
                got += n

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a slice still exported (an aborted task): the GC closes it
                pass


def process_range(task: IngestTask, ctx: IngestContext, taxonomy: Taxonomy) -> dict:
    """Decode one byte range and write its part files; returns small counts for the manifest."""
    started = time.time()
    t0 = time.perf_counter()
    source = _Range(task.source, task.start, task.end - task.start)
    data = source.data
    view = memoryview(data)
    t_read = time.perf_counter() - t0
    staging = Dataset(ctx.staging)
    name = duplicates.part_name(task.range_id)
    images = {
        split: PartWriter(storage.join(staging.images(split), name), IMAGES_FILE,
                          ctx.compression, ctx.row_group_bytes, "nbytes")
        for split in KIND_SPLITS[task.kind]
    }
    products: List[dict] = []
    quarantine: List[dict] = []
    stats = {"documents": 0, "bad_documents": 0}
    dedup = duplicates.RangeDeduplicator(task.source)
    fast = ctx.raw_decoder and ctx.verify_jpeg == "markers"
    # the loop makes no reference cycles (refcounting frees everything), while the cyclic
    # collector would walk every picture slice and row it holds, ~5 % of a task
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i, (offset, pos, length) in enumerate(dec.document_spans(data, task.start,
                                                                      source.first)):
            split = SPLITS[task.splits[i]]
            stats["documents"] += 1
            got = rawdoc.read_product(data, view, pos, length, task.kind, taxonomy,
                                      ctx.max_picture_pixels) if fast else None
            if got is not None and dedup.claim(got[0], offset):
                product_id, category_id, levels, pictures = got
                images[split].add_pictures(product_id, category_id, *levels, pictures)
                products.append(dec.product_row(product_id, category_id, levels, split,
                                                len(pictures), 0, task.source, offset, length))
                continue
            # the reference decode: anything the fast path does not take, with its reasons
            out = dec.decode_document(bytes(view[pos:pos + length]), source=task.source,
                                      offset=offset, kind=task.kind, split=split,
                                      taxonomy=taxonomy, verify_jpeg=ctx.verify_jpeg,
                                      max_pixels=ctx.max_picture_pixels)
            out = dedup.check(out, offset, length)
            if out.quarantine:
                quarantine.extend(out.quarantine)
            if out.product is None:
                stats["bad_documents"] += 1
                continue
            products.append(out.product)
            images[split].extend(out.images)
        if stats["documents"] != task.n_docs:
            raise IngestError(
                f"{task.source} bytes {task.start}-{task.end}: decoded {stats['documents']} "
                f"documents where the scan indexed {task.n_docs}")
        for writer in images.values():
            writer.close()
    except BaseException:
        for writer in images.values():
            writer.abort()
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
        del view
        source.close()
    t_tables = time.perf_counter()
    if products:
        write_table(storage.join(staging.products(task.kind), name), products, PRODUCTS_FILE)
    if quarantine:
        write_table(storage.join(staging.quarantine(task.kind), name), quarantine,
                    QUARANTINE_FILE)
    finished = time.perf_counter()
    write_s = sum(w.seconds for w in images.values()) + finished - t_tables
    stats["row_groups"] = {images_key(split, name): w.row_groups
                           for split, w in images.items() if w.row_groups}
    stats["task_s"] = {"read": t_read, "write": write_s,
                       "decode": finished - t0 - t_read - write_s}
    stats["started"], stats["finished"] = started, started + finished - t0
    stats["quarantine"] = dec.count_reasons(quarantine)
    counts: Dict[str, Counter] = {"products": Counter(), "images": Counter(),
                                  "images_l1": Counter()}
    for p in products:
        counts["products"][p["split"]] += 1
        counts["images"][p["split"]] += p["n_images"]
        if p["l1"] is not None and p["n_images"]:
            counts["images_l1"][(p["split"], p["l1"])] += p["n_images"]
    stats.update({key: dict(c) for key, c in counts.items()})
    stats["image_bytes"] = sum(w.nbytes for w in images.values())
    stats["products_by_source"] = {task.source: len(products)}
    stats["quarantine_by_source"] = {task.source: stats["quarantine"]}
    return stats


# ------------------------------------------------------------------------------ load
def run_ingest(spark, cfg, inputs: Sequence[str], categories: str, output: str,
               kind: str = "train", checked: Optional[CheckedIngest] = None,
               spark_start_s: Optional[float] = None) -> dict:
    """Wire extract, transform and load; returns the manifest entry for this kind. The whole
    job holds the output folder's lock (:mod:`hierarchy.ingest.lock`). ``checked``: what
    :func:`check_ingest` already returned for these arguments (else it runs here);
    ``spark_start_s``: how long the caller took to start the session, for the timings."""
    checked = checked or check_ingest(cfg, inputs, categories, output, kind)
    dataset = Dataset(output)
    with output_lock(dataset, kind, cfg["ingest"]["lock_stale_hours"]):
        return _ingest_locked(spark, cfg, checked, dataset, kind, spark_start_s)


def _load_task_modules(_) -> int:
    from hierarchy.ingest import writer  # what a decode task imports

    writer.warm_up(IMAGES_FILE)
    return 0


class _WarmWorkers:
    """A job of one small task per core, run beside the driver's scan: each Python worker
    forks, imports the decode modules and writes a row in memory (~1-2 s) while the scan
    reads the offset index, instead of after it, when the decode tasks are waiting for them.
    A failure here only costs the overlap: the decode job starts its workers itself."""

    def __init__(self, spark):
        import threading

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


def _ingest_locked(spark, cfg, checked: CheckedIngest, dataset: Dataset, kind: str,
                   spark_start_s: Optional[float]) -> dict:
    icfg = cfg["ingest"]
    progress = bool(icfg["progress"])
    t0 = time.time()
    taxonomy, files = checked.taxonomy, checked.files
    # again under the lock: another ingest may have committed since the check
    _check_taxonomy(dataset, taxonomy, checked.categories)

    warm = _WarmWorkers(spark)  # Python workers start while the driver scans
    scans = scan_inputs(files, int(icfg["max_document_mb"] * (1 << 20)), progress)
    tasks = plan_tasks(scans, kind, int(icfg["split_mb"] * (1 << 20)),
                       icfg["val_fraction"], icfg["split_seed"],
                       slots=spark.sparkContext.defaultParallelism)
    t_scan = time.time()

    staged = dataset.stage(kind)
    staging = staged.staging
    region_rows = corrupt_rows(scans)
    write_table(storage.join(staging.quarantine(kind), "part-scan.parquet"), region_rows,
                QUARANTINE_FILE)
    ctx = IngestContext(staging=staging.root, verify_jpeg=icfg["verify_jpeg"],
                        compression=icfg["compression"],
                        row_group_bytes=int(icfg["row_group_mb"] * (1 << 20)),
                        raw_decoder=bool(icfg["raw_decoder"]),
                        max_picture_pixels=int(icfg["max_picture_pixels"]))
    tax_b = spark.sparkContext.broadcast(taxonomy.to_json())

    def run_task(task: IngestTask) -> dict:
        return process_range(task, ctx, _taxonomy(tax_b.value))

    # the commit's Petastorm (and pandas) imports, ~0.25 s, while the workers still start
    from hierarchy.contracts.schema import images_unischema

    images_unischema()
    from hierarchy.spark import collect_with_progress, run_with_progress

    warmup_s = warm.join()
    t_workers = time.time()  # the scan is done; what is left of the warm-up is waited for
    results = []
    t_submit = time.time()
    if tasks:
        rdd = spark.sparkContext.parallelize(tasks, len(tasks)).map(run_task)
        results = collect_with_progress(rdd, "decode", len(tasks), progress)
    t_decode = time.time()
    task_s = {k: round(sum(r["task_s"][k] for r in results), 3)
              for k in ("read", "decode", "write")}
    # how long the first task waited for a Python worker (fork, imports) after submission
    worker_start = min((r["started"] for r in results), default=t_submit) - t_submit
    pids = [s.product_ids for s in scans]
    if duplicates.may_repeat_across_ranges(
            np.concatenate(pids) if pids else [], [t.n_docs for t in tasks]):
        results += run_with_progress(
            spark, "duplicate ids", lambda: duplicates.resolve(
                spark, staging, kind, [f.url for f in files]),
            enabled=progress)
    t_dedup = time.time()
    written: Dict[str, int] = {}
    for r in results:  # the duplicate step's rewrites come last and override
        written.update(r.get("row_groups", {}))

    counts = summarize(results, scans, region_rows)
    _refuse_empty_inputs(files, counts, staging.quarantine())
    bad = counts["bad_documents"] + counts["corrupt_regions"]
    units = counts["documents"] + counts["corrupt_regions"]
    fraction = bad / units if units else 0.0
    if fraction > icfg["max_bad_fraction"]:
        top = ", ".join(f"{k}: {v}" for k, v in Counter(counts["quarantine"]).most_common(5))
        raise IngestError(
            f"{bad} of {units} documents or regions unusable ({fraction:.2%}) is above "
            f"ingest.max_bad_fraction={icfg['max_bad_fraction']} ({top}); nothing was "
            f"committed, the quarantine is in {staging.quarantine()}")

    metadata_s = staged.commit(taxonomy, written)
    t_commit = time.time()
    counts.pop("by_source")
    entry = {
        "status": "complete",
        "inputs": [f.record() for f in files],
        "counts": counts,
        "bad_fraction": round(fraction, 6),
        "config": dict(icfg),
        "timings": {**({"spark_start_s": round(spark_start_s, 3)}
                       if spark_start_s is not None else {}),
                    "scan_s": round(t_scan - t0, 3),
                    # the workers' start beside the scan, and what the job still waited for
                    "worker_warmup_s": round(warmup_s, 3),
                    "worker_wait_s": round(t_workers - t_scan, 3),
                    "worker_start_s": round(max(0.0, worker_start), 3),
                    "decode_s": round(t_decode - t_workers, 3),
                    "tasks_s": task_s,
                    "duplicates_s": round(t_dedup - t_decode, 3),
                    "metadata_s": round(metadata_s, 3),
                    "commit_s": round(t_commit - t_dedup - metadata_s, 3),
                    "total_s": round(t_commit - t0, 3)},
        "tasks": len(tasks),
    }
    staged.record(entry)
    log.debug("ingest %s committed into %s", kind, dataset.root)
    return entry


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
