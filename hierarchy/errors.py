"""The two kinds of failure a user acts on, and the exit codes the CLI maps them to.

Schedulers branch on exit codes, so every stage raises one of these two bases (or a subclass)
for anything a user caused or can fix, and the CLI prints its message as one line:

- :class:`UsageError` (exit 2): the command cannot run as given — a bad flag, config key,
  category table, or a path that is missing, not a file, not a folder or not writable. Raised
  before Spark starts wherever the check does not need it.
- :class:`Refused` (exit 3): the job ran its checks and refused to produce or publish output —
  too much bad input, no usable document, another taxonomy, a dataset that is not complete, a
  missing model, a folder another job holds.

Anything else is a bug or an environment failure and ends in a traceback (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3


class HierarchyError(Exception):
    """Base of the errors whose message is the whole story (no traceback needed)."""

    exit_code = 1


class UsageError(HierarchyError):
    exit_code = EXIT_USAGE


class Refused(HierarchyError):
    exit_code = EXIT_REFUSED
