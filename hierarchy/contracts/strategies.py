"""The scoring strategies, declared once: their names, the order reports list them in, the order
predict falls back on when a run recommends none, and the ``predict:`` keys each one reads.

A strategy's behaviour (the models it needs, how their outputs become a leaf distribution, how
a product's pictures pool) is its object in ``hierarchy/infer/strategies/<name>.py`` (the name
with ``-`` as ``_``), found by :func:`hierarchy.infer.strategies.get`. Everything that lists
strategies derives from :data:`DECLARED`: the configuration's choices
(:mod:`hierarchy.contracts.settings`), the commands' ``--strategy``, evaluate's order and the
recommendation's tie-break. An unknown name is refused wherever it is given.

A *variant* is a declared strategy with some of its parameters set otherwise, named in the
configuration's ``variants:`` section (``two-stage-k1: {strategy: two-stage, top_branches:
1}``): evaluate scores it beside the strategies and fits its own decision rule, predict and
serve take its name like any other.

This module is light (no numpy, no TensorFlow): loading a configuration reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

AUTO = "auto"  # the run's recommended strategy (evaluate records it)


@dataclass(frozen=True)
class Declared:
    """One strategy's declaration.

    ``preference``: its rank when a run recommends nothing (evaluate not run yet) and among
    strategies evaluate cannot tell apart (lower first). ``params``: the ``predict:`` keys it
    reads, which a variant may set."""

    name: str
    preference: int
    params: Tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return "hierarchy.infer.strategies." + self.name.replace("-", "_")


# In report order. Heads over a trained trunk are preferred: at equal compute they beat their
# source (bench/README).
DECLARED: Tuple[Declared, ...] = (
    Declared("flat", 4),
    Declared("two-stage", 5, ("top_branches",)),
    Declared("blend", 6, ("top_branches", "blend_weight")),
    Declared("multi", 3),
    Declared("hierarchical", 2),
    Declared("refit", 1),
    Declared("fusion", 0),
    Declared("greedy", 7),
)
NAMES: Tuple[str, ...] = tuple(d.name for d in DECLARED)
PREFERENCE: Tuple[str, ...] = tuple(d.name for d in sorted(DECLARED, key=lambda d: d.preference))
PARAMS: Tuple[str, ...] = tuple(sorted({p for d in DECLARED for p in d.params}))
_BY_NAME: Dict[str, Declared] = {d.name: d for d in DECLARED}
VARIANT_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def declared(name: str) -> Optional[Declared]:
    return _BY_NAME.get(name)


@dataclass(frozen=True)
class Spec:
    """What a run is scored with: a name as the predictions table and run.json write it, the
    declared strategy behind it, and the parameters a variant sets (sorted (key, value)
    pairs; empty for a declared strategy, which reads the configuration's)."""

    name: str
    strategy: str
    params: Tuple[Tuple[str, float], ...] = ()

    def param(self, key: str, default):
        return dict(self.params).get(key, default)

    def record(self) -> dict:
        """How run.json records a variant."""
        return {"strategy": self.strategy, **dict(self.params)}


def spec_of(name: str, variants: Mapping[str, Mapping]) -> Optional[Spec]:
    """The :class:`Spec` a name stands for: a declared strategy, or one of ``variants``
    ({name: {"strategy": declared name, param: value}}); None when it is neither."""
    if name in _BY_NAME:
        return Spec(name, name)
    v = variants.get(name)
    if v is None:
        return None
    return Spec(name, v["strategy"], tuple(sorted((k, x) for k, x in v.items()
                                                  if k != "strategy" and x is not None)))


def choices_text(variants: Mapping[str, Mapping] = ()) -> str:
    """The names a command accepts, for its one-line refusal."""
    return ", ".join((AUTO, *NAMES, *sorted(variants)))
