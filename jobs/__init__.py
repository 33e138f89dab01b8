"""spark-submit entry points, one per stage: each hands its arguments to `hierarchy.cli`
(a package only so that lint-imports can check that they stay that thin)."""
