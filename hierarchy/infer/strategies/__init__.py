"""The scoring strategies' behaviour: one module per strategy declared in
:mod:`hierarchy.contracts.strategies`, each holding ``STRATEGY``, a :class:`Strategy`.

Adding a strategy is a new module here and its declaration line there; nothing else lists
strategies (see ARCHITECTURE.md, "A strategy").
"""

from __future__ import annotations

import importlib
from typing import Dict, List

from hierarchy.contracts import strategies as declared
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.modelstore import Run
from hierarchy.infer.strategies.base import Strategy

_LOADED: Dict[str, Strategy] = {}


def get(name: str) -> Strategy:
    """The object of declared strategy ``name``; UsageError for a name nobody declared."""
    if name not in _LOADED:
        d = declared.declared(name)
        if d is None:
            raise UsageError(f"strategy {name!r}: expected one of {', '.join(declared.NAMES)}")
        strategy = importlib.import_module(d.module).STRATEGY
        if strategy.name != name:
            raise RuntimeError(f"{d.module}.STRATEGY is {strategy.name!r}, declared {name!r}")
        _LOADED[name] = strategy
    return _LOADED[name]


def available(run: Run) -> List[str]:
    """The declared strategies this run's models can serve, in report order."""
    return [name for name in declared.NAMES if get(name).available(run)]


__all__ = ["Strategy", "available", "get"]
