"""Load on `hierarchy serve` from N concurrent clients on loopback, against bare Keras.

    .venv/bin/python bench/serve_load.py [--models DIR] [--run-id ID] [--requests R]
                                         [--clients 1,8]

Serves the run (default: the demo's, `make demo` first) in a child process and, for each
client count, sends R requests (one product each, its 1-4 pictures as multipart, products
of the run's dataset test split in turn) from that many threads, each with its own HTTP
connection. Reported per client count: requests/s, pictures/s, p50/p95/p99 latency, answers
other than 200 (503: over ``serve.max_connections``) and the server's peak resident memory
during that count's load (VmHWM, reset before it). ``--seconds S`` runs each client count for
S seconds instead of R requests; ``--set key=value`` passes configuration to the server.

Baseline, in this process on the same pictures: the strategy's models loaded with Keras and
called bare, one product at a time (decode + resize + preprocess + ``predict_on_batch`` per
model the strategy needs, no aggregation, no HTTP): pictures/s and per-product latency. The
ratio is the server's pictures/s over the baseline's. Figures depend on the machine; never
asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results" / "serve_load.json"


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def products(models: str, run_id: str, n: int) -> list:
    """[[jpeg bytes]] of up to n products of the run's dataset (test split, else val)."""
    import pyarrow.dataset as pds

    from hierarchy.contracts.modelstore import ModelStore

    data = ModelStore(models).run(run_id).read().dataset.path
    ds = pds.dataset(os.path.join(data, "images"), partitioning="hive")
    for split in ("test", "val"):
        t = ds.to_table(filter=pds.field("split") == split,
                        columns=["product_id", "img_idx", "jpeg"]).to_pandas()
        if len(t):
            t = t.sort_values(["product_id", "img_idx"])
            return [list(g["jpeg"]) for _, g in t.groupby("product_id")][:n]
    sys.exit(f"{data}: no test or val pictures")


def baseline(models: str, run_id: str, items: list) -> dict:
    import numpy as np
    import tensorflow as tf

    from hierarchy.contracts.config import load_config
    from hierarchy.contracts.model import custom_objects, preprocess_for, resize_for_model
    from hierarchy.serve.classifier import Classifier

    refs = Classifier(load_config(), models, run_id).modelset.refs()
    loaded = [(tf.keras.models.load_model(r.path, custom_objects=custom_objects(),
                                          compile=False), r) for r in refs]

    def one(jpegs):
        images = [tf.io.decode_jpeg(j, channels=3) for j in jpegs]
        for model, ref in loaded:
            x = tf.stack([resize_for_model(im, ref.image_size) for im in images])
            model.predict_on_batch(tf.cast(preprocess_for(ref.backbone)(x), tf.float32))

    one(items[0])
    lat = []
    t0 = time.perf_counter()
    for jpegs in items:
        t = time.perf_counter()
        one(jpegs)
        lat.append(time.perf_counter() - t)
    took = time.perf_counter() - t0
    pics = sum(len(j) for j in items)
    return {"models": [r.key for r in refs], "pictures_per_s": pics / took,
            "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * float(np.percentile(lat, 95))}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, items: list, clients: int, total: int, seconds: float = 0,
         pid: Optional[int] = None) -> dict:
    import numpy as np
    import requests

    lat, errors, answered, lock = [], [], [], threading.Lock()
    counter = iter(range(total)) if total else itertools.count()  # 0: until the deadline
    deadline = time.perf_counter() + seconds if seconds else None

    def client():
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None or deadline and time.perf_counter() > deadline:
                return
            jpegs = items[i % len(items)]
            t = time.perf_counter()
            r = session.post(f"{url}/v1/classify", timeout=120,
                             files=[("files", (f"{k}.jpg", j, "image/jpeg"))
                                    for k, j in enumerate(jpegs)])
            took = time.perf_counter() - t
            with lock:
                (lat if r.status_code == 200 else errors).append(took)
                if r.status_code == 200:
                    answered.append(len(jpegs))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    if pid:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak RSS from here
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = len(lat) + len(errors)
    return {"clients": clients, "requests": total, "errors": len(errors),
            "peak_rss_mb": peak_rss_mb(pid) if pid else None,
            # answered requests only: a 503 past serve.max_connections is not throughput
            "requests_per_s": len(lat) / wall, "pictures_per_s": sum(answered) / wall,
            **{f"p{q}_ms": 1000 * float(np.percentile(lat, q)) if lat else float("nan")
               for q in (50, 95, 99)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=str(ROOT / "data" / "demo" / "models"))
    ap.add_argument("--run-id", default="demo")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--seconds", type=float, default=0,
                    help="run each client count this long instead of --requests requests")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="configuration for the server (serve.max_connections=64, ...)")
    args = ap.parse_args()
    items = products(args.models, args.run_id, 200)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a file, not a pipe nobody reads: the server's warnings (a 503 each, past
    # serve.max_connections) once filled a pipe and stalled it
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen([str(BIN / "hierarchy"), "serve", "--models", args.models,
                               "--run-id", args.run_id, "--port", str(port), "-q",
                               *args.set],
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        import requests

        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"the server stopped: {log.read()[-2000:]}")
            try:
                if requests.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not get ready in 120 s")
            time.sleep(0.5)
        model = requests.get(f"{url}/v1/model").json()
        load(url, items, 2, 20)  # warm-up: the model functions traced for common shapes
        rows = [load(url, items, int(c), 0 if args.seconds else args.requests, args.seconds,
                     server.pid) for c in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=30)
    base = baseline(args.models, args.run_id, items)
    say(f"run {args.run_id}, strategy {model['strategy']} (models {', '.join(model['models'])}),"
        f" {len(items)} products cycled, " + (f"{args.seconds:g} s" if args.seconds else
                                              f"{args.requests} requests") +
        " per client count" + (f", server {' '.join(args.set)}" if args.set else ""))
    say(f"baseline (bare Keras, one product at a time, this process): "
        f"{base['pictures_per_s']:.0f} pictures/s, p50 {base['p50_ms']:.1f} ms, "
        f"p95 {base['p95_ms']:.1f} ms")
    say(f"{'clients':>8}{'req/s':>8}{'pics/s':>8}{'vs bare':>9}{'p50 ms':>8}{'p95 ms':>8}"
        f"{'p99 ms':>8}{'not 200':>8}{'peak MB':>8}")
    for r in rows:
        r["ratio_to_bare"] = r["pictures_per_s"] / base["pictures_per_s"]
        say(f"{r['clients']:>8}{r['requests_per_s']:>8.1f}{r['pictures_per_s']:>8.0f}"
            f"{r['ratio_to_bare']:>8.2f}x{r['p50_ms']:>8.1f}{r['p95_ms']:>8.1f}"
            f"{r['p99_ms']:>8.1f}{r['errors']:>8}{r['peak_rss_mb']:>8.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": model, "baseline": base, "load": rows}, indent=2))
    say(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
