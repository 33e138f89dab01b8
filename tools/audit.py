"""Audit the installed Python packages against a local copy of security advisories.

    .venv/bin/python tools/audit.py                 # `make audit` (and `make lint`)
    .venv/bin/python tools/audit.py --refresh DIR   # rebuild the copy from a checkout of
                                                    # github.com/pypa/advisory-database

Why a copy: pip-audit asks PyPI's per-release JSON API or OSV, and neither answers on the
machines this project is built on (only the package indexes do). The copy is
``requirements/advisories.json``: the OSV records of PyPA's advisory database for every
package installed here, plus advisories recorded by hand from a report (each says its
source). Every installed distribution whose version an advisory covers is a finding, unless
``requirements/audit-accepted.txt`` names the advisory with the reason it cannot be fixed in
the pinned stack. Exit 1 on an unaccepted finding.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
COPY = ROOT / "requirements" / "advisories.json"
ACCEPTED = ROOT / "requirements" / "audit-accepted.txt"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict:
    return {normalized(d.metadata["Name"]): d.version for d in metadata.distributions()
            if d.metadata["Name"]}


def covers(affected: dict, version: str) -> bool:
    """Whether an OSV ``affected`` entry covers ``version`` (its explicit list, or an
    ECOSYSTEM range: introduced <= v < fixed, or <= last_affected)."""
    if version in affected.get("versions", ()):
        return True
    try:
        v = Version(version)
    except InvalidVersion:
        return False
    for rng in affected.get("ranges", ()):
        if rng.get("type") != "ECOSYSTEM":
            continue
        low = None
        for event in rng.get("events", ()):
            if "introduced" in event:
                low = Version("0") if event["introduced"] == "0" else Version(event["introduced"])
            elif low is not None and "fixed" in event:
                if low <= v < Version(event["fixed"]):
                    return True
                low = None
            elif low is not None and "last_affected" in event:
                if low <= v <= Version(event["last_affected"]):
                    return True
                low = None
        if low is not None and v >= low:
            return True
    return False


def fixed_in(affected: dict) -> str:
    fixes = [e["fixed"] for r in affected.get("ranges", ()) if r.get("type") == "ECOSYSTEM"
             for e in r.get("events", ()) if "fixed" in e]
    return ", ".join(fixes) or "no fixed release recorded"


def accepted() -> dict:
    out = {}
    if ACCEPTED.exists():
        for line in ACCEPTED.read_text().splitlines():
            line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line
            if line.strip():
                ident, _, why = line.partition(" ")
                out[ident.strip()] = why.strip()
    return out


def audit() -> int:
    copy = json.loads(COPY.read_text())
    have = installed()
    ok = accepted()
    findings = used = 0
    for adv in copy["advisories"]:
        for aff in adv["affected"]:
            name = normalized(aff["package"]["name"])
            if name in have and covers(aff, have[name]):
                names = [adv["id"], *adv.get("aliases", ())]
                hit = next((n for n in names if n in ok), None)
                tag = f"accepted ({ok[hit]})" if hit else "FINDING"
                findings += hit is None
                used += hit is not None
                print(f"{tag}: {name} {have[name]}: {', '.join(names)} — fixed in "
                      f"{fixed_in(aff)}: {adv.get('summary', '')[:100]}")
    print(f"audit: {len(have)} installed distributions against {len(copy['advisories'])} "
          f"advisories ({copy['source']}): {findings} finding(s), {used} accepted")
    return 1 if findings else 0


def _affected(entry: dict) -> dict:
    """An OSV ``affected`` entry as the copy keeps it: the ECOSYSTEM ranges, and the list of
    versions only where there is no range (the lists make most of the database's size)."""
    ranges = [r for r in entry.get("ranges", ()) if r.get("type") == "ECOSYSTEM"]
    return {"package": {k: entry["package"][k] for k in ("name", "ecosystem")},
            "ranges": ranges, "versions": [] if ranges else entry.get("versions", [])}


def refresh(checkout: Path) -> int:
    import yaml

    have = installed()
    keep = []
    for name in sorted(have):
        folder = checkout / "vulns" / name
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            rec = yaml.safe_load(path.read_text())
            summary = rec.get("summary") or (rec.get("details") or "").split("\n")[0]
            keep.append({"id": rec["id"], "aliases": rec.get("aliases") or [],
                         "summary": summary.strip(), "source": "pypa/advisory-database",
                         "affected": [_affected(a) for a in rec.get("affected", ())]})
    commit = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%H %cs"],
                            capture_output=True, text=True).stdout.strip()
    old = json.loads(COPY.read_text()) if COPY.exists() else {"advisories": []}
    by_hand = [a for a in old["advisories"] if a.get("source") != "pypa/advisory-database"]
    COPY.write_text(json.dumps({
        "source": f"pypa/advisory-database {commit} + {len(by_hand)} recorded by hand",
        "advisories": keep + by_hand}, indent=1) + "\n")
    print(f"{COPY}: {len(keep)} advisories of {len(have)} installed packages, "
          f"{len(by_hand)} kept from the hand-recorded ones")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refresh", type=Path, metavar="DIR",
                    help="a checkout of github.com/pypa/advisory-database")
    args = ap.parse_args()
    return refresh(args.refresh) if args.refresh else audit()


if __name__ == "__main__":
    sys.exit(main())
