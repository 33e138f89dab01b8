"""Validation metrics of the predictions table, per strategy, from one Spark aggregation.

The rows of the dataset never reach the driver: one ``groupBy(strategy, labeled, true_l1, l1)``
reduces the table to at most ``strategies x n_l1 x n_l1`` small rows of counts (the level-1
confusion cells) that carry every per-level hit count as a sum. Everything else — accuracy,
top-5, hierarchical precision/recall/F1, per-branch accuracy, the confusion matrix — is
arithmetic on those few rows.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from hierarchy.contracts.strategies import NAMES
from hierarchy.contracts.taxonomy import Taxonomy

# report order for the strategies the predict job knows; any other name follows, sorted
TOP_K = 5
LABEL_COLUMNS = ("true_category_id", "true_l1", "true_l2", "true_l3")
COUNTS = ("products", "hit_l1", "hit_l2", "hit_l3", "hit_top5", "hier_hits", "fallback")


def strategy_order(names) -> List[str]:
    known = [s for s in NAMES if s in names]
    return known + sorted(s for s in names if s not in NAMES)  # variants after the declared


def _aggregate(df):
    """The one Spark pass: counts per (strategy, labeled, true level 1, predicted level 1)."""
    from pyspark.sql import functions as F

    labeled = F.lit(True)
    for col in LABEL_COLUMNS:
        labeled = labeled & F.col(col).isNotNull()

    def hit(cond):
        # null comparisons (a missing prediction) count as misses, never as unknown
        return F.sum(F.when(labeled & F.coalesce(cond, F.lit(False)), 1).otherwise(0))

    l1_ok = F.col("l1") == F.col("true_l1")
    # a level-2 node of the tree is its path (l1, l2): level-2 names are keyed by name alone
    # and a few sit under two level-1 parents, so a matching name under the wrong parent is
    # a different node
    l2_node_ok = l1_ok & (F.col("l2") == F.col("true_l2"))
    l3_ok = F.col("l3") == F.col("true_l3")
    in_top5 = F.expr(
        f"exists(slice(coalesce(top5, array()), 1, {TOP_K}), "
        "c -> c.category_id = true_category_id)"
    )
    # |ancestors(pred) ∩ ancestors(true)|: one per level whose node matches
    hier = sum(F.coalesce(c, F.lit(False)).cast("int") for c in (l1_ok, l2_node_ok, l3_ok))
    return (
        df.withColumn("labeled", labeled)
        .groupBy("strategy", "labeled", "true_l1", "l1")
        .agg(
            F.count(F.lit(1)).alias("rows"),
            hit(F.lit(True)).alias("products"),
            hit(l1_ok).alias("hit_l1"),
            hit(F.col("l2") == F.col("true_l2")).alias("hit_l2"),
            hit(l3_ok).alias("hit_l3"),
            hit(in_top5).alias("hit_top5"),
            F.sum(F.when(labeled, hier).otherwise(0)).alias("hier_hits"),
            hit(F.col("fallback")).alias("fallback"),
        )
    )


def _ratio(num: int, den: int) -> Optional[float]:
    return num / den if den else None


def _check_l1(value, taxonomy: Taxonomy, column: str) -> None:
    if value is not None and not 0 <= value < taxonomy.n_l1:
        raise ValueError(
            f"predictions hold {column}={value} but the taxonomy has {taxonomy.n_l1} level-1 "
            f"categories ({taxonomy.fingerprint[:19]}): wrong taxonomy for this run?"
        )


def _strategy_metrics(cells: List[dict], taxonomy: Taxonomy) -> dict:
    total = {k: sum(c[k] or 0 for c in cells) for k in COUNTS + ("rows",)}
    n = total["products"]
    hier_set = 3 * n  # every product has 3 ancestors-or-self, predicted and true alike
    h_precision = _ratio(total["hier_hits"], hier_set)
    h_recall = _ratio(total["hier_hits"], hier_set)
    h_f1 = (
        None if h_precision is None
        else 0.0 if h_precision + h_recall == 0
        else 2 * h_precision * h_recall / (h_precision + h_recall)
    )

    n_l1 = taxonomy.n_l1
    confusion = [[0] * n_l1 for _ in range(n_l1)]
    branch: Dict[int, Dict[str, int]] = {}
    for c in cells:
        if not c["products"]:
            continue
        _check_l1(c["true_l1"], taxonomy, "true_l1")
        _check_l1(c["l1"], taxonomy, "l1")
        b = branch.setdefault(c["true_l1"], {"products": 0, "hit_l1": 0, "hit_l3": 0})
        for key in b:
            b[key] += c[key]
        if c["l1"] is not None:
            confusion[c["true_l1"]][c["l1"]] += c["products"]
    normalized = []
    for row in confusion:
        s = sum(row)
        normalized.append([v / s if s else 0.0 for v in row])

    per_branch = [
        {
            "l1": l1,
            "name": taxonomy.l1_names[l1],
            "products": b["products"],
            "accuracy_l3": _ratio(b["hit_l3"], b["products"]),
            "accuracy_l1": _ratio(b["hit_l1"], b["products"]),
        }
        for l1, b in sorted(branch.items())
    ]
    return {
        "products": n,
        "excluded_unlabeled": total["rows"] - n,
        "accuracy_l1": _ratio(total["hit_l1"], n),
        "accuracy_l2": _ratio(total["hit_l2"], n),
        "accuracy_l3": _ratio(total["hit_l3"], n),
        "top5_accuracy": _ratio(total["hit_top5"], n),
        "hierarchical_precision": h_precision,
        "hierarchical_recall": h_recall,
        "hierarchical_f1": h_f1,
        "fallback": total["fallback"],
        "per_branch": per_branch,
        "confusion_l1": {"labels": list(taxonomy.l1_names), "matrix": normalized},
    }


def evaluate_predictions(df, taxonomy: Taxonomy) -> dict:
    """Metrics of a predictions table already filtered to one run and ``split='val'``.

    ``df`` may hold several strategies; each is scored on its own products. Products whose
    true labels (``true_category_id``, ``true_l1/l2/l3``) are null are left out of every
    metric and counted in ``excluded_unlabeled``.

    Per strategy: ``products``; ``accuracy_l1/l2/l3`` (predicted ``l1/l2/l3`` against the
    true ids — level 2 compares the name-keyed level-2 id, as the competition counts it);
    ``top5_accuracy`` (true category among the first 5 ``top5`` entries); hierarchical
    precision, recall and F1; ``per_branch`` (level-3 and level-1 accuracy and product count
    per true level-1 branch, branches with products only); ``fallback`` (evaluated products
    whose category is the training prior: no image could be scored); ``confusion_l1``
    (``labels`` and ``matrix``: rows = true level 1, columns = predicted, each row normalized
    to sum 1, a row without products all zeros).

    Hierarchical P/R/F1 follow Kiritchenko et al. (2005): each class is replaced by its set of
    ancestors including itself, ``hP = sum|P ∩ T| / sum|P|`` and ``hR = sum|P ∩ T| / sum|T|``
    micro-averaged over products, ``hF1 = 2 hP hR / (hP + hR)``. The nodes are those of the
    tree, so a level-2 node is its path (level-1, level-2): the same level-2 name under another
    parent is not a hit. In this fixed-depth 3-level tree every leaf has exactly three
    ancestors-or-self, ``|P| = |T| = 3``, hence ``hP = hR = hF1``: they stay separate keys so
    the report reads the same if a ragged tree ever comes.
    """
    rows = [r.asDict() for r in _aggregate(df).collect()]
    by_strategy: Dict[str, List[dict]] = {}
    for r in rows:
        by_strategy.setdefault(r["strategy"], []).append(r)
    strategies = {s: _strategy_metrics(by_strategy[s], taxonomy)
                  for s in strategy_order(list(by_strategy))}
    return {
        "strategies": strategies,
        "strategy_order": list(strategies),
        "excluded_unlabeled": sum(m["excluded_unlabeled"] for m in strategies.values()),
        "taxonomy": {
            "fingerprint": taxonomy.fingerprint,
            "level1": taxonomy.n_l1,
            "level2": taxonomy.n_l2,
            "level3": taxonomy.n_l3,
        },
    }
