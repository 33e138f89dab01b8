"""Taxonomy versions: how two versions of the category tree relate (``hierarchy taxonomy``)."""
