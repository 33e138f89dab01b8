"""The real-size shape: every model of a ``--taxonomy full`` catalog (49 / 483 / 5270 categories)
trained with the ``hierarchy`` command, then a two-stage predict; time and memory per model.

    .venv/bin/python bench/taxonomy_scale.py [--products N] [--test-products M] [--epochs E]
                                             [--image-size S] [--batch B] [--seed S]
                                             [--workdir DIR] [key=value ...]

On ``hierarchy synth --taxonomy full`` (N train and M test products; generated and ingested
under DIR/data-<settings>/, reused while the settings stay the same), with small settings
(small_cnn, S px, E epochs, no augmentation), as a scheduler would run them:

  level1    hierarchy train --level 1
  flat      hierarchy train --level 3 --mode flat
  branches  hierarchy train --level 3 --mode branch: every branch with two or more leaves and
            training pictures, one after the other in one process (each starts from the
            level-1 backbone)
  predict   hierarchy predict --split test --strategy two-stage (Spark local[*])

Reported (figures depend on the machine; they are printed and saved to
bench/results/taxonomy_scale.json, never asserted):

- seconds per model: from the command's "training <key>" log line to the next one (the last
  model: to its summary line), so the process start (imports, ~3-5 s) is counted once per
  command, apart; for the branches min / median / max and total;
- per-branch overhead: what a branch model costs beyond its share of the pictures, i.e.
  seconds_b - r x pictures_b, where pictures_b = epochs x train pictures + val pictures of
  branch b and r = the level-1 model's seconds per picture it read (the same pictures, all
  branches together; r includes level 1's own fixed cost, so the overhead is a lower bound):
  median over branches, and its sum as a share of the branch loop;
- memory of the training process over the branch loop: its resident set (VmRSS) after each
  branch model (read when the next one starts; the last when the command prints its summary),
  the least-squares growth per model, and its peak (VmHWM, the kernel's high-water mark) —
  growth per branch model is what would not survive 49 ResNets;
- peak memory of a scoring worker with every branch model loaded: VmHWM of the predict job's
  Spark Python workers (children of the worker daemon, read from /proc while the job runs),
  and, as a check, one process that loads every model of the two-stage set through the
  worker's own loader (:func:`hierarchy.infer.loaded.load`) and calls each once, with its
  RSS after each model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results" / "taxonomy_scale.json"
RUN_ID = "scale"
MB = 1024 * 1024
STARTED = re.compile(r"training (\S+) \(")      # hierarchy.train.launch's log line per model
SUMMARY = re.compile(r"^(level1|flat|branch/\d+): ")  # the command's summary line per model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYTHONUNBUFFERED"] = "1"  # the children's summary lines timed as they are printed
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- /proc
def proc_mem(pid: int) -> tuple:
    """(VmRSS, VmHWM) of a process in bytes, (0, 0) when it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, hwm


def daemon_module() -> str:
    """The module Spark starts the Python worker daemon from (``spark.python.daemon.module``)."""
    from hierarchy.contracts.config import load_config

    return str(load_config()["spark"]["conf"].get("spark.python.daemon.module",
                                                  "pyspark.daemon"))


def spark_workers(pid: int, daemon: str) -> list:
    """Pids of the Spark Python workers under ``pid``: processes forked by the ``daemon``
    module (same command line as their parent, the daemon itself excluded)."""
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in tree:
        try:
            if daemon in " ".join(p.cmdline()) and daemon in " ".join(p.parent().cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


class Watched:
    """One command run to completion while its memory is sampled from /proc: the process's
    VmRSS and VmHWM every ``interval`` s and at every log line naming a model, and (``workers``)
    the VmHWM of every Spark Python worker under it."""

    def __init__(self, cmd: list, interval: float = 0.1, workers: bool = False):
        self.cmd, self.interval, self.workers = cmd, interval, workers
        self.daemon = daemon_module() if workers else ""
        self.events: list = []     # (seconds since start, key, VmRSS, VmHWM) per model start
        self.summaries: dict = {}  # key -> seconds since start of its summary line
        self.worker_hwm: dict = {}  # pid -> VmHWM
        self.peak_rss = self.hwm = self.end_rss = self.last_rss = 0
        self.out: list = []
        self.err: list = []

    def _read(self, stream, sink: list, is_err: bool) -> None:
        for line in stream:
            t = time.perf_counter() - self.t0
            sink.append(line)
            m = STARTED.search(line) if is_err else SUMMARY.match(line)
            if m and is_err:
                self.events.append((t, m.group(1), *proc_mem(self.proc.pid)))
            elif m:
                if not self.summaries:  # every model trained: the process as the loop left it
                    self.end_rss = proc_mem(self.proc.pid)[0] or self.last_rss
                self.summaries.setdefault(m.group(1), t)

    def run(self) -> Watched:
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out, False)),
                   threading.Thread(target=self._read, args=(self.proc.stderr, self.err, True))]
        for r in readers:
            r.start()
        last_tree = 0.0
        while self.proc.poll() is None:
            rss, hwm = proc_mem(self.proc.pid)
            self.last_rss = rss or self.last_rss  # the last sample before it exits
            self.peak_rss, self.hwm = max(self.peak_rss, rss), max(self.hwm, hwm)
            now = time.perf_counter()
            if self.workers and now - last_tree > 0.5:
                last_tree = now
                for pid in spark_workers(self.proc.pid, self.daemon):
                    self.worker_hwm[pid] = max(self.worker_hwm.get(pid, 0), proc_mem(pid)[1])
            elif self.workers:
                for pid in list(self.worker_hwm):
                    self.worker_hwm[pid] = max(self.worker_hwm[pid], proc_mem(pid)[1])
            time.sleep(self.interval)
        for r in readers:
            r.join()
        self.seconds = time.perf_counter() - self.t0
        self.end_rss = self.end_rss or self.last_rss
        if self.proc.returncode != 0:
            sys.exit(f"{' '.join(self.cmd[:4])} ... failed ({self.proc.returncode}):\n"
                     f"{''.join(self.out)[-2000:]}\n{''.join(self.err)[-4000:]}")
        return self

    def model_seconds(self) -> dict:
        """key -> seconds from its "training" line to the next model's (the last: to its
        summary line, printed when the command has trained every model)."""
        out = {}
        for i, (t, key, _, _) in enumerate(self.events):
            end = self.events[i + 1][0] if i + 1 < len(self.events) else \
                min(self.summaries.values(), default=self.seconds)
            out[key] = end - t
        return out


def hierarchy(*args: str, conf: list, watch: bool = False, workers: bool = False):
    """Run one `hierarchy` command (watched: its log lines kept, its memory sampled)."""
    flags = [a for a in args if a.startswith("-") or "=" not in a]
    own = [a for a in args if a not in flags]
    quiet = [] if watch else ["-q"]
    return Watched([str(BIN / "hierarchy"), *flags, *quiet, *conf, *own],
                   workers=workers).run()


# ----------------------------------------------------------------------------- data
def prepare(args, work: Path, conf: list) -> Path:
    """DIR/data-<settings>/dataset with train + test ingested (reused when ready)."""
    key = f"full-p{args.products}-t{args.test_products}-s{args.seed}"
    base = work / f"data-{key}"
    ready = base / "ready.json"
    if ready.exists():
        say(f"[data] reusing {base}")
        return base / "dataset"
    subprocess.run(["rm", "-rf", str(base)], check=True)
    syn, data = base / "synth", base / "dataset"
    t = time.perf_counter()
    hierarchy("synth", "--taxonomy", "full", "--products", str(args.products),
              "--test-products", str(args.test_products), "--seed", str(args.seed),
              "--output", str(syn), conf=conf)
    cats = ["--categories", str(syn / "category_names.csv"), "--output", str(data)]
    hierarchy("ingest", "--input", str(syn / "train.bson"), *cats, conf=conf)
    hierarchy("ingest", "--input", str(syn / "test.bson"), "--kind", "test", *cats, conf=conf)
    ready.write_text(json.dumps({"settings": key}))
    say(f"[data] full taxonomy, {args.products} train + {args.test_products} test products: "
        f"generated and ingested in {time.perf_counter() - t:.0f} s -> {base}")
    return data


# ----------------------------------------------------------------------------- loader check
def load_every_model(models: str, run_id: str, data: str) -> dict:
    """In this (fresh) process: every model of the two-stage set loaded through the scoring
    worker's loader and called once on 8 pictures; RSS after each."""
    import numpy as np

    from hierarchy.contracts.dataset import Dataset
    from hierarchy.infer import loaded, scoring
    from hierarchy.infer.modelset import load_modelset

    base = proc_mem(os.getpid())[0]
    scoring._configure_tf(1)  # as a worker with spark.task.cpus = 1 (imports TensorFlow)
    after_import = proc_mem(os.getpid())[0]
    ms = load_modelset(models, run_id, "two-stage", Dataset(data).taxonomy())
    rss, seconds = [], []
    for ref in ms.refs():
        t = time.perf_counter()
        model = loaded.load(ref)
        model.predict_on_batch(np.zeros((8, ref.image_size, ref.image_size, 3), np.float32))
        seconds.append(time.perf_counter() - t)
        rss.append(proc_mem(os.getpid())[0])
    import resource

    return {"models": len(rss), "rss_start": base, "rss_after_tensorflow": after_import,
            "rss_after_each_model": rss, "seconds_each_model": seconds,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ----------------------------------------------------------------------------- figures
def spread(values) -> dict:
    values = list(values)
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values), "total": sum(values)}


def fit_line(x, y) -> tuple:
    """(intercept, slope) of the least-squares line y = a + c x."""
    import numpy as np

    c, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--test-products", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7, help="of the synthetic catalog")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "taxonomy_scale"))
    ap.add_argument("--load-models", nargs=3, metavar=("MODELS", "RUN", "DATA"),
                    help=argparse.SUPPRESS)  # the loader check, run in its own process
    ap.add_argument("overrides", nargs="*", help="section.key=value for every command")
    args = ap.parse_args()
    if args.load_models:
        print(json.dumps(load_every_model(*args.load_models)))
        return

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    conf = [f"paths.root={work}", "ingest.progress=false", "predict.progress=false",
            "synth.workers=1", *args.overrides]
    data = prepare(args, work, conf)
    models, out = work / "models", work / "output"
    for path in (models, out):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    manifest = json.loads((data / "manifest.json").read_text())
    splits = manifest["splits"]
    train_conf = [*conf, "train.backbone=small_cnn", f"train.image_size={args.image_size}",
                  f"train.batch_size={args.batch}", f"train.epochs={args.epochs}",
                  "train.augment=false", "train.warmup_epochs=0", "train.shuffle_buffer=256",
                  "train.reader_workers=1"]
    run = ["--data", str(data), "--models", str(models), "--run-id", RUN_ID]

    say(f"[train] small_cnn {args.image_size} px, {args.epochs} epoch(s), batch {args.batch}: "
        f"{splits['train']['images']} train / {splits.get('val', {}).get('images', 0)} val "
        f"pictures")
    level1 = hierarchy("train", *run, "--level", "1", conf=train_conf, watch=True)
    say(f"  level 1: {level1.model_seconds()['level1']:.1f} s "
        f"(command {level1.seconds:.1f} s, peak RSS {level1.hwm / MB:.0f} MB)")
    flat = hierarchy("train", *run, "--level", "3", "--mode", "flat", conf=train_conf,
                     watch=True)
    say(f"  flat:    {flat.model_seconds()['flat']:.1f} s "
        f"(command {flat.seconds:.1f} s, peak RSS {flat.hwm / MB:.0f} MB)")
    branch = hierarchy("train", *run, "--level", "3", "--mode", "branch", conf=train_conf,
                       watch=True)

    recorded = json.loads((models / RUN_ID / "run.json").read_text())["models"]
    per_l1 = lambda split: {int(k): v for k, v in  # noqa: E731
                            splits.get(split, {}).get("images_per_l1", {}).items()}
    train_l1, val_l1 = per_l1("train"), per_l1("val")
    secs = branch.model_seconds()
    rows = []
    for _t, key, rss, hwm in branch.events:
        b = int(key.split("/")[1])
        rows.append({"branch": b, "seconds": secs[key],
                     "fit_seconds": recorded.get(key, {}).get("seconds"),
                     "train_images": train_l1.get(b, 0), "val_images": val_l1.get(b, 0),
                     "pictures": args.epochs * train_l1.get(b, 0) + val_l1.get(b, 0),
                     "rss_at_start": rss, "hwm_at_start": hwm})
    skipped = {k: v.get("status") for k, v in recorded.items()
               if k.startswith("branch/") and v.get("status")}
    n = len(rows)
    times = spread(r["seconds"] for r in rows)
    # the level-1 model reads every picture once per epoch (+ val): its seconds per picture,
    # fixed costs included (an upper bound on the marginal rate, so the overhead below is a
    # lower bound)
    l1_seconds = level1.model_seconds()["level1"]
    l1_pictures = args.epochs * splits["train"]["images"] + splits.get("val", {}).get("images", 0)
    rate = l1_seconds / l1_pictures
    for r in rows:
        r["overhead"] = r["seconds"] - rate * r["pictures"]
    overhead = spread(r["overhead"] for r in rows)
    # RSS after each branch model: at the next one's start, the last one at the summary
    rss_after = [r["rss_at_start"] for r in rows[1:]] + [branch.end_rss]
    for r, v in zip(rows, rss_after):
        r["rss_after"] = v
    _, growth = fit_line(range(n), rss_after) if n > 1 else (0.0, 0.0)

    say(f"  branches: {n} models ({len(skipped)} branches without one"
        + (f": {', '.join(sorted(set(skipped.values())))}" if skipped else "")
        + f"), command {branch.seconds:.1f} s")
    say(f"    seconds per branch model: min {times['min']:.1f}, median {times['median']:.1f}, "
        f"max {times['max']:.1f}, total {times['total']:.1f}; branches / level 1 = "
        f"{times['total'] / l1_seconds:.1f}x, branches / flat = "
        f"{times['total'] / flat.model_seconds()['flat']:.1f}x")
    say(f"    per-branch overhead (seconds - level 1's {1000 * rate:.2f} ms per picture x "
        f"pictures read): median {overhead['median']:.2f} s (min {overhead['min']:.2f}, max "
        f"{overhead['max']:.2f}); {overhead['total']:.0f} s in all = "
        f"{overhead['total'] / times['total']:.0%} of the branch loop")
    say("    RSS after each branch model (MB): " + " ".join(f"{v / MB:.0f}" for v in rss_after))
    say(f"    RSS growth per branch model (least squares): {growth / MB:+.1f} MB; first -> last "
        f"{rss_after[0] / MB:.0f} -> {rss_after[-1] / MB:.0f} MB; peak RSS of the process "
        f"{branch.hwm / MB:.0f} MB (level 1 alone {level1.hwm / MB:.0f} MB)")

    say("[predict] two-stage, test split, local[*]")
    predict = hierarchy("predict", *run, "--split", "test", "--strategy", "two-stage",
                        "--output", str(out), conf=conf, workers=True)
    worker_peak = max(predict.worker_hwm.values(), default=0)
    if not worker_peak:
        say("  no Spark Python worker found under the predict command: peak RSS not measured")
    loader = json.loads(subprocess.run(
        [sys.executable, __file__, "--load-models", str(models), RUN_ID, str(data)],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    la = loader["rss_after_each_model"]
    per_model = (la[-1] - la[0]) / max(1, len(la) - 1)
    model_bytes = sum(p.stat().st_size for p in (models / RUN_ID).glob("*/**/model.h5")
                      if "branch" in p.parts or p.parent.name == "level1")
    say(f"  command {predict.seconds:.1f} s; {len(predict.worker_hwm)} Python worker(s), "
        f"peak RSS {worker_peak / MB:.0f} MB (each: "
        + ", ".join(f"{v / MB:.0f}" for v in predict.worker_hwm.values()) + " MB)")
    say(f"  loader check ({loader['models']} models, {model_bytes / MB:.1f} MB of model files): "
        f"RSS {loader['rss_after_tensorflow'] / MB:.0f} MB after TensorFlow, "
        f"{la[0] / MB:.0f} MB after level 1, {la[-1] / MB:.0f} MB after every branch "
        f"({per_model / MB:+.1f} MB per branch model, load + first call "
        f"{statistics.median(loader['seconds_each_model']):.2f} s median); "
        f"peak {loader['peak_rss'] / MB:.0f} MB")

    import tensorflow as tf

    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "load_models"},
        "data": {"train_images": splits["train"]["images"],
                 "val_images": splits.get("val", {}).get("images", 0),
                 "test_images": splits.get("test", {}).get("images", 0)},
        "level1": {"seconds": l1_seconds, "command_seconds": level1.seconds,
                   "peak_rss": level1.hwm},
        "flat": {"seconds": flat.model_seconds()["flat"], "command_seconds": flat.seconds,
                 "peak_rss": flat.hwm},
        "branches": {"models": n, "skipped": skipped, "seconds": times,
                     "command_seconds": branch.seconds,
                     "overhead": overhead, "level1_seconds_per_picture": rate,
                     "rss_after_each_model": rss_after, "rss_growth_per_model": growth,
                     "peak_rss": branch.hwm,
                     "per_branch": rows},
        "predict": {"command_seconds": predict.seconds, "worker_peak_rss": worker_peak,
                    "workers": list(predict.worker_hwm.values()), "loader": loader,
                    "loader_rss_per_branch_model": per_model, "model_file_bytes": model_bytes},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "machine": platform.machine()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"[saved] {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
