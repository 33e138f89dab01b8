"""What one ingest task runs on an executor: decode its byte range of a BSON dump into the
staging folder's part files (pictures, products, quarantine) and count what it did. The
driver's side (check, scan, plan, commit) is :mod:`hierarchy.ingest.pipeline`."""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import KIND_SPLITS, SPLITS, Dataset
from hierarchy.contracts.errors import Refused
from hierarchy.contracts.schema import IMAGES_FILE, PRODUCTS_FILE, QUARANTINE_FILE, images_key
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.ingest import decode as dec
from hierarchy.ingest import duplicates, rawdoc
from hierarchy.ingest.writer import PartWriter, write_table


class IngestError(Refused, RuntimeError):
    """The job refused to commit (bad input above the threshold, an input without a usable
    document, taxonomy mismatch...)."""


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


_TAXONOMY_CACHE: Dict[str, Taxonomy] = {}


def cached_taxonomy(text: str) -> Taxonomy:
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


def _writers(task: IngestTask, ctx: IngestContext, name: str) -> Dict[str, PartWriter]:
    staging = Dataset(ctx.staging)
    return {split: PartWriter(storage.join(staging.images(split), name), IMAGES_FILE,
                              ctx.compression, ctx.row_group_bytes, "nbytes")
            for split in KIND_SPLITS[task.kind]}


def _decode_range(task: IngestTask, ctx: IngestContext, taxonomy: Taxonomy, source: _Range,
                  images: Dict[str, PartWriter], products: List[dict],
                  quarantine: List[dict]) -> Dict[str, int]:
    """Every document of the range into the writers, the product rows and the quarantine;
    returns the document counts."""
    data = source.data
    view = memoryview(data)
    stats = {"documents": 0, "bad_documents": 0}
    dedup = duplicates.RangeDeduplicator(task.source)
    fast = ctx.raw_decoder and ctx.verify_jpeg == "markers"
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
    finally:
        del view
    if stats["documents"] != task.n_docs:
        raise IngestError(
            f"{task.source} bytes {task.start}-{task.end}: decoded {stats['documents']} "
            f"documents where the scan indexed {task.n_docs}")
    return stats


def _counts(task: IngestTask, products: List[dict], quarantine: List[dict],
            images: Dict[str, PartWriter], name: str) -> dict:
    """The task's share of the manifest's counts (products, pictures per split and branch)."""
    counts: Dict[str, Counter] = {"products": Counter(), "images": Counter(),
                                  "images_l1": Counter()}
    for p in products:
        counts["products"][p["split"]] += 1
        counts["images"][p["split"]] += p["n_images"]
        if p["l1"] is not None and p["n_images"]:
            counts["images_l1"][(p["split"], p["l1"])] += p["n_images"]
    reasons = dec.count_reasons(quarantine)
    return {"row_groups": {images_key(split, name): w.row_groups
                           for split, w in images.items() if w.row_groups},
            "quarantine": reasons,
            **{key: dict(c) for key, c in counts.items()},
            "image_bytes": sum(w.nbytes for w in images.values()),
            "products_by_source": {task.source: len(products)},
            "quarantine_by_source": {task.source: reasons}}


def process_range(task: IngestTask, ctx: IngestContext, taxonomy: Taxonomy) -> dict:
    """Decode one byte range and write its part files; returns small counts for the manifest."""
    started = time.time()
    t0 = time.perf_counter()
    source = _Range(task.source, task.start, task.end - task.start)
    t_read = time.perf_counter() - t0
    name = duplicates.part_name(task.range_id)
    images = _writers(task, ctx, name)
    products: List[dict] = []
    quarantine: List[dict] = []
    # the loop makes no reference cycles (refcounting frees everything), while the cyclic
    # collector would walk every picture slice and row it holds, ~5 % of a task
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        stats = _decode_range(task, ctx, taxonomy, source, images, products, quarantine)
        for writer in images.values():
            writer.close()
    except BaseException:
        for writer in images.values():
            writer.abort()
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
        source.close()
    t_tables = time.perf_counter()
    staging = Dataset(ctx.staging)
    if products:
        write_table(storage.join(staging.products(task.kind), name), products, PRODUCTS_FILE)
    if quarantine:
        write_table(storage.join(staging.quarantine(task.kind), name), quarantine,
                    QUARANTINE_FILE)
    finished = time.perf_counter()
    write_s = sum(w.seconds for w in images.values()) + finished - t_tables
    stats["task_s"] = {"read": t_read, "write": write_s,
                       "decode": finished - t0 - t_read - write_s}
    stats["started"], stats["finished"] = started, started + finished - t0
    stats.update(_counts(task, products, quarantine, images, name))
    return stats
