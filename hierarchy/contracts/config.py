"""Configuration: the embedded default (conf/local.yaml), a `--config FILE` merged over it,
then `section.key=value` overrides. Everything is validated before any work starts.

The default file is the schema: a key that is not in it is unknown, and a value must have the
type of the default value. RULES adds ranges and choices that a type cannot express.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import yaml

from hierarchy.contracts import storage
from hierarchy.contracts.errors import UsageError

# The default ships inside the package (a wheel on a cluster node has no source tree, and a
# --py-files zip has no folders at all: read as a package resource); conf/local.yaml in a
# checkout is a link to it.
DEFAULT_CONFIG = "conf/local.yaml"
HOME_VARIABLE = "HIERARCHY_HOME"

# Keys holding a location: a relative value is taken relative to paths.root.
PATH_KEYS = ("paths.data", "paths.models", "paths.output", "paths.synth", "catalog.warehouse",
             "catalog.metastore", "catalog.location", "train.weights")

# auto | on | off keys: `train.xla=on` on a command line (or `xla: on` in a file) arrives as
# a YAML boolean and means "on".
SWITCH_KEYS = ("train.mixed_precision", "train.xla")

# Sections whose keys are free-form (passed through to another system as-is).
OPEN_SECTIONS = {"spark.conf"}


class ConfigError(UsageError, ValueError):
    """A config value or key that cannot be used; the message names the key and what is allowed."""


def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def check(v: float) -> Optional[str]:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        return f"a number in {left}{lo}, {hi}{right}"

    return check


def _interval(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """[low, high] of a search range, both inside ``_range(lo, hi, ...)``, low <= high."""
    inside = _range(lo, hi, lo_open, hi_open)

    def check(v: Any) -> Optional[str]:
        ok = isinstance(v, list) and len(v) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and inside(x) is None
            for x in v) and v[0] <= v[1]
        return None if ok else f"[low, high], low <= high, each {inside(float('nan'))}"

    return check


def _choice(*allowed: str):
    def check(v: Any) -> Optional[str]:
        return None if v in allowed else "one of " + ", ".join(allowed)

    return check


def _taxonomy_choice(v: str) -> Optional[str]:
    if v in ("", "small", "hard", "full") or v.endswith(".csv"):
        return None
    return "empty (the preset's), small, hard, full or a path to a category_names.csv"


def _identifier(v: str) -> Optional[str]:
    return None if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) else \
        "a SQL identifier (letters, digits, _)"


RULES: Dict[str, Callable[[Any], Optional[str]]] = {
    "ingest.split_mb": _range(0.0, 4096, lo_open=True),
    "ingest.row_group_mb": _range(0.0, 1024, lo_open=True),
    "ingest.val_fraction": _range(0.0, 1.0, hi_open=True),
    "ingest.split_seed": _range(0, 2**63 - 1),
    "ingest.max_bad_fraction": _range(0.0, 1.0),
    "ingest.max_document_mb": _range(1, 2047),
    "ingest.lock_stale_hours": _range(0.0, 100000, lo_open=True),
    "ingest.verify_jpeg": _choice("markers", "decode"),
    "ingest.max_picture_pixels": _range(0, 2**32),
    "ingest.compression": _choice("none", "snappy", "zstd", "gzip"),
    "synth.products": _range(1, 10**9),
    "synth.test_products": _range(0, 10**9),
    "synth.seed": _range(0, 2**32 - 1),
    "synth.taxonomy": _taxonomy_choice,
    "synth.preset": _choice("fast", "hard", "tangled"),
    "synth.workers": _range(0, 1024),
    "synth.plant.duplicates": _range(0.0, 1.0),
    "synth.plant.near_duplicates": _range(0.0, 1.0),
    "synth.plant.relabelled": _range(0.0, 1.0),
    "synth.plant.placeholders": _range(0, 1000),
    "synth.plant.placeholder_share": _range(0.0, 1.0),
    "synth.plant.blank": _range(0.0, 1.0),
    "train.backbone": _choice("small_cnn", "mobilenet_v2", "efficientnet_b0", "resnet50",
                              "inception_v3"),
    "train.weights": lambda v: None if v is None or isinstance(v, str) and v
    else "null or the path of a local weights file",
    "train.image_size": _range(32, 1024),
    "train.batch_size": _range(1, 65536),
    "train.epochs": _range(1, 10000),
    "train.head_epochs": _range(0, 10000),
    "train.fine_tune_layers": _range(0, 10000),
    "train.fine_tune_lr_factor": _range(0.0, 1.0, lo_open=True),
    "train.learning_rate": _range(0.0, 10.0, lo_open=True),
    "train.warmup_epochs": _range(0, 1000),
    "train.label_smoothing": _range(0.0, 1.0, hi_open=True),
    "train.dropout": _range(0.0, 1.0, hi_open=True),
    "train.kinship_shares": lambda v: None if len(v) == 3 and all(
        isinstance(x, (int, float)) and x >= 0 for x in v) and sum(v) > 0
    else "three non-negative numbers (siblings, cousins, strangers), not all zero",
    "train.multi_head_weight": _range(0.0, 100.0),
    "train.multi_marginal_weight": _range(0.0, 100.0),
    "train.multi_conditional_weight": _range(0.0, 100.0),
    "train.fusion_source": _choice("flat", "multi"),
    "train.fusion_hidden": _range(0, 65536),
    "train.fusion_score_hidden": _range(1, 65536),
    "train.fusion_dropout": _range(0.0, 1.0, hi_open=True),
    "train.fusion_epochs": _range(1, 10000),
    "train.fusion_learning_rate": _range(0.0, 10.0, lo_open=True),
    "train.fusion_label_smoothing": _range(0.0, 1.0, hi_open=True),
    "train.fusion_max_views": _range(1, 64),
    "tune.trials": _range(0, 10000),
    "tune.holdout": _range(0.0, 1.0, lo_open=True, hi_open=True),
    "tune.learning_rate": _interval(0.0, 10.0, lo_open=True),
    "tune.seed": _range(0, 2**32 - 1),
    "tune.hidden": lambda v: None if v and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 65536 for x in v)
    else "a non-empty list of widths in [0, 65536]",
    "tune.dropout": _interval(0.0, 1.0, hi_open=True),
    "tune.epochs": _interval(1, 10000),
    "tune.label_smoothing": _interval(0.0, 1.0, hi_open=True),
    "serve.port": _range(0, 65535),
    "serve.strategy": _choice("auto", "flat", "two-stage", "blend", "multi", "hierarchical",
                              "refit", "fusion"),
    "serve.top_k": _range(1, 100),
    "serve.max_pictures": _range(1, 64),
    "serve.max_products": _range(1, 100000),
    "serve.max_picture_bytes": _range(1, 2**31),
    "serve.max_picture_pixels": _range(1, 2**40),
    "serve.max_request_pixels": _range(1, 2**40),
    "serve.max_body_bytes": _range(1, 2**34),
    "serve.review_max_body_bytes": _range(64, 2**30),
    "serve.batch_window_ms": _range(0, 10000),
    "serve.max_batch_pictures": _range(1, 100000),
    "train.expert_hidden": _range(0, 65536),
    "train.expert_dropout": _range(0.0, 1.0, hi_open=True),
    "train.expert_epochs": _range(1, 10000),
    "train.expert_learning_rate": _range(0.0, 10.0, lo_open=True),
    "train.early_stopping_patience": _range(0, 10000),
    "train.shuffle_buffer": _range(1, 10**7),
    "train.reader_workers": _range(1, 256),
    "train.input_threads": _range(0, 1024),
    "train.input_ram_budget_mb": _range(0, 1 << 30),
    "train.input_cache_mb": _range(0, 1 << 30),
    "catalog.database": _identifier,
    "catalog.table": _identifier,
    "catalog.curation_table": _identifier,
    "catalog.reviews_table": _identifier,
    "catalog.review_view": _identifier,
    "train.exclude": lambda v: None if all(x in ("blank", "placeholder", "duplicate",
                                                 "near_duplicate", "conflicting_labels",
                                                 "leakage") for x in v)
    else "a list of curation flags: blank, placeholder, duplicate, near_duplicate, "
         "conflicting_labels, leakage",
    "curate.near_distance": _range(0, 32),
    "curate.hash_blocks": _range(2, 32),
    "curate.max_rounds": _range(1, 10000),
    "curate.blank_max_std": _range(0.0, 255.0),
    "curate.placeholder_min_products": _range(2, 10**9),
    "curate.placeholder_min_categories": _range(2, 10**6),
    "curate.placeholder_max_share": _range(0.0, 1.0, lo_open=True),
    "curate.review_max_groups": _range(1, 10**6),
    "curate.review_pictures": _range(1, 1000),
    "predict.strategy": _choice("auto", "flat", "two-stage", "blend", "multi", "hierarchical",
                                "refit", "fusion"),
    "calibrate.max_products": _range(1, 10**9),
    "calibrate.temperatures": lambda v: None if v and all(
        isinstance(x, (int, float)) and x > 0 for x in v) else "a list of positive numbers",
    "calibrate.w": lambda v: None if v and all(isinstance(x, (int, float)) for x in v)
    else "a list of numbers",
    "calibrate.v": lambda v: None if v and all(isinstance(x, (int, float)) for x in v)
    else "a list of numbers",
    "decide.target_precision": _range(0.0, 1.0, lo_open=True, hi_open=True),
    "decide.confidence": _range(0.0, 1.0, lo_open=True, hi_open=True),
    "decide.levels": lambda v: None if v and all(x in (1, 2, 3) and not isinstance(x, bool)
                                                 for x in v) and len(set(v)) == len(v)
    else "a non-empty list of distinct levels among 1, 2, 3 (3 = leaf)",
    "decide.calibration_share": _range(0.0, 1.0, lo_open=True, hi_open=True),
    "decide.temperature": _range(0.0, 100.0),
    "decide.temperatures": lambda v: None if v and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 100 for x in v)
    else "a non-empty list of numbers in (0, 100]",
    "predict.top_k": _range(0, 100000),
    "predict.blend_weight": _range(0.0, 1.0),
    "predict.aggregate": _choice("log_mean", "mean"),
    "predict.batch_size": _range(1, 65536),
    "predict.threads": _range(0, 1024),
    "predict.partitions": _range(0, 10**6),
    "predict.top_n": _range(1, 100),
    "train.mixed_precision": _choice("auto", "on", "off"),
    "train.xla": _choice("auto", "on", "off"),
    "train.np": _range(1, 4096),
    "train.start_timeout": _range(1, 86400),
}


def _type_name(v: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping", list: "a list"}.get(type(v), type(v).__name__)


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Accept a value of the default's type (ints where floats are expected)."""
    if key in SWITCH_KEYS and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    elif default is None or isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"config key '{key}': {value!r} is not {_type_name(default)} "
        f"(default {default!r})"
    )


def _merge(base: dict, update: Mapping, prefix: str = "", source: str = "") -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if prefix.rstrip(".") in OPEN_SECTIONS:
            base[k] = v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
            continue
        if k not in base:
            known = ", ".join(sorted(base)) or "(none)"
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"unknown config key '{key}'{where}; known keys"
                f"{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: {known}"
            )
        if isinstance(base[k], dict) and key not in OPEN_SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key '{key}' is a section; got {v!r}")
            _merge(base[k], v, prefix=key + ".", source=source)
        elif key in OPEN_SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key '{key}' is a mapping; got {v!r}")
            _merge(base[k], v, prefix=key + ".", source=source)
        else:
            base[k] = _coerce(key, base[k], v)


def parse_override(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    # spark.conf keys themselves contain dots: everything after spark.conf. is one key.
    if key.startswith("spark.conf."):
        parts = ["spark", "conf", key[len("spark.conf."):]]
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def default_config_text() -> str:
    from importlib.resources import files

    return files("hierarchy").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")


def _read_yaml(path: Optional[Path]) -> dict:
    """The YAML mapping of the file at ``path`` (None: the packaged default)."""
    try:
        text = default_config_text() if path is None else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return doc


def _validate(cfg: dict, prefix: str = "") -> None:
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in OPEN_SECTIONS:
            _validate(v, key + ".")
        elif key in RULES:
            problem = RULES[key](v)
            if problem:
                raise ConfigError(f"config key '{key}': {v!r} is not allowed; expected {problem}")


class Config(dict):
    """A nested dict with dotted access: ``cfg.get_path("ingest.val_fraction")``."""

    def get_path(self, dotted: str) -> Any:
        cur: Any = self
        for part in dotted.split("."):
            cur = cur[part]
        return cur


def data_root(configured: str) -> str:
    """The project data root: ``paths.root``, else $HIERARCHY_HOME, else ~/hierarchy. A
    relative root (given on a command line) is the shell's; the result is absolute or a URL."""
    root = configured or os.environ.get(HOME_VARIABLE) or "~/hierarchy"
    if storage.is_url(root):
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


def _resolve_paths(cfg: dict) -> None:
    root = data_root(cfg["paths"]["root"])
    cfg["paths"]["root"] = root
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = cfg[section][name]
        if isinstance(value, str) and value and not storage.is_location(value):
            value = os.path.expanduser(value)
            cfg[section][name] = value if os.path.isabs(value) else f"{root}/{value}"


def load_config(path: Optional[os.PathLike] = None, overrides: Iterable[str] = ()) -> Config:
    """Default, then the file at ``path`` merged over it, then overrides; validated, and
    relative locations resolved against the project data root (:func:`data_root`)."""
    cfg = _read_yaml(None)
    if path:
        _merge(cfg, _read_yaml(Path(path)), source=str(path))
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), source="command line")
    _validate(cfg)
    _resolve_paths(cfg)
    return Config(cfg)
