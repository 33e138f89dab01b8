import bson
import numpy as np
import pytest
from corrupt import bad_inner_document, catalogue_of_failures, lying_length, split_docs

from hierarchy.ingest.scan import NO_VALUE, cut_ranges, scan_bytes


def test_real_sample_indexes_every_document(real_bson):
    data = real_bson.read_bytes()
    r = scan_bytes(data)
    decoded = list(bson.decode_file_iter(open(real_bson, "rb")))
    assert r.n_documents == 82 and not r.corrupt
    assert r.product_ids.tolist() == [d["_id"] for d in decoded]
    assert r.category_ids.tolist() == [d["category_id"] for d in decoded]
    assert int(r.offsets[-1] + r.lengths[-1]) == len(data)


def test_every_failure_is_a_region_and_good_documents_survive(real_bson):
    docs = split_docs(real_bson.read_bytes())
    data, _ = catalogue_of_failures(docs, 1000010653)
    r = scan_bytes(data)
    reasons = sorted(c.reason for c in r.corrupt)
    assert reasons == ["bad_length", "garbage", "truncated"]
    # good documents and the ones only the decoder can judge are all indexed
    assert r.n_documents == 12
    starts = {data[o:o + n] for o, n in zip(r.offsets.tolist(), r.lengths.tolist())}
    for i in (0, 1, 2, 4, 6, 7):
        assert docs[i] in starts
    assert bad_inner_document(docs[5]) in starts
    assert all("offset" in c.detail or "end of the file" in c.detail for c in r.corrupt)


def test_lying_lengths_shorter_and_longer_lose_only_that_document(real_bson):
    docs = split_docs(real_bson.read_bytes())
    for delta in (-100, +3, +10_000, +10**9):
        data = b"".join(docs[:5] + [lying_length(docs[5], delta)] + docs[6:])
        r = scan_bytes(data)
        assert r.n_documents == 81, delta
        assert [c.reason for c in r.corrupt] == ["bad_length"]
        assert r.corrupt[0].offset == sum(map(len, docs[:5]))


def test_zeroed_region_and_empty_file():
    assert scan_bytes(b"").n_documents == 0
    assert scan_bytes(b"\x00" * 100).corrupt[0].reason == "garbage"


def test_ids_not_at_the_usual_place_are_left_to_the_decoder():
    doc = bson.encode({"imgs": [], "category_id": 5})
    good = bson.encode({"_id": 4, "imgs": [], "category_id": 6})
    r = scan_bytes(good + doc + good)
    # a document without a leading _id looks like garbage to the scanner (mongodump order)
    assert r.product_ids.tolist() == [4, 4]
    assert [c.reason for c in r.corrupt] == ["garbage"]
    r = scan_bytes(bson.encode({"_id": 4, "imgs": [], "other": 1}))
    assert r.category_ids.tolist() == [NO_VALUE]


def test_ranges_are_contiguous_cover_everything_and_skip_regions(real_bson):
    docs = split_docs(real_bson.read_bytes())
    data = b"".join(docs[:40]) + b"garbage!" * 10 + b"".join(docs[40:])
    r = scan_bytes(data)
    ranges = cut_ranges(r, 50_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == r.n_documents
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert any(end == 40 for _, end in ranges)  # a range stops before the garbage
    sizes = [int(r.lengths[a:b].sum()) for a, b in ranges]
    assert max(sizes) < 50_000 + int(np.max(r.lengths))


def test_task_ranges_come_in_whole_waves_of_the_cluster_slots(real_bson):
    from hierarchy.ingest.pipeline import even_split_bytes, plan_tasks

    assert even_split_bytes(1000, 64, 2) == 63          # 16 ranges, not 15 (of 64 + a rest)
    assert even_split_bytes(1000, 2000, 4) == 250      # a small input still uses every slot
    assert even_split_bytes(1000, 64, 1) == 64
    assert even_split_bytes(0, 64, 8) == 64
    r = scan_bytes(real_bson.read_bytes() * 9)
    total = int(r.lengths.sum())
    for slots in (2, 3, 4, 5):
        for parts in (3, 7, 11):
            tasks = plan_tasks([r], "train", total // parts, 0.1, 1, slots=slots)
            assert len(tasks) % slots == 0 and len(tasks) >= parts, (slots, parts, len(tasks))
            assert sum(t.n_docs for t in tasks) == r.n_documents


@pytest.mark.parametrize("run_bytes", [1 << 28, 20000, 1])
def test_mapped_scan_and_streamed_scan_agree_on_fuzzed_dumps(real_bson, monkeypatch,
                                                              run_bytes):
    """A local file is scanned in place (length chains checked vectorised in batches of
    ``run_bytes``, the full checks where they stop), a remote one through the sliding window:
    the same index and regions, damage or not, wherever a batch ends."""
    import io

    from fuzz import junk_file, mutate

    from hierarchy.ingest import scan
    from hierarchy.ingest.scan import scan_stream

    monkeypatch.setattr(scan, "_RUN_BYTES", run_bytes)

    good = real_bson.read_bytes()
    dumps = [good, junk_file(1, 3000)] + [mutate(good, seed, 1 + seed % 6).bytes()
                                          for seed in range(40)]
    for data in dumps:
        mapped = scan_bytes(data)
        streamed = scan_stream(io.BytesIO(data), len(data), "<bytes>")
        for field in ("offsets", "lengths", "product_ids", "category_ids"):
            assert (getattr(mapped, field) == getattr(streamed, field)).all(), field
        assert mapped.corrupt == streamed.corrupt
