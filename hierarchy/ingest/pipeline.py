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

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from hierarchy import storage
from hierarchy.dataset import KIND_SPLITS, SPLITS, Dataset
from hierarchy.errors import Refused, UsageError
from hierarchy.ingest import decode as dec
from hierarchy.ingest import duplicates
from hierarchy.ingest.lock import check_unlocked, output_lock
from hierarchy.ingest.scan import ScanResult, cut_ranges, scan_stream
from hierarchy.ingest.schema import IMAGES_FILE, PRODUCTS_FILE, QUARANTINE_FILE
from hierarchy.ingest.split import assign_splits
from hierarchy.ingest.writer import PartWriter, write_table
from hierarchy.taxonomy import Taxonomy

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
    splits: bytes      # one code per document: an index into hierarchy.dataset.SPLITS


@dataclass(frozen=True)
class IngestContext:
    """What every task of one ingest shares (shipped once in the task closure)."""

    staging: str
    verify_jpeg: str
    compression: str
    row_group_bytes: int


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
            fs, path = storage.resolve(f.url)
            with fs.open_input_file(path) as fh:
                results.append(scan_stream(fh, f.size, f.url, max_document, progress=bar.update))
    return results


def plan_tasks(scans: Sequence[ScanResult], kind: str, split_bytes: int, val_fraction: float,
               seed: int) -> List[IngestTask]:
    """One task per byte range; each carries the split code of each of its documents."""
    import numpy as np

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


def process_range(task: IngestTask, ctx: IngestContext, taxonomy: Taxonomy) -> dict:
    """Decode one byte range and write its part files; returns small counts for the manifest."""
    fs, path = storage.resolve(task.source)
    with fs.open_input_file(path) as fh:
        data = fh.read_at(task.end - task.start, task.start)
    staging = Dataset(ctx.staging)
    name = duplicates.part_name(task.range_id)
    images = {
        split: PartWriter(storage.join(staging.images(split), name), IMAGES_FILE,
                          ctx.compression, ctx.row_group_bytes, "nbytes")
        for split in KIND_SPLITS[task.kind]
    }
    products: List[dict] = []
    quarantine: List[dict] = []
    stats = {"documents": 0, "bad_documents": 0, "image_bytes": 0,
             "products": Counter(), "images": Counter(), "images_l1": Counter()}
    dedup = duplicates.RangeDeduplicator(task.source)
    try:
        for i, (offset, raw) in enumerate(dec.iter_documents(data, task.start)):
            split = SPLITS[task.splits[i]]
            out = dec.decode_document(raw, source=task.source, offset=offset, kind=task.kind,
                                      split=split, taxonomy=taxonomy,
                                      verify_jpeg=ctx.verify_jpeg)
            out = dedup.check(out, offset, len(raw))
            stats["documents"] += 1
            quarantine.extend(out.quarantine)
            if out.product is None:
                stats["bad_documents"] += 1
                continue
            products.append(out.product)
            stats["products"][split] += 1
            for img in out.images:
                split_of_img = img.pop("split")
                images[split_of_img].add(img)
                stats["images"][split_of_img] += 1
                if img["l1"] is not None:
                    stats["images_l1"][(split_of_img, img["l1"])] += 1
                stats["image_bytes"] += img["nbytes"]
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
    if products:
        write_table(storage.join(staging.products(task.kind), name), products, PRODUCTS_FILE)
    if quarantine:
        write_table(storage.join(staging.quarantine(task.kind), name), quarantine,
                    QUARANTINE_FILE)
    stats["quarantine"] = dec.count_reasons(quarantine)
    for key in ("products", "images", "images_l1"):
        stats[key] = dict(stats[key])
    stats["products_by_source"] = {task.source: len(products)}
    stats["quarantine_by_source"] = {task.source: stats["quarantine"]}
    return stats


# ------------------------------------------------------------------------------ load
def write_petastorm_metadata(spark, dataset: Dataset) -> None:
    """(Re)generate the Unischema and row-group metadata over every split of images/."""
    import warnings

    from petastorm.etl.dataset_metadata import materialize_dataset

    from hierarchy.ingest.unischema import ImagesSchema

    with warnings.catch_warnings():
        # petastorm 0.13.1 uses pyarrow's legacy dataset API (pinned for it): silence its
        # deprecation chatter, which says nothing a user can act on
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with materialize_dataset(spark, dataset.url("images"), ImagesSchema):
            pass  # the tasks already wrote the parts; only the metadata is made here


def commit(spark, dataset: Dataset, staging: Dataset, kind: str) -> None:
    for split in KIND_SPLITS[kind]:
        storage.replace(staging.images(split), dataset.images(split))
    storage.replace(staging.products(kind), dataset.products(kind))
    storage.replace(staging.quarantine(kind), dataset.quarantine(kind))
    if storage.exists(dataset.images()):
        write_petastorm_metadata(spark, dataset)


def run_ingest(spark, cfg, inputs: Sequence[str], categories: str, output: str,
               kind: str = "train", checked: Optional[CheckedIngest] = None) -> dict:
    """Wire extract, transform and load; returns the manifest entry for this kind. The whole
    job holds the output folder's lock (:mod:`hierarchy.ingest.lock`). ``checked``: what
    :func:`check_ingest` already returned for these arguments (else it runs here)."""
    checked = checked or check_ingest(cfg, inputs, categories, output, kind)
    dataset = Dataset(output)
    with output_lock(dataset, kind, cfg["ingest"]["lock_stale_hours"]):
        return _ingest_locked(spark, cfg, checked, dataset, kind)


def _ingest_locked(spark, cfg, checked: CheckedIngest, dataset: Dataset, kind: str) -> dict:
    icfg = cfg["ingest"]
    progress = bool(icfg["progress"])
    t0 = time.time()
    taxonomy, files = checked.taxonomy, checked.files
    # again under the lock: another ingest may have committed since the check
    _check_taxonomy(dataset, taxonomy, checked.categories)

    scans = scan_inputs(files, int(icfg["max_document_mb"] * (1 << 20)), progress)
    tasks = plan_tasks(scans, kind, int(icfg["split_mb"] * (1 << 20)),
                       icfg["val_fraction"], icfg["split_seed"])
    t_scan = time.time()

    for name, location, _ in storage.list_dir(dataset.staging().root):
        if name.startswith(f"{kind}-"):
            storage.remove(location)
    staging = dataset.staging(f"{kind}-{uuid.uuid4().hex[:12]}")
    region_rows = corrupt_rows(scans)
    write_table(storage.join(staging.quarantine(kind), "part-scan.parquet"), region_rows,
                QUARANTINE_FILE)
    ctx = IngestContext(staging=staging.root, verify_jpeg=icfg["verify_jpeg"],
                        compression=icfg["compression"],
                        row_group_bytes=int(icfg["row_group_mb"] * (1 << 20)))
    tax_b = spark.sparkContext.broadcast(taxonomy.to_json())

    def run_task(task: IngestTask) -> dict:
        return process_range(task, ctx, _taxonomy(tax_b.value))

    from hierarchy.spark import collect_with_progress, run_with_progress

    results = []
    if tasks:
        rdd = spark.sparkContext.parallelize(tasks, len(tasks)).map(run_task)
        results = collect_with_progress(rdd, "decode", len(tasks), progress)
    t_decode = time.time()
    if len(tasks) > 1:  # one range: its task already kept the first of each id
        results += run_with_progress(
            spark, "duplicate ids", lambda: duplicates.resolve(
                spark, staging, kind, [f.url for f in files]),
            enabled=progress)
    t_dedup = time.time()

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

    manifest = dataset.manifest()
    dataset.begin_kind(manifest, kind, taxonomy)
    commit(spark, dataset, staging, kind)
    dataset.write_taxonomy(taxonomy)
    storage.remove(staging.root)
    if not storage.list_dir(dataset.staging().root):
        storage.remove(dataset.staging().root)
    t_commit = time.time()
    counts.pop("by_source")
    entry = {
        "status": "complete",
        "inputs": [f.record() for f in files],
        "counts": counts,
        "bad_fraction": round(fraction, 6),
        "config": dict(icfg),
        "timings": {"scan_s": round(t_scan - t0, 3), "decode_s": round(t_decode - t_scan, 3),
                    "duplicates_s": round(t_dedup - t_decode, 3),
                    "commit_s": round(t_commit - t_dedup, 3),
                    "total_s": round(t_commit - t0, 3)},
        "tasks": len(tasks),
    }
    dataset.finish_kind(manifest, kind, entry, taxonomy)
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
