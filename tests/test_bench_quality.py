"""bench/quality.py's statistics: the paired bootstrap and per-product scores."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from quality import paired_bootstrap, product_scores  # noqa: E402

from hierarchy.contracts.taxonomy import Taxonomy  # noqa: E402

TAX = Taxonomy.from_rows([(10, "A", "A1", "a"), (11, "A", "A2", "b"), (12, "B", "A1", "c")])


def test_paired_bootstrap_interval_covers_the_difference_and_is_paired():
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.6
    a = b.copy()
    flip = rng.choice(2000, 100, replace=False)  # a wins on 100 products, ties elsewhere
    a[flip] = True
    gain = (a.astype(int) - b).mean()
    mean, lo, hi = paired_bootstrap(a, b, 500)
    assert mean == pytest.approx(gain)
    assert lo <= gain <= hi and lo > 0
    # paired: the interval is narrow because the two sides agree on most products
    assert hi - lo < 0.03
    assert paired_bootstrap(b, b, 200) == (0.0, 0.0, 0.0)


def test_product_scores_use_level2_paths_and_top5():
    truth = np.array([0, 1, 2])
    pred = {"l1": np.array([0, 0, 0]), "l2": np.array([0, 0, 0]), "l3": np.array([0, 0, 0]),
            "top": [[10, 11], [10], [10, 12]]}
    s = product_scores(pred, truth, TAX)
    assert s["l3"].tolist() == [True, False, False]
    # product 2 is under B: level-2 name A1 matches but the node (B, A1) does not
    assert s["l2"].tolist() == [True, False, False]
    assert s["top5"].tolist() == [True, False, True]
    assert s["hf1"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
