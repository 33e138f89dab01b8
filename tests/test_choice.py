"""evaluate's choice of the default strategy: held-out val products, paired intervals."""

import numpy as np
import pytest

from hierarchy.contracts.config import load_config
from hierarchy.evaluate import choice
from hierarchy.evaluate.decisions import calibration_part

pytestmark = pytest.mark.spark

DCFG = load_config(overrides=["decide.calibration_share=0.5"]).decide


def _table(spark, hit_rates: dict, n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 50, n)
    rows = []
    for s, rate in hit_rates.items():
        hit = rng.random(n) < rate
        pred = np.where(hit, truth, (truth + 1) % 50)
        rows += [(int(p), s, int(a), int(t)) for p, a, t in zip(range(n), pred, truth)]
    rows.append((n + 1, "flat", 3, None))  # unlabelled: left out
    return spark.createDataFrame(rows, "product_id long, strategy string, l3 int, true_l3 int")


def test_the_choice_is_made_on_the_calibration_part_with_paired_intervals(spark):
    rates = {"flat": 0.60, "refit": 0.70, "fusion": 0.72}
    df = _table(spark, rates)
    held = choice.held_out(df, DCFG, list(rates))
    # the reference, in pandas: the same products (the calibration part), the same hits
    pdf = df.where("true_l3 IS NOT NULL").withColumn("part", calibration_part(0.5)).toPandas()
    pdf = pdf[pdf["part"] == 1]
    hits = pdf.assign(hit=(pdf["l3"] == pdf["true_l3"]).astype(int)).pivot(
        index="product_id", columns="strategy", values="hit")
    assert 1300 < len(hits) < 1700  # about half of val
    for s in rates:
        assert held["accuracy"][s]["products"] == len(hits)
        assert held["accuracy"][s]["accuracy_l3"] == pytest.approx(hits[s].mean())
    chosen = choice.choose(held, {"flat": 0.1, "refit": 0.5, "fusion": 0.4})
    best = hits.mean().idxmax()
    assert chosen["recommended"] == best and chosen["basis"] == "held_out"
    for other in set(rates) - {best}:
        d = (hits[best] - hits[other]).to_numpy()
        v = chosen["versus"][other]
        assert v["difference"] == pytest.approx(d.mean())
        half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
        assert v["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-3)
    # 10 points apart on ~1500 products: the interval of flat's gap leaves zero out
    assert chosen["versus"]["flat"]["ci95"][0] > 0
    assert f"on the {len(hits)} val products no candidate was fitted on" in chosen["reason"]
    assert "points over" in choice.versus_text(chosen)


def test_ties_go_to_coverage_then_preference_and_an_unsplit_val_says_so():
    held = {"accuracy": {"flat": {"products": 10, "accuracy_l3": 0.5},
                         "refit": {"products": 10, "accuracy_l3": 0.5},
                         "multi": {"products": 10, "accuracy_l3": 0.5}},
            "pairs": {(a, b): (10, 0.0, 0.0) for a in ("flat", "multi", "refit")
                      for b in ("flat", "multi", "refit") if a < b}}
    assert choice.choose(held, {"flat": 0.3, "refit": 0.2})["recommended"] == "flat"
    assert choice.choose(held, {})["recommended"] == "refit"  # PREFERENCE: refit before flat
    empty = {"accuracy": {s: {"products": 0, "accuracy_l3": None} for s in ("flat", "refit")},
             "pairs": {("flat", "refit"): (0, 0.0, 0.0)}}
    chosen = choice.choose(empty, {}, {"flat": 0.8, "refit": 0.7})
    assert chosen["recommended"] == "flat" and chosen["basis"] == "all_val"
    assert "in-sample" in chosen["reason"] and chosen["versus"] == {}
    assert choice.paired_interval(0, 0.0, 0.0) is None
