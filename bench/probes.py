"""A careless or hostile user's campaign over every command and endpoint of a demo run.

    .venv/bin/python bench/probes.py [--root data/demo] [--keep]

Works on a copy of a demo data root (`make demo` first; the original is only read, and
checked to be unchanged at the end). Every CLI probe is a command that must be refused:
exit 2 or 3, one line on stderr (under argparse's usage block for a bad command line), no
traceback, and nothing the copy holds changed (the
manifest and every part, run.json and the models, the predictions table's files, the
curation and review tables: their digests before and after each probe). The HTTP probes go
to a real `hierarchy serve --data` (the classify API and the review page's API): each must be
answered 4xx, never 500, with no server path in the answer, no review written, and the
server still ready after. Prints the count of probes, tracebacks and silent changes, and
writes bench/results/probes.json. Nothing is asserted: the figures are the result.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results" / "probes.json"
# what a refusal may not touch (the Derby metastore and the logs change on every job)
WATCHED = ("dataset", "models", "warehouse/predictions", "output/submission.csv")


def say(text: str) -> None:
    print(text, flush=True)


def state(root: Path) -> dict:
    """{file: sha256} of everything a refused job must leave as it was."""
    out = {}
    for top in WATCHED:
        base = root / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            if "mlruns" in f.parts or "_staging" in f.parts or f.name.startswith("."):
                continue
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def flip(path: Path, at: float = 0.5, n: int = 4096) -> bytes:
    """4 KiB XORed at the same size; returns the original bytes."""
    whole = path.read_bytes()
    i = int(len(whole) * at)
    path.write_bytes(whole[:i] + bytes(b ^ 0x5A for b in whole[i:i + n]) + whole[i + n:])
    return whole


def said(stderr: str) -> list:
    """stderr's lines without argparse's usage block (``usage:`` and its indented
    continuation), which every argparse CLI prints above its one error line."""
    lines, usage = [], False
    for line in stderr.splitlines():
        usage = line.startswith("usage:") or (usage and line.startswith(" "))
        if line.strip() and not usage:
            lines.append(line)
    return lines


class Campaign:
    def __init__(self, copy: Path):
        self.copy = copy
        self.conf = [f"paths.root={copy}", "-q"]
        self.rows: list = []

    def cli(self, name: str, *argv: str, expect=(2, 3), conf: bool = True,
            changes=None) -> None:
        """Run one refused command; ``changes``: a callable that damages the copy first and
        returns the repair (called after)."""
        repair = changes() if changes else None
        before = state(self.copy)
        t0 = time.time()
        try:
            proc = subprocess.run([str(BIN / "hierarchy"), *argv,
                                   *(self.conf if conf else [])], cwd=self.copy,
                                  capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired as exc:  # e.g. a server that started serving
            proc = subprocess.CompletedProcess(argv, 0, exc.stdout or "",
                                               "accepted: still running after 600 s")
        after = state(self.copy)
        if repair:
            repair()
        err = said(proc.stderr)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        row = {"probe": name, "kind": "cli", "argv": " ".join(argv), "exit": proc.returncode,
               "seconds": round(time.time() - t0, 1), "stderr_lines": len(err),
               "traceback": "Traceback" in proc.stderr or proc.returncode == 1,
               "silent": proc.returncode == 0 or bool(changed), "changed": changed[:5],
               "ok": proc.returncode in expect and len(err) == 1 and not changed,
               "line": err[-1][:300] if err else ""}
        self.rows.append(row)
        say(f"{'ok ' if row['ok'] else 'BAD'} {row['exit']} {name}: {row['line'][:150]}")

    def http(self, name: str, method: str, path: str, url: str, paths_seen=(), **kw) -> None:
        import requests

        try:
            r = requests.request(method, url + path, timeout=60, **kw)
            status, text = r.status_code, r.text
        except requests.RequestException as exc:
            status, text = 0, f"{type(exc).__name__}: {exc}"
        leaked = [p for p in paths_seen if p in text]
        row = {"probe": name, "kind": "http", "path": path, "status": status,
               "traceback": status >= 500 or "Traceback" in text, "silent": False,
               "leaked_path": bool(leaked),
               "ok": 400 <= status < 500 and not leaked, "line": text[:200]}
        self.rows.append(row)
        say(f"{'ok ' if row['ok'] else 'BAD'} {status} {name}: {text[:120]}")


def cli_probes(c: Campaign) -> None:
    copy = c.copy
    ds, models, out = "dataset", "models", "output"
    cats = str(copy / "synth" / "category_names.csv")
    bad = copy / "_probe"
    bad.mkdir(exist_ok=True)
    (bad / "junk.bson").write_bytes(os.urandom(4096))
    rows = (copy / "synth" / "category_names.csv").read_text().splitlines()
    for name, body in {
        "dup_ids": rows + [rows[1]],
        "two_parents": rows + [rows[1].split(",")[0] + ",X,Y,Z"],
        "empty_level": [rows[0], rows[1].rsplit(",", 1)[0] + ","],
        "other_tree": [rows[0], "1,A,B,C", "2,A,B,D"],
    }.items():
        (bad / f"{name}.csv").write_text("\n".join(body) + "\n")
    (bad / "dup.yaml").write_text("train:\n  epochs: 3\n  epochs: 5\n")
    (bad / "notyaml.yaml").write_text("train: [1\n")
    train = str(copy / "synth" / "train.bson")
    # ingest
    c.cli("ingest: a missing input", "ingest", "--input", "nope.bson", "--categories", cats,
          "--output", ds)
    c.cli("ingest: a folder as input", "ingest", "--input", str(bad), "--categories", cats,
          "--output", ds)
    c.cli("ingest: random bytes as BSON", "ingest", "--input", str(bad / "junk.bson"),
          "--categories", cats, "--output", ds, "--kind", "test")
    for name in ("dup_ids", "two_parents", "empty_level"):
        c.cli(f"ingest: a category table with {name}", "ingest", "--input", train,
              "--categories", str(bad / f"{name}.csv"), "--output", ds)
    c.cli("ingest --append: another taxonomy", "ingest", "--input", train, "--categories",
          str(bad / "other_tree.csv"), "--output", ds, "--append")
    c.cli("ingest: an unknown kind", "ingest", "--input", train, "--categories", cats,
          "--output", ds, "--kind", "nope")
    # synth
    c.cli("synth: --taxonomy a folder", "synth", "--output", str(bad / "s"), "--taxonomy",
          str(bad))
    c.cli("synth: --taxonomy missing", "synth", "--output", str(bad / "s"), "--taxonomy",
          "nope.csv")
    c.cli("synth: --products 0", "synth", "--output", str(bad / "s"), "--products", "0")
    # configuration
    for name, extra in (("duplicate YAML keys", ["--config", str(bad / "dup.yaml")]),
                        ("not YAML", ["--config", str(bad / "notyaml.yaml")]),
                        ("an unknown key", ["train.nope=1"]),
                        ("a bad value", ["train.epochs=-1"]),
                        ("a backslash in catalog.location", ["catalog.location=/tmp/a\\b"])):
        c.cli(f"config: {name}", "train", "--data", ds, "--models", models, "--level", "1",
              "--dry-run", *extra)
    # train
    c.cli("train: --level 2", "train", "--data", ds, "--models", models, "--level", "2")
    c.cli("train: level 3 without a mode", "train", "--data", ds, "--models", models,
          "--level", "3")
    c.cli("train: a branch out of range", "train", "--data", ds, "--models", models,
          "--level", "3", "--mode", "branch", "--branches", "999", "--dry-run")
    c.cli("train --dry-run: weights that are not there", "train", "--data", ds, "--models",
          models, "--level", "1", "--run-id", "w", "--dry-run",
          "train.weights=/no/such/weights.h5")
    c.cli("train: a run id with a slash", "train", "--data", ds, "--models", models,
          "--level", "1", "--run-id", "../x", "--dry-run")
    c.cli("train: a missing dataset", "train", "--data", "nope", "--models", models,
          "--level", "1", "--dry-run")
    # predict, evaluate, serve against damaged models and run.json
    run_json = copy / models / "demo" / "run.json"
    flat = copy / models / "demo" / "flat" / "model.h5"
    predict = ("predict", "--data", ds, "--models", models, "--run-id", "demo", "--output",
               out)

    def swap(path: Path, text: bytes):
        def damage():
            whole = path.read_bytes()
            path.write_bytes(text)
            return lambda: path.write_bytes(whole)
        return damage

    def flipped(path: Path):
        def damage():
            whole = flip(path)
            return lambda: path.write_bytes(whole)
        return damage

    c.cli("predict: an unknown run", "predict", "--data", ds, "--models", models, "--run-id",
          "nope", "--output", out, "--dry-run")
    c.cli("predict: an empty run.json", *predict, "--dry-run", changes=swap(run_json, b""))
    c.cli("predict: run.json a list", *predict, "--dry-run", changes=swap(run_json, b"[]"))
    for cmd in (("predict --dry-run", [*predict, "--dry-run", "--strategy", "flat"]),
                ("evaluate --dry-run", ["evaluate", "--data", ds, "--models", models,
                                        "--run-id", "demo", "--output", out, "--dry-run"]),
                ("serve", ["serve", "--models", models, "--run-id", "demo", "--strategy",
                           "flat", "--port", str(free_port())]),
                ("train refit (a head on it)", ["train", "--data", ds, "--models", models,
                                                "--run-id", "demo", "--level", "3", "--mode",
                                                "refit", "--dry-run"])):
        c.cli(f"{cmd[0]}: a model flipped at the same size", *cmd[1],
              changes=flipped(flat))
    c.cli("predict: a truncated model", *predict, "--dry-run", "--strategy", "flat",
          changes=swap(flat, flat.read_bytes()[:1000]))
    c.cli("predict: an unknown split", *predict, "--split", "train")
    c.cli("predict: --output a file", "predict", "--data", ds, "--models", models,
          "--run-id", "demo", "--output", "output/submission.csv", "--dry-run")
    c.cli("evaluate: an unknown run", "evaluate", "--data", ds, "--models", models,
          "--run-id", "nope", "--output", out, "--dry-run")
    c.cli("review: a missing dataset", "review", "--data", "nope", "--port",
          str(free_port()))
    c.cli("predict: an unknown strategy", *predict, "--strategy", "nope", "--dry-run")
    c.cli("serve: a public host without --allow-remote", "serve", "--models", models,
          "--run-id", "demo", "--host", "0.0.0.0", "--port", str(free_port()))
    c.cli("serve: an unknown run", "serve", "--models", models, "--run-id", "nope", "--port",
          str(free_port()))
    # the copied root: its metastore points at the original's table
    c.cli("predict: a copied root before relocating", *predict)
    # dataset damage
    part = sorted((copy / ds / "images" / "split=test").glob("*.parquet"))[0]
    c.cli("verify: a part flipped at the same size", "verify", "--data", ds,
          changes=flipped(part))
    c.cli("curate: an empty folder", "curate", "--data", str(bad))
    c.cli("curate: hash_blocks <= near_distance", "curate", "--data", ds,
          "curate.hash_blocks=4", "curate.near_distance=4")
    c.cli("compact: a missing dataset", "compact", "--data", "nope")
    c.cli("runs drop: --strategy without --split", "runs", "drop", "--run-id", "demo",
          "--strategy", "flat")
    c.cli("runs relocate: nothing at the target", "runs", "relocate",
          f"catalog.location={bad / 'nothing'}")


def after_relocating(c: Campaign) -> None:
    """What a job reading the dataset meets once the table is the copy's own."""
    part = sorted((c.copy / "dataset" / "images" / "split=test").glob("*.parquet"))[0]
    c.cli("predict: a part flipped at its first page", "predict", "--data", "dataset",
          "--models", "models", "--run-id", "demo", "--output", "output", "--rescore-all",
          changes=lambda: _flip_head(part))
    c.cli("curate: a part flipped at its first page", "curate", "--data", "dataset",
          changes=lambda: _flip_head(part))


def _flip_head(part: Path):
    whole = part.read_bytes()
    part.write_bytes(whole[:4] + bytes(b ^ 0x5A for b in whole[4:68]) + whole[68:])
    return lambda: part.write_bytes(whole)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_probes(c: Campaign) -> None:
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen([str(BIN / "hierarchy"), "serve", "--models", "models",
                               "--run-id", "demo", "--data", "dataset", "--port", str(port),
                               *c.conf], cwd=c.copy, stdout=subprocess.PIPE, stderr=log,
                              text=True)
    token = ""
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = server.stdout.readline()
            if "#token=" in line:  # the review link the server prints at start
                token = line.strip().rsplit("#token=", 1)[-1]
                break
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        _classify_probes(c, url)
        _review_probes(c, url, token)
        ready = requests.get(f"{url}/health/ready", timeout=30).status_code
        c.rows.append({"probe": "serve: still ready after every probe", "kind": "http",
                       "status": ready, "traceback": False, "silent": False,
                       "ok": ready == 200, "line": ""})
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.seek(0)
        text = log.read()
        c.rows.append({"probe": "serve: no traceback in its log", "kind": "http",
                       "status": 0, "traceback": "Traceback" in text, "silent": False,
                       "ok": "Traceback" not in text, "line": text[-300:]})


def _jpeg(c: Campaign) -> bytes:
    import pyarrow.parquet as pq

    part = sorted((c.copy / "dataset" / "images" / "split=test").glob("*.parquet"))[0]
    return pq.read_table(part, columns=["jpeg"]).column(0)[0].as_py()


def _classify_probes(c: Campaign, url: str) -> None:
    jpeg = _jpeg(c)
    seen = (str(c.copy), "/tmp/", "/work/", "/home/")
    post = "/v1/classify"
    js = {"content-type": "application/json"}
    b64 = base64.b64encode(jpeg).decode()
    for name, kw in {
        "an empty body": dict(data=b"", headers=js),
        "not JSON": dict(data=b"{", headers=js),
        "a JSON list": dict(json=[1, 2]),
        "NaN": dict(data=b'{"products": [NaN]}', headers=js),
        "products not a list": dict(json={"products": 3}),
        "a product without pictures": dict(json={"products": [{"id": "a", "pictures": []}]}),
        "a picture that is not base64": dict(json={"products": [{"id": "a",
                                                                  "pictures": ["%%%"]}]}),
        "a PNG": dict(json={"products": [{"id": "a", "pictures": [base64.b64encode(
            b"\x89PNG\r\n\x1a\n" + b"\0" * 100).decode()]}]}),
        "a JPEG cut in half": dict(json={"products": [{"id": "a", "pictures": [
            base64.b64encode(jpeg[:len(jpeg) // 2]).decode()]}]}),
        "13 pictures": dict(json={"products": [{"id": "a", "pictures": [b64] * 13}]}),
        "65 products": dict(json={"products": [{"id": str(i), "pictures": [b64]}
                                               for i in range(65)]}),
        "an id that is an object": dict(json={"products": [{"id": {"a": 1},
                                                             "pictures": [b64]}]}),
        "text/plain": dict(data=b"hello", headers={"content-type": "text/plain"}),
        "multipart without files": dict(files={"other": ("a.txt", b"x")}),
        "a 20 MB body": dict(data=b"x" * (20 << 20), headers=js),
        "JSON nested 30,000 deep": dict(data=b"[" * 30000 + b"]" * 30000, headers=js),
        "a header claiming 65500 x 65500": dict(files=[("files", ("b.jpg", _bomb(jpeg),
                                                                  "image/jpeg"))]),
    }.items():
        c.http(f"classify: {name}", "POST", post, url, seen, **kw)
    c.http("classify: GET", "GET", post, url, seen)
    c.http("a path outside the app", "GET", "/../../etc/passwd", url, seen)


def _bomb(jpeg: bytes) -> bytes:
    """The JPEG with its frame header declaring 65500 x 65500 pixels."""
    i = 2
    while i < len(jpeg) - 9:
        marker = jpeg[i + 1]
        size = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            side = (65500).to_bytes(2, "big")
            return jpeg[:i + 5] + side + side + jpeg[i + 9:]
        i += 2 + size
    return jpeg


def _review_probes(c: Campaign, url: str, token: str) -> None:
    import requests

    reviews = c.copy / "dataset" / "reviews"
    before = state_of(reviews)
    seen = (str(c.copy), "/tmp/", "/work/", "/home/")
    post = "/review/api/decisions"
    ok = {"content-type": "application/json", "x-review-token": token}
    groups = requests.get(f"{url}/review/api/groups?limit=1", timeout=30).json()["groups"]
    group = groups[0]["group"] if groups else "g"
    for name, kw in {
        "Infinity as a product id": dict(data='{"reviewer": "p", "decision": "drop", '
                                              '"pictures": [[Infinity, 0]]}', headers=ok),
        "1e400 as a product id": dict(data='{"reviewer": "p", "decision": "drop", '
                                           '"pictures": [[1e400, 0]]}', headers=ok),
        "a fractional index": dict(data='{"reviewer": "p", "decision": "drop", '
                                        '"pictures": [[1, 0.5]]}', headers=ok),
        "Infinity as a category": dict(data='{"reviewer": "p", "decision": "relabel", '
                                            f'"group": "{group}", "category_id": Infinity}}',
                                       headers=ok),
        "1e400 as a category": dict(data='{"reviewer": "p", "decision": "relabel", '
                                         f'"group": "{group}", "category_id": 1e400}}',
                                    headers=ok),
        "an unknown category": dict(json={"reviewer": "p", "decision": "relabel",
                                          "group": group, "category_id": 1}, headers=ok),
        "an unknown decision": dict(json={"reviewer": "p", "decision": "burn",
                                          "group": group}, headers=ok),
        "no reviewer": dict(json={"decision": "drop", "group": group}, headers=ok),
        "an unknown group": dict(json={"reviewer": "p", "decision": "drop", "group": "nope"},
                                 headers=ok),
        "no token": dict(json={"reviewer": "p", "decision": "drop", "group": group}),
        "a wrong token": dict(json={"reviewer": "p", "decision": "drop", "group": group},
                              headers={"x-review-token": "x"}),
        "another origin": dict(json={"reviewer": "p", "decision": "drop", "group": group},
                               headers={**ok, "origin": "http://evil.example"}),
        "the same host under https": dict(json={"reviewer": "p", "decision": "drop",
                                                "group": group},
                                          headers={**ok, "origin": url.replace("http:",
                                                                               "https:")}),
        "Origin: null": dict(json={"reviewer": "p", "decision": "drop", "group": group},
                             headers={**ok, "origin": "null"}),
        "text/plain": dict(data='{"reviewer": "p", "decision": "drop"}',
                           headers={"content-type": "text/plain", "x-review-token": token}),
        "a 2 MB note": dict(json={"reviewer": "p", "decision": "drop", "group": group,
                                  "note": "x" * 2_000_000}, headers=ok),
        "JSON nested 30,000 deep": dict(data="[" * 30000 + "]" * 30000, headers=ok),
    }.items():
        c.http(f"review: {name}", "POST", post, url, seen, **kw)
    c.http("review: a picture outside the queue", "GET", "/review/api/picture/1/0", url, seen)
    c.http("review: a picture id that is not a number", "GET",
           "/review/api/picture/x/../../etc", url, seen)
    c.http("review: a DNS-rebound Host", "GET", "/review/api/groups", url, seen,
           headers={"host": "evil.example"})
    after = state_of(reviews)
    c.rows.append({"probe": "review: no refused decision was written", "kind": "http",
                   "status": 0, "traceback": False, "silent": before != after,
                   "ok": before == after, "line": ""})


def state_of(folder: Path) -> dict:
    return {str(p): p.stat().st_size for p in folder.rglob("*") if p.is_file()} \
        if folder.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(ROOT / "data" / "demo"),
                    help="a demo data root (make demo); only read")
    ap.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    args = ap.parse_args()
    original = Path(args.root).resolve()
    if not (original / "models" / "demo" / "run.json").exists():
        sys.exit(f"{original}: no demo run (make demo first)")
    original_state = state(original)
    work = Path(tempfile.mkdtemp(prefix="probes-"))
    copy = work / "demo"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("*.lck", "_staging"))
    say(f"probing a copy of {original} in {copy}")
    c = Campaign(copy)
    t0 = time.time()
    try:
        cli_probes(c)
        relocated = subprocess.run([str(BIN / "hierarchy"), "runs", "relocate", *c.conf],
                                   cwd=copy, capture_output=True, text=True, timeout=600)
        say(f"runs relocate: exit {relocated.returncode}")
        planned = subprocess.run([str(BIN / "hierarchy"), "predict", "--data", "dataset",
                                  "--models", "models", "--run-id", "demo", "--output",
                                  "output", "--dry-run", *c.conf], cwd=copy,
                                 capture_output=True, text=True, timeout=600)
        own = f"at file://{copy}/warehouse/predictions" in planned.stdout
        c.rows.append({"probe": "runs relocate: the copy's predict writes into the copy",
                       "kind": "cli", "exit": relocated.returncode, "traceback": False,
                       "silent": False, "ok": relocated.returncode == 0 and own,
                       "line": relocated.stdout[-300:]})
        after_relocating(c)
        http_probes(c)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    untouched = state(original) == original_state
    c.rows.append({"probe": "the original root is unchanged", "kind": "cli", "exit": 0,
                   "traceback": False, "silent": not untouched, "ok": untouched, "line": ""})
    rows = c.rows
    summary = {"probes": len(rows), "cli": sum(r["kind"] == "cli" for r in rows),
               "http": sum(r["kind"] == "http" for r in rows),
               "tracebacks": sum(bool(r["traceback"]) for r in rows),
               "silent_changes": sum(bool(r["silent"]) for r in rows),
               "not_ok": [r["probe"] for r in rows if not r["ok"]],
               "seconds": round(time.time() - t0)}
    say(json.dumps(summary))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "probes": rows}, indent=2))
    say(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
