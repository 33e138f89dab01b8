"""The configuration's schema: one frozen pydantic model per section of conf/local.yaml.

The values themselves, defaults included, live in the YAML (the one place a user reads them);
these models give each key its type and what it allows. Each constraint carries the phrase
``config.load_config``'s one-line error quotes ("expected a number in [0.0, 1.0)"), so the
message and the check cannot drift apart.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Dict, Literal, Optional, Tuple, Union, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from hierarchy.contracts import rules, strategies
from hierarchy.contracts.manifest import VAL_DRAWS


class Allowed:
    """What a key allows, in words: the end of its error message."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Allowed({self.text!r})"


def _numbers_as_text(v: Any) -> Any:
    # a YAML scalar that reads as a number (`spark.driver_memory: 4`) is still a string key's
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _switch(v: Any) -> Any:
    # YAML 1.1 reads a bare on/off as a boolean: `train.xla=on` means "on"
    return ("on" if v else "off") if isinstance(v, bool) else _numbers_as_text(v)


def _conf_value(v: Any) -> Any:
    # spark.conf passes values to SparkConf, which takes strings ("false", not False)
    return str(v).lower() if isinstance(v, bool) else v if isinstance(v, str) else str(v)


Text = Annotated[str, BeforeValidator(_numbers_as_text), Strict()]
Flag = Annotated[bool, Strict()]


def _in_range(lo, hi, lo_open: bool, hi_open: bool) -> str:
    return f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _bound(number: type, lo, hi, lo_open: bool, hi_open: bool):
    low = {"gt": lo} if lo_open else {"ge": lo}
    high = {"lt": hi} if hi_open else {"le": hi}
    return Annotated[number, Strict(), Field(**low, **high),
                     Allowed(_in_range(lo, hi, lo_open, hi_open))]


def Real(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """A float in the range (an integer is taken as one)."""
    return _bound(float, lo, hi, lo_open, hi_open)


def Whole(lo: float, hi: int, lo_open: bool = False):
    """An integer in the range."""
    return _bound(int, lo, hi, lo_open, False)


def Choice(*allowed: str):
    return Annotated[Literal[allowed], BeforeValidator(_numbers_as_text),  # type: ignore[valid-type]
                     Allowed("one of " + ", ".join(allowed))]


def Switch():
    return Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch),
                     Allowed("one of auto, on, off")]


def Checked(kind: Any, check, allowed: str):
    """``kind`` whose value ``check`` (a predicate) also accepts."""
    def validate(v):
        if not check(v):
            raise ValueError(allowed)
        return v
    return Annotated[kind, AfterValidator(validate), Allowed(allowed)]


# A list's numbers stay as written: [5, 60] is recorded as such, not as [5.0, 60.0].
Number = Union[Annotated[int, Strict()], Annotated[float, Strict()]]


def Interval(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """[low, high] of a search range, both inside the range, low <= high."""
    def within(x) -> bool:
        return (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)

    return Checked(Tuple[Number, Number],
                   lambda v: within(v[0]) and within(v[1]) and v[0] <= v[1],
                   "[low, high], low <= high, each " + _in_range(lo, hi, lo_open, hi_open))


# Spelt out here, not imported: contracts/curation.py and contracts/model.py import pyarrow
# and TensorFlow, which loading a config must not. tests/test_config.py keeps the copies equal.
FLAGS = ("blank", "placeholder", "duplicate", "near_duplicate", "conflicting_labels", "leakage")
BACKBONES = ("small_cnn", "mobilenet_v2", "efficientnet_b0", "resnet50", "inception_v3")


def _identifier():
    return Checked(Text, lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None,
                   "a SQL identifier (letters, digits, _)")


class Section(BaseModel):
    """A config section: every key required (the defaults are conf/local.yaml's), none
    unknown, none changed after loading (a changed copy: ``model_copy(update=...)``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Spark(Section):
    master: Text
    app_name: Text
    driver_memory: Text
    cds_archive: Text
    log_dir: Text
    conf: Dict[str, Annotated[str, BeforeValidator(_conf_value)]]


class Paths(Section):
    root: Text
    data: Text
    models: Text
    output: Text
    synth: Text


class Ingest(Section):
    split_mb: Real(0.0, 4096, lo_open=True)
    row_group_mb: Real(0.0, 1024, lo_open=True)
    val_fraction: Real(0.0, 1.0, hi_open=True)
    val_draw: Choice(*VAL_DRAWS)
    split_seed: Whole(0, 2**63 - 1)
    max_bad_fraction: Real(0.0, 1.0)
    max_document_mb: Whole(1, 2047)
    verify_jpeg: Choice("markers", "decode")
    max_picture_pixels: Whole(0, 2**32)
    raw_decoder: Flag
    compression: Choice("none", "snappy", "zstd", "gzip")
    progress: Flag
    lock_stale_hours: Whole(0.0, 100000, lo_open=True)
    compact_after: Whole(0, 10**6)
    compact_small_mb: Real(0.0, 4096, lo_open=True)


class Plant(Section):
    duplicates: Real(0.0, 1.0)
    near_duplicates: Real(0.0, 1.0)
    relabelled: Real(0.0, 1.0)
    placeholders: Whole(0, 1000)
    placeholder_share: Real(0.0, 1.0)
    blank: Real(0.0, 1.0)


class Synth(Section):
    products: Whole(1, 10**9)
    test_products: Whole(0, 10**9)
    seed: Whole(0, 2**32 - 1)
    preset: Choice("fast", "hard", "tangled")
    taxonomy: Checked(Text, lambda v: v in ("", "small", "hard", "full") or v.endswith(".csv"),
                      "empty (the preset's), small, hard, full or a path to a "
                      "category_names.csv")
    workers: Whole(0, 1024)
    plant: Plant


class Train(Section):
    backbone: Choice(*BACKBONES)
    weights: Checked(Optional[Annotated[str, Strict()]], lambda v: v is None or bool(v),
                     "null or the path of a local weights file")
    image_size: Whole(32, 1024)
    batch_size: Whole(1, 65536)
    epochs: Whole(1, 10000)
    head_epochs: Whole(0, 10000)
    fine_tune_layers: Whole(0, 10000)
    fine_tune_lr_factor: Real(0.0, 1.0, lo_open=True)
    learning_rate: Real(0.0, 10.0, lo_open=True)
    warmup_epochs: Whole(0, 1000)
    label_smoothing: Real(0.0, 1.0, hi_open=True)
    kinship_smoothing: Flag
    kinship_shares: Checked(Tuple[Number, ...], lambda v: len(v) == 3 and all(
        x >= 0 for x in v) and sum(v) > 0,
        "three non-negative numbers (siblings, cousins, strangers), not all zero")
    multi_head_weight: Real(0.0, 100.0)
    multi_marginal_weight: Real(0.0, 100.0)
    multi_conditional_weight: Real(0.0, 100.0)
    expert_hidden: Whole(0, 65536)
    expert_dropout: Real(0.0, 1.0, hi_open=True)
    expert_epochs: Whole(1, 10000)
    expert_learning_rate: Real(0.0, 10.0, lo_open=True)
    fusion_source: Choice("flat", "multi")
    fusion_hidden: Whole(0, 65536)
    fusion_score_hidden: Whole(1, 65536)
    fusion_dropout: Real(0.0, 1.0, hi_open=True)
    fusion_epochs: Whole(1, 10000)
    fusion_learning_rate: Real(0.0, 10.0, lo_open=True)
    fusion_label_smoothing: Real(0.0, 1.0, hi_open=True)
    fusion_max_views: Whole(1, 64)
    dropout: Real(0.0, 1.0, hi_open=True)
    early_stopping_patience: Whole(0, 10000)
    augment: Flag
    shuffle_buffer: Whole(1, 10**7)
    reader_workers: Whole(1, 256)
    dct_scaling: Flag
    input_threads: Whole(0, 1024)
    input_ram_budget_mb: Whole(0, 1 << 30)
    input_optimizations: Flag
    input_cache_mb: Whole(0, 1 << 30)
    mixed_precision: Switch()
    xla: Switch()
    exclude: Checked(Tuple[Text, ...], lambda v: all(x in FLAGS for x in v),
                     "a list of curation flags: " + ", ".join(FLAGS))
    np: Whole(1, 4096)
    seed: Annotated[int, Strict()]
    start_timeout: Whole(1, 86400)
    tracking_uri: Text
    experiment: Text


class Tune(Section):
    trials: Whole(0, 10000)
    holdout: Real(0.0, 1.0, lo_open=True, hi_open=True)
    seed: Whole(0, 2**32 - 1)
    learning_rate: Interval(0.0, 10.0, lo_open=True)
    hidden: Checked(Tuple[Annotated[int, Strict()], ...],
                    lambda v: len(v) > 0 and all(0 <= x <= 65536 for x in v),
                    "a non-empty list of widths in [0, 65536]")
    dropout: Interval(0.0, 1.0, hi_open=True)
    epochs: Interval(1, 10000)
    label_smoothing: Interval(0.0, 1.0, hi_open=True)


class Catalog(Section):
    hive: Flag
    metastore: Text
    metastore_user: Text
    metastore_password_env: Text
    jdbc_driver: Text
    warehouse: Checked(Text, lambda v: "\\" not in v,
                       "a folder without a backslash (Spark's Hadoop paths read it as a "
                       "separator)")
    database: _identifier()
    table: _identifier()
    curation_table: _identifier()
    reviews_table: _identifier()
    review_view: _identifier()
    location: Checked(Text, lambda v: "\\" not in v,
                      "a folder without a backslash (Spark's Hadoop paths read it as a "
                      "separator)")


class Curate(Section):
    near_distance: Whole(0, 32)
    hash_blocks: Whole(2, 32)
    max_rounds: Whole(1, 10000)
    blank_max_std: Real(0.0, 255.0)
    placeholder_min_products: Whole(2, 10**9)
    placeholder_min_categories: Whole(2, 10**6)
    placeholder_max_share: Real(0.0, 1.0, lo_open=True)
    review_max_groups: Whole(1, 10**6)
    review_pictures: Whole(1, 1000)


class Decide(Section):
    rule: Choice(*rules.NAMES)
    target_precision: Real(0.0, 1.0, lo_open=True, hi_open=True)
    confidence: Real(0.0, 1.0, lo_open=True, hi_open=True)
    levels: Checked(Tuple[Annotated[int, Strict()], ...],
                    lambda v: len(v) > 0 and all(x in (1, 2, 3) for x in v)
                    and len(set(v)) == len(v),
                    "a non-empty list of distinct levels among 1, 2, 3 (3 = leaf)")
    calibration_share: Real(0.0, 1.0, lo_open=True, hi_open=True)
    support_bands: Checked(Tuple[Annotated[int, Strict()], ...],
                           lambda v: all(x > 0 for x in v) and list(v) == sorted(set(v)),
                           "a list of increasing positive counts (the bands' lower edges)")
    temperature: Real(0.0, 100.0)
    temperatures: Checked(Tuple[Number, ...], lambda v: len(v) > 0 and all(0 < x <= 100 for x in v),
                          "a non-empty list of numbers in (0, 100]")


class Calibrate(Section):
    temperatures: Checked(Tuple[Number, ...], lambda v: len(v) > 0 and all(x > 0 for x in v),
                          "a list of positive numbers")
    w: Checked(Tuple[Number, ...], lambda v: len(v) > 0, "a list of numbers")
    v: Checked(Tuple[Number, ...], lambda v: len(v) > 0, "a list of numbers")
    max_products: Whole(1, 10**9)


class Serve(Section):
    host: Text
    port: Whole(0, 65535)
    strategy: Text  # checked by Settings: auto, a declared strategy or a variant
    top_n: Whole(1, 100)
    max_pictures: Whole(1, 64)
    max_products: Whole(1, 100000)
    max_picture_bytes: Whole(1, 2**31)
    max_picture_pixels: Whole(1, 2**40)
    max_request_pixels: Whole(1, 2**40)
    max_body_bytes: Whole(1, 2**34)
    review_max_body_bytes: Whole(64, 2**30)
    batch_window_ms: Whole(0, 10000)
    max_batch_pictures: Whole(1, 100000)
    max_connections: Whole(1, 100000)
    header_timeout_s: Real(0.0, 3600.0, lo_open=True)
    body_timeout_s: Real(0.0, 3600.0, lo_open=True)


class Predict(Section):
    strategy: Text  # checked by Settings: auto, a declared strategy or a variant
    top_branches: Whole(0, 100000)
    blend_weight: Real(0.0, 1.0)
    aggregate: Choice("log_mean", "mean")
    tta_flip: Flag
    batch_size: Whole(1, 65536)
    threads: Whole(0, 1024)
    partitions: Whole(0, 10**6)
    top_n: Whole(1, 100)
    submission_gzip: Flag
    progress: Flag
    duplicate_lookup: Flag


@functools.cache  # built once: loading a config validates several times
def _param_types() -> Dict[str, TypeAdapter]:
    """Each strategy parameter's type: the ``predict:`` key it overrides in a variant."""
    hints = get_type_hints(Predict, include_extras=True)
    return {p: TypeAdapter(hints[p]) for p in strategies.PARAMS}


def _variant_ok(name: str, v: Any, types: Dict[str, TypeAdapter]) -> bool:
    if not strategies.VARIANT_NAME.fullmatch(name) or name in (strategies.AUTO,
                                                                *strategies.NAMES):
        return False
    declared = strategies.declared(v.get("strategy")) if isinstance(v, dict) else None
    if declared is None or not set(v) - {"strategy"} <= set(declared.params):
        return False
    try:
        for key in set(v) - {"strategy"}:
            types[key].validate_python(v[key])
    except ValidationError:
        return False
    return True


VARIANTS_ALLOWED = (
    "a mapping of new lowercase names (letters, digits, '-') to {strategy: one of "
    + ", ".join(strategies.NAMES) + ", and only the "
    "parameters it reads: " + "; ".join(f"{d.name}: {', '.join(d.params)}"
                                        for d in strategies.DECLARED if d.params) +
    "}, each value as its predict: key allows")


def Variants():
    return Checked(Dict[str, Dict[str, Any]],
                   lambda v: all(_variant_ok(n, x, _param_types()) for n, x in v.items()),
                   VARIANTS_ALLOWED)


class TaxonomyVersions(Section):
    """``hierarchy taxonomy``: comparing two versions of the category tree."""

    # a leaf is split (or merged) when at least this share of its products went to (came
    # from) each of two or more leaves; fewer moves are label fixes
    min_share: Real(0, 1, lo_open=True)


class Settings(Section):
    """The whole configuration, as ``hierarchy.contracts.config.load_config`` returns it."""

    spark: Spark
    paths: Paths
    ingest: Ingest
    synth: Synth
    train: Train
    tune: Tune
    catalog: Catalog
    curate: Curate
    decide: Decide
    calibrate: Calibrate
    serve: Serve
    predict: Predict
    taxonomy: TaxonomyVersions
    # strategies with other parameters, scored by evaluate beside the declared ones
    # (hierarchy.contracts.strategies)
    variants: Variants()

    @model_validator(mode="after")
    def _strategies_known(self) -> Settings:
        for key, value in (("predict.strategy", self.predict.strategy),
                           ("serve.strategy", self.serve.strategy)):
            if value != strategies.AUTO and strategies.spec_of(value, self.variants) is None:
                raise ValueError(f"config key '{key}': {value!r} is not allowed; expected "
                                 f"one of {strategies.choices_text(self.variants)}")
        return self
