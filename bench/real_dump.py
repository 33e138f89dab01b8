"""A dump of real Cdiscount pictures at any size: the official sample's documents repeated
with fresh product ids, byte for byte otherwise (same JPEGs, same field order and types).

    .venv/bin/python bench/real_dump.py OUT.bson [--mb 1024] [--sample PATH]

The official train_example.bson holds 82 products and 113 pictures (631 KB): too small to time
anything, but its pictures are the real distribution of sizes and JPEG encoders, unlike the
synthetic catalog's. The product id is the document's first field (an int32, as in the real
dump); copy k of product p gets id k * 1000 + p, so ids stay unique and in int32.
"""

from __future__ import annotations

import argparse
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


def write_dump(out: Path, megabytes: float, sample: Path = SAMPLE) -> dict:
    """Write ``out`` (reused when it already has the size this call would write)."""
    docs = sample_documents(sample)
    per_copy = sum(len(d) for d in docs)
    copies = max(1, int(megabytes * 1e6 // per_copy))
    size = copies * per_copy
    info = {"path": str(out), "bytes": size, "copies": copies, "products": copies * len(docs),
            "sample": str(sample)}
    if out.exists() and out.stat().st_size == size:
        return info
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for k in range(copies):
            for doc in docs:
                buf = bytearray(doc)
                struct.pack_into("<i", buf, 9, k * ID_STRIDE + struct.unpack_from("<i", doc, 9)[0])
                fh.write(buf)
    tmp.replace(out)
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
