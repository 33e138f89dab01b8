"""A dump of real Cdiscount pictures at any size: the official sample's documents repeated
with fresh product ids and every picture's bytes made unique, otherwise byte for byte (same
JPEG encoders and sizes, same pixels, same field order and types).

    .venv/bin/python bench/real_dump.py OUT.bson [--mb 1024] [--sample PATH]

The official train_example.bson holds 82 products and 110 pictures (631 KB): too small to time
anything, but its pictures are the real distribution of sizes and JPEG encoders, unlike the
synthetic catalog's. The product id is the document's first field (an int32, as in the real
dump); copy k of product p gets id k * 1000 + p, so ids stay unique and in int32.

Pictures are unique as in a real dump: copy k writes 1 + k // 65535 and 1 + k % 65535 into
each picture's JFIF pixel-density fields (APP0 metadata; decoders ignore it). Repeated byte
for byte, 1584 copies of 110 pictures let Parquet's dictionary encoding store a 1 GB image
column in 7 MB, and a benchmark of that measures no write at all.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "cdiscount" / "train_example.bson"
ID_STRIDE = 1000


def sample_documents(path: Path) -> list:
    raw = path.read_bytes()
    docs, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<i", raw, pos)
        doc = raw[pos:pos + n]
        if doc[4:9] != b"\x10_id\x00" or struct.unpack_from("<i", doc, 9)[0] >= ID_STRIDE:
            raise ValueError(f"{path} at {pos}: expected an int32 _id < {ID_STRIDE} first")
        docs.append(doc)
        pos += n
    return docs


FORMAT = 2  # 2: unique pictures (1: the sample's JPEGs repeated byte for byte)
_JFIF = b"\xff\xd8\xff\xe0"  # SOI, APP0; then length (2), "JFIF\0", version, units, densities
_DENSITY = struct.Struct(">HH")


def density_offsets(doc: bytes) -> list:
    """Where, in one document, each picture's JFIF X/Y density fields are."""
    import bson

    where, start = [], 0
    for pic in bson.decode(doc)["imgs"]:
        data = pic["picture"]
        at = doc.index(data, start)
        start = at + len(data)
        if data[:4] == _JFIF and data[6:11] == b"JFIF\x00":
            where.append(at + 14)
    return where


def write_dump(out: Path, megabytes: float, sample: Path = SAMPLE) -> dict:
    """Write ``out`` (reused when its stamp says this call would write the same)."""
    docs = sample_documents(sample)
    per_copy = sum(len(d) for d in docs)
    copies = max(1, int(megabytes * 1e6 // per_copy))
    size = copies * per_copy
    patches = [density_offsets(d) for d in docs]
    info = {"path": str(out), "bytes": size, "copies": copies, "products": copies * len(docs),
            "sample": str(sample), "format": FORMAT,
            "pictures": copies * sum(map(len, patches))}
    stamp = out.with_suffix(".json")
    if out.exists() and out.stat().st_size == size and stamp.exists() \
            and json.loads(stamp.read_text()) == info:
        return info
    stamp.unlink(missing_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for k in range(copies):
            density = _DENSITY.pack(1 + k // 65535, 1 + k % 65535)
            for doc, offsets in zip(docs, patches):
                buf = bytearray(doc)
                struct.pack_into("<i", buf, 9, k * ID_STRIDE + struct.unpack_from("<i", doc, 9)[0])
                for at in offsets:
                    buf[at:at + 4] = density
                fh.write(buf)
    tmp.replace(out)
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mb", type=float, default=1024.0, help="size in 10^6 bytes (1024)")
    p.add_argument("--sample", type=Path, default=SAMPLE)
    args = p.parse_args(argv)
    print(write_dump(args.out, args.mb, args.sample))
    return 0


if __name__ == "__main__":
    sys.exit(main())
