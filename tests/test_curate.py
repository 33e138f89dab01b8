"""hierarchy curate on a synthetic catalog with planted problems: each flag scored against the
planted truth, the near-duplicate search's work against all pairs, training leaving flagged
and reviewed pictures out, predict answering from exact copies, and the review page driven in
headless Chromium."""

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pytest
from cluster import free_port

from hierarchy.contracts import curation as ct
from hierarchy.contracts.config import load_config
from hierarchy.contracts.dataset import Dataset
from hierarchy.curate.groups import band_keys, close_pairs, tables
from hierarchy.synth.plant import Plants, expected_flags, precision_recall

pytestmark = pytest.mark.spark

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
PLANTS = Plants(duplicates=0.08, near_duplicates=0.05, relabelled=0.03, placeholders=2,
                placeholder_share=0.02, blank=0.02)


def curate_cfg(root: Path, *extra: str):
    db = "c_" + re.sub(r"\W", "_", root.name)
    return load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                  "predict.progress=false", f"catalog.database={db}", *extra])


def curation_rows(data: str) -> list:
    return pds.dataset(ct.curation_path(data), partitioning="hive").to_table().to_pylist()


@pytest.fixture(scope="module")
def curated(tmp_path_factory, spark):
    from hierarchy.curate.pipeline import run_curate
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate

    root = tmp_path_factory.mktemp("curate")
    syn = root / "syn"
    # the hard preset: poses, scales and clutter vary like real photos (the fast preset
    # draws a leaf's products nearly alike: they are near duplicates of each other)
    generate(str(syn), products=800, seed=11, preset="hard", test_products=150, workers=1,
             progress=False, plants=PLANTS)
    cfg = curate_cfg(root, "ingest.val_fraction=0.2")
    data = str(root / "ds")
    for kind in ("train", "test"):
        run_ingest(spark, cfg, [str(syn / f"{kind}.bson")], str(syn / "category_names.csv"),
                   data, kind)
    summary = run_curate(spark, cfg, data)
    return {"root": root, "syn": syn, "data": data, "cfg": cfg, "summary": summary}


def scores(curated) -> dict:
    rows = curation_rows(curated["data"])
    split_of = {r["product_id"]: r["split"] for r in rows}
    found = {f: {(r["product_id"], r["img_idx"]) for r in rows if r[f]} for f in ct.FLAGS}
    with open(curated["syn"] / "curation_truth.csv") as fh:
        expected = expected_flags(list(csv.DictReader(fh)), split_of)
    return precision_recall(found, expected)


def test_each_flag_against_the_planted_truth(curated):
    s = scores(curated)
    print({f: (v["precision"], v["recall"], v["expected"]) for f, v in s.items()})
    for flag in ("blank", "placeholder", "duplicate"):
        # decided by MD5, pixel statistics and group counts: nothing ambiguous was planted
        assert s[flag]["expected"] > 0 and s[flag]["precision"] == 1.0 and \
            s[flag]["recall"] == 1.0, (flag, s[flag])
    # every planted re-upload is found (they sit <= 4 bits from their source); precision is
    # bounded by the hard preset's look-alikes: sibling leaves drawn alike by design, a few
    # of them within 4 bits of each other (see the note on issue 12)
    # (measured 0.55 at seed 11)
    assert s["near_duplicate"]["recall"] >= 0.95 and s["near_duplicate"]["precision"] >= 0.45
    # conflicts are judged on identical hashes, so that look-alike products of sibling
    # categories are no conflict: a mislabelled re-upload whose hash moved a few bits from
    # its source's is missed (measured recall 0.81, precision 0.96)
    assert s["conflicting_labels"]["expected"] > 0
    assert s["conflicting_labels"]["recall"] >= 0.75 and \
        s["conflicting_labels"]["precision"] >= 0.9
    # a leak is a group in train and val: it inherits the near groups' look-alikes (0.87)
    assert s["leakage"]["recall"] >= 0.95 and s["leakage"]["precision"] >= 0.75


def test_near_duplicates_are_found_without_comparing_all_pairs(curated):
    g = curated["summary"]["grouping"]
    assert g["all_pairs"] > 100 * g["comparisons"] > 0, g
    assert g["tables"] == len(tables(6, 4)) == 15
    # the banding misses nothing within the distance: every close pair shares a key
    rng = np.random.default_rng(3)
    base = rng.integers(-2**63, 2**63 - 1, size=4000, dtype=np.int64)
    flips = [sum(1 << int(b) for b in rng.choice(64, size=k, replace=False))
             for k in rng.integers(0, 5, 400)]
    near = base[:400] ^ np.array(flips, dtype=np.uint64).view(np.int64)
    hashes = np.unique(np.concatenate([base, near]))
    a, b, _ = close_pairs(hashes, 4)
    truth = set(zip(a.tolist(), b.tolist()))
    t, k = band_keys(hashes, 6, 4)
    order = np.lexsort((k, t))
    found, compared = set(), 0
    tiled = np.tile(hashes, len(tables(6, 4)))[order]
    t, k = t[order], k[order]
    starts = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (k[1:] != k[:-1])])
    for s, e in zip(starts, np.r_[starts[1:], len(t)]):
        if e - s > 1:
            compared += (e - s) * (e - s - 1) // 2
            x, y, _ = close_pairs(tiled[s:e], 4)
            found |= set(zip(x.tolist(), y.tolist()))
    assert len(truth) >= 300 and found == truth
    assert compared < len(hashes) * (len(hashes) - 1) // 2 / 1000


def test_the_table_report_and_catalog(curated, spark):
    data, summary = curated["data"], curated["summary"]
    rows = curation_rows(data)
    manifest = Dataset(data).manifest()
    assert len(rows) == sum(s.images for s in manifest.splits.values())
    assert len({(r["product_id"], r["img_idx"]) for r in rows}) == len(rows)
    r = next(r for r in rows if r["placeholder"])
    from importlib.metadata import version

    assert r["hash_algorithm"].startswith(f"imagehash.phash(hash_size=8) {version('ImageHash')}")
    assert re.fullmatch(r"[0-9a-f]{16}", r["phash"]) and "placeholder" in r["flags"]
    assert "categories" in r["reason"] and r["group_products"] >= 10
    report = Path(ct.report_path(data))
    text = (report / "report.md").read_text()
    assert "comparisons made" in text and "| placeholder |" in text
    for png in ("largest_groups.png", "placeholders.png", "conflicts.png"):
        assert (report / png).stat().st_size > 5000, png
    db = curated["cfg"].catalog.database
    n = spark.sql(f"SELECT count(*) FROM {db}.curation WHERE placeholder").first()[0]
    assert n == sum(r["placeholder"] for r in rows) == summary["counts"]["placeholder"]


def _keys_read(data, split, exclusion, label="l3", branch=None):
    from hierarchy.train import data as tdata

    tax = Dataset(data).taxonomy()
    with tdata.make_dataset(data, split, tdata.InputOptions(
            label=label, image_size=32, batch_size=64, training=False, repeat=False,
            return_keys=True, taxonomy=tax, branch=branch, exclusion=exclusion,
            reader_workers=1)) as ds:
        out = [(k.numpy(), y.numpy()) for _, y, k in ds]
    keys = np.concatenate([k for k, _ in out]) if out else np.zeros((0, 2), np.int64)
    labels = np.concatenate([y for _, y in out]) if out else np.zeros(0, np.int32)
    return {(int(p), int(i)): int(y) for (p, i), y in zip(keys, labels)}


def test_training_leaves_out_what_train_exclude_names(curated):
    data = curated["data"]
    rows = curation_rows(data)
    plain = ct.Exclusion(data, ())
    strict = ct.Exclusion(data, ("placeholder", "blank"))
    train_all = _keys_read(data, "train", plain)
    train_strict = _keys_read(data, "train", strict)
    flagged = {(r["product_id"], r["img_idx"]) for r in rows
               if r["split"] == "train" and (r["placeholder"] or r["blank"])}
    assert flagged and set(train_all) - set(train_strict) == flagged
    assert len(train_strict) == len(train_all) - strict.count("train")
    print(f"train.exclude=[placeholder, blank]: {len(train_all)} -> {len(train_strict)} "
          "training pictures")
    # a duplicate group reaching into train stays on the train side: its val pictures go
    leaked = {(r["product_id"], r["img_idx"]) for r in rows
              if r["split"] == "val" and r["leakage"]}
    val = _keys_read(data, "val", plain)
    assert leaked and not leaked & set(val)
    assert len(val) == sum(r["split"] == "val" for r in rows) - len(leaked)


def test_a_relabel_decision_changes_the_training_label(curated):
    data = curated["data"]
    tax = Dataset(data).taxonomy()
    before = _keys_read(data, "train", ct.Exclusion(data, ()))
    (pid, idx), l3 = sorted(before.items())[0]
    new_l3 = (l3 + 1) % tax.n_l3
    path = ct.append_reviews(data, [{"target": "picture", "product_id": pid, "img_idx": idx,
                                     "decision": "relabel", "reviewer": "test",
                                     "category_id": int(tax.category_of_l3(new_l3))}])
    try:
        after = _keys_read(data, "train", ct.Exclusion(data, ()))
        assert after[(pid, idx)] == new_l3
        assert {k: v for k, v in after.items() if k != (pid, idx)} == \
            {k: v for k, v in before.items() if k != (pid, idx)}
        # a branch model follows the picture into its new branch
        new_l1 = int(tax.l1_of_l3[new_l3])
        branch = _keys_read(data, "train", ct.Exclusion(data, ()), label="branch",
                            branch=new_l1)
        assert (pid, idx) in branch
    finally:
        os.remove(path)


def test_predict_answers_from_exact_copies_of_training_pictures(curated, spark, tmp_path):
    from hierarchy.infer.pipeline import run_predict
    from hierarchy.train.launch import run_training

    data, root = curated["data"], curated["root"]
    models = str(root / "models")
    tcfg = load_config(overrides=["train.image_size=32", "train.batch_size=32", "train.epochs=1",
                                  "train.warmup_epochs=0", "train.reader_workers=1",
                                  "train.augment=false", "train.shuffle_buffer=64"])
    run_training(tcfg, data, models, "c1", level=3, mode="flat")
    pcfg = curate_cfg(tmp_path, "predict.duplicate_lookup=true")
    res = run_predict(spark, pcfg, data, models, "c1", "test", "flat", str(tmp_path / "out"))
    table = spark.table(res["table"]).where("run_id = 'c1'").toPandas()
    answered = table[table["answered_by"] == "duplicate"]
    assert len(answered) == res["answered_by_duplicate"] > 0
    assert set(table["answered_by"]) <= {"model", "duplicate", "prior"}
    # the same answer worked out independently from the curation table's rows
    rows = curation_rows(data)
    labels = {}
    for r in rows:
        if r["split"] == "train" and not (r["placeholder"] or r["conflicting_labels"]):
            labels.setdefault(r["md5"], set()).add(r["category_id"])
    expected = {}
    for r in rows:
        if r["split"] == "test" and r["md5"] in labels:
            expected.setdefault(r["product_id"], set()).update(labels[r["md5"]])
    expected = {p: c.pop() for p, c in expected.items() if len(c) == 1}
    assert dict(zip(answered["product_id"], answered["category_id"])) == expected
    assert (answered["confidence"] == 1.0).all()
    with open(curated["syn"] / "test_solution.csv") as fh:
        truth = {int(r["_id"]): int(r["category_id"]) for r in csv.DictReader(fh)}
    right = sum(truth[p] == c for p, c in expected.items())
    print(f"duplicate lookup answered {len(answered)} of {len(table)} test products, "
          f"{right} as the solution file says")
    assert len(table) == res["products"]


def start_review(data: str, *extra: str) -> tuple:
    """A real `hierarchy review` server: (process, base URL, the write token it printed)."""
    import requests

    port = free_port()
    proc = subprocess.Popen([str(BIN / "hierarchy"), "review", "--data", data, "--port",
                             str(port), "-q", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    line = proc.stdout.readline()
    assert f"{url}/review#token=" in line, line + proc.stdout.read()
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if requests.get(f"{url}/health/live", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        assert time.time() < deadline, "the review page did not start in 60 s"
        time.sleep(0.3)
    return proc, url, line.strip().rsplit("#token=", 1)[1]


def test_review_writes_only_from_its_page_with_the_token_and_within_the_queue(curated):
    """A web page the reviewer happens to open cannot post decisions (cross-origin, form or
    text/plain, no token), nor can anything write pictures outside the queue or a huge body;
    answers carry no server path; a public bind address needs --allow-remote."""
    import requests

    data = curated["data"]
    done = subprocess.run([str(BIN / "hierarchy"), "review", "--data", data, "--host",
                           "0.0.0.0", "--port", str(free_port()), "-q"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "--allow-remote" in done.stderr, done.stderr
    proc, url, token = start_review(data)
    post = f"{url}/review/api/decisions"
    try:
        queue = requests.get(f"{url}/review/api/groups?limit=500").json()["groups"]
        group = queue[0]["group"]
        shown = queue[0]["shown"][0]
        body = {"reviewer": "eve", "decision": "drop", "group": group}
        text = __import__("json").dumps(body)
        json_type = {"content-type": "application/json"}
        cases = {
            "text/plain, as a cross-site page may send": (
                dict(data=text, headers={"content-type": "text/plain",
                                         "x-review-token": token}), 415, "application/json"),
            "a form post": (dict(data={"reviewer": "eve", "decision": "drop"},
                                 headers={"x-review-token": token}), 415, "application/json"),
            "another origin": (dict(data=text, headers={**json_type, "x-review-token": token,
                                                        "origin": "http://evil.example"}),
                               403, "cross-origin"),
            "the same host and port under https": (
                dict(data=text, headers={**json_type, "x-review-token": token,
                                         "origin": url.replace("http://", "https://")}),
                403, "cross-origin"),
            "a sandboxed page (Origin: null)": (
                dict(data=text, headers={**json_type, "x-review-token": token,
                                         "origin": "null"}), 403, "cross-origin"),
            "no token": (dict(data=text, headers=json_type), 403, "x-review-token"),
            "a wrong token": (dict(data=text, headers={**json_type, "x-review-token": "x"}),
                              403, "x-review-token"),
            "a picture outside the queue": (
                dict(json={"reviewer": "eve", "decision": "drop", "pictures": [[1, 0]]},
                     headers={"x-review-token": token}), 404, "not in the review queue"),
            "a 2 MB body": (dict(json={**body, "note": "x" * 2_000_000},
                                 headers={"x-review-token": token}), 413,
                            "serve.review_max_body_bytes"),
            "Infinity as a product id": (
                dict(data='{"reviewer": "eve", "decision": "drop", "pictures": [[Infinity, 0]]}',
                     headers={**json_type, "x-review-token": token}), 422, "not JSON"),
            "1e400 as a product id": (
                dict(data='{"reviewer": "eve", "decision": "drop", "pictures": [[1e400, 0]]}',
                     headers={**json_type, "x-review-token": token}), 422, "integers"),
            "a fractional picture index": (
                dict(json={"reviewer": "eve", "decision": "drop",
                           "pictures": [[shown["product_id"], shown["img_idx"] + 0.5]]},
                     headers={"x-review-token": token}), 422, "integers"),
            "Infinity as a relabel's category": (
                dict(data=text.replace('"drop"', '"relabel"')[:-1] + ', "category_id": Infinity}',
                     headers={**json_type, "x-review-token": token}), 422, "not JSON"),
            "1e400 as a relabel's category": (
                dict(data=text.replace('"drop"', '"relabel"')[:-1] + ', "category_id": 1e400}',
                     headers={**json_type, "x-review-token": token}), 422, "an integer"),
            "JSON nested 30,000 deep": (dict(data="[" * 30_000 + "]" * 30_000,
                                              headers={**json_type, "x-review-token": token}),
                                         422, "nested too deep"),
        }
        for name, (kwargs, status, words) in cases.items():
            r = requests.post(post, timeout=30, **kwargs)
            assert r.status_code == status and words in r.json()["detail"], (name, r.text)
        assert not list(Path(ct.reviews_path(data)).glob("*.parquet")), "a refusal wrote"
        # a page that re-pointed its own name at 127.0.0.1 (DNS rebinding) cannot read either
        port = url.rsplit(":", 1)[1]
        rebound = requests.get(f"{url}/review/api/groups", timeout=30,
                               headers={"host": f"evil.example:{port}"})
        assert rebound.status_code == 400 and "groups" not in rebound.text
        assert requests.get(f"http://localhost:{port}/review/api/groups", timeout=30).ok
        # the page's own request: same origin, JSON, the token
        r = requests.post(post, timeout=30, json={"reviewer": "ana", "decision": "keep",
                                                  "pictures": [[shown["product_id"],
                                                                shown["img_idx"]]]},
                          headers={"x-review-token": token, "origin": url})
        assert r.status_code == 200 and r.json()["written"] == 1, r.text
        assert data not in r.text and "/tmp" not in r.text
        assert len(list(Path(ct.reviews_path(data)).glob("*.parquet"))) == 1
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for f in Path(ct.reviews_path(data)).glob("*.parquet"):
            f.unlink()


def test_a_100_mb_body_leaves_the_review_server_under_1_gb(curated):
    """Streamed chunked and with its Content-Length: the body limit answers 413 as soon as it
    is read past (or the client finds the connection closed), so memory never holds it."""
    import http.client
    from urllib.parse import urlsplit

    import requests

    data = curated["data"]
    proc, url, token = start_review(data)
    chunk = b" " * (1 << 20)

    def send(chunked: bool):
        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=120)
        conn.putrequest("POST", "/review/api/decisions")
        for name, value in [("content-type", "application/json"), ("x-review-token", token),
                            ("transfer-encoding", "chunked") if chunked else
                            ("content-length", str(100 * len(chunk)))]:
            conn.putheader(name, value)
        conn.endheaders()
        try:
            for _ in range(100):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: the rest could not be sent
        try:
            return conn.getresponse().status
        except OSError:
            return None  # closed before the client could read the answer
        finally:
            conn.close()

    try:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak RSS
        assert send(chunked=True) in (413, None)
        assert send(chunked=False) in (413, None)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
        print(f"review server peak RSS after two 100 MB bodies: {peak:.0f} MB")
        assert peak < 1024
        assert requests.get(f"{url}/health/live", timeout=30).ok and proc.poll() is None
        assert not list(Path(ct.reviews_path(data)).glob("*.parquet"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_review_page_drop_a_group_in_chromium_and_training_honours_it(curated, spark,
                                                                      tmp_path):
    import requests

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} absent: `make test` installs Debian's chromium as root")
    from playwright.sync_api import sync_playwright

    from hierarchy.curate.pipeline import run_curate

    data = curated["data"]
    proc, url, token = start_review(data)
    shot = tmp_path / "review.png"
    try:
        queue = requests.get(f"{url}/review/api/groups?limit=500").json()
        target = next(g for g in queue["groups"] if "placeholder" in g["flags"])
        rows = curation_rows(data)
        members = {(r["product_id"], r["img_idx"]) for r in rows if r["group_id"] ==
                   target["group"]}
        in_train = {k for k in members if next(r for r in rows if (r["product_id"],
                    r["img_idx"]) == k)["split"] == "train"}
        assert in_train <= set(_keys_read(data, "train", ct.Exclusion(data, ()))) and in_train
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(f"{url}/review#token={token}")  # the link the server printed
                page.wait_for_selector("section.group")
                page.fill("#reviewer", "ana")
                card = page.locator(f'section[data-group="{target["group"]}"]')
                card.scroll_into_view_if_needed()
                card.locator("img").first.wait_for()
                card.locator("button.drop-group").click()
                page.wait_for_selector(f'section[data-group="{target["group"]}"] p.status')
                status = page.locator(f'section[data-group="{target["group"]}"] p.status') \
                    .inner_text()
                shown = page.locator(f'section[data-group="{target["group"]}"] figure.drop') \
                    .count()
                loaded = page.evaluate("Array.from(document.images).filter(i => i.complete && "
                                       "i.naturalWidth > 0).length")
                page.screenshot(path=str(shot), full_page=False)
            finally:
                browser.close()
        assert status.startswith("drop by ana"), status
        assert shown == len(target["shown"]) and loaded >= len(target["shown"])
        # the next training input no longer holds the group
        after = _keys_read(data, "train", ct.Exclusion(data, ()))
        assert not in_train & set(after)
        # and the next curate folds the decision in, replacing its own rows
        summary = run_curate(spark, curated["cfg"], data)
        again = curation_rows(data)
        assert len(again) == len(rows) and summary["counts"]["reviewed"] == len(members)
        assert {(r["product_id"], r["img_idx"]) for r in again if r["review"] == "drop"} == \
            members
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for f in Path(ct.reviews_path(data)).glob("*.parquet"):
            f.unlink()
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width >= 1000 and len(set(im.convert("L").resize((64, 64)).getdata())) > 8
    print(f"screenshot: {shot}")


def test_bad_input_gets_one_line_and_costs_nothing_else(curated, tmp_path, capsys):
    import pyarrow as pa

    from hierarchy.cli import main
    from hierarchy.curate.hashing import hash_batch
    from hierarchy.serve.review import ReviewQueue

    # a picture that does not decode: a null hash and its reason; its neighbours are hashed
    rows = pds.dataset(Dataset(curated["data"]).images("train"), format="parquet").to_table(
        columns=["product_id", "img_idx", "jpeg"]).slice(0, 2).to_pylist()
    rows.insert(1, {"product_id": 7, "img_idx": 0, "jpeg": b"\xff\xd8\xff\xe0broken\xff\xd9"})
    out = hash_batch(pa.RecordBatch.from_pylist(rows))
    assert out.column("phash").null_count == 1 and out.column("phash")[1].as_py() is None
    assert "does not decode" in out.column("hash_error")[1].as_py()
    assert out.column("hash_error")[0].as_py() is None and "jpeg" not in out.schema.names
    # refusals before Spark starts: exit 2 for settings that cannot work, 3 for no dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["curate", "--data", str(empty)]) == 3
    assert main(["curate", "--data", curated["data"], "curate.hash_blocks=4",
                 "curate.near_distance=4"]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: no committed ingest" in err and "must exceed" in err
    # a decision the page cannot record is refused whole, naming why
    queue = ReviewQueue(curated["data"])
    group = queue.groups[0]["review_group"]
    for body, why in (({"decision": "drop", "group": group}, "reviewer"),
                      ({"reviewer": "a", "decision": "burn", "group": group}, "one of"),
                      ({"reviewer": "a", "decision": "relabel", "group": group,
                        "category_id": 1}, "not in the dataset's taxonomy"),
                      ({"reviewer": "a", "decision": "drop", "pictures": [["x"]]}, "pictures")):
        with pytest.raises(ValueError, match=why):
            queue.decide(body)
    with pytest.raises(LookupError):
        queue.decide({"reviewer": "a", "decision": "drop", "group": "nope"})
    assert not list(Path(ct.reviews_path(curated["data"])).glob("*.parquet"))


def test_a_managed_table_of_the_curation_tables_name_is_refused_not_dropped(curated, spark):
    """Curate re-creates its tables by dropping them: dropping a managed table of that name
    (another project's, in a shared metastore) would delete its files."""
    from hierarchy.contracts.errors import Refused
    from hierarchy.curate.pipeline import run_curate

    cfg = curate_cfg(curated["root"], "catalog.reviews_table=someone_elses")
    name = f"{cfg.catalog.database}.someone_elses"
    spark.sql(f"CREATE TABLE {name} (a INT) USING parquet")
    spark.sql(f"INSERT INTO {name} VALUES (7)")
    before = sorted(p.name for p in Path(ct.curation_path(curated["data"])).rglob("*"))
    try:
        with pytest.raises(Refused, match=f"table {name} exists and is not an external"):
            run_curate(spark, cfg, curated["data"])
        assert [r.a for r in spark.table(name).collect()] == [7]
        assert sorted(p.name for p in Path(ct.curation_path(curated["data"])).rglob("*")) \
            == before
    finally:
        spark.sql(f"DROP TABLE {name}")


def test_a_nightly_curate_decodes_only_new_pictures_and_keeps_reviews(curated, spark,
                                                                       tmp_path):
    """After an append, curate decodes only the pictures no earlier curate hashed (by MD5);
    its table is the one hashing everything again gives, and reviews stay."""
    import io
    import shutil

    import bson
    from corrupt import split_docs
    from PIL import Image

    from hierarchy.curate.pipeline import run_curate
    from hierarchy.ingest.pipeline import run_ingest

    data = tmp_path / "ds"
    shutil.copytree(curated["data"], data)
    cfg = curate_cfg(tmp_path)
    docs = [bson.decode(d) for d in split_docs((curated["syn"] / "test.bson").read_bytes())]

    def reencoded(doc):  # the same photo, other bytes: a picture no curate has seen
        out = []
        for p in doc["imgs"]:
            buf = io.BytesIO()
            Image.open(io.BytesIO(p["picture"])).save(buf, "JPEG", quality=61)
            out.append({"picture": buf.getvalue()})
        return out

    new = [{**d, "_id": d["_id"] + 7_000_000, "imgs": reencoded(d)} for d in docs[:10]]
    copies = [{**d, "_id": d["_id"] + 8_000_000} for d in docs[10:14]]  # bytes seen before
    resent = [{**d, "imgs": reencoded(docs[20 + i])} for i, d in enumerate(docs[14:16])]
    day = tmp_path / "day.bson"
    day.write_bytes(b"".join(bson.encode(d) for d in new + copies + resent))
    run_ingest(spark, cfg, [str(day)], str(curated["syn"] / "category_names.csv"), str(data),
               "test", append=True)
    unseen = sum(len(d["imgs"]) for d in new + resent)
    pid, idx = next((r["product_id"], r["img_idx"]) for r in curation_rows(str(data))
                    if r["split"] == "train")
    ct.append_reviews(str(data), [{"target": "picture", "product_id": pid, "img_idx": idx,
                                   "decision": "drop", "reviewer": "night"}])

    night = run_curate(spark, cfg, str(data))
    pictures = night["counts"]["pictures"]
    assert night["hashing"] == {"decoded": unseen, "reused": pictures - unseen}
    rows = {(r["product_id"], r["img_idx"]): r for r in curation_rows(str(data))}
    assert len(rows) == pictures
    assert rows[(pid, idx)]["review"] == "drop"  # the reviewer's decision kept
    assert all((d["_id"], 0) in rows for d in new + copies)

    full = run_curate(spark, cfg, str(data), rehash=True)
    assert full["hashing"] == {"decoded": pictures, "reused": 0}
    again = {(r["product_id"], r["img_idx"]): r for r in curation_rows(str(data))}
    columns = ("md5", "phash", "pixel_std", "hash_error", "group_pictures", "flags", "review")
    assert {k: tuple(r[c] for c in columns) for k, r in rows.items()} == \
        {k: tuple(r[c] for c in columns) for k, r in again.items()}
    # a curate of an unchanged dataset decodes nothing
    assert run_curate(spark, cfg, str(data))["hashing"]["decoded"] == 0
