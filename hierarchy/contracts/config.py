"""Configuration: the embedded default (conf/local.yaml), a `--config FILE` merged over it,
then `section.key=value` overrides. Everything is validated before any work starts.

The default file holds every value; hierarchy.contracts.settings holds their types and what each
allows, one frozen pydantic model per section. pydantic validates; this module only merges the
layers and turns pydantic's errors into one line naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Tuple, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from hierarchy.contracts import storage
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.settings import Allowed, Settings

# The default ships inside the package (a wheel on a cluster node has no source tree, and a
# --py-files zip has no folders at all: read as a package resource); conf/local.yaml in a
# checkout is a link to it.
DEFAULT_CONFIG = "conf/local.yaml"
HOME_VARIABLE = "HIERARCHY_HOME"

# Keys holding a location: a relative value is taken relative to paths.root.
PATH_KEYS = ("paths.data", "paths.models", "paths.output", "paths.synth", "catalog.warehouse",
             "catalog.metastore", "catalog.location", "train.weights")

class ConfigError(UsageError, ValueError):
    """A config value or key that cannot be used; the message names the key and what is allowed."""


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
               dict: "a mapping", tuple: "a list", list: "a list"}


def _merge(base: dict, update: Mapping) -> None:
    """``update`` over ``base``, section by section (a section given as anything but a mapping
    replaces it, for the validation to name)."""
    for k, v in update.items():
        if isinstance(base.get(k), dict) and isinstance(v, Mapping):
            _merge(base[k], v)
        else:
            base[k] = v


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
    return files("hierarchy").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the plain loader keeps
    the last silently: a knob set twice in a long file would be set to whichever came last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base loader names it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Optional[Path]) -> dict:
    """The YAML mapping of the file at ``path`` (None: the packaged default)."""
    try:
        text = default_config_text() if path is None else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
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


def _at(doc: Any, key: str) -> Any:
    for part in key.split("."):
        doc = doc.get(part) if isinstance(doc, Mapping) else None
    return doc


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field(loc: Tuple) -> Tuple[str, Optional[type], Optional[FieldInfo], int]:
    """(dotted key, model holding it, its field or None if unknown, its depth in loc)."""
    model: type = Settings
    for depth, part in enumerate(loc, 1):
        key = ".".join(str(p) for p in loc[:depth])
        info = model.model_fields.get(str(part))
        if info is None:
            return key, model, None, depth
        if not _is_section(info.annotation) or depth == len(loc):
            return key, model, info, depth
        model = info.annotation
    return ".".join(map(str, loc)), model, None, len(loc)


def _kind(annotation: Any) -> Optional[type]:
    """The plain type behind a field's annotation (None: a union, e.g. Optional)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str
    if origin in (tuple, list, dict):
        return origin
    if _is_section(annotation):
        return dict
    return annotation if annotation in _TYPE_NAMES else None


def _message(error: dict, doc: dict, defaults: dict, source: str) -> str:
    """pydantic's error as the one line a user gets: the key, then what is allowed."""
    if not error["loc"]:  # a rule across keys (Settings' own validators) words its line
        return error["msg"].removeprefix("Value error, ")
    key, model, info, depth = _field(error["loc"])
    if info is None:
        prefix = key.rpartition(".")[0]
        where = f" in {source}" if source else ""
        return (f"unknown config key '{key}'{where}; known keys"
                f"{' under ' + repr(prefix) if prefix else ''}: "
                f"{', '.join(sorted(model.model_fields))}")
    value, kind = _at(doc, key), _kind(info.annotation)
    checked_mapping = kind is dict and not _is_section(info.annotation) and \
        error["type"] == "value_error"  # a well-formed mapping its Checked rule refuses
    if kind is dict and not checked_mapping:
        what = "a section" if _is_section(info.annotation) else "a mapping"
        return f"config key '{key}' is {what}; got {value!r}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # as the model holds it
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    wrong_type = depth == len(error["loc"]) and error["type"].endswith(("_type", "_parsing"))
    if kind is not None and (wrong_type or kind is str and not isinstance(value, str)):
        return (f"config key '{key}': {value!r} is not {_TYPE_NAMES[kind]} "
                f"(default {_at(defaults, key)!r})")
    allowed = next((m.text for m in info.metadata if isinstance(m, Allowed)), None)
    if allowed is None:  # a type with no constraint: only its type can be wrong
        return f"config key '{key}': {value!r} is not {_TYPE_NAMES.get(kind, 'allowed')}"
    return f"config key '{key}': {value!r} is not allowed; expected {allowed}"


def _validated(doc: dict, defaults: dict, source: str) -> Settings:
    try:
        return Settings.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # an unknown key first: a misspelt key leaves the value meant for it at its default
        first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(_message(first, doc, defaults, source)) from None


def load_config(path: Optional[os.PathLike] = None, overrides: Iterable[str] = ()) -> Settings:
    """Default, then the file at ``path`` merged over it, then overrides; validated (each
    layer, so an unknown key names where it came from), and relative locations resolved
    against the project data root (:func:`data_root`)."""
    defaults = _read_yaml(None)
    doc = copy.deepcopy(defaults)
    settings = _validated(doc, defaults, DEFAULT_CONFIG)
    if path:
        _merge(doc, _read_yaml(Path(path)))
        settings = _validated(doc, defaults, str(path))
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            _merge(doc, _nest(key, value))
        settings = _validated(doc, defaults, "command line")
    resolved = settings.model_dump()
    _resolve_paths(resolved)
    return Settings.model_validate(resolved)
