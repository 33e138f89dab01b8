"""Evaluation of a run's validation predictions: metrics (Spark), figures and reports.

``metrics`` reduces the predictions table with Spark aggregations, ``plots`` draws PNGs with
matplotlib off-screen, ``report`` writes report.json / report.md beside them. Import the
submodules directly: this package imports neither Spark nor matplotlib on its own.
"""
