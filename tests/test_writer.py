"""The ingest tasks' Arrow columns, built from buffers, against pyarrow's own conversion."""

import hashlib
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from hierarchy.ingest.writer import _array

CASES = [
    (pa.int64(), [1, None, -(2 ** 63), 2 ** 63 - 1]),
    (pa.int32(), [2 ** 31 - 1, -(2 ** 31), None, None]),
    (pa.int32(), [None, None]),
    (pa.int64(), []),
    (pa.float64(), [1.5, None, -0.0]),
    (pa.string(), ["0123abcd", None, ""]),
    (pa.string(), ["café", None, "日本", "x"]),   # more bytes than characters
    (pa.string(), []),
    (pa.binary(), [b"\xff\xd8", None, memoryview(b"..\xff\xd9..")[2:4], b""]),
    (pa.binary(), [memoryview(b"abc"), memoryview(b"")]),
]


@pytest.mark.parametrize("type_,values", CASES)
def test_columns_equal_pyarrows_conversion(type_, values):
    got = _array(values, type_)
    got.validate(full=True)
    plain = [bytes(v) if isinstance(v, memoryview) else v for v in values]
    assert got.equals(pa.array(plain, type_)), got


@pytest.mark.parametrize("type_,value", [(pa.int32(), 2 ** 31), (pa.int32(), -(2 ** 31) - 1),
                                         (pa.int64(), 2 ** 63)])
def test_an_out_of_range_integer_is_refused_not_wrapped(type_, value):
    with pytest.raises(OverflowError):
        _array([1, value], type_)


def test_a_task_writes_its_tables_without_importing_pandas(tmp_path):
    """What a decode task writes (images through PartWriter, products and quarantine through
    write_table), in a fresh interpreter: the files read back as written, and pandas — ~0.2 s
    of each Python worker's first task when pyarrow converts a list — was never imported."""
    script = textwrap.dedent(f"""
        import sys
        from hierarchy.contracts.schema import IMAGES_FILE, QUARANTINE_FILE
        from hierarchy.ingest.writer import PartWriter, write_table
        w = PartWriter({str(tmp_path / 'images.parquet')!r}, IMAGES_FILE, "none", 1 << 20,
                       "nbytes")
        w.add_pictures(7, 1000, 1, 2, 3, [memoryview(b"\\xff\\xd8jpeg\\xff\\xd9"), b"\\xff\\xd9"])
        w.close()
        write_table({str(tmp_path / 'quarantine.parquet')!r}, [dict(
            source="f.bson", offset=0, length=9, product_id=None, img_idx=None,
            level="document", reason="garbage", detail="é")], QUARANTINE_FILE)
        print("pandas" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False"]
    import pyarrow.parquet as pq

    images = pq.read_table(tmp_path / "images.parquet").to_pydict()
    assert images["jpeg"] == [b"\xff\xd8jpeg\xff\xd9", b"\xff\xd9"]
    assert images["img_idx"] == [0, 1] and images["l3"] == [3, 3]
    assert images["md5"] == [hashlib.md5(j).hexdigest() for j in images["jpeg"]]
    rows = pq.read_table(tmp_path / "quarantine.parquet").to_pylist()
    assert rows == [dict(source="f.bson", offset=0, length=9, product_id=None, img_idx=None,
                         level="document", reason="garbage", detail="é")]
