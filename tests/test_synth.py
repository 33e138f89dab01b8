"""The synthetic catalog writes the exact Cdiscount format, deterministically."""

from __future__ import annotations

import csv
import io
import os

import bson
import numpy as np
import pytest
from PIL import Image

from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.synth import catalog, generate, make_taxonomy
from hierarchy.synth.images import N_FAMILIES, family_of, marks_of, render_picture

REAL_CSV = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "cdiscount", "category_names.csv"
)


def read_docs(path):
    with open(path, "rb") as fh:
        return list(bson.decode_file_iter(fh))


def read_bytes(directory):
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in ("train.bson", "test.bson", "category_names.csv")
    }


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = generate(str(out), 120, seed=3, test_products=40, workers=1, progress=False)
    return out, stats


def test_documents_have_the_cdiscount_layout(small_catalog):
    out, stats = small_catalog
    train, test = read_docs(out / "train.bson"), read_docs(out / "test.bson")
    assert len(train) == 120 and len(test) == 40
    assert all(list(d) == ["_id", "imgs", "category_id"] for d in train)
    assert all(list(d) == ["_id", "imgs"] for d in test)
    ids = [d["_id"] for d in train + test]
    assert len(set(ids)) == len(ids)
    assert all(type(i) is int for i in ids)
    counts = [len(d["imgs"]) for d in train + test]
    assert min(counts) >= 1 and max(counts) <= 4
    assert stats["images"] == {"train": sum(counts[:120]), "test": sum(counts[120:])}
    for doc in train[:30] + test[:10]:
        for img in doc["imgs"]:
            assert list(img) == ["picture"] and isinstance(img["picture"], bytes)
            pic = Image.open(io.BytesIO(img["picture"]))
            assert pic.format == "JPEG" and pic.size == (180, 180) and pic.mode == "RGB"
            pic.load()


def test_categories_come_from_the_written_table(small_catalog):
    out, stats = small_catalog
    with open(out / "category_names.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == ["category_id", "category_level1", "category_level2", "category_level3"]
    tax = Taxonomy.from_csv(str(out / "category_names.csv"))
    assert tax.fingerprint == make_taxonomy("small", 3).fingerprint
    used = {d["category_id"] for d in read_docs(out / "train.bson")}
    assert used <= set(tax.category_ids)
    assert stats["categories_used"] == len(used)
    assert stats["bytes"]["train.bson"] == os.path.getsize(out / "train.bson")
    assert not [p for p in os.listdir(out) if p.endswith(".partial")]


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, monkeypatch):
    # Small blocks so that two workers really share the work.
    monkeypatch.setattr(catalog, "BLOCK", 8)
    generate(str(tmp_path / "a"), 50, seed=11, workers=1, progress=False)
    generate(str(tmp_path / "b"), 50, seed=11, workers=2, progress=False)
    generate(str(tmp_path / "c"), 50, seed=12, workers=2, progress=False)
    a, b, c = (read_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a["train.bson"] != c["train.bson"] and a["test.bson"] != c["test.bson"]


def test_default_test_size_and_views_per_product(tmp_path):
    stats = generate(str(tmp_path), 400, seed=0, workers=1, progress=False)
    assert stats["products"] == {"train": 400, "test": 100}
    mean_views = stats["images"]["train"] / 400
    assert 1.5 < mean_views < 2.0  # the real train set has 1.75


def test_interrupted_run_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom")
        return [b"x"]

    monkeypatch.setattr(catalog, "render_product", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate(str(tmp_path), 20, seed=0, workers=1, progress=False)
    assert os.listdir(tmp_path) == []


def test_small_taxonomy_shape():
    tax = make_taxonomy("small", 5)
    assert (tax.n_l1, tax.n_l2, tax.n_l3) == (4, 12, 40)
    assert np.bincount(tax.l1_of_l3).min() >= 2
    l2_parents = {int(b): int(a) for a, b in zip(tax.l1_of_l3, tax.l2_of_l3)}
    assert np.bincount(list(l2_parents.values())).tolist() == [3, 3, 3, 3]
    assert tax.fingerprint == make_taxonomy("small", 5).fingerprint
    assert tax.category_ids != make_taxonomy("small", 6).category_ids


def test_full_taxonomy_shape():
    tax = make_taxonomy("full", 0)
    assert (tax.n_l1, tax.n_l2, tax.n_l3) == (49, 483, 5270)
    assert np.bincount(tax.l2_of_l3, minlength=483).min() >= 1
    per_l1 = np.bincount(tax.l1_of_l3)
    assert per_l1.max() > 5 * per_l1.min()  # uneven, like the real catalog
    ids = np.array(tax.category_ids)
    assert len(set(ids)) == 5270 and ids.min() >= 10**9 and ids.max() < 10**10
    assert len(set(tax.l3_names)) == 5270


def test_unknown_taxonomy_is_refused():
    with pytest.raises(ValueError, match="category_names.csv"):
        make_taxonomy("/no/such/category_names.csv", 0)


def test_synth_taxonomy_naming_a_folder_a_missing_or_an_unreadable_file_is_one_line(
        tmp_path, capsys):
    from hierarchy.cli import main

    unreadable = tmp_path / "cats.csv"
    unreadable.write_text("category_id\n")
    unreadable.chmod(0)
    cases = {str(tmp_path): "a folder", str(tmp_path / "nope.csv"): "no such file"}
    if os.geteuid() != 0:  # root reads any file
        cases[str(unreadable)] = "cannot read it"
    for taxonomy, why in cases.items():
        rc = main(["synth", "--output", str(tmp_path / "out"), "--taxonomy", taxonomy, "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and why in err[0] and taxonomy in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.real_data
def test_csv_taxonomy_supplies_the_categories(tmp_path):
    if not os.path.exists(REAL_CSV):
        pytest.skip(f"real category_names.csv not found at {os.path.abspath(REAL_CSV)}")
    stats = generate(str(tmp_path), 60, seed=1, taxonomy=REAL_CSV, workers=1, progress=False)
    real = Taxonomy.from_csv(REAL_CSV)
    assert stats["categories"] == 5270
    assert Taxonomy.from_csv(str(tmp_path / "category_names.csv")).fingerprint == real.fingerprint
    used = {d["category_id"] for d in read_docs(tmp_path / "train.bson")}
    assert used <= set(real.category_ids)


def test_every_leaf_can_be_drawn_and_frequencies_are_skewed():
    w = catalog.category_weights(5270, 0)
    assert w.min() > 0 and abs(w.sum() - 1) < 1e-9
    assert w.max() > 20 * w.min()


def test_looks_are_distinct_codes():
    assert len({family_of(f) for f in range(49)}) == N_FAMILIES == 49
    assert len({marks_of(k) for k in range(128)}) == 128
    looks = catalog.leaf_looks(make_taxonomy("full", 0))
    assert len({tuple(x) for x in looks}) == 5270  # every leaf has its own look


def _silhouette(jpeg):
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).reduce(4), dtype=np.int16)
    return (pixels.min(axis=2) < 200).astype(float)


def test_level1_families_have_distinct_average_pictures():
    # Single pictures vary too much in pose to compare; averages over many leaves of a family
    # must still be closer to another average of the same family than to any other family's.
    rng = np.random.default_rng(0)
    families = range(4)
    halves = []
    for _ in range(2):
        halves.append(
            [
                np.mean(
                    [
                        _silhouette(
                            render_picture(f, int(rng.integers(3)), int(rng.integers(16)), rng)
                        )
                        for _ in range(80)
                    ],
                    axis=0,
                )
                for f in families
            ]
        )
    dist = np.array([[np.sqrt(((a - b) ** 2).mean()) for b in halves[1]] for a in halves[0]])
    assert (dist.argmin(axis=1) == np.arange(4)).all(), dist
    assert (dist.argmin(axis=0) == np.arange(4)).all(), dist


def test_hard_preset_has_a_long_tail_noisy_labels_and_a_solution_file(tmp_path):
    import pandas as pd

    stats = generate(str(tmp_path), 600, seed=4, test_products=100, workers=1, progress=False,
                     preset="hard")
    tax = Taxonomy.from_csv(str(tmp_path / "category_names.csv"))
    assert (tax.n_l1, tax.n_l2, tax.n_l3) == (6, 18, 108) and stats["preset"] == "hard"
    train = read_docs(tmp_path / "train.bson")
    counts = pd.Series([d["category_id"] for d in train]).value_counts()
    assert counts.iloc[0] >= 8 * counts.median()  # a long tail behind a few big leaves
    # the test dump stays unlabelled; its truth sits in the solution file, one row a product
    test = read_docs(tmp_path / "test.bson")
    solution = pd.read_csv(tmp_path / "test_solution.csv")
    assert list(solution.columns) == ["_id", "category_id"]
    assert sorted(solution["_id"]) == sorted(d["_id"] for d in test)
    assert set(solution["category_id"]) <= set(tax.category_ids)
    assert all("category_id" not in d for d in test)


def test_hard_labels_move_only_to_siblings():
    from hierarchy.synth.catalog import PRESETS, Plan, leaf_looks, render_block, sibling_table

    tax = make_taxonomy("hard", 1)
    plan = Plan(seed=1, looks=leaf_looks(tax), category_ids=np.asarray(tax.category_ids),
                weights=np.full(tax.n_l3, 1 / tax.n_l3), preset=PRESETS["hard"],
                siblings=sibling_table(tax))
    catalog._init_worker(plan)
    _, blob, _, leaves, _ = render_block(("train", 0, np.arange(2000)))
    written = [tax.l3_of_category(d["category_id"]) for d in bson.decode_all(blob)]
    moved = [(a, b) for a, b in zip(leaves.tolist(), written) if a != b]
    assert 0.02 < len(moved) / len(written) < 0.06
    assert all(tax.l2_of_l3[a] == tax.l2_of_l3[b] or tax.l1_of_l3[a] == tax.l1_of_l3[b]
               for a, b in moved)


def test_tangled_preset_draws_look_alikes_across_branches():
    from hierarchy.synth.catalog import PRESETS, drawn_looks, leaf_looks

    tax = make_taxonomy("hard", 3)
    assert (drawn_looks(tax, PRESETS["hard"], 3) == leaf_looks(tax)).all()
    looks = drawn_looks(tax, PRESETS["tangled"], 3)
    assert sorted(map(tuple, looks.tolist())) == sorted(map(tuple, leaf_looks(tax).tolist()))
    # leaves drawn alike (the same level-1 family and level-2 pattern) come from several
    # true branches: a true level-1 node is no longer what the pictures group by
    groups = {}
    for l3, (l1, l2_rank, _) in enumerate(looks.tolist()):
        groups.setdefault((l1, l2_rank), set()).add(int(tax.l1_of_l3[l3]))
    spread = [len(branches) for branches in groups.values()]
    assert np.mean(spread) >= 2.5, spread
