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
    "power-start",     # learn-then-test, exact binomial, from where the fit part expects
                       # the sequence to file the most (bench/README: files the most)
    "fixed-sequence",  # the same test from the fit part's surest threshold (until 2026-12)
    "risk-control",    # expected precision (conformal risk control's +1), power-start's start
)


def module(name: str) -> str:
    return "hierarchy.infer.rules." + name.replace("-", "_")
