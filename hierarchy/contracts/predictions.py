"""The predictions table: the contract between predict and its readers (evaluate, the
analyst notebook, SQL users). Every column is declared once here; the scoring output's Spark
schema, the table's column order and the row of a product that has no usable picture are all
derived from it.

Scoring emits one row per product with the ``SCORED`` columns (top candidates as two parallel
arrays, cheap to build in pandas); the job then zips them into ``top5`` structs and adds the
scoring time and the partition columns, giving ``TABLE_COLUMNS``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from hierarchy.contracts.taxonomy import Taxonomy

PARTITIONS = ("run_id", "split", "strategy")

# (name, Spark SQL type) of a scored product row, in table order
SCORED: List[Tuple[str, str]] = [
    ("product_id", "long"),
    ("category_id", "long"),
    ("category_level1", "string"),
    ("category_level2", "string"),
    ("category_level3", "string"),
    ("l1", "int"),
    ("l2", "int"),
    ("l3", "int"),
    ("confidence", "double"),
    ("top_category_id", "array<long>"),
    ("top_probability", "array<double>"),
    ("level1_id", "int"),
    ("level1_name", "string"),
    ("level1_probability", "double"),
    # the decision (hierarchy/infer/decide.py): 3, 2, 1 = filed at that level's node, 0 = to
    # review, null = the run has no fitted rule; the node's id (a leaf's category_id, else the
    # l2 / l1 id), its path and its probability
    ("decision_level", "int"),
    ("decision_id", "long"),
    ("decision_name", "string"),
    ("decision_probability", "double"),
    # pictures scored; pictures of the product not scored: those that failed to decode at
    # scoring, or, for a product none of whose pictures reached images/ (a fallback row),
    # those ingest quarantined. A picture ingest quarantined from a product that still has
    # others is in quarantine/, not counted here.
    ("image_count", "int"),
    ("bad_image_count", "int"),
    ("fallback", "boolean"),
    ("true_category_id", "long"),
    ("true_l1", "int"),
    ("true_l2", "int"),
    ("true_l3", "int"),
]
SCORED_COLUMNS = [name for name, _ in SCORED]
SCORED_DDL = ", ".join(f"{name} {kind}" for name, kind in SCORED)
SCORED_TYPES: Dict[str, str] = dict(SCORED)
# the scoring pass's output: the scored columns of one product under one strategy (a pass
# scores every strategy of an evaluate at once)
SCORED_BY_STRATEGY_DDL = f"{SCORED_DDL}, strategy string"

TOP = ("top_category_id", "top_probability")   # become the top5 array of structs
TRUTH = ("true_category_id", "true_l1", "true_l2", "true_l3")   # null outside val
# who answered a product: the models, the training prior (no usable picture: ``fallback``) or
# an exact copy of a training picture (``predict.duplicate_lookup``)
ANSWERED_BY = ("model", "prior", "duplicate")
TABLE_COLUMNS = [
    *SCORED_COLUMNS[:SCORED_COLUMNS.index(TOP[0])], "top5",
    *SCORED_COLUMNS[SCORED_COLUMNS.index(TOP[1]) + 1:], "answered_by",
    # what makes a row current (hierarchy/infer/incremental.py): the product's content digest
    # (hierarchy/contracts/digest.py) and a fingerprint of the models, rule and options
    "input_digest", "scored_with",
    # the taxonomy version (hierarchy/contracts/versions.py: the category table's
    # fingerprint) the row's ids and names are of: a run's old rows stay tied to theirs
    "taxonomy_version",
    "scored_at", *PARTITIONS,
]
# columns added to the table after its first release: an older table gains them on a write
ADDED_COLUMNS = {"answered_by": "STRING", "decision_level": "INT", "decision_id": "BIGINT",
                 "decision_name": "STRING", "decision_probability": "DOUBLE",
                 "input_digest": "STRING", "scored_with": "STRING",
                 "taxonomy_version": "STRING"}
DECISION = ("decision_level", "decision_id", "decision_name", "decision_probability")
# nullable integers in pandas (the truth of a test product is null)
PANDAS_DTYPES = {"true_category_id": "Int64", "true_l1": "Int32", "true_l2": "Int32",
                 "true_l3": "Int32", "decision_level": "Int32", "decision_id": "Int64",
                 "decision_probability": "Float64"}


def leaf_prediction(taxonomy: Taxonomy, l3: int, confidence: float, top_ids: list,
                    top_probs: list, level1_id: int, level1_probability: float) -> dict:
    """The predicted columns of a product (all but its id, counts and truth)."""
    names = taxonomy.names_of_l3(l3)
    return {"category_id": int(taxonomy.category_of_l3(l3)),
            "category_level1": names[0], "category_level2": names[1],
            "category_level3": names[2], "l1": int(taxonomy.l1_of_l3[l3]),
            "l2": int(taxonomy.l2_of_l3[l3]), "l3": int(l3), "confidence": float(confidence),
            "top_category_id": [int(c) for c in top_ids],
            "top_probability": [float(p) for p in top_probs],
            "level1_id": int(level1_id), "level1_name": taxonomy.l1_names[level1_id],
            "level1_probability": float(level1_probability)}


def fallback_prediction(taxonomy: Taxonomy, category_id: int, share: float) -> dict:
    """What a product with no scored picture gets: the training prior (the most frequent
    training category, with its share of training products as every probability), flagged
    ``fallback``. Used by the scorer (no picture decoded) and by the job (every picture
    quarantined at ingest), so both give the same row."""
    l3 = taxonomy.l3_of_category(category_id)
    l1 = int(taxonomy.l1_of_l3[l3])
    # no picture to judge: a person decides (never filed on the prior alone)
    return {**leaf_prediction(taxonomy, l3, share, [category_id], [share], l1, share),
            "decision_level": 0, "decision_id": None, "decision_name": None,
            "decision_probability": None, "image_count": 0, "fallback": True}
