"""Synthetic Cdiscount-format catalogs (train.bson, test.bson, category_names.csv)."""

from hierarchy.synth.catalog import generate
from hierarchy.synth.taxonomy import make_taxonomy

__all__ = ["generate", "make_taxonomy"]
