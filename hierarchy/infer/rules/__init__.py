"""How a decision rule's threshold is certified: one module per way declared in
:mod:`hierarchy.contracts.rules`, each holding ``RULE``, a :class:`Certifier`."""

from __future__ import annotations

import importlib
from typing import Dict

from hierarchy.contracts import rules as declared
from hierarchy.contracts.errors import UsageError
from hierarchy.infer.rules.base import Certifier, Curves

_LOADED: Dict[str, Certifier] = {}


def get(name: str) -> Certifier:
    """The certifier declared as ``name``; UsageError for a name nobody declared."""
    if name not in _LOADED:
        if name not in declared.NAMES:
            raise UsageError(f"decision rule {name!r}: expected one of "
                             f"{', '.join(declared.NAMES)}")
        rule = importlib.import_module(declared.module(name)).RULE
        if rule.name != name:
            raise RuntimeError(f"{declared.module(name)}.RULE is {rule.name!r}, declared {name!r}")
        _LOADED[name] = rule
    return _LOADED[name]


__all__ = ["Certifier", "Curves", "get"]
