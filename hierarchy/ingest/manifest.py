"""manifest.json: what a dataset folder holds, and whether it is complete.

A kind (train or test) is marked ``committing`` before its partitions are swapped in and
``complete`` after, so an interrupted commit is never mistaken for a finished dataset: later
stages call :func:`require_complete`."""

from __future__ import annotations

import datetime as dt
from typing import Iterable

from hierarchy import storage
from hierarchy.errors import Refused
from hierarchy.taxonomy import TAXONOMY_FILE, Taxonomy

FORMAT = "hierarchy-dataset/1"


class DatasetNotReady(Refused, RuntimeError):
    """A dataset folder a stage cannot use yet: no manifest, or a kind not committed."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def input_record(f) -> dict:
    mtime = dt.datetime.fromtimestamp(f.mtime, dt.UTC).isoformat() if f.mtime else None
    return {"path": f.url, "size": f.size, "mtime": mtime}


def load_manifest(fs, path: str) -> dict:
    if storage.exists(fs, path):
        return storage.read_json(fs, path)
    return {"format": FORMAT, "kinds": {}}


def _splits(manifest: dict) -> dict:
    splits = {}
    for entry in manifest["kinds"].values():
        if entry.get("status") == "complete":
            splits.update(entry["counts"]["per_split"])
    return dict(sorted(splits.items()))


def _stamp(manifest: dict, taxonomy: Taxonomy) -> None:
    manifest["format"] = FORMAT
    manifest["taxonomy"] = {"fingerprint": taxonomy.fingerprint,
                            "level1": taxonomy.n_l1, "level2": taxonomy.n_l2,
                            "level3": taxonomy.n_l3}
    manifest["splits"] = _splits(manifest)
    manifest["updated"] = _now()


def begin_kind(fs, path: str, manifest: dict, kind: str, taxonomy: Taxonomy) -> None:
    manifest["kinds"][kind] = {"status": "committing", "started": _now()}
    _stamp(manifest, taxonomy)
    storage.write_json_atomic(fs, path, manifest)


def finish_kind(fs, path: str, manifest: dict, kind: str, entry: dict,
                taxonomy: Taxonomy) -> None:
    entry = {**entry, "finished": _now()}
    manifest["kinds"][kind] = entry
    _stamp(manifest, taxonomy)
    storage.write_json_atomic(fs, path, manifest)


def load_taxonomy(data: str) -> Taxonomy:
    """The taxonomy a dataset was ingested with (``taxonomy.json`` beside its manifest), on any
    filesystem :mod:`hierarchy.storage` knows."""
    fs, root = storage.resolve(data)
    path = storage.join(root, TAXONOMY_FILE)
    with fs.open_input_stream(path) as fh:
        return Taxonomy.from_json(fh.read().decode("utf-8"), source=path)


def require_complete(data: str, kinds: Iterable[str]) -> dict:
    """The manifest of ``data`` when every kind asked for was committed; else a clear error."""
    fs, root = storage.resolve(data)
    path = storage.join(root, "manifest.json")
    if not storage.exists(fs, path):
        raise DatasetNotReady(f"{data}: no manifest.json — run `hierarchy ingest` first")
    manifest = storage.read_json(fs, path)
    for kind in kinds:
        status = manifest.get("kinds", {}).get(kind, {}).get("status")
        if status != "complete":
            raise DatasetNotReady(
                f"{data}: the {kind} ingest is {status or 'missing'}, not complete — "
                f"re-run `hierarchy ingest --kind {kind}` into this folder"
            )
    return manifest
