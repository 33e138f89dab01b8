"""The ways evaluate can certify a decision rule's threshold, declared once: the configuration's
``decide.rule`` allows these names, and each is an object in
``hierarchy/infer/rules/<name>.py`` (the name with ``-`` as ``_``), found by
:func:`hierarchy.infer.rules.get`. Adding one is that module and its line here (ARCHITECTURE.md,
"A decision rule"). Light: loading a configuration reads it.
"""

from __future__ import annotations

from typing import Tuple

# the first is the default (conf/local.yaml)
NAMES: Tuple[str, ...] = (
    "fixed-sequence",  # learn-then-test: from the fit part's surest threshold, exact binomial
    "power-start",     # the same test, started where the fit part expects to file the most
    "risk-control",    # expected precision (conformal risk control's +1), same start
)


def module(name: str) -> str:
    return "hierarchy.infer.rules." + name.replace("-", "_")
